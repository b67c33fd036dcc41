//! Chaos harness: EventSource-like clients that resume with `Last-Event-ID`, a durable publisher
//! load that keeps a ledger of what was acknowledged, and a verdict that counts, per stream, the
//! events lost, duplicated and reordered.
//!
//! Events are identified by their content (`{"topic": <user or "*">, "n": <counter>}`), not by the
//! gateway's ids, so a verdict holds whatever the ids look like. Every task is bounded in time and
//! count, and all traffic stays on loopback.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::interfaces::ClientLike;
use fred::types::Value as RedisValue;
use fred::types::config::{Config, ReconnectPolicy};
use serde_json::{Value, json};
use sse_gateway::history::Partitions;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{SseClient, publisher_token, user_token};

/// The topic of broadcasts; user topics are the user ids.
pub const BROADCAST: &str = "*";
/// The event type of the load's events.
const EVENT_TYPE: &str = "t";
/// Longest wait between reconnects, whatever `retry:` says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(3);
/// A client gives up after this many connection attempts...
const MAX_ATTEMPTS: u32 = 1_000;
/// ... or after this long, stopped or not.
const MAX_CLIENT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest wait for the response head of `/sse`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Chaos scenarios each load the machine fully (tens of streams, hundreds of publishes a second):
/// they run one at a time, even under the default parallel test runner, so that none of them
/// measures another's load. (An async lock: it is held across awaits, and a panicking holder
/// does not poison it.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// `u00`, `u01`, ...: `count` user ids.
pub fn users(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("u{i:02}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Clients

/// What a stream received that matters to the verdict, in receive order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// A durable event of the load.
    Event { topic: String, n: u64, id: String },
    /// A `reset`: whatever was missing before it is announced.
    Reset { id: Option<String>, reason: String },
}

/// Everything one stream saw, across its reconnects.
#[derive(Clone, Debug, Default)]
pub struct StreamLog {
    pub name: String,
    pub user: String,
    /// When the first `200` came back: events published from then on must arrive.
    pub first_connected: Option<Instant>,
    pub receipts: Vec<Receipt>,
    /// `200` responses.
    pub connects: u32,
    /// Attempts that failed: connection errors, timeouts, other statuses.
    pub failed_attempts: u32,
    /// Durable-looking events whose data was not the load's (counted, not judged).
    pub foreign: u32,
    pub last_event_id: Option<String>,
}

impl StreamLog {
    pub fn new(name: &str, user: &str) -> StreamLog {
        StreamLog {
            name: name.into(),
            user: user.into(),
            ..StreamLog::default()
        }
    }

    /// The highest `n` received of `topic`.
    fn highest(&self, topic: &str) -> Option<u64> {
        self.receipts
            .iter()
            .filter_map(|r| match r {
                Receipt::Event { topic: t, n, .. } if t == topic => Some(*n),
                _ => None,
            })
            .max()
    }
}

/// One EventSource-like client, running as a task.
pub struct Stream {
    pub user: String,
    log: Arc<Mutex<StreamLog>>,
    /// A request to drop the connection and stay away for a while.
    away: Arc<(Mutex<Option<Duration>>, Notify)>,
    task: JoinHandle<()>,
}

impl Stream {
    /// Starts a client for `user` of `app` on `bases[start % len]` (base URLs such as
    /// `http://127.0.0.1:8080`); each reconnect moves on to the next base URL.
    pub fn spawn(
        name: &str,
        app: &str,
        user: &str,
        bases: &[String],
        start: usize,
        stop: CancellationToken,
    ) -> Stream {
        assert!(!bases.is_empty(), "at least one gateway");
        let log = Arc::new(Mutex::new(StreamLog::new(name, user)));
        let away = Arc::new((Mutex::new(None), Notify::new()));
        let task = tokio::spawn(run_client(
            app.to_string(),
            user.to_string(),
            bases.to_vec(),
            start,
            log.clone(),
            away.clone(),
            stop,
        ));
        Stream {
            user: user.into(),
            log,
            away,
            task,
        }
    }

    /// A copy of what the stream saw so far.
    pub fn log(&self) -> StreamLog {
        self.log.lock().unwrap().clone()
    }

    pub fn connected(&self) -> bool {
        self.log.lock().unwrap().first_connected.is_some()
    }

    /// Drops the connection now and reconnects (with `Last-Event-ID`) after `away`.
    pub fn go_away(&self, away: Duration) {
        *self.away.0.lock().unwrap() = Some(away);
        self.away.1.notify_one();
    }
}

/// The client's loop: connect, read, and on any end wait `retry` and resume with the last id.
async fn run_client(
    app: String,
    user: String,
    bases: Vec<String>,
    start: usize,
    log: Arc<Mutex<StreamLog>>,
    away: Arc<(Mutex<Option<Duration>>, Notify)>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let token = user_token(&app, &user);
    // EventSource's default until the server says otherwise.
    let mut retry = Duration::from_millis(3000);
    let mut last_id: Option<String> = None;
    let deadline = tokio::time::Instant::now() + MAX_CLIENT_LIFETIME;
    for attempt in 0..MAX_ATTEMPTS as usize {
        if stop.is_cancelled() || tokio::time::Instant::now() >= deadline {
            return;
        }
        let base = &bases[(start + attempt) % bases.len()];
        let mut req = http.get(format!("{base}/sse")).bearer_auth(&token);
        if let Some(id) = last_id.as_deref().filter(|id| !id.is_empty()) {
            req = req.header("last-event-id", id);
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, SseClient::try_open(req)) => r,
        };
        let mut away_for = None;
        match opened {
            Ok(Ok(mut c)) if c.status == 200 => {
                {
                    let mut l = log.lock().unwrap();
                    l.connects += 1;
                    l.first_connected.get_or_insert_with(Instant::now);
                }
                loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = away.1.notified() => {
                            // Dropping `c` closes the connection; the client comes back later.
                            away_for = away.0.lock().unwrap().take();
                            break;
                        }
                        ev = c.next_within(MAX_CLIENT_LIFETIME) => ev,
                    };
                    if let Some(r) = c.retry {
                        retry = Duration::from_millis(r);
                    }
                    if c.last_event_id.is_some() {
                        last_id.clone_from(&c.last_event_id);
                    }
                    let Some(ev) = ev else { break };
                    record(&log, ev, &last_id);
                }
            }
            _ => log.lock().unwrap().failed_attempts += 1,
        }
        let wait = away_for.unwrap_or(retry.min(MAX_RETRY_WAIT));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn record(log: &Mutex<StreamLog>, ev: super::Event, last_id: &Option<String>) {
    let mut l = log.lock().unwrap();
    l.last_event_id.clone_from(last_id);
    if ev.event == "reset" {
        let reason = serde_json::from_str::<Value>(&ev.data)
            .ok()
            .and_then(|v| v["reason"].as_str().map(String::from))
            .unwrap_or_default();
        l.receipts.push(Receipt::Reset { id: ev.id, reason });
        return;
    }
    let Some(id) = ev.id else {
        return; // ping, shutdown, token_expired: not durable
    };
    let parsed = serde_json::from_str::<Value>(&ev.data).ok().and_then(|v| {
        Some((
            v["topic"].as_str()?.to_string(),
            v["n"].as_u64()?,
            ev.event == EVENT_TYPE,
        ))
    });
    match parsed {
        Some((topic, n, true)) => l.receipts.push(Receipt::Event { topic, n, id }),
        _ => l.foreign += 1,
    }
}

/// The streams of one scenario, stopped together.
pub struct Fleet {
    pub streams: Vec<Stream>,
    stop: CancellationToken,
}

impl Fleet {
    /// `per_user` streams for each user of `app`, spread over the gateways' base URLs.
    pub fn spawn(app: &str, users: &[String], per_user: usize, bases: &[String]) -> Fleet {
        let stop = CancellationToken::new();
        let mut streams = Vec::new();
        for k in 0..per_user {
            for user in users {
                let name = format!("{user}#{k}");
                let start = streams.len();
                streams.push(Stream::spawn(&name, app, user, bases, start, stop.clone()));
            }
        }
        Fleet { streams, stop }
    }

    /// Waits until every stream had its first `200`; panics after `within`.
    pub async fn wait_connected(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let missing = self.streams.iter().filter(|s| !s.connected()).count();
            if missing == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} streams not connected within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> Vec<StreamLog> {
        self.streams.iter().map(Stream::log).collect()
    }

    /// Waits until every stream has the last acknowledged event of its topics (or something later),
    /// or `within` passed.
    pub async fn drain(&self, ledger: &Ledger, within: Duration) {
        let deadline = Instant::now() + within;
        let caught_up = |l: &StreamLog| {
            [l.user.as_str(), BROADCAST]
                .iter()
                .all(|topic| match ledger.last_acked(topic) {
                    None => true,
                    Some(want) => l.highest(topic).is_some_and(|got| got >= want),
                })
        };
        while Instant::now() < deadline && !self.logs().iter().all(caught_up) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every client and returns what each saw.
    pub async fn stop(self) -> Vec<StreamLog> {
        self.stop.cancel();
        let mut logs = Vec::new();
        for s in self.streams {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.task).await;
            logs.push(s.log.lock().unwrap().clone());
        }
        logs
    }
}

// ---------------------------------------------------------------------------------------------
// Publishers

/// What came of one publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged with this event id: it must be delivered.
    Acked(String),
    /// Failed or timed out: it may or may not exist.
    Uncertain,
}

/// One publish of a topic.
#[derive(Clone, Debug)]
pub struct Sent {
    /// When the request was sent.
    pub at: Instant,
    pub outcome: Outcome,
}

/// Per topic, per `n`, what each publish came to; and the failures, by kind.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub topics: HashMap<String, BTreeMap<u64, Sent>>,
    pub failures: BTreeMap<String, u64>,
}

impl Ledger {
    pub fn record(&mut self, topic: &str, n: u64, at: Instant, outcome: Outcome) {
        self.topics
            .entry(topic.to_string())
            .or_default()
            .insert(n, Sent { at, outcome });
    }

    pub fn acked(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Acked(_)))
    }

    /// Every acknowledged event, as (topic, n).
    pub fn acked_events(&self) -> Vec<(String, u64)> {
        self.topics
            .iter()
            .flat_map(|(topic, sent)| {
                sent.iter()
                    .filter(|(_, s)| matches!(s.outcome, Outcome::Acked(_)))
                    .map(move |(n, _)| (topic.clone(), *n))
            })
            .collect()
    }

    pub fn uncertain(&self) -> usize {
        self.count(|o| *o == Outcome::Uncertain)
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.topics
            .values()
            .flat_map(|t| t.values())
            .filter(|s| f(&s.outcome))
            .count()
    }

    pub fn last_acked(&self, topic: &str) -> Option<u64> {
        self.topics.get(topic).and_then(|t| {
            t.iter()
                .rev()
                .find(|(_, s)| matches!(s.outcome, Outcome::Acked(_)))
                .map(|(n, _)| *n)
        })
    }
}

impl fmt::Display for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published: {} acked, {} uncertain",
            self.acked(),
            self.uncertain()
        )?;
        for (kind, count) in &self.failures {
            write!(f, "; {count} × {kind}")?;
        }
        Ok(())
    }
}

/// The durable load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub app: String,
    /// One sequential publisher per user, plus one for broadcasts.
    pub users: Vec<String>,
    pub broadcast: bool,
    /// Publishes per second, all publishers together.
    pub rate: u32,
    /// Longest wait for one publish's answer.
    pub timeout: Duration,
    /// `FCALL` publishes count as acknowledged only once this many replicas hold them (`WAIT`,
    /// as a backend asks for it); 0 acknowledges on the primary's answer.
    pub wait_replicas: u32,
    /// Redis Cluster: `FCALL` declares the application's key (`1 {app}`), and `WAIT` goes to the
    /// node that holds its slot.
    pub cluster: bool,
    /// `CLUSTER_PARTITIONS` of the gateways: a user's `FCALL` goes to their partition's history
    /// (`1 {app#k} app#k`), and a broadcast to every partition, one `FCALL` each.
    pub partitions: u32,
}

impl LoadConfig {
    /// 50 users and broadcasts of `app`, 250 publishes/s, 2 s per request.
    pub fn new(app: &str) -> LoadConfig {
        LoadConfig {
            app: app.into(),
            users: users(50),
            broadcast: true,
            rate: 250,
            timeout: Duration::from_secs(2),
            wait_replicas: 0,
            cluster: false,
            partitions: 1,
        }
    }
}

/// A Redis client for `FCALL sse_publish` that never replays a command by itself: a command cut
/// by a dropped link fails (it is then uncertain) instead of being written again later, where it
/// would duplicate an event or land after the publisher's next one.
pub async fn fcall_client(redis_url: &str) -> fred::clients::Client {
    let config = Config::from_url(redis_url).expect("redis url");
    let client = fred::types::Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .with_connection_config(|c| {
            c.max_command_attempts = 1;
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(1);
        })
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .build()
        .expect("client");
    client.init().await.expect("connect to test redis");
    client
}

/// Publishers running until stopped; each awaits its answer before its next publish, so the
/// order of a topic's acknowledged events is known.
pub struct Load {
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
    paused: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the publishers: each alternates `FCALL sse_publish` on `redis` and `POST /publish`
    /// on the gateways' base URLs (moving to the next gateway after a failed request).
    pub async fn start(cfg: LoadConfig, redis_url: &str, bases: &[String]) -> Load {
        assert!(!bases.is_empty() && cfg.rate > 0);
        let redis = fcall_client(redis_url).await;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .build()
            .expect("client");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = CancellationToken::new();
        let (paused, paused_rx) = tokio::sync::watch::channel(false);
        let mut topics: Vec<String> = cfg.users.clone();
        if cfg.broadcast {
            topics.push(BROADCAST.into());
        }
        let period = Duration::from_secs_f64(topics.len() as f64 / f64::from(cfg.rate));
        let tasks = topics
            .into_iter()
            .enumerate()
            .map(|(i, topic)| {
                let p = Publisher {
                    app: cfg.app.clone(),
                    topic,
                    redis: redis.clone(),
                    http: http.clone(),
                    token: publisher_token(&cfg.app),
                    bases: bases.to_vec(),
                    gateway: i,
                    timeout: cfg.timeout,
                    wait_replicas: cfg.wait_replicas,
                    cluster: cfg.cluster,
                    partitions: Partitions::new(cfg.partitions).expect("1 to 1024 partitions"),
                    ledger: ledger.clone(),
                };
                // Staggered, so the publishers do not fire all at once.
                let offset = period.mul_f64(i as f64 / (cfg.users.len() + 1) as f64);
                tokio::spawn(p.run(period, offset, stop.clone(), paused_rx.clone()))
            })
            .collect();
        Load {
            ledger,
            stop,
            paused,
            tasks,
        }
    }

    /// A copy of the ledger so far.
    pub fn ledger(&self) -> Ledger {
        self.ledger.lock().unwrap().clone()
    }

    /// Publishers finish their current request and wait.
    pub fn pause(&self) {
        let _ = self.paused.send(true);
    }

    pub fn resume(&self) {
        let _ = self.paused.send(false);
    }

    /// Stops publishing (each publisher finishes its current request) and returns the ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.cancel();
        for t in self.tasks {
            // A request is bounded by its timeout; this bound only guards against a hung task.
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.ledger.lock().unwrap().clone()
    }
}

struct Publisher {
    app: String,
    topic: String,
    redis: fred::clients::Client,
    http: reqwest::Client,
    token: String,
    bases: Vec<String>,
    /// Index (modulo) of the gateway to publish to over HTTP.
    gateway: usize,
    timeout: Duration,
    wait_replicas: u32,
    cluster: bool,
    partitions: Partitions,
    ledger: Arc<Mutex<Ledger>>,
}

impl Publisher {
    async fn run(
        mut self,
        period: Duration,
        offset: Duration,
        stop: CancellationToken,
        mut paused: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + offset, period.max(ms(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if *paused.borrow() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = paused.wait_for(|p| !*p) => continue,
                }
            }
            n += 1;
            let at = Instant::now();
            let result = if n % 2 == 1 {
                self.fcall(n).await
            } else {
                self.post(n).await
            };
            let outcome = match result {
                Ok(id) => Outcome::Acked(id),
                Err(kind) => {
                    if kind.starts_with("http") {
                        self.gateway += 1;
                    }
                    let mut l = self.ledger.lock().unwrap();
                    *l.failures.entry(kind).or_default() += 1;
                    Outcome::Uncertain
                }
            };
            self.ledger
                .lock()
                .unwrap()
                .record(&self.topic, n, at, outcome);
        }
    }

    fn data(&self, n: u64) -> Value {
        json!({"topic": self.topic, "n": n})
    }

    /// `FCALL sse_publish 0 <app> <user or ""> <envelope>` (the cluster form on a cluster, to
    /// every partition for a broadcast): the (first) event id, or the kind of failure.
    async fn fcall(&self, n: u64) -> Result<String, String> {
        let (user, histories) = if self.topic == BROADCAST {
            ("", self.partitions.histories(&self.app))
        } else {
            (
                self.topic.as_str(),
                vec![self.partitions.history(&self.app, &self.topic)],
            )
        };
        let mut first = None;
        for history in histories {
            let id = self.fcall_one(&history, user, n).await?;
            first.get_or_insert(id);
        }
        first.ok_or_else(|| "fcall to no history".into())
    }

    async fn fcall_one(&self, app: &str, user: &str, n: u64) -> Result<String, String> {
        let envelope = json!({"type": EVENT_TYPE, "data": self.data(n)}).to_string();
        let key = format!("{{{app}}}");
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let call = if self.cluster {
            self.redis.custom::<Vec<RedisValue>, _>(
                fred::cmd!("FCALL", hash: fred::types::ClusterHash::Custom(slot)),
                vec!["sse_publish", "1", &key, app, user, &envelope],
            )
        } else {
            self.redis.custom::<Vec<RedisValue>, _>(
                fred::cmd!("FCALL"),
                vec!["sse_publish", "0", app, user, &envelope],
            )
        };
        let id = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err("fcall timeout".to_string()),
            // The message's start says which failure it was (a missing function, a dropped link).
            Ok(Err(e)) => Err(format!(
                "fcall {:?} ({})",
                e.kind(),
                e.details().chars().take(40).collect::<String>()
            )),
            Ok(Ok(answer)) => answer
                .first()
                .and_then(|v| v.as_string())
                .ok_or_else(|| "fcall odd answer".into()),
        }?;
        if self.wait_replicas > 0 {
            // On a cluster, WAIT must run where the FCALL ran: the node of the app's slot.
            let wait = self.redis.custom::<i64, _>(
                fred::cmd!("WAIT", hash: fred::types::ClusterHash::Custom(slot)),
                vec![self.wait_replicas.to_string(), "1000".to_string()],
            );
            match tokio::time::timeout(self.timeout, wait).await {
                Ok(Ok(n)) if n >= i64::from(self.wait_replicas) => {}
                _ => return Err("fcall not replicated".into()),
            }
        }
        Ok(id)
    }

    /// `POST /publish` to one user (`{"user": ..}`) or all (`{"broadcast": true}`).
    async fn post(&self, n: u64) -> Result<String, String> {
        let mut body = json!({"type": EVENT_TYPE, "data": self.data(n)});
        if self.topic == BROADCAST {
            body["broadcast"] = json!(true);
        } else {
            body["user"] = json!(self.topic);
        }
        let base = &self.bases[self.gateway % self.bases.len()];
        let resp = self
            .http
            .post(format!("{base}/publish"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "http timeout".to_string()
                } else {
                    "http connection error".to_string()
                }
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(format!("http {status}"));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|_| "http unreadable answer".to_string())?;
        v["ids"][0]
            .as_str()
            .map(String::from)
            .ok_or_else(|| "http answer without id".into())
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// Verdict

/// Counts for a stream, or for all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct events received.
    pub delivered: u64,
    /// Acknowledged, published while the stream existed, never received, and no `reset` covers it.
    pub lost: u64,
    /// Received again.
    pub duplicated: u64,
    /// Acknowledged events received after a later acknowledged one of the same topic.
    pub reordered: u64,
    /// Acknowledged and missing, but with a `reset` in the gap: announced, allowed.
    pub announced: u64,
    /// `reset` events received.
    pub resets: u64,
    /// Publishes of the stream's topics, while it existed, whose fate is unknown.
    pub uncertain: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.announced += o.announced;
        self.resets += o.resets;
        self.uncertain += o.uncertain;
    }

    pub fn problems(&self) -> u64 {
        self.lost + self.duplicated + self.reordered
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {:>6}  lost {:>5}  dup {:>4}  reorder {:>4}  announced {:>5}  resets {:>3}  uncertain {:>4}",
            self.delivered,
            self.lost,
            self.duplicated,
            self.reordered,
            self.announced,
            self.resets,
            self.uncertain
        )
    }
}

#[derive(Clone, Debug)]
pub struct StreamVerdict {
    pub name: String,
    pub counts: Counts,
    pub connects: u32,
    /// A few problems, for the report: `lost topic:n`, `dup topic:n <first id> <second id>` (one
    /// id twice: delivered twice; two ids: published twice), `reorder topic:n after m`.
    pub examples: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Verdict {
    pub streams: Vec<StreamVerdict>,
    pub total: Counts,
}

impl Verdict {
    /// Streams with lost, duplicated or reordered events, or that never connected.
    pub fn bad_streams(&self) -> impl Iterator<Item = &StreamVerdict> {
        self.streams
            .iter()
            .filter(|s| s.counts.problems() > 0 || s.connects == 0)
    }

    /// No stream lost, duplicated or reordered an event, and every stream connected (a stream that
    /// never did would be clean for nothing).
    pub fn is_clean(&self) -> bool {
        self.bad_streams().next().is_none()
    }

    /// Panics, with the table, unless `is_clean`.
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "\n{self}");
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bad: Vec<&StreamVerdict> = self.bad_streams().collect();
        writeln!(
            f,
            "{} streams, {} with problems; total: {}",
            self.streams.len(),
            bad.len(),
            self.total
        )?;
        for s in bad.iter().take(60) {
            writeln!(
                f,
                "  {:<8} {}  connects {:>3}  e.g. {}",
                s.name,
                s.counts,
                s.connects,
                s.examples.join(", ")
            )?;
        }
        if bad.len() > 60 {
            writeln!(f, "  ... and {} more", bad.len() - 60)?;
        }
        Ok(())
    }
}

/// Judges every stream against the ledger.
pub fn judge(ledger: &Ledger, logs: &[StreamLog]) -> Verdict {
    let mut total = Counts::default();
    let streams: Vec<StreamVerdict> = logs
        .iter()
        .map(|log| {
            let mut counts = Counts::default();
            let mut examples = Vec::new();
            for topic in [log.user.as_str(), BROADCAST] {
                judge_topic(ledger, log, topic, &mut counts, &mut examples);
            }
            counts.resets = log
                .receipts
                .iter()
                .filter(|r| matches!(r, Receipt::Reset { .. }))
                .count() as u64;
            total.add(&counts);
            StreamVerdict {
                name: log.name.clone(),
                counts,
                connects: log.connects,
                examples,
            }
        })
        .collect();
    Verdict { streams, total }
}

fn judge_topic(
    ledger: &Ledger,
    log: &StreamLog,
    topic: &str,
    counts: &mut Counts,
    examples: &mut Vec<String>,
) {
    let mut example = |text: String| {
        if examples.len() < 4 {
            examples.push(text);
        }
    };
    let empty = BTreeMap::new();
    let sent = ledger.topics.get(topic).unwrap_or(&empty);
    let acked = |n: u64| {
        matches!(
            sent.get(&n),
            Some(Sent {
                outcome: Outcome::Acked(_),
                ..
            })
        )
    };
    // n -> position and id of its first receipt.
    let mut first_at: BTreeMap<u64, (usize, &str)> = BTreeMap::new();
    let mut highest_acked = 0;
    for (pos, r) in log.receipts.iter().enumerate() {
        let Receipt::Event { topic: t, n, id } = r else {
            continue;
        };
        if t != topic {
            continue;
        }
        if let Some((_, first)) = first_at.get(n) {
            counts.duplicated += 1;
            example(format!("dup {topic}:{n} {first} {id}"));
            continue;
        }
        first_at.insert(*n, (pos, id));
        counts.delivered += 1;
        // An uncertain publish has no known place in its topic's order: only acknowledged ones
        // are ordered.
        if acked(*n) {
            if *n < highest_acked {
                counts.reordered += 1;
                example(format!("reorder {topic}:{n} after {highest_acked}"));
            }
            highest_acked = highest_acked.max(*n);
        }
    }
    let resets: Vec<usize> = log
        .receipts
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Receipt::Reset { .. }))
        .map(|(pos, _)| pos)
        .collect();
    let Some(since) = log.first_connected else {
        return;
    };
    for (&n, s) in sent.iter().filter(|(_, s)| s.at >= since) {
        if s.outcome == Outcome::Uncertain {
            counts.uncertain += 1;
            continue;
        }
        if first_at.contains_key(&n) {
            continue;
        }
        // The gap runs from the last event received before n to the first one after it; a reset
        // received in between announces it.
        let after = first_at.range(..n).next_back().map(|(_, &(p, _))| p);
        let before = first_at.range(n + 1..).next().map(|(_, &(p, _))| p);
        let covered = resets
            .iter()
            .any(|&p| after.is_none_or(|a| p > a) && before.is_none_or(|b| p < b));
        if covered {
            counts.announced += 1;
        } else {
            counts.lost += 1;
            example(format!("lost {topic}:{n}"));
        }
    }
}

/// The start of a scenario: `per_user` streams for each user of `cfg` on the gateways (base URLs),
/// all connected, then the load.
pub async fn start(
    cfg: LoadConfig,
    per_user: usize,
    redis_url: &str,
    bases: &[String],
) -> (Fleet, Load) {
    let fleet = Fleet::spawn(&cfg.app, &cfg.users, per_user, bases);
    fleet.wait_connected(Duration::from_secs(10)).await;
    let load = Load::start(cfg, redis_url, bases).await;
    (fleet, load)
}

/// The end of a scenario: stops publishing, lets the streams catch up (10 s at most), stops them,
/// and judges.
pub async fn finish(load: Load, fleet: Fleet) -> (Ledger, Verdict) {
    let ledger = load.stop().await;
    fleet.drain(&ledger, Duration::from_secs(10)).await;
    let logs = fleet.stop().await;
    let verdict = judge(&ledger, &logs);
    (ledger, verdict)
}

/// After a failover under load: publishing goes on (300 more acknowledged), the gateways are ready
/// again, then the scenario ends and is judged: per stream nothing lost without a `reset`, nothing
/// duplicated, nothing out of order. Returns the ledger.
pub async fn recovers(
    scenario: &str,
    started: Instant,
    load: Load,
    fleet: Fleet,
    ready: impl std::future::Future<Output = ()>,
) -> Ledger {
    let since_failover = load.ledger().acked();
    super::eventually(
        Duration::from_secs(30),
        "acknowledged publishes again",
        || async { load.ledger().acked() > since_failover + 300 },
    )
    .await;
    ready.await;
    let (ledger, verdict) = finish(load, fleet).await;
    println!(
        "{scenario} ({:.1} s): {ledger}\n{verdict}",
        started.elapsed().as_secs_f64()
    );
    assert!(verdict.total.delivered > 0, "{scenario}: nothing delivered");
    verdict.assert_clean();
    ledger
}

/// Asserts that every event the publishers saw acknowledged is in the history `primary` holds for
/// the load's 50 users and broadcasts; `base` starts the keys (`<app>`, or `{<app>}` on Cluster).
pub async fn assert_acknowledged_kept(
    primary: &fred::clients::Client,
    base: &str,
    ledger: &Ledger,
) {
    let mut streams: Vec<String> = users(50)
        .iter()
        .map(|u| format!("{base}:history:user:{u}"))
        .collect();
    streams.push(format!("{base}:history:app"));
    let kept = kept_events(primary, &streams).await;
    assert_all_kept(&kept, ledger, "on the new primary");
}

/// As [`assert_acknowledged_kept`] for an application spread over `partitions` on a cluster
/// (`client` routes each read to the primary holding its slot now): every acknowledged user
/// event in its user's partition, every acknowledged broadcast in every partition.
pub async fn assert_acknowledged_kept_partitioned(
    client: &fred::clients::Client,
    app: &str,
    partitions: u32,
    ledger: &Ledger,
) {
    let p = Partitions::new(partitions).expect("1 to 1024 partitions");
    let streams: Vec<String> = users(50)
        .iter()
        .map(|u| format!("{{{}}}:history:user:{u}", p.history(app, u)))
        .collect();
    let mut kept = kept_events(client, &streams).await;
    let mut everywhere: Option<HashSet<(String, u64)>> = None;
    for history in p.histories(app) {
        let stream = format!("{{{history}}}:history:app");
        let here = kept_events(client, std::slice::from_ref(&stream)).await;
        everywhere = Some(match everywhere {
            None => here,
            Some(all) => all.intersection(&here).cloned().collect(),
        });
    }
    kept.extend(everywhere.unwrap_or_default());
    assert_all_kept(&kept, ledger, "in every history that should hold them");
}

fn assert_all_kept(kept: &HashSet<(String, u64)>, ledger: &Ledger, place: &str) {
    let acked = ledger.acked_events();
    let missing: Vec<&(String, u64)> = acked.iter().filter(|e| !kept.contains(e)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events are not {place}: {:?}",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
}

/// The `(topic, n)` of every load event in `streams`.
async fn kept_events(
    primary: &fred::clients::Client,
    streams: &[String],
) -> HashSet<(String, u64)> {
    let mut kept: HashSet<(String, u64)> = HashSet::new();
    for stream in streams {
        let entries: Vec<(String, Vec<String>)> = primary
            .custom(fred::cmd!("XRANGE"), vec![stream.as_str(), "-", "+"])
            .await
            .expect("XRANGE on the new primary");
        for (_, fields) in entries {
            let m: Value = fields
                .get(1)
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or_default();
            if let (Some(topic), Some(n)) = (m["data"]["topic"].as_str(), m["data"]["n"].as_u64()) {
                kept.insert((topic.to_string(), n));
            }
        }
    }
    kept
}

/// How a primary is failed over in the Sentinel and Cluster scenarios.
pub enum Fault {
    /// Asked for (`SENTINEL FAILOVER`, `CLUSTER FAILOVER`): the primary, still running, hands over
    /// to its replica.
    Failover,
    /// The primary is SIGKILLed; its replica is promoted. It comes back as the new primary's
    /// replica, so that acknowledgements (one replica) are possible again.
    KillPrimary,
}
