//! The one wall clock: Unix time in the units its callers need.

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch() -> std::time::Duration {
    // A clock before 1970 reads as 1970: nothing here needs more than that.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

pub fn unix_micros() -> u64 {
    since_epoch().as_micros() as u64
}

pub fn unix_secs_f64() -> f64 {
    since_epoch().as_secs_f64()
}
