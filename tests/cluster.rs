//! Redis Cluster (three primaries, three replicas; three gateways, each told about a different
//! node): every feature works from any node, applications spread over the shards, and a primary
//! killed under durable load loses no acknowledged event without a `reset`. Real processes,
//! loopback only.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::chaos::*;
use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::{ClusterHash, Value as RedisValue};
use serde_json::{Value, json};
use sse_gateway::history::Partitions;

/// The shard that holds `key`'s slot when `redis-cli --cluster create` split the slots
/// (0-5460, 5461-10922, 10923-16383).
fn shard_of(key: &str) -> usize {
    match fred::util::redis_keyslot(key.as_bytes()) {
        0..=5460 => 0,
        5461..=10922 => 1,
        _ => 2,
    }
}

/// Three applications whose slots are on three different primaries.
fn apps_on_every_shard() -> Vec<String> {
    let mut apps = vec![String::new(); 3];
    for n in 0.. {
        let app = format!("app{n}");
        let shard = shard_of(&app);
        if apps[shard].is_empty() {
            apps[shard] = app;
        }
        if apps.iter().all(|a| !a.is_empty()) {
            return apps;
        }
    }
    unreachable!()
}

/// `FCALL sse_publish <args>` sent to the node that holds `route`'s slot.
async fn sse_publish(
    redis: &fred::clients::Client,
    route: &str,
    args: &[&str],
) -> Result<RedisValue, fred::error::Error> {
    let slot = fred::util::redis_keyslot(route.as_bytes());
    let mut all = vec!["sse_publish"];
    all.extend_from_slice(args);
    redis
        .custom(fred::cmd!("FCALL", hash: ClusterHash::Custom(slot)), all)
        .await
}

/// `FCALL sse_publish 1 {app} app user envelope`, the cluster form; the event id.
async fn fcall_publish(redis: &fred::clients::Client, app: &str, user: &str, data: &str) -> String {
    let key = format!("{{{app}}}");
    let envelope = json!({"type": "note", "data": data}).to_string();
    let answer = sse_publish(redis, &key, &["1", &key, app, user, &envelope])
        .await
        .expect("FCALL sse_publish in the cluster form");
    answer.into_array()[0].as_string().expect("an event id")
}

/// `GET /connections/<app>` on `gw` with an operator token: the answer, and the users it lists.
async fn listing(gw: &Gateway, app: &str) -> (Value, HashSet<String>) {
    let listing: Value = http()
        .get(gw.url(&format!("/connections/{app}")))
        .bearer_auth(operator_token(app))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let users = listing
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (listing, users)
}

async fn ready(gw: &Gateway) -> u16 {
    poll_until(
        || async {
            http()
                .get(gw.url("/ready"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        },
        |s| *s == 200,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_works_from_any_node() {
    let _serial = serial().await;
    let cluster = ClusterSet::start().await;
    let mut gateways = Vec::new();
    for i in 0..3 {
        let gw = Gateway::builder()
            .env("REDIS_URL", &cluster.url(i * 2))
            .start()
            .await;
        gateways.push(gw);
    }
    for gw in &gateways {
        assert_eq!(ready(gw).await, 200, "ready: every shard's probe came back");
    }
    let redis = cluster.client().await;

    for (k, app) in apps_on_every_shard().iter().enumerate() {
        let app = app.as_str();
        let (a, b, c) = (
            &gateways[k % 3],
            &gateways[(k + 1) % 3],
            &gateways[(k + 2) % 3],
        );
        let mut alice = a.connect(app, "alice").await;
        let mut bob = b.connect(app, "bob").await;

        // Durable, from Redis (the cluster form) and over HTTP on another instance.
        let first = fcall_publish(&redis, app, "alice", "one").await;
        let e = alice.next().await;
        assert_eq!(
            (e.id.as_deref(), e.json()),
            (Some(first.as_str()), json!("one")),
            "{app}"
        );
        let second = c
            .publish_id(app, json!({"user": "alice", "type": "note", "data": "two"}))
            .await;
        assert_eq!(alice.next().await.id.as_ref(), Some(&second));
        // The documented single-Redis form names the cluster form in its error.
        let zero_keys = sse_publish(&redis, app, &["0", app, "alice", r#"{"data":"x"}"#]).await;
        let refused = zero_keys.expect_err("no declared key on a cluster");
        assert!(
            refused.details().contains(&format!("1 {{{app}}}")),
            "{refused:?}"
        );

        // A durable broadcast reaches both users, on two instances.
        let all = c
            .publish_id(
                app,
                json!({"broadcast": true, "type": "note", "data": "all"}),
            )
            .await;
        assert_eq!(alice.next().await.id.as_ref(), Some(&all));
        assert_eq!(bob.next().await.id.as_ref(), Some(&all));

        // Backends that PUBLISH (classic) or SPUBLISH (the shard channel) reach the streams.
        let plain = json!({"type": "note", "data": "plain"}).to_string();
        // (Its count is of the node it ran on: the cluster bus carries it to the others.)
        let _: i64 = redis
            .publish(format!("{app}:channel:bob"), plain)
            .await
            .expect("PUBLISH");
        assert_eq!(bob.next().await.json(), json!("plain"));
        let sharded = json!({"type": "note", "data": "sharded"}).to_string();
        let n: i64 = redis
            .spublish(format!("{{{app}}}:channel:bob"), sharded)
            .await
            .expect("SPUBLISH");
        assert_eq!(n, 1, "one instance holds bob's stream");
        assert_eq!(bob.next().await.json(), json!("sharded"));

        // Listing from the third instance sees both streams.
        let (listing, users) = listing(c, app).await;
        let both = HashSet::from(["alice".to_string(), "bob".to_string()]);
        assert_eq!(users, both, "{app}: {listing}");

        // Replay across instances: alice resumes on the third from the first event.
        drop(alice);
        let mut again = c.resume(app, "alice", &first).await;
        let ids = vec![again.next().await.id, again.next().await.id];
        assert_eq!(ids, vec![Some(second), Some(all)], "{app}: replay");
    }

    // Every primary holds one of the applications' histories: they spread over the shards.
    let mut holders = HashSet::new();
    for app in apps_on_every_shard() {
        holders.insert(cluster.primary_of(&format!("{{{app}}}")).await);
    }
    assert_eq!(holders.len(), 3);
}

/// With `CLUSTER_PARTITIONS`, one application's users spread over every shard: each user's
/// history lives in their partition's slot, broadcasts are written to every partition, and every
/// feature still works from any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_application_spreads_over_every_shard() {
    let _serial = serial().await;
    let cluster = ClusterSet::start().await;
    let partitions = Partitions::new(12).expect("12 partitions");
    let app = "big";
    let mut gateways = Vec::new();
    for i in 0..3 {
        let gw = Gateway::builder()
            .env("REDIS_URL", &cluster.url(i * 2))
            .env("CLUSTER_PARTITIONS", "12")
            .start()
            .await;
        gateways.push(gw);
    }
    for gw in &gateways {
        assert_eq!(ready(gw).await, 200);
    }
    let redis = cluster.client().await;
    // Three users of one application whose partitions are on three different shards.
    let mut users = vec![String::new(); 3];
    for n in 0..1000 {
        let user = format!("user{n}");
        let shard = shard_of(&format!("{{{}}}", partitions.history(app, &user)));
        if users[shard].is_empty() {
            users[shard] = user;
        }
    }
    assert!(users.iter().all(|u| !u.is_empty()), "{users:?}");
    let history = |u: &str| partitions.history(app, u).into_owned();

    let mut streams = Vec::new();
    for (i, user) in users.iter().enumerate() {
        streams.push(gateways[i].connect(app, user).await);
    }
    // Durable, from Redis: each user's event goes to their partition, in the cluster form.
    let mut first = Vec::new();
    for (user, stream) in users.iter().zip(&mut streams) {
        let id = fcall_publish(&redis, &history(user), user, "one").await;
        let e = stream.next().await;
        assert_eq!(
            (e.id.as_deref(), e.json()),
            (Some(id.as_str()), json!("one"))
        );
        first.push(id);
    }
    // The application's own key, or another partition, is refused with the call to make.
    let user = &users[0];
    let wrong = format!("{app}#{}", (partitions.of(user) + 1) % 12);
    for (key_app, expected) in [
        (app.to_string(), format!("{{{}}}", history(user))),
        (wrong, format!("partition {}", history(user))),
    ] {
        let key = format!("{{{key_app}}}");
        let refused = sse_publish(
            &redis,
            &key,
            &["1", &key, &key_app, user, r#"{"data":"x"}"#],
        )
        .await;
        let refused = refused.expect_err("an event nobody would read is refused");
        assert!(refused.details().contains(&expected), "{refused:?}");
    }

    // A durable broadcast over HTTP: one id per partition, each stream gets it once.
    let r = gateways[1]
        .publish(
            app,
            json!({"broadcast": true, "type": "note", "data": "all"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.expect("publish answer");
    assert_eq!(answer["ids"].as_array().map(Vec::len), Some(12), "{answer}");
    let mut all = Vec::new();
    for stream in &mut streams {
        let e = stream.next().await;
        assert_eq!(e.json(), json!("all"));
        all.push(e.id.expect("a durable id"));
    }
    // Backends that PUBLISH to the application's own channel names still reach the streams,
    // a broadcast once per stream.
    let _: i64 = redis
        .publish(
            format!("{app}:broadcast"),
            json!({"data": "plain-all"}).to_string(),
        )
        .await
        .expect("PUBLISH");
    for (user, stream) in users.iter().zip(&mut streams) {
        assert_eq!(stream.next().await.json(), json!("plain-all"));
        let _: i64 = redis
            .publish(
                format!("{app}:channel:{user}"),
                json!({"data": "plain"}).to_string(),
            )
            .await
            .expect("PUBLISH");
        assert_eq!(
            stream.next().await.json(),
            json!("plain"),
            "no second copy first"
        );
    }

    // Listing from any instance sees every user, under the application's name.
    let (listing, listed) = listing(&gateways[2], app).await;
    let wanted: HashSet<String> = users.iter().cloned().collect();
    assert_eq!(listed, wanted, "{listing}");
    for entries in listing.as_object().into_iter().flat_map(|m| m.values()) {
        for entry in entries.as_object().into_iter().flat_map(|m| m.values()) {
            assert_eq!(entry["application"]["id"], json!(app), "{entry}");
        }
    }

    // Replay across instances, from the first event: the broadcast, in the user's partition.
    let user = users[0].clone();
    drop(streams.remove(0));
    let mut again = gateways[2].resume(app, &user, &first[0]).await;
    assert_eq!(again.next().await.id.as_ref(), Some(&all[0]));

    // Each user's history is on a different primary: one application, every shard.
    let mut holders = HashSet::new();
    for user in &users {
        let key = format!("{{{}}}:history:user:{user}", history(user));
        let node = cluster.primary_of(&key).await;
        let direct = RedisServer::attach(cluster.nodes[node].port).client().await;
        let exists: i64 = direct
            .custom(fred::cmd!("EXISTS"), vec![key.as_str()])
            .await
            .expect("EXISTS");
        assert_eq!(exists, 1, "{key} on node {node}");
        holders.insert(node);
    }
    assert_eq!(holders.len(), 3);

    // An instance started with another CLUSTER_PARTITIONS loads its library: calls naming a
    // partition are then refused, saying why, instead of going where nobody reads.
    let _odd = Gateway::builder()
        .env("REDIS_URL", &cluster.url(0))
        .start()
        .await;
    let (partition, user) = (history(&users[1]), &users[1]);
    let key = format!("{{{partition}}}");
    let args = ["1", &key, &partition, user, r#"{"data":"x"}"#];
    let refused: Result<RedisValue, _> = poll_until(
        || sse_publish(&redis, &key, &args),
        |r: &Result<RedisValue, _>| r.is_err(),
    )
    .await;
    let refused = refused.expect_err("refused");
    assert!(
        refused
            .details()
            .contains("every instance must use the same CLUSTER_PARTITIONS"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_loses_no_acknowledged_event() {
    through("cluster_failover", Fault::Failover, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_no_acknowledged_event() {
    through("cluster_primary_killed", Fault::KillPrimary, 1).await;
}

/// The same fault for an application spread over four partitions: its histories live on several
/// shards, and the one killed holds some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_no_acknowledged_event_of_a_partitioned_application() {
    through("cluster_partitioned_primary_killed", Fault::KillPrimary, 4).await;
}

async fn through(scenario: &str, fault: Fault, partitions: u32) {
    let _serial = serial().await;
    let started = Instant::now();
    let mut cluster = ClusterSet::start().await;
    let app = "shop";
    let mut gateways = Vec::new();
    for i in 0..3 {
        let gw = Gateway::builder()
            .env("REDIS_URL", &cluster.url(i * 2))
            .env("DURABLE_MIN_REPLICAS", "1")
            .env("RETRY_MS", "500")
            .env("CLUSTER_PARTITIONS", &partitions.to_string())
            .start()
            .await;
        gateways.push(gw);
    }
    for gw in &gateways {
        assert_eq!(ready(gw).await, 200);
    }
    let bases: Vec<String> = gateways.iter().map(|g| g.url("")).collect();
    let mut cfg = LoadConfig::new(app);
    cfg.wait_replicas = 1;
    cfg.cluster = true;
    cfg.partitions = partitions;
    let (fleet, load) = start(cfg, 1, &cluster.url(1), &bases).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    // The shard of the application's slot, or (partitioned) of its first partition's.
    let watched = if partitions == 1 {
        format!("{{{app}}}")
    } else {
        format!("{{{app}#0}}")
    };
    let old = cluster.primary_of(&watched).await;
    match fault {
        Fault::Failover => {
            let replica = cluster.replica_of(old).await;
            cluster.failover_to(replica).await;
        }
        Fault::KillPrimary => {
            cluster.nodes[old].kill();
            // Readiness tells the truth: a shard's primary is gone.
            eventually(
                Duration::from_secs(10),
                "not ready while a shard is down",
                || {
                    let gw = &gateways[0];
                    async move {
                        http()
                            .get(gw.url("/ready"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 503)
                    }
                },
            )
            .await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        let now = cluster.primary_of(&watched).await;
        if now != old {
            break now;
        }
        assert!(Instant::now() < deadline, "no failover within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A killed node comes back as the new primary's replica, so acknowledgements (one replica)
    // are possible again.
    if let Fault::KillPrimary = fault {
        tokio::task::block_in_place(|| cluster.nodes[old].restart());
    }
    let ready_again = async {
        for gw in &gateways {
            assert_eq!(ready(gw).await, 200);
        }
    };
    let ledger = recovers(scenario, started, load, fleet, ready_again).await;

    // Every acknowledged event is on the new primary (partitioned: in its histories, wherever
    // they are now).
    if partitions == 1 {
        let primary = RedisServer::attach(cluster.nodes[new].port).client().await;
        assert_acknowledged_kept(&primary, &format!("{{{app}}}"), &ledger).await;
    } else {
        let client = cluster.client().await;
        assert_acknowledged_kept_partitioned(&client, app, partitions, &ledger).await;
    }
}
