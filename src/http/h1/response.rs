//! Responses written by the lean path itself: the head (status, headers, framing, `Date`), once
//! per response, and whole short responses (refusals) that end the connection.

use std::io::{self, IoSlice};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::{Body, HttpResponse};

/// The answer to a request head larger than `head::MAX_HEAD` (64 KiB, as hyper's limit).
pub const TOO_LARGE_HEAD: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A response head: a chunked one for a stream (`content_length` `None`), else one that says the
/// connection closes after the body (this path serves one request per connection).
pub fn response_head(
    status: StatusCode,
    headers: &HeaderMap,
    content_length: Option<usize>,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
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
    head.extend_from_slice(http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Writes a complete response and closes the sending side: this path serves one request.
pub async fn write_full(stream: &mut TcpStream, resp: HttpResponse) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let bytes = match body {
        Body::Full(bytes) => bytes.unwrap_or_default(),
        Body::Stream(_) => Bytes::new(), // never: streams are answered by `answer`
    };
    let head = response_head(parts.status, &parts.headers, Some(bytes.len()));
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
fn http_date(t: SystemTime) -> String {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
