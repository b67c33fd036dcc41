//! The subscriber link: what this instance is subscribed to, messages handed to the hub, the
//! re-sync after the link is lost, and the rounds of the end-to-end probe (its state is in
//! [`super::probe`]) that prove delivery works.
//!
//! Subscribe and unsubscribe requests go through one task, so they reach Redis in the order the hub
//! made them and concurrent requests are batched into one command; that task also restores every
//! wanted subscription after a reconnect (fred's own `manage_subscriptions` is not used: it raced
//! the first subscribe on a fresh link). Before it does, the hub is told to hold live delivery, and
//! once the subscriptions are live again, to catch every stream up from history.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, ClusterInterface, PubsubInterface};
use fred::types::Value;
use fred::types::config::Options;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::probe::Probe;
use super::{cluster, unavailable};
use crate::broker::{BrokerError, MessageSink};
use crate::metrics::{Metrics, ReasonLabel};

/// Largest number of subscription requests folded into one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 1024;
/// Most messages handed to the hub at once.
const DELIVER_BATCH: usize = 256;
/// A failed re-subscription on a link that is still up is tried again after this long.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(500);
/// A channel nobody wants any more stays subscribed this long before it is unsubscribed: a client
/// that comes back within it (EventSource retries after 3 s by default, and a deploy or a network
/// blip reconnects every stream at once) finds its channels live, and joins without a SUBSCRIBE
/// round trip, while Redis is spared an UNSUBSCRIBE and a SUBSCRIBE per stream. Messages on a
/// lingering channel reach no stream; a resuming client reads them from history.
const UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(5);

/// Channels unwanted but still subscribed, until their grace ends (in that order: the grace is
/// the same for all).
#[derive(Default)]
struct Lingering {
    until: HashMap<String, Instant>,
    queue: VecDeque<(Instant, String)>,
}

impl Lingering {
    fn add(&mut self, channel: String, now: Instant) {
        let until = now + UNSUBSCRIBE_GRACE;
        self.until.insert(channel.clone(), until);
        self.queue.push_back((until, channel));
    }

    /// Wanted again: still subscribed, so nothing to send.
    fn revive(&mut self, channel: &str) -> bool {
        self.until.remove(channel).is_some()
    }

    fn next_end(&self) -> Option<Instant> {
        self.queue.front().map(|(until, _)| *until)
    }

    /// The channels whose grace is over at `now`.
    fn ended(&mut self, now: Instant) -> Vec<String> {
        let mut ended = Vec::new();
        while let Some((until, _)) = self.queue.front()
            && *until <= now
        {
            let Some((until, channel)) = self.queue.pop_front() else {
                break;
            };
            // Only if it was not revived (and let go again, with a later end) meanwhile.
            if self.until.get(&channel) == Some(&until) {
                self.until.remove(&channel);
                ended.push(channel);
            }
        }
        if self.until.is_empty() {
            *self = Lingering::default(); // give back what a storm of departures took
        }
        ended
    }
}

pub enum SubRequest {
    Subscribe(Vec<String>, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Vec<String>),
    /// The subscriber link (re)connected: subscribe every wanted channel again.
    Resubscribe,
}

/// Hands received messages to the hub, batched; probe answers are taken out on the way.
pub async fn pump_messages(
    mut rx: broadcast::Receiver<fred::types::Message>,
    sink: Arc<dyn MessageSink>,
    metrics: Arc<Metrics>,
    probe: Arc<Probe>,
) {
    let lagged = |n: u64| {
        metrics
            .messages_dropped
            .get_or_create(&ReasonLabel { reason: "lagged" })
            .inc_by(n);
        tracing::error!(
            lost = n,
            "messages lost: the hub fell behind the Redis subscriber"
        );
    };
    let mut batch = Vec::with_capacity(DELIVER_BATCH);
    loop {
        match rx.recv().await {
            Ok(msg) => batch.push(msg),
            Err(broadcast::error::RecvError::Lagged(n)) => lagged(n),
            Err(broadcast::error::RecvError::Closed) => break,
        }
        // Whatever else has arrived goes along, without waiting for more.
        while batch.len() < DELIVER_BATCH {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                Err(_) => break,
            }
        }
        let mut messages: Vec<(&str, &[u8])> = Vec::with_capacity(batch.len());
        for m in &batch {
            let payload = m.value.as_bytes().unwrap_or_default();
            if probe.owns(&m.channel) {
                if let Some(rtt) = probe.received(&m.channel, payload) {
                    metrics.probe_latency.observe(rtt.as_secs_f64());
                }
            } else {
                messages.push((&m.channel, payload));
            }
        }
        if !messages.is_empty() {
            sink.deliver(&messages);
        }
        drop(messages);
        batch.clear();
    }
}

/// How often the probe goes round.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// After a re-subscription asked for by a silent shard, the next one waits at least this long.
const HEAL_EVERY: Duration = Duration::from_secs(5);

/// Sends a probe to every shard each [`PROBE_EVERY`], until the broker stops. `shards` names the
/// current probe channels (they follow the cluster's topology); `send` publishes one probe. A
/// shard that stays silent while its publishes succeed gets every subscription restored (with
/// the re-sync that comes with it), at most once per [`HEAL_EVERY`].
pub async fn run_probe<S, F, Fut>(
    probe: Arc<Probe>,
    requests: mpsc::UnboundedSender<SubRequest>,
    stop: watch::Receiver<bool>,
    shards: S,
    send: F,
) where
    S: Fn() -> Vec<String>,
    F: Fn(String, String) -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut failing = false;
    let mut healed = Instant::now();
    while !*stop.borrow() {
        tick.tick().await;
        let (added, removed) = probe.reshard(&shards());
        if !removed.is_empty() {
            let _ = requests.send(SubRequest::Unsubscribe(removed));
        }
        if !added.is_empty() {
            let (tx, rx) = oneshot::channel();
            let _ = requests.send(SubRequest::Subscribe(added, tx));
            let _ = tokio::time::timeout(PROBE_EVERY, rx).await;
        }
        let channels = probe.channels();
        n += 1;
        let mut result = Ok(());
        for channel in channels {
            probe.sent(&channel, n);
            if let Err(e) = send(channel, n.to_string()).await {
                result = Err(e);
            }
        }
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("broker probe succeeds again");
            }
            Ok(()) => {
                if probe.silent_shard() && healed.elapsed() > HEAL_EVERY {
                    healed = Instant::now();
                    tracing::warn!(
                        "a shard's probe publishes succeed but never arrive: restoring every subscription"
                    );
                    let _ = requests.send(SubRequest::Resubscribe);
                }
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "broker probe failed: not ready until it succeeds");
            }
            Err(_) => {}
        }
    }
}

pub async fn watch_reconnects(
    mut rx: broadcast::Receiver<fred::types::config::Server>,
    notify: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    link: &'static str,
    resubscribe: Option<mpsc::UnboundedSender<SubRequest>>,
) {
    let mut first = true;
    loop {
        match rx.recv().await {
            Ok(server) => {
                if first {
                    tracing::info!(%server, link, "connected to Redis");
                    first = false;
                } else {
                    metrics.broker_reconnects.inc();
                    tracing::info!(%server, link, "reconnected to Redis");
                }
                notify.send_modify(|n| *n += 1);
                if let Some(tx) = &resubscribe {
                    let _ = tx.send(SubRequest::Resubscribe);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Logs a link's errors; on the subscriber link, an error also voids the probe (messages may have
/// been lost), so that readiness waits for a probe over the restored link.
pub async fn log_errors(
    mut rx: broadcast::Receiver<(FredError, Option<fred::types::config::Server>)>,
    link: &'static str,
    configured: String,
    probe: Option<Arc<Probe>>,
) {
    loop {
        match rx.recv().await {
            Ok((error, server)) => {
                if let Some(probe) = &probe {
                    probe.forget();
                }
                // fred names no server for a connection that never got up: name the configured one.
                let server = server.map_or_else(|| configured.clone(), |s| s.to_string());
                tracing::warn!(%error, %server, link, hint = "is REDIS_URL right?", "Redis connection error");
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// The one place SUBSCRIBE and UNSUBSCRIBE are sent from. Requests that queued up while a command
/// was in flight are folded into one batch; within a batch a later request wins, so an
/// unsubscribe followed by a subscribe of the same channel leaves it subscribed. `wanted` is the
/// truth about what this instance wants; `unconfirmed` the part of it Redis has not confirmed on
/// the current connection (usually empty: a second set of every channel name would cost each idle
/// stream 80 bytes). After a reconnect all of `wanted` is subscribed again, between the sink's
/// suspend and resume.
pub async fn manage_subscriptions(
    subscriber: SubscriberClient,
    cluster: bool,
    requests: mpsc::UnboundedSender<SubRequest>,
    mut incoming: mpsc::UnboundedReceiver<SubRequest>,
    sink: Arc<dyn MessageSink>,
    probe: Arc<Probe>,
) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut unconfirmed: HashSet<String> = HashSet::new();
    let mut lingering = Lingering::default();
    // A re-sync is owed to the sink once the subscriptions are all live again.
    let mut suspended = false;
    // Before the first connection nothing was subscribed, so nothing can have been missed.
    let mut first_connection = true;
    loop {
        let first = match lingering.next_end() {
            None => incoming.recv().await,
            Some(end) => tokio::select! {
                r = incoming.recv() => r,
                _ = tokio::time::sleep_until(end.into()) => {
                    let ended: HashSet<String> = lingering.ended(Instant::now()).into_iter().collect();
                    if !ended.is_empty()
                        && let Err(error) =
                            unsubscribe(&subscriber, cluster, &ended, &wanted, &lingering).await
                    {
                        // Harmless: messages for nobody are dropped by the hub; a reconnect
                        // clears them.
                        tracing::warn!(%error, "UNSUBSCRIBE failed");
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < SUBSCRIBE_BATCH {
            match incoming.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut to_sub: Vec<String> = Vec::new();
        let mut pending: HashSet<String> = HashSet::new();
        let mut waiters = Vec::new();
        let mut resubscribe = false;
        let now = Instant::now();
        for request in batch {
            match request {
                SubRequest::Subscribe(channels, tx) => {
                    for ch in &channels {
                        let live = lingering.revive(ch);
                        if wanted.insert(ch.clone()) && !live {
                            unconfirmed.insert(ch.clone());
                        }
                        if unconfirmed.contains(ch) && pending.insert(ch.clone()) {
                            to_sub.push(ch.clone());
                        }
                    }
                    waiters.push((channels, tx));
                }
                SubRequest::Unsubscribe(channels) => {
                    for ch in channels {
                        if !wanted.remove(&ch) {
                            continue;
                        }
                        if pending.remove(&ch) {
                            to_sub.retain(|c| c != &ch);
                        }
                        // Only a confirmed channel is subscribed on this connection.
                        if !unconfirmed.remove(&ch) {
                            lingering.add(ch, now);
                        }
                    }
                }
                SubRequest::Resubscribe => resubscribe = true,
            }
        }
        if resubscribe {
            // A fresh connection has no subscriptions: hold delivery, then subscribe everything.
            if !suspended && !first_connection {
                probe.forget();
                sink.suspend();
                suspended = true;
            }
            first_connection = false;
            unconfirmed = wanted.clone();
            lingering = Lingering::default();
            to_sub = wanted.iter().cloned().collect();
            if !to_sub.is_empty() {
                tracing::info!(channels = to_sub.len(), "restoring subscriptions");
            }
        }
        let (sent, outcome) = if cluster {
            ssubscribe(&subscriber, &to_sub).await
        } else {
            subscribe(&subscriber, &to_sub).await
        };
        if !sent.is_empty() {
            for ch in &sent {
                unconfirmed.remove(ch);
            }
            if unconfirmed.is_empty() {
                unconfirmed = HashSet::new(); // give back what a re-subscription took
            }
        }
        for (channels, tx) in waiters {
            let live = |c: &String| wanted.contains(c) && !unconfirmed.contains(c);
            let result = if channels.iter().all(live) {
                Ok(())
            } else {
                Err(outcome
                    .clone()
                    .err()
                    .unwrap_or_else(|| BrokerError::Unavailable("subscription withdrawn".into())))
            };
            let _ = tx.send(result);
        }
        if suspended {
            if unconfirmed.is_empty() {
                suspended = false;
                sink.clone().resume();
            } else if subscriber.is_connected() {
                // The link is up but Redis refused: try again (a dropped link sends its own).
                let requests = requests.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESUBSCRIBE_RETRY).await;
                    let _ = requests.send(SubRequest::Resubscribe);
                });
            }
        }
    }
}

/// SUBSCRIBE in batches, confirmed: returns the channels confirmed and whether all went through.
/// fred's subscribe returns once SUBSCRIBE is written, not when Redis has run it. Redis runs a
/// connection's commands in order, so the answer to a PING on the same connection proves the
/// subscriptions are live: only then may a stream be told it is connected.
async fn subscribe(
    subscriber: &SubscriberClient,
    channels: &[String],
) -> (Vec<String>, Result<(), BrokerError>) {
    let mut outcome = Ok(());
    let mut sent = Vec::new();
    for chunk in channels.chunks(SUBSCRIBE_BATCH) {
        match subscriber.subscribe(chunk.to_vec()).await {
            Ok(()) => sent.extend(chunk.iter().cloned()),
            Err(error) => {
                tracing::warn!(%error, channels = chunk.len(), "SUBSCRIBE failed");
                outcome = Err(unavailable(error));
            }
        }
    }
    if !sent.is_empty()
        && let Err(error) = subscriber.ping::<Value>(None).await
    {
        tracing::warn!(%error, "subscriber did not confirm SUBSCRIBE");
        outcome = Err(unavailable(error));
        sent.clear();
    }
    (sent, outcome)
}

/// The cluster form of [`subscribe`]: each gateway channel as its shard channel, with SSUBSCRIBE
/// on the node holding its slot, and as itself with SUBSCRIBE (for backends that `PUBLISH` to
/// it); confirmed by a PING on every node written to. Returns the wanted (gateway) channels sent.
async fn ssubscribe(
    subscriber: &SubscriberClient,
    channels: &[String],
) -> (Vec<String>, Result<(), BrokerError>) {
    let plan = cluster::plan(channels);
    let (_, mut outcome) = subscribe(subscriber, &plan.plain).await;
    let mut nodes = BTreeSet::new();
    let state = subscriber.cached_cluster_state();
    for (slot, group) in &plan.sharded {
        for chunk in group.chunks(SUBSCRIBE_BATCH) {
            if let Err(error) = subscriber.ssubscribe(chunk.to_vec()).await {
                tracing::warn!(%error, channels = chunk.len(), "SSUBSCRIBE failed");
                outcome = Err(unavailable(error));
            }
        }
        nodes.extend(state.as_ref().and_then(|s| s.get_server(*slot)).cloned());
    }
    for node in nodes {
        let pin = Options {
            cluster_node: Some(node),
            ..Default::default()
        };
        let pinged = subscriber.with_options(&pin).ping::<Value>(None).await;
        if let Err(error) = pinged {
            tracing::warn!(%error, "subscriber did not confirm SSUBSCRIBE");
            outcome = Err(unavailable(error));
        }
    }
    match outcome {
        Ok(()) => (channels.to_vec(), Ok(())),
        Err(e) => (Vec::new(), Err(e)),
    }
}

async fn unsubscribe(
    subscriber: &SubscriberClient,
    cluster: bool,
    channels: &HashSet<String>,
    wanted: &HashSet<String>,
    lingering: &Lingering,
) -> Result<(), FredError> {
    if !cluster {
        return subscriber
            .unsubscribe(channels.iter().cloned().collect::<Vec<_>>())
            .await;
    }
    let mut plan = cluster::plan(channels);
    if channels.iter().any(|c| cluster::plain_name(c).is_some()) {
        // A lingering partition channel still needs its plain name: it may be wanted again.
        let still = cluster::plain_names_wanted(wanted.iter().chain(lingering.until.keys()));
        plan.plain.retain(|plain| !still.contains(plain));
    }
    subscriber.unsubscribe(plan.plain).await?;
    for group in plan.sharded.into_values() {
        subscriber.sunsubscribe(group).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_ends_its_grace_unless_wanted_again_meanwhile() {
        let t0 = Instant::now();
        let mut l = Lingering::default();
        l.add("a".into(), t0);
        l.add("b".into(), t0 + Duration::from_secs(1));
        assert_eq!(l.next_end(), Some(t0 + UNSUBSCRIBE_GRACE));
        assert!(
            l.ended(t0 + UNSUBSCRIBE_GRACE - Duration::from_millis(1))
                .is_empty()
        );
        // "a" is wanted again, then let go again later: its first grace no longer counts.
        assert!(l.revive("a"));
        assert!(!l.revive("a"));
        l.add("a".into(), t0 + Duration::from_secs(2));
        assert!(l.ended(t0 + UNSUBSCRIBE_GRACE).is_empty());
        assert_eq!(
            l.ended(t0 + UNSUBSCRIBE_GRACE + Duration::from_secs(1)),
            vec!["b".to_string()]
        );
        assert_eq!(
            l.ended(t0 + UNSUBSCRIBE_GRACE + Duration::from_secs(2)),
            vec!["a".to_string()]
        );
        assert_eq!(l.next_end(), None);
        assert!(l.until.is_empty() && l.queue.capacity() == 0);
    }
}
