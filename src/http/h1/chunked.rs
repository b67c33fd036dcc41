//! An event stream's socket on the lean path: each event one HTTP/1.1 chunk, written with one
//! `sendmsg` per batch straight from the outbox, without copying.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::hub::{Outbox, Wire};

/// Most events written in one `writev`.
const WRITE_BATCH: usize = 64;

/// An event stream's socket: each event is one HTTP/1.1 chunk, written without waiting.
pub struct Chunked {
    socket: TcpStream,
}

impl Chunked {
    pub fn new(socket: TcpStream) -> Chunked {
        Chunked { socket }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn chunk_sizes() {
        let size = |len| {
            let mut out = [0u8; CHUNK_SIZE_MAX];
            let n = chunk_size(len, &mut out);
            String::from_utf8(out[..n].to_vec()).unwrap()
        };
        assert_eq!(size(0), "0\r\n");
        assert_eq!(size(26), "1a\r\n");
        assert_eq!(size(4096), "1000\r\n");
        assert_eq!(size(usize::MAX), "ffffffffffffffff\r\n");
    }
}
