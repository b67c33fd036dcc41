//! Faults: Redis going away and coming back, clients that vanish, clients that stop reading.
//! Every loop here is bounded in count and time, and all traffic stays on loopback.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::PubsubInterface;
use serde_json::{Value, json};

async fn redis_keys(r: &RedisServer) -> Vec<String> {
    registry_keys(&r.client().await).await
}

async fn ready(gw: &Gateway) -> (u16, Value) {
    let r = http().get(gw.url("/ready")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_stream() {
    let mut redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("REGISTRY_TTL", "30")
        .start()
        .await;
    let mut alice = gw.connect("shop", "alice").await;
    let mut bob = gw.connect("shop", "bob").await;
    let alice_id = alice.connection_id();
    assert_eq!(ready(&gw).await.0, 200);

    redis.kill();
    let gw_ref = &gw;
    let down = poll_until(move || ready(gw_ref), |r| r.0 == 503).await;
    assert_eq!(down.0, 503, "readiness reports the lost link: {}", down.1);
    assert_eq!(down.1["status"], "unavailable");
    assert_eq!(
        http().get(gw.url("/health")).send().await.unwrap().status(),
        200,
        "liveness stays green"
    );

    // While Redis is away: open streams stay open; publishing says why it cannot; a new stream is
    // told to retry (200 + retry:, never a status that would stop EventSource for good).
    let resp = gw
        .publish("shop", json!({"user": "alice", "data": 1}))
        .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "broker_unavailable"
    );
    let mut refused = gw.open(&user_token("shop", "carol")).await;
    assert_eq!(refused.status, 200);
    refused.until_end(Duration::from_secs(10)).await;
    assert!(refused.raw.starts_with("retry: "), "{:?}", refused.raw);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis comes back empty: subscriptions and registry entries return without anyone acting.
    redis.restart();
    for _ in 0..200 {
        if ready(&gw).await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready(&gw).await.0, 200, "{}", gw.logs());
    let r = redis.client().await;
    let r_ref = &r;
    let receivers = poll_until(
        move || async move {
            r_ref
                .publish::<i64, _, _>("shop:channel:alice", r#"{"type":"back","data":1}"#)
                .await
                .unwrap()
        },
        |n| *n == 1,
    )
    .await;
    assert_eq!(receivers, 1, "subscription restored");
    // Redis lost its data, and with it the history the streams stood in: they are told so.
    for stream in [&mut alice, &mut bob] {
        let ev = stream.next().await;
        assert_eq!(
            (ev.event.as_str(), ev.json()["reason"].as_str()),
            ("reset", Some("history_lost"))
        );
    }
    assert_eq!(alice.next().await.event, "back");
    r.publish::<i64, _, _>("shop:broadcast", r#"{"type":"all"}"#)
        .await
        .unwrap();
    assert_eq!(alice.next().await.event, "all");
    assert_eq!(bob.next().await.event, "all");

    let redis_ref = &redis;
    let keys = poll_until(
        move || redis_keys(redis_ref),
        |keys| keys.iter().any(|k| k.ends_with(&alice_id)) && keys.len() == 5,
    )
    .await;
    assert!(
        keys.contains(&format!("shop:client:alice:{alice_id}")),
        "registry restored: {keys:?}"
    );
    assert_eq!(
        keys.len(),
        5,
        "two entries, two user indexes, one app index: {keys:?}"
    );
    assert!(
        gw.metric("sse_broker_reconnects_total")
            .await
            .unwrap_or_default()
            >= 1.0
    );
}

#[tokio::test]
async fn a_client_that_vanishes_is_cleaned_up() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    // Raw socket, so the test can drop it without any HTTP goodbye.
    let s = raw_sse_request(gw.port, "shop", "ghost", None).await;
    let redis_ref = &redis;
    let keys = poll_until(move || redis_keys(redis_ref), |k| k.len() == 3).await;
    assert_eq!(keys.len(), 3);
    // The registry entry is written at admission, before the stream is attached and counted:
    // this test never reads the response, so it waits for the count too.
    let active = gw.metric_reaches("sse_active_clients", 1.0).await;
    assert_eq!(active, Some(1.0));
    drop(s);
    let keys = poll_until(move || redis_keys(redis_ref), |k| k.is_empty()).await;
    assert_eq!(keys, Vec::<String>::new());
    assert_eq!(
        gw.metric_reaches("sse_active_clients", 0.0).await,
        Some(0.0)
    );
    let closed = gw
        .metric("sse_connections_closed_total{app=\"shop\",reason=\"client_gone\"}")
        .await;
    assert_eq!(closed, Some(1.0));
    // The Redis subscription goes with the last stream, once its grace (5 s) is over.
    let r = redis.client().await;
    eventually(
        Duration::from_secs(10),
        "the channel to be unsubscribed",
        || async {
            r.publish::<i64, _, _>("shop:channel:ghost", "x")
                .await
                .unwrap()
                == 0
        },
    )
    .await;
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_while_fast_readers_get_everything() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .process()
        .redis(&redis)
        .env("CLIENT_QUEUE", "64")
        .start()
        .await;
    let mut fast = gw.connect("shop", "fast").await;
    // The slow client sends its request and never reads; a small receive buffer makes it fill sooner.
    let slow = raw_sse_request(gw.port, "shop", "slow", Some(4096)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Broadcast 300 messages of 16 KiB (4.7 MiB): more than the slow socket's kernel buffers (about
    // 1.6 MiB here, even with its small receive buffer) plus its 64-message queue (1 MiB), paced so
    // that a reader that does read keeps up even in a debug build sharing two cores with the
    // gateway and Redis.
    let blob = "b".repeat(16 * 1024);
    let total = 300;
    let r = redis.client().await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < total {
            let ev = fast.next().await;
            got.push(ev.id.unwrap_or_default());
        }
        got
    });
    for i in 0..total {
        let payload = format!(r#"{{"id":"{i}","type":"bulk","data":"{blob}"}}"#);
        r.publish::<i64, _, _>("shop:broadcast", payload)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("fast reader kept up");
    let got = got.unwrap_or_else(|e| {
        let logs = gw.logs();
        let cuts: Vec<&str> = logs.lines().filter(|l| l.contains("cut off")).collect();
        panic!("{e}\n{}", cuts.join("\n"))
    });
    let want: Vec<String> = (0..total).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "the fast reader saw every message, in order");

    let cut = gw
        .metric_reaches("sse_slow_clients_disconnected_total{app=\"shop\"}", 1.0)
        .await;
    assert_eq!(cut, Some(1.0), "the slow reader was cut off");
    assert!(
        gw.metric("sse_dropped_message_total{app=\"shop\"}")
            .await
            .unwrap_or_default()
            >= 1.0
    );
    let logs = gw.logs();
    assert_eq!(logs.matches("stream cut off").count(), 1, "logged once");
    drop(slow);
}

/// Decodes the complete chunks at the start of an HTTP/1.1 chunked body.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16)
            .expect("a chunk-size line");
        let start = eol + 2;
        if rest.len() < start + size + 2 {
            break; // the rest of this chunk has not arrived yet
        }
        assert_eq!(
            &rest[start + size..start + size + 2],
            b"\r\n",
            "chunk ends in CRLF"
        );
        out.extend_from_slice(&rest[start..start + size]);
        rest = &rest[start + size + 2..];
    }
    out
}

#[tokio::test]
async fn a_reader_that_falls_far_behind_then_catches_up_gets_every_byte_in_order() {
    use tokio::io::AsyncReadExt;
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("CLIENT_QUEUE", "100000")
        .env("CLIENT_QUEUE_BYTES", "67108864")
        .start()
        .await;
    // A client with a small receive buffer that stops reading after its request: the gateway's
    // writes fill the socket, stop in the middle of an event, and must resume exactly there.
    let mut client = raw_sse_request(gw.port, "shop", "lagging", Some(4096)).await;
    let mut raw = Vec::new();
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "head expected");
        raw.extend_from_slice(&buf[..n]);
    }
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let mut body = raw.split_off(head_end);

    // 12 MiB of events (more than the kernel's buffers for this socket), each of a size that does
    // not divide the buffers, published while the client reads nothing.
    let total = 400;
    let r = redis.client().await;
    for i in 0..total {
        let blob = "x".repeat(30_000 + i);
        let payload = format!(r#"{{"id":"{i}","type":"bulk","data":"{blob}"}}"#);
        r.publish::<i64, _, _>("shop:channel:lagging", payload)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Now read everything: every event whole and in order (a keep-alive ping may fall anywhere).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 256 * 1024];
    // Decoding is only worth trying once at least the events' own bytes are in.
    let least: usize = (0..total)
        .map(|i| {
            format!(
                "id: {i}\nevent: bulk\ndata: \"{}\"\n\n",
                "x".repeat(30_000 + i)
            )
            .len()
        })
        .sum();
    let events: Vec<String> = loop {
        let text = if body.len() < least {
            String::new()
        } else {
            String::from_utf8(dechunk(&body)).unwrap()
        };
        let events: Vec<String> = text
            .split_terminator("\n\n")
            .filter(|e| *e != "event: ping\ndata: null")
            .map(String::from)
            .collect();
        // The first event is the `retry:` hint, then the 400; the last one must be complete.
        if events.len() > total && text.ends_with("\n\n") {
            break events;
        }
        let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
            .await
            .expect("the rest arrives")
            .unwrap();
        assert!(n > 0, "the stream must not end");
        body.extend_from_slice(&buf[..n]);
    };
    assert_eq!(events.len(), total + 1);
    assert!(events[0].starts_with("retry: "));
    for (i, ev) in events[1..].iter().enumerate() {
        let want = format!("id: {i}\nevent: bulk\ndata: \"{}\"", "x".repeat(30_000 + i));
        assert!(*ev == want, "event {i} is whole and in order");
    }
    assert_eq!(
        gw.metric("sse_slow_clients_disconnected_total")
            .await
            .unwrap_or_default(),
        0.0,
        "within its limits, a slow reader is waited for"
    );
}

/// A client that vanishes while its stream is ending (here shutdown's farewell, queued behind
/// events its full socket held back): the stream ends at once and the gateway exits. It used to
/// retry the stream's socket for ever inside one poll, holding a runtime thread, so that the
/// gateway never exited.
#[tokio::test]
async fn a_client_gone_while_its_stream_ends_never_holds_the_gateway() {
    let redis = RedisServer::start();
    let mut gw = Gateway::builder()
        .process()
        .redis(&redis)
        .env("SHUTDOWN_TIMEOUT", "60")
        .start()
        .await;
    let client = raw_sse_request(gw.port, "shop", "leaving", Some(4096)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 3.5 MiB: more than the socket's buffers take (about 1.6 MiB), less than they and the
    // stream's queue (4 MiB) hold together.
    let blob = "b".repeat(64 * 1024);
    for _ in 0..56 {
        let resp = gw
            .publish("shop", json!({"user": "leaving", "data": blob}))
            .await;
        assert!(resp.status().is_success());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Unread data: the close is a reset.
    drop(client);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_gateway_whose_runtime_is_gone_lets_go_of_its_port() {
    // Accepting runs on a thread of its own: a runtime shut down without the graceful stop (as
    // when an embedding program drops it) must stop that thread too, or the port stays taken.
    let port = free_port();
    let mut gw = Gateway::builder().port(port).start().await;
    let health = http().get(gw.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    gw.kill();
    eventually(Duration::from_secs(5), "the port is free again", || async {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
    .await;
}
