//! The Redis broker: every use of fred lives in this file.
//!
//! Two connections: one for commands (publish, registry writes, pipelined) and one dedicated
//! subscriber. Both reconnect forever with exponential backoff. Subscribe and unsubscribe requests go
//! through one task, so they reach Redis in the order the hub made them and concurrent requests are
//! batched into one command; that task also restores every wanted subscription after a reconnect
//! (fred's own `manage_subscriptions` is not used: it raced the first subscribe on a fresh link).
//!
//! Registry keys (see docs/redis.md):
//! - `{app}:client:{user}:{conn}`: a hash per live connection, expiring unless rewritten;
//! - `{app}:connections` and `{app}:connections:{user}`: sorted-set indexes whose scores are the
//!   entries' expiry times, so listing never scans the keyspace and dead instances' entries age out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::error::Error as FredError;
use fred::interfaces::{
    ClientLike, EventInterface, HashesInterface, PubsubInterface, SortedSetsInterface,
};
use fred::types::config::{Config as FredConfig, ReconnectPolicy, TcpConfig};
use fred::types::{Builder, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{
    BoxFuture, Broker, BrokerError, ConnectionRecord, IdRef, LinkState, MessageSink, RegistryOp,
    Retention,
};
use crate::history::{Backlog, EventId, ResetReason};
use crate::metrics::{Metrics, ReasonLabel};

/// Upper bound on any single Redis command, so nothing on a request path can hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for bursts between the subscriber connection and the hub; overflowing it loses messages
/// (counted as `lagged`). The hub only queues events on the pump's thread (sockets are written
/// by the fan-out writers), so 16k messages are over a quarter of a second at 60k messages/s.
/// fred allocates it for each of its 8 notification channels, slots included: 64k cost 50 MB of
/// RSS per client before a single stream.
const MESSAGE_BUFFER: usize = 1 << 14;
/// Largest number of subscription requests folded into one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 1024;

/// The Redis Functions (durable publish and replay), shipped with the gateway.
const LIBRARY: &str = include_str!("sse_gateway.lua");

/// The library with this deployment's history settings filled in.
pub fn library(retention: Retention) -> String {
    LIBRARY
        .replace("__MAXLEN__", &retention.max_len.to_string())
        .replace("__TTL__", &retention.ttl_secs.to_string())
}

enum SubRequest {
    Subscribe(Vec<String>, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Vec<String>),
    /// The subscriber link (re)connected: subscribe every wanted channel again.
    Resubscribe,
}

pub struct RedisBroker {
    client: Client,
    subscriber: SubscriberClient,
    requests: mpsc::UnboundedSender<SubRequest>,
    request_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<SubRequest>>>,
    reconnects: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    library: String,
}

impl RedisBroker {
    /// Builds the clients; nothing connects until [`Broker::start`].
    pub fn new(
        url: &str,
        retention: Retention,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let mut config =
            FredConfig::from_url(url).map_err(|e| BrokerError::Command(e.to_string()))?;
        // Keep retrying when Redis is not up yet at start-up, instead of failing.
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                c.internal_command_timeout = COMMAND_TIMEOUT;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
                c.unresponsive.max_timeout = Some(Duration::from_secs(10));
                c.unresponsive.interval = Duration::from_secs(2);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            // fred does not reconnect unless told to: forever, 100 ms doubling up to 5 s.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        // The command client receives no messages: fred's small default buffers are enough.
        let client = builder
            .build()
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let subscriber = builder
            .with_performance_config(|p| p.broadcast_channel_capacity = MESSAGE_BUFFER)
            .build_subscriber_client()
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let (requests, request_rx) = mpsc::unbounded_channel();
        Ok(RedisBroker {
            client,
            subscriber,
            requests,
            request_rx: std::sync::Mutex::new(Some(request_rx)),
            reconnects: watch::channel(0).0,
            metrics,
            library: library(retention),
        })
    }

    /// Fails fast when the command link is down, instead of queueing behind a reconnect.
    fn commands_up(&self) -> Result<(), BrokerError> {
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(BrokerError::Unavailable("Redis link is down".into()))
        }
    }

    async fn load_library(&self) -> Result<(), BrokerError> {
        let _: Value = self
            .client
            .custom(
                fred::cmd!("FUNCTION"),
                vec!["LOAD", "REPLACE", self.library.as_str()],
            )
            .await
            .map_err(|e| BrokerError::Command(format!("loading the Redis Functions: {e}")))?;
        Ok(())
    }

    /// `FCALL`, loading the library first if this Redis lost it (restarted without persistence).
    async fn fcall(&self, function: &str, args: Vec<Value>) -> Result<Value, BrokerError> {
        self.commands_up()?;
        let call = |args: Vec<Value>| {
            let mut full: Vec<Value> = vec![function.into(), 0.into()];
            full.extend(args);
            self.client.custom::<Value, _>(fred::cmd!("FCALL"), full)
        };
        match call(args.clone()).await {
            Err(e) if e.details().contains("Function not found") => {
                self.load_library().await?;
                call(args).await.map_err(command_error)
            }
            other => other.map_err(command_error),
        }
    }
}

fn command_error(e: FredError) -> BrokerError {
    match e.kind() {
        fred::error::ErrorKind::IO
        | fred::error::ErrorKind::Timeout
        | fred::error::ErrorKind::Canceled => BrokerError::Unavailable(e.to_string()),
        _ => BrokerError::Command(e.to_string()),
    }
}

/// Parses `sse_backlog`'s answer: `["ok", newest, [id, message, ...], <per user: [id, message,
/// ...] or "too_old">...]` or `["reset", newest, reason]`.
fn parse_backlog(value: Value, users: usize) -> Result<Backlog, BrokerError> {
    let bad = || BrokerError::Command("unexpected answer from sse_backlog".into());
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let mut items = items.into_iter();
    let status = items.next().and_then(|v| v.as_string()).ok_or_else(bad)?;
    let current = items
        .next()
        .and_then(|v| v.as_string())
        .and_then(|s| s.parse::<EventId>().ok());
    // `[id, message, id, message, ...]`; `None` for anything else (a user's "too_old").
    let entries = |v: Value| -> Option<Vec<(EventId, Bytes)>> {
        let Value::Array(flat) = v else {
            return None;
        };
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(id), Some(message)) = (flat.next(), flat.next()) {
            let id = id.as_string()?.parse().ok()?;
            out.push((id, message.into_bytes()?));
        }
        Some(out)
    };
    match status.as_str() {
        "ok" => {
            let broadcasts = items.next().and_then(entries).ok_or_else(bad)?;
            let per_user: Vec<_> = items.map(entries).collect();
            if per_user.len() != users {
                return Err(bad());
            }
            Ok(Backlog::Events {
                current,
                broadcasts,
                users: per_user,
            })
        }
        "reset" => {
            let reason = match items.next().and_then(|v| v.as_string()).as_deref() {
                Some("too_old") => ResetReason::TooOld,
                _ => ResetReason::UnknownId,
            };
            Ok(Backlog::Reset { current, reason })
        }
        _ => Err(bad()),
    }
}

fn unavailable(e: FredError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn conn_key(app: &str, user: &str, id: &str) -> String {
    format!("{app}:client:{user}:{id}")
}

fn app_index(app: &str) -> String {
    format!("{app}:connections")
}

fn user_index(app: &str, user: &str) -> String {
    format!("{app}:connections:{user}")
}

/// The registry index of an application, or of one of its users.
fn index(app: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => user_index(app, u),
        None => app_index(app),
    }
}

impl Broker for RedisBroker {
    fn start(&self, sink: Arc<dyn MessageSink>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let Some(request_rx) = self
                .request_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            else {
                return Ok(()); // already started
            };
            // Listen before connecting so that no message or reconnect event is missed.
            tokio::spawn(pump_messages(
                self.subscriber.message_rx(),
                sink,
                self.metrics.clone(),
            ));
            tokio::spawn(watch_reconnects(
                self.client.reconnect_rx(),
                self.reconnects.clone(),
                self.metrics.clone(),
                "commands",
                None,
            ));
            tokio::spawn(watch_reconnects(
                self.subscriber.reconnect_rx(),
                watch::channel(0).0,
                self.metrics.clone(),
                "pubsub",
                Some(self.requests.clone()),
            ));
            let configured = self.client.client_config().server.hosts();
            let configured: Vec<String> = configured.iter().map(|s| s.to_string()).collect();
            let configured = configured.join(",");
            tokio::spawn(log_errors(
                self.client.error_rx(),
                "commands",
                configured.clone(),
            ));
            tokio::spawn(log_errors(self.subscriber.error_rx(), "pubsub", configured));
            tokio::spawn(manage_subscriptions(self.subscriber.clone(), request_rx));
            self.client.connect();
            self.subscriber.connect();
            let wait = async {
                self.client.wait_for_connect().await?;
                self.subscriber.wait_for_connect().await
            };
            match tokio::time::timeout(Duration::from_secs(5), wait).await {
                Ok(Ok(())) => self.load_library().await,
                Ok(Err(e)) => Err(unavailable(e)),
                Err(_) => Err(BrokerError::Unavailable(
                    "no connection to Redis within 5s; still retrying".into(),
                )),
            }
        })
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.subscriber.is_connected() {
                return Err(BrokerError::Unavailable("subscriber link is down".into()));
            }
            let (tx, rx) = oneshot::channel();
            self.requests
                .send(SubRequest::Subscribe(channels, tx))
                .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?;
            rx.await
                .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?
        })
    }

    fn publish_durable<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
        envelope: Bytes,
    ) -> BoxFuture<'a, Result<(EventId, u64), BrokerError>> {
        Box::pin(async move {
            let args = vec![
                app.into(),
                user.unwrap_or("").into(),
                Value::Bytes(envelope),
            ];
            let answer = self.fcall("sse_publish", args).await?;
            let bad = || BrokerError::Command("unexpected answer from sse_publish".into());
            let Value::Array(items) = answer else {
                return Err(bad());
            };
            let id = items
                .first()
                .and_then(|v| v.as_string())
                .and_then(|s| s.parse::<EventId>().ok())
                .ok_or_else(bad)?;
            let receivers = items.get(1).and_then(|v| v.as_i64()).unwrap_or(0);
            Ok((id, receivers.max(0) as u64))
        })
    }

    fn since<'a>(
        &'a self,
        app: &'a str,
        last_event_id: &'a str,
        users: &'a [String],
    ) -> BoxFuture<'a, Result<Backlog, BrokerError>> {
        Box::pin(async move {
            let mut args: Vec<Value> = Vec::with_capacity(2 + users.len());
            args.extend([app.into(), last_event_id.into()]);
            args.extend(users.iter().map(|u| Value::from(u.as_str())));
            parse_backlog(self.fcall("sse_backlog", args).await?, users.len())
        })
    }

    fn registry_count<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move {
            self.commands_up()?;
            let index = index(app, user);
            let n: u64 = self
                .client
                .zcount(&index, now_secs(), f64::INFINITY)
                .await
                .map_err(unavailable)?;
            Ok(n)
        })
    }

    fn unsubscribe(&self, channels: Vec<String>) {
        let _ = self.requests.send(SubRequest::Unsubscribe(channels));
    }

    fn publish(&self, channel: String, payload: Bytes) -> BoxFuture<'_, Result<u64, BrokerError>> {
        Box::pin(async move {
            self.commands_up()?;
            let n: i64 = self
                .client
                .publish(channel, payload)
                .await
                .map_err(unavailable)?;
            Ok(n.max(0) as u64)
        })
    }

    fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        ttl_secs: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, BrokerError>> {
        Box::pin(async move {
            // One function call per batch: a few microseconds of Redis time per entry, instead of
            // eight commands (and eight of fred's per-command costs here) per entry.
            let mut args: Vec<Value> = Vec::with_capacity(1 + ops.len() * 8);
            args.push(ttl_secs.to_string().into());
            for op in ops {
                match op {
                    RegistryOp::Put(rec) => {
                        let rec = Arc::unwrap_or_clone(rec);
                        args.extend([
                            "put".into(),
                            rec.application.id.into(),
                            rec.user.id.into(),
                            rec.id.into(),
                            rec.instance.into(),
                            rec.remote_addr.into(),
                            rec.created_at.to_string().into(),
                            rec.user_agent.into(),
                        ]);
                    }
                    RegistryOp::Touch { app, user, id } => {
                        args.extend(["touch".into(), app.into(), user.into(), id.into()]);
                    }
                    RegistryOp::Remove { app, user, id } => {
                        args.extend(["remove".into(), app.into(), user.into(), id.into()]);
                    }
                }
            }
            let missing = match self.fcall("sse_registry", args).await? {
                Value::Array(ids) => ids.into_iter().filter_map(|v| v.into_string()).collect(),
                _ => Vec::new(),
            };
            Ok(missing)
        })
    }

    fn registry_list<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ConnectionRecord>, BrokerError>> {
        Box::pin(async move {
            self.commands_up()?;
            let index = index(app, user);
            let now = now_secs();
            // Entries of instances that died stay in the index until their score passes; prune them.
            let _: i64 = self
                .client
                .zremrangebyscore(&index, "-inf".to_string(), now)
                .await
                .map_err(unavailable)?;
            let members: Vec<String> = self
                .client
                .zrangebyscore(&index, now, "+inf".to_string(), false, None)
                .await
                .map_err(unavailable)?;
            if members.is_empty() {
                return Ok(Vec::new());
            }
            let pipe = self.client.pipeline();
            for m in &members {
                let key = match user {
                    Some(u) => conn_key(app, u, m),
                    None => match m.split_once(':') {
                        Some((u, id)) => conn_key(app, u, id),
                        None => continue,
                    },
                };
                let _: () = pipe.hgetall(key).await.map_err(unavailable)?;
            }
            let mut records = Vec::with_capacity(members.len());
            for hash in pipe.try_all::<HashMap<String, String>>().await {
                let hash = hash.map_err(|e| BrokerError::Command(e.to_string()))?;
                if let Some(rec) = record_from_hash(hash) {
                    records.push(rec);
                }
            }
            Ok(records)
        })
    }

    fn link(&self) -> LinkState {
        LinkState {
            kind: "redis",
            commands: self.client.is_connected(),
            pubsub: self.subscriber.is_connected(),
        }
    }

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.subscribe()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.subscriber.quit().await;
                let _ = self.client.quit().await;
            })
            .await;
        })
    }
}

/// An entry written by [`Broker::registry_apply`]; `None` when the hash has expired or is incomplete.
fn record_from_hash(mut h: HashMap<String, String>) -> Option<ConnectionRecord> {
    let mut take = |k: &str| h.remove(k);
    Some(ConnectionRecord {
        id: take("id")?,
        created_at: take("created_at")?.parse().ok()?,
        application: IdRef { id: take("app")? },
        user: IdRef { id: take("user")? },
        remote_addr: take("remote_addr").unwrap_or_default(),
        instance: take("instance").unwrap_or_default(),
        user_agent: take("user_agent").unwrap_or_default(),
    })
}

/// Most messages handed to the hub at once.
const DELIVER_BATCH: usize = 256;

async fn pump_messages(
    mut rx: broadcast::Receiver<fred::types::Message>,
    sink: Arc<dyn MessageSink>,
    metrics: Arc<Metrics>,
) {
    let lagged = |n: u64| {
        metrics
            .messages_dropped
            .get_or_create(&ReasonLabel { reason: "lagged" })
            .inc_by(n);
        tracing::error!(
            lost = n,
            "messages lost: the hub fell behind the Redis subscriber"
        );
    };
    let mut batch = Vec::with_capacity(DELIVER_BATCH);
    loop {
        match rx.recv().await {
            Ok(msg) => batch.push(msg),
            Err(broadcast::error::RecvError::Lagged(n)) => lagged(n),
            Err(broadcast::error::RecvError::Closed) => break,
        }
        // Whatever else has arrived goes along, without waiting for more.
        while batch.len() < DELIVER_BATCH {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                Err(_) => break,
            }
        }
        let messages: Vec<(&str, &[u8])> = batch
            .iter()
            .map(|m| (&*m.channel, m.value.as_bytes().unwrap_or_default()))
            .collect();
        sink.deliver(&messages);
        drop(messages);
        batch.clear();
    }
}

async fn watch_reconnects(
    mut rx: broadcast::Receiver<fred::types::config::Server>,
    notify: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    link: &'static str,
    resubscribe: Option<mpsc::UnboundedSender<SubRequest>>,
) {
    let mut first = true;
    loop {
        match rx.recv().await {
            Ok(server) => {
                if first {
                    tracing::info!(%server, link, "connected to Redis");
                    first = false;
                } else {
                    metrics.broker_reconnects.inc();
                    tracing::info!(%server, link, "reconnected to Redis");
                }
                notify.send_modify(|n| *n += 1);
                if let Some(tx) = &resubscribe {
                    let _ = tx.send(SubRequest::Resubscribe);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

async fn log_errors(
    mut rx: broadcast::Receiver<(FredError, Option<fred::types::config::Server>)>,
    link: &'static str,
    configured: String,
) {
    loop {
        match rx.recv().await {
            Ok((error, server)) => {
                // fred names no server for a connection that never got up: name the configured one.
                let server = server.map_or_else(|| configured.clone(), |s| s.to_string());
                tracing::warn!(%error, %server, link, hint = "is REDIS_URL right?", "Redis connection error");
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// The one place SUBSCRIBE and UNSUBSCRIBE are sent from. Requests that queued up while a command
/// was in flight are folded into one batch; within a batch a later request wins, so an
/// unsubscribe followed by a subscribe of the same channel leaves it subscribed. `active` is the
/// truth about what this instance wants; after a reconnect all of it is subscribed again.
async fn manage_subscriptions(
    subscriber: SubscriberClient,
    mut requests: mpsc::UnboundedReceiver<SubRequest>,
) {
    let mut active: HashSet<String> = HashSet::new();
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < SUBSCRIBE_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut to_sub: Vec<String> = Vec::new();
        let mut pending: HashSet<String> = HashSet::new();
        let mut to_unsub: HashSet<String> = HashSet::new();
        let mut waiters = Vec::new();
        let mut resubscribe = false;
        for request in batch {
            match request {
                SubRequest::Subscribe(channels, tx) => {
                    for ch in &channels {
                        if !active.contains(ch) && pending.insert(ch.clone()) {
                            to_unsub.remove(ch);
                            to_sub.push(ch.clone());
                        }
                    }
                    waiters.push((channels, tx));
                }
                SubRequest::Unsubscribe(channels) => {
                    for ch in channels {
                        active.remove(&ch);
                        if pending.remove(&ch) {
                            to_sub.retain(|c| c != &ch);
                        } else {
                            to_unsub.insert(ch);
                        }
                    }
                }
                SubRequest::Resubscribe => resubscribe = true,
            }
        }
        if resubscribe {
            // A fresh connection has no subscriptions, so nothing needs unsubscribing either.
            to_unsub.clear();
            let restore: Vec<String> = active.drain().filter(|c| !pending.contains(c)).collect();
            if !restore.is_empty() {
                tracing::info!(channels = restore.len(), "restoring subscriptions");
            }
            to_sub.extend(restore);
        }
        if !to_unsub.is_empty() {
            let list: Vec<String> = to_unsub.into_iter().collect();
            if let Err(error) = subscriber.unsubscribe(list).await {
                // Harmless: messages for nobody are dropped by the hub; a reconnect clears them.
                tracing::warn!(%error, "UNSUBSCRIBE failed");
            }
        }
        let mut outcome = Ok(());
        let mut sent = Vec::new();
        for chunk in to_sub.chunks(SUBSCRIBE_BATCH) {
            match subscriber.subscribe(chunk.to_vec()).await {
                Ok(()) => sent.extend(chunk.iter().cloned()),
                Err(error) => {
                    tracing::warn!(%error, channels = chunk.len(), "SUBSCRIBE failed");
                    outcome = Err(unavailable(error));
                }
            }
        }
        // fred's subscribe returns once SUBSCRIBE is written, not when Redis has run it. Redis runs
        // a connection's commands in order, so the answer to a PING on the same connection proves
        // the subscriptions are live: only then may a stream be told it is connected.
        if !sent.is_empty() {
            match subscriber.ping::<Value>(None).await {
                Ok(_) => active.extend(sent),
                Err(error) => {
                    tracing::warn!(%error, "subscriber did not confirm SUBSCRIBE");
                    outcome = Err(unavailable(error));
                }
            }
        }
        for (channels, tx) in waiters {
            let result = if channels.iter().all(|c| active.contains(c)) {
                Ok(())
            } else {
                Err(outcome
                    .clone()
                    .err()
                    .unwrap_or_else(|| BrokerError::Unavailable("subscription withdrawn".into())))
            };
            let _ = tx.send(result);
        }
    }
}
