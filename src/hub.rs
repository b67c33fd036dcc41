//! The local hub: which live streams on this instance belong to which application and user, and
//! the fan-out of encoded events to them.
//!
//! A stream costs one small [`Conn`] (ids, a short queue and a waker); there is no task, timer or
//! channel per connection. The hub reference-counts broker subscriptions: the first stream of a user
//! subscribes `{app}:channel:{user}` (and the first of an app `{app}:broadcast`), the last one
//! unsubscribes. Each message is parsed and encoded once; every recipient gets the same [`Bytes`].
//! Fan-out never waits: a stream whose queue is full is cut off (it reconnects and resumes by id)
//! instead of slowing the others.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::broker::{
    Broker, BrokerError, ConnectionRecord, IdRef, MessageSink, Topic, app_channel, parse_channel,
    user_channel,
};
use crate::history::{EventId, Since};
use crate::metrics::{AppReasonLabel, KindLabel, Metrics, ReasonLabel, close_reason};
use crate::registry::Registry;
use crate::sse::{self, Event, PayloadKind};

/// How much a stream may have waiting before its client counts as too slow.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub events: usize,
    pub bytes: usize,
}

/// One live stream.
pub struct Conn {
    pub id: uuid::Uuid,
    pub app: Arc<str>,
    pub user: Arc<str>,
    pub created_at: u64,
    /// Token expiry (seconds since the epoch): the stream ends then.
    pub exp: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: Box<str>,
    /// Local key in the hub's maps.
    key: u64,
    limits: QueueLimits,
    queue: Mutex<Queue>,
}

struct Queue {
    items: VecDeque<Bytes>,
    bytes: usize,
    waker: Option<Waker>,
    state: QueueState,
    /// While the stream catches up from history, live events wait here with their ids, so that the
    /// switch to live has neither gap nor duplicate.
    held: Option<Vec<(Option<EventId>, Bytes)>>,
    /// The id replay brought the stream up to. A live copy of an event at or below it (published
    /// while history was read, still on its way through the subscriber) is a duplicate. Durable
    /// events of an application reach an instance in id order, so this one id is enough.
    floor: Option<EventId>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum QueueState {
    #[default]
    Open,
    /// Deliver what is queued, then end the stream; the reason is counted when it ends.
    Closing(&'static str),
    /// End the stream now, dropping what is queued (a client too slow to keep up).
    Closed,
}

/// What happened to an event offered to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The stream was too slow: it has just been cut off, losing this many queued events.
    CutOff(usize),
    /// The stream is already ending.
    Gone,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event without ever waiting. `id` is the event's id when it is a durable one.
    pub fn push(&self, bytes: Bytes, id: Option<EventId>) -> Push {
        let mut q = self.lock();
        if q.state != QueueState::Open {
            return Push::Gone;
        }
        if let (Some(id), Some(floor)) = (id, q.floor)
            && id <= floor
        {
            return Push::Queued; // already delivered by replay
        }
        let waiting = q.items.len() + q.held.as_ref().map_or(0, Vec::len);
        if waiting >= self.limits.events || q.bytes + bytes.len() > self.limits.bytes {
            let lost = waiting + 1;
            q.items = VecDeque::new();
            q.held = None;
            q.bytes = 0;
            q.state = QueueState::Closed;
            wake(q);
            return Push::CutOff(lost);
        }
        q.bytes += bytes.len();
        match &mut q.held {
            Some(held) => held.push((id, bytes)),
            None => {
                q.items.push_back(bytes);
                wake(q);
            }
        }
        Push::Queued
    }

    /// Ends the catch-up: queues `replay` (past the limits: it is bounded by history), then the live
    /// events that arrived meanwhile, skipping those at or before `after`, which replay covered.
    fn catch_up(&self, replay: Vec<Bytes>, after: Option<EventId>) {
        let mut q = self.lock();
        let held = q.held.take().unwrap_or_default();
        if q.state != QueueState::Open {
            return;
        }
        q.floor = after;
        for b in replay {
            q.bytes += b.len();
            q.items.push_back(b);
        }
        for (id, b) in held {
            match (id, after) {
                (Some(id), Some(after)) if id <= after => q.bytes -= b.len(),
                _ => q.items.push_back(b),
            }
        }
        wake(q);
    }

    /// Queues a last event (past the limits) and ends the stream after it, for `reason` (one of
    /// [`close_reason`]).
    pub fn finish(&self, reason: &'static str, last: Option<Bytes>) {
        let mut q = self.lock();
        if q.state != QueueState::Open {
            return;
        }
        // Whatever was held back for a catch-up that will not happen now is dropped.
        q.held = None;
        q.items.extend(last);
        q.state = QueueState::Closing(reason);
        wake(q);
    }

    /// Next chunk for the response body: `Ready(None)` ends the stream.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut q = self.lock();
        if q.state == QueueState::Closed {
            return Poll::Ready(None);
        }
        if let Some(b) = q.items.pop_front() {
            q.bytes = q.bytes.saturating_sub(b.len());
            if q.items.is_empty() && q.items.capacity() > 8 {
                q.items = VecDeque::new(); // give a burst's memory back
            }
            return Poll::Ready(Some(b));
        }
        if matches!(q.state, QueueState::Closing(_)) {
            return Poll::Ready(None);
        }
        q.park(cx)
    }

    /// Ready once the stream has been cut off for being too slow (so a blocked write can be
    /// abandoned); shares the waker slot with [`Conn::poll_next`], as one task does both.
    pub fn poll_cut_off(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut q = self.lock();
        if q.state == QueueState::Closed {
            return Poll::Ready(());
        }
        q.park(cx)
    }

    fn close_reason(&self) -> &'static str {
        match self.lock().state {
            QueueState::Open => close_reason::CLIENT_GONE,
            QueueState::Closed => close_reason::SLOW,
            QueueState::Closing(reason) => reason,
        }
    }

    pub fn record(&self, instance: &str) -> ConnectionRecord {
        ConnectionRecord {
            id: self.id.to_string(),
            created_at: self.created_at,
            remote_addr: self.remote_addr.to_string(),
            application: IdRef {
                id: self.app.to_string(),
            },
            user: IdRef {
                id: self.user.to_string(),
            },
            instance: instance.to_string(),
            user_agent: self.user_agent.to_string(),
        }
    }
}

impl Queue {
    /// Remembers the task to wake when something changes (cloning its waker only when it changed).
    fn park<T>(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

fn wake(mut q: MutexGuard<'_, Queue>) {
    let waker = q.waker.take();
    drop(q);
    if let Some(w) = waker {
        w.wake();
    }
}

/// What a new stream is, before it joins the hub.
pub struct NewConn {
    pub app: String,
    pub user: String,
    pub exp: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: String,
    /// The last event id the client saw (`Last-Event-ID` or `?last_event_id=`): replay from there.
    pub last_event_id: Option<String>,
}

#[derive(Default)]
struct AppEntry {
    conns: HashMap<u64, Arc<Conn>>,
    users: HashMap<Arc<str>, HashMap<u64, Arc<Conn>>>,
}

#[derive(Default)]
struct State {
    apps: HashMap<Arc<str>, AppEntry>,
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
    /// Longest wait for the broker when a stream joins (subscription, history).
    pub broker_timeout: Duration,
}

pub struct Hub {
    state: Mutex<State>,
    next_key: AtomicU64,
    broker: Arc<dyn Broker>,
    registry: Registry,
    metrics: Arc<Metrics>,
    config: HubConfig,
}

/// Why a stream could not join.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("this instance holds its maximum number of streams")]
    InstanceFull,
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
            broker,
            registry,
            metrics,
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a stream, returning once its subscriptions are live and, when it resumes from an id,
    /// once what it missed is queued ahead of live events. On error the stream is already gone.
    pub async fn attach(self: &Arc<Self>, new: NewConn) -> Result<Lease, AttachError> {
        let lease = self.insert(&new)?;
        let channels = vec![user_channel(&new.app, &new.user), app_channel(&new.app)];
        let timeout = self.config.broker_timeout;
        let caught_up = async {
            self.broker.subscribe(channels).await?;
            let (replay, after) = match &new.last_event_id {
                None => (Vec::new(), None),
                Some(last) => self.replay(&new, last).await,
            };
            lease.conn.catch_up(replay, after);
            Ok::<(), AttachError>(())
        };
        let error = match tokio::time::timeout(timeout, caught_up).await {
            Ok(Ok(())) => {
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

    fn insert(self: &Arc<Self>, new: &NewConn) -> Result<Lease, AttachError> {
        let mut state = self.lock();
        if state.closed {
            return Err(AttachError::ShuttingDown);
        }
        if self.config.max_connections > 0 && state.len >= self.config.max_connections {
            return Err(AttachError::InstanceFull);
        }
        let app: Arc<str> = match state.apps.get_key_value(new.app.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.app.as_str()),
        };
        let entry = state.apps.entry(app.clone()).or_default();
        let user: Arc<str> = match entry.users.get_key_value(new.user.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.user.as_str()),
        };
        let conn = Arc::new(Conn {
            id: uuid::Uuid::new_v4(),
            app,
            user: user.clone(),
            created_at: unix_now(),
            exp: new.exp,
            remote_addr: new.remote_addr,
            user_agent: new.user_agent.clone().into_boxed_str(),
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            limits: self.config.queue,
            queue: Mutex::new(Queue {
                items: VecDeque::from([self.config.hello.clone()]),
                bytes: 0,
                waker: None,
                state: QueueState::Open,
                held: Some(Vec::new()),
                floor: None,
            }),
        });
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

    /// What a stream resuming after `last` must see first, and the id it then stands at.
    async fn replay(&self, new: &NewConn, last: &str) -> (Vec<Bytes>, Option<EventId>) {
        let label = Metrics::app(&new.app);
        let since = match self.broker.since(&new.app, &new.user, last).await {
            Ok(since) => since,
            Err(error) => {
                // Never pretend: if history cannot be read, the client is told to refetch.
                tracing::warn!(app = %new.app, user = %new.user, %error, "history unavailable for replay");
                return (vec![reset_event(None, "history_unavailable", last)], None);
            }
        };
        match since {
            Since::Events { current, messages } => {
                let mut after = last.parse::<EventId>().ok().or(current);
                let mut out = Vec::with_capacity(messages.len());
                for m in &messages {
                    let parsed = sse::parse_payload(m);
                    if let Some(id) = parsed.event.id.as_deref().and_then(|s| s.parse().ok()) {
                        after = after.max(Some(id));
                    }
                    out.push(parsed.event.encode());
                }
                self.metrics
                    .replayed_events
                    .get_or_create(&label)
                    .inc_by(out.len() as u64);
                (out, after)
            }
            Since::Reset { current, reason } => {
                self.metrics
                    .replay_resets
                    .get_or_create(&AppReasonLabel {
                        app: new.app.clone(),
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::info!(app = %new.app, user = %new.user, reason = reason.as_str(),
                    "cannot replay from the client's id: sending reset");
                (vec![reset_event(current, reason.as_str(), last)], current)
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
            }
            state.len -= 1;
            // The last stream's unsubscribe is sent under the lock: a stream that joins after it
            // sends its subscribe later, so the broker always ends up subscribed when it should.
            if !unsubscribe.is_empty() {
                self.broker.unsubscribe(unsubscribe);
            }
            // Also under the lock, so that a heartbeat rewrite can never land after this delete.
            if reason != close_reason::BROKER_UNAVAILABLE {
                self.registry.remove(conn);
            }
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

    /// Delivers encoded bytes to every stream of a topic; returns how many got them.
    pub fn fan_out(&self, topic: &Topic<'_>, bytes: &Bytes, id: Option<EventId>) -> usize {
        let mut cut_off = Vec::new();
        let mut delivered = 0usize;
        let app = match topic {
            Topic::User { app, .. } | Topic::App { app } => *app,
        };
        {
            let state = self.lock();
            let Some(entry) = state.apps.get(app) else {
                return 0;
            };
            let conns = match topic {
                Topic::App { .. } => Some(&entry.conns),
                Topic::User { user, .. } => entry.users.get(*user),
            };
            for conn in conns.into_iter().flat_map(|m| m.values()) {
                match conn.push(bytes.clone(), id) {
                    Push::Queued => delivered += 1,
                    Push::CutOff(lost) => cut_off.push((conn.clone(), lost)),
                    Push::Gone => {}
                }
            }
        }
        if delivered > 0 {
            self.metrics
                .message_sent
                .get_or_create(&Metrics::app(app))
                .inc_by(delivered as u64);
        }
        for (conn, lost) in cut_off {
            self.report_slow(&conn, lost);
        }
        delivered
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
        let mut cut_off = Vec::new();
        {
            let state = self.lock();
            let in_slot = |c: &&Arc<Conn>| c.key % slots == slot;
            for conn in state
                .apps
                .values()
                .flat_map(|e| e.conns.values())
                .filter(in_slot)
            {
                if let Push::CutOff(lost) = conn.push(bytes.clone(), None) {
                    cut_off.push((conn.clone(), lost));
                }
            }
        }
        for (conn, lost) in cut_off {
            self.report_slow(&conn, lost);
        }
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

    /// Queues a registry rewrite of every local stream (the heartbeat).
    pub fn refresh_registry(&self) {
        let state = self.lock();
        for conn in state.apps.values().flat_map(|e| e.conns.values()) {
            self.registry.put(conn);
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
    fn deliver(&self, channel: &str, payload: &[u8]) {
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
        let id: Option<EventId> = parsed.event.id.as_deref().and_then(|s| s.parse().ok());
        let bytes = parsed.event.encode();
        if self.fan_out(&topic, &bytes, id) > 0
            && let Some(id) = id
        {
            let app = match topic {
                Topic::User { app, .. } | Topic::App { app } => app,
            };
            let late_ms = unix_now_ms().saturating_sub(id.ms);
            self.metrics
                .delivery_latency
                .get_or_create(&Metrics::app(app))
                .observe(late_ms as f64 / 1000.0);
        }
    }
}

pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn conn(events: usize, bytes: usize) -> Conn {
        Conn {
            id: uuid::Uuid::new_v4(),
            app: "a".into(),
            user: "u".into(),
            created_at: 0,
            exp: u64::MAX,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            user_agent: "".into(),
            key: 1,
            limits: QueueLimits { events, bytes },
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                waker: None,
                state: QueueState::Open,
                held: None,
                floor: None,
            }),
        }
    }

    fn next(c: &Conn) -> Poll<Option<Bytes>> {
        c.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn id(ms: u64) -> Option<EventId> {
        Some(EventId { ms, seq: 0 })
    }

    #[test]
    fn queue_delivers_in_order_then_ends_after_finish() {
        let c = conn(4, 1 << 20);
        assert!(next(&c).is_pending());
        assert_eq!(c.push(b("1"), None), Push::Queued);
        assert_eq!(c.push(b("2"), None), Push::Queued);
        c.finish(close_reason::SHUTDOWN, Some(b("bye")));
        assert_eq!(c.push(b("late"), None), Push::Gone);
        assert_eq!(next(&c), Poll::Ready(Some(b("1"))));
        assert_eq!(next(&c), Poll::Ready(Some(b("2"))));
        assert_eq!(next(&c), Poll::Ready(Some(b("bye"))));
        assert_eq!(next(&c), Poll::Ready(None));
    }

    #[test]
    fn full_queue_cuts_the_stream_off_once() {
        let c = conn(2, 1 << 20);
        assert_eq!(c.push(b("1"), None), Push::Queued);
        assert_eq!(c.push(b("2"), None), Push::Queued);
        assert_eq!(c.push(b("3"), None), Push::CutOff(3));
        assert_eq!(c.push(b("4"), None), Push::Gone);
        assert_eq!(next(&c), Poll::Ready(None));
    }

    #[test]
    fn byte_budget_cuts_off_too() {
        let c = conn(100, 10);
        assert_eq!(c.push(b("12345"), None), Push::Queued);
        assert_eq!(c.push(b("12345"), None), Push::Queued);
        assert_eq!(c.push(b("1"), None), Push::CutOff(3));
        // Reading gives the budget back.
        let c = conn(100, 10);
        c.push(b("12345"), None);
        c.push(b("12345"), None);
        assert!(next(&c).is_ready());
        assert_eq!(c.push(b("12345"), None), Push::Queued);
    }

    #[test]
    fn catch_up_puts_replay_first_and_drops_what_it_covered() {
        let c = conn(10, 1 << 20);
        c.lock().held = Some(Vec::new());
        // Live events arrive while history is read: 2 and 3 are also in the replay, 4 is not,
        // and a plain (id-less) message is kept.
        c.push(b("live2"), id(2));
        c.push(b("plain"), None);
        c.push(b("live3"), id(3));
        c.push(b("live4"), id(4));
        assert!(
            next(&c).is_pending(),
            "nothing goes out before the catch-up"
        );
        c.catch_up(vec![b("hist1"), b("hist2"), b("hist3")], id(3));
        let mut out = Vec::new();
        while let Poll::Ready(Some(x)) = next(&c) {
            out.push(x);
        }
        assert_eq!(
            out,
            [b("hist1"), b("hist2"), b("hist3"), b("plain"), b("live4")]
        );
        // A copy of a replayed event arriving late (still in flight during the catch-up) is dropped.
        assert_eq!(c.push(b("late3"), id(3)), Push::Queued);
        assert_eq!(c.push(b("live5"), id(5)), Push::Queued);
        assert_eq!(next(&c), Poll::Ready(Some(b("live5"))));
        assert!(next(&c).is_pending());
    }
}
