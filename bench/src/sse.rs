//! Server-Sent Events parsing (WHATWG HTML §9.2.6), incremental, and the whole-stream parser that
//! chains it behind the HTTP head and body framing of [`crate::http`].
//!
//! Events are handed to a [`Sink`] as borrowed slices. Complete lines are parsed straight out of
//! the caller's read buffer; only a line cut by a read boundary is copied, so an idle connection's
//! parser holds empty buffers.

use crate::http::{BodyDecoder, BodyState, Head, HeadReader, HttpError};

/// Longest SSE line accepted; a longer one is a protocol error (bounds memory per connection).
pub const MAX_LINE: usize = 1 << 20;

/// One dispatched event. `event_type` is `message` when the stream named none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub event_type: &'a [u8],
    pub data: &'a [u8],
    /// The stream's last event ID at dispatch time (it persists across events, as in browsers).
    pub id: &'a [u8],
}

/// Receives what the stream carries.
pub trait Sink {
    /// The response head arrived. Returning `false` stops parsing (e.g. a non-200 status).
    fn head(&mut self, head: &Head) -> bool;
    /// The first byte of the body arrived (called once, before any event from it).
    fn body_started(&mut self);
    fn event(&mut self, event: &Event<'_>);
    fn comment(&mut self, text: &[u8]);
    /// A `retry:` field with a valid value.
    fn retry(&mut self, _ms: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    LineTooLong,
}

/// The SSE line and field parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// A line cut by a read boundary.
    partial: Vec<u8>,
    /// The previous input ended with '\r': a '\n' starting the next input belongs to that line end.
    after_cr: bool,
    /// Bytes of the stream seen so far reached past a possible leading BOM.
    started: bool,
    event_type: Vec<u8>,
    data: Vec<u8>,
    /// Whether any `data` field was seen for the pending event (the data buffer is non-empty).
    has_data: bool,
    last_id: Vec<u8>,
}

impl SseParser {
    pub fn feed(&mut self, mut input: &[u8], sink: &mut impl Sink) -> Result<(), SseError> {
        if self.after_cr {
            self.after_cr = false;
            if input.first() == Some(&b'\n') {
                input = &input[1..];
            }
        }
        while !input.is_empty() {
            let Some(pos) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.partial.len() + input.len() > MAX_LINE {
                    return Err(SseError::LineTooLong);
                }
                self.partial.extend_from_slice(input);
                return Ok(());
            };
            let (line, rest) = input.split_at(pos);
            let is_cr = rest[0] == b'\r';
            input = &rest[1..];
            if is_cr {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.partial.is_empty() {
                self.line(line, sink);
            } else {
                if self.partial.len() + line.len() > MAX_LINE {
                    return Err(SseError::LineTooLong);
                }
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined, sink);
                // Keep a modest buffer for the next cut line; drop a big one.
                joined.clear();
                if joined.capacity() <= 1024 {
                    self.partial = joined;
                }
            }
        }
        Ok(())
    }

    fn line(&mut self, mut line: &[u8], sink: &mut impl Sink) {
        if !self.started {
            self.started = true;
            if let Some(rest) = line.strip_prefix(b"\xEF\xBB\xBF") {
                line = rest;
            }
        }
        if line.is_empty() {
            self.dispatch(sink);
            return;
        }
        if line[0] == b':' {
            sink.comment(&line[1..]);
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                self.event_type.clear();
                self.event_type.extend_from_slice(value);
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            // An id with NUL is ignored (WHATWG), the previous one stays.
            b"id" if !value.contains(&0) => {
                self.last_id.clear();
                self.last_id.extend_from_slice(value);
            }
            b"retry" => {
                if !value.is_empty()
                    && value.iter().all(u8::is_ascii_digit)
                    && let Some(ms) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
                {
                    sink.retry(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, sink: &mut impl Sink) {
        if self.has_data {
            let event_type: &[u8] = if self.event_type.is_empty() {
                b"message"
            } else {
                &self.event_type
            };
            sink.event(&Event {
                event_type,
                data: &self.data,
                id: &self.last_id,
            });
        }
        self.has_data = false;
        self.data.clear();
        self.event_type.clear();
    }
}

/// Why a stream could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    Http(HttpError),
    Sse(SseError),
}

impl StreamError {
    pub fn reason(self) -> &'static str {
        match self {
            StreamError::Http(e) => e.reason(),
            StreamError::Sse(SseError::LineTooLong) => "sse_line_too_long",
        }
    }
}

/// What the stream parser reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for more bytes.
    More,
    /// The sink refused the head (e.g. not 200); stop reading.
    Refused,
    /// The body ended (its framing said so).
    Ended,
}

enum Phase {
    Head(HeadReader),
    Body { decoder: BodyDecoder, started: bool },
    Finished,
}

/// Parses a whole HTTP/1.1 SSE response: head, body framing, events.
pub struct StreamParser {
    phase: Phase,
    sse: SseParser,
}

impl Default for StreamParser {
    fn default() -> Self {
        StreamParser {
            phase: Phase::Head(HeadReader::default()),
            sse: SseParser::default(),
        }
    }
}

impl StreamParser {
    pub fn feed(
        &mut self,
        mut input: &[u8],
        sink: &mut impl Sink,
    ) -> Result<Progress, StreamError> {
        if let Phase::Head(reader) = &mut self.phase {
            let Some((head, used)) = reader.feed(input).map_err(StreamError::Http)? else {
                return Ok(Progress::More);
            };
            if !sink.head(&head) {
                self.phase = Phase::Finished;
                return Ok(Progress::Refused);
            }
            self.phase = Phase::Body {
                decoder: BodyDecoder::new(&head.framing),
                started: false,
            };
            input = &input[used..];
        }
        let Phase::Body { decoder, started } = &mut self.phase else {
            return Ok(Progress::Ended);
        };
        let sse = &mut self.sse;
        let mut sse_result = Ok(());
        let state = decoder
            .feed(input, &mut |bytes| {
                if sse_result.is_err() {
                    return;
                }
                if !*started {
                    *started = true;
                    sink.body_started();
                }
                sse_result = sse.feed(bytes, sink);
            })
            .map_err(StreamError::Http)?;
        sse_result.map_err(StreamError::Sse)?;
        if state == BodyState::Done {
            self.phase = Phase::Finished;
            return Ok(Progress::Ended);
        }
        Ok(Progress::More)
    }

    /// Whether the connection closing now ends the body normally (read-until-close framing).
    pub fn eof_is_clean(&self) -> bool {
        match &self.phase {
            Phase::Body { decoder, .. } => decoder.eof_is_clean(),
            Phase::Finished => true,
            Phase::Head(_) => false,
        }
    }

    pub fn body_started(&self) -> bool {
        matches!(
            self.phase,
            Phase::Body { started: true, .. } | Phase::Finished
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq, Eq)]
    struct Collect {
        status: Option<u16>,
        body_started: usize,
        events: Vec<(String, String, String)>,
        comments: Vec<String>,
        retries: Vec<u64>,
    }

    impl Sink for Collect {
        fn head(&mut self, head: &Head) -> bool {
            self.status = Some(head.status);
            head.status == 200
        }
        fn body_started(&mut self) {
            self.body_started += 1;
        }
        fn event(&mut self, e: &Event<'_>) {
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            self.events.push((s(e.event_type), s(e.data), s(e.id)));
        }
        fn comment(&mut self, text: &[u8]) {
            self.comments
                .push(String::from_utf8_lossy(text).into_owned());
        }
        fn retry(&mut self, ms: u64) {
            self.retries.push(ms);
        }
    }

    fn ev(t: &str, d: &str, id: &str) -> (String, String, String) {
        (t.into(), d.into(), id.into())
    }

    /// An SSE body exercising every line ending, BOM, comments, multi-line data, ids and retry.
    const SSE_BODY: &[u8] = b"\xEF\xBB\xBFretry: 3000\n\n: hello\r\nid: 7\r\nevent: bench\r\ndata: {\"seq\":1,\"ts_ns\":5}\r\n\r\ndata:a\rdata: b\r\rdata\n\nevent: ping\ndata: null\n\nid\nretry: x\nignored: 1\ndata: tail\n\nevent: no-data\n\n";

    fn expected_events() -> Vec<(String, String, String)> {
        vec![
            ev("bench", "{\"seq\":1,\"ts_ns\":5}", "7"),
            ev("message", "a\nb", "7"),
            ev("message", "", "7"),
            ev("ping", "null", "7"),
            ev("message", "tail", ""),
        ]
    }

    fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(piece) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    fn run(pieces: &[&[u8]]) -> (Collect, Progress) {
        let mut p = StreamParser::default();
        let mut c = Collect::default();
        let mut last = Progress::More;
        for piece in pieces {
            last = p.feed(piece, &mut c).unwrap();
        }
        (c, last)
    }

    #[test]
    fn sse_fields_and_line_endings() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        p.feed(SSE_BODY, &mut c).unwrap();
        assert_eq!(c.events, expected_events());
        assert_eq!(c.comments, vec![" hello".to_string()]);
        assert_eq!(c.retries, vec![3000]);
    }

    #[test]
    fn sse_split_at_every_byte_boundary() {
        for split in 0..=SSE_BODY.len() {
            let (a, b) = SSE_BODY.split_at(split);
            let mut p = SseParser::default();
            let mut c = Collect::default();
            p.feed(a, &mut c).unwrap();
            p.feed(b, &mut c).unwrap();
            assert_eq!(c.events, expected_events(), "split at {split}");
            assert_eq!(c.comments.len(), 1, "split at {split}");
        }
        let mut p = SseParser::default();
        let mut c = Collect::default();
        for byte in SSE_BODY.chunks(1) {
            p.feed(byte, &mut c).unwrap();
        }
        assert_eq!(c.events, expected_events());
    }

    #[test]
    fn whole_stream_chunked_split_everywhere() {
        for piece in [1, 3, 7, 64, SSE_BODY.len()] {
            let wire = chunked(SSE_BODY, piece);
            for split in 0..=wire.len() {
                let (a, b) = wire.split_at(split);
                let (c, last) = run(&[a, b]);
                assert_eq!(c.status, Some(200));
                assert_eq!(c.body_started, 1);
                assert_eq!(c.events, expected_events(), "piece {piece} split {split}");
                assert_eq!(last, Progress::Ended);
            }
            let bytes: Vec<&[u8]> = wire.chunks(1).collect();
            assert_eq!(run(&bytes).0.events, expected_events());
        }
    }

    #[test]
    fn whole_stream_close_delimited_and_length() {
        let mut wire = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
        wire.extend_from_slice(SSE_BODY);
        for split in 0..=wire.len() {
            let (a, b) = wire.split_at(split);
            let mut p = StreamParser::default();
            let mut c = Collect::default();
            p.feed(a, &mut c).unwrap();
            assert_eq!(p.feed(b, &mut c).unwrap(), Progress::More);
            assert!(p.eof_is_clean());
            assert_eq!(c.events, expected_events());
        }
        let body = b"retry: 3000\n: busy\n\n";
        let mut wire =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        wire.extend_from_slice(body);
        let (c, last) = run(&[&wire]);
        assert_eq!(last, Progress::Ended);
        assert_eq!(c.comments, vec![" busy".to_string()]);
    }

    #[test]
    fn refused_status_and_no_body_start() {
        let (c, last) = run(&[b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}"]);
        assert_eq!(c.status, Some(401));
        assert_eq!(c.body_started, 0);
        assert_eq!(last, Progress::Refused);
    }

    #[test]
    fn head_then_body_in_separate_reads_marks_start_once() {
        let mut p = StreamParser::default();
        let mut c = Collect::default();
        p.feed(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            &mut c,
        )
        .unwrap();
        assert!(!p.body_started());
        assert_eq!(c.body_started, 0);
        p.feed(b"d\r\nretry: 3000\n\n\r\n", &mut c).unwrap();
        assert!(p.body_started());
        p.feed(b"9\r\ndata: x\n\n\r\n", &mut c).unwrap();
        assert_eq!(c.body_started, 1);
        assert_eq!(c.events, vec![ev("message", "x", "")]);
    }

    #[test]
    fn overlong_line_is_an_error() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        let big = vec![b'a'; MAX_LINE];
        p.feed(&big, &mut c).unwrap();
        assert_eq!(p.feed(b"a", &mut c), Err(SseError::LineTooLong));
    }
}
