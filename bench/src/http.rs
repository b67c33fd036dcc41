//! HTTP/1.1 response reading, incrementally: the response head and the body framing
//! (`Transfer-Encoding: chunked`, `Content-Length`, or read-until-close).
//!
//! Every function takes whatever bytes the socket gave and keeps only the state it needs between
//! calls, so one connection costs a few bytes here while it is idle. Nothing allocates per body byte.

/// Longest response head accepted; the head is buffered until its blank line.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a response could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    HeadTooLarge,
    BadHead,
    BadChunk,
    /// A `Content-Length` or chunk size that does not fit in 64 bits.
    BadLength,
}

impl HttpError {
    /// Stable reason string for reports.
    pub fn reason(self) -> &'static str {
        match self {
            HttpError::HeadTooLarge => "head_too_large",
            HttpError::BadHead => "bad_response_head",
            HttpError::BadChunk => "bad_chunk_framing",
            HttpError::BadLength => "bad_length",
        }
    }
}

/// The parts of a response head that the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// Whether the connection may carry another request (no `Connection: close`; HTTP/1.1, or
    /// HTTP/1.0 with `Connection: keep-alive`).
    pub keep_alive: bool,
}

/// How the body's end is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// No length: the body ends when the server closes the connection.
    Close,
}

/// Accumulates the response head until its terminating blank line.
#[derive(Debug, Default)]
pub struct HeadReader {
    buf: Vec<u8>,
}

impl HeadReader {
    /// Feeds bytes; returns the parsed head and how many of `input`'s bytes it used, or `None`
    /// when more bytes are needed (they have all been buffered).
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
        // Search from a little before the old end: the "\r\n\r\n" may straddle two reads.
        let search_from = self.buf.len().saturating_sub(3);
        let old_len = self.buf.len();
        let room = MAX_HEAD.saturating_sub(old_len);
        let take = input.len().min(room);
        self.buf.extend_from_slice(&input[..take]);
        let Some(end) = find_head_end(&self.buf[search_from..]).map(|e| e + search_from) else {
            if take < input.len() || self.buf.len() >= MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        };
        let head = parse_head(&self.buf[..end])?;
        let used = end - old_len;
        // The head buffer is never needed again: give its memory back.
        self.buf = Vec::new();
        Ok(Some((head, used)))
    }
}

/// Index just past the first blank line ("\r\n\r\n", or a bare "\n\n" from lenient servers).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

fn parse_head(bytes: &[u8]) -> Result<Head, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HttpError::BadHead),
    }
    let status = resp.code.ok_or(HttpError::BadHead)?;
    let mut framing = Framing::Close;
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                keep_alive = true;
            }
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // "chunked" must be the last coding; anything else we cannot decode.
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::BadHead)?;
            if v.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            {
                framing = Framing::Chunked;
            } else {
                return Err(HttpError::BadHead);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::BadLength)?;
            framing = Framing::Length(v.trim().parse().map_err(|_| HttpError::BadLength)?);
        }
    }
    // Responses that never have a body (RFC 9112 §6.3).
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok(Head {
        status,
        framing,
        keep_alive,
    })
}

/// Whether the body has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    More,
    Done,
}

/// Strips the body framing; hands the payload bytes to a callback, without copying them.
#[derive(Debug)]
pub enum BodyDecoder {
    Chunked(ChunkDecoder),
    Length(u64),
    Close,
}

impl BodyDecoder {
    pub fn new(framing: &Framing) -> BodyDecoder {
        match framing {
            Framing::Chunked => BodyDecoder::Chunked(ChunkDecoder::default()),
            Framing::Length(n) => BodyDecoder::Length(*n),
            Framing::Close => BodyDecoder::Close,
        }
    }

    /// Decodes `input`; returns `Done` once the body's end has been seen (bytes after it are ignored).
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut impl FnMut(&[u8]),
    ) -> Result<BodyState, HttpError> {
        match self {
            BodyDecoder::Chunked(c) => c.feed(input, out),
            BodyDecoder::Length(rem) => {
                let n = (*rem).min(input.len() as u64) as usize;
                if n > 0 {
                    out(&input[..n]);
                }
                *rem -= n as u64;
                Ok(if *rem == 0 {
                    BodyState::Done
                } else {
                    BodyState::More
                })
            }
            BodyDecoder::Close => {
                if !input.is_empty() {
                    out(input);
                }
                Ok(BodyState::More)
            }
        }
    }

    /// Whether the connection closing now is a normal end of the body.
    pub fn eof_is_clean(&self) -> bool {
        matches!(self, BodyDecoder::Close)
            || matches!(self, BodyDecoder::Length(0))
            || matches!(self, BodyDecoder::Chunked(c) if c.state == Chunk::Done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size.
    Size {
        size: u64,
        digits: u8,
    },
    /// Skipping a chunk extension up to the end of the size line.
    Ext {
        size: u64,
    },
    /// Saw '\r' after the size line; expecting '\n'.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer {
        line_start: bool,
    },
    TrailerLf,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder (RFC 9112 §7.1). Bare '\n' line ends are accepted.
#[derive(Debug)]
pub struct ChunkDecoder {
    state: Chunk,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder {
            state: Chunk::Size { size: 0, digits: 0 },
        }
    }
}

impl ChunkDecoder {
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut impl FnMut(&[u8]),
    ) -> Result<BodyState, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                Chunk::Size { size, digits } => match hex(b) {
                    Some(d) => {
                        if digits >= 16 {
                            return Err(HttpError::BadLength);
                        }
                        Chunk::Size {
                            size: size * 16 + d,
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err(HttpError::BadChunk),
                    None => match b {
                        b';' | b' ' | b'\t' => Chunk::Ext { size },
                        b'\r' => Chunk::SizeLf { size },
                        b'\n' => size_line_end(size),
                        _ => return Err(HttpError::BadChunk),
                    },
                },
                Chunk::Ext { size } => match b {
                    b'\r' => Chunk::SizeLf { size },
                    b'\n' => size_line_end(size),
                    _ => Chunk::Ext { size },
                },
                Chunk::SizeLf { size } => match b {
                    b'\n' => size_line_end(size),
                    _ => return Err(HttpError::BadChunk),
                },
                Chunk::Data { remaining } => {
                    // The only state that consumes more than one byte at a time.
                    let n = remaining.min((input.len() - i) as u64) as usize;
                    out(&input[i..i + n]);
                    i += n;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { remaining }
                    };
                    continue;
                }
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    b'\n' => Chunk::Size { size: 0, digits: 0 },
                    _ => return Err(HttpError::BadChunk),
                },
                Chunk::DataLf => match b {
                    b'\n' => Chunk::Size { size: 0, digits: 0 },
                    _ => return Err(HttpError::BadChunk),
                },
                Chunk::Trailer { line_start } => match (line_start, b) {
                    (true, b'\r') => Chunk::TrailerLf,
                    (true, b'\n') => Chunk::Done,
                    (_, b'\n') => Chunk::Trailer { line_start: true },
                    _ => Chunk::Trailer { line_start: false },
                },
                Chunk::TrailerLf => match b {
                    b'\n' => Chunk::Done,
                    _ => return Err(HttpError::BadChunk),
                },
                Chunk::Done => return Ok(BodyState::Done),
            };
            i += 1;
        }
        Ok(if self.state == Chunk::Done {
            BodyState::Done
        } else {
            BodyState::More
        })
    }
}

fn size_line_end(size: u64) -> Chunk {
    if size == 0 {
        Chunk::Trailer { line_start: true }
    } else {
        Chunk::Data { remaining: size }
    }
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some((b - b'0') as u64),
        b'a'..=b'f' => Some((b - b'a' + 10) as u64),
        b'A'..=b'F' => Some((b - b'A' + 10) as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, BodyState), HttpError> {
        let mut d = ChunkDecoder::default();
        let mut out = Vec::new();
        let mut state = BodyState::More;
        for p in pieces {
            state = d.feed(p, &mut |b| out.extend_from_slice(b))?;
        }
        Ok((out, state))
    }

    #[test]
    fn chunked_at_every_split() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n1\nX\n0a\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
        let (all, state) = decode_all(&[wire]).unwrap();
        assert_eq!(all, b"helloX0123456789");
        assert_eq!(state, BodyState::Done);
        for split in 0..=wire.len() {
            let (a, b) = wire.split_at(split);
            let (out, state) = decode_all(&[a, b]).unwrap();
            assert_eq!(out, all, "split at {split}");
            assert_eq!(state, BodyState::Done);
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytes).unwrap().0, all);
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(decode_all(&[b"zz\r\n"]), Err(HttpError::BadChunk));
        assert_eq!(decode_all(&[b"\r\n"]), Err(HttpError::BadChunk));
        assert_eq!(decode_all(&[b"2\r\nabX"]), Err(HttpError::BadChunk));
        assert_eq!(
            decode_all(&[b"11111111111111111\r\n"]),
            Err(HttpError::BadLength)
        );
    }

    #[test]
    fn head_split_anywhere() {
        let wire: &[u8] =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nrest";
        for split in 0..=wire.len() {
            let mut r = HeadReader::default();
            let (a, b) = wire.split_at(split);
            let mut found = None;
            let mut consumed_total = 0;
            for (offset, piece) in [(0, a), (a.len(), b)] {
                if found.is_some() {
                    break;
                }
                if let Some((head, used)) = r.feed(piece).unwrap() {
                    found = Some(head);
                    consumed_total = offset + used;
                }
            }
            let head = found.unwrap_or_else(|| panic!("no head at split {split}"));
            assert_eq!(head.status, 200);
            assert_eq!(head.framing, Framing::Chunked);
            assert_eq!(&wire[consumed_total..], b"rest", "split {split}");
        }
    }

    #[test]
    fn head_framings_and_limits() {
        let parse = |s: &[u8]| HeadReader::default().feed(s).map(|o| o.map(|(h, _)| h));
        let h = parse(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.framing), (401, Framing::Length(12)));
        assert!(h.keep_alive);
        let h = parse(b"HTTP/1.0 200 OK\n\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive);
        let h = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(parse(b"garbage\r\n\r\n"), Err(HttpError::BadHead));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        let big = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse(&big), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn length_body() {
        let mut d = BodyDecoder::new(&Framing::Length(5));
        let mut out = Vec::new();
        assert_eq!(
            d.feed(b"abc", &mut |b| out.extend_from_slice(b)),
            Ok(BodyState::More)
        );
        assert_eq!(
            d.feed(b"defg", &mut |b| out.extend_from_slice(b)),
            Ok(BodyState::Done)
        );
        assert_eq!(out, b"abcde");
        assert!(d.eof_is_clean());
    }
}
