//! SSE wire encoding: turns a published payload into the bytes of one `text/event-stream` event.
//!
//! A payload is parsed and encoded once, and the resulting [`Bytes`] are shared by every stream that
//! receives it. Nothing a publisher sends can add an SSE line: `id` and `event` lose their control
//! characters, and data is split into one `data:` line per input line.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

/// Longest `id` or `event` value kept; longer values are cut (and counted as sanitised).
pub const MAX_FIELD_LEN: usize = 256;

/// The keep-alive event. It carries no `id:` so it never disturbs the browser's `lastEventId`
/// (the original sent `id: 1`, which did).
pub static PING: Bytes = Bytes::from_static(b"event: ping\ndata: null\n\n");

/// One event as it will be written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The text of the data field; it may contain line breaks, which become several `data:` lines.
    pub data: String,
    pub retry: Option<u64>,
}

/// What parsing a broker payload found, for counting and logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// The original's `{"id","type","data"}` envelope.
    Envelope,
    /// Anything else, delivered as a `message` event with the payload as its data.
    Raw,
    /// JSON nested deeper than [`MAX_DEPTH`]: not delivered (no publish path accepts it).
    TooDeep,
}

/// Deepest nesting of a published payload: the JSON parser's own limit, which the Redis library
/// (`sse_gateway.lua`) checks too, so that every publish path accepts the same envelopes.
pub const MAX_DEPTH: usize = 127;
/// Bytes a durable publish adds to an envelope (its id and the durable mark), kept free under
/// `MAX_MESSAGE_BYTES` by every publish path.
pub const STAMP_ROOM: usize = 64;

/// Why an envelope is refused by a publish path that keeps history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("payload must be a JSON object")]
    NotAnObject,
    #[error("payload nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("\"type\" must be a string")]
    BadType,
    #[error("\"retry\" must be a whole number of milliseconds")]
    BadRetry,
}

/// The checks every publish path shares (`POST /publish`, `FCALL sse_publish`, and the embedded
/// broker; the Redis library mirrors them): a JSON object that fits `max_bytes` once stamped with
/// an id, nested at most [`MAX_DEPTH`] deep, with a string `type` and a whole `retry` if any.
pub fn check_envelope(payload: &[u8], max_bytes: usize) -> Result<(), EnvelopeError> {
    if payload.len() + STAMP_ROOM > max_bytes {
        return Err(EnvelopeError::TooLarge(max_bytes));
    }
    let map = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(EnvelopeError::NotAnObject),
        Err(e) if too_deep(&e) => return Err(EnvelopeError::TooDeep),
        Err(_) => return Err(EnvelopeError::NotAnObject),
    };
    if !matches!(map.get("type"), None | Some(Value::Null | Value::String(_))) {
        return Err(EnvelopeError::BadType);
    }
    if !matches!(map.get("retry"), None | Some(Value::Null))
        && map.get("retry").and_then(Value::as_u64).is_none()
    {
        return Err(EnvelopeError::BadRetry);
    }
    Ok(())
}

fn too_deep(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("recursion limit exceeded")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub event: Event,
    pub kind: PayloadKind,
    /// True when `id` or `type` held characters that could have injected SSE lines, or were too long.
    pub sanitised: bool,
    /// The envelope carries `"durable": true`: its id is one of history (only the durable publish
    /// paths write the mark), not a publisher's own.
    pub durable: bool,
}

impl Event {
    /// A named event whose data is `data` as compact JSON.
    pub fn json(event: &str, data: &Value) -> Event {
        Event {
            event: Some(event.to_string()),
            data: data.to_string(),
            ..Event::default()
        }
    }

    /// Encodes the event; fields are assumed sanitised (see [`parse_payload`] and [`clean_field`]).
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.data.len() + 48);
        if let Some(id) = &self.id {
            put_field(&mut buf, "id", id);
        }
        if let Some(event) = &self.event {
            put_field(&mut buf, "event", event);
        }
        if let Some(retry) = self.retry {
            put_field(&mut buf, "retry", &retry.to_string());
        }
        for line in split_lines(&self.data) {
            put_field(&mut buf, "data", line);
        }
        buf.put_u8(b'\n');
        buf.freeze()
    }
}

fn put_field(buf: &mut BytesMut, name: &str, value: &str) {
    buf.put_slice(name.as_bytes());
    if value.is_empty() {
        buf.put_slice(b":\n");
    } else {
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_u8(b'\n');
    }
}

/// Splits on CRLF, lone CR and lone LF, as an SSE parser does.
fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

/// Removes control characters (CR, LF, NUL, ...) and cuts to [`MAX_FIELD_LEN`] bytes.
/// Returns the clean value and whether anything was changed.
pub fn clean_field(value: &str) -> (String, bool) {
    let mut out: String = value.chars().filter(|c| !c.is_control()).collect();
    let mut changed = out.len() != value.len();
    if out.len() > MAX_FIELD_LEN {
        let mut cut = MAX_FIELD_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        changed = true;
    }
    (out, changed)
}

/// Parses what a publisher sent. An envelope is a JSON object with at least one of `id`, `type`,
/// `data`, where `id` is a string or number, `type` a string and `retry` a non-negative integer
/// (each may be absent or null). Other keys are ignored, as the original did. `data` is written as
/// compact JSON (`null` when absent). Anything else is delivered whole as a `message` event.
pub fn parse_payload(payload: &[u8]) -> Parsed {
    let kind = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => match parse_envelope(map) {
            Some(parsed) => return parsed,
            None => PayloadKind::Raw,
        },
        Err(e) if too_deep(&e) => PayloadKind::TooDeep,
        _ => PayloadKind::Raw,
    };
    Parsed {
        event: Event {
            data: String::from_utf8_lossy(payload).into_owned(),
            ..Event::default()
        },
        kind,
        sanitised: false,
        durable: false,
    }
}

fn parse_envelope(mut map: serde_json::Map<String, Value>) -> Option<Parsed> {
    if !["id", "type", "data"].iter().any(|k| map.contains_key(*k)) {
        return None;
    }
    let id = match map.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return None,
    };
    let event = match map.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return None,
    };
    let retry = match map.get("retry") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64()?),
    };
    let durable = map.get("durable") == Some(&Value::Bool(true));
    let data = map.remove("data").unwrap_or(Value::Null).to_string();

    let mut sanitised = false;
    let mut clean = |v: Option<String>| {
        v.map(|v| {
            let (c, changed) = clean_field(&v);
            sanitised |= changed;
            c
        })
        .filter(|c| !c.is_empty())
    };
    let id = clean(id);
    let event = clean(event);
    Some(Parsed {
        event: Event {
            id,
            event,
            data,
            retry,
        },
        kind: PayloadKind::Envelope,
        sanitised,
        durable,
    })
}

/// The last event of every stream: a `shutdown` event with a `retry:` hint spread between one and
/// two `retry_ms`, so that a large instance's clients do not all reconnect in the same instant.
pub fn farewell(retry_ms: u64, conn_key: u128) -> Bytes {
    let jitter = (conn_key % 1000) as u64 * retry_ms / 1000;
    Event {
        event: Some("shutdown".into()),
        data: r#"{"reconnect":true}"#.into(),
        retry: Some(retry_ms + jitter),
        ..Event::default()
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_numbers_are_read_exactly() {
        // Shortest spellings of doubles that a best-effort float parser reads one unit off.
        let p = parse_payload(br#"{"id":117.63331139400017,"data":0.09144338512092887}"#);
        assert_eq!(p.kind, PayloadKind::Envelope);
        assert_eq!(p.event.id.as_deref(), Some("117.63331139400017"));
        assert_eq!(p.event.data, "0.09144338512092887");
    }

    #[test]
    fn envelopes_are_checked_as_the_redis_library_checks_them() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let ok = |p: &str| check_envelope(p.as_bytes(), 4096);
        assert_eq!(ok(r#"{"type":"t","data":1,"retry":5}"#), Ok(()));
        assert_eq!(
            ok(&format!(r#"{{"data":{}}}"#, nested(MAX_DEPTH - 1))),
            Ok(())
        );
        assert_eq!(
            ok(&format!(r#"{{"data":{}}}"#, nested(MAX_DEPTH))),
            Err(EnvelopeError::TooDeep)
        );
        assert_eq!(ok("[1]"), Err(EnvelopeError::NotAnObject));
        assert_eq!(ok("nope"), Err(EnvelopeError::NotAnObject));
        assert_eq!(ok(r#"{"type":1}"#), Err(EnvelopeError::BadType));
        assert_eq!(ok(r#"{"retry":-1}"#), Err(EnvelopeError::BadRetry));
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(4096 - STAMP_ROOM));
        assert_eq!(ok(&big), Err(EnvelopeError::TooLarge(4096)));
        // Live delivery drops what is too deep for any publish path, and marks durable events.
        let deep = format!(r#"{{"data":{}}}"#, nested(MAX_DEPTH));
        assert_eq!(parse_payload(deep.as_bytes()).kind, PayloadKind::TooDeep);
        assert!(parse_payload(br#"{"id":"1-0-a","durable":true}"#).durable);
        assert!(!parse_payload(br#"{"id":"1-0-a"}"#).durable);
    }

    fn wire(payload: &str) -> String {
        String::from_utf8(parse_payload(payload.as_bytes()).event.encode().to_vec()).unwrap()
    }

    #[test]
    fn original_envelope_keeps_its_wire_format() {
        assert_eq!(
            wire(r#"{"id":"100", "type":"event", "data":{"hello":"world"}}"#),
            "id: 100\nevent: event\ndata: {\"hello\":\"world\"}\n\n"
        );
        assert_eq!(wire(r#"{"type":"t"}"#), "event: t\ndata: null\n\n");
    }

    #[test]
    fn any_json_data_is_compact() {
        assert_eq!(
            wire(r#"{"type":"t","data":{"n": 1, "nested": {"a": [1, 2]}, "s": "l1\nl2"}}"#),
            "event: t\ndata: {\"n\":1,\"nested\":{\"a\":[1,2]},\"s\":\"l1\\nl2\"}\n\n"
        );
        assert_eq!(wire(r#"{"id":7,"data":"x"}"#), "id: 7\ndata: \"x\"\n\n");
        assert_eq!(
            wire(r#"{"type":"t","data":1,"retry":5000}"#),
            "event: t\nretry: 5000\ndata: 1\n\n"
        );
    }

    #[test]
    fn non_envelopes_are_delivered_raw() {
        assert_eq!(wire("hello"), "data: hello\n\n");
        assert_eq!(
            wire("a\nb\r\nc\rd"),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(wire("[1,2]"), "data: [1,2]\n\n");
        assert_eq!(
            wire(r#"{"hello":"world"}"#),
            "data: {\"hello\":\"world\"}\n\n"
        );
        assert_eq!(
            wire(r#"{"type":{"x":1}}"#),
            "data: {\"type\":{\"x\":1}}\n\n"
        );
        assert_eq!(wire(""), "data:\n\n");
        let p = parse_payload(b"\xff\xfe ok");
        assert_eq!(p.event.data, "\u{fffd}\u{fffd} ok");
        assert_eq!(p.kind, PayloadKind::Raw);
    }

    #[test]
    fn control_characters_cannot_inject_lines() {
        let p = parse_payload(br#"{"id":"1\n\ndata: evil","type":"x\r\nevent: y\u0000","data":1}"#);
        assert!(p.sanitised);
        let text = String::from_utf8(p.event.encode().to_vec()).unwrap();
        assert_eq!(text, "id: 1data: evil\nevent: xevent: y\ndata: 1\n\n");
        assert_eq!(text.matches('\n').count(), 4);
        let p = parse_payload(format!(r#"{{"type":"{}"}}"#, "é".repeat(200)).as_bytes());
        assert!(p.sanitised);
        assert!(p.event.event.unwrap().len() <= MAX_FIELD_LEN);
    }

    #[test]
    fn empty_fields_are_omitted() {
        assert_eq!(wire(r#"{"id":"","type":"","data":{}}"#), "data: {}\n\n");
        assert_eq!(wire(r#"{"id":"\n","data":{}}"#), "data: {}\n\n");
    }

    #[test]
    fn farewell_spreads_retry_hints() {
        let a = farewell(1000, 7);
        let text = std::str::from_utf8(&a).unwrap();
        assert!(text.starts_with("event: shutdown\nretry: 1007\n"), "{text}");
        assert!(text.ends_with("\n\n"));
        let b = farewell(1000, 999_999);
        assert!(std::str::from_utf8(&b).unwrap().contains("retry: 1999\n"));
    }
}
