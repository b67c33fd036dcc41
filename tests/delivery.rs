//! Delivery through a real Redis: who receives what, exactly once, and what hostile payloads become.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(400);

async fn publish(
    redis: &fred::clients::Client,
    channel: &str,
    payload: impl Into<bytes::Bytes>,
) -> i64 {
    let payload: bytes::Bytes = payload.into();
    redis.publish(channel, payload).await.expect("PUBLISH")
}

#[tokio::test]
async fn each_connection_of_the_user_gets_each_message_once_and_nobody_else_does() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let mut tab1 = gw.connect("shop", "alice").await;
    let mut tab2 = gw.connect("shop", "alice").await;
    let mut bob = gw.connect("shop", "bob").await;
    let mut other_app = gw.connect("blog", "alice").await;

    // One subscription per user per instance, however many tabs.
    let receivers = publish(
        &r,
        "shop:channel:alice",
        r#"{"id":"100","type":"event","data":{"hello":"world"}}"#,
    )
    .await;
    assert_eq!(
        receivers, 1,
        "one Redis subscriber (this instance), not one per tab"
    );
    for tab in [&mut tab1, &mut tab2] {
        let ev = tab.next().await;
        assert_eq!(ev.id.as_deref(), Some("100"));
        assert_eq!(ev.event, "event");
        assert_eq!(ev.data, r#"{"hello":"world"}"#);
        assert!(
            tab.raw
                .ends_with("id: 100\nevent: event\ndata: {\"hello\":\"world\"}\n\n"),
            "{:?}",
            tab.raw
        );
    }
    for tab in [&mut tab1, &mut tab2, &mut bob, &mut other_app] {
        tab.expect_silence(QUIET).await;
    }
    // Closing one tab keeps the user's subscription for the other.
    drop(tab1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&r, "shop:channel:alice", r#"{"type":"t","data":1}"#).await;
    assert_eq!(tab2.next().await.data, "1");
}

#[tokio::test]
async fn broadcast_reaches_every_user_of_the_app_only() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let mut alice = gw.connect("shop", "alice").await;
    let mut bob = gw.connect("shop", "bob").await;
    let mut outsider = gw.connect("blog", "carol").await;

    publish(&r, "shop:broadcast", r#"{"type":"sale","data":{"pct":20}}"#).await;
    for c in [&mut alice, &mut bob] {
        let ev = c.next().await;
        assert_eq!((ev.event.as_str(), ev.json()), ("sale", json!({"pct": 20})));
    }
    outsider.expect_silence(QUIET).await;

    // The same over HTTP.
    let resp = gw
        .publish(
            "shop",
            json!({"broadcast": true, "type": "news", "data": "hi"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.json::<serde_json::Value>().await.unwrap();
    assert_eq!(
        (&body["published"], &body["subscribers"]),
        (&json!(1), &json!(1))
    );
    let id = body["ids"][0].as_str().expect("a durable id").to_string();
    for c in [&mut alice, &mut bob] {
        let ev = c.next().await;
        assert_eq!(
            (ev.data.as_str(), ev.id.as_deref()),
            ("\"hi\"", Some(id.as_str()))
        );
    }
    outsider.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_large_fan_out_reaches_every_stream_whole_and_in_order() {
    // Enough streams that the writer threads share the writing, and a burst that reaches the
    // gateway as batches: each stream must still see every event once, in publish order.
    const STREAMS: usize = 600;
    const EVENTS: usize = 30;
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let mut streams = Vec::with_capacity(STREAMS);
    let users: Vec<String> = (0..STREAMS).map(|i| format!("u{i}")).collect();
    for chunk in users.chunks(100) {
        let opened =
            futures_util::future::join_all(chunk.iter().map(|u| gw.connect("shop", u))).await;
        streams.extend(opened);
    }
    for i in 0..EVENTS {
        // Every third event to one user only: unicast and broadcast interleave in one burst.
        let (channel, data) = if i % 3 == 0 {
            ("shop:channel:u7".to_string(), format!("{i}"))
        } else {
            ("shop:broadcast".to_string(), format!("{i}"))
        };
        publish(&r, &channel, format!(r#"{{"type":"n","data":{data}}}"#)).await;
    }
    for (u, s) in streams.iter_mut().enumerate() {
        let want: Vec<String> = (0..EVENTS)
            .filter(|i| i % 3 != 0 || u == 7)
            .map(|i| i.to_string())
            .collect();
        let mut got = Vec::with_capacity(want.len());
        while got.len() < want.len() {
            got.push(s.next().await.data);
        }
        assert_eq!(got, want, "stream of u{u}");
    }
    streams[0].expect_silence(QUIET).await;
}

#[tokio::test]
async fn hostile_and_odd_payloads() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("MAX_MESSAGE_BYTES", "600000")
        .start()
        .await;
    let r = redis.client().await;
    let mut c = gw.connect("app", "u").await;
    let ch = "app:channel:u";

    // Not JSON at all: delivered as a message, one data line per input line (CR, LF and CRLF).
    let n = publish(&r, ch, "line one\nline two\r\nline three\rline four").await;
    assert_eq!(n, 1, "{}", gw.logs());
    let ev = c.next().await;
    assert_eq!(ev.event, "message");
    assert_eq!(ev.data, "line one\nline two\nline three\nline four");
    assert!(
        c.raw
            .contains("data: line one\ndata: line two\ndata: line three\ndata: line four\n\n")
    );

    // JSON that is not an envelope (the original dropped these silently).
    publish(&r, ch, r#"[1,2,3]"#).await;
    assert_eq!(c.next().await.data, "[1,2,3]");
    publish(
        &r,
        ch,
        r#"{"id":100,"type":"n","data":{"nested":{"x":[1,true,null]}}}"#,
    )
    .await;
    let ev = c.next().await;
    assert_eq!(ev.id.as_deref(), Some("100"));
    assert_eq!(ev.data, r#"{"nested":{"x":[1,true,null]}}"#);

    // CR/LF/NUL injection in id and type: no extra line, no extra event.
    let before = c.raw.len();
    publish(
        &r,
        ch,
        r#"{"id":"1\n\ndata: injected","type":"x\r\nevent: evil\u0000","data":{"ok":true}}"#,
    )
    .await;
    let ev = c.next().await;
    assert_eq!(ev.id.as_deref(), Some("1data: injected"));
    assert_eq!(ev.event, "xevent: evil");
    assert_eq!(ev.data, r#"{"ok":true}"#);
    let wire = &c.raw[before..];
    assert_eq!(
        wire.matches('\n').count(),
        4,
        "exactly id, event, data and the blank line: {wire:?}"
    );
    assert!(!wire.contains('\0') && !wire.contains('\r'));
    c.expect_silence(QUIET).await;
    assert!(
        gw.metric("sse_sanitised_fields_total")
            .await
            .unwrap_or_default()
            >= 1.0
    );

    // NUL and invalid UTF-8 in raw data never produce invalid UTF-8 on the wire.
    publish(&r, ch, b"a\0b\xffc".to_vec()).await;
    assert_eq!(c.next().await.data, "a\0b\u{fffd}c");

    // A big message under the limit arrives intact; one over the limit is not delivered, is counted,
    // and does not disturb the stream.
    let big = "x".repeat(500_000);
    publish(&r, ch, format!(r#"{{"type":"big","data":"{big}"}}"#)).await;
    let ev = c.next().await;
    assert_eq!(ev.event, "big");
    assert_eq!(ev.data.len(), big.len() + 2);
    publish(&r, ch, "y".repeat(700_000)).await;
    publish(&r, ch, r#"{"type":"after"}"#).await;
    assert_eq!(c.next().await.event, "after");
    let dropped = gw
        .metric("sse_messages_dropped_total{reason=\"too_large\"}")
        .await
        .unwrap_or_default();
    assert_eq!(dropped, 1.0);
}

#[tokio::test]
async fn subscription_is_live_before_the_headers_arrive() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    // Fresh users each time, so every connect makes a new Redis subscription.
    for i in 0..60 {
        let user = format!("fresh-{i}");
        let mut c = gw.connect("app", &user).await;
        // Published the instant the 200 is seen: the original lost these.
        let n = publish(
            &r,
            &format!("app:channel:{user}"),
            format!(r#"{{"type":"first","data":{i}}}"#),
        )
        .await;
        assert_eq!(n, 1, "subscribed before the response (iteration {i})");
        assert_eq!(c.next().await.data, i.to_string());
    }
}

/// A user's channel outlives its last stream by a grace, so that a client that comes back (as
/// EventSource does, or every client after a deploy) joins without a new subscription; what was
/// published meanwhile comes from history, once; after the grace the channel is let go.
#[tokio::test]
async fn a_channel_waits_for_a_returning_client_then_is_let_go() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let numsub = |channel: &'static str| {
        let r = r.clone();
        async move {
            let v: Vec<fred::types::Value> = r
                .custom(fred::cmd!("PUBSUB"), vec!["NUMSUB", channel])
                .await
                .expect("PUBSUB NUMSUB");
            v.get(1).and_then(|n| n.as_i64()).unwrap_or(-1)
        }
    };
    let mut alice = gw.connect("shop", "alice").await;
    let first = gw
        .publish_id("shop", json!({"user": "alice", "data": 1}))
        .await;
    assert_eq!(alice.next().await.id.as_deref(), Some(first.as_str()));
    drop(alice);
    eventually(Duration::from_secs(5), "the stream to close", || async {
        gw.metric("sse_active_clients").await == Some(0.0)
    })
    .await;
    assert_eq!(
        numsub("shop:channel:alice").await,
        1,
        "kept for a returning client"
    );
    // Published while she is away: reaches no stream now, and comes back from history.
    let missed = gw
        .publish_id("shop", json!({"user": "alice", "data": 2}))
        .await;
    let mut back = gw.resume("shop", "alice", &first).await;
    assert_eq!(back.next().await.id.as_deref(), Some(missed.as_str()));
    let live = gw
        .publish_id("shop", json!({"user": "alice", "data": 3}))
        .await;
    assert_eq!(back.next().await.id.as_deref(), Some(live.as_str()));
    back.expect_silence(QUIET).await;
    drop(back);
    // Nobody came back this time: the channel is let go once the grace (5 s) is over.
    eventually(
        Duration::from_secs(10),
        "the channel to be unsubscribed",
        || {
            let n = numsub("shop:channel:alice");
            async move { n.await == 0 }
        },
    )
    .await;
    assert_eq!(numsub("shop:broadcast").await, 0);
}

#[tokio::test]
async fn http_publish_to_users_and_batches_with_clear_errors() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("MAX_PUBLISH_BODY_BYTES", "10000")
        .start()
        .await;
    let mut a = gw.connect("app", "a").await;
    let mut b = gw.connect("app", "b").await;

    // Durable (the default): the gateway assigns the id.
    let resp = gw
        .publish("app", json!({"user": "a", "type": "t", "data": {"k": "v"}}))
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.json::<serde_json::Value>().await.unwrap();
    let id = body["ids"][0].as_str().unwrap().to_string();
    assert!(
        id.bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'-')
            && id.len() <= 64,
        "{id}"
    );
    let ev = a.next().await;
    assert_eq!(
        (ev.id.as_deref(), ev.event.as_str(), ev.json()),
        (Some(id.as_str()), "t", json!({"k": "v"}))
    );
    b.expect_silence(QUIET).await;
    // Fire-and-forget, with the publisher's own id.
    let resp = gw
        .publish(
            "app",
            json!({"user": "a", "type": "t", "id": "x1", "durable": false, "data": 2}),
        )
        .await;
    let body = resp.json::<serde_json::Value>().await.unwrap();
    assert_eq!(body, json!({"published": 1, "subscribers": 1}));
    let ev = a.next().await;
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some("x1"), "2"));

    let resp = gw
        .publish(
            "app",
            json!({"users": ["a", "b", "nobody"], "type": "batch", "data": 1}),
        )
        .await;
    let body = resp.json::<serde_json::Value>().await.unwrap();
    assert_eq!(
        (&body["published"], &body["subscribers"]),
        (&json!(3), &json!(2))
    );
    assert_eq!(body["ids"].as_array().unwrap().len(), 3);
    assert_eq!(a.next().await.event, "batch");
    assert_eq!(b.next().await.event, "batch");

    // A token of another app publishes to that app's channels only.
    let resp = gw.publish("other", json!({"user": "a", "data": 1})).await;
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["subscribers"],
        0
    );
    a.expect_silence(QUIET).await;

    let bad = [
        (json!({"data": 1}), "invalid_target"),
        (json!({"user": "a", "users": ["b"]}), "invalid_target"),
        (json!({"users": []}), "invalid_target"),
        (json!({"user": "a:b"}), "invalid_user"),
        (json!({"user": "a", "type": "x\ny"}), "invalid_field"),
        (
            json!({"user": "a", "id": "1\r", "durable": false}),
            "invalid_field",
        ),
        (json!({"user": "a", "id": "mine"}), "invalid_field"),
        (json!({"user": "a", "colour": "red"}), "invalid_json"),
        (json!({"user": 5}), "invalid_json"),
    ];
    for (body, code) in bad {
        let resp = gw.publish("app", body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_eq!(
            resp.json::<serde_json::Value>().await.unwrap()["error"],
            code,
            "{body}"
        );
    }
    let resp = http()
        .post(gw.url("/publish"))
        .bearer_auth(publisher_token("app"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let huge = json!({"user": "a", "data": "z".repeat(20_000)});
    let resp = gw.publish("app", huge).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"],
        "body_too_large"
    );
    // Without a Content-Length (chunked), the limit still holds (11 KB: small enough to be sent
    // whole before the 413 comes back).
    let chunks =
        futures_util::stream::iter((0..11).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
    let resp = http()
        .post(gw.url("/publish"))
        .bearer_auth(publisher_token("app"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // An oversized body is answered 413 every time, not a broken pipe: the gateway reads (and
    // discards) a bounded amount of the rest before answering.
    for _ in 0..10 {
        let resp = http()
            .post(gw.url("/publish"))
            .bearer_auth(publisher_token("app"))
            .body(vec![b' '; 50_000])
            .send()
            .await
            .expect("an answer, not a broken pipe");
        assert_eq!(resp.status(), 413);
    }

    // A browser token cannot publish.
    let resp = http()
        .post(gw.url("/publish"))
        .bearer_auth(user_token("app", "a"))
        .json(&json!({"user": "b", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"],
        "publisher_role_required"
    );
    b.expect_silence(QUIET).await;
}

#[tokio::test]
async fn pings_keep_the_stream_alive_without_touching_last_event_id() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("PING_INTERVAL", "300ms")
        .start()
        .await;
    let mut c = gw.connect("app", "u").await;
    let ev = c.next_within(Duration::from_secs(2)).await.expect("a ping");
    assert_eq!(ev.event, "ping");
    assert_eq!(ev.id, None, "pings carry no id");
    assert!(c.raw.starts_with("retry: 3000\n\n"), "{:?}", c.raw);
}
