//! The hub's timers, beside the state they sweep: the keep-alive `ping`, the end of streams whose
//! token expired, and the registry heartbeat. One timer each for the whole process, not one per
//! stream.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::stream::close_reason;
use crate::broker::Broker;
use crate::sse::Event;
use crate::{clock, sse};

/// Sends the keep-alive `ping` to every stream: one timer for the whole process, not one per stream.
/// A write that fails because the peer vanished ends that stream.
pub async fn ping(hub: Arc<Hub>, every: Duration, stop: CancellationToken) {
    // Each stream is pinged once per interval, but the streams are spread over slots pinged one
    // after the other: writing tens of thousands of pings in one burst would stall everything
    // else (new connections above all) for that long.
    let slots = (every.as_millis() / 10).clamp(1, 30) as u64;
    let mut tick = tokio::time::interval(every / slots as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut slot = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                hub.push_to_slot(&sse::PING, slot, slots);
                slot = (slot + 1) % slots;
            }
            _ = stop.cancelled() => break,
        }
    }
}

/// Ends streams whose token expired: one timer for the process, checked every second.
pub async fn expire_tokens(hub: Arc<Hub>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let ended = hub.expire_tokens(clock::unix_secs());
                if ended > 0 {
                    tracing::debug!(ended, "streams ended at token expiry");
                }
            }
            _ = stop.cancelled() => break,
        }
    }
}

/// Rewrites every local entry each `interval`, and at once whenever the broker reconnects.
pub async fn heartbeat(
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut reconnects = Some(broker.reconnects());
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = next_change(&mut reconnects) => {
                if !changed {
                    reconnects = None;
                    continue;
                }
                tracing::info!("broker reconnected: rewriting registry entries");
            }
            _ = shutdown.cancelled() => break,
        }
        hub.refresh_registry();
    }
}

async fn next_change(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

impl Hub {
    /// Ends the streams whose token expired at or before `now` (seconds), each with a
    /// `token_expired` event: the client reconnects with a fresh token and resumes by id.
    pub fn expire_tokens(&self, now: u64) -> usize {
        let mut state = self.lock();
        let mut ended = 0;
        while let Some(entry) = state.expiries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let conn = entry.remove();
            let event = Event::json("token_expired", &json!({"exp": conn.exp})).encode();
            conn.finish(close_reason::TOKEN_EXPIRED, Some(event));
            ended += 1;
        }
        ended
    }

    /// Queues a registry touch of every local stream (the heartbeat): entries live on, and those
    /// Redis lost are written again.
    pub fn refresh_registry(&self) {
        let state = self.lock();
        for conn in state.apps.values().flat_map(|e| e.conns.values()) {
            self.registry.touch(conn);
        }
    }
}
