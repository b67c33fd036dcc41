//! The publish envelope parser and the SSE encoder: `parse_payload` then `Event::encode`.
//!
//! Property: the encoded bytes, read by a WHATWG event stream parser (between the stream's
//! `retry:` hint and a ping), give exactly the input's event: its data (line breaks as LF), its
//! type and its id, and nothing else: no CR, LF or NUL in a payload can end the event early, add
//! a field or forge another event. The first input byte picks what is fuzzed: published payload
//! bytes (even), or an event built from arbitrary strings, cleaned as the gateway cleans them (odd).
#![no_main]

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sse_gateway::sse::{Event, MAX_FIELD_LEN, PING, PayloadKind, clean_field, parse_payload};
use sse_gateway_fuzz::{Dispatched, interpret};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let parsed = parse_payload(rest);
        let e = &parsed.event;
        match parsed.kind {
            PayloadKind::Raw => {
                assert_eq!(e.data, String::from_utf8_lossy(rest));
                assert_eq!((&e.id, &e.event, e.retry), (&None, &None, None));
            }
            PayloadKind::Envelope => {
                let v: Value = serde_json::from_slice(rest).expect("an envelope is JSON");
                let sent = v.get("data").cloned().unwrap_or(Value::Null);
                assert_eq!(e.data, sent.to_string());
            }
            // Not delivered at all: JSON nested deeper than any publish path accepts.
            PayloadKind::TooDeep => {
                assert!(serde_json::from_slice::<Value>(rest).is_err());
                return;
            }
        }
        for field in [&e.id, &e.event].into_iter().flatten() {
            assert!(!field.is_empty() && field.len() <= MAX_FIELD_LEN);
            assert!(!field.chars().any(char::is_control), "{field:?}");
        }
        check(e);
    } else {
        let mut u = Unstructured::new(rest);
        let Ok((id, event, data, retry)) =
            <(Option<String>, Option<String>, String, Option<u64>)>::arbitrary(&mut u)
        else {
            return;
        };
        let clean = |v: Option<String>| v.map(|v| clean_field(&v).0).filter(|v| !v.is_empty());
        check(&Event {
            id: clean(id),
            event: clean(event),
            data,
            retry,
        });
    }
});

fn check(e: &Event) {
    let wire = e.encode();
    let mut stream = b"retry: 3000\n\n".to_vec();
    stream.extend_from_slice(&wire);
    stream.extend_from_slice(&PING);
    let seen = interpret(&stream);
    let id = e.id.clone().unwrap_or_default();
    let expected = Dispatched {
        event_type: e.event.clone().unwrap_or_else(|| "message".into()),
        data: e.data.replace("\r\n", "\n").replace('\r', "\n"),
        last_event_id: id.clone(),
    };
    let ping = Dispatched {
        event_type: "ping".into(),
        data: "null".into(),
        last_event_id: id.clone(),
    };
    assert_eq!(seen.events, [expected, ping], "wire: {wire:?}");
    assert_eq!(seen.reconnection_time, Some(e.retry.unwrap_or(3000)));
    assert_eq!(seen.last_event_id, id);
}
