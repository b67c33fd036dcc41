//! The HTTP edge and process behaviour: routes, methods, CORS, HTTP/2, odd requests, metrics, the
//! embedded mode end to end, start-up errors, and secrets kept out of logs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw_request(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn routes_methods_and_json_errors() {
    let gw = Gateway::builder().process().start().await;
    let c = http();

    let r = c.get(gw.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), r#"{"status":"ok"}"#);
    assert_eq!(
        c.head(gw.url("/health")).send().await.unwrap().status(),
        200
    );

    let r = c.get(gw.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["broker"], "embedded");

    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "/health");

    for path in [
        "/nope",
        "/sse/",
        "/connections/",
        "/connections/a/",
        "/connections/a/b/c",
        "/SSE",
    ] {
        let r = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "not_found",
            "{path}"
        );
    }
    for (method, path, allow) in [
        (reqwest::Method::POST, "/health", "GET, HEAD, OPTIONS"),
        (reqwest::Method::DELETE, "/connections/a", "GET, OPTIONS"),
        (reqwest::Method::POST, "/sse", "GET, OPTIONS"),
        (reqwest::Method::GET, "/publish", "POST, OPTIONS"),
    ] {
        let r = c
            .request(method.clone(), gw.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "method_not_allowed"
        );
    }
}

#[tokio::test]
async fn cors_preflight_and_exposed_connection_id() {
    let gw = Gateway::builder().process().start().await;
    let c = http();
    let r = c
        .request(reqwest::Method::OPTIONS, gw.url("/sse"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "last-event-id, authorization",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("GET")
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("last-event-id"));

    let s = SseClient::open(
        c.get(gw.url("/sse"))
            .header("origin", "https://app.example")
            .bearer_auth(user_token("a", "u")),
    )
    .await;
    assert_eq!(s.headers["access-control-allow-origin"], "*");
    assert!(
        s.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("X-Connection-Id")
    );
    assert_eq!(s.headers["cache-control"], "no-cache");
    assert_eq!(s.headers["x-accel-buffering"], "no");
    assert!(uuid::Uuid::parse_str(&s.connection_id()).is_ok());

    // Errors carry CORS headers too, so browser code can read why.
    let r = c
        .get(gw.url("/sse"))
        .header("origin", "https://x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn cors_with_an_origin_list_echoes_only_listed_origins_with_credentials() {
    let gw = Gateway::builder()
        .process()
        .env(
            "CORS_ALLOWED_ORIGINS",
            "https://good.example,https://also.example",
        )
        .start()
        .await;
    let c = http();
    let r = c
        .get(gw.url("/health"))
        .header("origin", "https://good.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://good.example"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert_eq!(r.headers()["vary"], "Origin");
    let r = c
        .get(gw.url("/health"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
}

#[tokio::test]
async fn http2_prior_knowledge_streams() {
    let gw = Gateway::builder().process().start().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut s = SseClient::open(h2.get(gw.url("/sse")).bearer_auth(user_token("a", "u"))).await;
    assert_eq!(s.status, 200);
    assert_eq!(
        gw.publish("a", json!({"user": "u", "type": "h2", "data": 1}))
            .await
            .status(),
        200
    );
    assert_eq!(s.next().await.event, "h2");
    drop(s);
    // The h2 stream reset is seen as a disconnect.
    let open = gw.metric_reaches("sse_active_clients", 0.0).await;
    assert_eq!(open, Some(0.0));
}

#[tokio::test]
async fn odd_requests_get_answers_not_crashes() {
    let gw = Gateway::builder().process().start().await;
    let big_header = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let resp = raw_request(gw.port, big_header.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let resp = raw_request(gw.port, b"BLAH\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 400") || resp.is_empty(),
        "{resp}"
    );
    let resp = raw_request(
        gw.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\x00bad: y\r\n\r\n",
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 400") || resp.is_empty(),
        "{resp}"
    );
    let resp = raw_request(
        gw.port,
        b"GET /sse?access_token=%zz%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    // Still alive after all of that.
    assert_eq!(
        http().get(gw.url("/health")).send().await.unwrap().status(),
        200
    );
}

/// A gateway with alice's stream (returned, to keep it open), one delivered publish and one refused
/// `/sse` behind it, so that every kind of metric has samples.
async fn gateway_with_traffic() -> (Gateway, SseClient) {
    let gw = Gateway::builder().process().start().await;
    let stream = gw.connect("shop", "alice").await;
    gw.publish("shop", json!({"user": "alice", "data": 1}))
        .await;
    let _ = http().get(gw.url("/sse")).send().await;
    (gw, stream)
}

#[tokio::test]
async fn metrics_are_not_on_the_public_port() {
    let (gw, _s) = gateway_with_traffic().await;
    let c = http();
    // Not with a token either: no token of one application may read the others' numbers.
    for req in [
        c.get(gw.url("/metrics")),
        c.get(gw.url("/metrics"))
            .header("accept", "text/plain")
            .bearer_auth(operator_token("shop")),
        c.request(reqwest::Method::OPTIONS, gw.url("/metrics"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET"),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 404);
        let body = r.text().await.unwrap();
        assert!(body.contains("not_found"), "{body}");
        assert!(!body.contains("sse_"), "{body}");
    }
    let r = c.head(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // HTTP/2 goes through the same routes.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // They are on the operator listener.
    let r = c.get(gw.operator_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_operator_listener_serves_metrics_health_and_ready_only() {
    let (gw, _s) = gateway_with_traffic().await;
    let c = http();
    let r = c.get(gw.operator_url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"status":"ok"}"#);
    let r = c.get(gw.operator_url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["broker"], "embedded");
    let r = c.head(gw.operator_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    // Nothing of the public API: no stream, publish or listing, whatever the token.
    for (path, token) in [
        ("/sse", user_token("shop", "alice")),
        ("/connections/shop", operator_token("shop")),
        ("/publish", publisher_token("shop")),
        ("/", String::new()),
        ("/metrics/", String::new()),
    ] {
        let r = c
            .get(gw.operator_url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    }
    let r = c.post(gw.operator_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD, OPTIONS");
    let r = c
        .request(reqwest::Method::OPTIONS, gw.operator_url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["allow"], "GET, HEAD, OPTIONS");
    let addr = format!("127.0.0.1:{}", gw.operator_port);
    assert!(
        gw.logs()
            .lines()
            .any(|l| l.contains("operator listener") && l.contains(&addr)),
        "the start-up log names the operator address:\n{}",
        gw.logs()
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_labelled_by_app_only() {
    let (gw, _s) = gateway_with_traffic().await;
    let r = http()
        .get(gw.operator_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = r.text().await.unwrap();
    for needle in [
        "sse_active_clients 1",
        "sse_connections{app=\"shop\"} 1",
        "sse_connections_opened_total{app=\"shop\"} 1",
        "sse_message_sent_total{app=\"shop\"} 1",
        "sse_auth_failures_total{reason=\"missing_token\"} 1",
        "sse_publish_requests_total{app=\"shop\",outcome=\"ok\"} 1",
        "sse_broker_link_up{link=\"pubsub\"} 1",
        "sse_delivery_latency_seconds_count{app=\"shop\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("alice"), "never labelled by user");
}

/// `promtool check metrics` (from Debian's prometheus package, which `make test` installs) on `text`:
/// it rejects what Prometheus would misread, such as families without help text.
fn promtool_check_metrics(text: &str) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(common::external::tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("write to promtool");
    drop(stdin);
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_in_prometheus_text_when_asked() {
    let (gw, _s) = gateway_with_traffic().await;

    let get = |accept: &'static str| {
        let url = gw.operator_url("/metrics");
        async move {
            let r = http()
                .get(url)
                .header("accept", accept)
                .send()
                .await
                .expect("metrics");
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .to_string();
            (ct, r.text().await.expect("body"))
        }
    };
    // promtool, curl -H 'Accept: text/plain', older scrapers.
    let (ct, text) = get("text/plain").await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    promtool_check_metrics(&text);
    assert!(!text.contains("# EOF"), "no OpenMetrics in 0.0.4");
    for needle in [
        "# TYPE sse_connections_opened_total counter",
        "sse_connections_opened_total{app=\"shop\"} 1",
        "# TYPE sse_active_clients gauge",
        "sse_active_clients 1",
        "sse_delivery_latency_seconds_count{app=\"shop\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // Prometheus offers both and gets OpenMetrics; so does a client that states no preference.
    for accept in [
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        "*/*",
    ] {
        let (ct, text) = get(accept).await;
        assert!(
            ct.starts_with("application/openmetrics-text"),
            "{accept}: {ct}"
        );
        assert!(text.ends_with("# EOF\n"), "{accept}");
    }
}

#[tokio::test]
async fn embedded_mode_end_to_end() {
    let gw = Gateway::builder().process().start().await;
    assert!(
        gw.logs().contains("embedded in-process broker"),
        "says so: {}",
        gw.logs()
    );
    let mut alice = gw.connect("shop", "alice").await;
    let mut also_alice = gw.connect("shop", "alice").await;
    let mut bob = gw.connect("shop", "bob").await;
    let r = gw
        .publish(
            "shop",
            json!({"user": "alice", "type": "hi", "data": {"x": 1}}),
        )
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (&body["published"], &body["subscribers"]),
        (&json!(1), &json!(1))
    );
    let id = body["ids"][0].as_str().unwrap().to_string();
    for c in [&mut alice, &mut also_alice] {
        let ev = c.next().await;
        assert_eq!(
            (ev.id.as_deref(), ev.event.as_str(), ev.json()),
            (Some(id.as_str()), "hi", json!({"x": 1}))
        );
    }
    bob.expect_silence(Duration::from_millis(300)).await;
    gw.publish("shop", json!({"broadcast": true, "data": "all"}))
        .await;
    assert_eq!(bob.next().await.data, "\"all\"");

    let r = http()
        .get(gw.url("/connections/shop"))
        .bearer_auth(operator_token("shop"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["alice"].as_object().unwrap().len(), 2);
    assert_eq!(body["bob"].as_object().unwrap().len(), 1);
    drop(bob);
    let gw_ref = &gw;
    let left: Value = poll_until(
        move || async move {
            let r = http()
                .get(gw_ref.url("/connections/shop"))
                .bearer_auth(operator_token("shop"))
                .send()
                .await
                .unwrap();
            r.json().await.unwrap()
        },
        |v: &Value| v.get("bob").is_none(),
    )
    .await;
    assert!(left.get("bob").is_none(), "{left}");
}

#[tokio::test]
async fn bad_configuration_stops_start_up_with_one_line_naming_it() {
    for (var, value) in [
        ("JWT_SECRET", ""),
        ("APP_PORT", "eighty"),
        ("PING_INTERVAL", "0"),
        ("REDIS_URL", "http://nope"),
    ] {
        let mut gw = Gateway::builder().process().env(var, value).spawn();
        let code = gw.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(78), "{var}={value:?}");
        let logs = gw.logs();
        assert_eq!(logs.trim().lines().count(), 1, "{logs}");
        assert!(logs.contains(var), "{logs}");
    }
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_logs() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .process()
        .redis(&redis)
        .env(
            "REDIS_URL",
            &format!("redis://:{}@127.0.0.1:{}", "redis-pass-9f3", redis.port),
        )
        .start()
        .await;
    let token = user_token("shop", "alice");
    let _ = http()
        .get(gw.url("/sse"))
        .query(&[("access_token", "bad.token.value")])
        .send()
        .await;
    let _ = SseClient::open(http().get(gw.url(&format!("/sse?access_token={token}")))).await;
    let _ = http()
        .get(gw.url("/connections/shop"))
        .bearer_auth(&token)
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = gw.logs();
    assert!(!logs.contains(SECRET), "JWT secret leaked");
    assert!(!logs.contains("redis-pass-9f3"), "Redis password leaked");
    assert!(!logs.contains(&token), "token leaked");
    assert!(!logs.contains("bad.token.value"), "token leaked");
    assert!(
        logs.contains("stream opened"),
        "debug logging was on: {logs}"
    );
}

#[tokio::test]
async fn production_logs_are_json_lines_naming_the_connection() {
    let gw = Gateway::builder()
        .process()
        .env("APP_MODE", "production")
        .start()
        .await;
    // The "stream opened" line is written before the response goes out.
    let c = gw.connect("shop", "alice").await;
    let id = c.connection_id();
    let logs = gw.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    let opened = lines
        .iter()
        .find(|l| l["message"] == "stream opened")
        .expect("a stream opened line");
    assert_eq!(
        (&opened["app"], &opened["user"], &opened["conn"]),
        (&json!("shop"), &json!("alice"), &json!(id))
    );
}

/// A raw HTTP/1 answer: its status and its body read as JSON (`Null` when it is not JSON).
fn status_and_json(resp: &str) -> (u16, Value) {
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Two different `Content-Length` values (RFC 9112 section 6.3) are a JSON 400 on the raw `/sse`
/// path and through hyper; equal repeated values are accepted on both, as hyper does.
#[tokio::test]
async fn differing_content_lengths_are_a_json_400_on_both_paths() {
    let gw = Gateway::builder().process().start().await;
    let token = user_token("shop", "alice");
    let publisher = publisher_token("shop");
    let body = r#"{"user":"alice","data":1}"#;
    for (path, request) in [
        (
            "raw /sse",
            format!(
                "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                 Content-Length: 0\r\nContent-Length: 5\r\n\r\n"
            ),
        ),
        (
            "hyper /publish",
            format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {publisher}\r\n\
                 Content-Length: {}\r\nContent-Length: 4\r\n\r\n{body}",
                body.len()
            ),
        ),
        (
            "hyper /health",
            "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\n"
                .into(),
        ),
        (
            "a list in one line",
            "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\n\r\n".into(),
        ),
    ] {
        let resp = raw_request(gw.port, request.as_bytes()).await;
        let (status, json) = status_and_json(&resp);
        assert_eq!(status, 400, "{path}: {resp}");
        assert_eq!(json["error"], "invalid_content_length", "{path}: {resp}");
        assert!(
            json["message"]
                .as_str()
                .unwrap_or_default()
                .contains("9112"),
            "{path}: {resp}"
        );
    }
    // Nothing was published by the refused request.
    let published = gw
        .metric("sse_publish_requests_total{app=\"shop\",outcome=\"ok\"}")
        .await;
    assert_eq!(published, None);

    // The same value twice is one length, as for hyper: the stream opens on the raw path.
    let resp = raw_request(
        gw.port,
        format!(
            "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("text/event-stream"), "{resp}");
    let resp = raw_request(
        gw.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // A later request of a kept-alive connection is read by hyper alone: still a 400, in hyper's
    // own words (an empty body), and the connection closes.
    let resp = raw_request(
        gw.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("HTTP/1.1 400"), "{resp}");
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, or any request with two, is a JSON 400
/// on the raw `/sse` path and through hyper (on every request of a kept-alive connection); HTTP/1.0
/// may leave it out, and HTTP/2 names its authority elsewhere.
#[tokio::test]
async fn a_missing_or_repeated_host_is_a_json_400_on_both_paths() {
    let gw = Gateway::builder().process().start().await;
    let token = user_token("shop", "alice");
    let sse = |host_lines: &str| {
        format!(
            "GET /sse HTTP/1.1\r\n{host_lines}Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
    };
    let health =
        |host_lines: &str| format!("GET /health HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n");
    for (case, request) in [
        ("raw /sse, no Host", sse("")),
        ("raw /sse, two Hosts", sse("Host: a\r\nHost: b\r\n")),
        (
            "raw /sse, the same Host twice",
            sse("Host: a\r\nHost: a\r\n"),
        ),
        ("raw /sse, user info in Host", sse("Host: u@a\r\n")),
        ("raw /sse, empty Host", sse("Host: \r\n")),
        ("hyper /health, no Host", health("")),
        ("hyper /health, two Hosts", health("Host: a\r\nhost: b\r\n")),
        ("hyper /health, not a host", health("Host: a/b\r\n")),
        (
            "hyper /publish, two Hosts",
            format!(
                "POST /publish HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer {}\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\n{{}}",
                publisher_token("shop")
            ),
        ),
        (
            "hyper, HTTP/1.0 with two Hosts",
            "GET /health HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n".into(),
        ),
    ] {
        let resp = raw_request(gw.port, request.as_bytes()).await;
        let (status, json) = status_and_json(&resp);
        assert_eq!(status, 400, "{case}: {resp}");
        assert_eq!(json["error"], "invalid_host", "{case}: {resp}");
    }
    // The second request of a kept-alive connection is hyper's alone, and refused the same way.
    let resp = raw_request(
        gw.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let second = &resp[resp.rfind("HTTP/1.1 400").unwrap_or(0)..];
    let (status, json) = status_and_json(second);
    assert_eq!(
        (status, &json["error"]),
        (400, &json!("invalid_host")),
        "{resp}"
    );

    // HTTP/1.0 without Host, a host with a port, and HTTP/2 (no Host header at all) are served.
    let resp = raw_request(gw.port, b"GET /health HTTP/1.0\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
        "{resp}"
    );
    let resp = raw_request(gw.port, health("Host: [::1]:8080\r\n").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    assert_eq!(
        h2.get(gw.url("/health")).send().await.unwrap().status(),
        200
    );
}

/// Reads from `s` until the response head and the stream's `retry:` hint have arrived.
async fn read_stream_start(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("retry:") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("stream start in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Writes `junk` in 64 KiB pieces until `total` bytes went, a write fails (the gateway closed the
/// stream) or a write waits longer than a second (nobody reads); returns the bytes written.
async fn send_junk(s: &mut tokio::net::TcpStream, total: usize) -> usize {
    let piece = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(1), s.write(&piece)).await {
            Ok(Ok(n)) if n > 0 => sent += n,
            _ => break,
        }
    }
    sent
}

/// An event stream is one-way: bytes a client sends on an open raw `/sse` stream end it at once,
/// for next to no CPU, and the other streams go on. (Before, they were read 64 bytes at a time
/// for as long as the client sent them.)
#[tokio::test]
async fn junk_on_an_open_stream_ends_it_and_costs_nothing() {
    let gw = Gateway::builder().process().start().await;
    let mut bob = gw.connect("shop", "bob").await;
    let mut junk = raw_sse_request(gw.port, "shop", "alice", None).await;
    let head = read_stream_start(&mut junk).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let open = gw.metric_reaches("sse_active_clients", 2.0).await;
    assert_eq!(open, Some(2.0));

    let cpu = gw.cpu_seconds();
    const JUNK: usize = 256 << 20;
    let sent = send_junk(&mut junk, JUNK).await;
    let used = gw.cpu_seconds() - cpu;
    assert!(sent < JUNK, "the gateway kept taking junk: {sent} bytes");
    assert!(
        used < 0.5,
        "{sent} bytes of junk cost {used:.2} s of gateway CPU"
    );
    // The stream is over: the socket reads its end (or a reset), not events.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the stream was not ended");
    let open = gw.metric_reaches("sse_active_clients", 1.0).await;
    assert_eq!(open, Some(1.0), "only bob's stream is left");

    // Everyone else is served as before.
    gw.publish("shop", json!({"user": "bob", "type": "still", "data": 1}))
        .await;
    assert_eq!(bob.next().await.event, "still");
    assert_eq!(
        http().get(gw.url("/health")).send().await.unwrap().status(),
        200
    );
}

/// A stream that hyper serves (here an HTTP/1.0 request) stops reading what its client sends: the
/// junk fills the socket buffers and then waits, costing no CPU, while events still flow.
#[tokio::test]
async fn junk_on_a_stream_served_by_hyper_is_never_read() {
    let gw = Gateway::builder().process().start().await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let req = format!(
        "GET /sse HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
        user_token("shop", "alice")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_stream_start(&mut s).await;
    assert!(head.contains(" 200 "), "{head}");

    let cpu = gw.cpu_seconds();
    let sent = send_junk(&mut s, 256 << 20).await;
    let used = gw.cpu_seconds() - cpu;
    assert!(sent < 64 << 20, "hyper kept reading: {sent} bytes");
    assert!(
        used < 0.5,
        "{sent} bytes of junk cost {used:.2} s of gateway CPU"
    );

    gw.publish("shop", json!({"user": "alice", "type": "after", "data": 1}))
        .await;
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("event: after") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the event in time")
            .expect("read");
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
