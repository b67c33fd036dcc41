//! The local hub: which live streams on this instance belong to which application and user, and
//! the fan-out of encoded events to them.
//!
//! A stream costs one small [`Conn`] (ids, a short queue and a waker); there is no task, timer or
//! channel per connection. The hub reference-counts broker subscriptions: the first stream of a user
//! subscribes `{app}:channel:{user}` (and the first of an app `{app}:broadcast`), the last one
//! unsubscribes. Each message is parsed and encoded once; every recipient gets the same [`Bytes`].
//! Fan-out never waits: a stream whose queue is full is cut off (it reconnects) instead of slowing
//! the others.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::broker::{
    Broker, BrokerError, ConnectionRecord, IdRef, MessageSink, Topic, app_channel, parse_channel,
    user_channel,
};
use crate::metrics::{Metrics, ReasonLabel, close_reason};
use crate::registry::Registry;
use crate::sse::{self, PayloadKind};

/// One live stream.
pub struct Conn {
    pub id: uuid::Uuid,
    pub app: Arc<str>,
    pub user: Arc<str>,
    pub created_at: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: Box<str>,
    /// Local key in the hub's maps.
    key: u64,
    capacity: usize,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Bytes>,
    waker: Option<Waker>,
    state: QueueState,
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

    /// Queues an event without ever waiting.
    pub fn push(&self, bytes: Bytes) -> Push {
        let mut q = self.lock();
        if q.state != QueueState::Open {
            return Push::Gone;
        }
        if q.items.len() >= self.capacity {
            let lost = q.items.len() + 1;
            q.items = VecDeque::new();
            q.state = QueueState::Closed;
            wake(q);
            return Push::CutOff(lost);
        }
        q.items.push_back(bytes);
        wake(q);
        Push::Queued
    }

    /// Queues a last event (past the capacity limit) and ends the stream after it, for `reason`
    /// (one of [`close_reason`]).
    pub fn finish(&self, reason: &'static str, last: Option<Bytes>) {
        let mut q = self.lock();
        if q.state != QueueState::Open {
            return;
        }
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
            if q.items.is_empty() && q.items.capacity() > 8 {
                q.items = VecDeque::new(); // give a burst's memory back
            }
            return Poll::Ready(Some(b));
        }
        if matches!(q.state, QueueState::Closing(_)) {
            return Poll::Ready(None);
        }
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waker = Some(cx.waker().clone());
        }
        Poll::Pending
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
    pub remote_addr: SocketAddr,
    pub user_agent: String,
}

#[derive(Default)]
struct AppEntry {
    conns: HashMap<u64, Arc<Conn>>,
    users: HashMap<Arc<str>, HashMap<u64, Arc<Conn>>>,
}

#[derive(Default)]
struct State {
    apps: HashMap<Arc<str>, AppEntry>,
    /// Set once shutdown starts: no new streams join.
    closed: bool,
}

pub struct Hub {
    state: Mutex<State>,
    next_key: AtomicU64,
    broker: Arc<dyn Broker>,
    registry: Registry,
    metrics: Arc<Metrics>,
    capacity: usize,
    max_message_bytes: usize,
}

/// Why a stream could not join.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("subscribing took longer than allowed")]
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
        capacity: usize,
        max_message_bytes: usize,
    ) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            next_key: AtomicU64::new(1),
            broker,
            registry,
            metrics,
            capacity,
            max_message_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a stream and returns once its subscriptions are live, so that nothing published after
    /// this returns can be missed. On error the stream has already been removed again.
    pub async fn attach(
        self: &Arc<Self>,
        new: NewConn,
        timeout: std::time::Duration,
    ) -> Result<Lease, AttachError> {
        let (lease, channels) = {
            let mut state = self.lock();
            if state.closed {
                return Err(AttachError::ShuttingDown);
            }
            let app_entry = match state.apps.get_key_value(new.app.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(new.app.as_str()),
            };
            let entry = state.apps.entry(app_entry.clone()).or_default();
            let user: Arc<str> = match entry.users.get_key_value(new.user.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(new.user.as_str()),
            };
            let conn = Arc::new(Conn {
                id: uuid::Uuid::new_v4(),
                app: app_entry,
                user: user.clone(),
                created_at: unix_now(),
                remote_addr: new.remote_addr,
                user_agent: new.user_agent.into_boxed_str(),
                key: self.next_key.fetch_add(1, Ordering::Relaxed),
                capacity: self.capacity,
                queue: Mutex::new(Queue::default()),
            });
            entry.conns.insert(conn.key, conn.clone());
            entry
                .users
                .entry(user)
                .or_default()
                .insert(conn.key, conn.clone());
            let app = Metrics::app(&conn.app);
            self.metrics.connections.get_or_create(&app).inc();
            self.metrics.active_clients.inc();
            self.metrics.connections_opened.get_or_create(&app).inc();
            // Sent under the lock, so subscribe and unsubscribe reach the broker in hub order.
            let channels = vec![user_channel(&new.app, &new.user), app_channel(&new.app)];
            (
                Lease {
                    conn,
                    hub: self.clone(),
                },
                channels,
            )
        };
        let error = match tokio::time::timeout(timeout, self.broker.subscribe(channels)).await {
            Ok(Ok(())) => {
                self.registry.put(&lease.conn);
                return Ok(lease);
            }
            Ok(Err(e)) => AttachError::Broker(e),
            Err(_) => AttachError::Timeout,
        };
        // Dropping the lease removes the stream again, counted under this reason.
        lease.conn.finish(close_reason::BROKER_UNAVAILABLE, None);
        Err(error)
    }

    fn detach(&self, conn: &Arc<Conn>) {
        let mut unsubscribe = Vec::new();
        let reason = match conn.lock().state {
            QueueState::Open => close_reason::CLIENT_GONE,
            QueueState::Closed => close_reason::SLOW,
            QueueState::Closing(reason) => reason,
        };
        {
            let mut state = self.lock();
            let Some(entry) = state.apps.get_mut(&*conn.app) else {
                return;
            };
            if entry.conns.remove(&conn.key).is_none() {
                return;
            }
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
            if !unsubscribe.is_empty() {
                self.broker.unsubscribe(unsubscribe);
            }
            // Under the lock, so that a heartbeat rewrite can never land after this delete.
            if reason != close_reason::BROKER_UNAVAILABLE {
                self.registry.remove(conn);
            }
        }
        self.metrics
            .connections
            .get_or_create(&Metrics::app(&conn.app))
            .dec();
        self.metrics.active_clients.dec();
        self.metrics
            .connections_closed
            .get_or_create(&crate::metrics::AppReasonLabel {
                app: conn.app.to_string(),
                reason,
            })
            .inc();
        tracing::debug!(app = %conn.app, user = %conn.user, conn = %conn.id, reason, "stream closed");
    }

    /// Delivers encoded bytes to every stream of a topic; returns how many got them.
    pub fn fan_out(&self, topic: &Topic<'_>, bytes: &Bytes) -> usize {
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
                match conn.push(bytes.clone()) {
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

    /// Offers the same bytes to every local stream (pings).
    pub fn push_all(&self, bytes: &Bytes) {
        let mut cut_off = Vec::new();
        {
            let state = self.lock();
            for conn in state.apps.values().flat_map(|e| e.conns.values()) {
                if let Push::CutOff(lost) = conn.push(bytes.clone()) {
                    cut_off.push((conn.clone(), lost));
                }
            }
        }
        for (conn, lost) in cut_off {
            self.report_slow(&conn, lost);
        }
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
        self.lock().apps.values().map(|e| e.conns.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
        if payload.len() > self.max_message_bytes {
            self.metrics
                .messages_dropped
                .get_or_create(&ReasonLabel {
                    reason: "too_large",
                })
                .inc();
            tracing::warn!(
                channel,
                bytes = payload.len(),
                limit = self.max_message_bytes,
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
            .get_or_create(&crate::metrics::KindLabel { kind })
            .inc();
        if parsed.sanitised {
            self.metrics.sanitised_fields.inc();
            tracing::warn!(
                channel,
                "published id/type held control characters or was too long; sanitised"
            );
        }
        let bytes = parsed.event.encode();
        self.fan_out(&topic, &bytes);
    }
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

    fn conn(capacity: usize) -> Conn {
        Conn {
            id: uuid::Uuid::new_v4(),
            app: "a".into(),
            user: "u".into(),
            created_at: 0,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            user_agent: "".into(),
            key: 1,
            capacity,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn next(c: &Conn) -> Poll<Option<Bytes>> {
        c.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn queue_delivers_in_order_then_ends_after_finish() {
        let c = conn(4);
        assert!(next(&c).is_pending());
        assert_eq!(c.push(Bytes::from_static(b"1")), Push::Queued);
        assert_eq!(c.push(Bytes::from_static(b"2")), Push::Queued);
        c.finish(close_reason::SHUTDOWN, Some(Bytes::from_static(b"bye")));
        assert_eq!(c.push(Bytes::from_static(b"late")), Push::Gone);
        assert_eq!(next(&c), Poll::Ready(Some(Bytes::from_static(b"1"))));
        assert_eq!(next(&c), Poll::Ready(Some(Bytes::from_static(b"2"))));
        assert_eq!(next(&c), Poll::Ready(Some(Bytes::from_static(b"bye"))));
        assert_eq!(next(&c), Poll::Ready(None));
    }

    #[test]
    fn full_queue_cuts_the_stream_off_once() {
        let c = conn(2);
        assert_eq!(c.push(Bytes::from_static(b"1")), Push::Queued);
        assert_eq!(c.push(Bytes::from_static(b"2")), Push::Queued);
        assert_eq!(c.push(Bytes::from_static(b"3")), Push::CutOff(3));
        assert_eq!(c.push(Bytes::from_static(b"4")), Push::Gone);
        assert_eq!(next(&c), Poll::Ready(None));
    }
}
