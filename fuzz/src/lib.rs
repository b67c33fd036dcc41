//! What the fuzz targets share: an event stream parser written from the WHATWG specification (the
//! oracle the gateway's SSE encoder is checked against), and the gateway's token verifier.

pub mod sse_spec;

pub use sse_spec::{Dispatched, Interpreted, interpret};

use std::sync::LazyLock;

use sse_gateway::auth::Verifier;
use sse_gateway::config::Config;

/// The fuzz targets' JWT secret (long enough for any mode's rules).
pub const SECRET: &str = "fuzzing-secret-0123456789abcdef-0123456789abcdef";

/// The gateway's verifier with [`SECRET`], HS256 only and the default leeway.
pub static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let config = Config::from_lookup(|name| {
        let value = match name {
            "JWT_SECRET" => SECRET,
            "APP_MODE" => "debug",
            "APP_HOST" => "127.0.0.1",
            _ => return None,
        };
        Some(value.to_string())
    })
    .unwrap_or_else(|e| panic!("fuzz configuration: {e}"));
    Verifier::new(&config)
});
