//! Sentinel (a primary, a replica, three Sentinels): the gateway follows a failover, stops writing
//! to the demoted primary, catches its open streams up, and never acknowledges an event a failover
//! can take back when `DURABLE_MIN_REPLICAS` asks for a replica. Real processes, loopback only.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::ClientLike;
use serde_json::{Value, json};

async fn ready(gw: &Gateway) -> u16 {
    http()
        .get(gw.url("/ready"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

enum Fault {
    /// `SENTINEL FAILOVER`: the primary is demoted while it still runs.
    Failover,
    /// The primary is killed; the Sentinels notice and promote the replica.
    KillPrimary,
}

#[tokio::test]
async fn a_manual_failover_is_followed_and_open_streams_keep_every_event() {
    through(Fault::Failover).await;
}

#[tokio::test]
async fn a_killed_primary_is_replaced_and_open_streams_keep_every_event() {
    through(Fault::KillPrimary).await;
}

/// Publishes to alice through `fault`, then checks her stream and the new primary.
async fn through(fault: Fault) {
    let mut set = SentinelSet::start().await;
    let gw = Gateway::builder()
        .env("REDIS_URL", &set.url())
        .env("DURABLE_MIN_REPLICAS", "1")
        .start()
        .await;
    assert_eq!(poll_until(|| ready(&gw), |s| *s == 200).await, 200);
    let mut alice = gw.connect("shop", "alice").await;
    let publish = |n: u64| {
        let gw = &gw;
        async move {
            let r = gw
                .publish(
                    "shop",
                    json!({"user": "alice", "type": "t", "data": {"n": n}}),
                )
                .await;
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let first = publish(0).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let old = set.primary_port().await;
    match fault {
        Fault::Failover => set.failover().await,
        Fault::KillPrimary => set.primary.kill(),
    }
    // Publish through the failover: every event acknowledged (200) must reach alice, once, in
    // order; a refused one (503) may or may not.
    let mut acked = Vec::new();
    for n in 1..=100u64 {
        let (status, body) = publish(n).await;
        match status {
            200 => acked.push(n),
            503 => {}
            other => panic!("publish {n}: {other} {body}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = set.wait_new_primary(old).await;
    assert_ne!(new, old);
    assert_eq!(poll_until(|| ready(&gw), |s| *s == 200).await, 200);
    assert!(
        acked.len() >= 20,
        "publishing resumed after the failover: {acked:?}"
    );
    // Every acknowledged event reaches alice once, in order, or a `reset` before it says it may
    // not (events delivered live from the demoted primary, then lost with it, are reset).
    let last = *acked.last().unwrap();
    let mut got: Vec<u64> = Vec::new();
    let mut reset_before: Vec<usize> = Vec::new();
    while got.last() != Some(&last) {
        let ev = alice.next().await;
        if ev.event == "reset" {
            assert_eq!(ev.json()["reason"], "history_lost", "{ev:?}");
            reset_before.push(got.len());
            continue;
        }
        got.push(ev.json()["n"].as_u64().unwrap());
    }
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "once, in order: {got:?}"
    );
    for n in &acked {
        let announced = reset_before
            .iter()
            .any(|&i| (i == 0 || got[i - 1] < *n) && got.get(i).is_none_or(|next| *next >= *n));
        assert!(
            got.contains(n) || announced,
            "acknowledged {n} delivered or announced: {got:?}, resets before {reset_before:?}"
        );
    }
    // And every acknowledged event is on the new primary (a replica held it before the 200).
    let new_primary = RedisServer::attach(new);
    let history: Vec<(String, Vec<String>)> = new_primary
        .client()
        .await
        .custom(
            fred::cmd!("XRANGE"),
            vec!["shop:history:user:alice", "-", "+"],
        )
        .await
        .unwrap();
    let kept: Vec<u64> = history
        .iter()
        .filter_map(|(_, fields)| serde_json::from_str::<Value>(fields.get(1)?).ok())
        .filter_map(|m| m["data"]["n"].as_u64())
        .collect();
    for n in &acked {
        assert!(
            kept.contains(n),
            "acknowledged {n} on the new primary: {kept:?}"
        );
    }
}
