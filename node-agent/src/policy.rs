//! Policy enforcement on this node: reads the cluster's policies, keeps the last good version
//! of any that turns invalid, compiles them for this node's endpoints against every known
//! identity, and writes the datapath's policy maps and identity-bearing ipcache entries.
//!
//! Updates are ordered so a change never opens a gap: new entries first, then isolation flags,
//! then stale entries removed.
//!
//! The maps are pinned, so they outlive the agent: at start [`PolicyEngine::adopt`] takes over
//! what an earlier run wrote, and the first install removes whatever the policy in force then
//! does not want (a rule removed, a policy deleted, a remote pod gone while the agent was down).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use weft_core::identity::ReservedIdentity;
use weft_core::policy::compile::{
    compile_reusing, policy_prefixes, port_prefixes, uses_members, Compiled, EndpointInput,
    IdentityKind, MatchCache, Member, Members,
};
use weft_core::policy::evaluate::{NamedPorts, PeerKind};
use weft_core::policy::model::{allow_from_node, Direction, EnforcementMode, Policy, Protocol};
use weft_crds::policy_model::{self, PolicyError};
use weft_node_bpf::maps::{
    EndpointPolicy, IpcacheEntry, PeerSet, PolicyDirection, PolicyEntry, PolicyKeyData,
    PEER_SET_WORDS, POLICY_PROTO_OTHER,
};

use crate::datapath::{Datapath, DatapathError, InstalledPolicy};
use crate::flows::directory::EndpointMeta;
use crate::map_pressure::FullMap;
use crate::state::{Changed, ClusterState, TableView};
use weft_core::state::LocalPod;
use weft_core::state::{PolicyObject, Row};

/// First identity number for CIDR prefixes named by policies (node-local, as Cilium's): above
/// every cluster-scoped identity (cluster IDs up to 511 in bits 16-24), so a prefix's number
/// never equals a pod identity of any cluster in the mesh.
pub const CIDR_IDENTITY_BASE: u32 = 1 << 25;

/// The policies in force on the node and what was written for them.
pub struct PolicyEngine {
    mode: EnforcementMode,
    /// The cluster's policy objects.
    policies: TableView<PolicyObject>,
    /// Key `Kind namespace/name` → the last valid version.
    last_good: BTreeMap<String, Policy>,
    /// Policies whose current version is invalid, and why.
    pub problems: BTreeMap<String, PolicyError>,
    /// Policy table key → the `Kind namespace/name` its object is known by.
    name_of_key: HashMap<String, String>,
    installed: Installed,
    last_inputs: Option<u64>,
    /// The compiled policy, for naming the rule behind a dropped flow.
    pub compiled: Arc<Mutex<Option<Compiled>>>,
    /// Where the node reports whether its policy is enforced as written (see
    /// [`EnforcementReport`]); `None` reports nowhere but the log.
    report: Option<PathBuf>,
    /// Local endpoints' isolation under the policy in force.
    isolation: BTreeMap<Ipv4Addr, Isolation>,
    /// The report last written, so the file is written only when it changes.
    reported: Option<EnforcementReport>,
    /// What the last pass reported as its problem, if any.
    problem: Option<String>,
    /// The datapath's maps found full (see [`crate::map_pressure`]), for the report.
    full_maps: Vec<FullMap>,
    /// `installed` holds what an earlier run left (see [`Self::adopt`]) and no install has
    /// replaced it yet.
    adopted: bool,
    /// Whether the built-in [`allow_from_node`] policy applies.
    allow_from_node: bool,
    /// The cluster's endpoints as far as the compiled policy depends on them.
    index: EndpointIndex,
    /// Whether the policy in force reads the pods behind identities ([`uses_members`]).
    uses_members: bool,
    /// Host addresses the ipcache holds for something else than a pod (nodes, the API
    /// server, policies' /32 prefixes): a pod address among them takes a full pass.
    shared_addresses: BTreeSet<Ipv4Net>,
    /// What each identity matched in the last compilation.
    matches: MatchCache,
    /// The identities that changed since `matches` was made and whose peer sets were written;
    /// `None`: any may have (the index was read whole, or a pass failed), so the next
    /// compilation looks at every identity.
    unmatched_identities: Option<BTreeSet<u32>>,
    /// How many CIDR identities the last compilation numbered.
    cidr_identities: usize,
    /// The ipcache entries the engine wants, and which may differ from what is written.
    ipcache: DesiredIpcache,
}

/// The cluster's endpoints as far as the compiled policy depends on them: each address's
/// identity, and each identity's labels and how many endpoints carry it. Kept from the
/// endpoints table's changes, so that a pod elsewhere costs no recompilation unless it brings
/// or takes an identity (or the policy reads pods by address or port).
#[derive(Default)]
struct EndpointIndex {
    /// The endpoints table's revision last taken.
    seen: Option<u64>,
    identity_of: HashMap<Ipv4Addr, u32>,
    /// Each identity as selectors see it, and how many endpoints carry it.
    identities: HashMap<u32, (IdentityKind, usize)>,
}

/// What [`EndpointIndex::catch_up`] found.
struct IndexChange {
    /// The whole table was read (first pass, or too far behind its change log).
    rebuilt: bool,
    /// The identities that came, went, or changed their labels (not filled when rebuilt).
    identities: BTreeSet<u32>,
    /// The addresses whose endpoint changed (not filled when rebuilt).
    addresses: Vec<Ipv4Addr>,
}

impl EndpointIndex {
    fn catch_up(&mut self, state: &ClusterState) -> IndexChange {
        let tables = state.read();
        let table = &tables.endpoints;
        let keys = self.seen.and_then(|seen| table.changed_since(seen));
        self.seen = Some(table.revision());
        let Some(addresses) = keys else {
            self.identity_of.clear();
            self.identities.clear();
            for meta in table.rows() {
                self.add(meta);
            }
            return IndexChange {
                rebuilt: true,
                identities: BTreeSet::new(),
                addresses: Vec::new(),
            };
        };
        let mut identities = BTreeSet::new();
        for ip in &addresses {
            if let Some(old) = self.identity_of.remove(ip) {
                if self.release(old) {
                    identities.insert(old);
                }
            }
            if let Some(meta) = table.get(ip) {
                if self.add(meta) {
                    identities.insert(meta.identity);
                }
            }
        }
        IndexChange {
            rebuilt: false,
            identities,
            addresses,
        }
    }

    /// Counts `meta`; returns whether its identity is new or its labels changed.
    fn add(&mut self, meta: &EndpointMeta) -> bool {
        self.identity_of.insert(meta.ip, meta.identity);
        match self.identities.entry(meta.identity) {
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert((IdentityKind::Endpoint(meta.security_labels.clone()), 1));
                true
            }
            std::collections::hash_map::Entry::Occupied(mut occupied) => {
                let (kind, count) = occupied.get_mut();
                *count += 1;
                match kind {
                    IdentityKind::Endpoint(labels) if *labels == meta.security_labels => false,
                    _ => {
                        *kind = IdentityKind::Endpoint(meta.security_labels.clone());
                        true
                    }
                }
            }
        }
    }

    /// Uncounts an endpoint of `identity`; returns whether the identity is gone.
    fn release(&mut self, identity: u32) -> bool {
        let std::collections::hash_map::Entry::Occupied(mut occupied) =
            self.identities.entry(identity)
        else {
            return false;
        };
        occupied.get_mut().1 -= 1;
        if occupied.get().1 == 0 {
            occupied.remove();
            return true;
        }
        false
    }
}

/// The ipcache entries the engine wants, kept across passes so that a pass reconciles only the
/// prefixes that may have changed (`dirty`) instead of rebuilding and comparing an entry for
/// every pod of the cluster: remote pods' entries follow the endpoints table address by
/// address, and are computed again in full only when the peers change.
#[derive(Default)]
struct DesiredIpcache {
    /// Remote pods' /32 entries, by address.
    pods: HashMap<Ipv4Addr, IpcacheEntry>,
    /// Every other entry (nodes, the API server, this node, policies' prefixes), with whether
    /// it takes precedence over a pod's entry at the same address.
    others: BTreeMap<Ipv4Net, (IpcacheEntry, Precedence)>,
    /// The peers (by hash) that `pods` was computed with: other peers move pods' tunnels.
    peers: Option<u64>,
    /// The local endpoints' addresses when `pods` was computed: theirs are `crate::node`'s.
    local: BTreeSet<Ipv4Addr>,
    /// Prefixes whose wanted entry may differ from what is written.
    dirty: BTreeSet<Ipv4Net>,
}

/// Whether an ipcache entry that is not a pod's wins over a pod's entry at the same address:
/// a node's address is the node's (`host`, `remote-node`), while the API server and a
/// policy's prefix yield to a pod (an address has one identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Precedence {
    OverPods,
    UnderPods,
}

impl DesiredIpcache {
    /// The entry the engine wants under `prefix`, if any.
    fn wanted(&self, prefix: &Ipv4Net) -> Option<IpcacheEntry> {
        let other = self.others.get(prefix);
        if let Some((entry, Precedence::OverPods)) = other {
            return Some(*entry);
        }
        if prefix.prefix_len() == 32 {
            if let Some(entry) = self.pods.get(&prefix.network()) {
                return Some(*entry);
            }
        }
        other.map(|(entry, _)| *entry)
    }

    fn set_pod(&mut self, ip: Ipv4Addr, entry: Option<IpcacheEntry>) {
        let changed = match entry {
            Some(entry) => self.pods.insert(ip, entry) != Some(entry),
            None => self.pods.remove(&ip).is_some(),
        };
        if changed {
            self.dirty.insert(Ipv4Net::from(ip));
        }
    }

    fn replace_pods(&mut self, pods: HashMap<Ipv4Addr, IpcacheEntry>) {
        for (ip, entry) in &self.pods {
            if pods.get(ip) != Some(entry) {
                self.dirty.insert(Ipv4Net::from(*ip));
            }
        }
        for (ip, entry) in &pods {
            if self.pods.get(ip) != Some(entry) {
                self.dirty.insert(Ipv4Net::from(*ip));
            }
        }
        self.pods = pods;
    }

    fn replace_others(&mut self, others: BTreeMap<Ipv4Net, (IpcacheEntry, Precedence)>) {
        for (prefix, entry) in &self.others {
            if others.get(prefix) != Some(entry) {
                self.dirty.insert(*prefix);
            }
        }
        for (prefix, entry) in &others {
            if self.others.get(prefix) != Some(entry) {
                self.dirty.insert(*prefix);
            }
        }
        self.others = others;
    }
}

/// A prefix another owner writes: a peer's pod CIDR (`crate::peers`) or a local pod's address
/// (`crate::node`). The engine neither overwrites nor removes it: that would break forwarding
/// to those pods, and CIDR rules select only addresses outside the cluster.
fn owned_elsewhere(prefix: &Ipv4Net, inputs: &PolicyInputs<'_>) -> bool {
    inputs.peers.iter().any(|(_, cidr)| cidr == prefix)
        || (prefix.prefix_len() == 32 && inputs.local.iter().any(|e| e.ip == prefix.network()))
}

/// A remote pod's ipcache entry: its identity behind the peer whose pod CIDR holds it (none
/// when no known node holds it).
fn remote_pod_entry(meta: &EndpointMeta, nodes: &PodCidrIndex) -> Option<IpcacheEntry> {
    let node_ip = nodes.node_of(meta.ip)?;
    Some(IpcacheEntry {
        identity: meta.identity,
        tunnel_endpoint: u32::from(node_ip).to_be(),
    })
}

/// The node behind a pod address, by the peers' pod CIDRs: one hash lookup per distinct
/// prefix length instead of a scan of every peer for every endpoint (100,000 endpoints ×
/// 1,000 nodes in a full pass). Where CIDRs overlap, the first peer listed wins, as a scan
/// would have it.
struct PodCidrIndex {
    /// Prefix length → network → (position in the peer list, node address).
    by_length: BTreeMap<u8, std::collections::HashMap<Ipv4Addr, (usize, Ipv4Addr)>>,
}

impl PodCidrIndex {
    fn new(peers: &[(Ipv4Addr, Ipv4Net)]) -> Self {
        let mut by_length: BTreeMap<u8, std::collections::HashMap<_, _>> = BTreeMap::new();
        for (position, (node_ip, cidr)) in peers.iter().enumerate() {
            by_length
                .entry(cidr.prefix_len())
                .or_default()
                .entry(cidr.network())
                .or_insert((position, *node_ip));
        }
        Self { by_length }
    }

    fn node_of(&self, ip: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_length
            .iter()
            .filter_map(|(length, networks)| {
                let network = Ipv4Net::new(ip, *length).ok()?.network();
                networks.get(&network)
            })
            .min_by_key(|(position, _)| *position)
            .map(|(_, node_ip)| *node_ip)
    }
}

/// How many keys of each kind [`PolicyEngine::adopt`] took over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub endpoints: usize,
    pub peer_sets: usize,
    pub entries: usize,
    pub ipcache: usize,
}

impl Adopted {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether the policy engine writes ipcache entries like `entry`: a remote pod's /32 (its
/// identity, behind its node), a node address (`host`, `remote-node`) or a prefix a policy names
/// (a CIDR identity). Peers' pod CIDRs (`unknown` behind the peer: [`crate::peers`]) and local
/// endpoints' /32s (their identity, no tunnel endpoint: `crate::node`) are not the engine's.
/// A local endpoint's entry is also told by its address (see [`PolicyEngine::adopt`]).
fn owns_ipcache_entry(entry: &IpcacheEntry) -> bool {
    if entry.tunnel_endpoint != 0 {
        return entry.identity != ReservedIdentity::Unknown.id();
    }
    entry.identity == ReservedIdentity::Host.id()
        || entry.identity == ReservedIdentity::RemoteNode.id()
        || entry.identity >= CIDR_IDENTITY_BASE
}

/// What the node tells about its enforcement: `weftctl policy status` shows a node's problem
/// next to the policies and fails, as it does for an invalid policy; in Kubernetes mode each
/// pod's `WeftEndpoint` status carries it (`crate::kubernetes::endpoints`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnforcementReport {
    /// Why the policy in force is not what the policies say (it does not compile, or a map is
    /// full); `None` when it is.
    pub problem: Option<String>,
    /// Whether the policy in force isolates each local endpoint (by address), in each
    /// direction: isolated traffic is allowed only by a rule.
    #[serde(default)]
    pub endpoints: BTreeMap<Ipv4Addr, Isolation>,
    /// Datapath maps that refused a write for want of room: some entries the node needs
    /// (an endpoint, policy, a service) are missing until there is room, and what needs them
    /// is denied meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_maps: Vec<FullMap>,
}

/// Whether policy isolates an endpoint in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Isolation {
    pub ingress: bool,
    pub egress: bool,
}

impl EnforcementReport {
    /// Reads a report an agent wrote; `None` if there is none (yet) or it does not parse.
    pub fn read(path: &std::path::Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// The report's file name in the agent's state directory.
pub const ENFORCEMENT_REPORT: &str = "policy-enforcement.json";

/// A policy entry's key as the engine keeps it: endpoint, direction, protocol, port (host
/// order) and significant port bits.
type EntryKey = (u32, u8, u8, u16, u8);

/// What the engine wrote, with the values: a pass writes only the entries whose value
/// differs, so a change costs map writes in proportion to what it changed. `None`: the key
/// was adopted from an earlier run and its value is not known, so it is written again.
#[derive(Default)]
struct Installed {
    peer_sets: BTreeMap<u32, Option<PeerSet>>,
    entries: BTreeMap<EntryKey, Option<PolicyEntry>>,
    endpoints: BTreeMap<u32, Option<EndpointPolicy>>,
    ipcache: BTreeMap<Ipv4Net, Option<IpcacheEntry>>,
}

impl Installed {
    /// Keeps `other`'s keys too (theirs win): after a pass that could not write everything,
    /// what it did write is known and the rest stays as it was.
    fn merge(&mut self, other: Installed) {
        self.peer_sets.extend(other.peer_sets);
        self.entries.extend(other.entries);
        self.endpoints.extend(other.endpoints);
        self.ipcache.extend(other.ipcache);
    }
}

/// The keys of `before` that `after` no longer has.
fn stale<K: Ord + Copy, V>(before: &BTreeMap<K, V>, after: &BTreeMap<K, V>) -> Vec<K> {
    before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .copied()
        .collect()
}

/// Writes `value` under `key` unless `before` holds it already, and records it in `after`.
fn write_if_changed<K: Ord + Copy, V: PartialEq + Copy>(
    before: &BTreeMap<K, Option<V>>,
    after: &mut BTreeMap<K, Option<V>>,
    key: K,
    value: V,
    write: impl FnOnce(K, V) -> Result<(), DatapathError>,
) -> Result<(), DatapathError> {
    if before.get(&key) != Some(&Some(value)) {
        write(key, value)?;
    }
    after.insert(key, Some(value));
    Ok(())
}

/// What the node knows besides policies: its endpoints and the cluster's.
/// One endpoint of this node, as the policy engine needs it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LocalEndpoint {
    /// Its host-side veth: how the datapath names it.
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub namespace: String,
    /// `init` until the cluster assigned it one: such an endpoint gets no policy state, so the
    /// datapath lets it reach only what an initialising endpoint needs (see `lib/policy.h`).
    pub identity: u32,
    /// The pod as found by name ([`crate::local_pods`]): its security labels and named ports.
    /// `None` takes them from the endpoint directory, by address.
    pub by_name: Option<LocalPod>,
}

impl LocalEndpoint {
    fn resolved(&self) -> bool {
        self.identity != ReservedIdentity::Init.id()
    }
}

pub struct PolicyInputs<'a> {
    pub local: Vec<LocalEndpoint>,
    /// The Kubernetes API server's addresses: the `kube-apiserver` entity.
    pub kube_apiserver: Vec<Ipv4Addr>,
    pub node_ip: Ipv4Addr,
    /// (node IP, pod CIDR) of every other node.
    pub peers: &'a [(Ipv4Addr, Ipv4Net)],
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Other => POLICY_PROTO_OTHER,
    }
}

fn peer_set(set: &weft_core::policy::compile::PeerSet) -> PeerSet {
    let mut words = [0u64; PEER_SET_WORDS];
    words.copy_from_slice(&set.0[..PEER_SET_WORDS]);
    PeerSet { words }
}

impl PolicyEngine {
    pub fn new(
        state: ClusterState,
        mode: EnforcementMode,
        compiled: Arc<Mutex<Option<Compiled>>>,
        report: Option<PathBuf>,
    ) -> Self {
        Self {
            report,
            isolation: BTreeMap::new(),
            reported: None,
            full_maps: Vec::new(),
            problem: None,
            mode,
            policies: TableView::new(state),
            last_good: BTreeMap::new(),
            problems: BTreeMap::new(),
            installed: Installed::default(),
            last_inputs: None,
            compiled,
            adopted: false,
            allow_from_node: true,
            index: EndpointIndex::default(),
            uses_members: false,
            shared_addresses: BTreeSet::new(),
            matches: MatchCache::default(),
            name_of_key: HashMap::new(),
            unmatched_identities: None,
            cidr_identities: 0,
            ipcache: DesiredIpcache::default(),
        }
    }

    /// Whether traffic from the node to its pods passes whatever isolates them (the built-in
    /// [`allow_from_node`] policy; on unless turned off).
    pub fn set_allow_from_node(&mut self, allow: bool) {
        self.allow_from_node = allow;
        self.last_inputs = None;
    }

    /// Takes over what an earlier run left in the pinned maps (`found`, and the engine's entries
    /// of `ipcache`: not those of the local endpoints at `local`), as if this run had installed
    /// it, so that the next install removes whatever the policies then in force do not want.
    /// Call it before the first [`Self::sync`], which then installs even if nothing changed —
    /// once the state's sources have listed everything: until then, what the earlier run
    /// left stays.
    pub fn adopt(
        &mut self,
        found: InstalledPolicy,
        ipcache: &[(Ipv4Net, IpcacheEntry)],
        local: &BTreeSet<Ipv4Addr>,
    ) -> Adopted {
        let before = Adopted {
            endpoints: self.installed.endpoints.len(),
            peer_sets: self.installed.peer_sets.len(),
            entries: self.installed.entries.len(),
            ipcache: self.installed.ipcache.len(),
        };
        self.installed
            .endpoints
            .extend(found.endpoints.into_iter().map(|key| (key, None)));
        self.installed
            .peer_sets
            .extend(found.peer_sets.into_iter().map(|key| (key, None)));
        self.installed
            .entries
            .extend(found.entries.into_iter().map(|(data, bits)| {
                let key = (
                    data.endpoint,
                    data.direction,
                    data.protocol,
                    u16::from_be(data.port),
                    bits,
                );
                (key, None)
            }));
        self.installed.ipcache.extend(
            ipcache
                .iter()
                .filter(|(prefix, entry)| {
                    owns_ipcache_entry(entry)
                        && !(prefix.prefix_len() == 32 && local.contains(&prefix.network()))
                })
                .map(|(prefix, entry)| (*prefix, Some(*entry))),
        );
        let adopted = Adopted {
            endpoints: self.installed.endpoints.len() - before.endpoints,
            peer_sets: self.installed.peer_sets.len() - before.peer_sets,
            entries: self.installed.entries.len() - before.entries,
            ipcache: self.installed.ipcache.len() - before.ipcache,
        };
        if !adopted.is_empty() {
            self.adopted = true;
            // Each adopted ipcache entry is compared with what the first pass wants.
            self.ipcache
                .dirty
                .extend(self.installed.ipcache.keys().copied());
            // The next sync installs even if neither the policies nor the inputs change.
            self.last_inputs = None;
        }
        adopted
    }

    /// Takes the policies table if it changed. Returns whether the policy set changed.
    fn reload(&mut self) -> bool {
        let Some(changed) = self.policies.changed_keys() else {
            return false;
        };
        // Only the changed objects are decoded again; the others keep their last version.
        let state = self.policies.state().clone();
        let tables = state.read();
        let table = tables.table::<PolicyObject>();
        let keys: Vec<String> = match changed {
            Changed::Keys(keys) => keys,
            Changed::Everything => {
                let present: Vec<String> = table.rows().map(|row| row.key()).collect();
                // Objects gone meanwhile count as deleted; the present ones are read again.
                let gone: Vec<String> = self
                    .name_of_key
                    .keys()
                    .filter(|key| table.get(key).is_none())
                    .cloned()
                    .collect();
                gone.into_iter().chain(present).collect()
            }
        };
        let objects: Vec<(String, Option<serde_json::Value>)> = keys
            .into_iter()
            .map(|key| {
                let object = table.get(&key).map(|PolicyObject(object)| object.clone());
                (key, object)
            })
            .collect();
        drop(tables);
        for (key, object) in objects {
            let before = self.name_of_key.remove(&key);
            let name = object.as_ref().map(|object| {
                format!(
                    "{} {}/{}",
                    object["kind"].as_str().unwrap_or_default(),
                    object["metadata"]["namespace"].as_str().unwrap_or("-"),
                    object["metadata"]["name"].as_str().unwrap_or("?")
                )
            });
            if let Some(before) = before.filter(|before| Some(before) != name.as_ref()) {
                self.last_good.remove(&before);
                self.problems.remove(&before);
            }
            let (Some(object), Some(name)) = (object, name) else {
                continue;
            };
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let converted = match kind.as_str() {
                "WeftNetworkPolicy" => serde_json::from_value(object)
                    .map_err(|e| e.to_string())
                    .and_then(|p| policy_model::weft_policy(&p).map_err(|e| e.to_string())),
                "WeftClusterwideNetworkPolicy" => serde_json::from_value(object)
                    .map_err(|e| e.to_string())
                    .and_then(|p| policy_model::clusterwide_policy(&p).map_err(|e| e.to_string())),
                "NetworkPolicy" => serde_json::from_value(object)
                    .map_err(|e| e.to_string())
                    .and_then(|p| policy_model::kubernetes_policy(&p).map_err(|e| e.to_string())),
                _ => continue,
            };
            self.name_of_key.insert(key, name.clone());
            match converted {
                Ok(policy) => {
                    // Left out without allowing more (an SCTP port): the rest is enforced.
                    for part in &policy.unenforced {
                        tracing::warn!(policy = %name, %part, "part of the policy is not enforced");
                    }
                    self.problems.remove(&name);
                    self.last_good.insert(name, policy);
                }
                Err(message) => {
                    // The last good version (if any) stays in force.
                    tracing::warn!(policy = %name, %message, "invalid policy; its last good version stays in force");
                    self.problems.insert(
                        name,
                        PolicyError {
                            field: "spec".into(),
                            reason: policy_model::InvalidReason::BadSelector,
                            message,
                        },
                    );
                }
            }
        }
        true
    }

    /// Brings the datapath in line with the policies and inputs; does nothing when neither
    /// changed since the last call, unless the last call failed: then it tries again.
    pub fn sync(
        &mut self,
        datapath: &mut Datapath,
        inputs: &PolicyInputs<'_>,
    ) -> Result<(), DatapathError> {
        let synced = self.sync_once(datapath, inputs);
        if let Err(error) = &synced {
            self.last_inputs = None;
            // What was compiled may not all be written: compare everything next time.
            self.unmatched_identities = None;
            if self.problem.is_none() {
                self.report(Some(format!(
                    "the policy could not be written ({error}); endpoints keep the policy they had, and those without one are denied"
                )));
            }
        }
        synced
    }

    fn sync_once(
        &mut self,
        datapath: &mut Datapath,
        inputs: &PolicyInputs<'_>,
    ) -> Result<(), DatapathError> {
        if !self.policies.state().synced() {
            // Nothing is known of the policies yet: what an earlier run left stays in force
            // rather than being taken for stale.
            return Ok(());
        }
        let reloaded = self.reload();
        let state = self.policies.state().clone();
        let changed = self.index.catch_up(&state);
        match &mut self.unmatched_identities {
            _ if changed.rebuilt => self.unmatched_identities = None,
            Some(unmatched) => unmatched.extend(changed.identities.iter().copied()),
            None => {}
        }
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            inputs.local.hash(&mut hasher);
            inputs.kube_apiserver.hash(&mut hasher);
            inputs.peers.hash(&mut hasher);
            self.policies.seen().hash(&mut hasher);
            hasher.finish()
        };
        let local_ips: BTreeSet<Ipv4Addr> = inputs.local.iter().map(|e| e.ip).collect();
        // Only other nodes' pods came or went, and nothing the compiled policy depends on
        // moved: their ipcache entries are all that changes.
        let addresses_only = !reloaded
            && self.last_inputs == Some(fingerprint)
            && !changed.rebuilt
            && changed.identities.is_empty()
            && (!self.uses_members || changed.addresses.is_empty())
            && changed.addresses.iter().all(|ip| {
                !local_ips.contains(ip) && !self.shared_addresses.contains(&Ipv4Net::from(*ip))
            });
        if addresses_only {
            return self.update_remote_pods(datapath, inputs, &state, &changed.addresses);
        }
        self.last_inputs = Some(fingerprint);
        // Read in place: a full pass costs no copy of the cluster's endpoints.
        let tables = state.read();
        let directory = &tables.endpoints;

        let mut policies: Vec<Policy> = self.last_good.values().cloned().collect();
        if self.allow_from_node {
            policies.push(allow_from_node());
        }
        self.uses_members = policies.iter().any(uses_members);
        // An endpoint whose identity is not resolved is left out: policy selects by the labels
        // its identity stands for, and until then the datapath holds it to what `init` may do.
        let endpoints: Vec<EndpointInput> = inputs
            .local
            .iter()
            .filter(|endpoint| endpoint.resolved())
            .map(|endpoint| {
                let (mut labels, ports) = match &endpoint.by_name {
                    Some(pod) => (
                        pod.security_labels.clone(),
                        named_ports_from(&pod.named_ports),
                    ),
                    None => {
                        let meta = directory.get(&endpoint.ip);
                        (
                            meta.map(|m| m.security_labels.clone()).unwrap_or_default(),
                            meta.map(named_ports).unwrap_or_default(),
                        )
                    }
                };
                labels
                    .entry(weft_core::policy::NAMESPACE_LABEL.to_owned())
                    .or_insert_with(|| endpoint.namespace.clone());
                EndpointInput {
                    id: endpoint.ifindex,
                    labels,
                    named_ports: ports,
                }
            })
            .collect();
        // Each identity once, from the index (not from every endpoint), read in place: the
        // reserved and the policies' CIDR identities are added to it.
        let mut identities: BTreeMap<u32, IdentityKind> = BTreeMap::new();
        for (reserved, kind) in [
            (ReservedIdentity::Host, PeerKind::Host),
            (ReservedIdentity::World, PeerKind::World),
            (ReservedIdentity::RemoteNode, PeerKind::RemoteNode),
            (ReservedIdentity::KubeApiserver, PeerKind::KubeApiserver),
            (ReservedIdentity::Health, PeerKind::Health),
            (ReservedIdentity::Init, PeerKind::Init),
        ] {
            identities.insert(reserved.id(), IdentityKind::Reserved(kind));
        }
        let prefixes: Vec<Ipv4Net> = policy_prefixes(&policies).into_iter().collect();
        for (index, prefix) in prefixes.iter().enumerate() {
            identities.insert(
                CIDR_IDENTITY_BASE + index as u32,
                IdentityKind::Cidr(*prefix),
            );
        }
        // The ipcache names every address policy may ask about. Remote pods' entries follow
        // the endpoints table's changed addresses; all of them are computed again only when
        // the peers (the pods' tunnels) changed or the index was read whole.
        let peers_hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            inputs.peers.hash(&mut hasher);
            hasher.finish()
        };
        let nodes = PodCidrIndex::new(inputs.peers);
        if changed.rebuilt || self.ipcache.peers != Some(peers_hash) {
            let pods = directory
                .rows()
                .filter(|meta| !local_ips.contains(&meta.ip))
                .filter_map(|meta| Some((meta.ip, remote_pod_entry(meta, &nodes)?)))
                .collect();
            self.ipcache.replace_pods(pods);
            self.ipcache.peers = Some(peers_hash);
        } else {
            // The changed addresses, and those that became or ceased to be this node's.
            let moved: BTreeSet<Ipv4Addr> = changed
                .addresses
                .iter()
                .chain(local_ips.symmetric_difference(&self.ipcache.local))
                .copied()
                .collect();
            for ip in moved {
                let entry = directory
                    .get(&ip)
                    .filter(|_| !local_ips.contains(&ip))
                    .and_then(|meta| remote_pod_entry(meta, &nodes));
                self.ipcache.set_pod(ip, entry);
            }
        }
        self.ipcache.local.clone_from(&local_ips);
        // The pods carrying each identity: ipBlock peers select pods by address, and egress
        // rules naming a port resolve it on the destination pods. Only such policies read them.
        let mut members = Members::new();
        if self.uses_members {
            for meta in directory.rows() {
                members.entry(meta.identity).or_default().push(Member {
                    ip: meta.ip,
                    named_ports: named_ports(meta),
                });
            }
        }
        // Only identities and selectors that changed since the last pass are matched again:
        // the identities the index saw change, and the CIDR identities (numbered by the
        // policies' prefixes, which an edit may move).
        let kind_of = |identity: &u32| {
            identities
                .get(identity)
                .or_else(|| self.index.identities.get(identity).map(|(kind, _)| kind))
        };
        let identity_changes: Option<Vec<(u32, Option<&IdentityKind>)>> =
            self.unmatched_identities.as_ref().map(|unmatched| {
                let cidr = (0..self.cidr_identities.max(prefixes.len()))
                    .map(|index| CIDR_IDENTITY_BASE + index as u32);
                unmatched
                    .iter()
                    .copied()
                    .chain(cidr)
                    .map(|identity| (identity, kind_of(&identity)))
                    .collect()
            });
        let compiled = compile_reusing(
            &policies,
            self.mode,
            &endpoints,
            self.index
                .identities
                .iter()
                .filter(|(identity, _)| !identities.contains_key(identity))
                .map(|(identity, (kind, _))| (*identity, kind))
                .chain(identities.iter().map(|(identity, kind)| (*identity, kind))),
            identity_changes.as_deref(),
            &members,
            &mut self.matches,
        );
        let mut compiled = match compiled {
            Ok(compiled) => {
                // The cache now answers for every identity; a failed write resets this.
                self.unmatched_identities = Some(BTreeSet::new());
                self.cidr_identities = prefixes.len();
                compiled
            }
            Err(error) => {
                tracing::error!(%error, "policy does not compile; the policy in force stays");
                self.report(Some(format!(
                    "the policies do not compile ({error}); the policy in force before stays"
                )));
                return Ok(());
            }
        };
        // The entries that are no pod's, numbered as this compilation numbers the prefixes
        // (a compilation that failed leaves those of the policy in force).
        let mut others: BTreeMap<Ipv4Net, (IpcacheEntry, Precedence)> = BTreeMap::new();
        let entry = |identity: ReservedIdentity| IpcacheEntry {
            identity: identity.id(),
            tunnel_endpoint: 0,
        };
        for (node_ip, _) in inputs.peers {
            others.insert(
                Ipv4Net::from(*node_ip),
                (entry(ReservedIdentity::RemoteNode), Precedence::OverPods),
            );
        }
        // The API server, unless it shares a node's address (which keeps `host` or
        // `remote-node`: an address has one identity) or a pod's.
        for address in inputs
            .kube_apiserver
            .iter()
            .filter(|address| !local_ips.contains(address))
        {
            others.entry(Ipv4Net::from(*address)).or_insert((
                entry(ReservedIdentity::KubeApiserver),
                Precedence::UnderPods,
            ));
        }
        others.insert(
            Ipv4Net::from(inputs.node_ip),
            (entry(ReservedIdentity::Host), Precedence::OverPods),
        );
        for (index, prefix) in prefixes.iter().enumerate() {
            if owned_elsewhere(prefix, inputs) {
                continue;
            }
            let cidr = IpcacheEntry {
                identity: CIDR_IDENTITY_BASE + index as u32,
                tunnel_endpoint: 0,
            };
            others
                .entry(*prefix)
                .or_insert((cidr, Precedence::UnderPods));
        }
        self.ipcache.replace_others(others);

        // The sources may change the state again while the maps are written.
        drop(tables);
        self.shared_addresses = inputs
            .peers
            .iter()
            .map(|(node_ip, _)| *node_ip)
            .chain(inputs.kube_apiserver.iter().copied())
            .chain([inputs.node_ip])
            .map(Ipv4Net::from)
            .chain(
                prefixes
                    .iter()
                    .filter(|prefix| prefix.prefix_len() == 32)
                    .copied(),
            )
            .collect();
        let mut installed = Installed::default();
        self.write_wanted_ipcache(datapath)?;
        let written = write_allows(datapath, &compiled, &mut self.installed, &mut installed);
        if let Err(error) = &written {
            // Fail closed: isolate what the policy isolates even though some allow entries are
            // missing (a full map, say), so the gap denies instead of allowing.
            tracing::error!(%error, "policy entries could not all be written; isolating the selected endpoints with the entries that were");
        }
        // Every resolved endpoint gets a state: the datapath takes an endpoint without one for
        // one whose policy is not in place yet. Those no policy selects are marked so, and
        // skip the policy lookups.
        for endpoint in inputs.local.iter().filter(|endpoint| endpoint.resolved()) {
            let state = match compiled.endpoints.get(&endpoint.ifindex) {
                Some(policy) => EndpointPolicy {
                    isolated_ingress: u8::from(policy.isolated_ingress),
                    isolated_egress: u8::from(policy.isolated_egress),
                    unselected: 0,
                    pad: 0,
                },
                None => EndpointPolicy {
                    isolated_ingress: 0,
                    isolated_egress: 0,
                    unselected: 1,
                    pad: 0,
                },
            };
            write_if_changed(
                &self.installed.endpoints,
                &mut installed.endpoints,
                endpoint.ifindex,
                state,
                |ifindex, state| datapath.upsert_endpoint_policy(ifindex, state),
            )?;
        }
        if let Err(error) = written {
            // Keep what is installed so a later sync can finish the job; nothing stale is
            // removed while the new policy is incomplete.
            self.installed.merge(installed);
            self.last_inputs = None;
            self.report(Some(format!(
                "policy entries could not all be written ({error}); the selected endpoints are isolated with the entries that were (what is missing is denied)"
            )));
            return Err(error);
        }
        // Stale state goes last.
        for endpoint in stale(&self.installed.endpoints, &installed.endpoints) {
            datapath.remove_endpoint_policy(endpoint)?;
        }
        for (endpoint, direction, protocol, port, bits) in
            stale(&self.installed.entries, &installed.entries)
        {
            datapath.remove_policy_entry(
                PolicyKeyData {
                    endpoint,
                    direction,
                    protocol,
                    port: port.to_be(),
                },
                bits,
            )?;
        }
        match &compiled.changed_peer_sets {
            // The peer sets were updated in place: the identities gone go.
            Some(touched) => {
                for identity in touched {
                    if compiled.peer_sets.contains_key(identity) {
                        continue;
                    }
                    if self.installed.peer_sets.contains_key(identity) {
                        datapath.remove_peer_set(*identity)?;
                        self.installed.peer_sets.remove(identity);
                    }
                }
            }
            None => {
                for identity in stale(&self.installed.peer_sets, &installed.peer_sets) {
                    datapath.remove_peer_set(identity)?;
                }
            }
        }
        // The flows' view of the ipcache moves to the new compilation, updated with the rest.
        let compiled_slot = Arc::clone(&self.compiled);
        let mut slot = compiled_slot.lock().unwrap_or_else(|p| p.into_inner());
        let first = slot.is_none();
        let mut addresses = slot
            .as_mut()
            .map(|old| std::mem::take(&mut old.address_identities))
            .unwrap_or_default();
        let removed = self.remove_unwanted_ipcache(datapath, inputs, &mut addresses);
        if let Err(error) = removed {
            if let Some(old) = slot.as_mut() {
                old.address_identities = addresses;
            }
            return Err(error);
        }
        if first {
            // Nothing was there to update: take every entry in force.
            addresses = self
                .installed
                .ipcache
                .iter()
                .filter_map(|(prefix, entry)| Some((*prefix, entry.as_ref()?.identity)))
                .collect();
        }
        let (entries, sets) = compiled.map_entries();
        tracing::info!(
            policies = policies.len(),
            policy_entries = entries,
            peer_sets = sets,
            "policy in force"
        );
        installed.ipcache = std::mem::take(&mut self.installed.ipcache);
        if compiled.changed_peer_sets.is_some() {
            installed.peer_sets = std::mem::take(&mut self.installed.peer_sets);
        }
        self.installed = installed;
        self.adopted = false;
        self.isolation = inputs
            .local
            .iter()
            .map(|endpoint| {
                let policy = compiled.endpoints.get(&endpoint.ifindex);
                let isolation = Isolation {
                    ingress: policy.is_some_and(|p| p.isolated_ingress),
                    egress: policy.is_some_and(|p| p.isolated_egress),
                };
                (endpoint.ip, isolation)
            })
            .collect();
        compiled.address_identities = addresses;
        *slot = Some(compiled);
        drop(slot);
        self.report(None);
        Ok(())
    }

    /// Brings the ipcache entries of the remote pods at `addresses` in line with the
    /// endpoints table, when nothing else changed (see `sync_once`): the policy in force
    /// stays, only those entries are written or removed.
    fn update_remote_pods(
        &mut self,
        datapath: &mut Datapath,
        inputs: &PolicyInputs<'_>,
        state: &ClusterState,
        addresses: &[Ipv4Addr],
    ) -> Result<(), DatapathError> {
        {
            let nodes = PodCidrIndex::new(inputs.peers);
            let tables = state.read();
            for ip in addresses {
                let entry = tables
                    .endpoints
                    .get(ip)
                    .and_then(|meta| remote_pod_entry(meta, &nodes));
                self.ipcache.set_pod(*ip, entry);
            }
        }
        self.write_wanted_ipcache(datapath)?;
        let compiled_slot = Arc::clone(&self.compiled);
        let mut slot = compiled_slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(compiled) => {
                self.remove_unwanted_ipcache(datapath, inputs, &mut compiled.address_identities)
            }
            // No compilation yet: the first one takes every entry in force.
            None => self.remove_unwanted_ipcache(datapath, inputs, &mut BTreeMap::new()),
        }
    }

    /// Writes the wanted entry of every dirty prefix that has one and differs from what is
    /// written. Removals wait for [`Self::remove_unwanted_ipcache`]: new entries go first.
    fn write_wanted_ipcache(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        for prefix in &self.ipcache.dirty {
            let Some(entry) = self.ipcache.wanted(prefix) else {
                continue;
            };
            if self.installed.ipcache.get(prefix) != Some(&Some(entry)) {
                datapath.upsert_ipcache(*prefix, entry)?;
                self.installed.ipcache.insert(*prefix, Some(entry));
            }
        }
        Ok(())
    }

    /// Removes the dirty prefixes the engine no longer wants (leaving another owner's entry
    /// in place: see [`owned_elsewhere`]), brings the flows' `addresses` in line, and leaves
    /// nothing dirty. Call it after [`Self::write_wanted_ipcache`].
    fn remove_unwanted_ipcache(
        &mut self,
        datapath: &mut Datapath,
        inputs: &PolicyInputs<'_>,
        addresses: &mut BTreeMap<Ipv4Net, u32>,
    ) -> Result<(), DatapathError> {
        while let Some(prefix) = self.ipcache.dirty.first().copied() {
            match self.ipcache.wanted(&prefix) {
                Some(entry) => {
                    addresses.insert(prefix, entry.identity);
                }
                None => {
                    if self.installed.ipcache.contains_key(&prefix) {
                        if !owned_elsewhere(&prefix, inputs) {
                            datapath.remove_ipcache(prefix)?;
                        }
                        self.installed.ipcache.remove(&prefix);
                    }
                    addresses.remove(&prefix);
                }
            }
            self.ipcache.dirty.pop_first();
        }
        Ok(())
    }

    /// The safety net under writing only what differs: compares the ipcache entries this
    /// engine wrote with the map, counts those found otherwise (`weft_agent_map_drift_total`)
    /// and forgets their values, so the next pass (a full one) writes them again.
    pub fn check_drift(&mut self, datapath: &mut Datapath) -> Result<usize, DatapathError> {
        let actual: BTreeMap<Ipv4Net, IpcacheEntry> =
            datapath.ipcache_entries()?.into_iter().collect();
        let mut drifted = 0;
        for (prefix, written) in self.installed.ipcache.iter_mut() {
            if written.is_some() && actual.get(prefix) != written.as_ref() {
                *written = None;
                self.ipcache.dirty.insert(*prefix);
                drifted += 1;
            }
        }
        datapath.drift_found(weft_node_bpf::maps::IPCACHE, drifted);
        if drifted > 0 {
            self.last_inputs = None;
        }
        Ok(drifted)
    }

    /// Records the datapath's full maps in the report.
    pub fn set_full_maps(&mut self, full_maps: Vec<FullMap>) {
        if self.full_maps != full_maps {
            self.full_maps = full_maps;
            self.write_report();
        }
    }

    /// Records the pass's problem in the report.
    fn report(&mut self, problem: Option<String>) {
        self.problem = problem;
        self.write_report();
    }

    /// Writes the enforcement report when it changed (atomically: others poll it).
    fn write_report(&mut self) {
        let report = EnforcementReport {
            problem: self.problem.clone(),
            endpoints: self.isolation.clone(),
            full_maps: self.full_maps.clone(),
        };
        if self.reported.as_ref() == Some(&report) {
            return;
        }
        let Some(path) = &self.report else {
            return;
        };
        let written = serde_json::to_vec(&report)
            .map_err(std::io::Error::other)
            .and_then(|json| weft_core::files::write_atomically(path, &json));
        match written {
            Ok(()) => self.reported = Some(report),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot write the policy enforcement report")
            }
        }
    }
}

/// Peer sets and port entries: everything that allows or denies, before isolation is set.
///
/// When the compilation names the peer sets that changed, only those are written, and in
/// place in `before` (what is written stays known whatever fails later); otherwise every one
/// is compared and recorded in `installed`.
fn write_allows(
    datapath: &mut Datapath,
    compiled: &Compiled,
    before: &mut Installed,
    installed: &mut Installed,
) -> Result<(), DatapathError> {
    match &compiled.changed_peer_sets {
        Some(touched) => {
            for identity in touched {
                let Some(set) = compiled.peer_sets.get(identity) else {
                    continue;
                };
                let value = peer_set(set);
                if before.peer_sets.get(identity) != Some(&Some(value)) {
                    datapath.upsert_peer_set(*identity, value)?;
                    before.peer_sets.insert(*identity, Some(value));
                }
            }
        }
        None => {
            for (identity, set) in &compiled.peer_sets {
                write_if_changed(
                    &before.peer_sets,
                    &mut installed.peer_sets,
                    *identity,
                    peer_set(set),
                    |identity, set| datapath.upsert_peer_set(identity, set),
                )?;
            }
        }
    }
    for (endpoint, policy) in &compiled.endpoints {
        for ((direction, protocol), entries) in &policy.entries {
            let direction = match direction {
                Direction::Ingress => PolicyDirection::Ingress,
                Direction::Egress => PolicyDirection::Egress,
            } as u8;
            let protocol = protocol_number(*protocol);
            for entry in entries {
                let value = PolicyEntry {
                    allow: peer_set(&entry.allow),
                    deny: peer_set(&entry.deny),
                };
                for (port, bits) in port_prefixes(entry.first, entry.last) {
                    write_if_changed(
                        &before.entries,
                        &mut installed.entries,
                        (*endpoint, direction, protocol, port, bits),
                        value,
                        |(endpoint, direction, protocol, port, bits), value| {
                            let data = PolicyKeyData {
                                endpoint,
                                direction,
                                protocol,
                                port: port.to_be(),
                            };
                            datapath.upsert_policy_entry(data, bits, value)
                        },
                    )?;
                }
            }
        }
    }
    Ok(())
}

impl PolicyEngine {
    /// Removes a departing endpoint's policy state at once, not on the next pass: an endpoint
    /// created meanwhile on a reused ifindex must not inherit it (it would count as ready).
    /// Its port entries go on the next pass, which no longer compiles for it.
    pub fn forget_endpoint(
        &mut self,
        datapath: &mut Datapath,
        ifindex: u32,
    ) -> Result<(), DatapathError> {
        datapath.remove_endpoint_policy(ifindex)?;
        self.installed.endpoints.remove(&ifindex);
        self.last_inputs = None;
        Ok(())
    }

    /// Whether the endpoint behind `ifindex` has its policy state in the maps (written by a
    /// pass, or adopted from an earlier run).
    pub fn has_state(&self, ifindex: u32) -> bool {
        self.installed.endpoints.contains_key(&ifindex)
    }

    /// Why the last pass did not install the policy as written, if it did not.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }
}

fn named_ports(meta: &EndpointMeta) -> NamedPorts {
    named_ports_from(&meta.named_ports)
}

fn named_ports_from(ports: &BTreeMap<String, (String, u16)>) -> NamedPorts {
    weft_core::policy::evaluate::named_ports(
        ports
            .iter()
            .map(|(name, (protocol, port))| (Some(name.as_str()), Some(protocol.as_str()), *port)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: u32, tunnel_endpoint: Ipv4Addr) -> IpcacheEntry {
        IpcacheEntry {
            identity,
            tunnel_endpoint: u32::from(tunnel_endpoint).to_be(),
        }
    }

    fn policy_object(name: &str, app: &str) -> PolicyObject {
        PolicyObject(serde_json::json!({
            "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}],
            },
        }))
    }

    #[test]
    fn policies_reload_by_change_and_an_invalid_version_keeps_the_last_good_one() {
        let source = crate::state::LOCAL_SOURCE;
        let state = ClusterState::new(vec![source.into()]);
        state.change(|tables| {
            tables.upsert(source, policy_object("a", "web"));
            tables.upsert(source, policy_object("b", "db"));
            tables.mark_synced(source);
        });
        let mut engine = PolicyEngine::new(
            state.clone(),
            EnforcementMode::Default,
            Arc::new(Mutex::new(None)),
            None,
        );
        let names =
            |engine: &PolicyEngine| -> Vec<String> { engine.last_good.keys().cloned().collect() };
        assert!(engine.reload());
        assert_eq!(
            names(&engine),
            ["WeftNetworkPolicy shop/a", "WeftNetworkPolicy shop/b"]
        );
        assert!(!engine.reload(), "nothing changed since");

        // An invalid version: reported, and the last good one stays in force.
        let mut broken = policy_object("a", "web");
        broken.0["spec"]["endpointSelector"] = serde_json::json!({"matchLabels": 7});
        state.change(|tables| tables.upsert(source, broken));
        assert!(engine.reload());
        assert_eq!(names(&engine).len(), 2);
        assert!(engine.problems.contains_key("WeftNetworkPolicy shop/a"));
        let before = engine.last_good["WeftNetworkPolicy shop/a"].clone();
        state.change(|tables| tables.upsert(source, policy_object("a", "api")));
        assert!(engine.reload());
        assert!(engine.problems.is_empty());
        assert_ne!(engine.last_good["WeftNetworkPolicy shop/a"], before);

        // A deleted policy goes, with its problem.
        state.change(|tables| {
            tables.delete::<PolicyObject>(source, &policy_object("b", "db").key());
        });
        assert!(engine.reload());
        assert_eq!(names(&engine), ["WeftNetworkPolicy shop/a"]);
    }

    #[test]
    fn the_wanted_ipcache_marks_only_what_changed_and_gives_each_address_one_owner() {
        let peer = Ipv4Addr::new(172, 30, 0, 2);
        let pod = Ipv4Addr::new(10, 2, 0, 7);
        let at = |ip: Ipv4Addr| Ipv4Net::from(ip);
        let mut desired = DesiredIpcache::default();
        desired.replace_pods([(pod, entry(0x1_0100, peer))].into_iter().collect());
        desired.replace_others(
            [
                (
                    at(peer),
                    (
                        entry(ReservedIdentity::RemoteNode.id(), Ipv4Addr::UNSPECIFIED),
                        Precedence::OverPods,
                    ),
                ),
                (
                    "10.2.0.0/24".parse().unwrap(),
                    (
                        entry(CIDR_IDENTITY_BASE, Ipv4Addr::UNSPECIFIED),
                        Precedence::UnderPods,
                    ),
                ),
            ]
            .into_iter()
            .collect(),
        );
        assert_eq!(desired.dirty.len(), 3);
        desired.dirty.clear();

        // The same pod again marks nothing; another identity marks its address only.
        desired.set_pod(pod, Some(entry(0x1_0100, peer)));
        assert!(desired.dirty.is_empty());
        desired.set_pod(pod, Some(entry(0x1_0101, peer)));
        assert_eq!(desired.dirty, BTreeSet::from([at(pod)]));
        desired.dirty.clear();

        // A pod's entry yields to a node at its address and wins over a policy's prefix (and
        // the API server) at its address.
        desired.set_pod(peer, Some(entry(0x1_0102, peer)));
        assert_eq!(
            desired.wanted(&at(peer)).map(|e| e.identity),
            Some(ReservedIdentity::RemoteNode.id())
        );
        let mut others = desired.others.clone();
        others.insert(
            at(pod),
            (
                entry(ReservedIdentity::KubeApiserver.id(), Ipv4Addr::UNSPECIFIED),
                Precedence::UnderPods,
            ),
        );
        desired.replace_others(others);
        assert_eq!(desired.wanted(&at(pod)).map(|e| e.identity), Some(0x1_0101));
        desired.set_pod(pod, None);
        assert_eq!(
            desired.wanted(&at(pod)).map(|e| e.identity),
            Some(ReservedIdentity::KubeApiserver.id()),
            "the API server's once the pod is gone"
        );
        desired.dirty.clear();

        // Recomputing every pod marks the addresses whose entry differs, gone ones included.
        let other_pod = Ipv4Addr::new(10, 2, 0, 8);
        desired.replace_pods(
            [
                (peer, entry(0x1_0102, peer)),
                (other_pod, entry(0x1_0100, peer)),
            ]
            .into_iter()
            .collect(),
        );
        assert_eq!(desired.dirty, BTreeSet::from([at(other_pod)]));
        desired.replace_pods(HashMap::new());
        assert_eq!(desired.dirty, BTreeSet::from([at(other_pod), at(peer)]));
        assert_eq!(desired.wanted(&at(other_pod)), None);
    }

    #[test]
    fn a_pod_address_is_behind_the_first_peer_whose_cidr_holds_it() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        let node = |last: u8| Ipv4Addr::new(172, 30, 0, last);
        let peers = [
            (node(2), net("10.1.2.0/24")),
            (node(3), net("10.1.0.0/16")),
            (node(4), net("10.1.3.0/24")),
            (node(5), net("10.1.2.0/24")),
        ];
        let nodes = PodCidrIndex::new(&peers);
        let at = |ip: [u8; 4]| nodes.node_of(Ipv4Addr::from(ip));
        assert_eq!(
            at([10, 1, 2, 9]),
            Some(node(2)),
            "listed before the /16 and the other /24"
        );
        assert_eq!(
            at([10, 1, 3, 9]),
            Some(node(3)),
            "the /16 is listed before the /24"
        );
        assert_eq!(at([10, 1, 200, 1]), Some(node(3)));
        assert_eq!(at([10, 2, 0, 1]), None, "no peer's pods");
    }

    #[test]
    fn adopts_the_policy_maps_and_only_its_own_ipcache_entries() {
        let mut engine = PolicyEngine::new(
            ClusterState::new(Vec::new()),
            EnforcementMode::Default,
            Arc::new(Mutex::new(None)),
            None,
        );
        let peer = Ipv4Addr::new(192, 168, 0, 2);
        let none = Ipv4Addr::UNSPECIFIED;
        let pod = 0x1_0100;
        let high_cluster_pod = (300 << 16) | 0x100;
        let ipcache = [
            // A peer's pod CIDR: the peers' module's.
            (
                "10.2.0.0/16".parse().unwrap(),
                entry(ReservedIdentity::Unknown.id(), peer),
            ),
            // A remote pod, the peer node, this node, a policy's prefix: the engine's.
            ("10.2.0.7/32".parse().unwrap(), entry(pod, peer)),
            (
                "192.168.0.2/32".parse().unwrap(),
                entry(ReservedIdentity::RemoteNode.id(), none),
            ),
            (
                "192.168.0.1/32".parse().unwrap(),
                entry(ReservedIdentity::Host.id(), none),
            ),
            (
                "203.0.113.0/24".parse().unwrap(),
                entry(CIDR_IDENTITY_BASE + 3, none),
            ),
            // Local endpoints, also one whose identity reaches past the CIDR base: node.rs's.
            ("10.1.0.5/32".parse().unwrap(), entry(pod, none)),
            (
                "10.1.0.6/32".parse().unwrap(),
                entry(high_cluster_pod, none),
            ),
        ];
        let local = [Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 6)]
            .into_iter()
            .collect();
        let found = InstalledPolicy {
            endpoints: vec![11, 12],
            peer_sets: vec![pod, ReservedIdentity::World.id()],
            entries: vec![(
                PolicyKeyData {
                    endpoint: 11,
                    direction: PolicyDirection::Ingress as u8,
                    protocol: 6,
                    port: 29400u16.to_be(),
                },
                16,
            )],
        };
        let adopted = engine.adopt(found, &ipcache, &local);
        assert_eq!(
            adopted,
            Adopted {
                endpoints: 2,
                peer_sets: 2,
                entries: 1,
                ipcache: 4
            }
        );
        assert_eq!(
            engine.installed.entries.keys().copied().collect::<Vec<_>>(),
            [(11, PolicyDirection::Ingress as u8, 6, 29400, 16)],
            "the port in host order, as write_allows records it"
        );
        let expected: BTreeSet<Ipv4Net> = [
            "10.2.0.7/32",
            "192.168.0.2/32",
            "192.168.0.1/32",
            "203.0.113.0/24",
        ]
        .into_iter()
        .map(|prefix| prefix.parse().unwrap())
        .collect();
        assert_eq!(
            engine
                .installed
                .ipcache
                .keys()
                .copied()
                .collect::<BTreeSet<_>>(),
            expected
        );
        assert!(engine.adopted && engine.last_inputs.is_none());
    }
}
