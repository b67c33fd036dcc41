//! The first request head of a connection: read under a deadline ([`read_head`]) and parsed
//! without I/O ([`parse`]) into where the connection goes: served here (a plain `GET /sse`), handed
//! to hyper, or refused.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::response::{TOO_LARGE_HEAD, write_full};
use crate::http::errors::ApiError;
use crate::http::strict::{self, Refusal};

/// Largest request head read (as hyper's limit); beyond it, 431.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// What the first bytes of a connection turned out to be.
pub enum Head {
    /// A complete `GET /sse` request, ready to serve here.
    Sse(Box<Request<()>>),
    /// Anything else: the bytes read so far, to replay in front of the socket for hyper.
    Other(Bytes),
    /// The client closed, sent garbage too large, or was too slow: nothing more to do.
    Done,
}

/// Reads the first request head of a connection, refuses it if it breaks the rules of
/// [`strict`] that only a raw head shows (hyper would answer those with an empty 400), and
/// decides where the connection goes.
pub async fn read_head(stream: &mut TcpStream, timeout: Duration) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            let n = match tokio::io::AsyncReadExt::read_buf(stream, &mut buf).await {
                Ok(0) | Err(_) => return Head::Done,
                Ok(n) => n,
            };
            debug_assert!(n > 0);
            match parse(&buf) {
                Parsed::Complete(req) => return Head::Sse(req),
                Parsed::Hyper => return Head::Other(buf.split().freeze()),
                Parsed::Refused(refusal) => {
                    let _ = write_full(stream, ApiError::from(refusal).into_response()).await;
                    return Head::Done;
                }
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    let _ = stream.write_all(TOO_LARGE_HEAD).await;
                    return Head::Done;
                }
                Parsed::Partial => buf.reserve(buf.len().min(8 * 1024)),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Head::Done)
}

/// What a request head read so far turned out to be.
pub enum Parsed {
    /// A plain `GET /sse`, complete: served on the raw socket.
    Complete(Box<Request<()>>),
    Partial,
    /// Valid for hyper to judge (another route, a body, HTTP/1.0, HTTP/2, an odd header...), not
    /// for this path.
    Hyper,
    /// A complete HTTP/1 head that must be answered 400 whatever its route.
    Refused(Refusal),
}

/// Parses the start of a connection: a pure function of the bytes read so far.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(_) => return Parsed::Hyper, // hyper answers 400 (or 431 for too many headers)
    };
    let lengths = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value);
    let length = match strict::content_length(lengths) {
        Ok(length) => length,
        Err(refusal) => return Parsed::Refused(refusal),
    };
    let (Some("GET"), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    // `/sse` and `/sse?...` only: `/sse/`, `/ssex`... are hyper's 404.
    let sse = path
        .strip_prefix("/sse")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'));
    // Bytes after the head are a pipelined request or junk, which an event stream never reads:
    // hyper holds them unread.
    if !sse || head_len != buf.len() {
        return Parsed::Hyper;
    }
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Hyper;
        };
        map.append(name, value);
    }
    // Requests with a body or a protocol switch are hyper's business.
    let has_body = map.contains_key(header::TRANSFER_ENCODING) || length.is_some_and(|n| n > 0);
    if has_body || map.contains_key(header::UPGRADE) || map.contains_key(header::EXPECT) {
        return Parsed::Hyper;
    }
    let mut request = Request::new(());
    match path.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return Parsed::Hyper,
    }
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = map;
    Parsed::Complete(Box::new(request))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_sse_gets_requests_are_served_raw() {
        let complete = |s: &str| matches!(parse(s.as_bytes()), Parsed::Complete(_));
        let hyper = |s: &str| matches!(parse(s.as_bytes()), Parsed::Hyper);
        assert!(complete(
            "GET /sse?access_token=x HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
        assert!(complete("GET /sse HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
        assert!(complete(
            "GET /sse HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 00\r\n\r\n"
        ));
        for partial in [
            "GET /sse HTTP/1.1\r\nHost: a\r\n",
            "GET /s",
            "POST /publish HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(
                matches!(parse(partial.as_bytes()), Parsed::Partial),
                "{partial}"
            );
        }
        assert!(hyper("GET /sse HTTP/1.0\r\n\r\n"));
        assert!(hyper("GET /sse HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(hyper(
            "GET /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(hyper("GET /sse HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"));
        assert!(hyper("GET /sse HTTP/1.1\r\n\0bad: x\r\n\r\n"));
        assert!(hyper("GET /sse/ HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(hyper("GET /ssex HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(hyper("POST /sse HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(hyper("GET /health HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(hyper("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        // Pipelined bytes behind an event stream's head: hyper keeps them unread.
        assert!(hyper("GET /sse HTTP/1.1\r\nHost: a\r\n\r\nGET /"));
    }

    #[test]
    fn differing_content_lengths_are_refused_on_every_route() {
        for head in [
            "GET /sse HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
            "POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\n{}",
            "GET /health HTTP/1.0\r\nContent-Length: 1, 1\r\n\r\n",
            "GET /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head.as_bytes()), Parsed::Refused(r) if r.code == "invalid_content_length"),
                "{head}"
            );
        }
    }
}
