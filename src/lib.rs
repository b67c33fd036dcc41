//! sse-gateway: a multi-tenant, JWT-authenticated Server-Sent Events gateway over Redis.
//!
//! # Layout
//!
//! Protocol and I/O at the edges, a small core in the middle:
//!
//! - [`http`]: the accept loop, the lean HTTP/1.1 stream path and hyper, the route table, one
//!   handler module per route family, typed refusals mapped to JSON errors in one place, CORS, and
//!   the operator listener (edge).
//! - [`sse`]: the `text/event-stream` wire encoding of published payloads (edge).
//! - [`broker`]: the [`broker::Broker`] trait, with the Redis implementation (all fred use: the
//!   functions library, the subscriber, the probe per shard, the registry's keys, Redis Cluster's
//!   slots) and the embedded in-process one (edge).
//! - [`auth`]: token extraction and JWT verification into an identity (core).
//! - [`ids`]: what may name an application or a user (core).
//! - [`hub`]: which local streams belong to which app and user; subscription ref-counting,
//!   fan-out of encoded events, replay, the re-sync after a lost broker link, and the timers
//!   (ping, token expiry, registry heartbeat) beside the state they sweep (core).
//! - [`registry`]: the cluster-wide connection registry and its ordered writer (core).
//! - [`rate`]: request rates per token, user and application (token buckets; core).
//! - [`history`]: event ids and their epochs, replay merging and reset reasons (core).
//! - [`batch`]: items that arrive one at a time sent in batches by a few workers per key
//!   (admissions, history reads; core).
//! - [`config`], [`metrics`], [`logging`], [`shutdown`], [`fds`], [`sched`], [`clock`]: settings,
//!   Prometheus metrics, log output, signal handling and drain order, the open-file limit (and the
//!   descriptors kept free of streams), the fan-out writers' lower priority, the wall clock.
//!
//! [`run`] wires them together; `main.rs` only loads the configuration and starts a runtime.

#![deny(unsafe_code)]
// The module docs are a map for readers of the source, private modules included.
#![allow(rustdoc::private_intra_doc_links)]

pub mod auth;
pub mod batch;
pub mod broker;
pub mod clock;
pub mod config;
pub mod fds;
pub mod history;
pub mod http;
pub mod hub;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod rate;
pub mod registry;
pub mod sched;
pub mod shutdown;
pub mod sse;

/// What the fuzz targets in `fuzz/` drive (the request paths' pure parsers); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::fuzzing::*;
}

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{BrokerConfig, Config};
use crate::http::AppState;
use crate::hub::{Hub, HubConfig, OutboxLimits};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
    #[error("cannot start accepting connections: {0}")]
    Accept(#[from] std::io::Error),
}

/// The sockets the gateway serves, bound by the caller (`main` names a taken address itself).
pub struct Listeners {
    /// Streams, publishing, listing, `/health` and `/ready` (`APP_HOST`, `APP_PORT`), from
    /// [`http::server::listen`].
    pub public: http::server::PublicListener,
    /// `/metrics`, `/health` and `/ready` for operators (`OPERATOR_ADDR`); `None` when it is `off`.
    pub operator: Option<TcpListener>,
}

/// Runs the gateway on `listeners` until `shutdown` resolves, then drains gracefully.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Listeners {
        public: listener,
        operator,
    } = listeners;
    let metrics = Arc::new(Metrics::new());
    let broker: Arc<dyn Broker> = match &config.broker {
        BrokerConfig::Embedded => {
            tracing::warn!(
                "no REDIS_URL or REDIS_HOST set: running single-node on the embedded in-process broker \
                 (publish with POST /publish; nothing is shared with other instances)"
            );
            Arc::new(broker::embedded::EmbeddedBroker::new(config.retention))
        }
        BrokerConfig::Redis { url } => {
            tracing::info!(redis = %broker::redis::redact_url(url), "using Redis");
            Arc::new(broker::redis::RedisBroker::new(
                url,
                config.retention,
                config.max_message_bytes,
                config.durability,
                &config.instance_id,
                metrics.clone(),
                config.partitions,
            )?)
        }
    };
    let (registry, writer) = Registry::new(
        broker.clone(),
        &config.instance_id,
        config.registry_ttl,
        metrics.clone(),
    );
    let writer = tokio::spawn(writer.run());
    let hub = Arc::new(Hub::new(
        broker.clone(),
        registry,
        metrics.clone(),
        HubConfig {
            queue: OutboxLimits {
                events: config.client_queue,
                bytes: config.client_queue_bytes.max(config.max_message_bytes),
            },
            max_message_bytes: config.max_message_bytes,
            max_connections: fds::stream_cap(
                config.max_connections,
                fds::open_files_limit(),
                config.fd_reserve,
            ),
            registry_ttl_secs: config.registry_ttl.as_secs().max(1),
            hello: Bytes::from(format!("retry: {}\n\n", config.retry_ms)),
            broker_timeout: config.subscribe_timeout,
            partitions: config.partitions,
        },
    ));
    if let Err(error) = broker.start(hub.clone()).await {
        // Not fatal: the link keeps retrying, /ready says 503 meanwhile.
        tracing::error!(%error, "broker not reachable yet; retrying in the background");
    }

    let stop = CancellationToken::new();
    tokio::spawn(hub::timers::heartbeat(
        hub.clone(),
        broker.clone(),
        config.registry_heartbeat,
        stop.clone(),
    ));
    tokio::spawn(hub::timers::ping(
        hub.clone(),
        config.ping_interval,
        stop.clone(),
    ));
    tokio::spawn(hub::timers::expire_tokens(hub.clone(), stop.clone()));

    let state = Arc::new(AppState {
        verifier: auth::Verifier::new(&config),
        limiter: rate::Limiter::new(config.rates.clone()),
        hub: hub.clone(),
        broker: broker.clone(),
        metrics,
        config,
    });
    if let Some(operator) = operator {
        if let Ok(addr) = operator.local_addr() {
            tracing::info!(%addr, "operator listener: /metrics, /health and /ready");
        }
        tokio::spawn(http::operator::serve(operator, state.clone(), stop.clone()));
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, instance = %state.config.instance_id, app_name = %state.config.app_name,
            "ready to accept connections");
    }
    let serving = http::server::serve(listener, state.clone(), stop.clone())?;
    shutdown.await;
    stop.cancel();
    let Some(connections) = serving.stopped().await else {
        tracing::error!("the accept thread died");
        return Ok(());
    };
    shutdown::drain(
        &hub,
        connections,
        &broker,
        state.config.retry_ms,
        state.config.shutdown_timeout,
    )
    .await;
    writer.abort();
    Ok(())
}
