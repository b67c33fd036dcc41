//! The lean path for event streams: an HTTP/1.1 `GET /sse` is read, answered and streamed on the bare
//! socket, with no hyper connection behind it.
//!
//! hyper keeps two 8 KiB buffers and a connection task per connection for its whole life; an idle
//! stream needs none of that. This path reads the request head into a short-lived buffer, answers
//! through the same [`super::handle`] as every other request (same authentication, limits, CORS and
//! errors), then writes chunked events straight from the stream's hub queue. Everything that is not
//! a plain `GET /sse` (other routes, HTTP/2, requests with a body) goes to hyper, with the bytes read
//! so far replayed in front of the socket by [`Rewind`].

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

use super::{AppState, Body, handle};

/// The request line prefix served here.
const SSE_PREFIX: &[u8] = b"GET /sse";
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

/// Reads just enough of a connection to decide where it goes.
pub async fn read_head(stream: &mut TcpStream, timeout: Duration) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            let n = match tokio::io::AsyncReadExt::read_buf(stream, &mut buf).await {
                Ok(0) | Err(_) => return Head::Done,
                Ok(n) => n,
            };
            debug_assert!(n > 0);
            let seen = buf.len().min(SSE_PREFIX.len());
            if buf[..seen] != SSE_PREFIX[..seen] {
                return Head::Other(buf.split().freeze());
            }
            if buf.len() > SSE_PREFIX.len() && !matches!(buf[SSE_PREFIX.len()], b' ' | b'?') {
                return Head::Other(buf.split().freeze()); // /sse/, /ssex...: hyper answers 404
            }
            match parse(&buf) {
                Parsed::Complete(req) => return Head::Sse(req),
                Parsed::Hyper => return Head::Other(buf.split().freeze()),
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

enum Parsed {
    Complete(Box<Request<()>>),
    Partial,
    /// Valid for hyper to judge (a body, HTTP/1.0, an odd header...), not for this path.
    Hyper,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(_)) => {}
        Err(_) => return Parsed::Hyper, // hyper answers 400 (or 431 for too many headers)
    }
    let (Some(path), Some(1)) = (req.path, req.version) else {
        return Parsed::Hyper;
    };
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
    let has_body = map.contains_key(header::TRANSFER_ENCODING)
        || map
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body || map.contains_key(header::UPGRADE) || map.contains_key(header::EXPECT) {
        return Parsed::Hyper;
    }
    let mut request = Request::new(());
    match path.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return Parsed::Hyper,
    }
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
        Body::Full(bytes) => {
            let bytes = bytes.unwrap_or_default();
            let head = response_head(&parts, Some(bytes.len()));
            let _ = write_all_vectored(&mut stream, &mut [&head[..], &bytes[..]]).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let head = response_head(&parts, None);
    drop(parts); // the header map is not needed for the stream's life
    if Box::pin(write_all_vectored(&mut stream, &mut [&head[..]]))
        .await
        .is_err()
    {
        return;
    }
    drop(head);
    let conn = lease.conn().clone();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut probe = [0u8; 64];
    loop {
        // Wait for events, or for the client to go away.
        let first = tokio::select! {
            next = poll_fn(|cx| conn.poll_next(cx)) => next,
            readable = stream.readable() => {
                if readable.is_err() {
                    break;
                }
                match stream.try_read(&mut probe) {
                    Ok(0) => break, // the client closed
                    Ok(_) => continue, // pipelined bytes after an event stream: ignored
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
            }
        };
        let Some(first) = first else {
            // The stream ended (shutdown, token expiry, slow client): close the chunked body.
            let _ = stream.write_all(b"0\r\n\r\n").await;
            let _ = stream.shutdown().await;
            break;
        };
        batch.push(first);
        // Everything else already queued goes out in the same write.
        while batch.len() < WRITE_BATCH {
            match poll_fn(|cx| Poll::Ready(conn.poll_next(cx))).await {
                Poll::Ready(Some(b)) => batch.push(b),
                _ => break,
            }
        }
        let sizes: Vec<[u8; 18]> = batch.iter().map(|b| chunk_size(b.len())).collect();
        let mut slices: Vec<&[u8]> = Vec::with_capacity(batch.len() * 3);
        for (b, size) in batch.iter().zip(&sizes) {
            let n = size.iter().position(|&c| c == 0).unwrap_or(size.len());
            slices.extend([&size[..n], &b[..], b"\r\n"]);
        }
        // A client that stops reading must not hold its socket forever: the hub cuts it off when
        // its queue fills, and the write is abandoned then.
        let written = tokio::select! {
            r = write_all_vectored(&mut stream, &mut slices) => r.is_ok(),
            () = poll_fn(|cx| conn.poll_cut_off(cx)) => false,
        };
        batch.clear();
        if !written {
            break;
        }
    }
    // Dropping the lease removes the stream from the hub and the registry.
    drop(lease);
}

/// `"{len:x}\r\n"`, zero-padded at the end (the zeros are not sent).
fn chunk_size(len: usize) -> [u8; 18] {
    let mut out = [0u8; 18];
    let text = format!("{len:x}\r\n");
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
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
        assert!(matches!(
            parse(b"GET /sse HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
        assert!(hyper("GET /sse HTTP/1.0\r\n\r\n"));
        assert!(hyper("GET /sse HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(hyper(
            "GET /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(hyper("GET /sse HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"));
        assert!(hyper("GET /sse HTTP/1.1\r\n\0bad: x\r\n\r\n"));
    }

    #[test]
    fn chunk_sizes_and_dates() {
        assert_eq!(&chunk_size(26)[..4], b"1a\r\n");
        assert_eq!(chunk_size(26)[4], 0);
        let t = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
