//! Connection tracking's settings and its collector.
//!
//! The datapath (`lib/conntrack.h`) keeps one entry per connection and judges each entry's
//! life itself, from the lifetimes set here at load time: a dead entry is never trusted, swept
//! or not. The collector removes dead entries so the table does not fill with them, and reports
//! how full it is. It opens the pinned map on its own and never takes the agent's lock.

use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use weft_node_bpf::maps::{self, CtEntry, CtKey, CtState};

use crate::nat::{self, NatMetrics};

/// The smallest and largest table the memory-derived default picks.
const MIN_ENTRIES: u32 = 65_536;
const MAX_ENTRIES: u32 = 4_194_304;
/// Share of the node's memory the table may take by default (Cilium's
/// `bpf-map-dynamic-size-ratio` is 0.0025 for all its maps together).
const MEMORY_SHARE: f64 = 0.001;
/// Bytes one entry costs the kernel: key, value and the hash table's per-element overhead.
const BYTES_PER_ENTRY: u64 = 96;
/// Only these many keys are removed per batch before the collector yields, so a large sweep
/// never holds a core.
const SWEEP_BATCH: usize = 4096;

const IPPROTO_TCP: u8 = 6;

/// How long each kind of connection lives after its last packet, and how many fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtSettings {
    pub max_entries: u32,
    pub syn: Duration,
    pub established: Duration,
    pub closing: Duration,
    pub other: Duration,
}

impl CtSettings {
    /// The lifetime the datapath gives an entry (`ct_lifetime` in `lib/conntrack.h`).
    pub fn lifetime(&self, protocol: u8, state: u8) -> Duration {
        if protocol != IPPROTO_TCP {
            return self.other;
        }
        match CtState::from_number(state) {
            Some(CtState::SynSent) => self.syn,
            Some(CtState::Closing) => self.closing,
            _ => self.established,
        }
    }

    /// Whether the datapath would still trust `entry` at `now_ns` (CLOCK_MONOTONIC).
    pub fn alive(&self, key: &CtKey, entry: &CtEntry, now_ns: u64) -> bool {
        let lifetime = self.lifetime(key.protocol, entry.state).as_nanos();
        u128::from(now_ns.saturating_sub(entry.last_seen_ns)) <= lifetime
    }
}

/// The table size for a node with `memory_bytes` of memory: a small share of it, clamped.
pub fn default_max_entries(memory_bytes: u64) -> u32 {
    let entries = (memory_bytes as f64 * MEMORY_SHARE) as u64 / BYTES_PER_ENTRY;
    u32::try_from(entries)
        .unwrap_or(MAX_ENTRIES)
        .clamp(MIN_ENTRIES, MAX_ENTRIES)
}

/// Maps that hold one entry per connection or client besides the tracking table (the
/// socket-level reverse translations, session-affinity choices): unless sized by
/// `--map-entries`, they follow the tracking table's size, and never go below what the programs
/// declare. The cluster-scale maps (endpoints, ipcache, policy, services) keep their declared
/// sizes: they need room for the cluster, not for the node's traffic.
pub fn with_connection_scale_defaults(
    mut entries: crate::datapath::MapEntries,
    ct_max_entries: u32,
) -> crate::datapath::MapEntries {
    for (name, declared) in maps::RESIZABLE_MAPS
        .iter()
        .filter(|(name, _)| CONNECTION_SCALE_MAPS.contains(name))
    {
        entries
            .0
            .entry((*name).to_owned())
            .or_insert(ct_max_entries.max(*declared));
    }
    entries
}

/// See [`with_connection_scale_defaults`].
const CONNECTION_SCALE_MAPS: [&str; 2] = ["lb_sock_reverse", "lb_affinity"];

/// The node's memory from `/proc/meminfo` (`MemTotal`), if it can be read.
pub fn node_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CLOCK_MONOTONIC in nanoseconds: the datapath's `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `weft_agent_conntrack_*` on the admin endpoint.
#[derive(Clone, Default)]
pub struct ConntrackMetrics {
    entries: Gauge,
    collected: Counter,
    pressure: Gauge<f64, AtomicU64>,
    sweep_failures: Counter,
}

impl ConntrackMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "conntrack_entries",
            "Connections in the tracking table after the last sweep",
            self.entries.clone(),
        );
        registry.register(
            "conntrack_collected",
            "Dead connections removed from the tracking table",
            self.collected.clone(),
        );
        registry.register(
            "conntrack_pressure",
            "How full the tracking table was after the last sweep (0 to 1); when full, the least recently used connections are evicted and their replies are checked as new traffic",
            self.pressure.clone(),
        );
        registry.register(
            "conntrack_sweep_failures",
            "Sweeps of the tracking table that could not read or delete entries",
            self.sweep_failures.clone(),
        );
    }
}

/// What one sweep found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub live: u64,
    pub collected: u64,
}

/// Removes the dead entries of the pinned table at `pin`.
pub fn sweep(pin: &std::path::Path, settings: &CtSettings) -> Result<Sweep, String> {
    let map = MapData::from_pin(pin).map_err(|error| error.to_string())?;
    let map = Map::from_map_data(map).map_err(|error| error.to_string())?;
    let mut table: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(map).map_err(|error| error.to_string())?;
    let now = monotonic_ns();
    let mut dead = Vec::new();
    let mut live = 0u64;
    for item in table.iter() {
        // An entry removed by the datapath (LRU) while iterating ends that key's read only.
        let Ok((key, entry)) = item else { continue };
        if settings.alive(&key, &entry, now) {
            live += 1;
        } else {
            dead.push(key);
        }
    }
    let mut collected = 0u64;
    for batch in dead.chunks(SWEEP_BATCH) {
        for key in batch {
            // Re-read: a packet may have revived it since (a late reply that policy allowed).
            match table.get(key, 0) {
                Ok(entry) if settings.alive(key, &entry, monotonic_ns()) => live += 1,
                Ok(_) => {
                    if table.remove(key).is_ok() {
                        collected += 1;
                    }
                }
                Err(_) => {}
            }
        }
        std::thread::yield_now();
    }
    Ok(Sweep { live, collected })
}

/// Removes every tracked connection of `address` (either end), as its endpoint goes: the next
/// pod given the address starts with none, as Cilium scrubs an endpoint's entries on delete.
/// One pass over the table; failures are logged (the entries then die by their lifetimes).
pub fn forget_address(pin_dir: &std::path::Path, address: std::net::Ipv4Addr) {
    let forgot = || -> Result<usize, String> {
        let map = MapData::from_pin(pin_dir.join(maps::CONNTRACK)).map_err(|e| e.to_string())?;
        let map = Map::from_map_data(map).map_err(|error| error.to_string())?;
        let mut table: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(map).map_err(|error| error.to_string())?;
        // Keys hold addresses in network byte order.
        let address = u32::from(address).to_be();
        let keys: Vec<CtKey> = table
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.src_ip == address || key.dst_ip == address)
            .collect();
        Ok(keys.iter().filter(|key| table.remove(key).is_ok()).count())
    };
    match forgot() {
        Ok(0) => {}
        Ok(forgotten) => {
            tracing::debug!(%address, forgotten, "connections of a removed endpoint forgotten")
        }
        Err(error) => tracing::warn!(
            %error,
            %address,
            "cannot forget a removed endpoint's connections; they end by their lifetimes"
        ),
    }
}

/// Sweeps the connection-tracking table and the NAT tables pinned in `pin_dir` every
/// `interval` until the agent stops. NAT entries live by the same lifetimes as connections.
pub async fn run_collector(
    pin_dir: PathBuf,
    settings: CtSettings,
    nat_max_entries: u32,
    interval: Duration,
    metrics: ConntrackMetrics,
    nat_metrics: NatMetrics,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut warned, mut nat_warned) = (false, false);
    loop {
        tick.tick().await;
        let pin_dir = pin_dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            (
                sweep(&pin_dir.join(maps::CONNTRACK), &settings),
                nat::sweep(&pin_dir, &settings),
            )
        })
        .await;
        let (tracked, translated) = match result {
            Ok(results) => results,
            Err(error) => {
                tracing::warn!(%error, "the connection tracking sweep panicked");
                continue;
            }
        };
        match tracked {
            Ok(found) => {
                warned = false;
                metrics
                    .entries
                    .set(i64::try_from(found.live).unwrap_or(i64::MAX));
                metrics.collected.inc_by(found.collected);
                metrics
                    .pressure
                    .set(found.live as f64 / f64::from(settings.max_entries.max(1)));
                if found.collected > 0 {
                    tracing::debug!(
                        live = found.live,
                        collected = found.collected,
                        "connection tracking swept"
                    );
                }
            }
            Err(error) => {
                metrics.sweep_failures.inc();
                if !warned {
                    tracing::warn!(%error, "cannot sweep the connection tracking table; dead entries stay until evicted (the datapath never trusts them)");
                    warned = true;
                }
            }
        }
        nat_metrics.record(&translated, nat_max_entries);
        match translated {
            Ok(_) => nat_warned = false,
            Err(error) if !nat_warned => {
                tracing::warn!(%error, "cannot sweep the NAT tables; the datapath still takes back the ports of ended connections, but the tables do not shrink");
                nat_warned = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CtSettings {
        CtSettings {
            max_entries: MIN_ENTRIES,
            syn: Duration::from_secs(60),
            established: Duration::from_secs(21_600),
            closing: Duration::from_secs(10),
            other: Duration::from_secs(60),
        }
    }

    fn entry(protocol: u8, state: CtState, last_seen_s: u64) -> (CtKey, CtEntry) {
        (
            CtKey {
                protocol,
                ..CtKey::default()
            },
            CtEntry {
                last_seen_ns: last_seen_s * 1_000_000_000,
                state: state as u8,
                ..CtEntry::default()
            },
        )
    }

    #[test]
    fn each_state_lives_as_long_as_its_lifetime() {
        let settings = settings();
        let now = 100_000 * 1_000_000_000;
        let (key, closing) = entry(IPPROTO_TCP, CtState::Closing, 100_000 - 11);
        assert!(!settings.alive(&key, &closing, now), "closing: 10 s");
        let (key, closing) = entry(IPPROTO_TCP, CtState::Closing, 100_000 - 9);
        assert!(settings.alive(&key, &closing, now));
        let (key, established) = entry(IPPROTO_TCP, CtState::Established, 100_000 - 3600);
        assert!(settings.alive(&key, &established, now), "established: 6 h");
        let (key, syn) = entry(IPPROTO_TCP, CtState::SynSent, 100_000 - 61);
        assert!(!settings.alive(&key, &syn, now), "SYN: 60 s");
        let (key, udp) = entry(17, CtState::Established, 100_000 - 61);
        assert!(!settings.alive(&key, &udp, now), "other protocols: 60 s");
    }

    #[test]
    fn connection_scale_maps_follow_the_tracking_table_unless_sized() {
        let given: crate::datapath::MapEntries = "lb_affinity=1000".parse().expect("parse");
        let entries = with_connection_scale_defaults(given, 300_000);
        assert_eq!(entries.0.get("lb_affinity"), Some(&1000), "given wins");
        assert_eq!(entries.0.get("lb_sock_reverse"), Some(&300_000));
        assert_eq!(
            entries.0.get("endpoints"),
            None,
            "cluster-scale maps keep theirs"
        );
        let small = with_connection_scale_defaults(Default::default(), 65_536);
        assert_eq!(
            small.0.get("lb_sock_reverse"),
            Some(&262_144),
            "never below the declared size"
        );
    }

    #[test]
    fn the_default_size_follows_the_nodes_memory_within_bounds() {
        assert_eq!(default_max_entries(1 << 30), MIN_ENTRIES);
        let big = default_max_entries(24 << 30);
        assert!(big > MIN_ENTRIES && big < MAX_ENTRIES, "{big}");
        assert_eq!(default_max_entries(u64::MAX / 2), MAX_ENTRIES);
    }
}
