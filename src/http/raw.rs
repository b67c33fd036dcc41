//! The lean path for event streams: an HTTP/1.1 `GET /sse` is read, answered and streamed on the bare
//! socket, with no hyper connection behind it.
//!
//! hyper keeps two 8 KiB buffers and a connection task per connection for its whole life; an idle
//! stream needs none of that. This path reads the first request head of every connection into a
//! short-lived buffer (refusing, with a JSON 400, framing that hyper would only answer with an empty
//! one), answers a plain `GET /sse` through the same [`super::handle`] as every other request (same
//! authentication, limits, CORS and errors), then writes chunked events straight from the stream's
//! hub queue. Everything else (other routes, HTTP/2, requests with a body) goes to hyper, with the
//! bytes read so far replayed in front of the socket by [`Rewind`].
//!
//! A stream is one-way: the first byte a client sends on it ends it (see [`Chunked`]).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use http_body_util::Empty;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::strict::{self, Refusal};
use super::{AppState, Body, HttpResponse, handle};
use crate::hub::{Outbox, Wire};

/// Largest request head read (as hyper's limit); beyond it, 431.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Most events written in one `writev`.
const WRITE_BATCH: usize = 64;

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
/// [`super::strict`] that only a raw head shows (hyper would answer those with an empty 400), and
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
                    let _ = write_full(stream, super::refused(refusal)).await;
                    return Head::Done;
                }
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
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

/// Answers a `GET /sse` request read by [`read_head`], and streams it until either side ends it.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    req: Box<Request<()>>,
) {
    let req = req.map(|()| Empty::<Bytes>::new());
    // Boxed: an idle stream's task should not keep room for the request-handling future, which is
    // far larger than the streaming loop below (a future is as big as its largest await point).
    let Ok(resp) = Box::pin(handle(state, peer, req)).await;
    let (parts, body) = resp.into_parts();
    let lease = match body {
        Body::Stream(lease) => lease,
        body @ Body::Full(_) => {
            let _ = write_full(&mut stream, HttpResponse::from_parts(parts, body)).await;
            return;
        }
    };
    let head = response_head(&parts, None);
    drop(parts); // the header map is not needed for the stream's life
    // From here on the hub writes the stream's events; this task only wakes when the socket is
    // full, when the stream ends, or when the client leaves.
    let conn = lease.conn();
    conn.attach_wire(Box::new(Chunked { socket: stream }), Bytes::from(head));
    poll_fn(|cx| conn.poll_drive(cx)).await;
    // Dropping the lease removes the stream from the hub and the registry.
    drop(lease);
}

/// An event stream's socket: each event is one HTTP/1.1 chunk, written without waiting.
struct Chunked {
    socket: TcpStream,
}

/// Longest chunk-size line: 16 hex digits and CRLF.
const CHUNK_SIZE_MAX: usize = 18;

impl Wire for Chunked {
    fn write(&mut self, out: &mut Outbox) -> io::Result<bool> {
        while !out.is_empty() {
            let count = out.events().len().min(WRITE_BATCH);
            let mut sizes = [[0u8; CHUNK_SIZE_MAX]; WRITE_BATCH];
            let mut size_lens = [0usize; WRITE_BATCH];
            for (i, ev) in out.events().take(count).enumerate() {
                size_lens[i] = chunk_size(ev.len(), &mut sizes[i]);
            }
            let written = {
                let mut iov = [IoSlice::new(&[]); 1 + 3 * WRITE_BATCH];
                let mut n = 0;
                if !out.partial().is_empty() {
                    iov[0] = IoSlice::new(out.partial());
                    n = 1;
                }
                for (i, ev) in out.events().take(count).enumerate() {
                    iov[n] = IoSlice::new(&sizes[i][..size_lens[i]]);
                    iov[n + 1] = IoSlice::new(ev);
                    iov[n + 2] = IoSlice::new(b"\r\n");
                    n += 3;
                }
                // Straight to `sendmsg`, without tokio's readiness bookkeeping: the socket is
                // almost always writable. Only when it is full does tokio's own write run, whose
                // would-block clears the readiness the stream's task then waits on (clearing it
                // from here could lose an edge that arrived meanwhile).
                let sent = match socket2::SockRef::from(&self.socket).send_vectored(&iov[..n]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.socket.try_write_vectored(&iov[..n])
                    }
                    other => other,
                };
                match sent {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(written) => written,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            consume(out, written, &sizes, &size_lens);
        }
        Ok(true)
    }

    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_write_ready(cx)
    }

    /// An event stream is one-way: whatever the client sends on it (a pipelined request, junk)
    /// ends it. Reading it would cost a syscall per few bytes for as long as the client cares to
    /// send; ending costs one read.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut probe = [0u8; 1];
        loop {
            match self.socket.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            match self.socket.try_read(&mut probe) {
                // The client closed, or sent bytes on a one-way stream.
                Ok(_) => return Poll::Ready(()),
                // A spurious readiness: `try_read` cleared it, so the next poll waits again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    fn end(&mut self) {
        let _ = self.socket.try_write(b"0\r\n\r\n");
        let _ = socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Write);
    }
}

/// Takes `n` written bytes off the outbox: the partial write first, then whole chunks (`sizes`
/// are the chunk-size lines of the events written from). A chunk cut short leaves its framed rest
/// as the next partial write.
fn consume(out: &mut Outbox, mut n: usize, sizes: &[[u8; CHUNK_SIZE_MAX]], size_lens: &[usize]) {
    if !out.partial().is_empty() {
        n -= out.advance_partial(n);
        if !out.partial().is_empty() {
            return;
        }
    }
    let mut i = 0;
    while n > 0 {
        let Some(ev) = out.pop() else {
            return;
        };
        let parts: [&[u8]; 3] = [&sizes[i][..size_lens[i]], &ev, b"\r\n"];
        let framed: usize = parts.iter().map(|p| p.len()).sum();
        if n >= framed {
            n -= framed;
            i += 1;
            continue;
        }
        let mut rest = Vec::with_capacity(framed - n);
        for part in parts {
            if n >= part.len() {
                n -= part.len();
            } else {
                rest.extend_from_slice(&part[n..]);
                n = 0;
            }
        }
        out.set_partial(Bytes::from(rest));
        return;
    }
}

/// Writes `len` as a chunk-size line (`"{len:x}\r\n"`) into `out`; returns its length.
fn chunk_size(len: usize, out: &mut [u8; CHUNK_SIZE_MAX]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        *slot = HEX[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

fn response_head(parts: &http::response::Parts, content_length: Option<usize>) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let status = parts.status;
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match content_length {
        Some(n) => {
            head.extend_from_slice(
                format!("content-length: {n}\r\nconnection: close\r\n").as_bytes(),
            );
        }
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Writes a complete response and closes the sending side: this path serves one request.
async fn write_full(stream: &mut TcpStream, resp: HttpResponse) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let bytes = match body {
        Body::Full(bytes) => bytes.unwrap_or_default(),
        Body::Stream(_) => Bytes::new(), // never: streams are answered by `serve`
    };
    let head = response_head(&parts, Some(bytes.len()));
    write_all_vectored(stream, &mut [&head[..], &bytes[..]]).await?;
    stream.shutdown().await
}

/// Writes every slice, using `writev` and resuming after partial writes.
async fn write_all_vectored(stream: &mut TcpStream, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut start = 0;
    while start < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[start..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = stream.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while start < parts.len() && n >= parts[start].len() {
            n -= parts[start].len();
            start += 1;
        }
        if start < parts.len() {
            parts[start] = &parts[start][n..];
        }
    }
    Ok(())
}

/// An RFC 9110 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A socket with bytes already read from it put back in front, for hyper.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new(); // release the head buffer
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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

    /// The outbox after `n` bytes of `partial` + chunks of `events` were written.
    fn after(partial: &'static str, events: &[&'static str], n: usize) -> (String, Vec<String>) {
        let mut out = Outbox::holding(
            Bytes::from_static(partial.as_bytes()),
            events.iter().map(|e| Bytes::from_static(e.as_bytes())),
        );
        let mut sizes = [[0u8; CHUNK_SIZE_MAX]; WRITE_BATCH];
        let mut lens = [0usize; WRITE_BATCH];
        for (i, e) in events.iter().enumerate() {
            lens[i] = chunk_size(e.len(), &mut sizes[i]);
        }
        consume(&mut out, n, &sizes, &lens);
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        assert_eq!(
            out.counted_bytes(),
            out.events().map(Bytes::len).sum::<usize>()
        );
        (text(out.partial()), out.events().map(|b| text(b)).collect())
    }

    #[test]
    fn short_writes_keep_the_rest_of_the_chunk() {
        // "HEAD" then "3\r\nabc\r\n" then "2\r\nde\r\n".
        let all = ["abc", "de"];
        assert_eq!(
            after("HEAD", &all, 2),
            ("AD".into(), vec!["abc".into(), "de".into()])
        );
        assert_eq!(
            after("HEAD", &all, 4),
            ("".into(), vec!["abc".into(), "de".into()])
        );
        assert_eq!(
            after("HEAD", &all, 5),
            ("\r\nabc\r\n".into(), vec!["de".into()])
        );
        assert_eq!(after("HEAD", &all, 9), ("c\r\n".into(), vec!["de".into()]));
        assert_eq!(after("HEAD", &all, 11), ("\n".into(), vec!["de".into()]));
        assert_eq!(after("HEAD", &all, 12), ("".into(), vec!["de".into()]));
        assert_eq!(after("", &all, 8 + 7), ("".into(), vec![]));
        assert_eq!(after("", &all, 8 + 3), ("de\r\n".into(), vec![]));
    }

    #[test]
    fn chunk_sizes_and_dates() {
        let size = |len| {
            let mut out = [0u8; CHUNK_SIZE_MAX];
            let n = chunk_size(len, &mut out);
            String::from_utf8(out[..n].to_vec()).unwrap()
        };
        assert_eq!(size(0), "0\r\n");
        assert_eq!(size(26), "1a\r\n");
        assert_eq!(size(4096), "1000\r\n");
        assert_eq!(size(usize::MAX), "ffffffffffffffff\r\n");
        let t = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
