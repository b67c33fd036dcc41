//! The local hub: which live streams on this instance belong to which application and user, and
//! the fan-out of encoded events to them.
//!
//! - [`stream`]: one stream, its outbox and the writes to its socket;
//! - [`writers`]: the threads that share a large fan-out's socket writes;
//! - [`replay`]: history reads for resuming streams, shared by those resuming together;
//! - [`resync`]: catching every open stream up from history after the subscriber link was lost;
//! - [`timers`]: the keep-alive ping, token expiry and the registry heartbeat.
//!
//! A stream costs one small [`Conn`] (ids, an outbox, its socket and a waker); there is no timer or
//! channel per connection, and its task sleeps until the socket needs it. The hub reference-counts
//! broker subscriptions: the first stream of a user subscribes `{app}:channel:{user}` (and the first
//! of an app `{app}:broadcast`), the last one unsubscribes. Each message is parsed and encoded
//! once; every recipient gets the same [`Bytes`], written to its socket by the delivering thread
//! (and the writers). Fan-out never waits: a stream whose outbox is full is cut off (it reconnects
//! and resumes by id) instead of slowing the others.

mod replay;
mod resync;
pub mod stream;
pub mod timers;
mod writers;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use self::replay::{Replay, Replays};
pub use self::stream::{Conn, Hold, Outbox, Push, QueueLimits, Wire};
use self::writers::Writers;
use crate::broker::{
    Admission, Admitted, Broker, BrokerError, MessageSink, Position, Topic, app_channel,
    parse_channel, user_channel,
};
use crate::clock;
use crate::history::EventId;
use crate::metrics::{AppReasonLabel, KindLabel, Metrics, ReasonLabel, close_reason};
use crate::registry::Registry;
use crate::sse::{self, Event, PayloadKind};

type PositionAnswer = tokio::sync::oneshot::Sender<Result<EventId, BrokerError>>;

/// What a new stream is, before it joins the hub.
pub struct NewConn {
    pub app: String,
    pub user: String,
    pub exp: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: String,
    /// The last event id the client saw (`Last-Event-ID` or `?last_event_id=`): replay from there.
    pub last_event_id: Option<String>,
    /// The cluster-wide caps that apply to it.
    pub caps: Caps,
}

/// Most live streams across the cluster, per application and per user (0: no cap).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub app: u64,
    pub user: u64,
}

#[derive(Default)]
struct AppEntry {
    /// In key order, which is the order the streams (and their sockets) were created in: walking
    /// them in that order keeps the kernel's per-socket structures and ours in cache far better
    /// than a hash map's order (measured with `sse-bench floor`: 3.9 µs per write in creation
    /// order, 4.8 µs shuffled).
    conns: BTreeMap<u64, Arc<Conn>>,
    users: HashMap<Arc<str>, HashMap<u64, Arc<Conn>>>,
}

/// Where this instance stands in an application's history.
#[derive(Default, Debug, Clone, Copy)]
struct AppPosition {
    /// Every live stream of the application here has been given every durable event up to this id
    /// that was meant for it: a re-sync after a lost link replays from here. Known only while the
    /// application's channels are subscribed (read from the broker when its first stream joins).
    delivered: Option<EventId>,
    /// The newest id this instance saw of the application (delivered, or acknowledged to a
    /// publisher): if the broker later holds less, writes were rolled back.
    seen: Option<EventId>,
    /// A re-sync is under way: live events are held, `delivered` stays where the link was lost.
    resyncing: bool,
}

impl AppPosition {
    fn saw(&mut self, id: EventId) {
        self.seen = Some(EventId::advance(self.seen, id));
    }
}

#[derive(Default)]
struct State {
    apps: HashMap<Arc<str>, AppEntry>,
    positions: HashMap<Arc<str>, AppPosition>,
    /// Streams by token expiry, so one timer ends them all on time.
    expiries: BTreeMap<(u64, u64), Arc<Conn>>,
    len: usize,
    /// Set once shutdown starts: no new streams join.
    closed: bool,
}

/// The hub's settings.
pub struct HubConfig {
    pub queue: QueueLimits,
    pub max_message_bytes: usize,
    /// Most streams this instance holds (0: no limit).
    pub max_connections: usize,
    /// The first bytes of every stream.
    pub hello: Bytes,
    /// Longest wait for the broker when a stream joins (admission, subscription, history).
    pub broker_timeout: Duration,
    /// How long a registry entry (and so an admitted place) lives unless kept alive.
    pub registry_ttl_secs: u64,
}

pub struct Hub {
    state: Mutex<State>,
    next_key: AtomicU64,
    broker: Arc<dyn Broker>,
    registry: Registry,
    metrics: Arc<Metrics>,
    config: HubConfig,
    writers: Writers,
    replays: Arc<Replays>,
    resync: Mutex<resync::Pending>,
    /// Streams waiting for a read of their application's position, by application (see
    /// [`Hub::position`]); an entry exists while its read runs.
    position_reads: Mutex<HashMap<Arc<str>, Vec<PositionAnswer>>>,
}

/// Why a stream could not join.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("this instance holds its maximum number of streams")]
    InstanceFull,
    #[error("this user already has {count} streams open (limit {limit})")]
    UserFull { count: u64, limit: u64 },
    #[error("this application holds its maximum number of streams ({limit})")]
    AppFull { limit: u64 },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker did not answer in time")]
    Timeout,
}

/// A stream's membership in the hub; dropping it (when the response body is dropped, i.e. the
/// client is gone or the stream ended) removes the stream and its registry entry.
pub struct Lease {
    conn: Arc<Conn>,
    hub: Arc<Hub>,
}

impl Lease {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.hub.detach(&self.conn);
    }
}

/// One event offered to many streams: what was queued, which sockets to write, who was cut off.
#[derive(Default)]
struct Offer {
    delivered: usize,
    flush: Vec<Arc<Conn>>,
    cut_off: Vec<(Arc<Conn>, usize)>,
}

impl Offer {
    fn push(&mut self, conn: &Arc<Conn>, bytes: &Bytes, id: Option<EventId>) {
        match conn.push(bytes.clone(), id) {
            Push::Queued => self.delivered += 1,
            Push::Flush => {
                self.delivered += 1;
                self.flush.push(conn.clone());
            }
            Push::CutOff(lost) => self.cut_off.push((conn.clone(), lost)),
            Push::Gone => {}
        }
    }
}

impl Hub {
    pub fn new(
        broker: Arc<dyn Broker>,
        registry: Registry,
        metrics: Arc<Metrics>,
        config: HubConfig,
    ) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            next_key: AtomicU64::new(1),
            replays: Arc::new(Replays::new(
                broker.clone(),
                replay::page_size(config.queue),
                metrics.replay_reads.clone(),
            )),
            broker,
            registry,
            metrics,
            config,
            writers: Writers::per_core(),
            resync: Mutex::default(),
            position_reads: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a stream, returning once its subscriptions are live and, when it resumes from an id,
    /// once what it missed is queued ahead of live events. On error the stream is already gone.
    pub async fn attach(self: &Arc<Self>, new: NewConn) -> Result<Lease, AttachError> {
        let id = uuid::Uuid::new_v4();
        self.admit(&new, id).await?;
        let lease = match self.insert(id, &new) {
            Ok(lease) => lease,
            Err(e) => {
                self.registry.release(&new.app, &new.user, &id);
                return Err(e);
            }
        };
        let channels = vec![user_channel(&new.app, &new.user), app_channel(&new.app)];
        let timeout = self.config.broker_timeout;
        let caught_up = async {
            self.broker.subscribe(channels).await?;
            let start = self.position(&lease.conn.app).await?;
            let (replay, after, more) = match &new.last_event_id {
                None => (Vec::new(), Some(start), false),
                Some(last) => self.replay(&lease.conn, last).await,
            };
            let open = if more {
                lease.conn.catch_up_page(replay, after)
            } else {
                lease.conn.catch_up(replay, after)
            };
            if !open {
                // Ended while joining (the subscriber link was lost meanwhile): the client
                // retries, and resumes by id.
                return Err(AttachError::Broker(BrokerError::Unavailable(
                    "the broker link was lost while the stream joined".into(),
                )));
            }
            Ok::<_, AttachError>(more.then_some(after))
        };
        let error = match tokio::time::timeout(timeout, caught_up).await {
            Ok(Ok(paging)) => {
                if let Some(after) = paging {
                    tokio::spawn(self.clone().page_on(lease.conn.clone(), after));
                }
                self.registry.put(&lease.conn);
                return Ok(lease);
            }
            Ok(Err(e)) => e,
            Err(_) => AttachError::Timeout,
        };
        // Dropping the lease removes the stream again, counted under this reason.
        lease.conn.finish(close_reason::BROKER_UNAVAILABLE, None);
        Err(error)
    }

    /// Sends the rest of a long catch-up page by page, each read once the previous one has gone
    /// to the socket: a resuming stream never holds more than a page and its held live events
    /// (within its queue limits, or it is cut off and resumes later from where it got to), and a
    /// client that does not read costs no further history reads.
    async fn page_on(self: Arc<Self>, conn: Arc<Conn>, mut after: Option<EventId>) {
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

    /// Whether this instance takes one more stream.
    fn room(&self, state: &State) -> Result<(), AttachError> {
        if state.closed {
            return Err(AttachError::ShuttingDown);
        }
        if self.config.max_connections > 0 && state.len >= self.config.max_connections {
            return Err(AttachError::InstanceFull);
        }
        Ok(())
    }

    /// Reserves the stream's place under the cluster-wide caps, in one atomic broker step (a
    /// burst of connects on any number of instances never gets past a cap). The instance's own
    /// room is checked first, so that a full instance costs the broker nothing.
    async fn admit(&self, new: &NewConn, id: uuid::Uuid) -> Result<(), AttachError> {
        self.room(&self.lock())?;
        if new.caps == Caps::default() {
            return Ok(());
        }
        let conn = id.to_string();
        let admission = Admission {
            app: &new.app,
            user: &new.user,
            conn: &conn,
            max_app: new.caps.app,
            max_user: new.caps.user,
            ttl_secs: self.config.registry_ttl_secs,
        };
        let admitted =
            tokio::time::timeout(self.config.broker_timeout, self.broker.admit(admission))
                .await
                .map_err(|_| AttachError::Timeout)??;
        match admitted {
            Admitted::Yes => Ok(()),
            Admitted::UserFull(count) => Err(AttachError::UserFull {
                count,
                limit: new.caps.user,
            }),
            Admitted::AppFull(_) => Err(AttachError::AppFull {
                limit: new.caps.app,
            }),
        }
    }

    fn insert(self: &Arc<Self>, id: uuid::Uuid, new: &NewConn) -> Result<Lease, AttachError> {
        let mut state = self.lock();
        self.room(&state)?;
        let app: Arc<str> = match state.apps.get_key_value(new.app.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.app.as_str()),
        };
        let entry = state.apps.entry(app.clone()).or_default();
        let user: Arc<str> = match entry.users.get_key_value(new.user.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.user.as_str()),
        };
        let conn = Arc::new(Conn::new(
            id,
            new,
            (app, user.clone()),
            self.next_key.fetch_add(1, Ordering::Relaxed),
            self.config.queue,
            self.config.hello.clone(),
        ));
        entry.conns.insert(conn.key, conn.clone());
        entry
            .users
            .entry(user)
            .or_default()
            .insert(conn.key, conn.clone());
        state.expiries.insert((conn.exp, conn.key), conn.clone());
        state.len += 1;
        let label = Metrics::app(&conn.app);
        self.metrics.connections.get_or_create(&label).inc();
        self.metrics.active_clients.inc();
        self.metrics.connections_opened.get_or_create(&label).inc();
        Ok(Lease {
            conn,
            hub: self.clone(),
        })
    }

    /// Where this instance stands in `app`'s history: known while its channels are subscribed,
    /// else read from the broker (after the subscription is live, so nothing later is missed).
    async fn position(self: &Arc<Self>, app: &Arc<str>) -> Result<EventId, AttachError> {
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
    fn count_epoch(&self, app: &str, position: Position) {
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

    /// What a stream resuming after `last` must see first (a page of it: at most half its byte
    /// budget), the id it then stands at, and whether history goes on after that.
    async fn replay(
        &self,
        conn: &Conn,
        last: &str,
    ) -> (Vec<(Option<EventId>, Bytes)>, Option<EventId>, bool) {
        let mut replay = self.replays.replay(&conn.app, &conn.user, last).await;
        if let Ok(Replay::Events {
            events,
            after,
            more,
        }) = &mut replay
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
        let more = matches!(replay, Ok(Replay::Events { more: true, .. }));
        let (events, after) = self.replayed(conn, replay, last);
        (events, after, more)
    }

    /// A history read's part for `conn`, as events to queue (ids kept, to skip what the stream
    /// has) and the id they bring it to; a `reset` where the gap cannot be filled.
    fn replayed(
        &self,
        conn: &Conn,
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
                        app: conn.app.to_string(),
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

    fn detach(&self, conn: &Arc<Conn>) {
        let reason = conn.close_reason();
        {
            let mut state = self.lock();
            state.expiries.remove(&(conn.exp, conn.key));
            let Some(entry) = state.apps.get_mut(&*conn.app) else {
                return;
            };
            if entry.conns.remove(&conn.key).is_none() {
                return;
            }
            let mut unsubscribe = Vec::new();
            if let Some(users) = entry.users.get_mut(&*conn.user) {
                users.remove(&conn.key);
                if users.is_empty() {
                    entry.users.remove(&*conn.user);
                    unsubscribe.push(user_channel(&conn.app, &conn.user));
                }
            }
            if entry.conns.is_empty() {
                state.apps.remove(&*conn.app);
                unsubscribe.push(app_channel(&conn.app));
                // Unsubscribed, this instance no longer follows the application's history.
                if let Some(p) = state.positions.get_mut(&*conn.app) {
                    p.delivered = None;
                    p.resyncing = false;
                }
            }
            state.len -= 1;
            // The last stream's unsubscribe is sent under the lock: a stream that joins after it
            // sends its subscribe later, so the broker always ends up subscribed when it should.
            if !unsubscribe.is_empty() {
                self.broker.unsubscribe(unsubscribe);
            }
            // Also under the lock, so that no heartbeat touch of this stream is queued after this
            // delete (a touch that finds the entry gone would write it again). Always: a stream
            // that never joined still holds the place its admission reserved.
            self.registry.remove(conn);
        }
        let label = Metrics::app(&conn.app);
        self.metrics.connections.get_or_create(&label).dec();
        self.metrics.active_clients.dec();
        self.metrics
            .connections_closed
            .get_or_create(&AppReasonLabel {
                app: conn.app.to_string(),
                reason,
            })
            .inc();
        tracing::debug!(app = %conn.app, user = %conn.user, conn = %conn.id, reason, "stream closed");
    }

    /// Queues encoded bytes for every stream of a topic; returns how many got them. The sockets
    /// are written when the offer is completed.
    fn offer_to(
        &self,
        offer: &mut Offer,
        topic: &Topic<'_>,
        bytes: &Bytes,
        id: Option<EventId>,
    ) -> usize {
        let app = match topic {
            Topic::User { app, .. } | Topic::App { app } => *app,
        };
        let before = offer.delivered;
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some((app_key, entry)) = state.apps.get_key_value(app) else {
                return 0;
            };
            if let Some(id) = id {
                let p = match state.positions.get_mut(app) {
                    Some(p) => p,
                    None => state.positions.entry(app_key.clone()).or_default(),
                };
                p.saw(id);
                if !p.resyncing {
                    p.delivered = Some(EventId::advance(p.delivered, id));
                }
            }
            match topic {
                Topic::App { .. } => {
                    for conn in entry.conns.values() {
                        offer.push(conn, bytes, id);
                    }
                }
                Topic::User { user, .. } => {
                    for conn in entry.users.get(*user).into_iter().flat_map(|m| m.values()) {
                        offer.push(conn, bytes, id);
                    }
                }
            }
        }
        let delivered = offer.delivered - before;
        if delivered > 0 {
            self.metrics
                .message_sent
                .get_or_create(&Metrics::app(app))
                .inc_by(delivered as u64);
        }
        delivered
    }

    /// Writes what an offer queued (outside the hub's lock) and reports the streams it cut off.
    fn complete(&self, offer: Offer) {
        self.writers.flush(offer.flush);
        for (conn, lost) in offer.cut_off {
            self.report_slow(&conn, lost);
        }
    }

    fn report_slow(&self, conn: &Conn, lost: usize) {
        let app = Metrics::app(&conn.app);
        self.metrics.slow_clients.get_or_create(&app).inc();
        self.metrics
            .dropped_message
            .get_or_create(&app)
            .inc_by(lost as u64);
        tracing::warn!(app = %conn.app, user = %conn.user, conn = %conn.id, lost,
            "stream cut off: its client is not reading fast enough");
    }

    /// Offers the same bytes to the local streams of one slot out of `slots` (pings: each tick
    /// pings one slot, so a whole interval's pings are spread instead of all written at once).
    pub fn push_slot(&self, bytes: &Bytes, slot: u64, slots: u64) {
        let mut offer = Offer::default();
        {
            let state = self.lock();
            let in_slot = |c: &&Arc<Conn>| c.key % slots == slot;
            for conn in state
                .apps
                .values()
                .flat_map(|e| e.conns.values())
                .filter(in_slot)
            {
                offer.push(conn, bytes, None);
            }
        }
        self.complete(offer);
    }

    /// Ends the streams whose token expired at or before `now` (seconds), each with a
    /// `token_expired` event: the client reconnects with a fresh token and resumes by id.
    pub fn expire_tokens(&self, now: u64) -> usize {
        let mut state = self.lock();
        let mut ended = 0;
        while let Some(entry) = state.expiries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let conn = entry.remove();
            let event = Event::json("token_expired", &json!({"exp": conn.exp})).encode();
            conn.finish(close_reason::TOKEN_EXPIRED, Some(event));
            ended += 1;
        }
        ended
    }

    /// Stops new streams joining and ends every open one, each after its own last event (so that
    /// the reconnects of a large instance spread out instead of arriving at once).
    pub fn close_all(&self, last: impl Fn(&Conn) -> Bytes) {
        let mut state = self.lock();
        state.closed = true;
        for conn in state.apps.values().flat_map(|e| e.conns.values()) {
            conn.finish(close_reason::SHUTDOWN, Some(last(conn)));
        }
    }

    /// Queues a registry touch of every local stream (the heartbeat): entries live on, and those
    /// Redis lost are written again.
    pub fn refresh_registry(&self) {
        let state = self.lock();
        for conn in state.apps.values().flat_map(|e| e.conns.values()) {
            self.registry.touch(conn);
        }
    }

    /// Queues the deletion of every local stream's registry entry (at shutdown, for streams whose
    /// clients have not gone yet) and waits until the writes have been tried.
    pub async fn clear_registry(&self) {
        {
            let state = self.lock();
            for conn in state.apps.values().flat_map(|e| e.conns.values()) {
                self.registry.remove(conn);
            }
        }
        self.registry.flush().await;
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

impl MessageSink for Hub {
    fn deliver(&self, messages: &[(&str, &[u8])]) {
        // Every event is queued first and the sockets written once at the end, so a burst goes
        // out in one write per stream instead of one per event.
        let mut offer = Offer::default();
        for (channel, payload) in messages {
            self.offer_message(&mut offer, channel, payload);
        }
        self.complete(offer);
    }

    fn suspend(&self) {
        self.suspend_for_resync();
    }

    fn resume(self: Arc<Self>) {
        self.start_resync();
    }
}

impl Hub {
    /// Parses and encodes one broker message and queues it for its topic's streams.
    fn offer_message(&self, offer: &mut Offer, channel: &str, payload: &[u8]) {
        let Some(topic) = parse_channel(channel) else {
            self.metrics
                .messages_dropped
                .get_or_create(&ReasonLabel {
                    reason: "unknown_channel",
                })
                .inc();
            return;
        };
        if payload.len() > self.config.max_message_bytes {
            self.metrics
                .messages_dropped
                .get_or_create(&ReasonLabel {
                    reason: "too_large",
                })
                .inc();
            tracing::warn!(
                channel,
                bytes = payload.len(),
                limit = self.config.max_message_bytes,
                "message not delivered: larger than MAX_MESSAGE_BYTES"
            );
            return;
        }
        let parsed = sse::parse_payload(payload);
        let kind = match parsed.kind {
            PayloadKind::Envelope => "envelope",
            PayloadKind::Raw => "raw",
            PayloadKind::TooDeep => {
                self.metrics
                    .messages_dropped
                    .get_or_create(&ReasonLabel { reason: "too_deep" })
                    .inc();
                tracing::warn!(
                    channel,
                    depth = sse::MAX_DEPTH,
                    "message not delivered: JSON nested deeper than any publish path accepts"
                );
                return;
            }
        };
        self.metrics
            .broker_messages
            .get_or_create(&KindLabel { kind })
            .inc();
        if parsed.sanitised {
            self.metrics.sanitised_fields.inc();
            tracing::warn!(
                channel,
                "published id/type held control characters or was too long; sanitised"
            );
        }
        // Only an event of history has an id of history: a fire-and-forget publish may carry any
        // id of its own, which must never move a stream's position.
        let id: Option<EventId> = parsed
            .durable
            .then(|| parsed.event.id.as_deref().and_then(|s| s.parse().ok()))
            .flatten();
        let bytes = parsed.event.encode();
        if self.offer_to(offer, &topic, &bytes, id) > 0
            && let Some(id) = id
        {
            let app = match topic {
                Topic::User { app, .. } | Topic::App { app } => app,
            };
            let late_ms = clock::unix_ms().saturating_sub(id.ms);
            self.metrics
                .delivery_latency
                .get_or_create(&Metrics::app(app))
                .observe(late_ms as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Retention;
    use crate::broker::embedded::EmbeddedBroker;

    #[tokio::test]
    async fn a_long_catch_up_is_held_a_page_at_a_time() {
        let broker = Arc::new(EmbeddedBroker::new(Retention {
            max_len: 1000,
            ttl_secs: 3600,
        }));
        let metrics = Arc::new(Metrics::new());
        let (registry, _writer) = Registry::new(
            broker.clone(),
            "i",
            Duration::from_secs(60),
            metrics.clone(),
        );
        let limits = QueueLimits {
            events: 1024,
            bytes: 256 << 10,
        };
        let hub = Arc::new(Hub::new(
            broker.clone(),
            registry,
            metrics,
            HubConfig {
                queue: limits,
                max_message_bytes: 1 << 20,
                max_connections: 0,
                hello: Bytes::new(),
                broker_timeout: Duration::from_secs(5),
                registry_ttl_secs: 60,
            },
        ));
        broker.start(hub.clone()).await.unwrap();
        // 4 MB of history the stream missed: 1,000 broadcasts of 4 KB.
        let envelope = Bytes::from(format!(r#"{{"data":"{}"}}"#, "x".repeat(4000)));
        let mut ids = Vec::new();
        for _ in 0..1000 {
            let (id, _) = broker
                .publish_durable("a", None, envelope.clone())
                .await
                .unwrap();
            ids.push(id);
        }
        let lease = hub
            .attach(NewConn {
                app: "a".into(),
                user: "u".into(),
                exp: u64::MAX,
                remote_addr: "127.0.0.1:1".parse().unwrap(),
                user_agent: String::new(),
                last_event_id: Some(ids[0].to_string()),
                caps: Caps::default(),
            })
            .await
            .unwrap();
        let conn = lease.conn().clone();
        // Nothing reads: the stream holds one page (half its budget, plus one event), not 4 MB.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bound = limits.bytes / 2 + 4200;
        assert!(conn.queued_bytes() <= bound, "{}", conn.queued_bytes());
        // Read by a response body: the pages come as the outbox empties, all of it, in order,
        // and never more than a page waits.
        let mut got = Vec::new();
        while got.len() < 999 {
            assert!(conn.queued_bytes() <= bound, "{}", conn.queued_bytes());
            let next = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| conn.poll_next(cx)),
            )
            .await
            .expect("the next page comes")
            .expect("open");
            let text = String::from_utf8_lossy(&next).to_string();
            if let Some(id) = text.strip_prefix("id: ") {
                got.push(id.lines().next().unwrap_or_default().to_string());
            }
        }
        let want: Vec<String> = ids[1..].iter().map(|id| id.to_string()).collect();
        assert_eq!(got, want);
    }
}
