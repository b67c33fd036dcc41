//! Redis Cluster: one slot per history, and where keys, channels and calls go.
//!
//! On a cluster every key and channel of a history (an application, or with `CLUSTER_PARTITIONS`
//! one partition of it, `<app>#<k>`) starts with the hash tag `{<history>}`, so that a function
//! call (history, registry, admission) touches one slot, and its events go out on that slot's
//! shard channels with `SPUBLISH`. Histories spread over the shards: applications by default, one
//! application's users with partitions. Partitions also subscribe the application's own channel
//! names, for backends that `PUBLISH` to them. A single Redis keeps the untagged names.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use crate::broker::{Topic, app_channel, parse_channel, user_channel};
use crate::history;

/// The start of every key and channel name of `app`.
pub fn base(cluster: bool, app: &str) -> Cow<'_, str> {
    if cluster {
        Cow::Owned(format!("{{{app}}}"))
    } else {
        Cow::Borrowed(app)
    }
}

/// The shard channel a gateway channel (`{app}:channel:{user}`, `{app}:broadcast`) goes on in a
/// cluster; `None` for anything else.
pub fn shard_channel(channel: &str) -> Option<String> {
    match parse_channel(channel)? {
        Topic::User { app, user } => Some(format!("{{{app}}}:channel:{user}")),
        Topic::App { app } => Some(format!("{{{app}}}:broadcast")),
    }
}

/// The name backends `PUBLISH` to for a partition's channel (`shop#3:channel:alice` →
/// `shop:channel:alice`, `shop#3:broadcast` → `shop:broadcast`); `None` for any other channel.
pub fn plain_name(channel: &str) -> Option<String> {
    let topic = parse_channel(channel)?;
    if !history::is_partition(topic.app()) {
        return None;
    }
    let app = history::tenant(topic.app());
    Some(match topic {
        Topic::User { user, .. } => user_channel(app, user),
        Topic::App { .. } => app_channel(app),
    })
}

/// The plain names still needed by the partition channels in `wanted` (several partitions of one
/// application share its broadcast name: it is unsubscribed only with the last).
pub fn plain_names_wanted<'a>(wanted: impl IntoIterator<Item = &'a String>) -> HashSet<String> {
    wanted.into_iter().filter_map(|c| plain_name(c)).collect()
}

pub fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// How a set of wanted channels is subscribed on a cluster: each gateway channel as its shard
/// channel, grouped by slot (one `SSUBSCRIBE` may not span slots), and as itself with a plain
/// `SUBSCRIBE` for backends that still `PUBLISH` to it; probe channels (already shard channels)
/// by slot alone.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub plain: Vec<String>,
    pub sharded: BTreeMap<u16, Vec<String>>,
}

pub fn plan<'a>(channels: impl IntoIterator<Item = &'a String>) -> Plan {
    let mut plan = Plan::default();
    let mut shared = HashSet::new();
    for channel in channels {
        let shard = match shard_channel(channel) {
            Some(shard) => {
                match plain_name(channel) {
                    // A partition's broadcast shares its application's name with the others.
                    Some(plain) => {
                        if shared.insert(plain.clone()) {
                            plan.plain.push(plain);
                        }
                    }
                    None => plan.plain.push(channel.clone()),
                }
                shard
            }
            None => channel.clone(),
        };
        plan.sharded.entry(slot(&shard)).or_default().push(shard);
    }
    plan
}

/// This instance's probe channel on the shard that holds `slot`: `sse-probe:{<tag>}:<instance>`,
/// with the first tag (a number) that hashes to `slot`.
pub fn probe_channel(instance: &str, slot_wanted: u16) -> String {
    // About 16k tries on average (microseconds), and only when the topology changes.
    let tag = (0u32..)
        .find(|n| slot(&n.to_string()) == slot_wanted)
        .unwrap_or_default();
    format!("sse-probe:{{{tag}}}:{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_applications_keys_and_channels_share_one_slot() {
        let app = "shop";
        let key = format!("{}:history:last", base(true, app));
        let user = shard_channel("shop:channel:alice").unwrap_or_default();
        let all = shard_channel("shop:broadcast").unwrap_or_default();
        assert_eq!(user, "{shop}:channel:alice");
        assert_eq!(all, "{shop}:broadcast");
        assert_eq!(slot(&key), slot(&user));
        assert_eq!(slot(&key), slot(&all));
        assert_eq!(slot(&key), slot("shop"));
        assert_eq!(base(false, app), "shop");
        assert_eq!(shard_channel("sse-probe:x"), None);
    }

    #[test]
    fn a_plan_groups_shard_channels_by_slot_and_keeps_the_plain_names() {
        let wanted: Vec<String> = ["a:channel:u", "a:broadcast", "b:channel:v"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let probe = probe_channel("i1", 42);
        let mut all = wanted.clone();
        all.push(probe.clone());
        let p = plan(&all);
        assert_eq!(p.plain, wanted);
        assert_eq!(
            p.sharded.get(&slot("a")),
            Some(&vec![
                "{a}:channel:u".to_string(),
                "{a}:broadcast".to_string()
            ])
        );
        assert_eq!(p.sharded.get(&42), Some(&vec![probe]));
        assert_eq!(p.sharded.values().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    fn partitions_subscribe_their_applications_plain_names_once() {
        let wanted: Vec<String> = [
            "s#1:channel:u",
            "s#1:broadcast",
            "s#2:broadcast",
            "t:broadcast",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = plan(&wanted);
        assert_eq!(p.plain, ["s:channel:u", "s:broadcast", "t:broadcast"]);
        assert_eq!(p.sharded.values().map(Vec::len).sum::<usize>(), 4);
        assert_eq!(
            p.sharded.get(&slot("s#1")).map(Vec::len),
            Some(2),
            "a partition's channels share its slot"
        );
        assert_eq!(plain_name("t:broadcast"), None);
        assert_eq!(
            plain_names_wanted(&wanted[2..]),
            HashSet::from(["s:broadcast".to_string()])
        );
    }

    #[test]
    fn a_probe_channel_lands_on_the_slot_asked_for() {
        for wanted in [0, 1, 5000, 16383] {
            assert_eq!(slot(&probe_channel("gw", wanted)), wanted);
        }
    }
}
