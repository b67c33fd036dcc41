//! The `POST /publish` body: JSON request, then the plan (targets and the one envelope).
//!
//! Properties: no panic; a plan names 1 to 1000 distinct, safe users or a broadcast; its envelope
//! is a JSON object that the delivery path reads back as the same event (type, id, data), never
//! sanitised; a durable envelope, stamped with the id the gateway gives it, carries that id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sse_gateway::ids::is_safe_id;
use sse_gateway::fuzzing::{Target, parse_publish};
use sse_gateway::history::{Epoch, EventId, stamp};
use sse_gateway::sse::{PayloadKind, parse_payload};

fuzz_target!(|data: &[u8]| {
    let Ok(plan) = parse_publish(data) else {
        return;
    };
    let request: Value = serde_json::from_slice(data).expect("a planned body is JSON");
    assert!(!plan.targets.is_empty() && plan.targets.len() <= 1000);
    let mut users = std::collections::HashSet::new();
    for t in &plan.targets {
        match t {
            Target::User(u) => {
                assert!(is_safe_id(u), "{u:?}");
                assert!(users.insert(u.clone()), "{u:?} twice");
            }
            Target::Broadcast => assert_eq!(plan.targets.len(), 1),
        }
    }
    let envelope: Value = serde_json::from_slice(&plan.envelope).expect("the envelope is JSON");
    assert!(envelope.is_object());

    let parsed = parse_payload(&plan.envelope);
    assert_eq!(parsed.kind, PayloadKind::Envelope);
    assert!(
        !parsed.sanitised,
        "a planned type or id never needs cleaning"
    );
    let text = |k: &str| {
        request
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    assert_eq!(parsed.event.event.as_deref(), text("type"));
    assert_eq!(parsed.event.id.as_deref(), text("id"));
    let sent = request.get("data").cloned().unwrap_or(Value::Null);
    assert_eq!(parsed.event.data, sent.to_string());
    assert_eq!(
        parsed.event.retry,
        request.get("retry").and_then(Value::as_u64)
    );

    if plan.durable {
        let id = EventId {
            ms: 1_700_000_000_000,
            seq: 7,
            epoch: Epoch::from_micros(12345),
        };
        let stamped = stamp(&plan.envelope, id).expect("an object envelope takes an id");
        let again = parse_payload(&stamped);
        assert_eq!(again.event.id, Some(id.to_string()));
        assert_eq!(again.event.data, parsed.event.data);
    }
});
