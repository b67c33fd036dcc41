//! Open streams after a lost Redis link: they catch up from history before live delivery goes on,
//! and when history was lost (no persistence, rolled back) they are told with a `reset`. Every
//! test runs real `redis-server` processes it kills, restarts and pauses; all on loopback, every
//! loop bounded.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::Value as RedisValue;
use serde_json::Value;

/// `FCALL sse_publish` for `user` of `shop` on a fresh connection, retried (Redis may be coming
/// back) for up to 5 s; the event's id.
async fn fcall_publish(redis: &RedisServer, user: &str, n: u64) -> String {
    let payload = format!(r#"{{"type":"t","data":{{"n":{n}}}}}"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = async {
            let c = redis.client().await;
            let answer: Vec<RedisValue> = c
                .custom(
                    fred::cmd!("FCALL"),
                    vec!["sse_publish", "0", "shop", user, payload.as_str()],
                )
                .await?;
            let _ = c.quit().await;
            Ok::<_, fred::error::Error>(answer[0].as_string().unwrap_or_default())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(id)) => return id,
            other => assert!(
                std::time::Instant::now() < deadline,
                "FCALL sse_publish never succeeded: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `n` of the next `count` events that are not pings, with their ids.
async fn take(c: &mut SseClient, count: usize) -> Vec<(String, Event)> {
    let mut out = Vec::new();
    while out.len() < count {
        let ev = c.next().await;
        out.push((ev.id.clone().unwrap_or_default(), ev));
    }
    out
}

fn ns(events: &[(String, Event)]) -> Vec<u64> {
    events
        .iter()
        .filter(|(_, e)| e.event == "t")
        .map(|(_, e)| e.json()["n"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn open_streams_get_what_was_published_while_redis_restarted_with_persistence() {
    let mut redis = RedisServer::start_persistent();
    let gw = Gateway::builder().redis(&redis).start().await;
    let mut alice = gw.connect("shop", "alice").await;
    fcall_publish(&redis, "alice", 0).await;
    assert_eq!(ns(&take(&mut alice, 1).await), [0]);

    // Redis goes away and comes back with its data; events are published at once, before the
    // gateway has its subscriptions back (it reconnects within about a second).
    redis.kill();
    redis.restart();
    for n in 1..=20 {
        fcall_publish(&redis, "alice", n).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = take(&mut alice, 20).await;
    assert_eq!(
        ns(&got),
        (1..=20).collect::<Vec<_>>(),
        "every event exactly once, in order, no reset: {:?}",
        got.iter().map(|(_, e)| &e.event).collect::<Vec<_>>()
    );
    alice.expect_silence(Duration::from_millis(300)).await;
    let resyncs = gw.metric("sse_resyncs_total").await.unwrap_or(0.0);
    assert!(resyncs >= 1.0, "the re-sync is counted: {resyncs}");
}

#[tokio::test]
async fn any_drop_of_the_subscriber_link_is_caught_up_under_load() {
    let redis = RedisServer::start();
    let gw = Gateway::builder().redis(&redis).start().await;
    let mut streams = Vec::new();
    for u in ["u1", "u2", "u3"] {
        streams.push(gw.connect("shop", u).await);
    }
    let admin = redis.client().await;
    let publisher = {
        let redis_url = redis.url();
        tokio::spawn(async move {
            let config = fred::types::config::Config::from_url(&redis_url).unwrap();
            let c = fred::types::Builder::from_config(config).build().unwrap();
            c.init().await.unwrap();
            for n in 0..300u64 {
                let user = ["u1", "u2", "u3"][(n % 3) as usize];
                let payload = format!(r#"{{"type":"t","data":{{"n":{n}}}}}"#);
                let _: Vec<RedisValue> = c
                    .custom(
                        fred::cmd!("FCALL"),
                        vec!["sse_publish", "0", "shop", user, payload.as_str()],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Cut the gateway's subscriber connection again and again while events flow.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _: RedisValue = admin
            .custom(fred::cmd!("CLIENT"), vec!["KILL", "TYPE", "pubsub"])
            .await
            .unwrap();
    }
    publisher.await.unwrap();
    for (i, s) in streams.iter_mut().enumerate() {
        let want: Vec<u64> = (0..300).filter(|n| n % 3 == i as u64).collect();
        let got = take(s, want.len()).await;
        assert_eq!(ns(&got), want, "stream {i}: all, once, in order, no reset");
    }
    assert!(gw.metric("sse_resyncs_total").await.unwrap_or(0.0) >= 1.0);
}

/// A channel in its grace (its last stream just left) is not subscribed on a new link: a client
/// that comes back after the link was lost is subscribed afresh, not told its channel is live.
#[tokio::test]
async fn a_client_back_after_a_lost_link_is_subscribed_again() {
    let redis = RedisServer::start();
    let gw = Gateway::builder().redis(&redis).start().await;
    let admin = redis.client().await;
    let alice = gw.connect("shop", "alice").await;
    drop(alice);
    eventually(Duration::from_secs(5), "the stream to close", || async {
        gw.metric("sse_active_clients").await == Some(0.0)
    })
    .await;
    // Within the grace, the subscriber link is cut and comes back.
    let _: RedisValue = admin
        .custom(fred::cmd!("CLIENT"), vec!["KILL", "TYPE", "pubsub"])
        .await
        .unwrap();
    eventually(Duration::from_secs(3), "the link to come back", || async {
        gw.metric("sse_broker_reconnects_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    let mut back = gw.connect("shop", "alice").await;
    // Plain pub/sub has no history: only a live subscription delivers this.
    let n: i64 = admin
        .publish("shop:channel:alice", r#"{"type":"t","data":{"n":7}}"#)
        .await
        .unwrap();
    assert_eq!(n, 1, "subscribed on the new link");
    assert_eq!(back.next().await.json()["n"], 7);
}

#[tokio::test]
async fn a_restart_without_persistence_reaches_open_and_resuming_streams_as_a_reset() {
    let mut redis = RedisServer::start();
    let gw = Gateway::builder().redis(&redis).start().await;
    let mut alice = gw.connect("shop", "alice").await;
    let before = fcall_publish(&redis, "alice", 0).await;
    assert_eq!(ns(&take(&mut alice, 1).await), [0]);

    redis.restart(); // empty: history, functions and registry are gone
    // The backends' FCALL works again without any client doing anything: the gateway reloads the
    // library as soon as it is back.
    let after = fcall_publish(&redis, "alice", 1).await;
    let (_, reset) = take(&mut alice, 1).await.remove(0);
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(reset.json()["reason"], "history_lost");
    let epoch = |id: &str| id.rsplit('-').next().unwrap_or_default().to_string();
    let reset_id = reset.id.clone().unwrap();
    assert_ne!(epoch(&reset_id), epoch(&before), "a new history");
    assert_eq!(epoch(&reset_id), epoch(&after));
    // Live delivery goes on after the reset: the event published before it is covered by it (if
    // the re-sync came later) or delivered after it (if earlier); the next one is delivered.
    fcall_publish(&redis, "alice", 2).await;
    let mut after_reset = ns(&take(&mut alice, 1).await);
    if after_reset == [1] {
        after_reset.extend(ns(&take(&mut alice, 1).await));
    }
    assert!(
        after_reset == [2] || after_reset == [1, 2],
        "{after_reset:?}"
    );

    // An id of the lost history, resumed with: a clean reset, not an error.
    let mut back = gw.resume("shop", "alice", &before).await;
    let ev = back.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.json()["reason"].as_str()),
        ("reset", Some("history_lost"))
    );
    // So is an id from before epochs existed ("<ms>-<seq>").
    let mut legacy = gw.resume("shop", "alice", "1795334532736-0").await;
    assert_eq!(legacy.next().await.event, "reset");
}

#[tokio::test]
async fn writes_rolled_back_by_a_restart_from_an_older_file_start_a_new_history() {
    let mut redis = RedisServer::start_with(&["--dbfilename", "dump.rdb"]);
    let gw = Gateway::builder().redis(&redis).start().await;
    let mut alice = gw.connect("shop", "alice").await;
    fcall_publish(&redis, "alice", 0).await;
    let admin = redis.client().await;
    let _: RedisValue = admin
        .custom(fred::cmd!("SAVE"), Vec::<String>::new())
        .await
        .unwrap();
    let _ = admin.quit().await;
    // Seen by alice, then lost: Redis comes back from the snapshot taken before them.
    let lost = fcall_publish(&redis, "alice", 1).await;
    fcall_publish(&redis, "alice", 2).await;
    assert_eq!(ns(&take(&mut alice, 3).await), [0, 1, 2]);
    redis.restart();

    let (_, reset) = take(&mut alice, 1).await.remove(0);
    assert_eq!(
        (reset.event.as_str(), reset.json()["reason"].as_str()),
        ("reset", Some("history_lost")),
        "{reset:?}"
    );
    let m = gw
        .metric("sse_history_epochs_started_total{reason=\"rolled_back\"}")
        .await;
    assert_eq!(m, Some(1.0));
    // The next events carry the new history's ids and are delivered; a client holding an id that
    // only the lost writes had gets a reset, never the next events as if nothing was missing.
    fcall_publish(&redis, "alice", 3).await;
    assert_eq!(ns(&take(&mut alice, 1).await), [3]);
    let mut back = gw.resume("shop", "alice", &lost).await;
    let ev = back.next().await;
    assert_eq!(ev.event, "reset", "{ev:?}");
}

#[tokio::test]
async fn readiness_needs_the_probe_to_come_back() {
    let redis = RedisServer::start();
    let gw = Gateway::builder().redis(&redis).start().await;
    let ready = || async {
        let r = http().get(gw.url("/ready")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let up = poll_until(ready, |r| r.0 == 200).await;
    assert_eq!(up.1["probe"], true, "{}", up.1);
    assert_eq!(up.1["functions"], true, "{}", up.1);
    // Writes stall (both links stay connected): the probe cannot publish, readiness fails.
    let admin = redis.client().await;
    let _: RedisValue = admin
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "6000", "WRITE"])
        .await
        .unwrap();
    let stalled = poll_until(ready, |r| r.0 == 503).await;
    assert_eq!(stalled.0, 503, "{}", stalled.1);
    assert_eq!(stalled.1["commands"], true, "{}", stalled.1);
    assert_eq!(stalled.1["probe"], false, "{}", stalled.1);
    let _: RedisValue = admin
        .custom(fred::cmd!("CLIENT"), vec!["UNPAUSE"])
        .await
        .unwrap();
    assert_eq!(poll_until(ready, |r| r.0 == 200).await.0, 200);
    let age = gw.metric("sse_broker_probe_age_seconds").await.unwrap();
    assert!((0.0..3.0).contains(&age), "probe age {age}");
    // The library flushed away (by hand, or a node without it): it is back within a probe round.
    let _: RedisValue = admin
        .custom(fred::cmd!("FUNCTION"), vec!["FLUSH"])
        .await
        .unwrap();
    let admin = &admin;
    eventually(
        Duration::from_secs(4),
        "the library is loaded again",
        || async move {
            let fns: Vec<RedisValue> = admin
                .custom(
                    fred::cmd!("FUNCTION"),
                    vec!["LIST", "LIBRARYNAME", "sse_gateway"],
                )
                .await
                .unwrap();
            fns.len() == 1
        },
    )
    .await;
    assert_eq!(poll_until(ready, |r| r.0 == 200).await.0, 200);
}
