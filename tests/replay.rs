//! No silent loss: durable ids, replay after a disconnect (same or another instance), resets when a
//! gap cannot be filled, the Redis Function publish path, token expiry and connection limits.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::Value as RedisValue;
use serde_json::{Value, json};

/// Reads `n` events, returning (id, data) pairs.
async fn take(c: &mut SseClient, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ev = c.next().await;
        out.push((ev.id.unwrap_or_default(), ev.data));
    }
    out
}

async fn replay_scenario(first: &Gateway, second: &Gateway) {
    let mut alice = first.connect("shop", "alice").await;
    let a1 = first
        .publish_id("shop", json!({"user": "alice", "type": "t", "data": "a1"}))
        .await;
    let b1 = first
        .publish_id(
            "shop",
            json!({"broadcast": true, "type": "t", "data": "b1"}),
        )
        .await;
    let seen = take(&mut alice, 2).await;
    assert_eq!(
        seen,
        vec![(a1, "\"a1\"".into()), (b1.clone(), "\"b1\"".into())]
    );
    drop(alice);

    // Missed while away: own events and broadcasts interleaved, plus noise for someone else.
    let mut missed = Vec::new();
    for (i, body) in [
        json!({"user": "alice", "type": "t", "data": "a2"}),
        json!({"broadcast": true, "type": "t", "data": "b2"}),
        json!({"user": "bob", "type": "t", "data": "not for alice"}),
        json!({"user": "alice", "type": "t", "data": "a3"}),
    ]
    .into_iter()
    .enumerate()
    {
        // Alternate the instance that publishes: history is shared.
        let gw = if i % 2 == 0 { first } else { second };
        let id = gw.publish_id("shop", body.clone()).await;
        if body["user"] != "bob" {
            missed.push((id, body["data"].to_string()));
        }
    }

    let mut back = second.resume("shop", "alice", &b1).await;
    assert_eq!(
        take(&mut back, 3).await,
        missed,
        "exactly what was missed, in order"
    );
    let live = first
        .publish_id(
            "shop",
            json!({"user": "alice", "type": "t", "data": "live"}),
        )
        .await;
    assert_eq!(take(&mut back, 1).await, vec![(live, "\"live\"".into())]);
    back.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn replay_after_disconnect_on_the_same_instance() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    replay_scenario(&gw, &gw).await;
}

#[tokio::test]
async fn replay_after_disconnect_on_another_instance() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis).await;
    let b = Gateway::with_redis(&redis).await;
    replay_scenario(&a, &b).await;
}

#[tokio::test]
async fn replay_in_embedded_mode() {
    let gw = Gateway::embedded().await;
    replay_scenario(&gw, &gw).await;
}

/// A publisher sends numbered events without pause while the client disconnects and resumes on
/// alternating instances: the client must see every number exactly once, in order.
#[tokio::test]
async fn streams_resuming_together_share_history_reads() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let gw = Gateway::with_redis(&redis).await;
    let start = gw
        .publish_id("shop", json!({"broadcast": true, "data": "b0"}))
        .await;
    let own = gw
        .publish_id("shop", json!({"user": "u0", "data": "mine"}))
        .await;
    let b1 = gw
        .publish_id("shop", json!({"broadcast": true, "data": "b1"}))
        .await;
    let reads_before = gw
        .metric("sse_replay_reads_total")
        .await
        .unwrap_or_default();

    // Redis stops answering for a moment, as when thousands of clients come back after a deploy:
    // every stream asks for history at about the same time, and a handful of reads serve them all.
    let r = redis.client().await;
    let asleep = tokio::spawn(async move {
        let _: RedisValue = r
            .custom(fred::cmd!("DEBUG"), vec!["SLEEP", "1"])
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    const STREAMS: usize = 40;
    let users: Vec<String> = (0..STREAMS).map(|i| format!("u{i}")).collect();
    let streams =
        futures_util::future::join_all(users.iter().map(|u| gw.resume("shop", u, &start))).await;
    asleep.await.unwrap();

    for (i, mut s) in streams.into_iter().enumerate() {
        let mut want = vec![(b1.clone(), "\"b1\"".to_string())];
        if i == 0 {
            want.insert(0, (own.clone(), "\"mine\"".into()));
        }
        assert_eq!(take(&mut s, want.len()).await, want, "stream of u{i}");
    }
    let reads = gw.metric("sse_replay_reads_total").await.unwrap() - reads_before;
    assert!(
        (1.0..=(STREAMS / 4) as f64).contains(&reads),
        "{STREAMS} streams resumed with {reads} history reads"
    );
    assert_eq!(
        gw.metric("sse_replayed_events_total").await,
        Some(STREAMS as f64 + 1.0)
    );
}

#[tokio::test]
async fn no_gap_and_no_duplicate_at_the_switch_over_under_concurrent_publishing() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis).await;
    let b = Gateway::with_redis(&redis).await;
    let total = 400u64;
    let mut client = a.connect("shop", "alice").await;

    let publisher = {
        let url = b.url("/publish");
        tokio::spawn(async move {
            let c = http();
            for n in 0..total {
                // Half to alice, half broadcast: both must interleave correctly on replay.
                let body = if n % 2 == 0 {
                    json!({"user": "alice", "type": "n", "data": n})
                } else {
                    json!({"broadcast": true, "type": "n", "data": n})
                };
                let r = c
                    .post(&url)
                    .bearer_auth(publisher_token("shop"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };

    let mut seen: Vec<u64> = Vec::new();
    let mut last_id;
    let mut hops = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (seen.len() as u64) < total {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled at {}",
            seen.len()
        );
        let ev = client.next().await;
        seen.push(ev.data.parse().unwrap());
        last_id = ev.id.unwrap();
        // Every 37 events: drop the connection and resume on the other instance.
        if seen.len().is_multiple_of(37) && (seen.len() as u64) < total {
            drop(client);
            hops += 1;
            let gw = if hops % 2 == 0 { &a } else { &b };
            client = gw.resume("shop", "alice", &last_id).await;
        }
    }
    publisher.await.unwrap();
    let want: Vec<u64> = (0..total).collect();
    if let Some(i) = seen.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "first difference at {i}: saw {:?}, wanted {:?} ({hops} resumptions)",
            &seen[i.saturating_sub(3)..(i + 5).min(seen.len())],
            &want[i.saturating_sub(3)..(i + 5).min(want.len())]
        );
    }
    assert_eq!(
        seen, want,
        "every event exactly once, in order, across {hops} resumptions"
    );
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn ids_too_old_or_unknown_get_a_reset_event() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("HISTORY_MAXLEN", "5")
        .start()
        .await;
    let first = gw
        .publish_id("shop", json!({"user": "alice", "data": 0}))
        .await;
    let mut newest = String::new();
    for n in 1..200 {
        newest = gw
            .publish_id("shop", json!({"user": "alice", "data": n}))
            .await;
    }
    // Trimmed past the client's id: the gap cannot be filled, and the stream says so.
    let mut c = gw.resume("shop", "alice", &first).await;
    let ev = c.next().await;
    assert_eq!(ev.event, "reset");
    assert_eq!(ev.json()["reason"], "too_old");
    assert_eq!(ev.json()["last_event_id"], first.as_str());
    assert_eq!(
        ev.id.as_deref(),
        Some(newest.as_str()),
        "moves the client to the present"
    );
    // Then live delivery continues.
    let live = gw
        .publish_id("shop", json!({"user": "alice", "data": "live"}))
        .await;
    let ev = c.next().await;
    assert_eq!(
        (ev.id.as_deref(), ev.data.as_str()),
        (Some(live.as_str()), "\"live\"")
    );

    // Unknown ids: not ours, from the future (in this history), and (query form) from another
    // application, whose history is another one.
    let epoch = newest.rsplit('-').next().unwrap();
    let future = format!("99999999999999-0-{epoch}");
    for bad in [
        "garbage",
        "99999999999999-0",
        "1:2",
        &"9".repeat(200),
        &future,
    ] {
        let mut c = gw.resume("shop", "alice", bad).await;
        let ev = c.next().await;
        assert_eq!(
            (ev.event.as_str(), ev.json()["reason"].as_str()),
            ("reset", Some("unknown_id")),
            "{bad}"
        );
    }
    let mut c = SseClient::open(gw.sse().query(&[
        ("access_token", user_token("blog", "alice")),
        ("last_event_id", newest.clone()),
    ]))
    .await;
    let ev = c.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.json()["reason"].as_str()),
        ("reset", Some("history_lost"))
    );
    assert!(
        gw.metric("sse_replay_resets_total{app=\"shop\",reason=\"too_old\"}")
            .await
            >= Some(1.0)
    );

    // A recent id with nothing missed: no reset, nothing replayed.
    let mut c = gw.resume("shop", "alice", &live).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn history_survives_a_reconnect_but_an_emptied_redis_means_reset() {
    let mut redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let id = gw
        .publish_id("shop", json!({"user": "alice", "data": 1}))
        .await;
    redis.restart(); // no persistence: history, and the functions, are gone
    let gw_ref = &gw;
    let status = poll_until(
        move || async move {
            http()
                .get(gw_ref.url("/ready"))
                .send()
                .await
                .unwrap()
                .status()
        },
        |s| *s == 200,
    )
    .await;
    assert_eq!(status, 200);
    let mut c = gw.resume("shop", "alice", &id).await;
    let ev = c.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.json()["reason"].as_str()),
        ("reset", Some("history_lost"))
    );
    // Durable publishing works again (the library is reloaded on demand).
    let again = gw
        .publish_id("shop", json!({"user": "alice", "data": 2}))
        .await;
    assert_eq!(c.next().await.id.as_deref(), Some(again.as_str()));
}

#[tokio::test]
async fn backends_publish_durably_with_the_redis_function() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let mut alice = gw.connect("shop", "alice").await;
    let answer: Vec<RedisValue> = r
        .custom(
            fred::cmd!("FCALL"),
            vec![
                "sse_publish",
                "0",
                "shop",
                "alice",
                r#"{"type":"order","data":{"n":1}}"#,
            ],
        )
        .await
        .unwrap();
    let id = answer[0].as_string().unwrap();
    assert_eq!(answer[1].as_i64(), Some(1), "one subscriber");
    let ev = alice.next().await;
    assert_eq!(
        (ev.id.as_deref(), ev.event.as_str()),
        (Some(id.as_str()), "order")
    );
    // Broadcast form.
    let answer: Vec<RedisValue> = r
        .custom(
            fred::cmd!("FCALL"),
            vec!["sse_publish", "0", "shop", "", r#"{"type":"all"}"#],
        )
        .await
        .unwrap();
    assert_eq!(alice.next().await.id, answer[0].as_string());
    // Bad input is refused by the function itself, with a clear error.
    for (user, payload) in [("alice", "not json"), ("a:b", "{}"), ("alice", "[1]")] {
        let err = r
            .custom::<RedisValue, _>(
                fred::cmd!("FCALL"),
                vec!["sse_publish", "0", "shop", user, payload],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("sse_publish"), "{err}");
    }
    // Plain PUBLISH keeps working, without history: it is not replayed. (To bob, who has no
    // stream: a channel stays subscribed for a grace after its last stream, for a client that
    // comes back, and a message on it could meet alice's new stream.)
    drop(alice);
    let n: i64 = r
        .publish("shop:channel:bob", r#"{"type":"plain"}"#)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let mut back = gw.resume("shop", "bob", &id).await;
    let ev = back.next().await;
    assert_eq!(ev.event, "all", "the durable broadcast is replayed");
    back.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn batch_publish_is_durable_for_every_user() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let start = gw
        .publish_id("shop", json!({"broadcast": true, "data": "start"}))
        .await;
    let r = gw
        .publish(
            "shop",
            json!({"users": ["a", "b", "c"], "type": "batch", "data": 7}),
        )
        .await;
    let ids: Vec<String> = r.json::<Value>().await.unwrap()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    for (user, id) in ["a", "b", "c"].iter().zip(&ids) {
        let mut c = gw.resume("shop", user, &start).await;
        let ev = c.next().await;
        assert_eq!(
            (ev.id.as_deref(), ev.event.as_str()),
            (Some(id.as_str()), "batch")
        );
        c.expect_silence(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let gw = Gateway::embedded().await;
    let exp = now() + 2;
    let token = sign(&json!({"iss": "shop", "sub": "alice", "exp": exp}));
    let mut c = gw.open(&token).await;
    assert_eq!(c.status, 200);
    let started = std::time::Instant::now();
    let events = c.until_end(Duration::from_secs(6)).await;
    let last = events.last().expect("a token_expired event");
    assert_eq!(last.event, "token_expired");
    assert_eq!(last.json()["exp"], exp);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Counted when the stream is removed, which may come just after its last bytes.
    let closed = poll_until(
        || gw.metric("sse_connections_closed_total{app=\"shop\",reason=\"token_expired\"}"),
        |v| v.is_some(),
    )
    .await;
    assert_eq!(closed, Some(1.0));
}

#[tokio::test]
async fn connection_limits_and_their_policies() {
    let redis = RedisServer::start();
    let a = Gateway::builder()
        .redis(&redis)
        .env("MAX_CONNECTIONS", "3")
        .env("MAX_USER_CONNECTIONS", "2")
        .env("MAX_APP_CONNECTIONS", "4")
        .env("RETRY_MS", "1000")
        .start()
        .await;
    let b = Gateway::builder()
        .redis(&redis)
        .env("MAX_USER_CONNECTIONS", "2")
        .env("MAX_APP_CONNECTIONS", "4")
        .start()
        .await;

    // Per user, across the cluster: a third tab (on another instance) gets 429.
    let _t1 = a.connect("shop", "alice").await;
    let _t2 = b.connect("shop", "alice").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // registry writes are asynchronous
    let r = http()
        .get(a.url("/sse"))
        .bearer_auth(user_token("shop", "alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "too_many_connections"
    );

    // Per instance: the fourth stream on `a` is shed with 200 + a long retry, and closed.
    let _c1 = a.connect("shop", "u1").await;
    let _c2 = a.connect("blog", "u2").await;
    let mut shed = a.open(&user_token("blog", "u3")).await;
    assert_eq!(shed.status, 200);
    shed.until_end(Duration::from_secs(5)).await;
    assert!(shed.raw.starts_with("retry: 10000\n"), "{:?}", shed.raw);
    assert!(
        a.metric("sse_limit_rejections_total{app=\"blog\",reason=\"instance\"}")
            .await
            == Some(1.0)
    );

    // Per application, across the cluster: shop has 3 streams; a fourth fits, a fifth is shed.
    let _c3 = b.connect("shop", "u4").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut shed = b.open(&user_token("shop", "u5")).await;
    assert_eq!(shed.status, 200);
    shed.until_end(Duration::from_secs(5)).await;
    assert!(shed.raw.starts_with("retry: 30000\n"), "{:?}", shed.raw);
    assert!(
        b.metric("sse_limit_rejections_total{app=\"shop\",reason=\"application\"}")
            .await
            == Some(1.0)
    );
}

#[tokio::test]
async fn a_history_that_expired_and_was_recreated_is_never_a_silent_gap() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("HISTORY_TTL", "2")
        .start()
        .await;
    let seen = gw
        .publish_id("shop", json!({"user": "alice", "data": "seen"}))
        .await;
    // Missed by the client, then gone with alice's history when it expires.
    gw.publish_id("shop", json!({"user": "alice", "data": "lost"}))
        .await;
    let redis_client = redis.client().await;
    let r = &redis_client;
    eventually(
        Duration::from_secs(5),
        "alice's history expired",
        || async move {
            let n: i64 = r
                .custom(fred::cmd!("EXISTS"), vec!["shop:history:user:alice"])
                .await
                .unwrap();
            n == 0
        },
    )
    .await;
    // Both streams are written again: the application's broadcasts, and alice's own.
    gw.publish_id("shop", json!({"broadcast": true, "data": "broadcast"}))
        .await;
    gw.publish_id("shop", json!({"user": "alice", "data": "fresh"}))
        .await;
    let mut c = gw.resume("shop", "alice", &seen).await;
    let ev = c.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.json()["reason"].as_str()),
        ("reset", Some("too_old")),
        "\"lost\" cannot be replayed, and the stream says so: {ev:?}"
    );
}
