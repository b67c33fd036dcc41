//! One validation for every publish path: `POST /publish`, `FCALL sse_publish` and a plain
//! `PUBLISH` accept the same envelopes (a JSON object, at most MAX_MESSAGE_BYTES, nested at most
//! 127 deep, a string `type`), and only the durable paths' ids are taken for ids of history.

mod common;

use std::time::Duration;

use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::Value as RedisValue;
use serde_json::json;

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn every_publish_path_refuses_the_same_envelopes() {
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("MAX_MESSAGE_BYTES", "4096")
        .start()
        .await;
    let r = redis.client().await;
    let fcall = |payload: String| {
        let r = r.clone();
        async move {
            r.custom::<RedisValue, _>(
                fred::cmd!("FCALL"),
                vec![
                    "sse_publish".to_string(),
                    "0".into(),
                    "shop".into(),
                    "alice".into(),
                    payload,
                ],
            )
            .await
        }
    };
    let big = "x".repeat(5000);
    let refused = [
        ("not json".to_string(), "JSON object"),
        ("[1]".to_string(), "JSON object"),
        (r#"{"data": 1"#.to_string(), "JSON object"),
        (format!(r#"{{"data":{}}}"#, nested(200)), "deeper"),
        (format!(r#"{{"data":{}}}"#, nested(1500)), "deeper"),
        (
            format!(r#"{{"data":{}}}"#, nested(100_000)),
            "larger than 4096",
        ),
        (r#"{"type": 5}"#.to_string(), "\"type\""),
        (r#"{"retry": -1}"#.to_string(), "\"retry\""),
        (r#"{"retry": 1.5}"#.to_string(), "\"retry\""),
        (format!(r#"{{"data":"{big}"}}"#), "larger than 4096"),
    ];
    for (payload, why) in &refused {
        let err = fcall(payload.clone()).await.unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // Just inside the limits, the function accepts.
    fcall(format!(r#"{{"data":{}}}"#, nested(126)))
        .await
        .unwrap();
    fcall(format!(
        r#"{{"type":"t","retry":5,"data":"{}"}}"#,
        "x".repeat(3900)
    ))
    .await
    .unwrap();

    // POST /publish: the same limits (its body's own JSON parser stops past 127 levels too).
    let post = |body: String| {
        http()
            .post(gw.url("/publish"))
            .bearer_auth(publisher_token("shop"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r1 = post(format!(r#"{{"user":"alice","data":{}}}"#, nested(200)))
        .await
        .unwrap();
    assert_eq!(r1.status(), 400);
    let r2 = post(format!(r#"{{"user":"alice","data":"{big}"}}"#))
        .await
        .unwrap();
    assert_eq!(r2.status(), 413);
    let r3 = post(r#"{"user":"alice","type":5}"#.into()).await.unwrap();
    assert_eq!(r3.status(), 400);
    let ok = post(format!(r#"{{"user":"alice","data":{}}}"#, nested(120)))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // A plain PUBLISH of what no durable path accepts is not delivered, and counted.
    let mut alice = gw.connect("shop", "alice").await;
    let publish = |payload: String| {
        let r = r.clone();
        async move {
            let _: i64 = r.publish("shop:channel:alice", payload).await.unwrap();
        }
    };
    publish(format!(r#"{{"data":{}}}"#, nested(200))).await;
    publish(format!(r#"{{"data":"{big}"}}"#)).await;
    publish(r#"{"type":"fine","data":1}"#.into()).await;
    let ev = alice.next().await;
    assert_eq!(ev.event, "fine", "the refused ones never arrive: {ev:?}");
    assert_eq!(
        gw.metric("sse_messages_dropped_total{reason=\"too_deep\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric("sse_messages_dropped_total{reason=\"too_large\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_publishers_own_id_is_never_taken_for_one_of_history() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis).await;
    let first = gw
        .publish_id("shop", json!({"user": "alice", "data": "first"}))
        .await;
    let epoch = first.rsplit('-').next().unwrap().to_string();
    let mut alice = gw.resume("shop", "alice", &first).await;
    // Fire-and-forget, with an id shaped like one of history far in the future: over HTTP and
    // over Redis. It is delivered with its id, and moves no position.
    let forged = format!("99999999999999-0-{epoch}");
    let r = gw
        .publish(
            "shop",
            json!({"user": "alice", "durable": false, "id": forged, "data": "mine"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r2 = redis.client().await;
    let _: i64 = r2
        .publish(
            "shop:channel:alice",
            json!({"id": forged, "type": "raw-forged", "data": 1}).to_string(),
        )
        .await
        .unwrap();
    // The next durable events still arrive: none is skipped as "already delivered".
    let next = gw
        .publish_id("shop", json!({"user": "alice", "data": "durable"}))
        .await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let ev = alice
            .next_within(Duration::from_secs(5))
            .await
            .expect("three events");
        if ev.event != "ping" {
            got.push((ev.id.unwrap_or_default(), ev.data));
        }
    }
    assert_eq!(
        got,
        [
            (forged.clone(), "\"mine\"".to_string()),
            (forged.clone(), "1".to_string()),
            (next.clone(), "\"durable\"".to_string()),
        ]
    );
    // Resuming from the forged id is not a position in history: a clean reset.
    let mut again = gw.resume("shop", "alice", &forged).await;
    let ev = again.next().await;
    assert_eq!(ev.event, "reset", "{ev:?}");
}
