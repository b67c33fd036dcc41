//! Application and user ids: what may name a tenant or a user, since ids become parts of Redis
//! keys, channel names and URL path segments.

/// The longest application or user id accepted.
pub const MAX_LEN: usize = 128;

/// Application and user ids become parts of Redis keys, channel names and URL path segments, so only
/// `A-Z a-z 0-9 . _ ~ @ + = -` are allowed, 1 to [`MAX_LEN`] bytes: no `:`, glob characters,
/// slashes, whitespace or control characters; and not `.` or `..`, the dot segments that URL
/// normalisation removes from `/connections/{app}/{user}`.
pub fn is_safe_id(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= MAX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~@+=-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids() {
        for ok in [
            "a",
            "app-1",
            "user@example.com",
            "A.b_c~d+e=f",
            "...",
            ".a",
            &"x".repeat(128),
        ] {
            assert!(is_safe_id(ok), "{ok}");
        }
        for bad in [
            "",
            "a:b",
            "a*",
            "a?",
            "a[",
            "a b",
            "a\n",
            "a\0",
            "a/b",
            ".",
            "..",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!is_safe_id(bad), "{bad:?}");
        }
    }
}
