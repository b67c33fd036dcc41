//! The broker interface: pub/sub between gateway instances and storage for the connection registry.
//!
//! Two implementations: [`redis::RedisBroker`] (every instance sharing one Redis) and
//! [`embedded::EmbeddedBroker`] (one process, nothing installed). The rest of the gateway sees only
//! the [`Broker`] trait, so the Redis client could be swapped without touching the core.
//!
//! - [`channels`]: channel names, the publisher contract both implementations share;
//! - [`records`]: registry records and changes, and admissions under the caps.

mod channels;
pub mod embedded;
mod records;
pub mod redis;

pub use self::channels::{Topic, app_channel, parse_channel, user_channel};
pub use self::records::{Admission, Admitted, ConnectionRecord, IdRef, RegistryOp};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::history::{Backlog, EventId};
use crate::metrics::LinkHealth;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The link to the broker is down (Redis unreachable, reconnecting).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered, but with an error.
    #[error("broker error: {0}")]
    Command(String),
    /// A durable event was published (it has this id) but fewer replicas than required
    /// acknowledged it in time: a failover may still lose it.
    #[error("event {id} reached {replicas} replica(s), fewer than required")]
    NotReplicated { id: EventId, replicas: u64 },
}

/// Where the broker hands messages it receives on subscribed channels.
pub trait MessageSink: Send + Sync + 'static {
    /// Delivers `(channel, payload)` messages, in order. Messages that arrived together are
    /// handed over together, so that each stream's socket is written once for all of them.
    fn deliver(&self, messages: &[(&str, &[u8])]);

    /// The subscriber link was lost and is being restored: whatever was published meanwhile never
    /// arrived. Called before the subscriptions are sent again, so that live delivery can wait
    /// until [`MessageSink::resume`] has caught every stream up from history.
    fn suspend(&self);

    /// The subscriptions are live again (after a [`MessageSink::suspend`]).
    fn resume(self: Arc<Self>);
}

/// Health of the broker links, for readiness and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkState {
    pub kind: &'static str,
    /// Commands (publish, registry) can be sent.
    pub commands: bool,
    /// The subscriber link is up, so subscribed messages arrive.
    pub pubsub: bool,
    /// The history functions are loaded on the node this instance writes to.
    pub functions: bool,
    /// The end-to-end probe (a publish through the broker, received back) succeeded lately.
    pub probe: bool,
    /// Seconds since the probe last came back, if it ever did.
    pub probe_age: Option<f64>,
}

impl LinkState {
    pub fn ready(&self) -> bool {
        self.commands && self.pubsub && self.functions && self.probe
    }
}

impl LinkHealth for LinkState {
    fn links(&self) -> [(&'static str, bool); 4] {
        [
            ("commands", self.commands),
            ("pubsub", self.pubsub),
            ("functions", self.functions),
            ("probe", self.probe),
        ]
    }

    fn probe_age(&self) -> Option<f64> {
        self.probe_age
    }
}

/// Where an application's history stands, as [`Broker::position`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The history goes on: its newest id.
    Current(EventId),
    /// There was no history (nothing published yet, or the broker lost its data): one starts here.
    Started(EventId),
    /// The broker holds less than this instance saw: writes were rolled back, and a new history
    /// starts here, so that ids of the old one get a `reset`.
    RolledBack(EventId),
}

impl Position {
    pub fn id(self) -> EventId {
        match self {
            Position::Current(id) | Position::Started(id) | Position::RolledBack(id) => id,
        }
    }
}

/// How a durable publish is acknowledged: once at least `min_replicas` replicas hold it (Redis
/// `WAIT`, at most `wait` long), so that a failover cannot take an acknowledged event back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub min_replicas: u32,
    pub wait: std::time::Duration,
}

/// How long and how much history is kept, per stream (a user's, or an application's broadcasts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_len: usize,
    pub ttl_secs: u64,
}

/// Pub/sub and registry storage. Every method is safe to call while the link is down: it fails
/// with [`BrokerError::Unavailable`] (or queues, for `unsubscribe`) instead of hanging.
pub trait Broker: Send + Sync + 'static {
    /// Connects (where there is anything to connect to) and starts handing messages to `sink`.
    fn start(&self, sink: Arc<dyn MessageSink>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Resolves once the broker delivers messages published to `channels` from now on.
    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Stops delivery for `channels`. Ordered after every earlier `subscribe` call.
    fn unsubscribe(&self, channels: Vec<String>);

    /// Publishes `payload` without history (fire-and-forget); returns how many subscribers
    /// (gateway instances) received it.
    fn publish(&self, channel: String, payload: Bytes) -> BoxFuture<'_, Result<u64, BrokerError>>;

    /// Atomically gives `envelope` (a JSON object) the application's next event id, appends it to
    /// the history of `user` (or of the whole application when `None`) and publishes it on the
    /// matching channel. Returns the id and the number of subscribers.
    fn publish_durable<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
        envelope: Bytes,
    ) -> BoxFuture<'a, Result<(EventId, u64), BrokerError>>;

    /// The durable events `users` of `app` missed after `last_event_id`: the application's
    /// broadcasts once, and each user's own, or why that cannot be known. With a `page` (not 0),
    /// at most that many of each history: a full list may go on.
    fn since<'a>(
        &'a self,
        app: &'a str,
        last_event_id: &'a str,
        users: &'a [String],
        page: usize,
    ) -> BoxFuture<'a, Result<Backlog, BrokerError>>;

    /// Where `app`'s history stands, starting one when there is none. `seen` is the newest id this
    /// instance saw of it: if the broker holds less of that history, writes were lost, and a new
    /// history (epoch) starts.
    fn position<'a>(
        &'a self,
        app: &'a str,
        seen: Option<EventId>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>>;

    /// Checks the caps and, if they allow, writes the stream's registry entry, in one atomic
    /// step, so that no burst of connects on any number of instances gets past a cap. The place
    /// is released with the entry ([`RegistryOp::Remove`]), or expires with it.
    fn admit(&self, admission: Admission) -> BoxFuture<'_, Result<Admitted, BrokerError>>;

    /// Applies registry changes in order, each entry living `ttl_secs` unless rewritten. Returns
    /// the connection ids of touched entries that no longer exist (lost with a Redis restart,
    /// say), for the caller to write again.
    fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        ttl_secs: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, BrokerError>>;

    /// Live entries of an application, or of one of its users.
    fn registry_list<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ConnectionRecord>, BrokerError>>;

    fn link(&self) -> LinkState;

    /// Changes every time the broker reconnects, so that lost state can be rewritten.
    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Closes the links.
    fn stop(&self) -> BoxFuture<'_, ()>;
}
