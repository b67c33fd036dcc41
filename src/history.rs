//! Event ids and replay: the identity of a durable event, and how a reconnecting stream is brought
//! from the id it last saw to the live stream with no gap and no duplicate.
//!
//! Every durable event of an application gets the next id of one per-application sequence,
//! `<milliseconds>-<counter>-<epoch>` (only digits, lowercase letters and `-`: safe in a
//! `Last-Event-ID` header). A user's view is their own history merged with the application's
//! broadcasts, both ordered by that one sequence, so a single id says exactly where a client stands
//! in both.
//!
//! The epoch names one unbroken history of the application. It is drawn afresh whenever that
//! history may have lost events: Redis came back without its data, or a failover rolled back writes
//! that a gateway had already seen. Ids of another epoch are never compared with the current ones:
//! a client holding one gets a `reset` (`history_lost`), never a silent gap.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// Longest `Last-Event-ID` looked at; longer values are unknown ids.
pub const MAX_EVENT_ID_LEN: usize = 64;

/// Largest epoch: six base-36 digits.
const EPOCH_LIMIT: u64 = 36u64.pow(6);

/// One unbroken history of an application (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(u32);

impl Epoch {
    /// An epoch drawn from a clock reading in microseconds, as the Redis library draws them: two
    /// histories of one application get the same epoch only if they start the same microsecond
    /// modulo 36^6 (about 36 minutes).
    pub fn from_micros(micros: u64) -> Epoch {
        Epoch((micros % EPOCH_LIMIT) as u32)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [0u8; 6];
        let mut n = self.0;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
            n /= 36;
            if n == 0 {
                break;
            }
        }
        // Only ASCII digits and letters were written.
        f.write_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"))
    }
}

impl FromStr for Epoch {
    type Err = NotAnEventId;

    fn from_str(s: &str) -> Result<Epoch, NotAnEventId> {
        let canonical = !s.is_empty() && s.len() <= 6 && (s == "0" || !s.starts_with('0'));
        let ok = canonical
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        if !ok {
            return Err(NotAnEventId);
        }
        u32::from_str_radix(s, 36)
            .map(Epoch)
            .map_err(|_| NotAnEventId)
    }
}

/// The id of a durable event. Ordered by time and counter; ids of different epochs do not
/// describe one history, so [`EventId::covers`] is what callers use to compare positions.
/// 16 bytes: every stream keeps one (a counter past 2^32 events in one millisecond is not an id
/// of ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    pub ms: u64,
    pub seq: u32,
    pub epoch: Epoch,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.ms, self.seq, self.epoch)
    }
}

/// The text is not an id this gateway issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAnEventId;

impl FromStr for EventId {
    type Err = NotAnEventId;

    fn from_str(s: &str) -> Result<EventId, NotAnEventId> {
        if s.len() > MAX_EVENT_ID_LEN {
            return Err(NotAnEventId);
        }
        let mut parts = s.split('-');
        let (Some(ms), Some(seq), Some(epoch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NotAnEventId);
        };
        // Canonical decimal only (no sign, no leading zero): one id, one spelling, so that an id
        // a client sends back is exactly one the gateway wrote.
        let digits = |p: &str| {
            let canonical = !p.is_empty() && p.len() <= 15 && (p == "0" || !p.starts_with('0'));
            (canonical && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u64>().ok())
                .flatten()
        };
        let seq = digits(seq).and_then(|s| u32::try_from(s).ok());
        Ok(EventId {
            ms: digits(ms).ok_or(NotAnEventId)?,
            seq: seq.ok_or(NotAnEventId)?,
            epoch: epoch.parse()?,
        })
    }
}

impl EventId {
    /// The id after `last` for an event created at `now_ms` (the clock may go backwards; ids not).
    /// Without a `last`, a new history starts with `epoch`.
    pub fn next(last: Option<EventId>, now_ms: u64, epoch: Epoch) -> EventId {
        match last {
            Some(l) if l.ms >= now_ms => EventId {
                seq: l.seq.saturating_add(1),
                ..l
            },
            Some(l) => EventId {
                ms: now_ms,
                seq: 0,
                epoch: l.epoch,
            },
            None => EventId {
                ms: now_ms,
                seq: 0,
                epoch,
            },
        }
    }

    /// Whether a stream standing at `self` already has `other`: same history, not later.
    pub fn covers(&self, other: &EventId) -> bool {
        self.epoch == other.epoch && other <= self
    }

    /// The later of two positions; a position in another history replaces the old one (the newer
    /// history is the one Redis now holds).
    pub fn advance(position: Option<EventId>, to: EventId) -> EventId {
        match position {
            Some(p) if p.covers(&to) => p,
            _ => to,
        }
    }
}

/// Most histories one application may be spread over.
pub const MAX_PARTITIONS: u32 = 1024;

/// How an application's users are spread over histories. With one partition (a single Redis,
/// Sentinel, or a cluster that keeps each application in one slot) an application has one
/// history, named after it. With `n` (Redis Cluster, `CLUSTER_PARTITIONS`), user `u` of `app`
/// belongs to the history `app#k`, `k = djb2(u) mod n`: each history is its own sequence of ids,
/// with its users' own events and a copy of every broadcast, in its own slot. A stream lives in
/// exactly one history, so one id still places it exactly. (`#` is never part of an application
/// id, so a history name cannot be mistaken for one.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions(u32);

impl Default for Partitions {
    fn default() -> Partitions {
        Partitions::ONE
    }
}

impl Partitions {
    pub const ONE: Partitions = Partitions(1);

    /// `n` partitions, 1 to [`MAX_PARTITIONS`].
    pub fn new(n: u32) -> Option<Partitions> {
        (1..=MAX_PARTITIONS).contains(&n).then_some(Partitions(n))
    }

    pub fn count(self) -> u32 {
        self.0
    }

    /// The partition of `user`: djb2 (`h = h * 33 + byte`, from 5381, modulo 2^32) modulo the
    /// count. Chosen because any backend (and the Redis library's Lua) computes it in a line.
    pub fn of(self, user: &str) -> u32 {
        let h = user.bytes().fold(5381u32, |h, b| {
            h.wrapping_mul(33).wrapping_add(u32::from(b))
        });
        h % self.0
    }

    /// The history `user` of `app` belongs to.
    pub fn history<'a>(self, app: &'a str, user: &str) -> Cow<'a, str> {
        if self.0 == 1 {
            Cow::Borrowed(app)
        } else {
            Cow::Owned(format!("{app}#{}", self.of(user)))
        }
    }

    /// Every history of `app` (its broadcasts are written to each).
    pub fn histories(self, app: &str) -> Vec<Cow<'_, str>> {
        if self.0 == 1 {
            return vec![Cow::Borrowed(app)];
        }
        (0..self.0)
            .map(|k| Cow::Owned(format!("{app}#{k}")))
            .collect()
    }

    /// The share of an application-wide cap each history enforces: the caps are checked
    /// atomically in one slot, and a partitioned application has one per history. Rounded up, so
    /// the whole application never holds more than `cap + count - 1`.
    pub fn share(self, cap: u64) -> u64 {
        if cap == 0 {
            0
        } else {
            cap.div_ceil(u64::from(self.0))
        }
    }
}

/// The application a history belongs to (`shop#3` → `shop`; `shop` → `shop`).
pub fn tenant(history: &str) -> &str {
    history.split_once('#').map_or(history, |(app, _)| app)
}

/// Whether `name` is a history name of a partitioned application (`<app>#<k>`).
pub fn is_partition(name: &str) -> bool {
    name.contains('#')
}

/// Why replay could not give a stream everything it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// History no longer reaches back to the client's id.
    TooOld,
    /// The id was not issued by this gateway for this application.
    UnknownId,
    /// The id belongs to a history that no longer exists: Redis lost its data, or a failover
    /// rolled back events a gateway had seen.
    HistoryLost,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::TooOld => "too_old",
            ResetReason::UnknownId => "unknown_id",
            ResetReason::HistoryLost => "history_lost",
        }
    }

    /// The reason named by the Redis library's replies.
    pub fn from_name(name: &str) -> ResetReason {
        match name {
            "too_old" => ResetReason::TooOld,
            "history_lost" => ResetReason::HistoryLost,
            _ => ResetReason::UnknownId,
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
/// publisher put there, with `"durable":true`, the mark of an id of history. `None` if the payload
/// is not a JSON object text.
pub fn stamp(envelope: &[u8], id: EventId) -> Option<Bytes> {
    let text = std::str::from_utf8(envelope).ok()?.trim();
    let body = text.strip_prefix('{')?.strip_suffix('}')?;
    let stamped = if body.trim().is_empty() {
        format!("{{\"id\":\"{id}\",\"durable\":true}}")
    } else {
        format!("{{{body},\"id\":\"{id}\",\"durable\":true}}")
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

    fn id(ms: u64, seq: u32, epoch: u32) -> EventId {
        EventId {
            ms,
            seq,
            epoch: Epoch(epoch),
        }
    }

    #[test]
    fn ids_parse_strictly_and_order_numerically() {
        let a: EventId = "1700000000000-2-k3".parse().unwrap();
        let b: EventId = "1700000000000-10-k3".parse().unwrap();
        let c: EventId = "1700000000001-0-k3".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1700000000000-2-k3");
        assert_eq!(a.epoch, Epoch(20 * 36 + 3));
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "1-2",
            "1-2-",
            "1-2-3-4",
            "a-1-0",
            "1 -2-0",
            "+1-2-0",
            "1:2-0",
            "1-2-K3",
            "1-2-03",
            "1-2-1234567",
            "1-2-k3\n",
            &"9".repeat(65),
            &format!("{}-0-0", "9".repeat(16)),
            "1-4294967296-0",
            "01-2-0",
            "1-02-0",
            "00-0-0",
        ] {
            assert_eq!(bad.parse::<EventId>(), Err(NotAnEventId), "{bad}");
        }
        // Only characters that never trigger a CORS preflight for Last-Event-ID.
        assert!(
            c.to_string()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        );
    }

    #[test]
    fn epochs_round_trip_in_base_36() {
        for n in [0, 1, 35, 36, 1295, EPOCH_LIMIT as u32 - 1] {
            let e = Epoch(n);
            assert_eq!(e.to_string().parse::<Epoch>(), Ok(e), "{n}");
        }
        assert_eq!(Epoch(EPOCH_LIMIT as u32 - 1).to_string(), "zzzzzz");
        assert_eq!(Epoch::from_micros(EPOCH_LIMIT + 5), Epoch(5));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Every id this gateway can write: `ms` of at most 15 digits, any counter, any epoch.
        fn any_id() -> impl Strategy<Value = EventId> {
            (0..10u64.pow(15), any::<u32>(), 0..EPOCH_LIMIT as u32).prop_map(|(ms, seq, e)| {
                EventId {
                    ms,
                    seq,
                    epoch: Epoch(e),
                }
            })
        }

        proptest! {
            #[test]
            fn an_id_reads_back_as_itself(id in any_id()) {
                prop_assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
            }

            #[test]
            fn an_epoch_reads_back_as_itself(n in 0..EPOCH_LIMIT as u32) {
                prop_assert_eq!(Epoch(n).to_string().parse::<Epoch>(), Ok(Epoch(n)));
            }

            /// Near-misses of the id syntax (leading zeros, long parts, other characters) and
            /// arbitrary text: whatever parses is written back exactly as it was read.
            #[test]
            fn a_parsed_id_is_written_back_unchanged(
                s in prop_oneof![
                    "[0-9]{1,17}-[0-9]{1,11}-[0-9a-z]{1,7}",
                    "[0-9+ -]{0,6}-[0-9]{0,3}-[0-9a-zA-Z]{0,3}",
                    "\\PC{0,70}",
                ]
            ) {
                if let Ok(id) = s.parse::<EventId>() {
                    prop_assert_eq!(id.to_string(), s);
                }
            }

            #[test]
            fn a_parsed_epoch_is_written_back_unchanged(s in "[0-9a-zA-Z+-]{0,8}") {
                if let Ok(e) = s.parse::<Epoch>() {
                    prop_assert_eq!(e.to_string(), s);
                }
            }
        }
    }

    #[test]
    fn next_is_monotonic_even_if_the_clock_goes_back() {
        let first = EventId::next(None, 100, Epoch(7));
        assert_eq!(first, id(100, 0, 7));
        let same_ms = EventId::next(Some(first), 100, Epoch(9));
        assert_eq!(same_ms, id(100, 1, 7), "the history keeps its epoch");
        let clock_back = EventId::next(Some(same_ms), 90, Epoch(9));
        assert_eq!(clock_back, id(100, 2, 7));
        assert_eq!(
            EventId::next(Some(clock_back), 200, Epoch(9)),
            id(200, 0, 7)
        );
    }

    #[test]
    fn positions_compare_only_within_one_history() {
        let p = id(100, 3, 1);
        assert!(p.covers(&id(100, 3, 1)) && p.covers(&id(99, 9, 1)));
        assert!(!p.covers(&id(100, 4, 1)));
        assert!(!p.covers(&id(50, 0, 2)), "another epoch is never covered");
        assert_eq!(EventId::advance(Some(p), id(99, 0, 1)), p);
        assert_eq!(EventId::advance(Some(p), id(101, 0, 1)), id(101, 0, 1));
        assert_eq!(EventId::advance(Some(p), id(50, 0, 2)), id(50, 0, 2));
        assert_eq!(EventId::advance(None, p), p);
    }

    #[test]
    fn stamping_puts_the_id_last() {
        let id = id(5, 1, 0);
        assert_eq!(
            &stamp(br#"{"type":"t","data":1}"#, id).unwrap()[..],
            br#"{"type":"t","data":1,"id":"5-1-0","durable":true}"#
        );
        assert_eq!(
            &stamp(b" { } ", id).unwrap()[..],
            br#"{"id":"5-1-0","durable":true}"#
        );
        assert_eq!(
            &stamp(br#"{"id":"mine"}"#, id).unwrap()[..],
            br#"{"id":"mine","id":"5-1-0","durable":true}"#
        );
        assert_eq!(stamp(b"[1]", id), None);
        assert_eq!(stamp(b"plain", id), None);
    }

    #[test]
    fn users_spread_over_partitions_by_djb2() {
        let p = Partitions::new(16).unwrap();
        // A fixed vector, for backends that compute the partition themselves.
        assert_eq!(p.of("alice"), 253_185_475 % 16);
        let djb2 = |s: &str| {
            s.bytes()
                .fold(5381u64, |h, b| (h * 33 + u64::from(b)) % (1 << 32))
        };
        for user in ["alice", "bob", "", "a-very-long-user-id@example.com", "é"] {
            assert_eq!(u64::from(p.of(user)), djb2(user) % 16, "{user}");
        }
        assert_eq!(
            p.history("shop", "alice"),
            format!("shop#{}", p.of("alice"))
        );
        assert_eq!(Partitions::ONE.history("shop", "alice"), "shop");
        assert_eq!(tenant("shop#3"), "shop");
        assert_eq!(tenant("shop"), "shop");
        assert_eq!(p.histories("a").len(), 16);
        assert_eq!(Partitions::ONE.histories("a"), vec!["a"]);
        // 1,000 users land in every one of 16 partitions.
        let used: std::collections::HashSet<u32> =
            (0..1000).map(|i| p.of(&format!("user-{i}"))).collect();
        assert_eq!(used.len(), 16);
        assert_eq!(p.share(100), 7);
        assert_eq!(p.share(0), 0);
        assert_eq!(Partitions::ONE.share(5), 5);
        assert_eq!(Partitions::new(0), None);
        assert_eq!(Partitions::new(MAX_PARTITIONS + 1), None);
    }

    #[test]
    fn merge_interleaves_by_id() {
        let e = |ms, s: &'static str| (id(ms, 0, 0), Bytes::from_static(s.as_bytes()));
        let merged = merge(
            vec![e(1, "a"), e(4, "d")],
            vec![e(2, "b"), e(3, "c"), e(5, "e")],
        );
        let text: Vec<&[u8]> = merged.iter().map(|(_, b)| &b[..]).collect();
        assert_eq!(text, [b"a", b"b", b"c", b"d", b"e"]);
    }
}
