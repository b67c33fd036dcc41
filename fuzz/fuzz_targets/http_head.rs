//! The HTTP/1.1 head parser of the raw `/sse` path (`read_head` calls it on the bytes read so far).
//!
//! Properties: no panic; a head served raw is a complete, bodiless `GET /sse` over HTTP/1.1 whose
//! every proper prefix was still partial (so the decision cannot depend on how TCP cut the
//! bytes); a refusal is only ever for `Content-Length`.
#![no_main]

use http::{Method, Version, header};
use libfuzzer_sys::fuzz_target;
use sse_gateway::fuzzing::{Parsed, check_head, parse_head};

fuzz_target!(|data: &[u8]| {
    match parse_head(data) {
        Parsed::Complete(req) => {
            assert_eq!(req.method(), Method::GET);
            assert_eq!(req.version(), Version::HTTP_11);
            assert_eq!(req.uri().path(), "/sse");
            let h = req.headers();
            assert!(!h.contains_key(header::TRANSFER_ENCODING));
            assert!(!h.contains_key(header::UPGRADE));
            assert!(!h.contains_key(header::EXPECT));
            for v in h.get_all(header::CONTENT_LENGTH) {
                assert!(v.as_bytes().iter().all(|b| *b == b'0'), "{v:?}");
            }
            assert!(data.ends_with(b"\n"), "a head ends with an empty line");
            // Whatever the host headers say, checking them never panics.
            let _ = check_head(req.version(), req.headers());
            // Sampled cuts, and always the last byte short of the whole: where a wrong decision
            // would hide.
            let step = (data.len() / 64).max(1);
            let cuts = (0..data.len()).step_by(step).chain(Some(data.len() - 1));
            for cut in cuts {
                assert!(
                    matches!(parse_head(&data[..cut]), Parsed::Partial),
                    "a prefix of {cut} bytes was already decided"
                );
            }
        }
        Parsed::Refused(refusal) => assert_eq!(refusal.code, "invalid_content_length"),
        Parsed::Partial | Parsed::Hyper => {}
    }
});
