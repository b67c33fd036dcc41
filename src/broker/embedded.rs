//! The embedded broker: in-process pub/sub and registry for a single node with no Redis.
//!
//! Messages published here (over `POST /publish`) are handed straight to the local hub; the registry
//! holds this process's connections only, which is the whole cluster when there is one node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::{BoxFuture, Broker, BrokerError, ConnectionRecord, LinkState, MessageSink, RegistryOp};

/// app -> (user, connection id) -> entry
type Entries = HashMap<String, BTreeMap<(String, String), Arc<ConnectionRecord>>>;

#[derive(Default)]
pub struct EmbeddedBroker {
    sink: OnceLock<Arc<dyn MessageSink>>,
    channels: Mutex<HashSet<String>>,
    registry: Mutex<Entries>,
    reconnects: OnceLock<tokio::sync::watch::Sender<u64>>,
}

impl EmbeddedBroker {
    pub fn new() -> EmbeddedBroker {
        EmbeddedBroker::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the broker down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker for EmbeddedBroker {
    fn start(&self, sink: Arc<dyn MessageSink>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = self.sink.set(sink);
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        lock(&self.channels).extend(channels);
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, channels: Vec<String>) {
        let mut set = lock(&self.channels);
        for c in channels {
            set.remove(&c);
        }
    }

    fn publish(&self, channel: String, payload: Bytes) -> BoxFuture<'_, Result<u64, BrokerError>> {
        let subscribed = lock(&self.channels).contains(&channel);
        if subscribed && let Some(sink) = self.sink.get() {
            sink.deliver(&channel, &payload);
        }
        Box::pin(async move { Ok(u64::from(subscribed)) })
    }

    fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        _ttl_secs: u64,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let mut reg = lock(&self.registry);
        for op in ops {
            match op {
                RegistryOp::Put(rec) => {
                    reg.entry(rec.application.id.clone())
                        .or_default()
                        .insert((rec.user.id.clone(), rec.id.clone()), rec);
                }
                RegistryOp::Remove { app, user, id } => {
                    if let Some(entries) = reg.get_mut(&app) {
                        entries.remove(&(user, id));
                        if entries.is_empty() {
                            reg.remove(&app);
                        }
                    }
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn registry_list<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ConnectionRecord>, BrokerError>> {
        let reg = lock(&self.registry);
        let list = reg
            .get(app)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|((u, _), _)| user.is_none_or(|want| want == u))
                    .map(|(_, rec)| rec.as_ref().clone())
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(list) })
    }

    fn link(&self) -> LinkState {
        LinkState {
            kind: "embedded",
            commands: true,
            pubsub: true,
        }
    }

    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconnects
            .get_or_init(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
