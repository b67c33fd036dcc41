//! The Redis broker: every use of fred lives under this module.
//!
//! Three connections (on a Redis Cluster, three per primary): one for commands (publish, history,
//! registry; pipelined), one for admissions, and one dedicated subscriber (with
//! `DURABLE_MIN_REPLICAS`, a fourth for durable publishes). All reconnect forever, with a backoff
//! capped at one second so that the gateway is back within about a second of Redis.
//!
//! - [`functions`]: the Redis Functions library (durable publish, replay, history position, probe);
//! - [`subscriber`]: subscriptions, message delivery to the hub, re-sync after a lost link;
//! - [`probe`]: the end-to-end probe on every shard, behind readiness;
//! - [`registry`]: the cluster-wide connection registry's keys;
//! - [`cluster`]: Redis Cluster's slots: where an application's keys, channels and calls go.

mod cluster;
mod functions;
mod probe;
mod registry;
mod subscriber;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface};
use fred::types::Builder;
use fred::types::config::{Config as FredConfig, ReconnectPolicy, TcpConfig};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::functions::library;
use self::probe::Probe;
use self::subscriber::SubRequest;
use super::{
    Admission, Admitted, BoxFuture, Broker, BrokerError, ConnectionRecord, Durability, LinkState,
    MessageSink, Position, RegistryOp, Retention,
};
use crate::history::Partitions;
use crate::history::{Backlog, EventId};
use crate::metrics::Metrics;

/// Upper bound on any single Redis command, so nothing on a request path can hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for bursts between the subscriber connection and the hub; overflowing it loses messages
/// (counted as `lagged`). The hub only queues events on the pump's thread (sockets are written
/// by the fan-out writers), so 16k messages are over a quarter of a second at 60k messages/s.
/// fred allocates it for each of its 8 notification channels, slots included: 64k cost 50 MB of
/// RSS per client before a single stream.
const MESSAGE_BUFFER: usize = 1 << 14;
/// Reconnect backoff: from 50 ms, doubling, at most 1 s, plus up to 100 ms of jitter so that a
/// fleet of gateways does not reconnect in lockstep.
const RECONNECT_MIN_MS: u32 = 50;
const RECONNECT_MAX_MS: u32 = 1_000;
const RECONNECT_JITTER_MS: u32 = 100;

/// The connections and what this instance knows about them; shared with the broker's tasks.
struct Links {
    client: Client,
    subscriber: SubscriberClient,
    /// With `DURABLE_MIN_REPLICAS`, durable publishes and their `WAIT` go on a connection of their
    /// own: `WAIT` blocks the connection it runs on, and the registry and replay must not wait.
    durable: Option<Client>,
    /// Admissions go on a connection of their own: Redis answers one connection's commands in
    /// order, and in a connect storm a queue of admission calls ahead of the history reads (or
    /// of the admissions behind those) delays every stream's `200`. Redis alternates between
    /// connections, so each waits for at most one call of the other.
    admitter: Client,
    durability: Durability,
    metrics: Arc<Metrics>,
    /// Redis Cluster: hash-tagged names, sharded pub/sub, the library on every primary.
    cluster: bool,
    library: String,
    /// The library is loaded on the node commands go to (as far as this instance knows).
    functions: AtomicBool,
    probe: Arc<Probe>,
    /// Admissions waiting to be sent together.
    admissions: registry::Admissions,
}

pub struct RedisBroker {
    links: Arc<Links>,
    requests: mpsc::UnboundedSender<SubRequest>,
    request_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<SubRequest>>>,
    reconnects: watch::Sender<u64>,
    stopped: watch::Sender<bool>,
}

impl RedisBroker {
    /// Builds the clients; nothing connects until [`Broker::start`]. `instance` names this
    /// instance's probe channel.
    pub fn new(
        url: &str,
        retention: Retention,
        max_message_bytes: usize,
        durability: Durability,
        instance: &str,
        metrics: Arc<Metrics>,
        partitions: Partitions,
    ) -> Result<RedisBroker, BrokerError> {
        let mut config =
            FredConfig::from_url(url).map_err(|e| BrokerError::Command(e.to_string()))?;
        // Keep retrying when Redis is not up yet at start-up, instead of failing.
        config.fail_fast = false;
        let cluster = config.server.is_clustered();
        let mut policy = ReconnectPolicy::new_exponential(0, RECONNECT_MIN_MS, RECONNECT_MAX_MS, 2);
        policy.set_jitter(RECONNECT_JITTER_MS);
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
                // A command whose connection closed while it was in flight may have run: sent
                // again after the reconnect, a durable publish would be stored twice. The caller
                // gets the error instead (a publisher retries knowingly; the rest is idempotent).
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            // fred does not reconnect unless told to.
            .set_policy(policy);
        // The command client receives no messages: fred's small default buffers are enough.
        let client = builder
            .build()
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let admitter = builder
            .build()
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let durable = match durability.min_replicas {
            0 => None,
            _ => Some(
                builder
                    .build()
                    .map_err(|e| BrokerError::Command(e.to_string()))?,
            ),
        };
        let subscriber = builder
            .with_performance_config(|p| p.broadcast_channel_capacity = MESSAGE_BUFFER)
            .build_subscriber_client()
            .map_err(|e| BrokerError::Command(e.to_string()))?;
        let (requests, request_rx) = mpsc::unbounded_channel();
        Ok(RedisBroker {
            links: Arc::new(Links {
                client,
                subscriber,
                durable,
                admitter,
                durability,
                metrics,
                cluster,
                library: library(retention, max_message_bytes, cluster, partitions),
                functions: AtomicBool::new(false),
                probe: Arc::new(Probe::new(instance)),
                admissions: registry::admissions(),
            }),
            requests,
            request_rx: std::sync::Mutex::new(Some(request_rx)),
            reconnects: watch::channel(0).0,
            stopped: watch::channel(false).0,
        })
    }
}

impl Links {
    /// The command and admission connections, and the durable one if there is one.
    fn command_clients(&self) -> impl Iterator<Item = &Client> {
        [&self.client, &self.admitter]
            .into_iter()
            .chain(self.durable.as_ref())
    }

    /// Whether commands can go out: the command link is both the command and the admission
    /// connections.
    fn commands_connected(&self) -> bool {
        self.client.is_connected() && self.admitter.is_connected()
    }

    /// Fails fast when the command link is down, instead of queueing behind a reconnect.
    fn commands_up(&self) -> Result<(), BrokerError> {
        if self.commands_connected() {
            Ok(())
        } else {
            Err(BrokerError::Unavailable("Redis link is down".into()))
        }
    }

    /// The node this instance talks to no longer takes writes: it was demoted (a failover).
    /// Every connection is made again, which asks Sentinel (or the cluster) for the new primary;
    /// the subscriber's reconnect then re-syncs the open streams.
    fn demoted(&self) {
        tracing::warn!("Redis answered READONLY: reconnecting to the current primary");
        for client in self.command_clients() {
            let client = client.clone();
            tokio::spawn(async move {
                let _ = client.force_reconnection().await;
            });
        }
        let subscriber = self.subscriber.clone();
        tokio::spawn(async move {
            let _ = subscriber.force_reconnection().await;
        });
    }
}

impl Links {
    /// The probe's channels: one on a single Redis, one per primary on a cluster.
    fn probe_channels(&self) -> Vec<String> {
        if !self.cluster {
            return vec![self.probe.channel()];
        }
        let slots = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_hash_slots())
            .unwrap_or_default();
        self.probe.cluster_channels(&slots)
    }
}

/// On a cluster, a change of topology (a failover, slots moved, a node added) is treated as a
/// reconnect: the library is loaded on every primary again and the registry rewritten, and every
/// subscription is restored on the nodes that now hold its slot (with the re-sync of the open
/// streams that a resubscription brings).
async fn follow_topology(
    links: Arc<Links>,
    reconnects: watch::Sender<u64>,
    requests: mpsc::UnboundedSender<SubRequest>,
) {
    let mut commands = links.client.cluster_change_rx();
    let mut pubsub = links.subscriber.cluster_change_rx();
    loop {
        tokio::select! {
            changed = commands.recv() => match changed {
                Ok(changes) => {
                    tracing::info!(?changes, "Redis Cluster topology changed");
                    reconnects.send_modify(|n| *n += 1);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            changed = pubsub.recv() => match changed {
                Ok(_) => {
                    let _ = requests.send(SubRequest::Resubscribe);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
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

fn unavailable(e: FredError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Loads the library again after every reconnect of the command link: a Redis that restarted
/// without persistence, or a promoted replica, may lack it, and backends' own `FCALL sse_publish`
/// must not fail until some gateway happens to call a function.
async fn reload_on_reconnect(
    links: Arc<Links>,
    mut reconnects: watch::Receiver<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = reconnects.changed() => if changed.is_err() { break },
            _ = stopped.changed() => break,
        }
        links.functions.store(false, Ordering::Relaxed);
        for attempt in 0..20u32 {
            match links.load_library().await {
                Ok(()) => break,
                Err(error) => {
                    if attempt == 0 {
                        tracing::warn!(%error, "Redis Functions not loaded yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
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
            let links = &self.links;
            // Listen before connecting so that no message or reconnect event is missed.
            tokio::spawn(subscriber::pump_messages(
                links.subscriber.message_rx(),
                sink.clone(),
                links.metrics.clone(),
                links.probe.clone(),
            ));
            tokio::spawn(subscriber::watch_reconnects(
                links.client.reconnect_rx(),
                self.reconnects.clone(),
                links.metrics.clone(),
                "commands",
                None,
            ));
            tokio::spawn(subscriber::watch_reconnects(
                links.subscriber.reconnect_rx(),
                watch::channel(0).0,
                links.metrics.clone(),
                "pubsub",
                Some(self.requests.clone()),
            ));
            let configured: Vec<String> = links
                .client
                .client_config()
                .server
                .hosts()
                .iter()
                .map(|s| s.to_string())
                .collect();
            let configured = configured.join(",");
            tokio::spawn(subscriber::log_errors(
                links.client.error_rx(),
                "commands",
                configured.clone(),
                None,
            ));
            tokio::spawn(subscriber::log_errors(
                links.subscriber.error_rx(),
                "pubsub",
                configured,
                Some(links.probe.clone()),
            ));
            tokio::spawn(subscriber::manage_subscriptions(
                links.subscriber.clone(),
                links.cluster,
                self.requests.clone(),
                request_rx,
                sink,
                links.probe.clone(),
            ));
            tokio::spawn(reload_on_reconnect(
                links.clone(),
                self.reconnects.subscribe(),
                self.stopped.subscribe(),
            ));
            if links.cluster {
                tokio::spawn(follow_topology(
                    links.clone(),
                    self.reconnects.clone(),
                    self.requests.clone(),
                ));
            }
            for client in links.command_clients() {
                client.connect();
            }
            links.subscriber.connect();
            let wait = async {
                links.client.wait_for_connect().await.map_err(unavailable)?;
                links
                    .admitter
                    .wait_for_connect()
                    .await
                    .map_err(unavailable)?;
                links
                    .subscriber
                    .wait_for_connect()
                    .await
                    .map_err(unavailable)?;
                links.load_library().await
            };
            let started = tokio::time::timeout(Duration::from_secs(5), wait).await;
            let prober = links.clone();
            let shards = links.clone();
            tokio::spawn(subscriber::run_probe(
                links.probe.clone(),
                self.requests.clone(),
                self.stopped.subscribe(),
                move || shards.probe_channels(),
                move |channel, payload| {
                    let links = prober.clone();
                    async move { links.probe(&channel, &payload).await }
                },
            ));
            match started {
                Ok(Ok(())) => {
                    // Bounded: a healthy start is ready once the first probes come back.
                    for _ in 0..100 {
                        if links.probe.fresh() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BrokerError::Unavailable(
                    "no connection to Redis within 5s; still retrying".into(),
                )),
            }
        })
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.links.subscriber.is_connected() {
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

    fn unsubscribe(&self, channels: Vec<String>) {
        let _ = self.requests.send(SubRequest::Unsubscribe(channels));
    }

    fn publish(&self, channel: String, payload: Bytes) -> BoxFuture<'_, Result<u64, BrokerError>> {
        Box::pin(async move {
            let links = &self.links;
            links.commands_up()?;
            // On a cluster, the gateway's channels are published as shard channels.
            let n: i64 = match cluster::shard_channel(&channel).filter(|_| links.cluster) {
                Some(shard) => links.client.spublish(shard, payload).await,
                None => links.client.publish(channel, payload).await,
            }
            .map_err(unavailable)?;
            Ok(n.max(0) as u64)
        })
    }

    fn publish_durable<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
        envelope: Bytes,
    ) -> BoxFuture<'a, Result<(EventId, u64), BrokerError>> {
        Box::pin(self.links.publish_durable(app, user, envelope))
    }

    fn since<'a>(
        &'a self,
        app: &'a str,
        last_event_id: &'a str,
        users: &'a [String],
        page: usize,
    ) -> BoxFuture<'a, Result<Backlog, BrokerError>> {
        Box::pin(self.links.backlog(app, last_event_id, users, page))
    }

    fn position<'a>(
        &'a self,
        app: &'a str,
        seen: Option<EventId>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(self.links.position(app, seen))
    }

    fn admit(&self, admission: Admission) -> BoxFuture<'_, Result<Admitted, BrokerError>> {
        Box::pin(registry::admit(&self.links, admission))
    }

    fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        ttl_secs: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, BrokerError>> {
        Box::pin(self.links.registry_apply(ops, ttl_secs))
    }

    fn registry_list<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ConnectionRecord>, BrokerError>> {
        Box::pin(self.links.registry_list(app, user))
    }

    fn link(&self) -> LinkState {
        let links = &self.links;
        LinkState {
            kind: "redis",
            commands: links.commands_connected(),
            pubsub: links.subscriber.is_connected(),
            functions: links.functions.load(Ordering::Relaxed),
            probe: links.probe.fresh(),
            probe_age: links.probe.age(),
        }
    }

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.subscribe()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.stopped.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.links.subscriber.quit().await;
                for client in self.links.command_clients() {
                    let _ = client.quit().await;
                }
            })
            .await;
        })
    }
}

/// The URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            super::redact_url("rediss://user:pw@h:6380/1"),
            "rediss://user:***@h:6380/1"
        );
        assert_eq!(super::redact_url("redis://:pw@h"), "redis://:***@h");
    }
}
