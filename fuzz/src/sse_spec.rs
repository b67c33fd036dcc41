//! An event stream parser written from the WHATWG specification (HTML section 9.2.6, "Interpreting
//! an event stream"): the oracle the gateway's SSE encoder is checked against. No dependencies, so
//! that its own tests run with plain `rustc --test` (docs/fuzzing.md).

/// One event as an `EventSource` dispatches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// The event's type (`message` when the stream named none).
    pub event_type: String,
    pub data: String,
    /// The `lastEventId` the event carries.
    pub last_event_id: String,
}

/// What an `EventSource` made of a whole stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Interpreted {
    pub events: Vec<Dispatched>,
    /// The reconnection time the stream set last (`retry:`), if any.
    pub reconnection_time: Option<u64>,
    /// The event source's last event ID string at the end of the stream.
    pub last_event_id: String,
}

/// Interprets `bytes` as a complete `text/event-stream` body, as HTML section 9.2.6 ("Interpreting
/// an event stream") says: UTF-8 decoded with replacement and one leading BOM dropped; lines end
/// at CRLF, LF or CR; an empty line dispatches; an event cut off by the end of the stream is
/// discarded.
pub fn interpret(bytes: &[u8]) -> Interpreted {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Interpreted::default();
    let mut state = Buffers::default();
    let mut rest = text;
    // Only complete lines count: what follows the last line break is an unfinished line.
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        state.line(line, &mut out);
    }
    out
}

/// The parser's buffers (data, event type, last event ID).
#[derive(Default)]
struct Buffers {
    data: String,
    event_type: String,
    last_event_id: String,
}

impl Buffers {
    fn line(&mut self, line: &str, out: &mut Interpreted) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return; // a comment
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event_type = value.to_string(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_event_id = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Beyond u64 a browser's integer would saturate or fail: count it as ignored.
                if let Ok(ms) = value.parse() {
                    out.reconnection_time = Some(ms);
                }
            }
            _ => {} // unknown fields, and ignored values, are ignored
        }
    }

    fn dispatch(&mut self, out: &mut Interpreted) {
        out.last_event_id.clone_from(&self.last_event_id);
        if self.data.is_empty() {
            self.event_type.clear();
            return;
        }
        if self.data.ends_with('\n') {
            self.data.pop();
        }
        let event_type = if self.event_type.is_empty() {
            "message".to_string()
        } else {
            std::mem::take(&mut self.event_type)
        };
        out.events.push(Dispatched {
            event_type,
            data: std::mem::take(&mut self.data),
            last_event_id: self.last_event_id.clone(),
        });
        self.event_type.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, data: &str, id: &str) -> Dispatched {
        Dispatched {
            event_type: t.into(),
            data: data.into(),
            last_event_id: id.into(),
        }
    }

    /// The examples of the specification's section 9.2.6, and the corner cases it spells out.
    #[test]
    fn follows_the_specification() {
        let s = interpret(b"data: YHOO\ndata: +2\ndata: 10\n\n");
        assert_eq!(s.events, [ev("message", "YHOO\n+2\n10", "")]);
        let s = interpret(b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n");
        assert_eq!(
            s.events,
            [
                ev("message", "first event", "1"),
                ev("message", "second event", "")
            ]
        );
        let s = interpret(b"data\n\ndata\ndata\n\ndata:");
        assert_eq!(s.events, [ev("message", "", ""), ev("message", "\n", "")]);
        let s = interpret(b"data:test\n\ndata: test\n\n");
        assert_eq!(
            s.events,
            [ev("message", "test", ""), ev("message", "test", "")]
        );
        // CR and CRLF end lines too; a BOM is dropped once; NUL keeps an id out.
        let s = interpret("\u{feff}event: a\rdata: x\r\n\r\nid: 1\0\ndata: y\n\n".as_bytes());
        assert_eq!(s.events, [ev("a", "x", ""), ev("message", "y", "")]);
        let s = interpret(b"retry: 100\n\nretry: 1x\n\nid: 7\n\n");
        assert_eq!(
            (s.reconnection_time, s.last_event_id.as_str()),
            (Some(100), "7")
        );
        assert!(s.events.is_empty());
    }
}
