//! Tenants with their own keys, a rotated-out secret accepted until its cut-off, and per-application
//! origins and limits, against the real binary.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

fn token(app: &str, user: &str, secret: &str) -> String {
    sign_with(
        Algorithm::HS256,
        &json!({"iss": app, "sub": user, "exp": now() + 600}),
        secret,
    )
}

#[tokio::test]
async fn per_application_secrets_rotation_origins_and_limits() {
    let soon = now() + 3600;
    let past = now() - 10;
    let tenants = json!({
        "shop": {"secret": "shop-current", "previous_secret": "shop-previous",
                 "previous_secret_until": soon,
                 "cors_origins": ["https://shop.example"], "max_user_connections": 1},
        "blog": {"secret": "blog-current", "previous_secret": "blog-previous",
                 "previous_secret_until": past}
    })
    .to_string();
    let gw = Gateway::builder().env("TENANTS", &tenants).start().await;

    let cases = [
        // shop: its own secret, and the old one before its cut-off; not the global default.
        (token("shop", "a", "shop-current"), "", true),
        (token("shop", "b", "shop-previous"), "", true),
        (token("shop", "c", SECRET), "bad_signature", false),
        // blog's old secret is past its cut-off.
        (token("blog", "a", "blog-current"), "", true),
        (token("blog", "b", "blog-previous"), "bad_signature", false),
        // Applications without their own secret use the global one.
        (token("news", "a", SECRET), "", true),
    ];
    let mut open = Vec::new();
    for (t, reason, ok) in cases {
        let c = gw.open(&t).await;
        if ok {
            assert_eq!(c.status, 200, "{t}");
            open.push(c);
        } else {
            assert_eq!(c.status, 401, "{t}");
            let mut c = c;
            c.until_end(std::time::Duration::from_secs(5)).await;
            let body: Value = serde_json::from_str(&c.raw).unwrap();
            assert_eq!(body["error"], reason);
        }
    }

    // shop holds its pages to its origins.
    let r = http()
        .get(gw.url("/sse"))
        .bearer_auth(token("shop", "d", "shop-current"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "origin_not_allowed"
    );
    let c = SseClient::open(
        gw.sse()
            .bearer_auth(token("shop", "d", "shop-current"))
            .header("origin", "https://shop.example"),
    )
    .await;
    assert_eq!(c.status, 200);
    open.push(c);
    // Other applications are not restricted by shop's list.
    let c = SseClient::open(
        gw.sse()
            .bearer_auth(token("news", "x", SECRET))
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(c.status, 200);

    // shop allows one stream per user: a second tab for "a" is refused, blog's users are not.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = http()
        .get(gw.url("/sse"))
        .bearer_auth(token("shop", "a", "shop-current"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let second = gw.open(&token("blog", "a", "blog-current")).await;
    assert_eq!(second.status, 200);
}

#[tokio::test]
async fn tenants_from_a_file_and_no_global_secret() {
    let dir = TempDir::new();
    let path = dir.path.join("tenants.json");
    std::fs::write(&path, json!({"shop": {"secret": "from-file"}}).to_string()).unwrap();
    let gw = Gateway::builder()
        .env("JWT_SECRET", "")
        .env("TENANTS_FILE", path.to_str().unwrap())
        .start()
        .await;
    let c = gw.open(&token("shop", "a", "from-file")).await;
    assert_eq!(c.status, 200);
    // With no global secret, an application the gateway does not know is refused.
    let r = http()
        .get(gw.url("/sse"))
        .bearer_auth(token("blog", "a", SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unknown_application"
    );
    // The file's secret never reaches the logs.
    assert!(!gw.logs().contains("from-file"));
}
