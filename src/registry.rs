//! The cluster-wide connection registry: keeps one broker entry per live local stream, written on
//! connect, deleted on disconnect and on shutdown, and rewritten by a heartbeat so that entries of a
//! dead instance expire by themselves and entries lost with a Redis restart come back.
//!
//! Writes go through one task in the order they were made and are batched (one Redis function call
//! per batch), so connecting never waits for the registry and a burst of connects costs a few round
//! trips. The heartbeat only touches entries (pushes their expiry out); an entry found missing is
//! written whole again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, ConnectionRecord, RegistryOp};
use crate::metrics::Metrics;

/// Most changes written in one call: the Redis function runs them atomically, so a batch must stay
/// short enough (a few milliseconds of Redis time) not to hold up other clients.
const BATCH: usize = 256;

/// A live stream as the registry sees it (the hub's streams are such entries).
pub trait Entry: Send + Sync + 'static {
    fn app(&self) -> &str;
    fn user(&self) -> &str;
    fn id(&self) -> uuid::Uuid;
    /// The entry as it is stored, written by `instance`.
    fn record(&self, instance: &str) -> ConnectionRecord;
}

enum Op {
    Put(Arc<dyn Entry>),
    Touch(Arc<dyn Entry>),
    Remove(Arc<dyn Entry>),
    Flush(oneshot::Sender<()>),
}

/// A cheap handle for queueing registry changes.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::UnboundedSender<Op>,
    instance: Arc<str>,
}

/// The writer side, run by [`RegistryWriter::run`].
pub struct RegistryWriter {
    rx: mpsc::UnboundedReceiver<Op>,
    broker: Arc<dyn Broker>,
    instance: Arc<str>,
    ttl_secs: u64,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(
        broker: Arc<dyn Broker>,
        instance: &str,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> (Registry, RegistryWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let instance: Arc<str> = Arc::from(instance);
        (
            Registry {
                tx,
                instance: instance.clone(),
            },
            RegistryWriter {
                rx,
                broker,
                instance,
                ttl_secs: ttl.as_secs().max(1),
                metrics,
            },
        )
    }

    /// The entry as this instance stores it (an admission writes it; see
    /// [`crate::broker::Broker::admit`]).
    pub fn record<E: Entry>(&self, entry: &E) -> ConnectionRecord {
        entry.record(&self.instance)
    }

    pub fn put<E: Entry>(&self, entry: &Arc<E>) {
        let _ = self.tx.send(Op::Put(entry.clone()));
    }

    /// Keeps an entry alive (the heartbeat); it is written again if it no longer exists.
    pub fn touch<E: Entry>(&self, entry: &Arc<E>) {
        let _ = self.tx.send(Op::Touch(entry.clone()));
    }

    pub fn remove<E: Entry>(&self, entry: &Arc<E>) {
        let _ = self.tx.send(Op::Remove(entry.clone()));
    }

    /// Resolves once every change queued before it has been tried.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl RegistryWriter {
    pub async fn run(mut self) {
        // Deletes that failed (Redis down) are retried; puts and touches need no retry, the
        // heartbeat comes back to them.
        let mut retry: Vec<RegistryOp> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = tokio::select! {
                op = self.rx.recv() => match op {
                    Some(op) => Some(op),
                    None => break,
                },
                _ = tick.tick(), if !retry.is_empty() => None,
            };
            let mut batch = std::mem::take(&mut retry);
            let mut touched: HashMap<String, Arc<dyn Entry>> = HashMap::new();
            let mut flushes = Vec::new();
            let mut next = first;
            while let Some(op) = next {
                match op {
                    Op::Put(conn) => batch.push(self.put(&conn)),
                    Op::Touch(conn) => {
                        let id = conn.id().to_string();
                        batch.push(RegistryOp::Touch {
                            app: conn.app().to_string(),
                            user: conn.user().to_string(),
                            id: id.clone(),
                        });
                        touched.insert(id, conn);
                    }
                    Op::Remove(conn) => {
                        let id = conn.id().to_string();
                        // Gone: not to be written again even if its touch finds it missing.
                        touched.remove(&id);
                        batch.push(RegistryOp::Remove {
                            app: conn.app().to_string(),
                            user: conn.user().to_string(),
                            id,
                        });
                    }
                    Op::Flush(tx) => flushes.push(tx),
                }
                if batch.len() >= BATCH {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            match self.apply(batch).await {
                Ok(missing) => {
                    // Entries lost on the Redis side (a restart without persistence, say) are
                    // written whole again.
                    let again: Vec<RegistryOp> = missing
                        .iter()
                        .filter_map(|id| touched.get(id))
                        .map(|conn| self.put(conn))
                        .collect();
                    if !again.is_empty() {
                        tracing::info!(
                            entries = again.len(),
                            "registry entries were missing: rewriting them"
                        );
                        retry = self.apply(again).await.err().unwrap_or_default();
                    }
                }
                Err(failed) => retry = failed,
            }
            for tx in flushes {
                let _ = tx.send(());
            }
        }
    }

    fn put(&self, conn: &Arc<dyn Entry>) -> RegistryOp {
        RegistryOp::Put(Arc::new(conn.record(&self.instance)))
    }

    /// Writes a batch; on failure, answers the deletes in it, to be retried.
    async fn apply(&self, batch: Vec<RegistryOp>) -> Result<Vec<String>, Vec<RegistryOp>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self
            .broker
            .registry_apply(batch.clone(), self.ttl_secs)
            .await
        {
            Ok(missing) => Ok(missing),
            Err(error) => {
                self.metrics.registry_write_errors.inc();
                tracing::warn!(%error, ops = batch.len(), "registry write failed; will retry");
                Err(batch
                    .into_iter()
                    .filter(|op| matches!(op, RegistryOp::Remove { .. }))
                    .collect())
            }
        }
    }
}
