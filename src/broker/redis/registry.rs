//! The connection registry in Redis (see docs/redis.md; on a cluster every name starts with the
//! tag `{<app>}` instead of `<app>`):
//! - `{app}:client:{user}:{conn}`: a hash per live connection, expiring unless rewritten;
//! - `{app}:connections` and `{app}:connections:{user}`: sorted-set indexes whose scores are the
//!   entries' expiry times, so listing never scans the keyspace and dead instances' entries age out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use fred::interfaces::{HashesInterface, SortedSetsInterface};
use fred::types::Value;

use super::{Links, cluster, unavailable};
use crate::broker::{Admission, Admitted, BrokerError, ConnectionRecord, IdRef, RegistryOp};
use crate::clock;

/// Most admissions in one call.
const ADMIT_BATCH: usize = 256;

/// An admission waiting for its batch.
pub(super) struct Pending {
    app: String,
    user: String,
    conn: String,
    max_app: u64,
    max_user: u64,
    ttl_secs: u64,
    answer: oneshot::Sender<Result<Admitted, BrokerError>>,
}

/// Admissions waiting for a call; `running` while a task sends them.
#[derive(Default)]
pub(super) struct Admissions {
    waiting: Mutex<(Vec<Pending>, bool)>,
}

impl Admissions {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Pending>, bool)> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reserves `a`'s place: queued with the admissions that arrive while a call is in flight, and
/// sent with them in the next one.
pub(super) async fn admit(links: &Arc<Links>, a: Admission<'_>) -> Result<Admitted, BrokerError> {
    links.commands_up()?;
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut waiting = links.admissions.lock();
        waiting.0.push(Pending {
            app: a.app.to_string(),
            user: a.user.to_string(),
            conn: a.conn.to_string(),
            max_app: a.max_app,
            max_user: a.max_user,
            ttl_secs: a.ttl_secs,
            answer: tx,
        });
        !std::mem::replace(&mut waiting.1, true)
    };
    if start {
        // Its own task: the stream that started it may give up while others wait.
        let links = links.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Pending> = {
                    let mut waiting = links.admissions.lock();
                    if waiting.0.is_empty() {
                        waiting.1 = false;
                        return;
                    }
                    let n = waiting.0.len().min(ADMIT_BATCH);
                    waiting.0.drain(..n).collect()
                };
                let answers = links.admit_batch(&batch).await;
                match answers {
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

/// A connection's hash; `base` is the application's key base ([`cluster::base`]).
fn conn_key(base: &str, user: &str, id: &str) -> String {
    format!("{base}:client:{user}:{id}")
}

/// The registry index of an application, or of one of its users.
fn index(base: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => format!("{base}:connections:{u}"),
        None => format!("{base}:connections"),
    }
}

impl Links {
    /// One call per application for a batch of admissions (in order, each atomic): a connect
    /// storm costs a few function calls instead of one per stream. (One call may not span
    /// applications: on a cluster each has its own slot.)
    async fn admit_batch(&self, batch: &[Pending]) -> Result<Vec<Admitted>, BrokerError> {
        let mut answers: Vec<Option<Admitted>> = vec![None; batch.len()];
        for (app, members) in by_app(batch.iter().map(|p| p.app.as_str())) {
            let ttl = batch[members[0]].ttl_secs;
            let mut args: Vec<Value> = Vec::with_capacity(1 + members.len() * 5);
            args.push(ttl.to_string().into());
            for &i in &members {
                let p = &batch[i];
                args.extend([
                    p.app.as_str().into(),
                    p.user.as_str().into(),
                    p.conn.as_str().into(),
                    p.max_app.to_string().into(),
                    p.max_user.to_string().into(),
                ]);
            }
            let bad = || BrokerError::Command("unexpected answer from sse_admit".into());
            let Value::Array(got) = self.fcall("sse_admit", app, args).await? else {
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

    pub(super) async fn registry_list(
        &self,
        app: &str,
        user: Option<&str>,
    ) -> Result<Vec<ConnectionRecord>, BrokerError> {
        self.commands_up()?;
        let app = &*cluster::base(self.cluster, app);
        let index = index(app, user);
        let now = clock::unix_secs_f64();
        // Entries of instances that died stay in the index until their score passes; prune them.
        let _: i64 = self
            .client
            .zremrangebyscore(&index, "-inf".to_string(), now)
            .await
            .map_err(unavailable)?;
        let members: Vec<String> = self
            .client
            .zrangebyscore(&index, now, "+inf".to_string(), false, None)
            .await
            .map_err(unavailable)?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let pipe = self.client.pipeline();
        for m in &members {
            let key = match user {
                Some(u) => conn_key(app, u, m),
                None => match m.split_once(':') {
                    Some((u, id)) => conn_key(app, u, id),
                    None => continue,
                },
            };
            let _: () = pipe.hgetall(key).await.map_err(unavailable)?;
        }
        let mut records = Vec::with_capacity(members.len());
        for hash in pipe.try_all::<HashMap<String, String>>().await {
            let hash = hash.map_err(|e| BrokerError::Command(e.to_string()))?;
            if let Some(rec) = record_from_hash(hash) {
                records.push(rec);
            }
        }
        Ok(records)
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
