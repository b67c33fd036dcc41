//! The connection registry in Redis (see docs/redis.md; on a cluster every name starts with the
//! tag `{<app>}` instead of `<app>`):
//! - `{app}:client:{user}:{conn}`: a hash per live connection, expiring unless rewritten;
//! - `{app}:connections` and `{app}:connections:{user}`: sorted-set indexes whose scores are the
//!   entries' expiry times, so listing never scans the keyspace and dead instances' entries age out;
//!   a listing reads them a page per call (`sse_list`: the index members and their hashes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;

use fred::types::Value;

use super::Links;
use crate::broker::{Admission, Admitted, BrokerError, ConnectionRecord, IdRef, RegistryOp};

/// Most admissions in one call.
const ADMIT_BATCH: usize = 256;
/// Most admission calls in flight at once. In a connect storm a call's round trip is mostly the
/// gateway's own run queue (thousands of streams being served): 50-900 ms, against 3-4 ms of
/// Redis time. So the calls in flight, not Redis, set how fast a wave is admitted; four (4 × 256
/// per round trip) made admission the storm's long pole. Each call still carries at most
/// [`ADMIT_BATCH`] admissions, a few milliseconds of Redis time.
const ADMIT_IN_FLIGHT: usize = 16;
/// Entries read per listing call (the library's most is 1,000).
const LIST_PAGE: usize = 500;
/// A listing gives up after this many pages (10 million entries).
const MAX_LIST_PAGES: usize = 20_000;

/// An admission waiting for its batch.
pub(super) struct Pending {
    record: ConnectionRecord,
    max_app: u64,
    max_user: u64,
    ttl_secs: u64,
    answer: oneshot::Sender<Result<Admitted, BrokerError>>,
}

/// Admissions waiting for a call, all under one key: a call may carry several applications.
pub(super) type Admissions = crate::batch::Batches<(), Pending>;

pub(super) fn admissions() -> Admissions {
    Admissions::new(ADMIT_IN_FLIGHT, ADMIT_BATCH)
}

/// Reserves `a`'s place: sent at once while fewer than [`ADMIT_IN_FLIGHT`] calls are out, else
/// queued with the admissions that arrive meanwhile and sent with them in the next call.
pub(super) async fn admit(links: &Arc<Links>, a: Admission) -> Result<Admitted, BrokerError> {
    links.commands_up()?;
    let (tx, rx) = oneshot::channel();
    let pending = Pending {
        record: a.record,
        max_app: a.max_app,
        max_user: a.max_user,
        ttl_secs: a.ttl_secs,
        answer: tx,
    };
    if links.admissions.push(&(), pending) {
        // Its own task: the stream that started it may give up while others wait.
        let links = links.clone();
        tokio::spawn(async move {
            while let Some(batch) = links.admissions.next(&()) {
                match links.admit_batch(&batch).await {
                    Ok(answers) => {
                        for (p, answer) in batch.into_iter().zip(answers) {
                            let _ = p.answer.send(Ok(answer));
                        }
                    }
                    Err(e) => {
                        for p in batch {
                            let _ = p.answer.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
    }
    rx.await
        .unwrap_or_else(|_| Err(BrokerError::Unavailable("admission abandoned".into())))
}

/// The positions of each application's items, applications in order of first appearance.
fn by_app<'a>(apps: impl Iterator<Item = &'a str>) -> Vec<(&'a str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, app) in apps.enumerate() {
        let g = *at.entry(app).or_insert_with(|| {
            groups.push((app, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups
}

impl Links {
    /// One call per application for a batch of admissions (in order, each atomic, each writing
    /// its registry entry if admitted): a connect storm costs a few function calls instead of one
    /// per stream. (One call may not span applications: on a cluster each has its own slot.)
    async fn admit_batch(&self, batch: &[Pending]) -> Result<Vec<Admitted>, BrokerError> {
        let mut answers: Vec<Option<Admitted>> = vec![None; batch.len()];
        let apps = batch.iter().map(|p| p.record.application.id.as_str());
        for (app, members) in by_app(apps) {
            let ttl = batch[members[0]].ttl_secs;
            let mut args: Vec<Value> = Vec::with_capacity(1 + members.len() * 9);
            args.push(ttl.to_string().into());
            for &i in &members {
                let p = &batch[i];
                let rec = &p.record;
                args.extend([
                    app.into(),
                    rec.user.id.as_str().into(),
                    rec.id.as_str().into(),
                    p.max_app.to_string().into(),
                    p.max_user.to_string().into(),
                    rec.instance.as_str().into(),
                    rec.remote_addr.as_str().into(),
                    rec.created_at.to_string().into(),
                    rec.user_agent.as_str().into(),
                ]);
            }
            let bad = || BrokerError::Command("unexpected answer from sse_join".into());
            let call = self.app_fcall_on(&self.admitter, "sse_join", app, args);
            let Value::Array(got) = call.await? else {
                return Err(bad());
            };
            if got.len() != members.len() {
                return Err(bad());
            }
            for (&i, answer) in members.iter().zip(got) {
                let Value::Array(items) = answer else {
                    return Err(bad());
                };
                let count = || items.get(1).and_then(|v| v.as_u64()).ok_or_else(bad);
                answers[i] = Some(match items.first().and_then(|v| v.as_string()).as_deref() {
                    Some("ok") => Admitted::Yes,
                    Some("user") => Admitted::UserFull(count()?),
                    Some("app") => Admitted::AppFull(count()?),
                    _ => return Err(bad()),
                });
            }
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| BrokerError::Command("admission left unanswered".into())))
            .collect()
    }

    pub(super) async fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        ttl_secs: u64,
    ) -> Result<Vec<String>, BrokerError> {
        // One function call per application in the batch: a few microseconds of Redis time per
        // entry, instead of eight commands (and eight of fred's per-command costs here) per entry.
        let app_of = |op: &RegistryOp| -> String {
            match op {
                RegistryOp::Put(rec) => rec.application.id.clone(),
                RegistryOp::Touch { app, .. } | RegistryOp::Remove { app, .. } => app.clone(),
            }
        };
        let apps: Vec<String> = ops.iter().map(app_of).collect();
        let mut ops: Vec<Option<RegistryOp>> = ops.into_iter().map(Some).collect();
        let mut missing = Vec::new();
        for (app, members) in by_app(apps.iter().map(String::as_str)) {
            let mut args: Vec<Value> = Vec::with_capacity(1 + members.len() * 8);
            args.push(ttl_secs.to_string().into());
            for op in members.iter().filter_map(|&i| ops[i].take()) {
                match op {
                    RegistryOp::Put(rec) => {
                        let rec = Arc::unwrap_or_clone(rec);
                        args.extend([
                            "put".into(),
                            rec.application.id.into(),
                            rec.user.id.into(),
                            rec.id.into(),
                            rec.instance.into(),
                            rec.remote_addr.into(),
                            rec.created_at.to_string().into(),
                            rec.user_agent.into(),
                        ]);
                    }
                    RegistryOp::Touch { app, user, id } => {
                        args.extend(["touch".into(), app.into(), user.into(), id.into()]);
                    }
                    RegistryOp::Remove { app, user, id } => {
                        args.extend(["remove".into(), app.into(), user.into(), id.into()]);
                    }
                }
            }
            if let Value::Array(ids) = self.fcall("sse_registry", app, args).await? {
                missing.extend(ids.into_iter().filter_map(|v| v.into_string()));
            }
        }
        Ok(missing)
    }

    /// The live entries of an application (or one user), a page per call: each page is read
    /// inside Redis, so a large application costs one round trip per [`LIST_PAGE`] entries
    /// instead of one read per connection.
    pub(super) async fn registry_list(
        &self,
        app: &str,
        user: Option<&str>,
    ) -> Result<Vec<ConnectionRecord>, BrokerError> {
        let bad = || BrokerError::Command("unexpected answer from sse_list".into());
        let mut records = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor = "0".to_string();
        for _ in 0..MAX_LIST_PAGES {
            let mut args: Vec<Value> = vec![
                app.into(),
                cursor.as_str().into(),
                LIST_PAGE.to_string().into(),
            ];
            args.extend(user.map(Value::from));
            let Value::Array(items) = self.fcall("sse_list", app, args).await? else {
                return Err(bad());
            };
            let mut items = items.into_iter();
            cursor = items.next().and_then(|v| v.into_string()).ok_or_else(bad)?;
            for entry in items {
                let Value::Array(fields) = entry else {
                    return Err(bad());
                };
                let mut hash = HashMap::with_capacity(fields.len() / 2);
                let mut fields = fields.into_iter().filter_map(|v| v.into_string());
                while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                    hash.insert(k, v);
                }
                // ZSCAN may return an entry twice (its index grew meanwhile).
                if let Some(rec) = record_from_hash(hash)
                    && seen.insert(rec.id.clone())
                {
                    records.push(rec);
                }
            }
            if cursor == "0" {
                return Ok(records);
            }
        }
        Err(BrokerError::Command(format!(
            "listing {app} took more than {MAX_LIST_PAGES} pages"
        )))
    }
}

/// An entry written by `registry_apply`; `None` when the hash has expired or is incomplete.
fn record_from_hash(mut h: HashMap<String, String>) -> Option<ConnectionRecord> {
    let mut take = |k: &str| h.remove(k);
    Some(ConnectionRecord {
        id: take("id")?,
        created_at: take("created_at")?.parse().ok()?,
        application: IdRef { id: take("app")? },
        user: IdRef { id: take("user")? },
        remote_addr: take("remote_addr").unwrap_or_default(),
        instance: take("instance").unwrap_or_default(),
        user_agent: take("user_agent").unwrap_or_default(),
    })
}
