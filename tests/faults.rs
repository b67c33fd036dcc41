//! Faults under durable load: Redis restarts (with and without persistence), a gateway SIGKILL,
//! history expiry and trim, SIGTERM while Redis is down. Each scenario runs 50 EventSource-like
//! clients (resuming with `Last-Event-ID`, honouring `retry:`) against real `redis-server` and
//! gateway processes while sequential publishers send about 250 durable events a second through
//! `FCALL sse_publish` and `POST /publish`; then, per stream: nothing acknowledged is missing
//! unless a `reset` announced the gap, nothing arrives twice, nothing out of order.
//!
//! `cargo test --test faults -- --nocapture` prints each scenario's figures.

mod common;

use std::time::{Duration, Instant};

use common::chaos::*;
use common::*;

const APP: &str = "shop";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A gateway on `redis` with a short `retry:` hint (clients come back within half a second), and
/// `env` on top.
async fn gateway(redis: &RedisServer, env: &[(&str, &str)]) -> Gateway {
    let mut b = Gateway::builder()
        .process()
        .redis(redis)
        .env("RETRY_MS", "500");
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().await
}

/// Ends a scenario, prints its figures and makes sure it measured something: a run where little was
/// acknowledged or nothing delivered would be clean for nothing.
async fn end(scenario: &str, started: Instant, load: Load, fleet: Fleet) -> Verdict {
    let (ledger, verdict) = finish(load, fleet).await;
    println!(
        "{scenario} ({:.1} s): {ledger}\n{verdict}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        ledger.acked() >= 300,
        "{scenario}: too few acknowledged publishes to judge: {ledger}"
    );
    assert!(verdict.total.delivered > 0, "{scenario}: nothing delivered");
    verdict
}

/// Kills Redis for about a second, mid-run, and starts it again on the same port; `persistent`
/// keeps its data (AOF, fsync on every write).
async fn redis_restart(scenario: &str, persistent: bool) {
    let _serial = serial().await;
    let started = Instant::now();
    let mut redis = if persistent {
        RedisServer::start_persistent()
    } else {
        RedisServer::start()
    };
    let gw = gateway(&redis, &[]).await;
    let bases = vec![gw.url("")];
    let (fleet, load) = start(LoadConfig::new(APP), 1, &redis.url(), &bases).await;

    tokio::time::sleep(secs(3.5)).await;
    // Ten streams leave just before the fault and resume after it, from an id of the history
    // before the restart: they get what they missed, or (the history gone) a reset.
    for s in &fleet.streams[..10] {
        s.go_away(secs(3.0));
    }
    tokio::time::sleep(secs(0.5)).await;
    redis.kill();
    tokio::time::sleep(secs(1.0)).await;
    tokio::task::block_in_place(|| redis.restart());
    tokio::time::sleep(secs(7.0)).await;

    let verdict = end(scenario, started, load, fleet).await;
    verdict.assert_clean();
    assert!(
        verdict.streams[..10].iter().all(|s| s.connects >= 2),
        "the streams that left came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_loses_nothing() {
    redis_restart("redis_restart_with_aof", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_announces_the_gap() {
    redis_restart("redis_restart_without_persistence", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkill_clients_resume_elsewhere() {
    let _serial = serial().await;
    let started = Instant::now();
    let redis = RedisServer::start();
    let mut a = gateway(&redis, &[]).await;
    let b = gateway(&redis, &[]).await;
    // Streams start on alternate gateways, and each reconnect tries the other one.
    let bases = vec![a.url(""), b.url("")];
    let (fleet, load) = start(LoadConfig::new(APP), 1, &redis.url(), &bases).await;

    tokio::time::sleep(secs(4.0)).await;
    a.kill();
    tokio::time::sleep(secs(6.0)).await;

    let verdict = end("gateway_sigkill", started, load, fleet).await;
    verdict.assert_clean();
    let moved = verdict.streams.iter().filter(|s| s.connects >= 2).count();
    assert!(
        moved >= 20,
        "the killed gateway's streams reconnected: {moved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_expiry_and_recreation_is_never_silent() {
    let _serial = serial().await;
    let started = Instant::now();
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[("HISTORY_TTL", "2s")]).await;
    let bases = vec![gw.url("")];
    let (fleet, load) = start(LoadConfig::new(APP), 1, &redis.url(), &bases).await;

    tokio::time::sleep(secs(2.0)).await;
    // Ten streams leave for 6 s; for 2 s they miss events of their own and broadcasts.
    for s in &fleet.streams[..10] {
        s.go_away(secs(6.0));
    }
    tokio::time::sleep(secs(2.0)).await;
    // Then nothing is published for longer than the TTL: every history expires whole (entries
    // and trim markers), and the next publishes create it anew, before the ten come back.
    load.pause();
    tokio::time::sleep(secs(3.5)).await;
    load.resume();
    tokio::time::sleep(secs(4.5)).await;

    let verdict = end("history_expiry_and_recreation", started, load, fleet).await;
    let away = &verdict.streams[..10];
    verdict.assert_clean();
    assert!(
        away.iter().all(|s| s.connects >= 2),
        "the streams that left came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trim_while_away_is_announced() {
    let _serial = serial().await;
    let started = Instant::now();
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[("HISTORY_MAXLEN", "20")]).await;
    let bases = vec![gw.url("")];
    // 10 users with 5 streams each (tabs): about 23 events a second per topic.
    let mut cfg = LoadConfig::new(APP);
    cfg.users = users(10);
    let (fleet, load) = start(cfg, 5, &redis.url(), &bases).await;

    tokio::time::sleep(secs(2.0)).await;
    // One tab of each user leaves for 5 s: over 100 events of each topic go by, 20 are kept.
    for s in &fleet.streams[..10] {
        s.go_away(secs(5.0));
    }
    tokio::time::sleep(secs(8.0)).await;

    let verdict = end("history_trim", started, load, fleet).await;
    verdict.assert_clean();
    for s in &verdict.streams[..10] {
        assert!(
            s.counts.resets >= 1 && s.counts.announced >= 80,
            "{} was told of the trimmed gap: {}",
            s.name,
            s.counts
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_redis_is_down_exits_in_bounded_time() {
    let _serial = serial().await;
    let started = Instant::now();
    let mut redis = RedisServer::start_persistent();
    let mut gw = gateway(&redis, &[("SHUTDOWN_TIMEOUT", "3s")]).await;
    let port = gw.port;
    let bases = vec![gw.url("")];
    let (fleet, load) = start(LoadConfig::new(APP), 1, &redis.url(), &bases).await;

    tokio::time::sleep(secs(4.0)).await;
    redis.kill();
    tokio::time::sleep(secs(1.0)).await;
    gw.signal("TERM");
    let term = Instant::now();
    // Panics (with the gateway's log) if it outlives its drain bound by more than 3 s.
    let code = tokio::task::block_in_place(|| gw.wait_exit(secs(3.0 + 3.0)));
    println!(
        "sigterm_while_redis_is_down: exited with {code:?} after {:.2} s",
        term.elapsed().as_secs_f64()
    );

    // Redis and a gateway come back: what was acknowledged before Redis went away reaches every
    // stream (an event acknowledged in Redis's last moment may only be in history by then).
    tokio::task::block_in_place(|| redis.restart());
    let _back = Gateway::builder()
        .process()
        .redis(&redis)
        .port(port)
        .env("RETRY_MS", "500")
        .start()
        .await;
    tokio::time::sleep(secs(3.0)).await;
    let verdict = end("sigterm_while_redis_is_down", started, load, fleet).await;
    verdict.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// The verdict itself, on synthetic input.

fn event(topic: &str, n: u64) -> Receipt {
    Receipt::Event {
        topic: topic.into(),
        n,
        id: format!("{n}-0"),
    }
}

fn reset() -> Receipt {
    Receipt::Reset {
        id: Some("99-0".into()),
        reason: "too_old".into(),
    }
}

fn connected(name: &str, user: &str, at: Instant, receipts: Vec<Receipt>) -> StreamLog {
    StreamLog {
        first_connected: Some(at),
        connects: 1,
        receipts,
        ..StreamLog::new(name, user)
    }
}

#[test]
fn the_verdict_tells_lost_from_announced_duplicated_and_reordered() {
    let t0 = Instant::now();
    let at = |n: u64| t0 + Duration::from_millis(n);
    let mut ledger = Ledger::default();
    for n in 1..=10 {
        ledger.record("alice", n, at(n), Outcome::Acked(format!("{n}-0")));
    }
    ledger.record("alice", 11, at(11), Outcome::Uncertain);
    for n in 1..=4 {
        ledger.record(BROADCAST, n, at(n), Outcome::Acked(format!("{n}-1")));
    }

    let full = connected(
        "alice#0",
        "alice",
        t0,
        vec![
            event("alice", 1),
            event("alice", 2),
            event("alice", 2), // duplicate
            event("alice", 4),
            event("alice", 3), // after 4: reordered
            event(BROADCAST, 1),
            reset(), // covers alice 5 and 6 (between 4 and 7) and broadcasts 2 to 4 (none after)
            event("alice", 7),
            event("alice", 8),
            event("alice", 10), // 9 missing, and no reset between 8 and 10: lost
        ],
    );
    // Connected after alice 5 was published: only 6 and later are owed, and 6 is missing with no
    // reset at all on this stream.
    let late = connected(
        "alice#1",
        "alice",
        at(5) + Duration::from_micros(500),
        vec![
            event("alice", 7),
            event("alice", 8),
            event("alice", 9),
            event("alice", 10),
            event("alice", 11), // uncertain, present once: fine
        ],
    );
    let clean = connected(
        "alice#2",
        "alice",
        at(9) + Duration::from_micros(500),
        vec![event("alice", 10)],
    );
    let verdict = judge(&ledger, &[full, late, clean]);

    let c = &verdict.streams[0].counts;
    assert_eq!(
        (c.delivered, c.duplicated, c.reordered, c.lost, c.announced),
        (8, 1, 1, 1, 5),
        "{verdict}"
    );
    assert_eq!((c.resets, c.uncertain), (1, 1));
    assert_eq!(
        verdict.streams[0].examples,
        vec![
            "dup alice:2 2-0 2-0",
            "reorder alice:3 after 4",
            "lost alice:9"
        ]
    );

    let c = &verdict.streams[1].counts;
    assert_eq!(
        (c.delivered, c.duplicated, c.reordered, c.lost, c.announced),
        (5, 0, 0, 1, 0),
        "{verdict}"
    );
    assert_eq!(verdict.streams[1].examples, vec!["lost alice:6"]);

    assert_eq!(verdict.streams[2].counts.problems(), 0, "{verdict}");
    assert_eq!(verdict.total.lost, 2);
    assert_eq!(verdict.bad_streams().count(), 2);
    let table = verdict.to_string();
    assert!(
        table.contains("alice#0") && !table.contains("alice#2"),
        "{table}"
    );
    assert!(!verdict.is_clean(), "lost events fail the scenario");
}

#[test]
fn a_reset_announces_only_its_own_gap() {
    let t0 = Instant::now();
    let mut ledger = Ledger::default();
    for n in 1..=6 {
        ledger.record("bob", n, t0, Outcome::Acked(n.to_string()));
    }
    // A reset after event 5 does not excuse 2, missing between 1 and 3 long before it; it does
    // excuse 6, missing at the end.
    let log = connected(
        "bob#0",
        "bob",
        t0,
        vec![
            event("bob", 1),
            event("bob", 3),
            event("bob", 4),
            event("bob", 5),
            reset(),
        ],
    );
    let verdict = judge(&ledger, &[log]);
    let c = &verdict.streams[0].counts;
    assert_eq!((c.lost, c.announced), (1, 1), "{verdict}");

    // A reset before the first event announces a gap at the start.
    let log = connected("bob#1", "bob", t0, vec![reset(), event("bob", 4)]);
    let c = judge(&ledger, &[log]).streams[0].counts.clone();
    assert_eq!(
        (c.lost, c.announced),
        (2, 3),
        "5 and 6 come after 4, with no reset after it"
    );

    // A stream that never connected is not clean, whatever it did not see.
    let never = StreamLog::new("bob#2", "bob");
    assert!(!judge(&ledger, &[never]).is_clean());
}
