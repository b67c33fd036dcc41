//! The one JSON summary a run prints, and merging the summaries of a split run into one.
//!
//! Latency histograms travel inside the JSON (HdrHistogram V2 encoding, base64) so that merged
//! percentiles are exact rather than averages of percentiles.

use std::collections::BTreeMap;

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::procfs::{Machine, Sample};

/// Highest latency recorded, in microseconds (one hour); larger values are clamped.
pub const MAX_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // Three significant digits over 1 µs .. 1 h; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

/// Percentiles of a latency histogram, in microseconds, with the histogram itself for merging.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// HdrHistogram V2, base64.
    pub hdr: String,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let mut bytes = Vec::new();
        let hdr = match V2Serializer::new().serialize(h, &mut bytes) {
            Ok(_) => base64::engine::general_purpose::STANDARD.encode(&bytes),
            Err(_) => String::new(),
        };
        Latency {
            count: h.len(),
            min_us: h.min(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            hdr,
        }
    }

    pub fn histogram(&self) -> Result<Histogram<u64>, String> {
        if self.hdr.is_empty() {
            return Ok(new_histogram());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.hdr)
            .map_err(|e| format!("histogram base64: {e}"))?;
        Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("histogram: {e:?}"))
    }

    pub fn merge(items: &[&Latency]) -> Result<Latency, String> {
        let mut total = new_histogram();
        for l in items {
            total
                .add(l.histogram()?)
                .map_err(|e| format!("histogram add: {e:?}"))?;
        }
        Ok(Latency::from_histogram(&total))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub tool: ToolInfo,
    pub machine: Machine,
    pub target: TargetInfo,
    pub connections: Connections,
    pub waves: Vec<Wave>,
    pub publish: Option<PublishSummary>,
    pub deliveries: Deliveries,
    pub server: Option<ServerSummary>,
    pub tool_cpu: ToolCpu,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: String,
    pub label: String,
    /// `i/n`, or `merged` for a merge of several summaries.
    pub shard: String,
    pub processes: u32,
    pub threads: usize,
    pub started_unix_ms: u64,
    pub wall_secs: f64,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetInfo {
    pub url: String,
    pub token_in: String,
    pub users: u32,
    pub apps: u32,
    pub connections_total: u64,
    pub source_ips: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    pub requested: u64,
    /// Reached the first byte of the stream body (authenticated and subscribed).
    pub ok: u64,
    pub failed: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Streams that ended or broke while the tool still wanted them (any phase).
    pub dropped: u64,
    pub dropped_by_reason: BTreeMap<String, u64>,
    pub open_at_end: u64,
    pub rate_requested: f64,
    /// `ok` divided by the time from the first connect to the last stream established.
    pub rate_achieved: f64,
    pub phase_secs: f64,
    /// From the start of the TCP connect to the first byte of the stream body.
    pub latency: Latency,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

/// A reconnect wave: every connection closes and comes back at once (or at `rate_requested`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Wave {
    pub wave: u32,
    pub ok: u64,
    pub failed: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    pub rate_requested: f64,
    /// From the signal to reconnect to the last stream re-established.
    pub secs_to_all: f64,
    pub rate_achieved: f64,
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishSummary {
    pub mode: String,
    pub pattern: String,
    pub requested: u64,
    /// Publish operations written (one per channel: a broadcast to 3 apps is 3).
    pub sent: u64,
    pub acknowledged: u64,
    pub errors: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub rate_requested: f64,
    pub rate_achieved: f64,
    pub secs: f64,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub data_bytes: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Deliveries {
    /// Messages sent to the channels of the streams open when publishing began.
    pub expected: u64,
    /// Distinct expected messages that arrived.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Sequence numbers that were never sent to that stream's channels.
    pub unexpected: u64,
    pub pings: u64,
    pub comments: u64,
    pub other_events: u64,
    /// `received` per second, from the first publish to the last delivery.
    pub throughput_per_sec: f64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
    /// Whether every expected message arrived before the drain deadline.
    pub complete: bool,
    /// Publish timestamp (in the payload) to parse of the event, wall clock.
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerSummary {
    pub pids: Vec<u32>,
    pub before: Option<Sample>,
    /// After the connect phase and the hold (pings on, streams idle).
    pub after_connect: Option<Sample>,
    pub after_waves: Option<Sample>,
    /// When the publishing began (the waves may still be running, with `--publish-during-waves`).
    pub publish_start: Option<Sample>,
    pub after_publish: Option<Sample>,
    /// RSS growth per established stream, bytes.
    pub rss_per_conn_bytes: Option<f64>,
    /// The same after the reconnect waves (churn).
    pub rss_per_conn_bytes_after_waves: Option<f64>,
    pub cpu_secs_connect: Option<f64>,
    pub cpu_secs_waves: Option<f64>,
    /// From the first publish to the end of the drain.
    pub cpu_secs_publish: Option<f64>,
    pub cpu_secs_per_million_deliveries: Option<f64>,
    pub deliveries_per_cpu_sec: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolCpu {
    pub user_secs: f64,
    pub sys_secs: f64,
    pub connect_phase_secs: f64,
    pub publish_phase_secs: f64,
    /// Tool CPU seconds per wall second while publishing; near the thread count means saturated.
    pub publish_phase_util: f64,
    /// The tool's own RSS before connecting and with every stream open: its memory per stream.
    pub rss_kib_start: u64,
    pub rss_kib_connected: u64,
}

/// Ratio helpers that never divide by zero.
pub fn per(n: f64, d: f64) -> Option<f64> {
    (d > 0.0).then(|| n / d)
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Fills the server's derived figures from its samples.
pub fn derive_server(s: &mut ServerSummary, streams: u64, deliveries: u64) {
    let growth = |a: Option<Sample>, b: Option<Sample>| match (a, b) {
        (Some(a), Some(b)) => per(
            (b.rss_kib as f64 - a.rss_kib as f64) * 1024.0,
            streams as f64,
        )
        .map(|x| round(x, 1)),
        _ => None,
    };
    let cpu = |a: Option<Sample>, b: Option<Sample>| match (a, b) {
        (Some(a), Some(b)) => Some(round(b.cpu_secs - a.cpu_secs, 3)),
        _ => None,
    };
    s.rss_per_conn_bytes = growth(s.before, s.after_connect);
    s.rss_per_conn_bytes_after_waves = growth(s.before, s.after_waves);
    s.cpu_secs_connect = cpu(s.before, s.after_connect);
    s.cpu_secs_waves = cpu(s.after_connect, s.after_waves);
    let start = s.publish_start.or(s.after_waves).or(s.after_connect);
    s.cpu_secs_publish = cpu(start, s.after_publish);
    if let Some(c) = s.cpu_secs_publish.filter(|_| deliveries > 0) {
        s.cpu_secs_per_million_deliveries = per(c * 1e6, deliveries as f64).map(|x| round(x, 3));
        s.deliveries_per_cpu_sec = per(deliveries as f64, c).map(|x| round(x, 0));
    }
}

/// The earliest (smallest RSS) or latest (largest RSS) sample of one server among processes.
fn pick(
    group: &[&ServerSummary],
    f: fn(&ServerSummary) -> Option<Sample>,
    latest: bool,
) -> Option<Sample> {
    group.iter().filter_map(|s| f(s)).reduce(|a, b| {
        if (b.rss_kib > a.rss_kib) == latest {
            b
        } else {
            a
        }
    })
}

fn add_samples(a: Option<Sample>, b: Option<Sample>) -> Option<Sample> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(Sample {
            rss_kib: a.rss_kib + b.rss_kib,
            cpu_secs: a.cpu_secs + b.cpu_secs,
        }),
    }
}

fn add_reasons(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Merges the summaries of the processes of one split run (same scenario, started together).
///
/// Counts add up and histograms merge exactly. Server samples are taken by every process: the
/// earliest `before` (smallest RSS) and the latest samples (largest RSS) are kept per phase, and
/// per-stream RSS is recomputed over all processes' streams. Server CPU for the publish phase
/// comes from the process that published.
pub fn merge(parts: &[Summary]) -> Result<Summary, String> {
    let first = parts.first().ok_or("nothing to merge")?;
    let mut out = Summary {
        machine: first.machine.clone(),
        target: first.target.clone(),
        ..Summary::default()
    };
    out.tool = ToolInfo {
        name: first.tool.name.clone(),
        version: first.tool.version.clone(),
        label: first.tool.label.clone(),
        shard: "merged".into(),
        processes: parts.iter().map(|p| p.tool.processes.max(1)).sum(),
        threads: parts.iter().map(|p| p.tool.threads).sum(),
        started_unix_ms: parts
            .iter()
            .map(|p| p.tool.started_unix_ms)
            .min()
            .unwrap_or(0),
        wall_secs: parts.iter().map(|p| p.tool.wall_secs).fold(0.0, f64::max),
        args: Vec::new(),
    };

    let c = &mut out.connections;
    for p in parts {
        let pc = &p.connections;
        c.requested += pc.requested;
        c.ok += pc.ok;
        c.failed += pc.failed;
        c.dropped += pc.dropped;
        c.open_at_end += pc.open_at_end;
        add_reasons(&mut c.failed_by_reason, &pc.failed_by_reason);
        add_reasons(&mut c.dropped_by_reason, &pc.dropped_by_reason);
        c.rate_requested += pc.rate_requested;
        c.phase_secs = c.phase_secs.max(pc.phase_secs);
        c.nofile_soft = pc.nofile_soft;
        c.nofile_hard = pc.nofile_hard;
    }
    c.rate_achieved = per(c.ok as f64, c.phase_secs).map_or(0.0, |r| round(r, 1));
    c.latency = Latency::merge(
        &parts
            .iter()
            .map(|p| &p.connections.latency)
            .collect::<Vec<_>>(),
    )?;

    let waves = parts.iter().map(|p| p.waves.len()).max().unwrap_or(0);
    for w in 0..waves {
        let items: Vec<&Wave> = parts.iter().filter_map(|p| p.waves.get(w)).collect();
        let mut m = Wave {
            wave: w as u32 + 1,
            ..Wave::default()
        };
        for i in &items {
            m.ok += i.ok;
            m.failed += i.failed;
            add_reasons(&mut m.failed_by_reason, &i.failed_by_reason);
            m.rate_requested += i.rate_requested;
            m.secs_to_all = m.secs_to_all.max(i.secs_to_all);
        }
        m.rate_achieved = per(m.ok as f64, m.secs_to_all).map_or(0.0, |r| round(r, 1));
        m.latency = Latency::merge(&items.iter().map(|i| &i.latency).collect::<Vec<_>>())?;
        out.waves.push(m);
    }

    let publishers: Vec<&PublishSummary> =
        parts.iter().filter_map(|p| p.publish.as_ref()).collect();
    if let Some(p0) = publishers.first() {
        let mut m = (*p0).clone();
        for p in &publishers[1..] {
            m.requested += p.requested;
            m.sent += p.sent;
            m.acknowledged += p.acknowledged;
            m.errors += p.errors;
            add_reasons(&mut m.errors_by_reason, &p.errors_by_reason);
            m.rate_requested += p.rate_requested;
            m.rate_achieved += p.rate_achieved;
            m.start_unix_ns = m.start_unix_ns.min(p.start_unix_ns);
            m.end_unix_ns = m.end_unix_ns.max(p.end_unix_ns);
        }
        m.secs = round(
            m.end_unix_ns.saturating_sub(m.start_unix_ns) as f64 / 1e9,
            3,
        );
        out.publish = Some(m);
    }

    let d = &mut out.deliveries;
    d.complete = true;
    for p in parts {
        let pd = &p.deliveries;
        d.expected += pd.expected;
        d.received += pd.received;
        d.lost += pd.lost;
        d.duplicated += pd.duplicated;
        d.unexpected += pd.unexpected;
        d.pings += pd.pings;
        d.comments += pd.comments;
        d.other_events += pd.other_events;
        d.complete &= pd.complete;
        if pd.first_unix_ns > 0 && (d.first_unix_ns == 0 || pd.first_unix_ns < d.first_unix_ns) {
            d.first_unix_ns = pd.first_unix_ns;
        }
        d.last_unix_ns = d.last_unix_ns.max(pd.last_unix_ns);
    }
    let from = out
        .publish
        .as_ref()
        .map(|p| p.start_unix_ns)
        .filter(|&s| s > 0)
        .unwrap_or(d.first_unix_ns);
    d.throughput_per_sec = per(
        d.received as f64,
        d.last_unix_ns.saturating_sub(from) as f64 / 1e9,
    )
    .map_or(0.0, |r| round(r, 1));
    d.latency = Latency::merge(
        &parts
            .iter()
            .map(|p| &p.deliveries.latency)
            .collect::<Vec<_>>(),
    )?;

    let servers: Vec<&ServerSummary> = parts.iter().filter_map(|p| p.server.as_ref()).collect();
    if !servers.is_empty() {
        // Processes measuring the same server pids saw the same process: keep the earliest
        // `before` and the latest (largest) later samples. Different pid sets (one tool process
        // per gateway instance) are different servers: add them up.
        let mut groups: BTreeMap<Vec<u32>, Vec<&ServerSummary>> = BTreeMap::new();
        for s in &servers {
            let mut key = s.pids.clone();
            key.sort_unstable();
            groups.entry(key).or_default().push(s);
        }
        let mut s = ServerSummary::default();
        for (pids, group) in &groups {
            s.pids.extend(pids);
            s.before = add_samples(s.before, pick(group, |s| s.before, false));
            s.after_connect = add_samples(s.after_connect, pick(group, |s| s.after_connect, true));
            s.after_waves = add_samples(s.after_waves, pick(group, |s| s.after_waves, true));
            s.publish_start = add_samples(s.publish_start, pick(group, |s| s.publish_start, false));
            s.after_publish = add_samples(s.after_publish, pick(group, |s| s.after_publish, true));
        }
        derive_server(&mut s, out.connections.ok, out.deliveries.received);
        // Publish-phase CPU is only meaningful from the process that timed the publishing.
        let publisher_server = parts
            .iter()
            .find(|p| p.publish.as_ref().is_some_and(|p| p.sent > 0))
            .and_then(|p| p.server.as_ref());
        if let Some(ps) = publisher_server
            && groups.len() == 1
        {
            s.cpu_secs_publish = ps.cpu_secs_publish;
            if let Some(c) = ps.cpu_secs_publish.filter(|_| out.deliveries.received > 0) {
                let n = out.deliveries.received as f64;
                s.cpu_secs_per_million_deliveries = per(c * 1e6, n).map(|x| round(x, 3));
                s.deliveries_per_cpu_sec = per(n, c).map(|x| round(x, 0));
            }
        }
        out.server = Some(s);
    }

    for p in parts {
        out.tool_cpu.user_secs += p.tool_cpu.user_secs;
        out.tool_cpu.sys_secs += p.tool_cpu.sys_secs;
        out.tool_cpu.connect_phase_secs += p.tool_cpu.connect_phase_secs;
        out.tool_cpu.publish_phase_secs += p.tool_cpu.publish_phase_secs;
        out.tool_cpu.publish_phase_util += p.tool_cpu.publish_phase_util;
        out.tool_cpu.rss_kib_start += p.tool_cpu.rss_kib_start;
        out.tool_cpu.rss_kib_connected += p.tool_cpu.rss_kib_connected;
        out.warnings
            .extend(p.warnings.iter().map(|w| format!("[{}] {w}", p.tool.shard)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(values: &[u64]) -> Latency {
        let mut h = new_histogram();
        for &v in values {
            h.record(v).unwrap();
        }
        Latency::from_histogram(&h)
    }

    #[test]
    fn latency_round_trips_and_merges_exactly() {
        let a = lat(&[100, 200, 300]);
        let b = lat(&[400, 100_000]);
        assert_eq!(a.histogram().unwrap().len(), 3);
        let m = Latency::merge(&[&a, &b]).unwrap();
        assert_eq!(m.count, 5);
        assert_eq!(m.max_us, b.max_us);
        assert_eq!(m.min_us, 100);
        assert_eq!(m.p50_us, 300);
        assert_eq!(Latency::merge(&[&Latency::default()]).unwrap().count, 0);
    }

    #[test]
    fn merge_sums_and_recomputes() {
        let mut a = Summary::default();
        a.tool.shard = "0/2".into();
        a.connections.ok = 10;
        a.connections.phase_secs = 2.0;
        a.connections.failed_by_reason.insert("refused".into(), 1);
        a.deliveries.received = 100;
        a.deliveries.expected = 100;
        a.deliveries.complete = true;
        a.deliveries.latency = lat(&[10, 20]);
        a.publish = Some(PublishSummary {
            sent: 10,
            start_unix_ns: 1_000_000_000,
            end_unix_ns: 2_000_000_000,
            ..PublishSummary::default()
        });
        a.deliveries.last_unix_ns = 2_000_000_000;
        a.server = Some(ServerSummary {
            before: Some(Sample {
                rss_kib: 1000,
                cpu_secs: 1.0,
            }),
            after_connect: Some(Sample {
                rss_kib: 1010,
                cpu_secs: 1.5,
            }),
            after_publish: Some(Sample {
                rss_kib: 1010,
                cpu_secs: 2.0,
            }),
            cpu_secs_publish: Some(0.5),
            ..ServerSummary::default()
        });
        let mut b = a.clone();
        b.tool.shard = "1/2".into();
        b.publish = None;
        b.deliveries.last_unix_ns = 3_000_000_000;
        b.server = Some(ServerSummary {
            before: Some(Sample {
                rss_kib: 1005,
                cpu_secs: 1.2,
            }),
            after_connect: Some(Sample {
                rss_kib: 1020,
                cpu_secs: 1.6,
            }),
            ..ServerSummary::default()
        });
        let m = merge(&[a, b]).unwrap();
        assert_eq!(m.connections.ok, 20);
        assert_eq!(m.connections.rate_achieved, 10.0);
        assert_eq!(m.connections.failed_by_reason["refused"], 2);
        assert_eq!(m.deliveries.received, 200);
        assert!(m.deliveries.complete);
        assert_eq!(m.deliveries.latency.count, 4);
        // 200 deliveries from the first publish (1 s) to the last delivery (3 s).
        assert_eq!(m.deliveries.throughput_per_sec, 100.0);
        let s = m.server.unwrap();
        assert_eq!(s.before.unwrap().rss_kib, 1000);
        assert_eq!(s.after_connect.unwrap().rss_kib, 1020);
        assert_eq!(s.rss_per_conn_bytes, Some(1024.0));
        assert_eq!(s.cpu_secs_publish, Some(0.5));
        assert_eq!(s.deliveries_per_cpu_sec, Some(400.0));
        assert_eq!(m.tool.processes, 2);
    }

    #[test]
    fn merge_adds_different_servers() {
        let part = |pid: u32, before: u64, after: u64| {
            let mut p = Summary::default();
            p.connections.ok = 10;
            p.server = Some(ServerSummary {
                pids: vec![pid],
                before: Some(Sample {
                    rss_kib: before,
                    cpu_secs: 0.0,
                }),
                after_connect: Some(Sample {
                    rss_kib: after,
                    cpu_secs: 0.0,
                }),
                ..ServerSummary::default()
            });
            p
        };
        let m = merge(&[part(1, 100, 110), part(2, 200, 230)]).unwrap();
        let s = m.server.unwrap();
        assert_eq!(s.pids, vec![1, 2]);
        assert_eq!(s.before.unwrap().rss_kib, 300);
        // 40 KiB over 20 streams.
        assert_eq!(s.rss_per_conn_bytes, Some(2048.0));
    }
}
