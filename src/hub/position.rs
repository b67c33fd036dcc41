//! Where this instance stands in each application's history: the position read when its first
//! stream joins, the newest id seen (the fence against rolled-back writes), and epoch changes.

use std::sync::Arc;

use super::{AttachError, Hub};
use crate::broker::{BrokerError, Position};
use crate::history::EventId;
use crate::metrics::ReasonLabel;

pub(super) type PositionAnswer = tokio::sync::oneshot::Sender<Result<EventId, BrokerError>>;

/// Where this instance stands in an application's history.
#[derive(Default, Debug, Clone, Copy)]
pub(super) struct AppPosition {
    /// Every live stream of the application here has been given every durable event up to this id
    /// that was meant for it: a re-sync after a lost link replays from here. Known only while the
    /// application's channels are subscribed (read from the broker when its first stream joins).
    pub(super) delivered: Option<EventId>,
    /// The newest id this instance saw of the application (delivered, or acknowledged to a
    /// publisher): if the broker later holds less, writes were rolled back.
    pub(super) seen: Option<EventId>,
    /// A re-sync is under way: live events are held, `delivered` stays where the link was lost.
    pub(super) resyncing: bool,
}

impl AppPosition {
    pub(super) fn saw(&mut self, id: EventId) {
        self.seen = Some(EventId::advance(self.seen, id));
    }
}

impl Hub {
    /// Where this instance stands in `app`'s history: known while its channels are subscribed,
    /// else read from the broker (after the subscription is live, so nothing later is missed).
    pub(super) async fn position(self: &Arc<Self>, app: &Arc<str>) -> Result<EventId, AttachError> {
        let known = |hub: &Hub| {
            let state = hub.lock();
            let p = state.positions.get(app);
            (p.and_then(|p| p.delivered), p.and_then(|p| p.seen))
        };
        let (delivered, seen) = known(self);
        if let Some(delivered) = delivered {
            return Ok(delivered);
        }
        // One read per application at a time: when its streams all come back at once (a deploy),
        // the first read answers the thousands that asked while it ran.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let first = {
            let mut reads = self
                .position_reads
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let waiting = reads.entry(app.clone()).or_default();
            waiting.push(tx);
            waiting.len() == 1
        };
        if first {
            // Its own task: the stream that started it may give up (its client leaves) while
            // others wait for the same read.
            let (hub, app) = (self.clone(), app.clone());
            tokio::spawn(async move {
                let read = hub.broker.position(&app, seen).await.map(|position| {
                    hub.count_epoch(&app, position);
                    let mut state = hub.lock();
                    let known = state.positions.entry(app.clone()).or_default();
                    let delivered = EventId::advance(known.delivered, position.id());
                    known.delivered = Some(delivered);
                    known.saw(delivered);
                    delivered
                });
                let waiting = hub
                    .position_reads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&app)
                    .unwrap_or_default();
                for tx in waiting {
                    let _ = tx.send(read.clone());
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(BrokerError::Unavailable("position read abandoned".into())))
            .map_err(AttachError::Broker)
    }

    /// Counts (and logs) a history that started afresh.
    pub(super) fn count_epoch(&self, app: &str, position: Position) {
        let reason = match position {
            Position::Current(_) => return,
            Position::Started(_) => "new",
            Position::RolledBack(id) => {
                tracing::warn!(app, epoch = %id.epoch, "the broker lost events this instance saw \
                    (a failover or restart rolled writes back): a new history starts, streams get reset");
                "rolled_back"
            }
        };
        self.metrics
            .history_epochs
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Notes an id acknowledged to a publisher, so that its loss in a failover is noticed.
    pub fn published(&self, app: &str, id: EventId) {
        let mut state = self.lock();
        match state.positions.get_mut(app) {
            Some(p) => p.saw(id),
            None => {
                let mut p = AppPosition::default();
                p.saw(id);
                state.positions.insert(Arc::from(app), p);
            }
        }
    }
}
