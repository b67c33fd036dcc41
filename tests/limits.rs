//! Limits that hold against hostile clients and greedy tenants: caps that no burst gets past, on
//! one instance or across several; a reserve of descriptors that keeps an instance answering when
//! one token opens streams until it cannot; and request rates, each refused with a 429 and
//! `Retry-After`.

mod common;

use std::time::Duration;

use common::*;
use fred::types::Value as RedisValue;
use futures_util::future::join_all;
use serde_json::{Value, json};

/// Streams with every rate off, so that only the caps decide.
fn no_rates(b: GatewayBuilder) -> GatewayBuilder {
    b.env("RATE_CONNECT_TOKEN", "0")
        .env("RATE_CONNECT_USER", "0")
        .env("RATE_RESUME_USER", "0")
}

/// What a burst of connects got: the streams admitted (kept open), and how many of the rest were
/// refused with a 429 and with a `retry:` stream.
struct Burst {
    admitted: Vec<SseClient>,
    too_many: usize,
    shed: usize,
}

/// Sends every request at once, alternating between the gateways.
async fn burst(
    gateways: &[&Gateway],
    app: &str,
    users: impl Fn(usize) -> String,
    n: usize,
) -> Burst {
    let requests = (0..n).map(|i| {
        let gw = gateways[i % gateways.len()];
        let req = http()
            .get(gw.url("/sse"))
            .bearer_auth(user_token(app, &users(i)));
        async move { SseClient::try_open(req).await }
    });
    let mut out = Burst {
        admitted: Vec::new(),
        too_many: 0,
        shed: 0,
    };
    for c in join_all(requests).await {
        let mut c = c.expect("every request is answered");
        match c.status {
            200 if c.headers.contains_key("x-connection-id") => out.admitted.push(c),
            200 => {
                c.until_end(Duration::from_secs(5)).await;
                assert!(c.raw.starts_with("retry: "), "{:?}", c.raw);
                out.shed += 1;
            }
            429 => out.too_many += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    out
}

#[tokio::test]
async fn a_burst_of_connects_never_gets_past_a_cap_across_instances() {
    let redis = RedisServer::start();
    let builder = || {
        no_rates(Gateway::builder())
            .redis(&redis)
            .env("MAX_USER_CONNECTIONS", "5")
            .env("MAX_APP_CONNECTIONS", "50")
    };
    let (a, b) = (builder().start().await, builder().start().await);

    // 500 at once by one user, half on each instance: exactly five streams.
    let alice = burst(&[&a, &b], "shop", |_| "alice".into(), 500).await;
    assert_eq!(
        (alice.admitted.len(), alice.too_many, alice.shed),
        (5, 495, 0)
    );
    // 500 at once by 500 users of one application: exactly fifty.
    let crowd = burst(&[&a, &b], "blog", |i| format!("u{i}"), 500).await;
    assert_eq!(
        (crowd.admitted.len(), crowd.too_many, crowd.shed),
        (50, 0, 450)
    );
    // The registry lists exactly the admitted streams: refused ones left no entry behind.
    let listed = http()
        .get(a.url("/connections/blog"))
        .bearer_auth(operator_token("blog"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let entries: usize = listed
        .as_object()
        .unwrap()
        .values()
        .map(|u| u.as_object().unwrap().len())
        .sum();
    assert_eq!(entries, 50, "{listed}");

    // Places come back as streams end.
    drop(alice);
    eventually(
        Duration::from_secs(5),
        "alice's places released",
        || async {
            let c = SseClient::try_open(
                http()
                    .get(b.url("/sse"))
                    .bearer_auth(user_token("shop", "alice")),
            )
            .await
            .unwrap();
            c.status == 200 && c.headers.contains_key("x-connection-id")
        },
    )
    .await;
}

#[tokio::test]
async fn caps_hold_against_a_burst_on_the_embedded_broker_too() {
    let gw = no_rates(Gateway::builder())
        .env("MAX_USER_CONNECTIONS", "5")
        .env("MAX_APP_CONNECTIONS", "50")
        .start()
        .await;
    let alice = burst(&[&gw], "shop", |_| "alice".into(), 300).await;
    assert_eq!((alice.admitted.len(), alice.too_many), (5, 295));
    let crowd = burst(&[&gw], "blog", |i| format!("u{i}"), 300).await;
    assert_eq!((crowd.admitted.len(), crowd.shed), (50, 250));
}

#[tokio::test]
async fn one_token_cannot_take_every_descriptor() {
    // 200 open files, 80 kept in reserve: at most 120 streams, and the instance still answers.
    let gw = no_rates(Gateway::builder())
        .open_files(200)
        .env("FD_RESERVE", "80")
        .env("MAX_USER_CONNECTIONS", "0")
        .start()
        .await;
    let hog = burst(&[&gw], "shop", |_| "mallory".into(), 300).await;
    assert!(
        (110..=120).contains(&hog.admitted.len()),
        "streams stop short of the descriptors: {}",
        hog.admitted.len()
    );
    assert_eq!(hog.admitted.len() + hog.shed, 300);
    for _ in 0..20 {
        let health = http().get(gw.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    // Another user is answered (told to come back), not left hanging on a full accept queue.
    let mut other = gw.open(&user_token("blog", "bob")).await;
    other.until_end(Duration::from_secs(5)).await;
    assert!(other.raw.starts_with("retry: "), "{:?}", other.raw);
    assert!(!gw.logs().contains("accept failed"), "{}", gw.logs());
    // Room comes back as the hog's streams end.
    drop(hog);
    eventually(Duration::from_secs(5), "room for bob", || async {
        let c = SseClient::try_open(
            http()
                .get(gw.url("/sse"))
                .bearer_auth(user_token("blog", "bob")),
        )
        .await
        .unwrap();
        c.headers.contains_key("x-connection-id")
    })
    .await;
}

#[tokio::test]
async fn by_default_one_token_gets_a_few_streams_and_everyone_else_is_served() {
    let gw = Gateway::embedded().await;
    let hog = burst(&[&gw], "shop", |_| "mallory".into(), 100).await;
    assert!(
        hog.admitted.len() <= 10,
        "the token's connect rate (5/s, bursts of 10): {}",
        hog.admitted.len()
    );
    assert_eq!(hog.admitted.len() + hog.too_many, 100);
    let health = http().get(gw.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    gw.connect("shop", "bob").await;
}

#[tokio::test]
async fn connects_resumes_and_publishes_have_rates() {
    let gw = Gateway::builder()
        .env("RATE_CONNECT_USER", "2")
        .env("RATE_RESUME_USER", "1")
        .env("RATE_PUBLISH_TOKEN", "3")
        .start()
        .await;
    let open = |user: &'static str, last: Option<&'static str>| {
        let mut req = http()
            .get(gw.url("/sse"))
            .bearer_auth(user_token("shop", user));
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        async move { SseClient::open(req).await }
    };
    // Connects: a burst of two seconds' worth (4 at 2/s), then 429 with Retry-After.
    let mut kept = Vec::new();
    for _ in 0..4 {
        let c = open("alice", None).await;
        assert_eq!(c.status, 200);
        kept.push(c);
    }
    let refused = open("alice", None).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(
        gw.metric("sse_limit_rejections_total{app=\"shop\",reason=\"connect_user_rate\"}")
            .await,
        Some(1.0)
    );
    // Resumes (history reads) have their own, lower rate: 2 at once, then 429.
    for _ in 0..2 {
        assert_eq!(open("carol", Some("1-0-a")).await.status, 200);
    }
    assert_eq!(open("carol", Some("1-0-a")).await.status, 429);
    // Publishes, per token: 6 at once at 3/s, then 429.
    for n in 0..6 {
        let r = gw.publish("shop", json!({"user": "x", "data": n})).await;
        assert_eq!(r.status(), 200, "{n}");
    }
    let r = gw
        .publish("shop", json!({"user": "x", "data": "late"}))
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "rate_limited");
    // A second later, the rates have room again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(open("alice", None).await.status, 200);
    let r = gw
        .publish("shop", json!({"user": "x", "data": "again"}))
        .await;
    assert_eq!(r.status(), 200);
}

/// Fills `app`'s broadcast history with `n` events of `size` bytes through the Redis function;
/// returns their ids.
async fn fill_history(redis: &RedisServer, app: &str, n: usize, size: usize) -> Vec<String> {
    use fred::interfaces::ClientLike;
    let r = redis.client().await;
    let pipe = r.pipeline();
    let payload = json!({"type": "bulk", "data": "x".repeat(size)}).to_string();
    for _ in 0..n {
        let _: () = pipe
            .custom(
                fred::cmd!("FCALL"),
                vec!["sse_publish", "0", app, "", payload.as_str()],
            )
            .await
            .unwrap();
    }
    let answers: Vec<Vec<fred::types::Value>> = pipe.all().await.unwrap();
    answers.iter().map(|a| a[0].as_string().unwrap()).collect()
}

#[tokio::test]
async fn streams_resuming_from_far_back_are_served_page_by_page_as_they_read() {
    let redis = RedisServer::start();
    let gw = no_rates(Gateway::builder())
        .redis(&redis)
        .env("CLIENT_QUEUE_BYTES", "262144")
        .env("MAX_USER_CONNECTIONS", "0")
        .start()
        .await;
    // 1,000 broadcasts of 4 KB: 4 MB that each stream resuming from the first one missed.
    let ids = fill_history(&redis, "shop", 1000, 4000).await;
    let first = ids[0].clone();
    // 100 streams resume from far back (each from its own id: no read is shared) and never read.
    let mut idle = Vec::new();
    for (i, from) in ids.iter().take(100).enumerate() {
        // A small receive buffer, so that the kernel does not take what the gateway must hold.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket
            .connect(([127, 0, 0, 1], gw.port).into())
            .await
            .unwrap();
        let token = user_token("shop", &format!("idle{i}"));
        let req = format!(
            "GET /sse HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nlast-event-id: {from}\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        idle.push(s);
    }
    // Until every stream has what it will get: the history reads stop.
    let mut reads = 0.0;
    let mut stopped = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = gw.metric("sse_replay_reads_total").await.unwrap_or(0.0);
        if now >= 100.0 && now == reads {
            stopped = true;
            break;
        }
        reads = now;
    }
    // A client that does not read gets no further pages: the reads stop once its socket (and the
    // kernel's buffers behind it, a few pages) is full, far short of the 31 pages of 128 KB each
    // stream missed (the memory bound itself is the hub's own unit test).
    assert!(
        stopped && reads < 1000.0,
        "history reads stop when sockets stop draining: {reads} (stopped: {stopped})"
    );
    drop(idle);

    // A stream that reads gets all of it, page by page, then what is published live, in order.
    let mut reader = gw.resume("shop", "reader", &first).await;
    let mut got = Vec::new();
    while got.len() < 999 {
        let ev = reader.next().await;
        if ev.event == "bulk" {
            got.push(ev.id.unwrap());
        }
    }
    let live = gw
        .publish_id(
            "shop",
            json!({"broadcast": true, "type": "live", "data": 1}),
        )
        .await;
    let ev = reader.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.id.as_deref()),
        ("live", Some(live.as_str()))
    );
    assert_eq!(got, ids[1..], "all of it, in order, once each");
    let mut sorted = got.clone();
    sorted.sort_by_key(|id| {
        let mut p = id.split('-');
        let ms: u64 = p.next().unwrap().parse().unwrap();
        let seq: u64 = p.next().unwrap().parse().unwrap();
        (ms, seq)
    });
    sorted.dedup();
    assert_eq!(sorted, got, "in order, once each");
}

/// Calls an admission function directly: one answer per admission, each as its strings.
async fn fcall_admissions(r: &fred::clients::Client, args: Vec<String>) -> Vec<Vec<String>> {
    use fred::interfaces::ClientLike;
    let RedisValue::Array(answers) = r.custom(fred::cmd!("FCALL"), args).await.unwrap() else {
        panic!("an admission function answers a list")
    };
    answers
        .into_iter()
        .map(|a| match a {
            RedisValue::Array(items) => items.iter().filter_map(|i| i.as_string()).collect(),
            other => panic!("an answer is a list: {other:?}"),
        })
        .collect()
}

/// During a rolling upgrade, earlier gateways admit with `sse_admit` (caps and index entries,
/// no registry hash): the library still answers it as before, and counts those places with the
/// ones `sse_join` takes.
#[tokio::test]
async fn earlier_gateways_admissions_still_count_against_the_caps() {
    use fred::interfaces::ClientLike;
    let redis = RedisServer::start();
    let gw = no_rates(Gateway::builder())
        .redis(&redis)
        .env("MAX_USER_CONNECTIONS", "2")
        .start()
        .await;
    let r = redis.client().await;
    let admit = |conn: &str| {
        let args: Vec<String> = ["sse_admit", "0", "60", "shop", "alice", conn, "0", "2"]
            .map(String::from)
            .to_vec();
        let r = r.clone();
        async move { fcall_admissions(&r, args).await }
    };
    assert_eq!(admit("old-1").await, vec![vec!["ok"]]);
    let members: Vec<String> = r
        .custom(
            fred::cmd!("ZRANGE"),
            vec!["shop:connections:alice", "0", "-1"],
        )
        .await
        .unwrap();
    assert_eq!(members, vec!["old-1".to_string()]);
    let hash: i64 = r
        .custom(fred::cmd!("EXISTS"), vec!["shop:client:alice:old-1"])
        .await
        .unwrap();
    assert_eq!(hash, 0, "sse_admit writes no registry hash");

    // One place left: this gateway's stream takes it, and the next is refused.
    let first = SseClient::try_open(gw.sse().bearer_auth(user_token("shop", "alice")))
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let refused = SseClient::try_open(gw.sse().bearer_auth(user_token("shop", "alice")))
        .await
        .unwrap();
    assert_eq!(refused.status, 429);
    assert_eq!(admit("old-2").await, vec![vec!["user", "2"]]);
}

/// A stream's admission runs beside its subscriptions and history read: a refused stream has
/// joined the hub for a moment, but leaves it unanswered and uncounted (opened counts only the
/// streams answered 200), and holds no place afterwards.
#[tokio::test]
async fn a_refused_stream_is_neither_counted_nor_kept() {
    let redis = RedisServer::start();
    let gw = no_rates(Gateway::builder())
        .redis(&redis)
        .env("MAX_USER_CONNECTIONS", "1")
        .start()
        .await;
    let kept = SseClient::open(gw.sse().bearer_auth(user_token("shop", "alice"))).await;
    for _ in 0..5 {
        let refused = SseClient::try_open(gw.sse().bearer_auth(user_token("shop", "alice")))
            .await
            .unwrap();
        assert_eq!(refused.status, 429);
    }
    let metric = |name: &'static str| {
        let gw = &gw;
        async move { gw.metric(name).await.unwrap_or_default() }
    };
    assert_eq!(
        metric("sse_connections_opened_total{app=\"shop\"}").await,
        1.0
    );
    assert_eq!(metric("sse_connections{app=\"shop\"}").await, 1.0);
    assert_eq!(metric("sse_active_clients").await, 1.0);
    assert_eq!(
        metric("sse_limit_rejections_total{app=\"shop\",reason=\"user\"}").await,
        5.0
    );
    let (status, body) = gw
        .list("/connections/shop/alice", &operator_token("shop"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert!(body.get(kept.connection_id().as_str()).is_some(), "{body}");
}

/// Entries that dead instances left behind count against a cap only until it is reached: then
/// they are pruned and the live ones counted again, within one call of many admissions, where
/// the app index's new members are written only at the call's end and must still be counted.
#[tokio::test]
async fn a_cap_counts_out_dead_entries_and_counts_in_the_admissions_of_the_same_call() {
    use fred::interfaces::ClientLike;
    let redis = RedisServer::start();
    let _gw = Gateway::with_redis(&redis).await;
    let r = redis.client().await;
    let write = |cmd: &'static str, args: Vec<&str>| {
        let r = r.clone();
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        async move {
            let _: RedisValue = r.custom(fred::cmd!(cmd), args).await.unwrap();
        }
    };
    // Three dead entries in the app index, two of them alice's.
    let app_ghosts = vec![
        "shop:connections",
        "1",
        "ghost:1",
        "1",
        "alice:g1",
        "1",
        "alice:g2",
    ];
    write("ZADD", app_ghosts).await;
    write("ZADD", vec!["shop:connections:alice", "1", "g1", "1", "g2"]).await;
    write("EXPIRE", vec!["shop:connections", "60"]).await;
    write("EXPIRE", vec!["shop:connections:alice", "60"]).await;

    // Cap 5 per app; alice and bob capped at 2 each, carol not capped.
    let mut args: Vec<String> = vec!["sse_join".into(), "0".into(), "60".into()];
    let admissions = [
        ("alice", "a1", "2"),
        ("alice", "a2", "2"),
        ("alice", "a3", "2"),
        ("bob", "b1", "2"),
        ("carol", "c1", "0"),
        ("carol", "c2", "0"),
        ("carol", "c3", "0"),
    ];
    for (user, conn, max_user) in admissions {
        let fields = [
            "shop",
            user,
            conn,
            "5",
            max_user,
            "i-1",
            "127.0.0.1",
            "0",
            "test",
        ];
        args.extend(fields.map(String::from));
    }
    let answers = fcall_admissions(&r, args).await;
    let ok = || vec!["ok".to_string()];
    let refused = |why: &str, n: &str| vec![why.to_string(), n.to_string()];
    assert_eq!(
        answers,
        vec![
            ok(),
            ok(),
            refused("user", "2"),
            ok(),
            ok(),
            ok(),
            refused("app", "5"),
        ]
    );

    let mut members: Vec<String> = r
        .custom(fred::cmd!("ZRANGE"), vec!["shop:connections", "0", "-1"])
        .await
        .unwrap();
    members.sort();
    assert_eq!(
        members,
        ["alice:a1", "alice:a2", "bob:b1", "carol:c1", "carol:c2"].map(String::from)
    );
    for index in [
        "shop:connections",
        "shop:connections:alice",
        "shop:connections:bob",
        "shop:connections:carol",
    ] {
        let ttl: i64 = r.custom(fred::cmd!("TTL"), vec![index]).await.unwrap();
        assert!((1..=60).contains(&ttl), "{index} expires: {ttl}");
    }
    let id: Option<String> = r
        .custom(fred::cmd!("HGET"), vec!["shop:client:bob:b1", "id"])
        .await
        .unwrap();
    assert_eq!(
        id.as_deref(),
        Some("b1"),
        "an admitted join writes its entry"
    );
    let refused_entry: i64 = r
        .custom(fred::cmd!("EXISTS"), vec!["shop:client:carol:c3"])
        .await
        .unwrap();
    assert_eq!(refused_entry, 0, "a refused join writes nothing");
}
