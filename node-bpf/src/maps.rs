//! Rust mirrors of the map types in `lib/*.h`. Field order, widths and padding must match the C
//! structs exactly; `tests/btf_layout.rs` compares them with the BTF clang emitted.

/// Name of the per-endpoint counters map (`lib/counters.h`).
pub const ENDPOINT_COUNTERS: &str = "endpoint_counters";

/// Which way a packet went, seen from the endpoint (`enum endpoint_direction`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Sent by the pod.
    FromEndpoint = 0,
    /// Delivered to the pod.
    ToEndpoint = 1,
}

/// `struct endpoint_counter_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointCounterKey {
    /// Interface index of the endpoint's host-side veth.
    pub ifindex: u32,
    /// A [`Direction`] as its number.
    pub direction: u32,
}

impl EndpointCounterKey {
    pub fn new(ifindex: u32, direction: Direction) -> Self {
        Self {
            ifindex,
            direction: direction as u32,
        }
    }
}

/// `struct traffic_counters`: one CPU's share of an endpoint's traffic in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Layer-2 bytes, Ethernet header included.
    pub bytes: u64,
}

impl std::ops::Add for TrafficCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: both types are `repr(C)`, made only of integers, with no padding (checked against
// the BTF by tests/btf_layout.rs), so every bit pattern is a valid value.
unsafe impl aya::Pod for EndpointCounterKey {}
// SAFETY: as above.
unsafe impl aya::Pod for TrafficCounters {}

/// Name of the local endpoints map (`lib/endpoints.h`).
pub const ENDPOINTS: &str = "endpoints";
/// Name of the IP cache (`lib/ipcache.h`).
pub const IPCACHE: &str = "ipcache";
/// Name of the node settings map (`lib/config.h`).
pub const NODE_CONFIG: &str = "node_config";

/// `struct endpoint_key`: a local pod's IPv4 address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ip: u32,
}

impl EndpointKey {
    pub fn new(ip: std::net::Ipv4Addr) -> Self {
        Self {
            ip: u32::from(ip).to_be(),
        }
    }
}

/// `struct endpoint_info`: how to deliver to a local pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The pod's host-side veth.
    pub ifindex: u32,
    pub identity: u32,
    /// The pod's `eth0` MAC address.
    pub mac: [u8; 6],
    /// The host-side veth's MAC, the pod's gateway.
    pub node_mac: [u8; 6],
}

/// `struct ipcache_key`: LPM trie key, prefix length first (aya's `lpm_trie::Key<u32>` has the
/// same layout and is what the map API takes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    /// Network byte order.
    pub ip: u32,
}

/// `struct ipcache_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// The node IPv4 (network byte order) behind which the address lives; 0 for none.
    pub tunnel_endpoint: u32,
}

/// `enum routing_mode`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    Native = 0,
    Tunnel = 1,
}

/// `struct node_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// A [`RoutingMode`] as its number.
    pub routing_mode: u32,
    /// The node's VXLAN device, in tunnel mode.
    pub tunnel_ifindex: u32,
    /// Network byte order.
    pub node_ip: u32,
    pub cluster_id: u32,
    /// Slots of every Maglev table (a prime).
    pub maglev_table_size: u32,
    /// Seeds the flow hash; the same on every node, so every node picks the same backend.
    pub lb_hash_seed: u32,
}

// SAFETY: repr(C), integers and byte arrays only, no padding (tests/btf_layout.rs).
unsafe impl aya::Pod for EndpointKey {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for IpcacheEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for NodeConfig {}

/// Name of the flow event ring buffer (`lib/flows.h`).
pub const FLOW_EVENTS: &str = "flow_events";

/// `struct flow_event`: one reported packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
    /// Network byte order.
    pub src_ip: u32,
    pub dst_ip: u32,
    /// Host byte order; 0 when not TCP or UDP.
    pub src_port: u16,
    pub dst_port: u16,
    /// The device that saw it: a pod's host-side veth, or the VXLAN device.
    pub ifindex: u32,
    pub length: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// A [`FlowVerdict`] as its number.
    pub verdict: u8,
    /// A [`DropReason`] as its number.
    pub drop_reason: u8,
    pub tcp_flags: u8,
    /// An [`ObservationPoint`] as its number.
    pub observation_point: u8,
    pub pad: [u8; 3],
}

impl FlowEvent {
    /// Reads an event from a ring buffer record; `None` when the record is not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length is checked, every bit pattern is a valid FlowEvent (integers
        // only), and read_unaligned copes with the record's alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// `enum flow_verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    Forwarded = 1,
    Dropped = 2,
}

impl FlowVerdict {
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            1 => Some(Self::Forwarded),
            2 => Some(Self::Dropped),
            _ => None,
        }
    }
}

/// `enum observation_point`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservationPoint {
    FromEndpoint = 1,
    ToEndpoint = 2,
    ToOverlay = 3,
    FromNetwork = 4,
}

impl ObservationPoint {
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            1 => Some(Self::FromEndpoint),
            2 => Some(Self::ToEndpoint),
            3 => Some(Self::ToOverlay),
            4 => Some(Self::FromNetwork),
            _ => None,
        }
    }
}

/// `enum drop_reason`: numbered and named in every dropped flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    None = 0,
    RewriteFailed = 1,
    TunnelKeyFailed = 2,
    NoTunnelEndpoint = 3,
    NotIpv4 = 4,
    PolicyDenied = 5,
    NoServiceBackend = 6,
    ServiceNatFailed = 7,
    SourceSpoofed = 8,
    EndpointNotReady = 9,
}

impl DropReason {
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            0 => Some(Self::None),
            1 => Some(Self::RewriteFailed),
            2 => Some(Self::TunnelKeyFailed),
            3 => Some(Self::NoTunnelEndpoint),
            4 => Some(Self::NotIpv4),
            5 => Some(Self::PolicyDenied),
            6 => Some(Self::NoServiceBackend),
            7 => Some(Self::ServiceNatFailed),
            8 => Some(Self::SourceSpoofed),
            9 => Some(Self::EndpointNotReady),
            _ => None,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::None => "",
            Self::RewriteFailed => "Ethernet header rewrite failed",
            Self::TunnelKeyFailed => "VXLAN tunnel key could not be set",
            Self::NoTunnelEndpoint => "no node owns the destination (not in the ipcache)",
            Self::NotIpv4 => "not IPv4",
            Self::PolicyDenied => "denied by policy",
            Self::NoServiceBackend => "the service has no backend for new connections",
            Self::ServiceNatFailed => {
                "service translation failed (packet rewrite, or SNAT ports exhausted)"
            }
            Self::SourceSpoofed => "source address is not the endpoint's",
            Self::EndpointNotReady => {
                "the endpoint's identity or policy is not in place yet (only init traffic passes)"
            }
        }
    }
}

/// Names of the policy maps (`lib/policy.h`) and the conntrack table (`lib/conntrack.h`).
pub const POLICY_PEER_SETS: &str = "policy_peer_sets";
pub const POLICY_ENTRIES: &str = "policy_entries";
pub const ENDPOINT_POLICIES: &str = "endpoint_policies";
pub const CONNTRACK: &str = "conntrack";

/// Words in a peer set: 1,024 peer selectors (`PEER_SET_WORDS`).
pub const PEER_SET_WORDS: usize = 16;
/// Bits of a policy key fixed before the port: endpoint, direction, protocol.
pub const POLICY_KEY_FIXED_BITS: u32 = 48;
/// `POLICY_PROTO_OTHER`: the protocol key of everything but TCP and UDP.
pub const POLICY_PROTO_OTHER: u8 = 0;

/// `struct peer_set`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub words: [u64; PEER_SET_WORDS],
}

/// `enum policy_direction`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyDirection {
    Ingress = 0,
    Egress = 1,
}

/// `struct policy_key` (aya's LPM key wraps the part after the prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub endpoint: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub port: u16,
}

/// The part of [`PolicyKey`] after the prefix length, as aya's `lpm_trie::Key` holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKeyData {
    pub endpoint: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub port: u16,
}

/// `struct policy_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    pub allow: PeerSet,
    pub deny: PeerSet,
}

/// `struct endpoint_policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub isolated_ingress: u8,
    pub isolated_egress: u8,
    /// 1: no policy selects the endpoint (the datapath skips the policy lookups). An endpoint
    /// with no entry at all is one whose policy is not in place yet.
    pub unselected: u8,
    pub pad: u8,
}

/// `struct ct_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// `struct ct_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// CLOCK_MONOTONIC nanoseconds of the connection's last packet.
    pub last_seen_ns: u64,
    /// A [`CtState`] as its number.
    pub state: u8,
    pub opener_is_src: u8,
    pub pad: [u8; 6],
}

/// `enum ct_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    SynSent = 1,
    Established = 2,
    Closing = 3,
}

impl CtState {
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            1 => Some(Self::SynSent),
            2 => Some(Self::Established),
            3 => Some(Self::Closing),
            _ => None,
        }
    }
}

/// The `volatile const` globals of `lib/conntrack.h` that hold each state's lifetime (ns).
pub const CT_LIFETIME_SYN: &str = "ct_lifetime_syn_ns";
pub const CT_LIFETIME_ESTABLISHED: &str = "ct_lifetime_established_ns";
pub const CT_LIFETIME_CLOSING: &str = "ct_lifetime_closing_ns";
pub const CT_LIFETIME_OTHER: &str = "ct_lifetime_other_ns";

// SAFETY: repr(C), integers and byte arrays only, no implicit padding (tests/btf_layout.rs).
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerSet {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyKeyData {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointPolicy {}

include!(concat!(env!("OUT_DIR"), "/map_layouts.rs"));

/// Maps whose size `--map-entries NAME=N` sets, with the size the programs declare. Connection
/// tracking and the NAT tables have flags of their own (their defaults follow the node's
/// memory); the node configuration, the layout record and the flow ring buffer have fixed sizes.
pub const RESIZABLE_MAPS: &[(&str, u32)] = &[
    ("endpoints", 4096),
    ("endpoint_counters", 4096),
    ("endpoint_policies", 4096),
    ("ipcache", 65536),
    ("policy_peer_sets", 65536),
    ("policy_entries", 262144),
    ("lb_frontends", 65536),
    ("lb_backends", 65536),
    ("lb_maglev", 65536),
    ("lb_affinity", 65536),
    ("lb_sock_reverse", 262144),
    ("fragments", 8192),
    ("flow_last_reported", 16384),
    ("node_addresses", 1024),
];

/// `map_layouts` (`lib/config.h`): each pinned map's layout fingerprint, as recorded.
pub const MAP_LAYOUTS_MAP: &str = "map_layouts";

/// `struct map_layout_key`: a map's name, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayoutKey {
    pub name: [u8; 64],
}

impl MapLayoutKey {
    /// The key of the map named `name`; `None` when the name does not fit.
    pub fn of(name: &str) -> Option<Self> {
        let mut key = [0u8; 64];
        key.get_mut(..name.len())?.copy_from_slice(name.as_bytes());
        Some(Self { name: key })
    }
}

// SAFETY: repr(C), a byte array only.
unsafe impl aya::Pod for MapLayoutKey {}

/// The layout fingerprint these programs give the map named `name`.
pub fn layout_of(name: &str) -> Option<u64> {
    MAP_LAYOUTS
        .iter()
        .find(|(map, _)| *map == name)
        .map(|(_, fingerprint)| *fingerprint)
}

/// `node_addresses` (`lib/config.h`): the node's IPv4 addresses (network byte order) → unused.
pub const NODE_ADDRESSES: &str = "node_addresses";

/// Names of the load-balancing maps (`lib/lb.h`).
pub const LB_FRONTENDS: &str = "lb_frontends";
pub const LB_BACKENDS: &str = "lb_backends";
pub const LB_MAGLEV: &str = "lb_maglev";
pub const LB_AFFINITY: &str = "lb_affinity";
pub const LB_SOCK_REVERSE: &str = "lb_sock_reverse";
pub const LB_FLOWS: &str = "lb_flows";
pub const LB_REVERSE: &str = "lb_reverse";

/// `BPF_F_INNER_MAP`: lets Maglev tables of the configured size replace the template's.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `LB_BACKEND_TERMINATING`: the backend drains (no new connections, affinity included).
pub const LB_BACKEND_TERMINATING: u8 = 1;

/// `enum lb_frontend_kind`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbFrontendKind {
    ClusterIp = 0,
    NodePort = 1,
    ExternalIp = 2,
    LoadBalancer = 3,
    /// A pod's `hostPort`.
    HostPort = 4,
}

/// `struct lb_frontend_key`: NodePort frontends have address 0 (every node address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontendKey {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub pad: u8,
}

/// `struct lb_frontend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbFrontend {
    pub service_id: u32,
    pub table_id: u32,
    /// sessionAffinity ClientIP timeout; 0 for none.
    pub affinity_timeout_s: u32,
    /// 0 makes the service refuse new connections at once.
    pub active_backends: u16,
    /// An [`LbFrontendKind`] as its number.
    pub kind: u8,
    pub pad: u8,
}

/// `struct lb_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbBackend {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub cluster_id: u16,
    /// `LB_BACKEND_*` flags.
    pub flags: u8,
    pub pad: [u8; 3],
}

/// `struct lb_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinityKey {
    pub client: u64,
    pub service_id: u32,
    pub client_kind: u32,
}

/// `struct lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinity {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// `struct lb_sock_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSockKey {
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_service_addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbServiceAddr {
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_tuple`: addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbTuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// `struct lb_nat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl LbTuple {
    /// The key of the other direction of the connection whose entry translates to `to`
    /// (`lb_tuple_answering`).
    pub fn answering(to: &LbNat, protocol: u8) -> Self {
        Self {
            saddr: to.daddr,
            daddr: to.saddr,
            sport: to.dport,
            dport: to.sport,
            protocol,
            pad: [0; 3],
        }
    }
}

/// `LB_NAT_*`: how far a translated connection has got (`lb_nat_entry.progress`).
pub mod nat_progress {
    pub const REPLIED: u8 = 0x01;
    pub const FIN_CLIENT: u8 = 0x02;
    pub const FIN_BACKEND: u8 = 0x04;
    pub const RST: u8 = 0x08;
}

/// `struct lb_nat_entry`: one direction of a translated connection (`lb_flows`, `lb_reverse`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNatEntry {
    pub to: LbNat,
    /// [`nat_progress`] bits.
    pub progress: u8,
    pub pad: [u8; 3],
    /// `bpf_ktime_get_ns` of the last packet in this entry's direction.
    pub last_seen_ns: u64,
}

/// Globals of the SNAT port range (`lib/lb.h`), set at load time.
pub const LB_SNAT_PORT_MIN: &str = "lb_snat_port_min";
pub const LB_SNAT_PORT_COUNT: &str = "lb_snat_port_count";

// SAFETY: repr(C), integers and byte arrays only, no implicit padding (tests/btf_layout.rs).
unsafe impl aya::Pod for LbFrontendKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbFrontend {}
// SAFETY: as above.
unsafe impl aya::Pod for LbBackend {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinity {}
// SAFETY: as above.
unsafe impl aya::Pod for LbSockKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbServiceAddr {}
// SAFETY: as above.
unsafe impl aya::Pod for LbTuple {}
// SAFETY: as above.
unsafe impl aya::Pod for LbNat {}
// SAFETY: as above.
unsafe impl aya::Pod for LbNatEntry {}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn every_map_has_a_layout_and_layouts_tell_types_apart() {
        for name in [
            CONNTRACK,
            ENDPOINTS,
            IPCACHE,
            LB_FLOWS,
            LB_REVERSE,
            MAP_LAYOUTS_MAP,
        ] {
            assert!(layout_of(name).is_some(), "{name}");
        }
        // The two NAT tables declare the same key and value types; the others do not.
        assert_eq!(layout_of(LB_FLOWS), layout_of(LB_REVERSE));
        assert_ne!(layout_of(LB_FLOWS), layout_of(CONNTRACK));
        assert_ne!(layout_of(LB_FRONTENDS), layout_of(LB_BACKENDS));
        assert!(MapLayoutKey::of(&"x".repeat(65)).is_none());
        assert_eq!(
            MapLayoutKey::of("ab").map(|key| key.name[..3].to_vec()),
            Some(vec![b'a', b'b', 0])
        );
    }
}
