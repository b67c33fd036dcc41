//! Event ids and epochs (`Last-Event-ID`, `?last_event_id=`): `EventId::from_str`.
//!
//! Properties: no panic; whatever parses is written back unchanged (one spelling per id); every id
//! the gateway can write parses back to itself; positions compare within one history only.
#![no_main]

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sse_gateway::history::{Epoch, EventId};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<EventId>() {
            assert_eq!(id.to_string(), text);
        }
        if let Ok(epoch) = text.parse::<Epoch>() {
            assert_eq!(epoch.to_string(), text);
        }
    }
    let mut u = Unstructured::new(data);
    let Ok((ms, seq, micros, other)) = <(u64, u32, u64, (u64, u32, u64))>::arbitrary(&mut u) else {
        return;
    };
    let id = |ms: u64, seq, micros| EventId {
        ms: ms % 1_000_000_000_000_000, // ids have at most 15 digits of milliseconds
        seq,
        epoch: Epoch::from_micros(micros),
    };
    let (a, b) = (id(ms, seq, micros), id(other.0, other.1, other.2));
    assert_eq!(a.to_string().parse::<EventId>(), Ok(a));
    assert!(a.covers(&a));
    assert_eq!(a.covers(&b), a.epoch == b.epoch && b <= a);
    assert!(EventId::advance(Some(a), b).covers(&b));
});
