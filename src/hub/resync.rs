//! Re-sync after a lost subscriber link: every open stream catches up from history, from where
//! this instance stood when the link went, before live delivery goes on.
//!
//! Whatever was published while the link was down never reached this instance. So when the link
//! comes back, before the subscriptions are sent again, every live stream is held
//! ([`Hub::suspend_for_resync`]); once they are live, each application's history is read once
//! from its position (its newest id every stream here had been given), 256 users and a page of
//! each history per read, and each stream gets its part followed by the live events held
//! meanwhile, duplicates skipped by id ([`Hub::start_resync`]). A stream whose part goes on gets
//! the rest page by page through the replay path, as a resuming stream does, so that a long outage
//! never costs a stream (or the hub) more than a page at once. Before reading, the position is checked against what the broker holds:
//! if the broker lost its data or rolled writes back, a new history starts and the streams get a
//! `reset` instead of a silent gap.
//!
//! Links can drop again mid-way: each loss starts a new generation, and a read of an older one is
//! thrown away (its streams stay held, and the new generation reads again from the same position).

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::replay::{self, BATCH, Replay};
use super::stream::close_reason;
use super::{Hold, Hub};
use crate::broker::BrokerError;
use crate::history::EventId;
use crate::hub::stream::Stream;

/// Pause between attempts at a read that failed (the command link may come back after the
/// subscriber link).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The streams held for a re-sync, and the generation of the link loss they wait for.
#[derive(Default)]
pub struct Pending {
    generation: u64,
    streams: HashMap<u64, Arc<Stream>>,
    /// When the oldest loss not yet re-synced was noticed, if it held any stream.
    since: Option<Instant>,
}

/// One application's part of a re-sync.
struct AppResync {
    app: Arc<str>,
    /// Where every held stream of the application stood.
    from: Option<EventId>,
    /// The newest id this instance saw, to check the broker still holds it.
    seen: Option<EventId>,
    streams: Vec<Arc<Stream>>,
}

impl Hub {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.resync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriber link was lost: hold every live stream until it has caught up, and end the
    /// streams still joining (they have not been answered yet: their clients retry).
    pub(super) fn suspend_for_resync(&self) {
        let mut pending = self.pending();
        pending.generation += 1;
        let mut state = self.lock();
        if !state.apps.is_empty() {
            pending.since.get_or_insert_with(Instant::now);
        }
        for entry in state.apps.values() {
            for conn in entry.conns.values() {
                if pending.streams.contains_key(&conn.key) {
                    continue;
                }
                match conn.hold() {
                    Hold::Held => {
                        pending.streams.insert(conn.key, conn.clone());
                    }
                    Hold::Joining => conn.finish(close_reason::BROKER_UNAVAILABLE, None),
                    Hold::Gone => {}
                }
            }
        }
        let apps: Vec<Arc<str>> = state.apps.keys().cloned().collect();
        for app in apps {
            state.positions.entry(app).or_default().resyncing = true;
        }
    }

    /// The subscriptions are live again: catch the held streams up, in a task of its own.
    pub(super) fn start_resync(self: Arc<Self>) {
        let generation = self.pending().generation;
        tokio::spawn(self.resync(generation));
    }

    async fn resync(self: Arc<Self>, generation: u64) {
        let (apps, fence_only) = {
            let pending = self.pending();
            if pending.generation != generation {
                return;
            }
            let mut state = self.lock();
            let mut apps: HashMap<Arc<str>, AppResync> = HashMap::new();
            for conn in pending.streams.values() {
                let app = apps.entry(conn.app.clone()).or_insert_with(|| {
                    let p = state.positions.get(&conn.app).copied().unwrap_or_default();
                    AppResync {
                        app: conn.app.clone(),
                        from: p.delivered,
                        seen: p.seen,
                        streams: Vec::new(),
                    }
                });
                app.streams.push(conn.clone());
            }
            // Applications without streams here still had ids acknowledged through this instance:
            // check those survived too, then forget them.
            let fence_only: Vec<(Arc<str>, EventId)> = state
                .positions
                .iter()
                .filter(|(app, _)| !apps.contains_key(*app))
                .filter_map(|(app, p)| Some((app.clone(), p.seen?)))
                .collect();
            state
                .positions
                .retain(|app, p| apps.contains_key(app) || p.delivered.is_some());
            (apps, fence_only)
        };
        let mut tasks = JoinSet::new();
        for (app, seen) in fence_only {
            let hub = self.clone();
            tasks.spawn(async move {
                if let Some(Ok(position)) = hub
                    .with_retries(generation, || hub.broker.position(&app, Some(seen)))
                    .await
                {
                    hub.count_epoch(&app, position);
                }
            });
        }
        for app in apps.into_values() {
            tasks.spawn(self.clone().resync_app(generation, app));
        }
        while tasks.join_next().await.is_some() {}
        let mut pending = self.pending();
        if pending.generation == generation
            && pending.streams.is_empty()
            && let Some(since) = pending.since.take()
        {
            self.metrics.resyncs.inc();
            self.metrics
                .resync_duration
                .observe(since.elapsed().as_secs_f64());
            tracing::info!(
                took_ms = since.elapsed().as_millis() as u64,
                "open streams re-synced from history after the subscriber link was restored"
            );
        }
    }

    async fn resync_app(self: Arc<Self>, generation: u64, app: AppResync) {
        // Does the broker still hold the history this instance followed?
        let fence = app.seen.or(app.from);
        let checked = self
            .with_retries(generation, || self.broker.position(&app.app, fence))
            .await;
        let current = match checked {
            None => return, // a newer loss: its re-sync takes over
            Some(Ok(position)) => {
                self.count_epoch(&app.app, position);
                Some(position.id())
            }
            Some(Err(_)) => None,
        };
        let last = app.from.map(|id| id.to_string()).unwrap_or_default();
        let mut users: Vec<Arc<str>> = app.streams.iter().map(|c| c.user.clone()).collect();
        users.sort();
        users.dedup();
        // A page per history, as a resuming stream reads: a long outage costs a stream no more
        // than a page at once, and the rest follows page by page as its client reads.
        let page = self.replays.page();
        let mut parts: HashMap<Arc<str>, Result<Replay, BrokerError>> = HashMap::new();
        for chunk in users.chunks(BATCH) {
            let names: Vec<String> = chunk.iter().map(|u| u.to_string()).collect();
            let read = match (&app.from, current) {
                // No position to read from, or no broker to read it: nothing can be vouched for.
                (None, _) | (_, None) => Err(BrokerError::Unavailable(
                    "history could not be read after the link was restored".into(),
                )),
                (Some(_), Some(_)) => {
                    self.metrics.replay_reads.inc();
                    match self
                        .with_retries(generation, || {
                            self.broker.since(&app.app, &last, &names, page)
                        })
                        .await
                    {
                        None => return,
                        Some(read) => read,
                    }
                }
            };
            for (user, part) in chunk
                .iter()
                .zip(replay::split(read, &last, chunk.len(), page))
            {
                parts.insert(user.clone(), part);
            }
        }
        let mut pending = self.pending();
        if pending.generation != generation {
            return;
        }
        for conn in &app.streams {
            pending.streams.remove(&conn.key);
            let mut part = parts.get(&conn.user).cloned().unwrap_or_else(|| {
                Err(BrokerError::Unavailable(
                    "no history read for this user".into(),
                ))
            });
            let more = self.fit(&mut part);
            let (events, after) = self.replayed(conn, part, &last);
            // The rest through the shared replay path, live events held until it is all out.
            if !more {
                conn.catch_up(events, after);
            } else if conn.catch_up_page(events, after) {
                tokio::spawn(self.clone().page_on(conn.clone(), after));
            }
        }
        let mut state = self.lock();
        if let Some(p) = state.positions.get_mut(&app.app) {
            p.resyncing = false;
            if let Some(current) = current {
                p.delivered = Some(EventId::advance(p.delivered, current));
            }
        }
    }

    /// Runs `call` until it succeeds or the broker timeout passes; `None` when a newer link loss
    /// made the answer useless.
    async fn with_retries<T, F, Fut>(
        &self,
        generation: u64,
        call: F,
    ) -> Option<Result<T, BrokerError>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let deadline = Instant::now() + self.config.broker_timeout;
        loop {
            if self.pending().generation != generation {
                return None;
            }
            let result = call().await;
            if result.is_ok() || Instant::now() + RETRY_PAUSE > deadline {
                return Some(result);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}
