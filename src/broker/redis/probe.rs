//! The end-to-end probe behind readiness: on every shard (the one Redis, or each cluster primary)
//! a message published through a function (so the library is loaded and the node takes writes),
//! on this instance's own channel, and received back on the subscriber link.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cluster;

/// How old a shard's last answer may be for readiness (three rounds of the probe).
const PROBE_STALE: Duration = Duration::from_secs(3);

const PREFIX: &str = "sse-probe:";

pub struct Probe {
    instance: String,
    shards: Mutex<Vec<Shard>>,
}

/// One shard's probe: its channel, the probe in flight (number, sent at), its last answer.
struct Shard {
    channel: String,
    since: Instant,
    sent: Option<(u64, Instant)>,
    last_ok: Option<Instant>,
}

impl Probe {
    pub fn new(instance: &str) -> Probe {
        Probe {
            instance: instance.to_string(),
            shards: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Shard>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current shards' channels.
    pub fn channels(&self) -> Vec<String> {
        self.lock().iter().map(|s| s.channel.clone()).collect()
    }

    /// The probe channel on a single Redis.
    pub fn channel(&self) -> String {
        format!("{PREFIX}{}", self.instance)
    }

    /// The probe channels for a cluster whose primaries each hold one of `slots`.
    pub fn cluster_channels(&self, slots: &[u16]) -> Vec<String> {
        slots
            .iter()
            .map(|&slot| cluster::probe_channel(&self.instance, slot))
            .collect()
    }

    /// Whether a received message is one of the probe's.
    pub fn owns(&self, channel: &str) -> bool {
        channel.starts_with(PREFIX) && self.lock().iter().any(|s| s.channel == channel)
    }

    /// Seconds since the shard heard from longest ago answered; `None` until every shard has.
    pub fn age(&self) -> Option<f64> {
        let shards = self.lock();
        if shards.is_empty() {
            return None;
        }
        shards
            .iter()
            .map(|s| s.last_ok.map(|t| t.elapsed().as_secs_f64()))
            .try_fold(0f64, |oldest, age| age.map(|a| oldest.max(a)))
    }

    /// Every shard answered lately.
    pub fn fresh(&self) -> bool {
        let shards = self.lock();
        !shards.is_empty()
            && shards
                .iter()
                .all(|s| s.last_ok.is_some_and(|t| t.elapsed() < PROBE_STALE))
    }

    /// The link was lost: what the probe proved no longer holds until it comes back again.
    pub fn forget(&self) {
        let now = Instant::now();
        for shard in self.lock().iter_mut() {
            shard.last_ok = None;
            shard.sent = None;
            shard.since = now; // the restored link gets the time a new shard gets
        }
    }

    /// Makes `wanted` the shards' channels; returns the channels added and removed.
    pub fn reshard(&self, wanted: &[String]) -> (Vec<String>, Vec<String>) {
        let mut shards = self.lock();
        let removed = shards
            .iter()
            .filter(|s| !wanted.contains(&s.channel))
            .map(|s| s.channel.clone())
            .collect();
        shards.retain(|s| wanted.contains(&s.channel));
        let mut added = Vec::new();
        for channel in wanted {
            if !shards.iter().any(|s| &s.channel == channel) {
                added.push(channel.clone());
                shards.push(Shard {
                    channel: channel.clone(),
                    since: Instant::now(),
                    sent: None,
                    last_ok: None,
                });
            }
        }
        (added, removed)
    }

    pub fn sent(&self, channel: &str, n: u64) {
        if let Some(s) = self.lock().iter_mut().find(|s| s.channel == channel) {
            s.sent = Some((n, Instant::now()));
        }
    }

    /// A probe message came back; returns its round trip if it is the one in flight.
    pub fn received(&self, channel: &str, payload: &[u8]) -> Option<Duration> {
        let n: u64 = std::str::from_utf8(payload).ok()?.parse().ok()?;
        let mut shards = self.lock();
        let shard = shards.iter_mut().find(|s| s.channel == channel)?;
        let (want, at) = shard.sent?;
        if n != want {
            return None;
        }
        let now = Instant::now();
        shard.last_ok = Some(now);
        shard.sent = None;
        Some(now - at)
    }

    /// A shard whose probes are published but never come back, for longer than readiness
    /// allows: its subscriptions are gone while its link stayed up (a cluster moved its slots).
    pub fn silent_shard(&self) -> bool {
        self.lock().iter().any(|s| {
            let heard = s.last_ok.unwrap_or(s.since);
            heard.elapsed() > PROBE_STALE && s.sent.is_some()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_must_answer_for_the_probe_to_be_fresh() {
        let probe = Probe::new("gw");
        assert!(!probe.fresh() && probe.age().is_none());
        let wanted = vec![
            "sse-probe:{1}:gw".to_string(),
            "sse-probe:{2}:gw".to_string(),
        ];
        let (added, removed) = probe.reshard(&wanted);
        assert_eq!((added.len(), removed.len()), (2, 0));
        probe.sent(&wanted[0], 7);
        probe.sent(&wanted[1], 7);
        assert!(probe.received(&wanted[0], b"7").is_some());
        assert!(!probe.fresh(), "one shard has not answered");
        assert!(
            probe.received(&wanted[1], b"6").is_none(),
            "not the probe in flight"
        );
        assert!(probe.received(&wanted[1], b"7").is_some());
        assert!(probe.fresh() && probe.age().is_some());
        assert!(probe.owns(&wanted[1]) && !probe.owns("sse-probe:{3}:gw"));
        let (added, removed) = probe.reshard(&wanted[..1]);
        assert_eq!((added.len(), removed), (0, vec![wanted[1].clone()]));
        probe.forget();
        assert!(!probe.fresh());
    }
}
