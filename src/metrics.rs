//! Prometheus metrics: every family the gateway exports, named `sse_*` and labelled by application only
//! (never by user or connection, whose label sets are unbounded).

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The broker links' health, as the metrics show it (the broker's `LinkState` is one).
pub trait LinkHealth {
    /// Each link by name, and whether it is up.
    fn links(&self) -> [(&'static str, bool); 4];
    /// Seconds since the end-to-end probe last came back, if it ever did.
    fn probe_age(&self) -> Option<f64>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppReasonLabel {
    pub app: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabel {
    pub link: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub app: String,
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<AppLabel, Gauge>,
    /// The original service's gauge: all open streams.
    pub active_clients: Gauge,
    pub connections_opened: Family<AppLabel, Counter>,
    pub connections_closed: Family<AppReasonLabel, Counter>,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub broker_messages: Family<KindLabel, Counter>,
    pub messages_dropped: Family<ReasonLabel, Counter>,
    /// The original's `sse_message_sent_total`, by application instead of by user.
    pub message_sent: Family<AppLabel, Counter>,
    /// The original's `sse_dropped_message_total`: messages a slow client lost when it was cut off.
    pub dropped_message: Family<AppLabel, Counter>,
    pub slow_clients: Family<AppLabel, Counter>,
    pub sanitised_fields: Counter,
    pub publish_requests: Family<OutcomeLabel, Counter>,
    /// Publish (Redis `TIME`, carried in the event id) to queued on this instance's streams, for
    /// durable events.
    pub delivery_latency: Family<AppLabel, Histogram, fn() -> Histogram>,
    pub replayed_events: Family<AppLabel, Counter>,
    pub replay_resets: Family<AppReasonLabel, Counter>,
    /// History reads made for resuming streams (one serves every stream resuming from an id).
    pub replay_reads: Counter,
    pub limit_rejections: Family<AppReasonLabel, Counter>,
    pub broker_link_up: Family<LinkLabel, Gauge>,
    pub broker_reconnects: Counter,
    pub registry_write_errors: Counter,
    /// Round trip of the end-to-end broker probe.
    pub probe_latency: Histogram,
    pub probe_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Re-syncs of open streams from history after the subscriber link was lost, and how long
    /// each took until every stream was back to live delivery.
    pub resyncs: Counter,
    pub resync_duration: Histogram,
    /// Histories started afresh (a new epoch), by reason: `new` (none existed: nothing published
    /// yet, or Redis lost its data) or `rolled_back` (Redis holds less than a gateway saw).
    pub history_epochs: Family<ReasonLabel, Counter>,
}

/// Buckets from 0.5 ms to about 8 s.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 15,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Family::default(),
            active_clients: Gauge::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            auth_failures: Family::default(),
            broker_messages: Family::default(),
            messages_dropped: Family::default(),
            message_sent: Family::default(),
            dropped_message: Family::default(),
            slow_clients: Family::default(),
            sanitised_fields: Counter::default(),
            publish_requests: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            replayed_events: Family::default(),
            replay_resets: Family::default(),
            replay_reads: Counter::default(),
            limit_rejections: Family::default(),
            broker_link_up: Family::default(),
            broker_reconnects: Counter::default(),
            registry_write_errors: Counter::default(),
            probe_latency: latency_histogram(),
            probe_age: Gauge::default(),
            resyncs: Counter::default(),
            resync_duration: latency_histogram(),
            history_epochs: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sse_connections", "Open SSE streams", m.connections.clone());
        registry.register(
            "sse_active_clients",
            "Open SSE streams, all applications (the original service's gauge)",
            m.active_clients.clone(),
        );
        registry.register(
            "sse_connections_opened",
            "SSE streams opened",
            m.connections_opened.clone(),
        );
        registry.register(
            "sse_connections_closed",
            "SSE streams closed, by reason",
            m.connections_closed.clone(),
        );
        registry.register(
            "sse_auth_failures",
            "Requests refused for a missing or invalid token, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "sse_broker_messages_received",
            "Messages received from the broker, by payload kind",
            m.broker_messages.clone(),
        );
        registry.register(
            "sse_messages_dropped",
            "Broker messages not delivered to anyone, by reason",
            m.messages_dropped.clone(),
        );
        registry.register(
            "sse_message_sent",
            "Events queued to SSE streams (one per stream per message)",
            m.message_sent.clone(),
        );
        registry.register(
            "sse_dropped_message",
            "Events lost by streams cut off for being too slow",
            m.dropped_message.clone(),
        );
        registry.register(
            "sse_slow_clients_disconnected",
            "Streams cut off because their outgoing queue was full",
            m.slow_clients.clone(),
        );
        registry.register(
            "sse_sanitised_fields",
            "Published id/type fields stripped of control characters or cut to length",
            m.sanitised_fields.clone(),
        );
        registry.register(
            "sse_publish_requests",
            "POST /publish requests, by outcome",
            m.publish_requests.clone(),
        );
        registry.register(
            "sse_delivery_latency_seconds",
            "Time from publish (the durable event id's timestamp) to queued on the streams",
            m.delivery_latency.clone(),
        );
        registry.register(
            "sse_replayed_events",
            "Events sent from history to streams resuming after a disconnect",
            m.replayed_events.clone(),
        );
        registry.register(
            "sse_replay_resets",
            "Resuming streams told that their gap cannot be filled, by reason",
            m.replay_resets.clone(),
        );
        registry.register(
            "sse_replay_reads",
            "History reads for resuming streams (streams resuming from the same id share one)",
            m.replay_reads.clone(),
        );
        registry.register(
            "sse_limit_rejections",
            "Streams refused or shed by a connection limit, by limit",
            m.limit_rejections.clone(),
        );
        registry.register(
            "sse_broker_link_up",
            "Whether the broker link is up (1) or down (0)",
            m.broker_link_up.clone(),
        );
        registry.register(
            "sse_broker_reconnects",
            "Times a broker link was re-established",
            m.broker_reconnects.clone(),
        );
        registry.register(
            "sse_registry_write_errors",
            "Registry write batches that failed (retried by the heartbeat)",
            m.registry_write_errors.clone(),
        );
        registry.register(
            "sse_broker_probe_latency_seconds",
            "Round trip of the end-to-end probe: published through the broker, received back",
            m.probe_latency.clone(),
        );
        registry.register(
            "sse_broker_probe_age_seconds",
            "Seconds since the end-to-end probe last came back (readiness fails past 3 s)",
            m.probe_age.clone(),
        );
        registry.register(
            "sse_resyncs",
            "Re-syncs of the open streams from history after the subscriber link was lost",
            m.resyncs.clone(),
        );
        registry.register(
            "sse_resync_duration_seconds",
            "From the subscriptions being live again to every open stream caught up",
            m.resync_duration.clone(),
        );
        registry.register(
            "sse_history_epochs_started",
            "Histories started afresh, by reason (new, rolled_back)",
            m.history_epochs.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The label of an application, or of one of its histories (`shop#3` counts as `shop`).
    pub fn app(app: &str) -> AppLabel {
        AppLabel {
            app: crate::history::tenant(app).to_string(),
        }
    }

    /// Renders the OpenMetrics text exposition, with the broker link state read at scrape time.
    pub fn render(&self, link: impl LinkHealth) -> String {
        for (name, up) in link.links() {
            self.broker_link_up
                .get_or_create(&LinkLabel { link: name })
                .set(i64::from(up));
        }
        self.probe_age.set(link.probe_age().unwrap_or(-1.0));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Content type of [`Metrics::render`]'s OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`prometheus_text`].
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same exposition in the Prometheus text format 0.0.4, for clients that ask for `text/plain`
/// (promtool, older scrapers). Read as 0.0.4, OpenMetrics text is subtly wrong: a counter's HELP
/// and TYPE name the family (`x`) while its samples are `x_total`, so promtool reports counters
/// without help. Here they name the samples, and what 0.0.4 lacks (`# EOF`, `# UNIT`, a counter's
/// `_created` samples) is left out.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
            }
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let created = name
                    .strip_suffix("_created")
                    .is_some_and(|family| counters.contains(family));
                if !created {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}
