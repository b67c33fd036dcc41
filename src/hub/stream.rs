//! One live stream: who it belongs to, its outbox of encoded events, and the writes to its socket.
//!
//! Whoever delivers an event writes it to the socket at once, without waking the stream's task, for
//! as long as the socket takes it ([`Stream::push`] then [`Stream::flush`]). The task only runs when
//! the socket is full, when the stream ends and when the client goes ([`Stream::poll_drive`]): an
//! event costs one `writev` and no wake-up. A stream without a socket of its own (HTTP/2 through
//! hyper) has its events pulled by the response body instead ([`Stream::poll_next`]).
//!
//! Every write happens under the stream's lock and takes the outbox in order, so events reach a
//! client in the order they were pushed, whichever thread writes them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::NewStream;
use super::outbox::{Outbox, OutboxLimits, Wire};
use crate::broker::{ConnectionRecord, IdRef};
use crate::clock;
use crate::history::EventId;
use crate::registry::Entry;

/// Why a stream ended, as counted in `sse_connections_closed_total`.
pub mod close_reason {
    pub const CLIENT_GONE: &str = "client_gone";
    pub const SLOW: &str = "slow_client";
    pub const SHUTDOWN: &str = "shutdown";
    pub const BROKER_UNAVAILABLE: &str = "broker_unavailable";
    pub const TOKEN_EXPIRED: &str = "token_expired";
}

/// One live stream.
pub struct Stream {
    pub id: uuid::Uuid,
    /// The history the stream lives in: its application, or on a partitioned cluster its user's
    /// partition of it (`shop#3`; see [`Stream::tenant`]).
    pub app: Arc<str>,
    pub user: Arc<str>,
    pub created_at: u64,
    /// Token expiry (seconds since the epoch): the stream ends then.
    pub exp: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: Box<str>,
    /// Local key in the hub's maps.
    pub(super) key: u64,
    limits: OutboxLimits,
    state: Mutex<StreamState>,
}

struct StreamState {
    out: Outbox,
    waker: Option<Waker>,
    phase: Phase,
    /// While the stream catches up from history (when it joins, and again after the subscriber
    /// link was lost), live events wait here with their ids, so that the switch to live has
    /// neither gap nor duplicate.
    held: Option<Vec<(Option<EventId>, Bytes)>>,
    /// The newest durable event the stream was given (by replay or live). A copy of an event at or
    /// below it (published while history was read, still on its way through the subscriber; or
    /// replayed again after a lost link) is a duplicate. Durable events of an application reach an
    /// instance in id order, so this one id is enough.
    floor: Option<EventId>,
    /// The socket, once the response head is on its way. Kept under the lock so that writes from
    /// any thread go out one at a time, in outbox order; dropped (closed) when the stream ends.
    wire: Option<Box<dyn Wire>>,
    /// The socket is full: the stream's task waits until it can write again, nobody else writes.
    blocked: bool,
    /// A deliverer has promised to [`Stream::flush`] this stream: others need not.
    scheduled: bool,
    /// While history is sent page by page: who waits for the outbox to empty, to read the next
    /// page (boxed: idle streams carry 8 bytes for it, not 16).
    drain: Option<Box<Waker>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Open,
    /// Deliver what is queued, then end the stream; the reason is counted when it ends.
    Closing(&'static str),
    /// Cut off: end the stream now, dropping what is queued (a client too slow to keep up).
    CutOff,
    /// The client went away (or its connection failed).
    Disconnected,
}

/// What [`Stream::hold`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Live events wait from now on, until [`Stream::catch_up`].
    Held,
    /// The stream is still catching up from joining: it is not live yet.
    Joining,
    /// The stream is ending.
    Gone,
}

/// What happened to an event offered to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued, and the caller must now write it out with [`Stream::flush`] (it promised to).
    Write,
    /// The stream was too slow: it has just been cut off, losing this many queued events.
    CutOff(usize),
    /// The stream is already ending.
    Gone,
}

impl Stream {
    /// The application the stream belongs to (`app` is its history: `shop#3` on a partitioned
    /// cluster).
    pub fn tenant(&self) -> &str {
        crate::history::tenant(&self.app)
    }
}

impl Stream {
    /// The stream `new` asked for, with its application and user ids shared with the hub's maps,
    /// its key there, its limits and its first bytes (the `retry:` hint).
    pub(super) fn new(
        id: uuid::Uuid,
        new: &NewStream,
        (app, user): (Arc<str>, Arc<str>),
        key: u64,
        limits: OutboxLimits,
        hello: Bytes,
    ) -> Stream {
        let mut out = Outbox::default();
        out.queue(hello);
        Stream {
            id,
            app,
            user,
            created_at: clock::unix_secs(),
            exp: new.exp,
            remote_addr: new.remote_addr,
            user_agent: new.user_agent.as_str().into(),
            key,
            limits,
            state: Mutex::new(StreamState {
                out,
                waker: None,
                phase: Phase::Open,
                held: Some(Vec::new()),
                floor: None,
                wire: None,
                blocked: false,
                scheduled: false,
                drain: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event without ever waiting. `id` is the event's id when it is a durable one.
    pub fn push(&self, bytes: Bytes, id: Option<EventId>) -> Push {
        let mut q = self.lock();
        if q.phase != Phase::Open {
            return Push::Gone;
        }
        if let (Some(id), Some(floor)) = (id, q.floor)
            && floor.covers(&id)
        {
            return Push::Queued; // already delivered by replay
        }
        let waiting = q.out.len() + q.held.as_ref().map_or(0, Vec::len);
        if waiting >= self.limits.events || q.out.counted_bytes() + bytes.len() > self.limits.bytes
        {
            let lost = waiting + 1;
            q.out = Outbox::default();
            q.held = None;
            q.phase = Phase::CutOff;
            wake(q);
            return Push::CutOff(lost);
        }
        q.out.count(bytes.len());
        if let Some(held) = &mut q.held {
            held.push((id, bytes));
            return Push::Queued;
        }
        if let Some(id) = id {
            q.floor = Some(EventId::advance(q.floor, id));
        }
        q.out.queue(bytes);
        if q.wire.is_none() {
            wake(q); // the body pulls it (or the socket is not attached yet)
            Push::Queued
        } else if q.blocked || q.scheduled {
            Push::Queued // the task, or whoever scheduled the flush, writes it with the rest
        } else {
            q.scheduled = true;
            Push::Write
        }
    }

    /// Writes what the outbox holds to the socket, as far as it takes it, without waiting. Called
    /// by whoever got [`Push::Write`]; a full socket is left to the stream's task.
    pub fn flush(&self) {
        let mut guard = self.lock();
        let q = &mut *guard;
        q.scheduled = false;
        if q.blocked || !matches!(q.phase, Phase::Open | Phase::Closing(_)) {
            return;
        }
        let Some(wire) = q.wire.as_mut() else {
            return;
        };
        match wire.write(&mut q.out) {
            Ok(true) if q.phase == Phase::Open => drained(&q.out, &mut q.drain),
            Ok(true) => wake(guard), // closing: the task ends the stream
            Ok(false) => {
                q.blocked = true;
                wake(guard);
            }
            Err(_) => {
                q.lose_client();
                wake(guard); // the task ends the stream
            }
        }
    }

    /// Hands the stream its socket, with `head` (the response head, already encoded) to go first.
    /// From now on events are written as they come; [`Stream::poll_drive`] writes what is queued.
    pub fn attach_wire(&self, wire: Box<dyn Wire>, head: Bytes) {
        let mut q = self.lock();
        q.out.set_partial(head);
        q.wire = Some(wire);
    }

    /// The stream's task: writes what a full socket held back, notices the client leaving, and ends
    /// the stream when it is over. `Ready` once the socket is closed.
    pub fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut guard = self.lock();
        let q = &mut *guard;
        loop {
            if matches!(q.phase, Phase::CutOff | Phase::Disconnected) {
                q.wire = None;
                return Poll::Ready(());
            }
            let Some(wire) = q.wire.as_mut() else {
                return Poll::Ready(());
            };
            if wire.poll_closed(cx).is_ready() {
                q.lose_client();
                return Poll::Ready(());
            }
            if q.blocked {
                match wire.poll_writable(cx) {
                    Poll::Pending => return q.park(cx),
                    Poll::Ready(Err(_)) => {
                        q.lose_client();
                        return Poll::Ready(());
                    }
                    Poll::Ready(Ok(())) => q.blocked = false,
                }
            }
            if !q.out.is_empty() {
                match wire.write(&mut q.out) {
                    Ok(true) => drained(&q.out, &mut q.drain),
                    Ok(false) => {
                        q.blocked = true;
                        continue;
                    }
                    Err(_) => {
                        q.lose_client();
                        return Poll::Ready(());
                    }
                }
            }
            if let Phase::Closing(_) = q.phase {
                wire.end();
                q.wire = None;
                return Poll::Ready(());
            }
            return q.park(cx);
        }
    }

    /// Holds live delivery back (the subscriber link was lost): events wait until the stream has
    /// caught up from history with [`Stream::catch_up`].
    pub(super) fn hold(&self) -> Hold {
        let mut q = self.lock();
        match (q.phase, &q.held) {
            (Phase::Open, None) => {
                q.held = Some(Vec::new());
                Hold::Held
            }
            (Phase::Open, Some(_)) => Hold::Joining,
            _ => Hold::Gone,
        }
    }

    /// Queues one page of a catch-up that goes on: `replay`, except what the stream already has,
    /// bringing it to `after`. Live events stay held until [`Stream::catch_up`] ends the catch-up.
    /// Returns whether the stream is still open.
    pub(super) fn catch_up_page(
        &self,
        replay: Vec<(Option<EventId>, Bytes)>,
        after: Option<EventId>,
    ) -> bool {
        let mut q = self.lock();
        if q.phase != Phase::Open {
            return false;
        }
        q.queue_replay(replay, after);
        wake(q); // the task writes it
        true
    }

    /// Bytes waiting: queued, and held back during a catch-up.
    #[cfg(test)]
    pub(super) fn queued_bytes(&self) -> usize {
        self.lock().out.counted_bytes()
    }

    /// Ready once the outbox has gone to the socket (`true`), or the stream is over (`false`):
    /// the next page of a catch-up is read only then, so that a stream holds one page at most.
    pub(super) fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut q = self.lock();
        if q.phase != Phase::Open {
            return Poll::Ready(false);
        }
        if q.out.is_empty() {
            return Poll::Ready(true);
        }
        if !q.drain.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.drain = Some(Box::new(cx.waker().clone()));
        }
        Poll::Pending
    }

    /// Ends a catch-up: queues `replay` (past the limits: it is bounded by history) except what the
    /// stream already has, then the live events that arrived meanwhile, skipping those at or
    /// before `after`, which replay covered. Returns whether the stream is still open.
    pub(super) fn catch_up(
        &self,
        replay: Vec<(Option<EventId>, Bytes)>,
        after: Option<EventId>,
    ) -> bool {
        let mut q = self.lock();
        let held = q.held.take().unwrap_or_default();
        if q.phase != Phase::Open {
            return false;
        }
        q.queue_replay(replay, after);
        // Held events were counted in the budget when they arrived.
        for (id, b) in held {
            match (id, q.floor) {
                (Some(id), Some(f)) if f.covers(&id) => {
                    q.out.uncount(b.len());
                }
                _ => {
                    if let Some(id) = id {
                        q.floor = Some(EventId::advance(q.floor, id));
                    }
                    q.out.queue(b);
                }
            }
        }
        wake(q);
        true
    }

    /// Queues a last event (past the limits) and ends the stream after it, for `reason` (one of
    /// [`close_reason`]).
    pub fn finish(&self, reason: &'static str, last: Option<Bytes>) {
        let mut q = self.lock();
        if q.phase != Phase::Open {
            return;
        }
        // Whatever was held back for a catch-up that will not happen now is dropped.
        q.held = None;
        if let Some(last) = last {
            q.out.push(last);
        }
        q.phase = Phase::Closing(reason);
        wake(q);
    }

    /// Next event for a response body that pulls them (no socket of its own): `Ready(None)` ends
    /// the stream.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut q = self.lock();
        if matches!(q.phase, Phase::CutOff | Phase::Disconnected) {
            return Poll::Ready(None);
        }
        if let Some(b) = q.out.pop() {
            let q = &mut *q;
            drained(&q.out, &mut q.drain);
            return Poll::Ready(Some(b));
        }
        if matches!(q.phase, Phase::Closing(_)) {
            return Poll::Ready(None);
        }
        q.park(cx)
    }

    pub(super) fn close_reason(&self) -> &'static str {
        match self.lock().phase {
            Phase::Open | Phase::Disconnected => close_reason::CLIENT_GONE,
            Phase::CutOff => close_reason::SLOW,
            Phase::Closing(reason) => reason,
        }
    }
}

impl Entry for Stream {
    fn app(&self) -> &str {
        &self.app
    }

    fn user(&self) -> &str {
        &self.user
    }

    fn id(&self) -> uuid::Uuid {
        self.id
    }

    fn record(&self, instance: &str) -> ConnectionRecord {
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

impl StreamState {
    /// The client went, or its connection failed: the stream ends now, whatever it was doing (a
    /// stream already ending cannot deliver the rest either), and lets go of its socket. One that
    /// was already ending keeps its reason, under which it is counted.
    fn lose_client(&mut self) {
        if self.phase == Phase::Open {
            self.phase = Phase::Disconnected;
        }
        self.wire = None;
    }

    /// Queues history read for a catch-up (past the limits: a page, or bounded by history),
    /// except what the stream already has, and moves the stream's position to `after`.
    fn queue_replay(&mut self, replay: Vec<(Option<EventId>, Bytes)>, after: Option<EventId>) {
        for (id, b) in replay {
            match (id, self.floor) {
                (Some(id), Some(f)) if f.covers(&id) => {}
                _ => self.out.push(b),
            }
        }
        if let Some(after) = after {
            self.floor = Some(EventId::advance(self.floor, after));
        }
    }

    /// Remembers the task to wake when something changes (cloning its waker only when it changed).
    fn park<T>(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

fn wake(mut q: MutexGuard<'_, StreamState>) {
    let waker = q.waker.take();
    // Whatever changed (the stream ending, say), a pager waiting for the outbox looks again.
    let drain = q.drain.take();
    drop(q);
    if let Some(w) = waker {
        w.wake();
    }
    if let Some(w) = drain {
        w.wake();
    }
}

/// Wakes the pager waiting for the outbox to empty, if it now is.
fn drained(out: &Outbox, drain: &mut Option<Box<Waker>>) {
    if out.is_empty()
        && let Some(w) = drain.take()
    {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Waker;

    fn conn(events: usize, bytes: usize) -> Stream {
        let new = NewStream {
            app: "a".into(),
            user: "u".into(),
            exp: u64::MAX,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            user_agent: String::new(),
            last_event_id: None,
            caps: crate::hub::Caps::default(),
        };
        let ids = ("a".into(), "u".into());
        let c = Stream::new(
            uuid::Uuid::new_v4(),
            &new,
            ids,
            1,
            OutboxLimits { events, bytes },
            Bytes::new(),
        );
        c.catch_up(Vec::new(), None);
        assert_eq!(next(&c), Poll::Ready(Some(Bytes::new())), "the hello");
        c
    }

    fn next(c: &Stream) -> Poll<Option<Bytes>> {
        c.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn drive(c: &Stream) -> Poll<()> {
        c.poll_drive(&mut Context::from_waker(Waker::noop()))
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn id(ms: u64) -> Option<EventId> {
        Some(EventId {
            ms,
            seq: 0,
            epoch: Default::default(),
        })
    }

    fn hist(ms: u64) -> (Option<EventId>, Bytes) {
        (id(ms), Bytes::from(format!("hist{ms}")))
    }

    /// A socket that takes `room` bytes at a time, frames events as `<event>|`, and records what
    /// it was given.
    #[derive(Clone, Default)]
    struct TestWire {
        state: Arc<Mutex<TestSocket>>,
    }

    #[derive(Default)]
    struct TestSocket {
        written: Vec<u8>,
        room: usize,
        closed_by_peer: bool,
        /// Every write fails (EPIPE) while the peer is not seen closed.
        broken: bool,
        ended: bool,
        /// Writes and close checks so far: a stream that retries for ever fails its test instead
        /// of hanging it.
        calls: usize,
    }

    impl TestWire {
        fn with_room(room: usize) -> TestWire {
            let w = TestWire::default();
            w.socket().room = room;
            w
        }
        fn socket(&self) -> MutexGuard<'_, TestSocket> {
            self.state.lock().unwrap()
        }
        /// The socket, counting one more write or close check.
        fn call(&self) -> MutexGuard<'_, TestSocket> {
            let mut s = self.socket();
            s.calls += 1;
            assert!(s.calls < 10_000, "the stream keeps calling its socket");
            s
        }
        fn text(&self) -> String {
            String::from_utf8(self.socket().written.clone()).unwrap()
        }
    }

    impl Wire for TestWire {
        fn write(&mut self, out: &mut Outbox) -> io::Result<bool> {
            let mut s = self.call();
            if s.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            loop {
                if out.partial().is_empty() {
                    let Some(ev) = out.pop() else {
                        return Ok(true);
                    };
                    out.set_partial([&ev[..], b"|"].concat().into());
                }
                if s.room == 0 {
                    return Ok(false);
                }
                let n = s.room.min(out.partial().len());
                s.written.extend_from_slice(&out.partial()[..n]);
                out.advance_partial(n);
                s.room -= n;
            }
        }
        fn poll_writable(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.socket().room > 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn poll_closed(&mut self, _: &mut Context<'_>) -> Poll<()> {
            if self.call().closed_by_peer {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
        fn end(&mut self) {
            self.socket().ended = true;
        }
    }

    /// A stream already holding a socket with `room` bytes of space, its head written.
    fn wired(events: usize, room: usize) -> (Stream, TestWire) {
        let c = conn(events, 1 << 20);
        let wire = TestWire::with_room(room);
        c.attach_wire(Box::new(wire.clone()), Bytes::new());
        (c, wire)
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
        assert_eq!(c.close_reason(), close_reason::SHUTDOWN);
    }

    #[test]
    fn full_queue_cuts_the_stream_off_once() {
        let c = conn(2, 1 << 20);
        assert_eq!(c.push(b("1"), None), Push::Queued);
        assert_eq!(c.push(b("2"), None), Push::Queued);
        assert_eq!(c.push(b("3"), None), Push::CutOff(3));
        assert_eq!(c.push(b("4"), None), Push::Gone);
        assert_eq!(next(&c), Poll::Ready(None));
        assert_eq!(c.close_reason(), close_reason::SLOW);
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
        assert!(c.catch_up(vec![hist(1), hist(2), hist(3)], id(3)));
        let mut out = Vec::new();
        while let Poll::Ready(Some(x)) = next(&c) {
            out.push(x);
        }
        assert_eq!(
            out,
            [b("hist1"), b("hist2"), b("hist3"), b("plain"), b("live4")]
        );
        assert_eq!(
            c.lock().out.counted_bytes(),
            0,
            "the budget is back to empty"
        );
        // A copy of a replayed event arriving late (still in flight during the catch-up) is dropped.
        assert_eq!(c.push(b("late3"), id(3)), Push::Queued);
        assert_eq!(c.push(b("live5"), id(5)), Push::Queued);
        assert_eq!(next(&c), Poll::Ready(Some(b("live5"))));
        assert!(next(&c).is_pending());
    }

    #[test]
    fn a_resync_replays_only_what_the_stream_lacks_and_keeps_order() {
        let c = conn(10, 1 << 20);
        // Live before the link drops: 1 and 2.
        c.push(b("live1"), id(1));
        c.push(b("live2"), id(2));
        assert_eq!(c.hold(), Hold::Held);
        assert_eq!(c.hold(), Hold::Joining, "already held");
        // After the new subscription: 5 arrives live while history is read.
        c.push(b("live5"), id(5));
        // History from the app's position (1): 2 is a duplicate, 3 and 4 were missed, 5 is both.
        assert!(c.catch_up(vec![hist(2), hist(3), hist(4), hist(5)], id(5)));
        let mut out = Vec::new();
        while let Poll::Ready(Some(x)) = next(&c) {
            out.push(x);
        }
        assert_eq!(
            out,
            [b("live1"), b("live2"), b("hist3"), b("hist4"), b("hist5")]
        );
        assert_eq!(
            c.lock().out.counted_bytes(),
            0,
            "the budget is back to empty"
        );
        // A second resync from an older position replays nothing twice.
        assert_eq!(c.hold(), Hold::Held);
        assert!(c.catch_up(vec![hist(4), hist(5), hist(6)], id(6)));
        assert_eq!(next(&c), Poll::Ready(Some(b("hist6"))));
        assert!(next(&c).is_pending());
        // A stream that ended is not held and reports it.
        c.finish(close_reason::SHUTDOWN, None);
        assert_eq!(c.hold(), Hold::Gone);
        assert!(!c.catch_up(Vec::new(), None));
    }

    #[test]
    fn with_a_socket_events_are_written_by_the_deliverer() {
        let c = conn(10, 1 << 20);
        let wire = TestWire::with_room(1 << 20);
        c.push(b("early"), None); // before the socket: queued behind the head
        c.attach_wire(Box::new(wire.clone()), b("HEAD;"));
        assert!(drive(&c).is_pending());
        assert_eq!(wire.text(), "HEAD;early|");
        assert_eq!(c.push(b("a"), None), Push::Write);
        assert_eq!(
            c.push(b("b"), None),
            Push::Queued,
            "a flush is already promised"
        );
        c.flush();
        assert_eq!(wire.text(), "HEAD;early|a|b|");
        assert_eq!(c.push(b("c"), None), Push::Write);
        c.flush();
        assert_eq!(wire.text(), "HEAD;early|a|b|c|");
        c.finish(close_reason::TOKEN_EXPIRED, Some(b("bye")));
        assert!(drive(&c).is_ready());
        assert_eq!(wire.text(), "HEAD;early|a|b|c|bye|");
        assert!(wire.socket().ended);
        assert_eq!(c.close_reason(), close_reason::TOKEN_EXPIRED);
    }

    #[test]
    fn a_full_socket_is_left_to_the_task_and_order_is_kept() {
        let (c, wire) = wired(10, 4);
        assert_eq!(c.push(b("one"), None), Push::Write);
        c.flush(); // "one|" fills the socket
        assert_eq!(c.push(b("two"), None), Push::Write);
        c.flush(); // nothing fits: the stream is now blocked
        assert_eq!(
            c.push(b("three"), None),
            Push::Queued,
            "blocked: nobody else writes"
        );
        assert!(drive(&c).is_pending());
        assert_eq!(wire.text(), "one|");
        wire.socket().room = 6; // the client read some
        assert!(drive(&c).is_pending());
        assert_eq!(wire.text(), "one|two|th");
        wire.socket().room = 100;
        assert!(drive(&c).is_pending());
        assert_eq!(wire.text(), "one|two|three|");
        assert_eq!(c.push(b("four"), None), Push::Write, "unblocked again");
    }

    #[test]
    fn a_stalled_client_is_cut_off_and_its_socket_dropped() {
        let (c, wire) = wired(2, 0);
        assert!(drive(&c).is_pending());
        assert_eq!(c.push(b("1"), None), Push::Write);
        c.flush();
        // "1" is half written (not counted); two more wait; the next one is too many.
        assert_eq!(c.push(b("2"), None), Push::Queued);
        assert_eq!(c.push(b("3"), None), Push::Queued);
        assert_eq!(c.push(b("4"), None), Push::CutOff(3));
        assert!(
            drive(&c).is_ready(),
            "the task ends at once, without waiting for the socket"
        );
        assert_eq!(Arc::strong_count(&wire.state), 1, "the socket is closed");
        assert_eq!(c.close_reason(), close_reason::SLOW);
    }

    #[test]
    fn a_client_that_leaves_ends_the_stream() {
        let (c, wire) = wired(10, 100);
        assert!(drive(&c).is_pending());
        wire.socket().closed_by_peer = true;
        assert!(drive(&c).is_ready());
        assert_eq!(c.push(b("x"), None), Push::Gone);
        assert_eq!(c.close_reason(), close_reason::CLIENT_GONE);
    }

    /// A stream told to end (shutdown's farewell, an expired token) whose client is gone, or
    /// whose socket fails, ends at once under its reason: it used to retry the write for ever
    /// inside one poll, holding a runtime thread.
    #[test]
    fn an_ending_stream_whose_client_is_gone_ends_at_once() {
        let gone: [fn(&mut TestSocket); 2] = [|s| s.closed_by_peer = true, |s| s.broken = true];
        for leave in gone {
            let (c, wire) = wired(10, 100);
            assert!(drive(&c).is_pending());
            leave(&mut wire.socket());
            c.finish(close_reason::SHUTDOWN, Some(b("bye")));
            assert!(drive(&c).is_ready());
            assert_eq!(Arc::strong_count(&wire.state), 1, "the socket is closed");
            assert_eq!(c.close_reason(), close_reason::SHUTDOWN);
        }
    }

    #[test]
    fn flush_wakes_the_task_only_when_it_has_work() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let (c, _wire) = wired(10, 8);
        assert!(c.poll_drive(&mut Context::from_waker(&waker)).is_pending());
        assert_eq!(c.push(b("abc"), None), Push::Write);
        c.flush();
        assert!(
            !flag.0.load(Ordering::SeqCst),
            "written directly: no wake-up"
        );
        assert_eq!(c.push(b("defgh"), None), Push::Write);
        c.flush();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "socket full: the task is woken"
        );
    }
}
