//! Token extraction and JWT verification: `extract_token` and `Verifier::verify`.
//!
//! The first input byte picks the mode: a raw token (0); `Authorization` headers and a query
//! string (1); a header and claims of fuzzed bytes, correctly signed, so that every check behind
//! the signature is reached (2); fuzzed claims under a plain HS256 header (3).
//!
//! Properties: no panic; an accepted token has an HS256 header without `crit`, and claims that
//! are a JSON object with safe `iss` and `sub` and a numeric `exp`; a correctly signed token with
//! a plain header and an object for claims is never called malformed (a claim of the wrong shape
//! is `invalid_claims`).
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sse_gateway::auth::{AuthError, Identity, extract_token};
use sse_gateway::ids::is_safe_id;
use sse_gateway_fuzz::{SECRET, VERIFIER};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            if let Ok(id) = VERIFIER.verify(&token) {
                accepted(&token, &id);
            }
        }
        1 => {
            let mut u = Unstructured::new(rest);
            let Ok((values, query)) = <(Vec<Vec<u8>>, Option<String>)>::arbitrary(&mut u) else {
                return;
            };
            let mut headers = HeaderMap::new();
            for v in values {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    headers.append(header::AUTHORIZATION, v);
                }
            }
            if let Ok(token) = extract_token(&headers, query.as_deref()) {
                assert!(!token.is_empty());
                if let Ok(id) = VERIFIER.verify(&token) {
                    accepted(&token, &id);
                }
            }
        }
        2 => {
            let mut u = Unstructured::new(rest);
            let Ok((head, claims)) = <(&[u8], &[u8])>::arbitrary(&mut u) else {
                return;
            };
            let token = signed(head, claims);
            if let Ok(id) = VERIFIER.verify(&token) {
                accepted(&token, &id);
            }
        }
        _ => {
            let token = signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest);
            let result = VERIFIER.verify(&token);
            if let Ok(id) = &result {
                accepted(&token, id);
            }
            if serde_json::from_slice::<Value>(rest).is_ok_and(|v| v.is_object()) {
                assert_ne!(
                    result,
                    Err(AuthError::Malformed),
                    "{}",
                    String::from_utf8_lossy(rest)
                );
            }
        }
    }
});

/// `header.claims.signature`, signed with the verifier's secret.
fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HMAC signing");
    format!("{message}.{signature}")
}

/// What must hold of a token the verifier accepted.
fn accepted(token: &str, id: &Identity) {
    let mut parts = token.split('.');
    let part = |p: Option<&str>| -> Value {
        let bytes = URL_SAFE_NO_PAD
            .decode(p.expect("three parts"))
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("JSON")
    };
    let (header, claims) = (part(parts.next()), part(parts.next()));
    assert_eq!(header["alg"], "HS256");
    assert!(header.get("crit").is_none(), "crit accepted: {header}");
    assert!(claims.is_object());
    assert!(is_safe_id(&id.app) && is_safe_id(&id.user), "{id:?}");
    assert_eq!(claims["iss"], id.app.as_str());
    assert_eq!(claims["sub"], id.user.as_str());
    assert_eq!(claims["exp"].as_u64(), Some(id.exp));
}
