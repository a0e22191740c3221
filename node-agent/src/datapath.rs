//! The node's eBPF datapath: loads the pod and host programs with their maps pinned in the
//! node's bpffs directory, attaches them with tcx (pinning the links too), and writes the maps.
//!
//! Everything the kernel needs survives the agent: maps and links are pinned, so pods keep
//! talking while the agent is down, and a restarted agent opens the same maps again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, HashOfMaps, MapData, PerCpuHashMap, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LinkOrder};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use weft_node_bpf::maps::{
    Direction, EndpointCounterKey, EndpointInfo, EndpointKey, EndpointPolicy, IpcacheEntry,
    LbAffinity, LbAffinityKey, LbBackend, LbFrontend, LbFrontendKey, MapLayoutKey, NodeConfig,
    PeerSet, PolicyEntry, PolicyKeyData, TrafficCounters, BPF_F_INNER_MAP, ENDPOINTS,
    ENDPOINT_COUNTERS, ENDPOINT_POLICIES, FLOW_EVENTS, IPCACHE, LB_AFFINITY, LB_BACKENDS,
    LB_FRONTENDS, LB_MAGLEV, NODE_CONFIG, POLICY_ENTRIES, POLICY_KEY_FIXED_BITS, POLICY_PEER_SETS,
};
use weft_node_bpf::{maps, programs, HOST_OBJECT, POD_OBJECT, SOCK_OBJECT};

use crate::conntrack::CtSettings;
use crate::map_pressure::{self, FullMap, MapPressure, MapPressureMetrics, BPF_NOEXIST};
use crate::nat::NatSettings;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot create the pin directory {path}: {source}; it must be on a mounted bpffs (mount -t bpf bpffs DIR)")]
    PinDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel refused Weft's {object} object: {source}; check BPF and BTF support (CONFIG_BPF_SYSCALL, CONFIG_DEBUG_INFO_BTF), that the agent runs privileged, and that the pin directory is on bpffs")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the {0} program is missing from the embedded objects; the build embedded a stale object"
    )]
    MissingProgram(&'static str),
    #[error("program {name} failed to load or verify: {source}")]
    Verify {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach {name} to {interface} ({direction}) with tcx: {source}; tcx needs Linux 6.6 or later and the interface must exist in the agent's network namespace")]
    Attach {
        name: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot pin the link of {name} on {interface} at {path}: {reason}")]
    PinLink {
        name: &'static str,
        interface: String,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot list the tcx programs on {interface}: {source}")]
    Query {
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot open the cgroup {path} for socket-level load balancing: {source}; pass a cgroup v2 directory with --cgroup-root")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot attach {name} to the cgroup {path}: {source}; socket-level load balancing needs cgroup v2 and Linux 5.8 or later")]
    AttachCgroup {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the embedded objects have no map {0:?}; the build embedded a stale object")]
    MissingMap(&'static str),
    #[error("{}", .0.describe())]
    MapFull(FullMap),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

/// What one endpoint sent and received, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointTraffic {
    pub sent: TrafficCounters,
    pub received: TrafficCounters,
}

/// Keys found in the load-balancing maps (left by an earlier agent, say).
pub struct InstalledLoadBalancing {
    pub frontends: Vec<(LbFrontendKey, LbFrontend)>,
    pub backends: Vec<(u32, LbBackend)>,
    pub tables: Vec<u32>,
}

/// Keys found in the policy maps (left by an earlier agent, say).
#[derive(Default)]
pub struct InstalledPolicy {
    /// Host veth ifindexes with an isolation entry (`endpoint_policies`).
    pub endpoints: Vec<u32>,
    /// Identities with a peer set (`policy_peer_sets`).
    pub peer_sets: Vec<u32>,
    /// Port entries (`policy_entries`) as [`Datapath::upsert_policy_entry`] takes them: the
    /// key's data (port in network byte order) and how many bits of the port are significant.
    pub entries: Vec<(PolicyKeyData, u8)>,
}

/// Sizes of maps set at load time (`--map-entries`), for the maps of
/// [`maps::RESIZABLE_MAPS`]; a map not named keeps the size the programs declare. A size
/// applies when the map is created: an existing pinned map keeps its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries(pub BTreeMap<String, u32>);

impl std::str::FromStr for MapEntries {
    type Err = String;

    /// One `NAME=ENTRIES`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, entries) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not NAME=ENTRIES"))?;
        if !maps::RESIZABLE_MAPS.iter().any(|(map, _)| *map == name) {
            let names: Vec<&str> = maps::RESIZABLE_MAPS.iter().map(|(map, _)| *map).collect();
            return Err(format!(
                "{name:?} is not a map whose size can be set; one of: {} (connection tracking and NAT: --ct-max-entries, --nat-max-entries)",
                names.join(", ")
            ));
        }
        let entries: u32 = entries
            .parse()
            .ok()
            .filter(|entries| *entries > 0)
            .ok_or_else(|| format!("{entries:?} is not a positive number of entries"))?;
        Ok(Self(BTreeMap::from([(name.to_owned(), entries)])))
    }
}

impl MapEntries {
    /// Every `NAME=ENTRIES` given, the last one of a name winning.
    pub fn merged(all: impl IntoIterator<Item = MapEntries>) -> Self {
        Self(all.into_iter().flat_map(|entries| entries.0).collect())
    }
}

/// The loaded programs and their pinned maps.
pub struct Datapath {
    pod: Ebpf,
    host: Ebpf,
    sock: Ebpf,
    pin_dir: PathBuf,
    pressure: MapPressure,
}

/// The socket-level programs and where each attaches in a cgroup.
const SOCK_PROGRAMS: [&str; 4] = [
    programs::SOCK_CONNECT4,
    programs::SOCK_SENDMSG4,
    programs::SOCK_RECVMSG4,
    programs::SOCK_GETPEERNAME4,
];

impl Datapath {
    /// Loads both objects, pinning their maps in `pin_dir` (which must be on bpffs) or reusing
    /// the maps already pinned there, and runs every program through the verifier. Connection
    /// tracking gets its lifetimes and, when the table is created, its size from `conntrack`;
    /// service NAT its SNAT ports and table sizes from `nat`.
    pub fn load(
        pin_dir: &Path,
        conntrack: &CtSettings,
        nat: &NatSettings,
        map_entries: &MapEntries,
        pressure: MapPressureMetrics,
    ) -> Result<Self, DatapathError> {
        for dir in [pin_dir.to_owned(), pin_dir.join("links")] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| DatapathError::PinDirectory { path: dir, source })?;
        }
        let recorded = recorded_layouts(pin_dir);
        for object in [POD_OBJECT, HOST_OBJECT, SOCK_OBJECT] {
            drop_pins_of_changed_layout(pin_dir, object, &recorded);
        }
        let nanos = |lifetime: std::time::Duration| -> u64 {
            u64::try_from(lifetime.as_nanos()).unwrap_or(u64::MAX)
        };
        let lifetimes = [
            (maps::CT_LIFETIME_SYN, nanos(conntrack.syn)),
            (maps::CT_LIFETIME_ESTABLISHED, nanos(conntrack.established)),
            (maps::CT_LIFETIME_CLOSING, nanos(conntrack.closing)),
            (maps::CT_LIFETIME_OTHER, nanos(conntrack.other)),
        ];
        let snat_ports = [
            (maps::LB_SNAT_PORT_MIN, u32::from(nat.snat_ports.first)),
            (maps::LB_SNAT_PORT_COUNT, nat.snat_ports.count()),
        ];
        let load = |object: &'static str, bytes: &[u8]| {
            let mut loader = EbpfLoader::new();
            loader
                .default_map_pin_directory(pin_dir)
                .map_max_entries(maps::CONNTRACK, conntrack.max_entries)
                .map_max_entries(maps::LB_FLOWS, nat.max_entries)
                .map_max_entries(maps::LB_REVERSE, nat.max_entries);
            for (name, entries) in &map_entries.0 {
                loader.map_max_entries(name, *entries);
            }
            // Not every object tracks connections or translates (the socket programs do not).
            for (name, value) in &lifetimes {
                loader.override_global(name, value, false);
            }
            for (name, value) in &snat_ports {
                loader.override_global(name, value, false);
            }
            loader.load(bytes).map_err(|source| DatapathError::Load {
                object,
                source: Box::new(source),
            })
        };
        let mut pod = load("pod", POD_OBJECT)?;
        let mut host = load("host", HOST_OBJECT)?;
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            load_program(&mut pod, name)?;
        }
        load_program(&mut host, programs::FROM_NETWORK)?;
        load_program(&mut host, programs::TO_TUNNEL)?;
        let mut sock = load("sock", SOCK_OBJECT)?;
        for name in SOCK_PROGRAMS {
            sock_program(&mut sock, name)?
                .load()
                .map_err(|source| DatapathError::Verify {
                    name,
                    source: Box::new(source),
                })?;
        }
        let mut datapath = Self {
            pod,
            host,
            sock,
            pin_dir: pin_dir.to_owned(),
            pressure: MapPressure::new(
                pressure,
                &[
                    ENDPOINTS,
                    IPCACHE,
                    POLICY_PEER_SETS,
                    POLICY_ENTRIES,
                    ENDPOINT_POLICIES,
                    LB_FRONTENDS,
                    LB_BACKENDS,
                    LB_MAGLEV,
                ],
            ),
        };
        datapath.record_layouts()?;
        Ok(datapath)
    }

    /// Records the layout of every map these programs use, for the next agent to compare.
    fn record_layouts(&mut self) -> Result<(), DatapathError> {
        let mut recorded: HashMap<_, MapLayoutKey, u64> = self.hash_map(maps::MAP_LAYOUTS_MAP)?;
        for (name, fingerprint) in maps::MAP_LAYOUTS {
            if let Some(key) = MapLayoutKey::of(name) {
                recorded
                    .insert(key, fingerprint, 0)
                    .map_err(map_error(maps::MAP_LAYOUTS_MAP))?;
            }
        }
        Ok(())
    }

    /// The bpffs directory the maps are pinned in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the socket-level load balancer to `cgroup` (a cgroup v2 directory): every
    /// socket of a process in it or below (the node's pods and host processes) is balanced at
    /// connect()/sendmsg(). The links are pinned, replacing those of an earlier agent.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let directory = std::fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join("links").join(format!("cgroup_{name}"));
            let program = sock_program(&mut self.sock, name)?;
            let attach_error = |source| DatapathError::AttachCgroup {
                name,
                path: cgroup.to_owned(),
                source: Box::new(source),
            };
            // A cgroup link always composes with other programs (the kernel treats links as
            // BPF_F_ALLOW_MULTI) and refuses any flag: `Single` is what passes none.
            let link_id = program
                .attach(&directory, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let pin_error = |reason: String| DatapathError::PinLink {
                name,
                interface: cgroup.display().to_string(),
                path: pin.clone(),
                reason,
            };
            let link: FdLink = program
                .take_link(link_id)
                .map_err(|error| pin_error(error.to_string()))?
                .try_into()
                .map_err(|error: aya::programs::links::LinkError| pin_error(error.to_string()))?;
            // The new program runs before the old link goes: no socket is ever unbalanced.
            // Dropping the last reference (the old pin) detaches the old program.
            if pin.exists() {
                let _ = std::fs::remove_file(&pin);
            }
            link.pin(&pin)
                .map_err(|error| pin_error(error.to_string()))?;
        }
        Ok(())
    }

    /// Attaches the pod programs to a pod's host-side veth (in the calling thread's network
    /// namespace): `from_container` on ingress, `to_container` on egress. The links are pinned,
    /// replacing links pinned for an earlier device of the same name.
    pub fn attach_endpoint(&mut self, host_veth: &str) -> Result<(), DatapathError> {
        for (name, attach_type, direction) in [
            (programs::FROM_CONTAINER, TcAttachType::Ingress, "ingress"),
            (programs::TO_CONTAINER, TcAttachType::Egress, "egress"),
        ] {
            let pin = self.link_pin(host_veth, direction);
            attach_pinned(&mut self.pod, name, host_veth, attach_type, direction, &pin)?;
        }
        Ok(())
    }

    /// Attaches `from_network` to a node device's ingress (the uplink, the VXLAN device).
    pub fn attach_network(&mut self, device: &str) -> Result<(), DatapathError> {
        let pin = self.link_pin(device, "ingress");
        attach_pinned(
            &mut self.host,
            programs::FROM_NETWORK,
            device,
            TcAttachType::Ingress,
            "ingress",
            &pin,
        )
    }

    /// Attaches `from_network` (ingress) and `to_tunnel` (egress) to the VXLAN device.
    pub fn attach_tunnel(&mut self, device: &str) -> Result<(), DatapathError> {
        self.attach_network(device)?;
        let pin = self.link_pin(device, "egress");
        attach_pinned(
            &mut self.host,
            programs::TO_TUNNEL,
            device,
            TcAttachType::Egress,
            "egress",
            &pin,
        )
    }

    /// Detaches whatever Weft attached to `interface` (a pod's veth on CNI DEL). A device that
    /// is already gone took its attachments with it; only the pins remain to remove.
    pub fn detach(&mut self, interface: &str) {
        for direction in ["ingress", "egress"] {
            let pin = self.link_pin(interface, direction);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                match link.unpin() {
                    Ok(link) => drop(link),
                    Err(error) => {
                        tracing::warn!(%error, pin = %pin.display(), "cannot remove a link pin")
                    }
                }
            }
        }
    }

    fn link_pin(&self, interface: &str, direction: &str) -> PathBuf {
        // bpffs refuses names with '.', which interface names may contain (VLANs: eth0.100).
        let interface = interface.replace('.', "%2E");
        self.pin_dir
            .join("links")
            .join(format!("{direction}_{interface}"))
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        hash_map(&mut self.pod, name)
    }

    fn lpm_trie<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, V>, DatapathError> {
        lpm_trie(&mut self.pod, name)
    }

    /// Writes one entry of the pod object's map `name` with `insert` (given the update
    /// flags), telling a full map apart from other failures (see [`crate::map_pressure`]).
    fn write(
        &mut self,
        name: &'static str,
        mut insert: impl FnMut(&mut Ebpf, u64) -> Result<Result<(), aya::maps::MapError>, DatapathError>,
    ) -> Result<(), DatapathError> {
        if self.pressure.is_full(name) {
            // Only a key that was not there proves room: replacing one succeeds when full.
            match insert(&mut self.pod, BPF_NOEXIST)? {
                Ok(()) => {
                    self.pressure.has_room(name);
                    self.pressure.updated(name);
                    return Ok(());
                }
                Err(error) if map_pressure::key_exists(&error) => {}
                Err(error) => return Err(self.write_failed(name, error)),
            }
        }
        match insert(&mut self.pod, 0)? {
            Ok(()) => {
                self.pressure.updated(name);
                Ok(())
            }
            Err(error) => Err(self.write_failed(name, error)),
        }
    }

    fn write_failed(&mut self, name: &'static str, error: aya::maps::MapError) -> DatapathError {
        if !map_pressure::is_full(&error) {
            return map_error(name)(error);
        }
        let max_entries = aya::maps::MapInfo::from_pin(self.pin_dir.join(name))
            .ok()
            .map(|info| info.max_entries());
        DatapathError::MapFull(self.pressure.refused(name, max_entries))
    }

    /// [`removed`], and a map that was full has room once an entry went.
    fn removed(
        &mut self,
        name: &'static str,
        result: Result<(), aya::maps::MapError>,
    ) -> Result<(), DatapathError> {
        if result.is_ok() {
            self.pressure.has_room(name);
            self.pressure.deleted(name);
        }
        removed(name, result)
    }

    /// Counts entries of `map` a check found other than the agent wrote them.
    pub fn drift_found(&self, map: &str, count: usize) {
        if count > 0 {
            tracing::warn!(
                map,
                entries = count,
                "datapath entries differ from what the agent wrote; writing them again"
            );
        }
        self.pressure.drifted(map, count);
    }

    /// The maps that refused a write for want of room and have had none since.
    pub fn full_maps(&self) -> Vec<FullMap> {
        self.pressure.full_maps()
    }

    /// Maglev table id → the table (`lb_maglev`, a hash of maps).
    fn maglev_tables(
        &mut self,
    ) -> Result<HashOfMaps<&mut MapData, u32, Array<MapData, u32>>, DatapathError> {
        maglev_tables(&mut self.pod)
    }

    pub fn configure(&mut self, config: NodeConfig) -> Result<(), DatapathError> {
        let map = self
            .pod
            .map_mut(NODE_CONFIG)
            .ok_or(DatapathError::MissingMap(NODE_CONFIG))?;
        let mut array: Array<&mut MapData, NodeConfig> =
            Array::try_from(map).map_err(map_error(NODE_CONFIG))?;
        array.set(0, config, 0).map_err(map_error(NODE_CONFIG))
    }

    /// Makes a local pod reachable at `ip`.
    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<(), DatapathError> {
        let key = EndpointKey::new(ip);
        self.write(ENDPOINTS, |pod, flags| {
            Ok(hash_map(pod, ENDPOINTS)?.insert(key, info, flags))
        })
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut endpoints: HashMap<_, EndpointKey, EndpointInfo> = self.hash_map(ENDPOINTS)?;
        let result = endpoints.remove(&EndpointKey::new(ip));
        self.removed(ENDPOINTS, result)
    }

    /// Records what the node knows about `prefix`: its identity and the node it lives behind.
    pub fn upsert_ipcache(
        &mut self,
        prefix: Ipv4Net,
        entry: IpcacheEntry,
    ) -> Result<(), DatapathError> {
        let key = LpmKey::new(
            u32::from(prefix.prefix_len()),
            u32::from(prefix.network()).to_be(),
        );
        self.write(IPCACHE, |pod, flags| {
            Ok(lpm_trie(pod, IPCACHE)?.insert(&key, entry, flags))
        })
    }

    pub fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError> {
        let key = LpmKey::new(
            u32::from(prefix.prefix_len()),
            u32::from(prefix.network()).to_be(),
        );
        let mut ipcache: LpmTrie<_, u32, IpcacheEntry> = self.lpm_trie(IPCACHE)?;
        let result = ipcache.remove(&key);
        self.removed(IPCACHE, result)
    }

    /// Every ipcache entry (a restarted agent finds what the one before it wrote).
    pub fn ipcache_entries(&mut self) -> Result<Vec<(Ipv4Net, IpcacheEntry)>, DatapathError> {
        let ipcache: LpmTrie<_, u32, IpcacheEntry> = self.lpm_trie(IPCACHE)?;
        let mut entries = Vec::new();
        for item in ipcache.iter() {
            let (key, entry) = item.map_err(map_error(IPCACHE))?;
            let prefix = u8::try_from(key.prefix_len())
                .ok()
                .and_then(|len| Ipv4Net::new(Ipv4Addr::from(u32::from_be(key.data())), len).ok());
            if let Some(prefix) = prefix {
                entries.push((prefix, entry));
            }
        }
        Ok(entries)
    }

    pub fn upsert_peer_set(&mut self, identity: u32, set: PeerSet) -> Result<(), DatapathError> {
        self.write(POLICY_PEER_SETS, |pod, flags| {
            Ok(hash_map(pod, POLICY_PEER_SETS)?.insert(identity, set, flags))
        })
    }

    pub fn remove_peer_set(&mut self, identity: u32) -> Result<(), DatapathError> {
        let mut sets: HashMap<_, u32, PeerSet> = self.hash_map(POLICY_PEER_SETS)?;
        let result = sets.remove(&identity);
        self.removed(POLICY_PEER_SETS, result)
    }

    /// `port_bits` of `data.port` (network byte order) are significant.
    pub fn upsert_policy_entry(
        &mut self,
        data: PolicyKeyData,
        port_bits: u8,
        entry: PolicyEntry,
    ) -> Result<(), DatapathError> {
        let key = LpmKey::new(POLICY_KEY_FIXED_BITS + u32::from(port_bits), data);
        self.write(POLICY_ENTRIES, |pod, flags| {
            Ok(lpm_trie(pod, POLICY_ENTRIES)?.insert(&key, entry, flags))
        })
    }

    pub fn remove_policy_entry(
        &mut self,
        data: PolicyKeyData,
        port_bits: u8,
    ) -> Result<(), DatapathError> {
        let key = LpmKey::new(POLICY_KEY_FIXED_BITS + u32::from(port_bits), data);
        let mut entries: LpmTrie<_, PolicyKeyData, PolicyEntry> = self.lpm_trie(POLICY_ENTRIES)?;
        let result = entries.remove(&key);
        self.removed(POLICY_ENTRIES, result)
    }

    pub fn upsert_endpoint_policy(
        &mut self,
        ifindex: u32,
        state: EndpointPolicy,
    ) -> Result<(), DatapathError> {
        self.write(ENDPOINT_POLICIES, |pod, flags| {
            Ok(hash_map(pod, ENDPOINT_POLICIES)?.insert(ifindex, state, flags))
        })
    }

    pub fn remove_endpoint_policy(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let mut states: HashMap<_, u32, EndpointPolicy> = self.hash_map(ENDPOINT_POLICIES)?;
        let result = states.remove(&ifindex);
        self.removed(ENDPOINT_POLICIES, result)
    }

    /// What an earlier agent left in the policy maps, so that what the policy in force no
    /// longer wants can be removed. An entry whose prefix length does not fit the key's layout
    /// (fixed part, then at most 16 port bits) is skipped: it was not written by an agent.
    pub fn installed_policy(&mut self) -> Result<InstalledPolicy, DatapathError> {
        let states: HashMap<_, u32, EndpointPolicy> = self.hash_map(ENDPOINT_POLICIES)?;
        let endpoints = states
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(ENDPOINT_POLICIES))?;
        let sets: HashMap<_, u32, PeerSet> = self.hash_map(POLICY_PEER_SETS)?;
        let peer_sets = sets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(POLICY_PEER_SETS))?;
        let trie: LpmTrie<_, PolicyKeyData, PolicyEntry> = self.lpm_trie(POLICY_ENTRIES)?;
        let mut entries = Vec::new();
        for key in trie.keys() {
            let key = key.map_err(map_error(POLICY_ENTRIES))?;
            let port_bits = key
                .prefix_len()
                .checked_sub(POLICY_KEY_FIXED_BITS)
                .filter(|bits| *bits <= u16::BITS)
                .and_then(|bits| u8::try_from(bits).ok());
            if let Some(port_bits) = port_bits {
                entries.push((key.data(), port_bits));
            }
        }
        Ok(InstalledPolicy {
            endpoints,
            peer_sets,
            entries,
        })
    }

    pub fn upsert_frontend(
        &mut self,
        key: LbFrontendKey,
        frontend: LbFrontend,
    ) -> Result<(), DatapathError> {
        self.write(LB_FRONTENDS, |pod, flags| {
            Ok(hash_map(pod, LB_FRONTENDS)?.insert(key, frontend, flags))
        })
    }

    pub fn remove_frontend(&mut self, key: LbFrontendKey) -> Result<(), DatapathError> {
        let mut frontends: HashMap<_, LbFrontendKey, LbFrontend> = self.hash_map(LB_FRONTENDS)?;
        let result = frontends.remove(&key);
        self.removed(LB_FRONTENDS, result)
    }

    pub fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), DatapathError> {
        self.write(LB_BACKENDS, |pod, flags| {
            Ok(hash_map(pod, LB_BACKENDS)?.insert(id, backend, flags))
        })
    }

    pub fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        let mut backends: HashMap<_, u32, LbBackend> = self.hash_map(LB_BACKENDS)?;
        let result = backends.remove(&id);
        self.removed(LB_BACKENDS, result)
    }

    /// Installs a Maglev table (slot → backend id) under `table_id`: a new inner array of the
    /// table's size, filled before it becomes visible, then swapped in whole.
    pub fn install_maglev_table(
        &mut self,
        table_id: u32,
        slots: &[u32],
    ) -> Result<(), DatapathError> {
        let size = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        let mut table: Array<MapData, u32> =
            Array::create(size, BPF_F_INNER_MAP).map_err(map_error(LB_MAGLEV))?;
        for (slot, backend_id) in (0u32..).zip(slots) {
            table
                .set(slot, backend_id, 0)
                .map_err(map_error(LB_MAGLEV))?;
        }
        self.write(LB_MAGLEV, |pod, flags| {
            Ok(maglev_tables(pod)?.insert(table_id, &table, flags))
        })
    }

    pub fn remove_maglev_table(&mut self, table_id: u32) -> Result<(), DatapathError> {
        let mut tables = self.maglev_tables()?;
        let result = tables.remove(&table_id);
        self.removed(LB_MAGLEV, result)
    }

    /// What an earlier agent left in the load-balancing maps: frontend keys, backend ids and
    /// Maglev table ids, so they can be replaced and then removed.
    pub fn installed_load_balancing(&mut self) -> Result<InstalledLoadBalancing, DatapathError> {
        let frontends: HashMap<_, LbFrontendKey, LbFrontend> = self.hash_map(LB_FRONTENDS)?;
        let frontends = frontends.iter().filter_map(Result::ok).collect();
        let backends: HashMap<_, u32, LbBackend> = self.hash_map(LB_BACKENDS)?;
        let backends = backends.iter().filter_map(Result::ok).collect();
        let tables = self.maglev_tables()?;
        let table_ids = tables.keys().filter_map(Result::ok).collect();
        Ok(InstalledLoadBalancing {
            frontends,
            backends,
            tables: table_ids,
        })
    }

    /// Keeps the session-affinity choices `keep` accepts and forgets the others.
    pub fn retain_affinity(
        &mut self,
        keep: impl Fn(&LbAffinityKey, &LbAffinity) -> bool,
    ) -> Result<(), DatapathError> {
        let mut affinity: HashMap<_, LbAffinityKey, LbAffinity> = self.hash_map(LB_AFFINITY)?;
        let forgotten: Vec<LbAffinityKey> = affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| !keep(key, value))
            .map(|(key, _)| key)
            .collect();
        for key in forgotten {
            removed(LB_AFFINITY, affinity.remove(&key))?;
        }
        Ok(())
    }

    /// The flow event ring buffer, for the one reader the agent runs.
    pub fn take_flow_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .pod
            .take_map(FLOW_EVENTS)
            .ok_or(DatapathError::MissingMap(FLOW_EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(FLOW_EVENTS))
    }

    /// Removes an endpoint's packet counters (both directions), as it goes away: a later
    /// endpoint on a reused ifindex starts from zero.
    pub fn remove_counters(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let map = self
            .pod
            .map_mut(ENDPOINT_COUNTERS)
            .ok_or(DatapathError::MissingMap(ENDPOINT_COUNTERS))?;
        let mut counters: PerCpuHashMap<_, EndpointCounterKey, TrafficCounters> =
            PerCpuHashMap::try_from(map).map_err(map_error(ENDPOINT_COUNTERS))?;
        for direction in [Direction::FromEndpoint, Direction::ToEndpoint] {
            removed(
                ENDPOINT_COUNTERS,
                counters.remove(&EndpointCounterKey::new(ifindex, direction)),
            )?;
        }
        Ok(())
    }

    /// The traffic counted for the endpoint behind the host-side veth `ifindex`.
    pub fn traffic(&self, ifindex: u32) -> Result<EndpointTraffic, DatapathError> {
        let map = self
            .pod
            .map(ENDPOINT_COUNTERS)
            .ok_or(DatapathError::MissingMap(ENDPOINT_COUNTERS))?;
        let counters: PerCpuHashMap<_, EndpointCounterKey, TrafficCounters> =
            PerCpuHashMap::try_from(map).map_err(map_error(ENDPOINT_COUNTERS))?;
        let sum = |direction| -> Result<TrafficCounters, DatapathError> {
            match counters.get(&EndpointCounterKey::new(ifindex, direction), 0) {
                Ok(per_cpu) => Ok(per_cpu
                    .iter()
                    .copied()
                    .fold(TrafficCounters::default(), |total, cpu| total + cpu)),
                // No packet seen yet in this direction.
                Err(aya::maps::MapError::KeyNotFound) => Ok(TrafficCounters::default()),
                Err(error) => Err(map_error(ENDPOINT_COUNTERS)(error)),
            }
        };
        Ok(EndpointTraffic {
            sent: sum(Direction::FromEndpoint)?,
            received: sum(Direction::ToEndpoint)?,
        })
    }
}

/// A removal of something already gone is not an error (deletes are idempotent).
fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    object: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, DatapathError> {
    let map = object
        .map_mut(name)
        .ok_or(DatapathError::MissingMap(name))?;
    HashMap::try_from(map).map_err(map_error(name))
}

fn lpm_trie<'a, K: aya::Pod, V: aya::Pod>(
    object: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>, DatapathError> {
    let map = object
        .map_mut(name)
        .ok_or(DatapathError::MissingMap(name))?;
    LpmTrie::try_from(map).map_err(map_error(name))
}

fn maglev_tables(
    object: &mut Ebpf,
) -> Result<HashOfMaps<&mut MapData, u32, Array<MapData, u32>>, DatapathError> {
    let map = object
        .map_mut(LB_MAGLEV)
        .ok_or(DatapathError::MissingMap(LB_MAGLEV))?;
    HashOfMaps::try_from(map).map_err(map_error(LB_MAGLEV))
}

fn removed(
    name: &'static str,
    result: Result<(), aya::maps::MapError>,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // aya reports a delete of a missing key as the syscall's ENOENT, not KeyNotFound.
        Err(aya::maps::MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(error) => Err(map_error(name)(error)),
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    classifier(ebpf, name)?
        .load()
        .map_err(|source| DatapathError::Verify {
            name,
            source: Box::new(source),
        })
}

/// Removes the pin of every map that `object` defines with another kind, key or value size, or
/// recorded layout fingerprint than the pinned one (a map an earlier version of the programs
/// created), so loading creates it anew
/// instead of handing the new programs a map they would read with the wrong layout. Programs
/// still attached keep the old map until they are replaced; the agent repopulates the new one
/// (endpoints, peers, policy, services) before it re-attaches them
/// ([`Datapath::reattach_endpoint`]). What only a lost map knew is gone: a recreated
/// connection-tracking table makes replies of running connections be judged by policy again.
/// The layout fingerprints an earlier agent recorded (`map_layouts`), by map name; empty when
/// there is no record (a fresh node, or a version before the record existed).
fn recorded_layouts(pin_dir: &Path) -> std::collections::HashMap<String, u64> {
    let Ok(map) = MapData::from_pin(pin_dir.join(maps::MAP_LAYOUTS_MAP)) else {
        return std::collections::HashMap::new();
    };
    let Ok(recorded) = aya::maps::Map::from_map_data(map)
        .map_err(|error| error.to_string())
        .and_then(|map| {
            HashMap::<_, MapLayoutKey, u64>::try_from(map).map_err(|error| error.to_string())
        })
    else {
        return std::collections::HashMap::new();
    };
    recorded
        .iter()
        .filter_map(Result::ok)
        .map(|(key, fingerprint)| {
            let end = key
                .name
                .iter()
                .position(|byte| *byte == 0)
                .unwrap_or(key.name.len());
            (
                String::from_utf8_lossy(&key.name[..end]).into_owned(),
                fingerprint,
            )
        })
        .collect()
}

fn drop_pins_of_changed_layout(
    pin_dir: &Path,
    object: &[u8],
    recorded: &std::collections::HashMap<String, u64>,
) {
    let Ok(parsed) = aya_obj::Object::parse(object) else {
        return; // the loader reports it
    };
    for (name, map) in &parsed.maps {
        let pin = pin_dir.join(name);
        let Ok(pinned) = MapData::from_pin(&pin) else {
            continue;
        };
        let Ok(info) = pinned.info() else {
            continue;
        };
        // A kind of map the loader cannot name counts as changed.
        let found_type = info.map_type().map_or(u32::MAX, |kind| kind as u32);
        let wanted = (map.map_type(), map.key_size(), map.value_size());
        let found = (found_type, info.key_size(), info.value_size());
        // The recorded fingerprint also catches what keeps the sizes: fields reordered, retyped
        // or renamed. Without a record (an agent from before it), the sizes must do.
        let fingerprints = (recorded.get(name.as_str()).copied(), maps::layout_of(name));
        let fingerprint_differs = matches!(fingerprints, (Some(was), Some(is)) if was != is);
        if wanted != found || fingerprint_differs {
            tracing::warn!(
                map = %name,
                map_type = found.0,
                key_size = found.1,
                value_size = found.2,
                new_map_type = wanted.0,
                new_key_size = wanted.1,
                new_value_size = wanted.2,
                recorded_layout = ?fingerprints.0,
                layout = ?fingerprints.1,
                "a pinned map has another layout than these programs: it is recreated and repopulated"
            );
            if let Err(error) = std::fs::remove_file(&pin) {
                tracing::error!(%error, pin = %pin.display(), "cannot remove the pin of a map whose layout changed; loading will fail");
            }
        }
    }
}

fn attach_pinned(
    ebpf: &mut Ebpf,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    direction: &'static str,
    pin: &Path,
) -> Result<(), DatapathError> {
    let program = classifier(ebpf, name)?;
    let link_id = program
        .attach_with_options(
            interface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| DatapathError::Attach {
            name,
            interface: interface.to_owned(),
            direction,
            source: Box::new(source),
        })?;
    let pin_error = |reason: String| DatapathError::PinLink {
        name,
        interface: interface.to_owned(),
        path: pin.to_owned(),
        reason,
    };
    let link = program
        .take_link(link_id)
        .map_err(|error| pin_error(error.to_string()))?;
    let link: FdLink = link
        .try_into()
        .map_err(|error: aya::programs::links::LinkError| pin_error(error.to_string()))?;
    // A pin left by a deleted device of the same name holds a defunct link: replace it.
    if pin.exists() {
        let _ = std::fs::remove_file(pin);
    }
    link.pin(pin)
        .map_err(|error| pin_error(error.to_string()))?;
    Ok(())
}

/// Names of the tcx programs attached to `interface` (in the calling thread's namespace), in
/// run order: `ingress` true for the ingress hook, false for egress.
pub fn attached_programs(interface: &str, ingress: bool) -> Result<Vec<String>, DatapathError> {
    let attach_type = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    let (_revision, programs) =
        SchedClassifier::query_tcx(interface, attach_type).map_err(|source| {
            DatapathError::Query {
                interface: interface.to_owned(),
                source: Box::new(source),
            }
        })?;
    Ok(programs
        .iter()
        .map(|program| program.name_as_str().unwrap_or("<unnamed>").to_owned())
        .collect())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_name_a_resizable_map_and_a_positive_size() {
        let parsed: Vec<MapEntries> = ["endpoints=8192", "ipcache=131072", "endpoints=16384"]
            .iter()
            .map(|text| text.parse().expect("valid"))
            .collect();
        assert_eq!(
            MapEntries::merged(parsed).0,
            BTreeMap::from([("endpoints".into(), 16384), ("ipcache".into(), 131072)])
        );
        let unknown = "conntrack=5".parse::<MapEntries>().expect_err("own flag");
        assert!(unknown.contains("--ct-max-entries"), "{unknown}");
        assert!("endpoints=0".parse::<MapEntries>().is_err());
        assert!("endpoints".parse::<MapEntries>().is_err());
    }
}
