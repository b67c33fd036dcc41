//! Fan-out: each broker message parsed and encoded once, queued for its topic's streams, and their
//! sockets written once per batch; a stream that falls behind is cut off, never waited for.

use std::sync::Arc;

use bytes::Bytes;

use super::{Hub, Push, Stream};
use crate::broker::{MessageSink, Topic, parse_channel};
use crate::clock;
use crate::history::{self, EventId};
use crate::metrics::{KindLabel, Metrics, ReasonLabel};
use crate::sse::{self, PayloadKind};

/// One event offered to many streams: what was queued, which sockets to write, who was cut off.
#[derive(Default)]
pub(super) struct FanOut {
    delivered: usize,
    flush: Vec<Arc<Stream>>,
    cut_off: Vec<(Arc<Stream>, usize)>,
}

impl FanOut {
    fn push(&mut self, conn: &Arc<Stream>, bytes: &Bytes, id: Option<EventId>) {
        match conn.push(bytes.clone(), id) {
            Push::Queued => self.delivered += 1,
            Push::Write => {
                self.delivered += 1;
                self.flush.push(conn.clone());
            }
            Push::CutOff(lost) => self.cut_off.push((conn.clone(), lost)),
            Push::Gone => {}
        }
    }
}

impl MessageSink for Hub {
    fn deliver(&self, messages: &[(&str, &[u8])]) {
        // Every event is queued first and the sockets written once at the end, so a burst goes
        // out in one write per stream instead of one per event.
        let mut offer = FanOut::default();
        for (channel, payload) in messages {
            self.offer_message(&mut offer, channel, payload);
        }
        self.write_out(offer);
    }

    fn suspend(&self) {
        self.suspend_for_resync();
    }

    fn resume(self: Arc<Self>) {
        self.start_resync();
    }
}

impl Hub {
    /// Queues encoded bytes for every stream of a topic; returns how many got them. The sockets
    /// are written when the offer is completed.
    pub(super) fn offer_to(
        &self,
        offer: &mut FanOut,
        topic: &Topic<'_>,
        bytes: &Bytes,
        id: Option<EventId>,
    ) -> usize {
        let app = topic.app();
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
    pub(super) fn write_out(&self, offer: FanOut) {
        self.writers.flush(offer.flush);
        for (conn, lost) in offer.cut_off {
            self.report_slow(&conn, lost);
        }
    }

    pub(super) fn report_slow(&self, conn: &Stream, lost: usize) {
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
    pub fn push_to_slot(&self, bytes: &Bytes, slot: u64, slots: u64) {
        let mut offer = FanOut::default();
        {
            let state = self.lock();
            let in_slot = |c: &&Arc<Stream>| c.key % slots == slot;
            for conn in state
                .apps
                .values()
                .flat_map(|e| e.conns.values())
                .filter(in_slot)
            {
                offer.push(conn, bytes, None);
            }
        }
        self.write_out(offer);
    }

    /// Parses and encodes one broker message and queues it for its topic's streams.
    pub(super) fn offer_message(&self, offer: &mut FanOut, channel: &str, payload: &[u8]) {
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
        let partitions = self.config.partitions;
        if partitions.count() > 1 && !history::is_partition(topic.app()) {
            // A backend's PUBLISH to the application's own channel name, which a partitioned
            // gateway also subscribes: to the user's history, or to every history for a broadcast.
            // Never with an id of history: durable events come on a history's own channels.
            match topic {
                Topic::User { app, user } => {
                    let history = partitions.history(app, user);
                    let user = Topic::User {
                        app: &history,
                        user,
                    };
                    self.offer_to(offer, &user, &bytes, None);
                }
                Topic::App { app } => {
                    for history in partitions.histories(app) {
                        self.offer_to(offer, &Topic::App { app: &history }, &bytes, None);
                    }
                }
            }
            return;
        }
        if self.offer_to(offer, &topic, &bytes, id) > 0
            && let Some(id) = id
        {
            let app = topic.app();
            let late_ms = clock::unix_ms().saturating_sub(id.ms);
            self.metrics
                .delivery_latency
                .get_or_create(&Metrics::app(app))
                .observe(late_ms as f64 / 1000.0);
        }
    }
}
