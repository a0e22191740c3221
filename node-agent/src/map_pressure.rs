//! Which of the agent's maps are full, told apart from other write failures.
//!
//! A write the kernel refuses because a map has no room (`E2BIG` from a hash map, `ENOSPC`
//! from an LPM trie) marks the map full: the first such failure is logged once (not on every
//! retry), counted, and shown as `weft_agent_map_full{map}`, and the node's enforcement report
//! carries it to `weftctl policy status` and the endpoints' `WeftEndpoint` conditions. The
//! engines keep retrying their writes on every pass (CNI ADD is retried by the runtime); the
//! mark goes when an entry is removed from that map or a new key fits in it. A replaced key
//! proves nothing: replacing succeeds even in a full hash map, where the kernel keeps a spare
//! element per CPU for it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `BPF_NOEXIST`: the update fails with `EEXIST` when the key is present.
pub const BPF_NOEXIST: u64 = 1;

/// A map that refused a write for want of room.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FullMap {
    pub map: String,
    /// Its size, when the kernel told it.
    pub max_entries: Option<u32>,
    /// When it was first found full since it last had room (RFC 3339).
    pub since: String,
    /// What a person reads (see [`FullMap::describe`]): `weftctl policy status` shows it.
    pub message: String,
}

impl FullMap {
    /// What a person reads: which map, how big, and what to do.
    pub fn describe(&self) -> String {
        let size = self
            .max_entries
            .map(|entries| format!(" ({entries} entries)"))
            .unwrap_or_default();
        format!(
            "map {}{size} is full; the agent retries its writes on every pass (raise it with {})",
            self.map,
            resize_flag(&self.map)
        )
    }
}

/// The agent flag that sizes `map`.
pub fn resize_flag(map: &str) -> String {
    match map {
        weft_node_bpf::maps::CONNTRACK => "--ct-max-entries".to_owned(),
        weft_node_bpf::maps::LB_FLOWS | weft_node_bpf::maps::LB_REVERSE => {
            "--nat-max-entries".to_owned()
        }
        other => format!("--map-entries {other}=N"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// `weft_agent_map_full`, `weft_agent_map_full_writes`, and every successful write
/// (`weft_agent_map_updates`, `weft_agent_map_deletes`: what a change cost in map entries) on
/// the admin endpoint.
#[derive(Clone, Default)]
pub struct MapPressureMetrics {
    full: Family<MapLabels, Gauge>,
    full_writes: Family<MapLabels, Counter>,
    updates: Family<MapLabels, Counter>,
    deletes: Family<MapLabels, Counter>,
    drift: Family<MapLabels, Counter>,
}

impl MapPressureMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "map_full",
            "1 while a datapath map has refused a write for want of room and no new entry has fit since",
            self.full.clone(),
        );
        registry.register(
            "map_full_writes",
            "Writes to a datapath map refused because it was full (each retry counts)",
            self.full_writes.clone(),
        );
        registry.register(
            "map_updates",
            "Entries the agent wrote (created or replaced) in a datapath map",
            self.updates.clone(),
        );
        registry.register(
            "map_deletes",
            "Entries the agent removed from a datapath map",
            self.deletes.clone(),
        );
        registry.register(
            "map_drift",
            "Entries the periodic check found different in a datapath map from what the agent last wrote there (expected: none); they are written again",
            self.drift.clone(),
        );
    }
}

/// The maps found full, and the metrics that show them.
#[derive(Default)]
pub struct MapPressure {
    full: BTreeMap<&'static str, FullMap>,
    metrics: MapPressureMetrics,
}

impl MapPressure {
    /// `written`: the maps the agent writes, shown at 0 from the start (an alert on the
    /// gauge then sees every map, full or not).
    pub fn new(metrics: MapPressureMetrics, written: &[&str]) -> Self {
        for map in written {
            metrics
                .full
                .get_or_create(&MapLabels {
                    map: (*map).to_owned(),
                })
                .set(0);
        }
        Self {
            full: BTreeMap::new(),
            metrics,
        }
    }

    /// A write to `map` was refused for want of room; returns what is known of the map.
    pub fn refused(&mut self, map: &'static str, max_entries: Option<u32>) -> FullMap {
        let labels = MapLabels {
            map: map.to_owned(),
        };
        self.metrics.full_writes.get_or_create(&labels).inc();
        if let Some(full) = self.full.get(map) {
            return full.clone();
        }
        tracing::warn!(
            map,
            max_entries,
            flag = %resize_flag(map),
            "a datapath map is full: what does not fit is retried on every pass, and traffic that needs a missing entry is denied"
        );
        self.metrics.full.get_or_create(&labels).set(1);
        let mut full = FullMap {
            map: map.to_owned(),
            max_entries,
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            message: String::new(),
        };
        full.message = full.describe();
        self.full.insert(map, full.clone());
        full
    }

    /// An entry of `map` was written.
    pub fn updated(&self, map: &str) {
        self.metrics
            .updates
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .inc();
    }

    /// The periodic check found `count` entries of `map` other than the agent wrote them.
    pub fn drifted(&self, map: &str, count: usize) {
        self.metrics
            .drift
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .inc_by(count as u64);
    }

    /// An entry of `map` was removed.
    pub fn deleted(&self, map: &str) {
        self.metrics
            .deletes
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .inc();
    }

    /// An entry left `map`, or a new key fit in it.
    pub fn has_room(&mut self, map: &'static str) {
        if self.full.remove(map).is_some() {
            tracing::info!(map, "a datapath map that was full has room again");
            self.metrics
                .full
                .get_or_create(&MapLabels {
                    map: map.to_owned(),
                })
                .set(0);
        }
    }

    pub fn is_full(&self, map: &str) -> bool {
        self.full.contains_key(map)
    }

    /// The maps full now, by name.
    pub fn full_maps(&self) -> Vec<FullMap> {
        self.full.values().cloned().collect()
    }
}

/// Whether a full `map` leaves endpoints without entries they need (their wiring, identity or
/// policy), as opposed to services or connections.
pub fn affects_endpoints(map: &str) -> bool {
    use weft_node_bpf::maps;
    [
        maps::ENDPOINTS,
        maps::IPCACHE,
        maps::ENDPOINT_POLICIES,
        maps::POLICY_ENTRIES,
        maps::POLICY_PEER_SETS,
    ]
    .contains(&map)
}

/// Whether a map write failed because the map has no room.
pub fn is_full(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(error)
        if matches!(error.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC)))
}

/// Whether a `BPF_NOEXIST` write failed because the key is there already.
pub fn key_exists(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(error)
        if error.io_error.raw_os_error() == Some(libc::EEXIST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_is_reported_once_and_cleared_by_room() {
        let metrics = MapPressureMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut pressure = MapPressure::new(metrics, &["policy_entries", "endpoints"]);
        pressure.refused("policy_entries", Some(16));
        pressure.refused("policy_entries", Some(16));
        assert!(pressure.is_full("policy_entries"));
        let full = pressure.full_maps();
        assert_eq!(full.len(), 1);
        assert!(full[0]
            .describe()
            .contains("--map-entries policy_entries=N"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("map_full{map=\"policy_entries\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("map_full_writes_total{map=\"policy_entries\"} 2"),
            "{text}"
        );
        pressure.has_room("policy_entries");
        assert!(pressure.full_maps().is_empty());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("map_full{map=\"policy_entries\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn the_resize_flag_names_the_map() {
        assert_eq!(
            resize_flag(weft_node_bpf::maps::CONNTRACK),
            "--ct-max-entries"
        );
        assert_eq!(resize_flag("endpoints"), "--map-entries endpoints=N");
    }
}
