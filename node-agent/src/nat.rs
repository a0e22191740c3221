//! Service NAT: the SNAT port range and the collector of ended translations.
//!
//! A connection the datapath translates per packet (NodePort, and service traffic no socket hook
//! saw) has two entries in `lib/lb.h`: `lb_flows` by the client's tuple and `lb_reverse` by the
//! backend's reply tuple; with SNAT the reverse entry is what holds the node's source port. The
//! entries record the connection's progress (answered, FIN from each end, RST) and live as long
//! as conntrack would keep the connection (the same lifetimes). A new connection may take the
//! port of one that has ended at once; the collector here removes ended connections so the
//! tables shrink back, and nothing is ever evicted while it is in use.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;

use aya::maps::{HashMap, Map, MapData};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weft_node_bpf::maps::{self, nat_progress, LbNatEntry, LbTuple};

use crate::conntrack::{monotonic_ns, CtSettings};

/// The fewest SNAT ports the default range may have; below that, the agent asks for a range.
const MIN_DEFAULT_PORTS: u32 = 1024;
/// Ports below this are privileged services' and never SNAT ports by default.
const FIRST_UNPRIVILEGED_PORT: u16 = 1024;
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const IPPROTO_TCP: u8 = 6;
/// Removed per batch before the collector yields (as the conntrack sweep does).
const SWEEP_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NatError {
    #[error("a port range is FIRST-LAST with 1 <= FIRST <= LAST <= 65535 (got {0:?})")]
    BadRange(String),
    #[error("cannot read the node's ephemeral port range from {LOCAL_PORT_RANGE}: {0}")]
    LocalRange(String),
    #[error("--snat-port-range {snat} overlaps the node's ip_local_port_range {local} (net.ipv4.ip_local_port_range): a translated connection could take a port the node's own connections use; pick ports outside it")]
    Overlap { snat: PortRange, local: PortRange },
    #[error("the node's ip_local_port_range {local} leaves fewer than {MIN_DEFAULT_PORTS} ports above or below it for SNAT; set --snat-port-range to ports outside it")]
    NoRoom { local: PortRange },
}

/// An inclusive range of ports, written `FIRST-LAST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, NatError> {
        if first == 0 || first > last {
            return Err(NatError::BadRange(format!("{first}-{last}")));
        }
        Ok(Self { first, last })
    }

    /// How many ports the range holds.
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = NatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NatError::BadRange(text.to_owned());
        // ip_local_port_range separates with whitespace, the flag with a dash.
        let mut parts = text
            .split(|c: char| c == '-' || c.is_whitespace())
            .filter(|part| !part.is_empty());
        let first = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let last = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        PortRange::new(first, last).map_err(|_| bad())
    }
}

/// What the datapath's NAT tables get at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// Entries of each of `lb_flows` and `lb_reverse`.
    pub max_entries: u32,
    /// Source ports SNAT takes.
    pub snat_ports: PortRange,
}

/// The node's `net.ipv4.ip_local_port_range` (of the agent's network namespace).
pub fn local_port_range() -> Result<PortRange, NatError> {
    let text = std::fs::read_to_string(LOCAL_PORT_RANGE)
        .map_err(|error| NatError::LocalRange(error.to_string()))?;
    text.parse()
        .map_err(|error: NatError| NatError::LocalRange(error.to_string()))
}

/// The SNAT ports to use: `requested` when it stays clear of the node's own ephemeral ports,
/// else by default the ports above them (or, when too few are left there, below them).
pub fn snat_port_range(
    requested: Option<PortRange>,
    local: PortRange,
) -> Result<PortRange, NatError> {
    if let Some(snat) = requested {
        if snat.overlaps(&local) {
            return Err(NatError::Overlap { snat, local });
        }
        return Ok(snat);
    }
    let above = (local.last < u16::MAX)
        .then(|| PortRange::new(local.last + 1, u16::MAX).ok())
        .flatten();
    let below = (local.first > FIRST_UNPRIVILEGED_PORT)
        .then(|| PortRange::new(FIRST_UNPRIVILEGED_PORT, local.first - 1).ok())
        .flatten();
    [above, below]
        .into_iter()
        .flatten()
        .find(|range| range.count() >= MIN_DEFAULT_PORTS)
        .ok_or(NatError::NoRoom { local })
}

/// How long a translated connection lives after its last packet (`lb_nat_lifetime`).
pub fn lifetime(settings: &CtSettings, protocol: u8, progress: u8) -> std::time::Duration {
    if protocol != IPPROTO_TCP {
        return settings.other;
    }
    let closing = nat_progress::RST | nat_progress::FIN_CLIENT | nat_progress::FIN_BACKEND;
    if progress & closing != 0 {
        settings.closing
    } else if progress & nat_progress::REPLIED == 0 {
        settings.syn
    } else {
        settings.established
    }
}

/// Whether a connection whose entries are `entries` is still alive at `now_ns`: the latest
/// packet of either direction counts, and what either saw of its progress.
fn alive<'a>(
    settings: &CtSettings,
    protocol: u8,
    entries: impl IntoIterator<Item = &'a LbNatEntry>,
    now_ns: u64,
) -> bool {
    let (progress, last_seen) = entries
        .into_iter()
        .fold((0u8, 0u64), |(progress, last), entry| {
            (progress | entry.progress, last.max(entry.last_seen_ns))
        });
    let lifetime = lifetime(settings, protocol, progress).as_nanos();
    u128::from(now_ns.saturating_sub(last_seen)) <= lifetime
}

/// `weft_agent_nat_*` on the admin endpoint.
#[derive(Clone, Default)]
pub struct NatMetrics {
    translations: Gauge,
    collected: Counter,
    pressure: Gauge<f64, AtomicU64>,
    sweep_failures: Counter,
}

impl NatMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nat_translations",
            "Translated connections (NodePort, per-packet service translation) alive after the last sweep",
            self.translations.clone(),
        );
        registry.register(
            "nat_collected",
            "Entries of ended translated connections removed from the NAT tables",
            self.collected.clone(),
        );
        registry.register(
            "nat_pressure",
            "How full the fuller NAT table was after the last sweep (0 to 1); when full, new translations are dropped with reason 7",
            self.pressure.clone(),
        );
        registry.register(
            "nat_sweep_failures",
            "Sweeps of the NAT tables that could not read them",
            self.sweep_failures.clone(),
        );
    }

    pub(crate) fn record(&self, result: &Result<NatSweep, String>, max_entries: u32) {
        match result {
            Ok(found) => {
                self.translations
                    .set(i64::try_from(found.translations).unwrap_or(i64::MAX));
                self.collected.inc_by(found.collected);
                self.pressure
                    .set(found.largest_table as f64 / f64::from(max_entries.max(1)));
            }
            Err(_) => {
                self.sweep_failures.inc();
            }
        }
    }
}

/// What one sweep of the NAT tables found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatSweep {
    /// Live connections with a forward entry.
    pub translations: u64,
    /// Entries removed (either table).
    pub collected: u64,
    /// Entries left in the fuller table.
    pub largest_table: u64,
}

type NatTable = HashMap<MapData, LbTuple, LbNatEntry>;

fn open(pin_dir: &Path, name: &str) -> Result<NatTable, String> {
    let map = MapData::from_pin(pin_dir.join(name)).map_err(|error| error.to_string())?;
    let map = Map::from_map_data(map).map_err(|error| error.to_string())?;
    HashMap::try_from(map).map_err(|error| error.to_string())
}

fn entries(table: &NatTable) -> Vec<(LbTuple, LbNatEntry)> {
    // An entry deleted by the datapath while iterating ends that key's read only.
    table.iter().filter_map(Result::ok).collect()
}

/// The connections of the two tables: each forward entry with the reply entry that answers it
/// (the reply entry's translation leads back to the forward key), and reply entries alone.
fn connections(
    flows: &[(LbTuple, LbNatEntry)],
    reverse: &[(LbTuple, LbNatEntry)],
) -> Vec<(Option<LbTuple>, Option<LbTuple>, u8)> {
    let replies: StdHashMap<LbTuple, &LbNatEntry> =
        reverse.iter().map(|(key, entry)| (*key, entry)).collect();
    let mut paired = HashSet::new();
    let mut found = Vec::with_capacity(flows.len() + reverse.len());
    for (key, entry) in flows {
        let reply_key = LbTuple::answering(&entry.to, key.protocol);
        let answers = replies
            .get(&reply_key)
            .is_some_and(|reply| LbTuple::answering(&reply.to, key.protocol) == *key);
        if answers {
            paired.insert(reply_key);
        }
        found.push((Some(*key), answers.then_some(reply_key), key.protocol));
    }
    for (key, _) in reverse {
        if !paired.contains(key) {
            found.push((None, Some(*key), key.protocol));
        }
    }
    found
}

/// Removes the entries of ended connections from the NAT tables pinned in `pin_dir`.
pub fn sweep(pin_dir: &Path, settings: &CtSettings) -> Result<NatSweep, String> {
    let mut flows = open(pin_dir, maps::LB_FLOWS)?;
    let mut reverse = open(pin_dir, maps::LB_REVERSE)?;
    let flow_entries = entries(&flows);
    let reverse_entries = entries(&reverse);
    let seen: StdHashMap<(bool, LbTuple), &LbNatEntry> = flow_entries
        .iter()
        .map(|(key, entry)| ((true, *key), entry))
        .chain(
            reverse_entries
                .iter()
                .map(|(key, entry)| ((false, *key), entry)),
        )
        .collect();
    let mut sweep = NatSweep::default();
    let now = monotonic_ns();
    let mut dead = Vec::new();
    let (mut flows_collected, mut reverse_collected) = (0u64, 0u64);
    for (forward, reply, protocol) in connections(&flow_entries, &reverse_entries) {
        let both = [
            forward.and_then(|key| seen.get(&(true, key)).copied()),
            reply.and_then(|key| seen.get(&(false, key)).copied()),
        ];
        if alive(settings, protocol, both.into_iter().flatten(), now) {
            sweep.translations += u64::from(forward.is_some());
        } else {
            dead.push((forward, reply, protocol));
        }
    }
    for batch in dead.chunks(SWEEP_BATCH) {
        for (forward, reply, protocol) in batch {
            // Re-read: a packet may have revived the connection since.
            let current = [
                forward.and_then(|key| flows.get(&key, 0).ok()),
                reply.and_then(|key| reverse.get(&key, 0).ok()),
            ];
            if alive(
                settings,
                *protocol,
                current.iter().flatten(),
                monotonic_ns(),
            ) {
                sweep.translations += u64::from(forward.is_some());
                continue;
            }
            if let Some(key) = forward {
                flows_collected += u64::from(flows.remove(key).is_ok());
            }
            if let Some(key) = reply {
                reverse_collected += u64::from(reverse.remove(key).is_ok());
            }
        }
        std::thread::yield_now();
    }
    sweep.collected = flows_collected + reverse_collected;
    sweep.largest_table = (flow_entries.len() as u64)
        .saturating_sub(flows_collected)
        .max((reverse_entries.len() as u64).saturating_sub(reverse_collected));
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weft_node_bpf::maps::LbNat;

    fn settings() -> CtSettings {
        CtSettings {
            max_entries: 65_536,
            syn: Duration::from_secs(60),
            established: Duration::from_secs(21_600),
            closing: Duration::from_secs(10),
            other: Duration::from_secs(60),
        }
    }

    fn range(text: &str) -> PortRange {
        text.parse().expect("range")
    }

    #[test]
    fn the_default_range_sits_above_the_nodes_ephemeral_ports() {
        assert_eq!(
            snat_port_range(None, range("32768 60999")),
            Ok(range("61000-65535"))
        );
        // Too few above: below, from the first unprivileged port.
        assert_eq!(
            snat_port_range(None, range("40000 65000")),
            Ok(range("1024-39999"))
        );
        assert_eq!(
            snat_port_range(None, range("1500 65535")),
            Err(NatError::NoRoom {
                local: range("1500-65535")
            })
        );
    }

    #[test]
    fn a_range_overlapping_the_nodes_ephemeral_ports_is_refused() {
        let local = range("32768 60999");
        let error = snat_port_range(Some(range("60000-62000")), local).expect_err("overlap");
        assert!(
            error
                .to_string()
                .contains("overlaps the node's ip_local_port_range 32768-60999"),
            "{error}"
        );
        assert_eq!(
            snat_port_range(Some(range("20000-29999")), local),
            Ok(range("20000-29999"))
        );
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("70000-80000".parse::<PortRange>().is_err());
        assert!("9-8".parse::<PortRange>().is_err());
    }

    fn entry(progress: u8, last_seen_s: u64) -> LbNatEntry {
        LbNatEntry {
            progress,
            last_seen_ns: last_seen_s * 1_000_000_000,
            ..LbNatEntry::default()
        }
    }

    #[test]
    fn a_connection_lives_by_its_latest_packet_and_closes_by_either_end() {
        let settings = settings();
        let now = 100_000 * 1_000_000_000;
        let answered = entry(nat_progress::REPLIED, 100_000 - 3600);
        let quiet_forward = entry(0, 100_000 - 70);
        assert!(alive(
            &settings,
            IPPROTO_TCP,
            [&quiet_forward, &answered],
            now
        ));
        assert!(
            !alive(&settings, IPPROTO_TCP, [&quiet_forward], now),
            "unanswered SYN: 60 s"
        );
        let closed = entry(
            nat_progress::REPLIED | nat_progress::FIN_BACKEND,
            100_000 - 11,
        );
        assert!(
            !alive(&settings, IPPROTO_TCP, [&closed], now),
            "closing: 10 s"
        );
        assert!(
            !alive(&settings, 17, [&entry(0, 100_000 - 61)], now),
            "UDP: 60 s"
        );
    }

    #[test]
    fn reply_entries_pair_with_the_forward_entry_they_answer() {
        let client = LbTuple {
            saddr: 1,
            daddr: 2,
            sport: 1000,
            dport: 80,
            protocol: IPPROTO_TCP,
            pad: [0; 3],
        };
        let to_backend = LbNat {
            saddr: 9,
            daddr: 5,
            sport: 61000,
            dport: 8080,
        };
        let reply_key = LbTuple::answering(&to_backend, IPPROTO_TCP);
        let to_client = LbNat {
            saddr: 2,
            daddr: 1,
            sport: 80,
            dport: 1000,
        };
        let stale_reply_key = LbTuple {
            dport: 61001,
            ..reply_key
        };
        let stale_to = LbNat {
            daddr: 7,
            ..to_client
        };
        let flows = [(
            client,
            LbNatEntry {
                to: to_backend,
                ..LbNatEntry::default()
            },
        )];
        let reverse = [
            (
                reply_key,
                LbNatEntry {
                    to: to_client,
                    ..LbNatEntry::default()
                },
            ),
            (
                stale_reply_key,
                LbNatEntry {
                    to: stale_to,
                    ..LbNatEntry::default()
                },
            ),
        ];
        assert_eq!(
            connections(&flows, &reverse),
            vec![
                (Some(client), Some(reply_key), IPPROTO_TCP),
                (None, Some(stale_reply_key), IPPROTO_TCP),
            ]
        );
    }
}
