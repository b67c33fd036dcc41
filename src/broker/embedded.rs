//! The embedded broker: in-process pub/sub and registry for a single node with no Redis.
//!
//! Messages published here (over `POST /publish`) are handed straight to the local hub; the registry
//! holds this process's connections only, which is the whole cluster when there is one node. History
//! follows the same rules as the Redis Functions in `sse_gateway.lua`, in memory.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::{
    Admission, Admitted, BoxFuture, Broker, BrokerError, ConnectionRecord, LinkState, MessageSink,
    Position, RegistryOp, Retention, app_channel, user_channel,
};
use crate::clock;
use crate::history::{self, Backlog, Epoch, EventId, ResetReason};

/// app -> (user, connection id) -> entry.
type Entries = HashMap<String, BTreeMap<(String, String), Arc<ConnectionRecord>>>;

pub struct EmbeddedBroker {
    sink: OnceLock<Arc<dyn MessageSink>>,
    channels: Mutex<HashSet<String>>,
    registry: Mutex<Entries>,
    history: Mutex<History>,
    reconnects: OnceLock<tokio::sync::watch::Sender<u64>>,
}

impl EmbeddedBroker {
    pub fn new(retention: Retention) -> EmbeddedBroker {
        EmbeddedBroker {
            sink: OnceLock::new(),
            channels: Mutex::default(),
            registry: Mutex::default(),
            history: Mutex::new(History::new(retention)),
            reconnects: OnceLock::new(),
        }
    }

    /// Hands a message to the hub if anyone here listens on `channel`; returns the subscriber count.
    fn deliver(&self, channel: &str, payload: &[u8]) -> u64 {
        let subscribed = lock(&self.channels).contains(channel);
        if subscribed && let Some(sink) = self.sink.get() {
            sink.deliver(&[(channel, payload)]);
        }
        u64::from(subscribed)
    }
}

/// One history stream: entries in id order, plus what `XINFO STREAM` would call the
/// max-deleted-entry-id.
#[derive(Default)]
struct Stream {
    entries: VecDeque<(EventId, Bytes)>,
    max_deleted: Option<EventId>,
    last_write_ms: u64,
}

#[derive(Default)]
struct AppHistory {
    last: Option<EventId>,
    users: HashMap<String, Stream>,
    broadcast: Stream,
}

/// In-memory history with the Redis library's semantics (bounded length and age per stream, a
/// stream vanishing `ttl` after its last write).
pub struct History {
    retention: Retention,
    apps: HashMap<String, AppHistory>,
    appends: u64,
    /// This process's history: none of it survives a restart, so each process has its own epoch.
    epoch: Epoch,
}

impl History {
    pub fn new(retention: Retention) -> History {
        History {
            retention,
            apps: HashMap::new(),
            appends: 0,
            epoch: Epoch::from_micros(clock::unix_micros() ^ u64::from(std::process::id())),
        }
    }

    /// The application's newest id, starting its history at `now_ms` when it has none (so that a
    /// stream's position can name it).
    pub fn position(&mut self, app: &str, now_ms: u64) -> Position {
        let epoch = self.epoch;
        let entry = self.apps.entry(app.to_string()).or_default();
        match entry.last {
            Some(last) => Position::Current(last),
            None => {
                let start = EventId::next(None, now_ms, epoch);
                entry.last = Some(start);
                Position::Started(start)
            }
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.retention.ttl_secs * 1000
    }

    /// Stamps the next id into `envelope` and appends it; `None` if it is not a JSON object.
    pub fn append(
        &mut self,
        app: &str,
        user: Option<&str>,
        envelope: &[u8],
        now_ms: u64,
    ) -> Option<(EventId, Bytes)> {
        let (max_len, ttl_ms) = (self.retention.max_len, self.ttl_ms());
        let entry = self.apps.entry(app.to_string()).or_default();
        let id = EventId::next(entry.last, now_ms, self.epoch);
        let message = history::stamp(envelope, id)?;
        entry.last = Some(id);
        let stream = match user {
            Some(u) => entry.users.entry(u.to_string()).or_default(),
            None => &mut entry.broadcast,
        };
        if now_ms.saturating_sub(stream.last_write_ms) >= ttl_ms {
            // New, or expired: what an expired stream held is gone, and it held nothing newer than
            // `ttl` before now (as the Redis library marks a re-created stream).
            let lost = EventId {
                ms: now_ms.saturating_sub(ttl_ms),
                seq: u32::MAX,
                epoch: id.epoch,
            };
            stream.entries.clear();
            stream.max_deleted = Some(stream.max_deleted.map_or(lost, |d| d.max(lost)));
        }
        stream.entries.push_back((id, message.clone()));
        stream.last_write_ms = now_ms;
        let oldest_kept = id.ms.saturating_sub(ttl_ms);
        while let Some((first, _)) = stream.entries.front() {
            if stream.entries.len() <= max_len && first.ms >= oldest_kept {
                break;
            }
            stream.max_deleted = Some(*first);
            stream.entries.pop_front();
        }
        self.appends += 1;
        if self.appends.is_multiple_of(1024) {
            self.forget_idle(now_ms);
        }
        Some((id, message))
    }

    /// Drops streams not written for `ttl` (Redis expires them the same way).
    fn forget_idle(&mut self, now_ms: u64) {
        let ttl_ms = self.ttl_ms();
        for app in self.apps.values_mut() {
            app.users
                .retain(|_, s| now_ms.saturating_sub(s.last_write_ms) < ttl_ms);
        }
    }

    /// What `users` of `app` missed after `from`, with the Redis function `sse_backlog`'s rules
    /// (at most `page` entries of each history, when not 0).
    pub fn backlog(
        &self,
        app: &str,
        from: &str,
        users: &[String],
        now_ms: u64,
        page: usize,
    ) -> Backlog {
        let page = if page == 0 { usize::MAX } else { page };
        let entry = self.apps.get(app);
        let current = entry.and_then(|e| e.last);
        let reset = |reason| Backlog::Reset { current, reason };
        let Ok(after) = from.parse::<EventId>() else {
            return reset(ResetReason::UnknownId);
        };
        let (Some(entry), Some(last)) = (entry, current) else {
            return reset(ResetReason::HistoryLost);
        };
        if after.epoch != last.epoch {
            return reset(ResetReason::HistoryLost);
        }
        if after > last {
            return reset(ResetReason::UnknownId);
        }
        let ttl_ms = self.ttl_ms();
        // The entries of a stream after `after`, or `None` when it cannot tell.
        let entries_after = |stream: Option<&Stream>| {
            if after == last {
                return Some(Vec::new());
            }
            // A stream exists until `ttl` after its last write, as the Redis key's EXPIRE does.
            let exists = stream
                .filter(|s| s.last_write_ms > 0 && now_ms.saturating_sub(s.last_write_ms) < ttl_ms);
            match exists {
                Some(s) if s.max_deleted.is_some_and(|d| after < d) => None,
                Some(s) => Some(
                    s.entries
                        .iter()
                        .filter(|(id, _)| *id > after)
                        .take(page)
                        .cloned()
                        .collect(),
                ),
                // Written since `after`, it would still exist: so nothing was, unless `after` is
                // itself older than what is kept.
                None if after.ms < now_ms.saturating_sub(ttl_ms) => None,
                None => Some(Vec::new()),
            }
        };
        let Some(broadcasts) = entries_after(Some(&entry.broadcast)) else {
            return reset(ResetReason::TooOld);
        };
        Backlog::Events {
            current,
            broadcasts,
            users: users
                .iter()
                .map(|u| entries_after(entry.users.get(u)))
                .collect(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the broker down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker for EmbeddedBroker {
    fn start(&self, sink: Arc<dyn MessageSink>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = self.sink.set(sink);
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        lock(&self.channels).extend(channels);
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, channels: Vec<String>) {
        let mut set = lock(&self.channels);
        for c in channels {
            set.remove(&c);
        }
    }

    fn publish(&self, channel: String, payload: Bytes) -> BoxFuture<'_, Result<u64, BrokerError>> {
        let n = self.deliver(&channel, &payload);
        Box::pin(async move { Ok(n) })
    }

    fn publish_durable<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
        envelope: Bytes,
    ) -> BoxFuture<'a, Result<(EventId, u64), BrokerError>> {
        // Appending and delivering under one lock keeps delivery in id order, as Redis does.
        let mut history = lock(&self.history);
        let result = match history.append(app, user, &envelope, clock::unix_ms()) {
            None => Err(BrokerError::Command(
                "the envelope must be a JSON object".into(),
            )),
            Some((id, message)) => {
                let channel = match user {
                    Some(u) => user_channel(app, u),
                    None => app_channel(app),
                };
                Ok((id, self.deliver(&channel, &message)))
            }
        };
        drop(history);
        Box::pin(async move { result })
    }

    fn since<'a>(
        &'a self,
        app: &'a str,
        last_event_id: &'a str,
        users: &'a [String],
        page: usize,
    ) -> BoxFuture<'a, Result<Backlog, BrokerError>> {
        let backlog =
            lock(&self.history).backlog(app, last_event_id, users, clock::unix_ms(), page);
        Box::pin(async move { Ok(backlog) })
    }

    fn position<'a>(
        &'a self,
        app: &'a str,
        _seen: Option<EventId>,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        // One process holds the whole history: it is never rolled back, only gone with the process.
        let position = lock(&self.history).position(app, clock::unix_ms());
        Box::pin(async move { Ok(position) })
    }

    fn admit(&self, a: Admission) -> BoxFuture<'_, Result<Admitted, BrokerError>> {
        // Counted and reserved under one lock, as the Redis function does in one call.
        let app = a.record.application.id.clone();
        let mut reg = lock(&self.registry);
        let entries = reg.entry(app.clone()).or_default();
        let user = &a.record.user.id;
        let users = entries.keys().filter(|(u, _)| u == user).count() as u64;
        let total = entries.len() as u64;
        let answer = if a.max_user > 0 && users >= a.max_user {
            Admitted::UserFull(users)
        } else if a.max_app > 0 && total >= a.max_app {
            Admitted::AppFull(total)
        } else {
            let key = (user.clone(), a.record.id.clone());
            entries.insert(key, Arc::new(a.record));
            Admitted::Yes
        };
        if entries.is_empty() {
            reg.remove(&app);
        }
        Box::pin(async move { Ok(answer) })
    }

    fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        _ttl_secs: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, BrokerError>> {
        // One process: entries live until removed, nothing expires.
        let mut reg = lock(&self.registry);
        let mut missing = Vec::new();
        for op in ops {
            match op {
                RegistryOp::Put(rec) => {
                    reg.entry(rec.application.id.clone())
                        .or_default()
                        .insert((rec.user.id.clone(), rec.id.clone()), rec);
                }
                RegistryOp::Touch { app, user, id } => {
                    if !reg
                        .get(&app)
                        .is_some_and(|entries| entries.contains_key(&(user, id.clone())))
                    {
                        missing.push(id);
                    }
                }
                RegistryOp::Remove { app, user, id } => {
                    if let Some(entries) = reg.get_mut(&app) {
                        entries.remove(&(user, id));
                        if entries.is_empty() {
                            reg.remove(&app);
                        }
                    }
                }
            }
        }
        Box::pin(async { Ok(missing) })
    }

    fn registry_list<'a>(
        &'a self,
        app: &'a str,
        user: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ConnectionRecord>, BrokerError>> {
        let reg = lock(&self.registry);
        let list = reg
            .get(app)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|((u, _), _)| user.is_none_or(|want| want == u))
                    .map(|(_, rec)| (**rec).clone())
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(list) })
    }

    fn link(&self) -> LinkState {
        LinkState {
            kind: "embedded",
            commands: true,
            pubsub: true,
            functions: true,
            probe: true,
            probe_age: None,
        }
    }

    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconnects
            .get_or_init(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    fn history(max_len: usize) -> History {
        History::new(Retention {
            max_len,
            ttl_secs: 60,
        })
    }

    /// The ids `user` gets replayed after `from` (or the reset), as a stream would see them.
    fn since(h: &History, app: &str, user: &str, from: &str, now_ms: u64) -> Vec<String> {
        match h.backlog(app, from, &[user.to_string()], now_ms, 0) {
            Backlog::Events {
                broadcasts, users, ..
            } => match users.into_iter().next().flatten() {
                Some(own) => history::merge(own, broadcasts)
                    .iter()
                    .map(|(id, m)| {
                        let v: serde_json::Value = serde_json::from_slice(m).unwrap();
                        assert_eq!(v["id"].as_str().unwrap(), id.to_string());
                        id.to_string()
                    })
                    .collect(),
                None => vec!["reset:too_old".into()],
            },
            Backlog::Reset { reason, .. } => vec![format!("reset:{}", reason.as_str())],
        }
    }

    #[test]
    fn replay_merges_own_and_broadcast_events_in_order() {
        let mut h = history(100);
        let (a, _) = h.append("app", Some("u"), br#"{"data":1}"#, T0).unwrap();
        let (b, _) = h.append("app", None, br#"{"data":2}"#, T0).unwrap();
        let (_, _) = h
            .append("app", Some("other"), br#"{"data":3}"#, T0)
            .unwrap();
        let (d, _) = h
            .append("app", Some("u"), br#"{"data":4}"#, T0 + 5)
            .unwrap();
        assert_eq!(
            since(&h, "app", "u", &a.to_string(), T0 + 10),
            vec![b.to_string(), d.to_string()]
        );
        assert_eq!(
            since(&h, "app", "u", &d.to_string(), T0 + 10),
            Vec::<String>::new()
        );
        // A brand-new user still gets the broadcasts after the id.
        assert_eq!(
            since(&h, "app", "new", &a.to_string(), T0 + 10),
            vec![b.to_string()]
        );
    }

    #[test]
    fn unknown_and_too_old_ids_reset() {
        let mut h = history(2);
        let (first, _) = h.append("app", Some("u"), b"{}", T0).unwrap();
        for i in 1..5 {
            h.append("app", Some("u"), b"{}", T0 + i).unwrap();
        }
        assert_eq!(
            since(&h, "app", "u", &first.to_string(), T0 + 10),
            vec!["reset:too_old"]
        );
        assert_eq!(
            since(&h, "app", "u", "garbage", T0 + 10),
            vec!["reset:unknown_id"]
        );
        assert_eq!(
            since(&h, "app", "u", "99999999999-0", T0 + 10),
            vec!["reset:unknown_id"]
        );
        assert_eq!(
            since(&h, "nobody", "u", &first.to_string(), T0 + 10),
            vec!["reset:history_lost"]
        );
        // An id of another history (another process, or Redis before it lost its data).
        let other = EventId {
            epoch: Epoch::from_micros(1),
            ..first
        };
        assert_ne!(other.epoch, first.epoch);
        assert_eq!(
            since(&h, "app", "u", &other.to_string(), T0 + 10),
            vec!["reset:history_lost"]
        );
        // Age: an id older than the TTL whose stream is gone cannot be vouched for.
        let mut h = history(100);
        let (old, _) = h.append("app", Some("u"), b"{}", T0).unwrap();
        h.append("app", Some("x"), b"{}", T0 + 120_000).unwrap();
        assert_eq!(
            since(&h, "app", "u", &old.to_string(), T0 + 120_001),
            vec!["reset:too_old"]
        );
    }

    #[test]
    fn a_stream_that_expired_and_was_recreated_is_never_a_silent_gap() {
        // TTL 60 s: u's stream expires 60 s after its last write, losing `lost`.
        let mut h = history(100);
        let (seen, _) = h.append("app", Some("u"), b"{}", T0).unwrap();
        h.append("app", Some("u"), br#"{"data":"lost"}"#, T0 + 1_000)
            .unwrap();
        // Long after, with the broadcasts keeping the application's history alive.
        let (b, _) = h.append("app", None, b"{}", T0 + 30_000).unwrap();
        h.append("app", None, b"{}", T0 + 59_000).unwrap();
        let (fresh, _) = h.append("app", Some("u"), b"{}", T0 + 61_500).unwrap();
        assert_eq!(
            since(&h, "app", "u", &seen.to_string(), T0 + 61_600),
            vec!["reset:too_old"]
        );
        // From a recent id nothing was lost: the re-created stream answers.
        assert_eq!(
            since(&h, "app", "u", &b.to_string(), T0 + 61_600)
                .last()
                .cloned(),
            Some(fresh.to_string())
        );
    }

    #[test]
    fn a_position_starts_a_history_once() {
        let mut h = history(100);
        let Position::Started(p) = h.position("app", T0) else {
            panic!("a new history starts");
        };
        assert_eq!(h.position("app", T0 + 5), Position::Current(p));
        let (first, _) = h.append("app", None, b"{}", T0).unwrap();
        assert!(first > p && first.epoch == p.epoch, "{first} follows {p}");
        assert_eq!(
            since(&h, "app", "u", &p.to_string(), T0 + 1),
            vec![first.to_string()]
        );
    }

    #[test]
    fn one_read_serves_many_users() {
        let mut h = history(100);
        let (start, _) = h.append("app", None, br#"{"data":0}"#, T0).unwrap();
        let (b, _) = h.append("app", None, br#"{"data":1}"#, T0 + 1).unwrap();
        let (own, _) = h
            .append("app", Some("u1"), br#"{"data":2}"#, T0 + 2)
            .unwrap();
        let users = ["u1", "u2", "u3"].map(String::from);
        let Backlog::Events {
            current,
            broadcasts,
            users: per_user,
        } = h.backlog("app", &start.to_string(), &users, T0 + 10, 0)
        else {
            panic!("expected events");
        };
        assert_eq!(current, Some(own));
        assert_eq!(broadcasts.iter().map(|e| e.0).collect::<Vec<_>>(), [b]);
        let own_ids: Vec<Vec<EventId>> = per_user
            .iter()
            .map(|u| u.as_ref().unwrap().iter().map(|e| e.0).collect())
            .collect();
        assert_eq!(own_ids, [vec![own], vec![], vec![]]);
        // One user's history trimmed past the id is that user's reset only.
        let mut h = history(1);
        let (start, _) = h.append("app", None, b"{}", T0).unwrap();
        h.append("app", Some("u1"), b"{}", T0 + 1).unwrap();
        h.append("app", Some("u1"), b"{}", T0 + 2).unwrap();
        let Backlog::Events {
            users: per_user, ..
        } = h.backlog("app", &start.to_string(), &users, T0 + 10, 0)
        else {
            panic!("expected events");
        };
        assert_eq!(per_user[0], None);
        assert_eq!(per_user[1], Some(Vec::new()));
    }

    #[test]
    fn non_objects_are_refused() {
        let mut h = history(10);
        assert!(h.append("app", None, b"[1]", T0).is_none());
        assert!(h.append("app", None, b"text", T0).is_none());
    }
}
