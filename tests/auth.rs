//! The authentication matrix against the real binary: every failure reason, every token location,
//! algorithm confusion, unsafe identifiers, and the inputs that crashed the original.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Every bad token, with the reason the gateway must give.
fn bad_tokens() -> Vec<(&'static str, String, &'static str)> {
    let exp = now() + 3600;
    let ok = json!({"iss": "app", "sub": "user", "exp": exp});
    vec![
        ("garbage", "not.a.jwt".into(), "malformed"),
        ("two segments", "abc.def".into(), "malformed"),
        (
            "wrong secret",
            sign_with(Algorithm::HS256, &ok, "another-secret"),
            "bad_signature",
        ),
        (
            "tampered payload",
            {
                let t = sign(&ok);
                let mut parts: Vec<&str> = t.split('.').collect();
                let forged = b64(&json!({"iss": "app", "sub": "admin", "exp": exp}));
                parts[1] = &forged;
                parts.join(".")
            },
            "bad_signature",
        ),
        (
            "HS512 not enabled",
            sign_with(Algorithm::HS512, &ok, SECRET),
            "unsupported_algorithm",
        ),
        (
            "HS384 not enabled",
            sign_with(Algorithm::HS384, &ok, SECRET),
            "unsupported_algorithm",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&ok)
            ),
            "unsupported_algorithm",
        ),
        (
            "RS256 header signed with the secret (key confusion)",
            {
                let t = sign(&ok);
                let sig = t.rsplit('.').next().unwrap_or_default().to_string();
                format!(
                    "{}.{}.{sig}",
                    b64(&json!({"alg": "RS256", "typ": "JWT"})),
                    b64(&ok)
                )
            },
            "unsupported_algorithm",
        ),
        (
            "expired",
            sign(&json!({"iss": "app", "sub": "user", "exp": now() - 600})),
            "expired",
        ),
        (
            "not yet valid",
            sign(&json!({"iss": "app", "sub": "user", "exp": exp, "nbf": now() + 600})),
            "not_yet_valid",
        ),
        (
            "no exp",
            sign(&json!({"iss": "app", "sub": "user"})),
            "invalid_claims",
        ),
        (
            "no iss (the original panicked)",
            sign(&json!({"sub": "user", "exp": exp})),
            "invalid_claims",
        ),
        (
            "no sub (the original panicked)",
            sign(&json!({"iss": "app", "exp": exp})),
            "invalid_claims",
        ),
        (
            "empty iss",
            sign(&json!({"iss": "", "sub": "user", "exp": exp})),
            "invalid_claims",
        ),
        (
            "numeric sub",
            sign(&json!({"iss": "app", "sub": 42, "exp": exp})),
            "invalid_claims",
        ),
        (
            "colon in iss",
            sign(&json!({"iss": "app:channel:x", "sub": "user", "exp": exp})),
            "invalid_claims",
        ),
        (
            "glob in sub",
            sign(&json!({"iss": "app", "sub": "*", "exp": exp})),
            "invalid_claims",
        ),
        (
            "bracket in sub",
            sign(&json!({"iss": "app", "sub": "u[1]", "exp": exp})),
            "invalid_claims",
        ),
        (
            "whitespace in sub",
            sign(&json!({"iss": "app", "sub": "a b", "exp": exp})),
            "invalid_claims",
        ),
        (
            "newline in sub",
            sign(&json!({"iss": "app", "sub": "a\nb", "exp": exp})),
            "invalid_claims",
        ),
        (
            "overlong sub",
            sign(&json!({"iss": "app", "sub": "x".repeat(129), "exp": exp})),
            "invalid_claims",
        ),
        (
            "sub is a dot segment",
            sign(&json!({"iss": "app", "sub": ".", "exp": exp})),
            "invalid_claims",
        ),
        (
            "sub is a double dot segment",
            sign(&json!({"iss": "app", "sub": "..", "exp": exp})),
            "invalid_claims",
        ),
        (
            "iss is a double dot segment",
            sign(&json!({"iss": "..", "sub": "user", "exp": exp})),
            "invalid_claims",
        ),
        (
            "exp is an object",
            sign(&json!({"iss": "app", "sub": "user", "exp": {"at": exp}})),
            "invalid_claims",
        ),
        (
            "exp is an array",
            sign(&json!({"iss": "app", "sub": "user", "exp": [exp]})),
            "invalid_claims",
        ),
        (
            "crit names an extension (RFC 7515 section 4.1.11)",
            with_header(
                jsonwebtoken::Header {
                    crit: Some(vec!["x-tenant-policy".into()]),
                    ..jsonwebtoken::Header::new(Algorithm::HS256)
                },
                &ok,
            ),
            "malformed",
        ),
        (
            "crit names a registered parameter",
            with_header(
                jsonwebtoken::Header {
                    crit: Some(vec!["kid".into()]),
                    kid: Some("k1".into()),
                    ..jsonwebtoken::Header::new(Algorithm::HS256)
                },
                &ok,
            ),
            "malformed",
        ),
    ]
}

/// A token signed with the gateway's secret under a header of the caller's choosing.
fn with_header(header: jsonwebtoken::Header, claims: &Value) -> String {
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

async fn assert_401(resp: reqwest::Response, want: &str, case: &str) {
    assert_eq!(resp.status(), 401, "{case}");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        challenge.starts_with("Bearer") && challenge.contains("error=\"invalid_token\""),
        "{case}: {challenge}"
    );
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json",
        "{case}"
    );
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(body["error"], want, "{case}: {body}");
}

#[tokio::test]
async fn every_failure_is_a_401_naming_its_reason_in_every_token_location() {
    let gw = Gateway::embedded().await;
    let client = http();
    for (case, token, want) in bad_tokens() {
        let header = client
            .get(gw.url("/sse"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_401(header, want, &format!("{case} (header)")).await;
        for param in ["access_token", "Authorization"] {
            let query = client
                .get(gw.url("/sse"))
                .query(&[(param, token.as_str())])
                .send()
                .await
                .unwrap();
            assert_401(query, want, &format!("{case} ({param} query)")).await;
        }
    }
    // The same verifier guards the other authenticated routes.
    for (case, token, want) in bad_tokens().into_iter().take(3) {
        let r = client
            .get(gw.url("/connections/app/user"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_401(r, want, &format!("{case} (/connections)")).await;
        let r = client
            .post(gw.url("/publish"))
            .bearer_auth(&token)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_401(r, want, &format!("{case} (/publish)")).await;
    }
    let failures = gw
        .metric("sse_auth_failures_total{reason=\"invalid_claims\"}")
        .await
        .unwrap_or_default();
    assert!(failures >= 30.0, "auth failures counted: {failures}");
}

#[tokio::test]
async fn missing_and_odd_authorization_headers() {
    let gw = Gateway::embedded().await;
    let client = http();
    for value in [
        None,
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearer    "),
        Some("bearer"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Token abc"),
    ] {
        let mut req = client.get(gw.url("/sse"));
        if let Some(v) = value {
            req = req.header("authorization", v);
        }
        let resp = req
            .send()
            .await
            .expect("a response, never a dropped connection");
        assert_401(resp, "missing_token", &format!("{value:?}")).await;
    }
    // Empty query values, and a header scheme the gateway does not speak with a good query token.
    let r = client
        .get(gw.url("/sse?access_token=&Authorization="))
        .send()
        .await
        .unwrap();
    assert_401(r, "missing_token", "empty query").await;
    let mut ok = SseClient::open(
        client
            .get(gw.url("/sse"))
            .header("authorization", "Basic dXNlcjpwYXNz")
            .query(&[("access_token", user_token("app", "user"))]),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(ok.next_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn non_utf8_authorization_header_gets_a_401_not_a_crash() {
    let gw = Gateway::embedded().await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("\"malformed\""), "{text}");
    // And the server is still up.
    assert_eq!(
        http().get(gw.url("/health")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn valid_token_in_each_location_opens_a_stream() {
    let gw = Gateway::embedded().await;
    let token = user_token("app", "user");
    let client = http();
    let requests = [
        client.get(gw.url("/sse")).bearer_auth(&token),
        client
            .get(gw.url("/sse"))
            .query(&[("access_token", &token)]),
        client
            .get(gw.url("/sse"))
            .query(&[("Authorization", &token)]),
    ];
    for req in requests {
        let c = SseClient::open(req).await;
        assert_eq!(c.status, 200);
        assert_eq!(c.headers["content-type"], "text/event-stream");
    }
}

#[tokio::test]
async fn extra_algorithms_only_when_configured_and_the_original_vector() {
    let gw = Gateway::builder()
        .env("JWT_ALGORITHMS", "HS256,HS512")
        .start()
        .await;
    let claims = json!({"iss": "app", "sub": "user", "exp": now() + 60});
    let c = SseClient::open(
        gw.sse()
            .bearer_auth(sign_with(Algorithm::HS512, &claims, SECRET)),
    )
    .await;
    assert_eq!(c.status, 200);
    let r = http()
        .get(gw.url("/sse"))
        .bearer_auth(sign_with(Algorithm::HS384, &claims, SECRET))
        .send()
        .await
        .unwrap();
    assert_401(r, "unsupported_algorithm", "HS384 still off").await;

    // The original's recovered test vector: right secret, but it expired in 2024.
    let original = Gateway::builder()
        .env("JWT_SECRET", "svsdmv343f30vjmme")
        .start()
        .await;
    let vector = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIyLXVzZXItMiIsImlzcyI6IjEtc3RhbmQtMSIsImlhdCI6MTcyNTg5NTU5MiwiZXhwIjoxNzI4NDc2NzkyfQ.92ZbRKfKdf9sm-7Ku6OG2V3wLFM4WczArU6W0AXFPKs";
    let r = http()
        .get(original.url("/sse"))
        .bearer_auth(vector)
        .send()
        .await
        .unwrap();
    assert_401(r, "expired", "original test vector").await;
}

#[tokio::test]
async fn leeway_accepts_a_just_expired_token() {
    let gw = Gateway::builder().env("JWT_LEEWAY", "30").start().await;
    let just_expired = sign(&json!({"iss": "app", "sub": "user", "exp": now() - 5}));
    let c = gw.open(&just_expired).await;
    assert_eq!(c.status, 200);
    let long_expired = sign(&json!({"iss": "app", "sub": "user", "exp": now() - 60}));
    let r = http()
        .get(gw.url("/sse"))
        .bearer_auth(&long_expired)
        .send()
        .await
        .unwrap();
    assert_401(r, "expired", "past the leeway").await;
}

/// `.` and `..` are dot segments that URL normalisation removes from `/connections/{app}/{user}`:
/// they are no one's id, in a token or as a publish target.
#[tokio::test]
async fn dot_segments_are_not_ids() {
    let gw = Gateway::embedded().await;
    for user in [".", ".."] {
        let r = gw.publish("app", json!({"user": user, "data": 1})).await;
        assert_eq!(r.status(), 400, "{user}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "invalid_user", "{user}");
        let r = gw
            .publish("app", json!({"users": ["ok", user], "data": 1}))
            .await;
        assert_eq!(r.status(), 400, "{user}");
    }
    // A publisher token of application ".." is refused before anything else.
    let r = http()
        .post(gw.url("/publish"))
        .bearer_auth(sign(
            &json!({"iss": "..", "sub": "backend", "exp": now() + 60, "sse_role": "publisher"}),
        ))
        .body(r#"{"broadcast":true}"#)
        .send()
        .await
        .unwrap();
    assert_401(r, "invalid_claims", "publisher of ..").await;
}
