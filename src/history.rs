//! Event ids and replay: the identity of a durable event, and how a reconnecting stream is brought
//! from the id it last saw to the live stream with no gap and no duplicate.
//!
//! Every durable event of an application gets the next id of one per-application sequence,
//! `<milliseconds>-<counter>` (only digits and `-`: safe in a `Last-Event-ID` header without a CORS
//! preflight). A user's view is their own history merged with the application's broadcasts, both
//! ordered by that one sequence, so a single id says exactly where a client stands in both.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// Longest `Last-Event-ID` looked at; longer values are unknown ids.
pub const MAX_ID_LEN: usize = 64;

/// The id of a durable event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The text is not an id this gateway issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAnEventId;

impl FromStr for EventId {
    type Err = NotAnEventId;

    fn from_str(s: &str) -> Result<EventId, NotAnEventId> {
        if s.len() > MAX_ID_LEN {
            return Err(NotAnEventId);
        }
        let (ms, seq) = s.split_once('-').ok_or(NotAnEventId)?;
        let digits = |p: &str| {
            (!p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u64>().ok())
                .flatten()
        };
        Ok(EventId {
            ms: digits(ms).ok_or(NotAnEventId)?,
            seq: digits(seq).ok_or(NotAnEventId)?,
        })
    }
}

impl EventId {
    /// The id after `last` for an event created at `now_ms` (the clock may go backwards; ids not).
    pub fn next(last: Option<EventId>, now_ms: u64) -> EventId {
        match last {
            Some(l) if l.ms >= now_ms => EventId {
                ms: l.ms,
                seq: l.seq + 1,
            },
            _ => EventId { ms: now_ms, seq: 0 },
        }
    }
}

/// Why replay could not give a stream everything it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// History no longer reaches back to the client's id.
    TooOld,
    /// The id was not issued by this gateway for this application (or history was lost).
    UnknownId,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::TooOld => "too_old",
            ResetReason::UnknownId => "unknown_id",
        }
    }
}

/// What history holds after an id, read once for several users of one application: streams
/// resuming together (after a deploy, thousands) share one read of the application's broadcasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backlog {
    /// The durable events after the id (published envelopes, ids included).
    Events {
        /// The application's newest id.
        current: Option<EventId>,
        /// The application's broadcasts after the id, in order.
        broadcasts: Vec<(EventId, Bytes)>,
        /// Each user's own events after the id, in the order the users were asked for; `None`
        /// where that user's history no longer reaches back to the id (their gap cannot be filled).
        users: Vec<Option<Vec<(EventId, Bytes)>>>,
    },
    /// Nobody's gap can be filled (the id is not ours, or the broadcasts no longer reach back);
    /// clients must refetch their state. `current` is the newest id.
    Reset {
        current: Option<EventId>,
        reason: ResetReason,
    },
}

/// Puts `id` into a published JSON object envelope, last, so that it wins over any `id` the
/// publisher put there. `None` if the payload is not a JSON object text.
pub fn stamp(envelope: &[u8], id: EventId) -> Option<Bytes> {
    let text = std::str::from_utf8(envelope).ok()?.trim();
    let body = text.strip_prefix('{')?.strip_suffix('}')?;
    let stamped = if body.trim().is_empty() {
        format!("{{\"id\":\"{id}\"}}")
    } else {
        format!("{{{body},\"id\":\"{id}\"}}")
    };
    Some(Bytes::from(stamped))
}

/// Merges two id-ordered lists of `(id, message)` into one, by id.
pub fn merge(a: Vec<(EventId, Bytes)>, b: Vec<(EventId, Bytes)>) -> Vec<(EventId, Bytes)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0.cmp(&y.0) != Ordering::Greater,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_strictly_and_order_numerically() {
        let a: EventId = "1700000000000-2".parse().unwrap();
        let b: EventId = "1700000000000-10".parse().unwrap();
        let c: EventId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1700000000000-2");
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "1 -2",
            "+1-2",
            "1:2",
            &"9".repeat(65),
        ] {
            assert_eq!(bad.parse::<EventId>(), Err(NotAnEventId), "{bad}");
        }
        // Only characters that never trigger a CORS preflight for Last-Event-ID.
        assert!(
            c.to_string()
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-')
        );
    }

    #[test]
    fn next_is_monotonic_even_if_the_clock_goes_back() {
        let first = EventId::next(None, 100);
        assert_eq!(first, EventId { ms: 100, seq: 0 });
        let same_ms = EventId::next(Some(first), 100);
        assert_eq!(same_ms, EventId { ms: 100, seq: 1 });
        let clock_back = EventId::next(Some(same_ms), 90);
        assert_eq!(clock_back, EventId { ms: 100, seq: 2 });
        assert_eq!(
            EventId::next(Some(clock_back), 200),
            EventId { ms: 200, seq: 0 }
        );
    }

    #[test]
    fn stamping_puts_the_id_last() {
        let id = EventId { ms: 5, seq: 1 };
        assert_eq!(
            &stamp(br#"{"type":"t","data":1}"#, id).unwrap()[..],
            br#"{"type":"t","data":1,"id":"5-1"}"#
        );
        assert_eq!(&stamp(b" { } ", id).unwrap()[..], br#"{"id":"5-1"}"#);
        assert_eq!(
            &stamp(br#"{"id":"mine"}"#, id).unwrap()[..],
            br#"{"id":"mine","id":"5-1"}"#
        );
        assert_eq!(stamp(b"[1]", id), None);
        assert_eq!(stamp(b"plain", id), None);
    }

    #[test]
    fn merge_interleaves_by_id() {
        let e = |ms, s: &'static str| (EventId { ms, seq: 0 }, Bytes::from_static(s.as_bytes()));
        let merged = merge(
            vec![e(1, "a"), e(4, "d")],
            vec![e(2, "b"), e(3, "c"), e(5, "e")],
        );
        let text: Vec<&[u8]> = merged.iter().map(|(_, b)| &b[..]).collect();
        assert_eq!(text, [b"a", b"b", b"c", b"d", b"e"]);
    }
}
