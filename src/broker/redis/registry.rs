//! The connection registry in Redis (see docs/redis.md):
//! - `{app}:client:{user}:{conn}`: a hash per live connection, expiring unless rewritten;
//! - `{app}:connections` and `{app}:connections:{user}`: sorted-set indexes whose scores are the
//!   entries' expiry times, so listing never scans the keyspace and dead instances' entries age out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use fred::interfaces::{HashesInterface, SortedSetsInterface};
use fred::types::Value;

use super::{Links, unavailable};
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

fn conn_key(app: &str, user: &str, id: &str) -> String {
    format!("{app}:client:{user}:{id}")
}

/// The registry index of an application, or of one of its users.
fn index(app: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => format!("{app}:connections:{u}"),
        None => format!("{app}:connections"),
    }
}

impl Links {
    /// One call for a batch of admissions (in order, each atomic): a connect storm costs a few
    /// function calls instead of one per stream.
    async fn admit_batch(&self, batch: &[Pending]) -> Result<Vec<Admitted>, BrokerError> {
        let ttl = batch.first().map_or(1, |p| p.ttl_secs);
        let mut args: Vec<Value> = Vec::with_capacity(1 + batch.len() * 5);
        args.push(ttl.to_string().into());
        for p in batch {
            args.extend([
                p.app.as_str().into(),
                p.user.as_str().into(),
                p.conn.as_str().into(),
                p.max_app.to_string().into(),
                p.max_user.to_string().into(),
            ]);
        }
        let bad = || BrokerError::Command("unexpected answer from sse_admit".into());
        let Value::Array(answers) = self.fcall("sse_admit", args).await? else {
            return Err(bad());
        };
        if answers.len() != batch.len() {
            return Err(bad());
        }
        answers
            .into_iter()
            .map(|answer| {
                let Value::Array(items) = answer else {
                    return Err(bad());
                };
                let count = || items.get(1).and_then(|v| v.as_u64()).ok_or_else(bad);
                match items.first().and_then(|v| v.as_string()).as_deref() {
                    Some("ok") => Ok(Admitted::Yes),
                    Some("user") => Ok(Admitted::UserFull(count()?)),
                    Some("app") => Ok(Admitted::AppFull(count()?)),
                    _ => Err(bad()),
                }
            })
            .collect()
    }

    pub(super) async fn registry_apply(
        &self,
        ops: Vec<RegistryOp>,
        ttl_secs: u64,
    ) -> Result<Vec<String>, BrokerError> {
        // One function call per batch: a few microseconds of Redis time per entry, instead of
        // eight commands (and eight of fred's per-command costs here) per entry.
        let mut args: Vec<Value> = Vec::with_capacity(1 + ops.len() * 8);
        args.push(ttl_secs.to_string().into());
        for op in ops {
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
        let missing = match self.fcall("sse_registry", args).await? {
            Value::Array(ids) => ids.into_iter().filter_map(|v| v.into_string()).collect(),
            _ => Vec::new(),
        };
        Ok(missing)
    }

    pub(super) async fn registry_list(
        &self,
        app: &str,
        user: Option<&str>,
    ) -> Result<Vec<ConnectionRecord>, BrokerError> {
        self.commands_up()?;
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
