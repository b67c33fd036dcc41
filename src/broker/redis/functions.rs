//! The Redis Functions library (`sse_gateway.lua`): loading it, calling it, and reading its answers
//! (durable publish, replay, the history's position and the probe).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface};
use fred::types::{ClusterHash, CustomCommand, Value};

use super::{Links, cluster, command_error};
use crate::broker::{BrokerError, Position, Retention};
use crate::history::Partitions;
use crate::history::{Backlog, EventId, ResetReason};

/// The library, shipped with the gateway.
const LIBRARY: &str = include_str!("sse_gateway.lua");

/// The library with this deployment's history settings filled in; `cluster` for Redis Cluster
/// (hash-tagged names, sharded pub/sub), over which each application is spread in `partitions`.
pub fn library(
    retention: Retention,
    max_message_bytes: usize,
    cluster: bool,
    partitions: Partitions,
) -> String {
    LIBRARY
        .replace("__PARTITIONS__", &partitions.count().to_string())
        .replace("__MAXLEN__", &retention.max_len.to_string())
        .replace("__TTL__", &retention.ttl_secs.to_string())
        .replace("__MAX_BYTES__", &max_message_bytes.to_string())
        .replace("__CLUSTER__", if cluster { "true" } else { "false" })
}

/// `FCALL <function> <numkeys> [key] <args>...` routed by its key (on a cluster, to the node that
/// holds the key's slot).
fn fcall_command(
    function: &str,
    key: Option<&str>,
    args: Vec<Value>,
) -> (CustomCommand, Vec<Value>) {
    let mut full: Vec<Value> = Vec::with_capacity(3 + args.len());
    full.push(function.into());
    match key {
        Some(key) => full.extend([1.into(), key.into()]),
        None => full.push(0.into()),
    }
    full.extend(args);
    // fred honours only a slot given outright for a custom command (any other policy hashes
    // its first string: the function's name).
    let hash = match key {
        Some(key) => ClusterHash::Custom(cluster::slot(key)),
        None => ClusterHash::Random,
    };
    (CustomCommand::new("FCALL", hash, false), full)
}

impl Links {
    /// Loads (or replaces) the library where commands go: on a cluster, on every primary.
    pub(super) async fn load_library(&self) -> Result<(), BrokerError> {
        let failed = |e: fred::error::Error| {
            BrokerError::Command(format!("loading the Redis Functions: {e}"))
        };
        let args = vec!["LOAD", "REPLACE", self.library.as_str()];
        if self.cluster {
            let primaries = self
                .client
                .cached_cluster_state()
                .map(|state| state.unique_primary_nodes())
                .unwrap_or_default();
            if primaries.is_empty() {
                return Err(BrokerError::Unavailable(
                    "cluster topology not known yet".into(),
                ));
            }
            for node in primaries {
                let _: Value = self
                    .client
                    .with_cluster_node(node)
                    .custom(fred::cmd!("FUNCTION"), args.clone())
                    .await
                    .map_err(failed)?;
            }
        } else {
            let _: Value = self
                .client
                .custom(fred::cmd!("FUNCTION"), args)
                .await
                .map_err(failed)?;
        }
        self.functions.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `FCALL` of an application's function on the command connection.
    pub(super) async fn fcall(
        &self,
        function: &str,
        app: &str,
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        self.app_fcall_on(&self.client, function, app, args).await
    }

    /// `FCALL` of an application's function on `client` (its key declared, as a cluster needs).
    pub(super) async fn app_fcall_on(
        &self,
        client: &Client,
        function: &str,
        app: &str,
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        let key = cluster::base(self.cluster, app);
        self.fcall_on(client, function, Some(&key), args).await
    }

    /// `FCALL` on `client`, loading the library first if this Redis lost it (restarted without
    /// persistence, or a replica promoted before the library reached it).
    async fn fcall_on(
        &self,
        client: &Client,
        function: &str,
        key: Option<&str>,
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        self.commands_up()?;
        let call = |args: Vec<Value>| {
            let (cmd, full) = fcall_command(function, key, args);
            client.custom::<Value, _>(cmd, full)
        };
        let answer = match call(args.clone()).await {
            Err(e) if e.details().contains("Function not found") => {
                self.functions.store(false, Ordering::Relaxed);
                self.load_library().await?;
                call(args).await
            }
            other => other,
        };
        answer.map_err(|e| {
            if e.details().starts_with("READONLY") {
                self.demoted();
            }
            command_error(e)
        })
    }

    pub(super) async fn publish_durable(
        &self,
        app: &str,
        user: Option<&str>,
        envelope: Bytes,
    ) -> Result<(EventId, u64), BrokerError> {
        let args = vec![
            app.into(),
            user.unwrap_or("").into(),
            Value::Bytes(envelope),
        ];
        let client = self.durable.as_ref().unwrap_or(&self.client);
        let key = cluster::base(self.cluster, app);
        let answer = self
            .fcall_on(client, "sse_publish", Some(&key), args)
            .await?;
        let bad = || BrokerError::Command("unexpected answer from sse_publish".into());
        let Value::Array(items) = answer else {
            return Err(bad());
        };
        let id = items
            .first()
            .and_then(|v| v.as_string())
            .and_then(|s| s.parse::<EventId>().ok())
            .ok_or_else(bad)?;
        let receivers = items.get(1).and_then(|v| v.as_i64()).unwrap_or(0);
        let want = self.durability.min_replicas;
        if want > 0 {
            let wait_ms = self.durability.wait.as_millis().max(1) as u64;
            let args = vec![want.to_string(), wait_ms.to_string()];
            // `WAIT` counts the replicas of the node it runs on: routed by the same slot as the
            // publish, it runs where the publish ran.
            let wait = CustomCommand::new("WAIT", ClusterHash::Custom(cluster::slot(&key)), false);
            let acked: i64 = client.custom(wait, args).await.map_err(command_error)?;
            if acked < i64::from(want) {
                return Err(BrokerError::NotReplicated {
                    id,
                    replicas: acked.max(0) as u64,
                });
            }
        }
        Ok((id, receivers.max(0) as u64))
    }

    pub(super) async fn backlog(
        &self,
        app: &str,
        last_event_id: &str,
        users: &[String],
        page: usize,
    ) -> Result<Backlog, BrokerError> {
        let mut args: Vec<Value> = Vec::with_capacity(3 + users.len());
        args.extend([app.into(), last_event_id.into()]);
        if page > 0 {
            args.push(format!("#{page}").into());
        }
        args.extend(users.iter().map(|u| Value::from(u.as_str())));
        parse_backlog(self.fcall("sse_backlog", app, args).await?, users.len())
    }

    pub(super) async fn position(
        &self,
        app: &str,
        seen: Option<EventId>,
    ) -> Result<Position, BrokerError> {
        let mut args: Vec<Value> = vec![app.into()];
        args.extend(seen.map(|id| Value::from(id.to_string())));
        let bad = || BrokerError::Command("unexpected answer from sse_position".into());
        let Value::Array(items) = self.fcall("sse_position", app, args).await? else {
            return Err(bad());
        };
        let mut items = items.into_iter().filter_map(|v| v.into_string());
        let id: EventId = items.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok(match items.next().as_deref() {
            Some("new") => Position::Started(id),
            Some("rolled_back") => Position::RolledBack(id),
            _ => Position::Current(id),
        })
    }

    /// Publishes `payload` on `channel` from a function: it fails unless the library is loaded and
    /// the node takes writes.
    pub(super) async fn probe(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        // On a cluster the channel is the key: it routes the call to the shard being probed.
        let key = self.cluster.then_some(channel);
        self.fcall_on(
            &self.client,
            "sse_probe",
            key,
            vec![channel.into(), payload.into()],
        )
        .await
        .map(drop)
    }
}

/// Parses `sse_backlog`'s answer: `["ok", newest, [id, message, ...], <per user: [id, message,
/// ...] or "too_old">...]` or `["reset", newest, reason]`.
fn parse_backlog(value: Value, users: usize) -> Result<Backlog, BrokerError> {
    let bad = || BrokerError::Command("unexpected answer from sse_backlog".into());
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let mut items = items.into_iter();
    let status = items.next().and_then(|v| v.as_string()).ok_or_else(bad)?;
    let current = items
        .next()
        .and_then(|v| v.as_string())
        .and_then(|s| s.parse::<EventId>().ok());
    // `[id, message, id, message, ...]`; `None` for anything else (a user's "too_old").
    let entries = |v: Value| -> Option<Vec<(EventId, Bytes)>> {
        let Value::Array(flat) = v else {
            return None;
        };
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(id), Some(message)) = (flat.next(), flat.next()) {
            let id = id.as_string()?.parse().ok()?;
            out.push((id, message.into_bytes()?));
        }
        Some(out)
    };
    match status.as_str() {
        "ok" => {
            let broadcasts = items.next().and_then(entries).ok_or_else(bad)?;
            let per_user: Vec<_> = items.map(entries).collect();
            if per_user.len() != users {
                return Err(bad());
            }
            Ok(Backlog::Events {
                current,
                broadcasts,
                users: per_user,
            })
        }
        "reset" => {
            let reason = items.next().and_then(|v| v.as_string());
            Ok(Backlog::Reset {
                current,
                reason: ResetReason::from_name(reason.as_deref().unwrap_or_default()),
            })
        }
        _ => Err(bad()),
    }
}
