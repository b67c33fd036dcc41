//! The cluster-wide connection registry and `/connections`, against real Redis and real processes:
//! entries appear with the right fields, go on disconnect and on shutdown, expire after SIGKILL, are
//! visible from every instance, and are only listed to those allowed to see them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use fred::interfaces::{ClientLike, KeysInterface, PubsubInterface};
use serde_json::{Value, json};

#[tokio::test]
async fn entries_carry_the_fields_and_vanish_on_disconnect() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let c = SseClient::open(
        gw.sse()
            .header("user-agent", "test-agent/1.0")
            .bearer_auth(user_token("shop", "alice")),
    )
    .await;
    let id = c.connection_id();
    let key = format!("shop:client:alice:{id}");
    let (r_ref, key_ref) = (&r, &key);
    let hash: HashMap<String, String> = poll_until(
        move || async move {
            fred::interfaces::HashesInterface::hgetall(r_ref, key_ref)
                .await
                .unwrap()
        },
        |h: &HashMap<String, String>| !h.is_empty(),
    )
    .await;
    assert_eq!(hash["id"], id);
    assert_eq!(hash["app"], "shop");
    assert_eq!(hash["user"], "alice");
    assert_eq!(hash["instance"], gw.instance);
    assert_eq!(hash["user_agent"], "test-agent/1.0");
    assert_eq!(hash["channel_id"], "shop:channel:alice");
    assert!(hash["remote_addr"].starts_with("127.0.0.1:"));
    let created: u64 = hash["created_at"].parse().unwrap();
    assert!(created.abs_diff(now()) < 10);
    // HSET and EXPIRE share a pipeline; give the EXPIRE its moment.
    let mut ttl: i64 = -1;
    for _ in 0..50 {
        ttl = r.ttl(&key).await.unwrap();
        if ttl > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ttl > 0 && ttl <= 60,
        "entries expire by themselves: ttl {ttl}"
    );

    // The listing shows the same, in the original's shape.
    let (status, body) = gw
        .list("/connections/shop/alice", &user_token("shop", "alice"))
        .await;
    assert_eq!(status, 200);
    let entry = &body[&id];
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["application"], json!({"id": "shop"}));
    assert_eq!(entry["user"], json!({"id": "alice"}));
    assert_eq!(entry["instance"], gw.instance.as_str());
    assert!(entry["created_at"].is_u64());

    drop(c);
    eventually(Duration::from_secs(5), "entry and indexes deleted", || {
        let r = r.clone();
        async move { registry_keys(&r).await.is_empty() }
    })
    .await;
    let (status, body) = gw
        .list("/connections/shop/alice", &user_token("shop", "alice"))
        .await;
    assert_eq!((status, body), (204, Value::Null));
}

#[tokio::test]
async fn connections_authorization_matrix() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let _alice = gw.connect("shop", "alice").await;
    let _bob = gw.connect("shop", "bob").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let alice = user_token("shop", "alice");
    let cases: Vec<(&str, String, u16)> = vec![
        // A user sees their own connections, not anyone else's, nor the app's.
        ("/connections/shop/alice", alice.clone(), 200),
        ("/connections/shop/bob", alice.clone(), 403),
        ("/connections/shop", alice.clone(), 403),
        // A token of another application sees nothing of this one (the original leaked all).
        ("/connections/shop/alice", user_token("blog", "alice"), 403),
        ("/connections/shop", operator_token("blog"), 403),
        // A publisher is not an operator.
        ("/connections/shop", publisher_token("shop"), 403),
        // The operator of the app sees everything in it.
        ("/connections/shop", operator_token("shop"), 200),
        ("/connections/shop/bob", operator_token("shop"), 200),
        ("/connections/shop/nobody", operator_token("shop"), 204),
    ];
    for (path, token, want) in cases {
        let (status, body) = gw.list(path, &token).await;
        assert_eq!(status, want, "{path}: {body}");
        if want == 403 {
            assert!(body["error"].is_string(), "{body}");
        }
    }
    let (_, body) = gw.list("/connections/shop", &operator_token("shop")).await;
    let users: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(users, ["alice", "bob"]);
    let r = http()
        .get(gw.url("/connections/shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn two_instances_share_delivery_and_listing() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis).await;
    let b = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let mut on_a = a.connect("shop", "alice").await;
    let mut on_b = b.connect("shop", "alice").await;
    let mut bob_on_b = b.connect("shop", "bob").await;

    // Published on instance A (HTTP), delivered on both.
    let resp = a
        .publish("shop", json!({"user": "alice", "type": "t", "data": 1}))
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["subscribers"], 2);
    assert_eq!(on_a.next().await.data, "1");
    assert_eq!(on_b.next().await.data, "1");
    // Published straight to Redis, as the original's backends do.
    let n: i64 = r
        .publish("shop:channel:bob", r#"{"type":"t","data":2}"#)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(bob_on_b.next().await.data, "2");
    on_a.expect_silence(Duration::from_millis(300)).await;

    // Either instance lists all three connections with their instance ids.
    for gw in [&a, &b] {
        let count = |body: &Value| -> usize {
            body.as_object().map_or(0, |o| {
                o.values()
                    .map(|u| u.as_object().map_or(0, |m| m.len()))
                    .sum()
            })
        };
        let body = poll_until(
            move || async move {
                gw.list("/connections/shop", &operator_token("shop"))
                    .await
                    .1
            },
            |b| count(b) == 3,
        )
        .await;
        assert_eq!(count(&body), 3, "{body}");
        let mut instances: Vec<String> = body["alice"]
            .as_object()
            .unwrap()
            .values()
            .map(|c| c["instance"].as_str().unwrap().to_string())
            .collect();
        instances.sort();
        let mut want = vec![a.instance.clone(), b.instance.clone()];
        want.sort();
        assert_eq!(instances, want);
    }
}

#[tokio::test]
async fn entries_of_a_killed_instance_expire_by_themselves() {
    let redis = RedisServer::start();
    let r = redis.client().await;
    let mut doomed = Gateway::builder()
        .process()
        .redis(&redis)
        .env("REGISTRY_TTL", "2")
        .start()
        .await;
    let survivor = Gateway::with_redis(&redis).await;
    let _c1 = doomed.connect("shop", "alice").await;
    let _c2 = doomed.connect("shop", "bob").await;
    let _c3 = survivor.connect("shop", "carol").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = survivor
        .list("/connections/shop", &operator_token("shop"))
        .await;
    assert_eq!(body.as_object().unwrap().len(), 3);

    // Held past its TTL by the heartbeat while alive...
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, body) = survivor
        .list("/connections/shop", &operator_token("shop"))
        .await;
    assert_eq!(
        body.as_object().unwrap().len(),
        3,
        "heartbeat keeps live entries"
    );

    // ...and gone within the TTL once the process dies without any cleanup.
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5));
    let survivor_ref = &survivor;
    let users: Vec<String> = poll_until(
        move || async move {
            let (_, body) = survivor_ref
                .list("/connections/shop", &operator_token("shop"))
                .await;
            body.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        },
        |u: &Vec<String>| u == &["carol"],
    )
    .await;
    assert_eq!(users, ["carol"], "keys: {:?}", registry_keys(&r).await);
    // The keys themselves expire too (the hash and the index keys, each on its own TTL).
    let r_ref = &r;
    let remaining = poll_until(
        move || registry_keys(r_ref),
        |ks: &Vec<String>| {
            ks.iter()
                .all(|k| !k.contains("alice") && !k.contains("bob"))
        },
    )
    .await;
    assert!(
        remaining
            .iter()
            .all(|k| !k.contains("alice") && !k.contains("bob")),
        "{remaining:?}"
    );
}

#[tokio::test]
async fn graceful_shutdown_tells_streams_to_reconnect_and_leaves_no_entries() {
    let redis = RedisServer::start();
    let r = redis.client().await;
    let mut gw = Gateway::builder()
        .process()
        .redis(&redis)
        .env("RETRY_MS", "1000")
        .start()
        .await;
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(gw.connect("shop", &format!("u{i}")).await);
    }
    eventually(Duration::from_secs(5), "entries written", || {
        let r = r.clone();
        async move { registry_keys(&r).await.len() == 5 + 5 + 1 }
    })
    .await;

    gw.signal("TERM");
    for s in &mut streams {
        let events = s.until_end(Duration::from_secs(5)).await;
        let last = events.last().expect("a farewell event");
        assert_eq!(last.event, "shutdown");
        let retry = last.retry.expect("a retry hint");
        assert!((1000..2000).contains(&retry), "{retry}");
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(registry_keys(&r).await, Vec::<String>::new());
    assert!(gw.logs().contains("shutdown complete"));
}

#[tokio::test]
async fn shutdown_is_bounded_even_when_a_client_never_reads() {
    let redis = RedisServer::start();
    let mut gw = Gateway::builder()
        .process()
        .redis(&redis)
        .env("SHUTDOWN_TIMEOUT", "1")
        .start()
        .await;
    // A client that sends its request and then never reads a byte.
    let _stuck = raw_sse_request(gw.port, "shop", "stuck", None).await;
    // Fill its socket buffers so that nothing more can be written to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blob = "x".repeat(200_000);
    for _ in 0..30 {
        gw.publish("shop", json!({"user": "stuck", "data": blob}))
            .await;
    }
    let started = std::time::Instant::now();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let r = redis.client().await;
    // History stays (the published events are durable); no registry entry does.
    let left: Vec<String> = registry_keys(&r)
        .await
        .into_iter()
        .filter(|k| !k.contains(":history:"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{}", gw.logs());
}

/// A large application is listed a page at a time (one function call per page, not one read per
/// connection): 2,600 entries, several pages of a ZSCAN over a large index, each listed once;
/// entries whose instance stopped touching them (expired in the index) are not.
#[tokio::test]
async fn a_large_application_is_listed_whole_a_page_at_a_time() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    // Written as an instance writes them, in batches of the registry's own call.
    let put = |user: String, conn: String| {
        [
            "put".to_string(),
            "big".into(),
            user,
            conn,
            "elsewhere".into(),
            "127.0.0.1:1".into(),
            "1700000000".into(),
            "agent".into(),
        ]
    };
    let mut expected = std::collections::HashSet::new();
    for batch in 0..13 {
        let mut args = vec!["sse_registry".to_string(), "0".into(), "600".into()];
        for i in 0..200 {
            let (user, conn) = (
                format!("u{}", (batch * 200 + i) % 700),
                format!("c{batch}-{i}"),
            );
            expected.insert(conn.clone());
            args.extend(put(user, conn));
        }
        let _: fred::types::Value = r
            .custom(fred::cmd!("FCALL"), args)
            .await
            .expect("sse_registry put");
    }
    // One more whose expiry has passed in the index (its instance died): never listed.
    let mut args = vec!["sse_registry".to_string(), "0".into(), "600".into()];
    args.extend(put("u1".into(), "dead".into()));
    let _: fred::types::Value = r.custom(fred::cmd!("FCALL"), args).await.unwrap();
    let _: i64 = r
        .custom(
            fred::cmd!("ZADD"),
            vec!["big:connections", "XX", "1", "u1:dead"],
        )
        .await
        .unwrap();

    let (status, body) = gw.list("/connections/big", &operator_token("big")).await;
    assert_eq!(status, 200);
    let mut listed = Vec::new();
    for entries in body.as_object().unwrap().values() {
        listed.extend(entries.as_object().unwrap().keys().cloned());
    }
    let unique: std::collections::HashSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), unique.len(), "each entry once");
    assert_eq!(unique, expected, "every live entry, and not the dead one");
    assert_eq!(body.as_object().unwrap().len(), 700, "users");

    // One user's listing reads that user's index.
    let (status, body) = gw.list("/connections/big/u3", &operator_token("big")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body.as_object().unwrap().len(),
        expected
            .iter()
            .filter(|c| {
                let (b, i) = c[1..].split_once('-').unwrap();
                (b.parse::<usize>().unwrap() * 200 + i.parse::<usize>().unwrap()) % 700 == 3
            })
            .count()
    );
}

/// Under the caps (on by default), a stream's admission writes its registry entry before the
/// stream is answered: any instance lists it at once, with every field, without waiting for the
/// registry's own writes. With the caps off, the registry writes it shortly after.
#[tokio::test]
async fn an_admitted_stream_is_listed_as_soon_as_it_is_answered() {
    let redis = RedisServer::start();
    let (a, b) = (
        Gateway::with_redis(&redis).await,
        Gateway::with_redis(&redis).await,
    );
    let mut streams = Vec::new();
    for i in 0..20 {
        let user = format!("u{i}");
        let c = SseClient::open(
            a.sse()
                .header("user-agent", "test-agent/2.0")
                .bearer_auth(user_token("shop", &user)),
        )
        .await;
        let path = format!("/connections/shop/{user}");
        let (status, body) = b.list(&path, &operator_token("shop")).await;
        assert_eq!(status, 200, "{user} listed once answered");
        let entry = &body[c.connection_id().as_str()];
        assert_eq!(entry["instance"], a.instance.as_str(), "{body}");
        assert_eq!(entry["user_agent"], "test-agent/2.0", "{body}");
        assert_eq!(entry["user"], json!({"id": user}));
        streams.push(c);
    }

    let uncapped = Gateway::builder()
        .redis(&redis)
        .env("MAX_USER_CONNECTIONS", "0")
        .env("MAX_APP_CONNECTIONS", "0")
        .start()
        .await;
    let c = SseClient::open(uncapped.sse().bearer_auth(user_token("shop", "free"))).await;
    let id = c.connection_id();
    eventually(Duration::from_secs(5), "the uncapped stream listed", || {
        let (b, id) = (&b, id.clone());
        async move {
            let (status, body) = b
                .list("/connections/shop/free", &operator_token("shop"))
                .await;
            status == 200 && body.get(&id).is_some()
        }
    })
    .await;
}
