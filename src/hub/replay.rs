//! Replay reads: what resuming streams missed, read from history once for every stream of an
//! application that resumes from the same id at the same time.
//!
//! After a deploy, thousands of clients reconnect within a second, most of them with the same
//! `Last-Event-ID` (the last broadcast). One history read per stream would queue thousands of
//! function calls on the command link and encode the same broadcasts thousands of times. Instead
//! the first streams to resume from an id start reads (up to [`READS_IN_FLIGHT`] at once); streams
//! arriving while they run wait for the next read, which serves all of them (up to [`BATCH`]
//! users per call). Each stream's read starts after it asked, so after its subscription was live:
//! the no-gap guarantee is kept. The broadcasts are encoded once per read and shared by every
//! stream that replays them.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::oneshot;

use super::{Hub, Stream};
use crate::batch::Batches;
use crate::broker::{Broker, BrokerError};
use crate::history::{self, Backlog, EventId, ResetReason};
use crate::metrics::{AppReasonLabel, Metrics};
use crate::sse::{self, Event};

/// Most users asked for in one history read (a few milliseconds of Redis time).
pub(super) const BATCH: usize = 256;
/// Most reads in flight for one application and id. One at a time made a reconnect wave of 19,500
/// streams wait for 76 reads in a row, each a round trip and its answers' encoding; a few
/// overlap those, while each still carries a batch.
const READS_IN_FLIGHT: usize = 4;

/// Entries of each history read per page: what half a stream's queue holds of events of 4 KB
/// (reads are sized before the events are seen; larger ones are cut to the byte budget when
/// queued), at least 8 and at most [`BATCH`].
pub(super) fn page_size(limits: super::OutboxLimits) -> usize {
    (limits.bytes / 2 / 4096)
        .min(limits.events / 2)
        .clamp(8, BATCH)
}

/// What one resuming stream is to be sent.
#[derive(Debug, Clone)]
pub enum Replay {
    /// The encoded events it missed, in order with their ids, and the id they bring it to;
    /// `more` when this is a page and history goes on after `after`.
    Events {
        events: Vec<(EventId, Bytes)>,
        after: Option<EventId>,
        more: bool,
    },
    /// Its gap cannot be filled.
    Reset {
        current: Option<EventId>,
        reason: ResetReason,
    },
}

type Answer = oneshot::Sender<Result<Replay, BrokerError>>;
/// An application and the id its streams resume from.
type Key = (Arc<str>, Arc<str>);

/// Streams waiting for a history read, by application and id. A key is present while a reader
/// task for it runs.
pub struct Replays {
    broker: Arc<dyn Broker>,
    /// Most entries read of each history per read (a page); 0 reads everything.
    page: usize,
    /// The streams (user, answer) waiting for a read, by key.
    waiting: Batches<Key, (Arc<str>, Answer)>,
    /// History reads made, for the metrics.
    reads: prometheus_client::metrics::counter::Counter,
}

impl Replays {
    pub fn new(
        broker: Arc<dyn Broker>,
        page: usize,
        reads: prometheus_client::metrics::counter::Counter,
    ) -> Replays {
        Replays {
            broker,
            page,
            waiting: Batches::new(READS_IN_FLIGHT, BATCH),
            reads,
        }
    }

    /// Entries of each history one read takes (0: all).
    pub fn page(&self) -> usize {
        self.page
    }

    /// What `user` of `app` missed after `last`, read together with every other stream resuming
    /// from the same id now.
    pub async fn replay(
        self: &Arc<Self>,
        app: &Arc<str>,
        user: &Arc<str>,
        last: &str,
    ) -> Result<Replay, BrokerError> {
        let (tx, rx) = oneshot::channel();
        let key: Key = (app.clone(), Arc::from(last));
        if self.waiting.push(&key, (user.clone(), tx)) {
            // Its own task: the stream that started it may give up (its client leaves) while
            // others wait for the same read.
            tokio::spawn(self.clone().read(key));
        }
        rx.await
            .unwrap_or_else(|_| Err(BrokerError::Unavailable("replay read abandoned".into())))
    }

    /// Reads for the streams waiting on `key`, batch after batch, until none is left.
    async fn read(self: Arc<Self>, key: Key) {
        while let Some(batch) = self.waiting.next(&key) {
            let users: Vec<String> = batch.iter().map(|(u, _)| u.to_string()).collect();
            self.reads.inc();
            let backlog = self.broker.since(&key.0, &key.1, &users, self.page).await;
            answer(batch, backlog, &key.1, self.page);
        }
    }
}

/// Hands each waiting stream its part of a read.
fn answer(
    batch: Vec<(Arc<str>, Answer)>,
    backlog: Result<Backlog, BrokerError>,
    last: &str,
    page: usize,
) {
    let parts = split(backlog, last, batch.len(), page);
    for ((_, tx), part) in batch.into_iter().zip(parts) {
        let _ = tx.send(part);
    }
}

/// Each of `users` users' part of one history read from `last`, in the order they were asked for.
/// A read of `page` entries per history (0: all of it) may stop short: a list that came back full
/// may go on, so each part ends where the first full list it merges ends (everything up to there
/// is known), and says there is more.
pub fn split(
    backlog: Result<Backlog, BrokerError>,
    last: &str,
    users: usize,
    page: usize,
) -> Vec<Result<Replay, BrokerError>> {
    let (current, broadcasts, own) = match backlog {
        Err(e) => return vec![Err(e); users],
        Ok(Backlog::Reset { current, reason }) => {
            return (0..users)
                .map(|_| Ok(Replay::Reset { current, reason }))
                .collect();
        }
        Ok(Backlog::Events {
            current,
            broadcasts,
            users,
        }) => (current, broadcasts, users),
    };
    // The newest id of a list that may go on past it.
    let end = |list: &[(EventId, Bytes)]| {
        if page > 0 && list.len() >= page {
            list.last().map(|(id, _)| *id)
        } else {
            None
        }
    };
    let shared_end = end(&broadcasts);
    let shared = encode(broadcasts);
    let from = last.parse::<EventId>().ok().or(current);
    own.into_iter()
        .map(|own| {
            Ok(match own {
                None => Replay::Reset {
                    current,
                    reason: ResetReason::TooOld,
                },
                Some(own) => {
                    let cut = match (end(&own), shared_end) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let mut events = history::merge(encode(own), shared.clone());
                    if let Some(cut) = cut {
                        events.retain(|(id, _)| *id <= cut);
                    }
                    let after = events.iter().map(|(id, _)| Some(*id)).fold(from, Ord::max);
                    Replay::Events {
                        events,
                        after,
                        more: cut.is_some(),
                    }
                }
            })
        })
        .collect()
}

/// Durable envelopes as SSE events, ids kept for merging.
fn encode(entries: Vec<(EventId, Bytes)>) -> Vec<(EventId, Bytes)> {
    entries
        .into_iter()
        .map(|(id, m)| (id, sse::parse_payload(&m).event.encode()))
        .collect()
}

/// The event that tells a client its gap cannot be filled. It carries the newest id, so the
/// client's `lastEventId` moves to the present.
fn reset_event(current: Option<EventId>, reason: &str, last_event_id: &str) -> Bytes {
    Event {
        id: current.map(|c| c.to_string()),
        event: Some("reset".into()),
        data: json!({"reason": reason, "last_event_id": last_event_id}).to_string(),
        retry: None,
    }
    .encode()
}

impl Hub {
    /// Sends the rest of a long catch-up page by page, each read once the previous one has gone
    /// to the socket: a resuming stream never holds more than a page and its held live events
    /// (within its queue limits, or it is cut off and resumes later from where it got to), and a
    /// client that does not read costs no further history reads.
    pub(super) async fn page_on(self: Arc<Self>, conn: Arc<Stream>, mut after: Option<EventId>) {
        loop {
            if !std::future::poll_fn(|cx| conn.poll_drained(cx)).await {
                return; // the stream ended
            }
            let Some(from) = after else {
                conn.catch_up(Vec::new(), None);
                return;
            };
            let (events, next, more) = self.replay(&conn, &from.to_string()).await;
            if !more {
                conn.catch_up(events, next);
                return;
            }
            if !conn.catch_up_page(events, next) {
                return;
            }
            after = next;
        }
    }

    /// What a stream resuming after `last` must see first (a page of it: at most half its byte
    /// budget), the id it then stands at, and whether history goes on after that.
    pub(super) async fn replay(
        &self,
        conn: &Stream,
        last: &str,
    ) -> (Vec<(Option<EventId>, Bytes)>, Option<EventId>, bool) {
        let mut replay = self.replays.replay(&conn.app, &conn.user, last).await;
        let more = self.fit(&mut replay);
        let (events, after) = self.replayed(conn, replay, last);
        (events, after, more)
    }

    /// Cuts a read's events to a page, half a stream's byte budget (at least one event); returns
    /// whether history goes on after what is left.
    pub(super) fn fit(&self, replay: &mut Result<Replay, BrokerError>) -> bool {
        if let Ok(Replay::Events {
            events,
            after,
            more,
        }) = replay
        {
            let budget = self.config.queue.bytes / 2;
            let mut bytes = 0;
            let fits = events
                .iter()
                .position(|(_, b)| {
                    bytes += b.len();
                    bytes > budget
                })
                .map_or(events.len(), |n| n.max(1));
            if fits < events.len() {
                events.truncate(fits);
                *after = events.last().map(|(id, _)| *id).or(*after);
                *more = true;
            }
        }
        matches!(replay, Ok(Replay::Events { more: true, .. }))
    }

    /// A history read's part for `conn`, as events to queue (ids kept, to skip what the stream
    /// has) and the id they bring it to; a `reset` where the gap cannot be filled.
    pub(super) fn replayed(
        &self,
        conn: &Stream,
        replay: Result<Replay, BrokerError>,
        last: &str,
    ) -> (Vec<(Option<EventId>, Bytes)>, Option<EventId>) {
        let label = Metrics::app(&conn.app);
        let replay = match replay {
            Ok(replay) => replay,
            Err(error) => {
                // Never pretend: if history cannot be read, the client is told to refetch.
                tracing::warn!(app = %conn.app, user = %conn.user, %error, "history unavailable for replay");
                return (
                    vec![(None, reset_event(None, "history_unavailable", last))],
                    None,
                );
            }
        };
        match replay {
            Replay::Events { events, after, .. } => {
                self.metrics
                    .replayed_events
                    .get_or_create(&label)
                    .inc_by(events.len() as u64);
                (
                    events.into_iter().map(|(id, b)| (Some(id), b)).collect(),
                    after,
                )
            }
            Replay::Reset { current, reason } => {
                self.metrics
                    .replay_resets
                    .get_or_create(&AppReasonLabel {
                        app: conn.tenant().to_string(),
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::info!(app = %conn.app, user = %conn.user, reason = reason.as_str(),
                    "cannot replay from the client's id: sending reset");
                (
                    vec![(None, reset_event(current, reason.as_str(), last))],
                    current,
                )
            }
        }
    }
}
