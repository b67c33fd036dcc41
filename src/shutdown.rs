//! Graceful shutdown: the signal that starts it and the order in which the gateway drains.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::http::server::Connections;
use crate::hub::Hub;
use crate::sse;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Stops the streams, drains connections within `timeout`, removes this instance's registry
/// entries and closes the broker. The listener must already be closed.
pub async fn drain(
    hub: &Arc<Hub>,
    connections: Connections,
    broker: &Arc<dyn Broker>,
    retry_ms: u64,
    timeout: Duration,
) {
    let streams = hub.streams();
    tracing::info!(
        streams,
        "shutting down: telling every stream to reconnect elsewhere"
    );
    hub.close_all(|conn| sse::farewell(retry_ms, conn.id.as_u128()));
    let Connections { graceful, tasks } = connections;
    let drained = async {
        graceful.shutdown().await;
        tasks.wait().await;
    };
    if tokio::time::timeout(timeout, drained).await.is_err() {
        tracing::warn!(
            ?timeout,
            remaining = hub.streams(),
            "drain timed out; closing the rest"
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), hub.clear_registry())
        .await
        .is_err()
    {
        tracing::warn!("registry cleanup timed out; entries will expire by themselves");
    }
    broker.stop().await;
    tracing::info!("shutdown complete");
}
