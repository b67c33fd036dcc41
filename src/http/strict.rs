//! Strict HTTP/1 request rules checked on both request paths, before any route sees the request.
//!
//! A front proxy and this gateway must agree on where a request ends and which host it is for, or
//! one request can be read as two (request smuggling). hyper refuses differing `Content-Length`
//! values but answers with an empty 400 and does not check `Host` at all; the raw `/sse` path
//! parses heads itself. Both paths use these checks, and both answer the house JSON error.

use http::{HeaderMap, Version, header};

/// Why a request head was refused: the JSON error's code and message (always a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: &'static str,
}

const BAD_CONTENT_LENGTH: Refusal = Refusal {
    code: "invalid_content_length",
    message: "Content-Length must be one decimal number; several differing values are refused \
              (RFC 9112 section 6.3)",
};

const BAD_HOST: Refusal = Refusal {
    code: "invalid_host",
    message: "an HTTP/1.1 request needs exactly one Host header naming a host and optional port \
              (RFC 9112 section 3.2)",
};

/// The request body length that every `Content-Length` line agrees on (`None`: no such header).
/// As hyper: each value is plain digits (no sign, no list), and repeated lines must be equal.
/// Unlike hyper, a `Transfer-Encoding` does not excuse a conflict: such a request is refused
/// whatever the order of its lines.
pub fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, Refusal> {
    let mut length = None;
    for value in values {
        let n = digits(value).ok_or(BAD_CONTENT_LENGTH)?;
        if length.is_some_and(|l| l != n) {
            return Err(BAD_CONTENT_LENGTH);
        }
        length = Some(n);
    }
    Ok(length)
}

fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, and any request with more than one or
/// with an invalid one, is a 400. HTTP/2 names the authority in `:authority` instead, and HTTP/1.0
/// may leave `Host` out.
pub fn host(version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
    let mut values = headers.get_all(header::HOST).iter();
    match (values.next(), values.next()) {
        (None, _) if version == Version::HTTP_11 => Err(BAD_HOST),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err(BAD_HOST),
        (Some(value), None) if valid_host(value.as_bytes()) => Ok(()),
        (Some(_), None) => Err(BAD_HOST),
    }
}

/// `uri-host [":" port]`: an authority without user information, whose port is digits.
fn valid_host(value: &[u8]) -> bool {
    if value.contains(&b'@') {
        return false;
    }
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    let host = authority.host();
    // Without user information the authority starts with the host; what follows is `:port`.
    let port = authority.as_str().get(host.len()..).unwrap_or("x");
    !host.is_empty()
        && (port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
}

/// Both checks, on a parsed request head.
pub fn check(version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
    content_length(
        headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes()),
    )?;
    host(version, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(values: &[&str]) -> Result<Option<u64>, Refusal> {
        content_length(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn content_lengths_must_agree() {
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["0"]), Ok(Some(0)));
        assert_eq!(cl(&["5", "5"]), Ok(Some(5)), "repeated, equal: as hyper");
        assert_eq!(cl(&["007"]), Ok(Some(7)));
        for bad in [
            &["0", "5"][..],
            &["5", "6"],
            &["5, 5"],
            &["+5"],
            &["-1"],
            &[""],
            &["5 "],
            &["0x10"],
            &["99999999999999999999"],
        ] {
            assert_eq!(cl(bad), Err(BAD_CONTENT_LENGTH), "{bad:?}");
        }
    }

    #[test]
    fn one_valid_host_on_http_1_1() {
        let with = |hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(header::HOST, v.parse().unwrap());
            }
            h
        };
        for ok in ["x", "example.com:8080", "127.0.0.1", "[::1]:80"] {
            assert_eq!(host(Version::HTTP_11, &with(&[ok])), Ok(()), "{ok}");
        }
        assert_eq!(host(Version::HTTP_11, &with(&[])), Err(BAD_HOST));
        assert_eq!(host(Version::HTTP_10, &with(&[])), Ok(()));
        assert_eq!(host(Version::HTTP_2, &with(&[])), Ok(()));
        for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(host(version, &with(&["a", "a"])), Err(BAD_HOST));
            assert_eq!(host(version, &with(&["a", "b"])), Err(BAD_HOST));
        }
        for bad in [
            "", "a b", "u@x", "a/b", "x:port", "a?b", ":80", "[::1", "a:1:2",
        ] {
            assert_eq!(
                host(Version::HTTP_11, &with(&[bad])),
                Err(BAD_HOST),
                "{bad}"
            );
        }
    }
}
