//! What the registry stores and the broker answers about admission: a connection's record, a
//! change to the registry, and a request for a place under the caps.

use std::sync::Arc;

use serde::Serialize;

/// One live connection as the registry stores it. Serialises to the original service's JSON shape
/// (`id`, `created_at`, `remote_addr`, `application.id`, `user.id`) plus the fields it lacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionRecord {
    pub id: String,
    pub created_at: u64,
    pub remote_addr: String,
    pub application: IdRef,
    pub user: IdRef,
    pub instance: String,
    pub user_agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdRef {
    pub id: String,
}

/// A change to the registry. Applied in order; a batch is pipelined.
#[derive(Debug, Clone)]
pub enum RegistryOp {
    /// Write (or rewrite) the entry and push its expiry `ttl` seconds into the future.
    Put(Arc<ConnectionRecord>),
    /// Push the entry's expiry `ttl` seconds into the future (the heartbeat), if it still exists.
    Touch {
        app: String,
        user: String,
        id: String,
    },
    /// Delete the entry.
    Remove {
        app: String,
        user: String,
        id: String,
    },
}

/// A new stream asking for a place under the cluster-wide caps (0: no cap). Admitted, its
/// registry entry is written in the same step: the entry is the reservation.
#[derive(Debug, Clone)]
pub struct Admission {
    pub record: ConnectionRecord,
    pub max_app: u64,
    pub max_user: u64,
    /// How long the entry lives unless the registry keeps it alive.
    pub ttl_secs: u64,
}

/// The broker's answer to an [`Admission`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// A place is reserved: the registry entry exists until it is removed or expires.
    Yes,
    /// The user already has this many live streams, at least the cap.
    UserFull(u64),
    /// The application already has this many live streams, at least the cap.
    AppFull(u64),
}
