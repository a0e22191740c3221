//! Compiles policy into what the datapath looks up per packet, sized by rules, not by
//! identities × rules (the product is what overflows Cilium's per-endpoint policy maps).
//!
//! Two tables:
//! - **peer sets**, one entry per identity: the set of *peer selector slots* (distinct peers
//!   named by any rule: an endpoint selector, a CIDR with its exceptions, an entity) that the
//!   identity matches, as a bitmap of [`SELECTOR_CAPACITY`] bits;
//! - **port entries**, per endpoint, direction and protocol: disjoint port intervals (each
//!   expanded into LPM prefixes for the map), each with an `allow` and a `deny` bitmap of the
//!   slots whose rules cover it.
//!
//! A packet's verdict: `peers = peer_set[identity]`, `entry = port_entry[endpoint, dir, proto,
//! port]`; `peers & entry.deny` → denied, else `peers & entry.allow` → allowed, else denied if
//! the endpoint is isolated in that direction. Entries: one per identity, plus per endpoint at
//! most `2 × 16` prefixes per port-interval boundary its rules create.
//!
//! **Bound:** at most [`SELECTOR_CAPACITY`] distinct peer selectors per node. Beyond it
//! compilation fails with [`CompileError::TooManySelectors`], which the agent reports in the
//! policy's status and logs; it never installs a partial (and so wrongly allowing) policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::policy::evaluate::{entity_matches, NamedPorts, PeerKind, Verdict};
use crate::policy::model::{
    Action, Direction, EnforcementMode, Peer, Policy, PortMatch, Protocol, RuleRef,
};
use crate::policy::selector::Labels;

/// Bits in a peer set; the number of distinct peer selectors a node can hold.
pub const SELECTOR_CAPACITY: usize = 1024;
const WORDS: usize = SELECTOR_CAPACITY / 64;

/// A set of peer selector slots.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerSet(pub [u64; WORDS]);

impl Default for PeerSet {
    fn default() -> Self {
        Self([0; WORDS])
    }
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.slots()).finish()
    }
}

impl PeerSet {
    pub fn insert(&mut self, slot: usize) {
        self.0[slot / 64] |= 1 << (slot % 64);
    }

    pub fn intersects(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    pub fn union(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= b;
        }
    }

    pub fn intersection(&self, other: &Self) -> Self {
        let mut both = *self;
        for (a, b) in both.0.iter_mut().zip(other.0.iter()) {
            *a &= b;
        }
        both
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|word| *word == 0)
    }

    pub fn contains(&self, slot: usize) -> bool {
        self.0[slot / 64] & (1 << (slot % 64)) != 0
    }

    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        // Word by word, so a sparse set costs its set bits and the empty words.
        self.0.iter().enumerate().flat_map(|(index, word)| {
            let mut rest = *word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                Some(index * 64 + bit)
            })
        })
    }
}

/// What an identity stands for, as far as selectors care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// A pod, with its security labels.
    Endpoint(Labels),
    /// A reserved identity (host, world, remote node, …).
    Reserved(PeerKind),
    /// Addresses in this prefix that no longer listed prefix covers (CIDR identities, one per
    /// prefix a policy names; addresses outside every listed prefix are `world`).
    Cidr(Ipv4Net),
}

/// An endpoint on this node to compile for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInput {
    pub id: u32,
    pub labels: Labels,
    pub named_ports: NamedPorts,
}

/// A pod of the cluster as rules that look past its labels see it: its address (for
/// `ipBlock` peers, which select pods too) and its named ports (an egress rule naming a port
/// resolves it on the destination).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    pub ip: Ipv4Addr,
    pub named_ports: NamedPorts,
}

/// The pods carrying each endpoint identity.
pub type Members = BTreeMap<u32, Vec<Member>>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the policies selecting endpoints on this node name {count} distinct peers; the datapath holds at most {SELECTOR_CAPACITY}: merge rules that name the same peers, or select fewer endpoints per node")]
    TooManySelectors { count: usize },
}

/// One port interval's bitmaps, and which rules put each slot there (for naming the rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub first: u16,
    pub last: u16,
    pub allow: PeerSet,
    pub deny: PeerSet,
    pub rules: BTreeMap<usize, BTreeSet<(ActionRank, RuleRef)>>,
}

/// Orders deny before allow when naming rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ActionRank {
    Deny,
    Allow,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    /// The policies that isolate the endpoint in each direction (named when nothing allowed).
    pub isolated_by: BTreeMap<Direction, Vec<crate::policy::model::PolicyId>>,
    /// Sorted, disjoint intervals per (direction, protocol); gaps fall to the default.
    pub entries: BTreeMap<(Direction, Protocol), Vec<PortEntry>>,
}

impl EndpointPolicy {
    pub fn isolated(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.isolated_ingress,
            Direction::Egress => self.isolated_egress,
        }
    }

    /// How many LPM map entries this endpoint needs.
    pub fn map_entries(&self) -> usize {
        self.entries
            .values()
            .flatten()
            .map(|entry| port_prefixes(entry.first, entry.last).len())
            .sum()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Slot → the peer it stands for.
    pub selectors: Vec<Peer>,
    pub peer_sets: BTreeMap<u32, PeerSet>,
    /// The identities whose peer set may differ from the compilation before (added, changed
    /// or gone); `None`: any may.
    pub changed_peer_sets: Option<BTreeSet<u32>>,
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
    /// The identities the node gives addresses that are no pod's — its own and the other
    /// nodes' addresses, the prefixes policies name — as its ipcache holds them. Compilation
    /// leaves it empty; whoever writes the ipcache fills it, so that a flow whose far end is
    /// no pod is judged (and its rule named) with the identity the datapath used.
    pub address_identities: BTreeMap<Ipv4Net, u32>,
}

impl Compiled {
    /// The identity of `ip` by [`Self::address_identities`] (longest prefix), if it has one.
    pub fn address_identity(&self, ip: Ipv4Addr) -> Option<u32> {
        // Longest prefix first: at most 33 lookups, where a scan would read every pod's entry.
        (0..=32u8).rev().find_map(|length| {
            let prefix = Ipv4Net::new(ip, length).ok()?.trunc();
            self.address_identities.get(&prefix).copied()
        })
    }

    /// The datapath's decision, computed the way the datapath computes it, with the rule
    /// userspace names for it. `None` rule: decided by isolation (or its absence).
    pub fn lookup(
        &self,
        endpoint: u32,
        direction: Direction,
        peer_identity: u32,
        protocol: Protocol,
        port: u16,
    ) -> (Verdict, Option<RuleRef>) {
        let Some(policy) = self.endpoints.get(&endpoint) else {
            return (Verdict::Allowed, None);
        };
        let peers = self
            .peer_sets
            .get(&peer_identity)
            .copied()
            .unwrap_or_default();
        let entry = policy
            .entries
            .get(&(direction, protocol))
            .and_then(|entries| entries.iter().find(|e| (e.first..=e.last).contains(&port)));
        if let Some(entry) = entry {
            for (bits, rank, verdict) in [
                (entry.deny, ActionRank::Deny, Verdict::Denied),
                (entry.allow, ActionRank::Allow, Verdict::Allowed),
            ] {
                let hit = peers.intersection(&bits);
                if !hit.is_empty() {
                    let rule = hit
                        .slots()
                        .filter_map(|slot| entry.rules.get(&slot))
                        .flatten()
                        .filter(|(r, _)| *r == rank)
                        .map(|(_, rule)| rule.clone())
                        .min();
                    return (verdict, rule);
                }
            }
        }
        if policy.isolated(direction) {
            (Verdict::Denied, None)
        } else {
            (Verdict::Allowed, None)
        }
    }

    /// Total LPM entries for all endpoints, plus one peer-set entry per identity.
    pub fn map_entries(&self) -> (usize, usize) {
        (
            self.endpoints
                .values()
                .map(EndpointPolicy::map_entries)
                .sum(),
            self.peer_sets.len(),
        )
    }
}

fn cidr_identity_matches(prefix: &Ipv4Net, peer: &Peer) -> bool {
    match peer {
        Peer::Cidr { cidr, except } | Peer::IpBlock { cidr, except } => {
            cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix))
        }
        Peer::Entity(entity) => entity_matches(*entity, &PeerKind::World),
        Peer::Endpoints(_) | Peer::Ipv6Cidr { .. } | Peer::ServingPort { .. } => false,
    }
}

/// What every pod carrying an identity agrees on for a named port: `None` when one has no
/// such port or they disagree (a rule then opens nothing for the identity rather than a port
/// some of its pods do not serve under that name).
fn unanimous_port(members: &[Member], name: &str) -> Option<(Protocol, u16)> {
    let mut ports = members.iter().map(|m| m.named_ports.get(name).copied());
    let first = ports.next()??;
    ports.all(|port| port == Some(first)).then_some(first)
}

/// Whether the pods carrying an identity serve `name` as `protocol`/`port`: all of them
/// (`every_pod`, for allow rules) or any of them (for deny rules).
fn serves(members: &[Member], name: &str, port: (Protocol, u16), every_pod: bool) -> bool {
    if every_pod {
        unanimous_port(members, name) == Some(port)
    } else {
        members
            .iter()
            .any(|m| m.named_ports.get(name) == Some(&port))
    }
}

fn identity_matches(identity: u32, kind: &IdentityKind, peer: &Peer, members: &Members) -> bool {
    match kind {
        IdentityKind::Endpoint(labels) => match peer {
            Peer::Endpoints(selector) => selector.matches(labels),
            Peer::Entity(entity) => entity_matches(*entity, &PeerKind::Endpoint(labels.clone())),
            // Every pod of the identity in the block (see `Peer::IpBlock`).
            Peer::IpBlock { cidr, except } => members.get(&identity).is_some_and(|pods| {
                !pods.is_empty()
                    && pods.iter().all(|pod| {
                        cidr.contains(&pod.ip) && !except.iter().any(|e| e.contains(&pod.ip))
                    })
            }),
            Peer::ServingPort {
                peers,
                name,
                protocol,
                port,
                every_pod,
            } => {
                members
                    .get(&identity)
                    .is_some_and(|pods| serves(pods, name, (*protocol, *port), *every_pod))
                    && (peers.is_empty()
                        || peers
                            .iter()
                            .any(|p| identity_matches(identity, kind, p, members)))
            }
            Peer::Cidr { .. } | Peer::Ipv6Cidr { .. } => false,
        },
        // `world` stands for addresses outside every listed prefix: only a /0 covers them.
        IdentityKind::Reserved(PeerKind::World) => match peer {
            Peer::Cidr { cidr, .. } | Peer::IpBlock { cidr, .. } => cidr.prefix_len() == 0,
            Peer::Entity(entity) => entity_matches(*entity, &PeerKind::World),
            Peer::Endpoints(_) | Peer::Ipv6Cidr { .. } | Peer::ServingPort { .. } => false,
        },
        IdentityKind::Reserved(kind) => match peer {
            Peer::Entity(entity) => entity_matches(*entity, kind),
            _ => false,
        },
        IdentityKind::Cidr(prefix) => cidr_identity_matches(prefix, peer),
    }
}

/// The CIDR prefixes policies name (each needs its own identity in the ipcache).
pub fn policy_prefixes(policies: &[Policy]) -> BTreeSet<Ipv4Net> {
    policies
        .iter()
        .flat_map(|policy| &policy.rules)
        .flat_map(|rule| &rule.peers)
        .filter_map(|peer| match peer {
            Peer::Cidr { cidr, except } | Peer::IpBlock { cidr, except } => {
                Some(std::iter::once(*cidr).chain(except.iter().copied()))
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// A rule's contribution to one port range: (first, last, action, its peer slots, the rule).
type RangeRule = (u16, u16, ActionRank, PeerSet, RuleRef);

/// Compiles `policies` for the node's `endpoints`, against every known identity, without
/// knowing which pods carry each identity: `ipBlock` peers then match no pod and egress rules
/// naming a port open nothing (see [`compile_with_members`]).
pub fn compile(
    policies: &[Policy],
    mode: EnforcementMode,
    endpoints: &[EndpointInput],
    identities: &BTreeMap<u32, IdentityKind>,
) -> Result<Compiled, CompileError> {
    compile_with_members(policies, mode, endpoints, identities, &Members::new())
}

/// Whether compiling `policy` reads the pods behind identities (`members`): an `ipBlock` peer
/// (which selects pods by address) or an egress rule naming a port (resolved on the
/// destinations' pods). A change of pods elsewhere can change such a policy's outcome without
/// changing any identity.
pub fn uses_members(policy: &Policy) -> bool {
    policy.rules.iter().any(|rule| {
        rule.peers
            .iter()
            .any(|peer| matches!(peer, Peer::IpBlock { .. } | Peer::ServingPort { .. }))
            || (rule.section.direction() == Direction::Egress
                && rule
                    .ports
                    .iter()
                    .any(|port| matches!(port, PortMatch::Named { .. })))
    })
}

/// Compiles `policies` for the node's `endpoints`, against every known identity; `members`
/// are the pods carrying each endpoint identity, for `ipBlock` peers (which select pods by
/// address) and egress rules naming a port (which resolve on the destination pods).
pub fn compile_with_members(
    policies: &[Policy],
    mode: EnforcementMode,
    endpoints: &[EndpointInput],
    identities: &BTreeMap<u32, IdentityKind>,
    members: &Members,
) -> Result<Compiled, CompileError> {
    compile_reusing(
        policies,
        mode,
        endpoints,
        identities.iter().map(|(identity, kind)| (*identity, kind)),
        None,
        members,
        &mut MatchCache::default(),
    )
}

/// Which selectors each identity matched in the last compilation, so that the next one
/// matches only what changed: identities that are new or stand for other labels, and selectors
/// that are new. Matching every identity against every selector is most of a compilation's
/// cost (20,000 identities × hundreds of selectors), and a pod starting or a policy edited
/// changes few of either.
#[derive(Debug, Default)]
pub struct MatchCache {
    selectors: Vec<Peer>,
    /// Hash of the members the sets were matched with: when they change, the selectors that
    /// read them ([`reads_members`]) are matched again.
    members: u64,
    /// Each identity as it was matched.
    kinds: HashMap<u32, IdentityKind>,
    /// What each identity matched.
    sets: BTreeMap<u32, PeerSet>,
    /// The cache holds a whole compilation (not a default or a failed one).
    primed: bool,
}

/// The identities that changed since the compilation a [`MatchCache`] holds: each with what
/// it stands for now, `None` when it is gone. Every identity not listed is as it was.
pub type IdentityChanges<'a> = [(u32, Option<&'a IdentityKind>)];

impl MatchCache {
    /// For each of `selectors`, its slot in the cached sets when those answer for it.
    fn slots_for(&self, selectors: &[Peer], members: u64) -> Vec<Option<usize>> {
        let cached: std::collections::HashMap<&Peer, usize> = self
            .selectors
            .iter()
            .enumerate()
            .map(|(slot, peer)| (peer, slot))
            .collect();
        selectors
            .iter()
            .map(|peer| {
                if self.members != members && reads_members(peer) {
                    return None;
                }
                cached.get(peer).copied()
            })
            .collect()
    }
}

/// Whether matching `peer` reads the pods behind identities.
fn reads_members(peer: &Peer) -> bool {
    matches!(peer, Peer::IpBlock { .. } | Peer::ServingPort { .. })
}

fn members_hash(members: &Members) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    members.hash(&mut hasher);
    hasher.finish()
}

/// [`compile_with_members`], taking from `cache` what the previous compilation matched and
/// leaving in it what this one did (a failed compilation leaves it as it was).
///
/// With `changed` (what changed among `identities` since the cached compilation), a
/// compilation whose selectors are those of the cached one matches only the changed
/// identities and reports which peer sets differ ([`Compiled::changed_peer_sets`]); otherwise
/// every identity is looked at.
pub fn compile_reusing<'a>(
    policies: &[Policy],
    mode: EnforcementMode,
    endpoints: &[EndpointInput],
    identities: impl IntoIterator<Item = (u32, &'a IdentityKind)>,
    changed: Option<&IdentityChanges<'a>>,
    members: &Members,
    cache: &mut MatchCache,
) -> Result<Compiled, CompileError> {
    let mut compiled = Compiled::default();
    let all_peers = Peer::Entity(crate::policy::model::Entity::All);
    // Slots are handed out on first use; past the bitmap's width compilation stops at once.
    let mut slot_index: HashMap<Peer, usize> = HashMap::new();
    let mut slot_of = |peer: &Peer, selectors: &mut Vec<Peer>| -> Result<usize, CompileError> {
        let slot = match slot_index.get(peer) {
            Some(slot) => *slot,
            None => {
                selectors.push(peer.clone());
                slot_index.insert(peer.clone(), selectors.len() - 1);
                selectors.len() - 1
            }
        };
        if slot >= SELECTOR_CAPACITY {
            return Err(CompileError::TooManySelectors {
                count: selectors.len(),
            });
        }
        Ok(slot)
    };
    // Each endpoint's selecting policies, by index.
    let selecting_by_endpoint: Vec<Vec<usize>> = endpoints
        .iter()
        .map(|endpoint| {
            (0..policies.len())
                .filter(|index| policies[*index].subject.matches(&endpoint.labels))
                .collect()
        })
        .collect();
    if mode != EnforcementMode::Never {
        // Slots follow the order of the policies that apply here, not of the endpoints: a pod
        // that comes or goes under policies already applying moves no slot, so no peer set
        // and no entry is written again for it.
        let mut applying = vec![false; policies.len()];
        for index in selecting_by_endpoint.iter().flatten() {
            applying[*index] = true;
        }
        for (policy, _) in policies
            .iter()
            .zip(&applying)
            .filter(|(_, applies)| **applies)
        {
            for rule in &policy.rules {
                if rule.peers.is_empty() {
                    slot_of(&all_peers, &mut compiled.selectors)?;
                }
                for peer in &rule.peers {
                    slot_of(peer, &mut compiled.selectors)?;
                }
            }
        }
    }
    for (endpoint, selecting) in endpoints.iter().zip(selecting_by_endpoint) {
        let selecting: Vec<&Policy> = selecting
            .into_iter()
            .map(|index| &policies[index])
            .collect();
        let mut result = EndpointPolicy {
            isolated_ingress: mode == EnforcementMode::Always
                || (mode == EnforcementMode::Default
                    && selecting.iter().any(|p| p.isolates_ingress)),
            isolated_egress: mode == EnforcementMode::Always
                || (mode == EnforcementMode::Default
                    && selecting.iter().any(|p| p.isolates_egress)),
            entries: BTreeMap::new(),
            isolated_by: [Direction::Ingress, Direction::Egress]
                .into_iter()
                .map(|direction| {
                    let ids = selecting
                        .iter()
                        .filter(|p| p.isolates(direction))
                        .map(|p| p.id.clone())
                        .collect();
                    (direction, ids)
                })
                .collect(),
        };
        if mode == EnforcementMode::Never {
            compiled.endpoints.insert(endpoint.id, result);
            continue;
        }
        // (direction, protocol) → [(first, last, action, slots, rule)]
        let mut ranges: BTreeMap<(Direction, Protocol), Vec<RangeRule>> = BTreeMap::new();
        for policy in &selecting {
            for rule in &policy.rules {
                let direction = rule.section.direction();
                let mut slots = PeerSet::default();
                if rule.peers.is_empty() {
                    slots.insert(slot_of(&all_peers, &mut compiled.selectors)?);
                }
                for peer in &rule.peers {
                    slots.insert(slot_of(peer, &mut compiled.selectors)?);
                }
                let rank = match rule.section.action() {
                    Action::Deny => ActionRank::Deny,
                    Action::Allow => ActionRank::Allow,
                };
                if rule.ports.is_empty() {
                    // Every port of TCP and UDP, and every other protocol (port 0).
                    for (transport, last) in [
                        (Protocol::Tcp, u16::MAX),
                        (Protocol::Udp, u16::MAX),
                        (Protocol::Other, 0),
                    ] {
                        ranges.entry((direction, transport)).or_default().push((
                            0,
                            last,
                            rank,
                            slots,
                            policy.rule_ref(rule),
                        ));
                    }
                    continue;
                }
                for port in &rule.ports {
                    let (protocol, first, last) = match port {
                        PortMatch::Range {
                            protocol,
                            first,
                            last,
                        } => (*protocol, *first, *last),
                        PortMatch::Named { protocol, name } if direction == Direction::Egress => {
                            // The name is the destination's: one peer per number it resolves
                            // to on the destinations' pods, holding the identities whose pods
                            // serve it under that name.
                            let every_pod = rank == ActionRank::Allow;
                            let resolved: BTreeSet<(Protocol, u16)> = members
                                .values()
                                .flatten()
                                .filter_map(|pod| pod.named_ports.get(name).copied())
                                .filter(|(named_protocol, _)| protocol.matches(*named_protocol))
                                .collect();
                            for (named_protocol, number) in resolved {
                                if named_protocol == Protocol::Other {
                                    continue;
                                }
                                let serving = Peer::ServingPort {
                                    peers: rule.peers.clone(),
                                    name: name.clone(),
                                    protocol: named_protocol,
                                    port: number,
                                    every_pod,
                                };
                                let mut only = PeerSet::default();
                                only.insert(slot_of(&serving, &mut compiled.selectors)?);
                                ranges
                                    .entry((direction, named_protocol))
                                    .or_default()
                                    .push((number, number, rank, only, policy.rule_ref(rule)));
                            }
                            continue;
                        }
                        PortMatch::Named { protocol, name } => {
                            match endpoint.named_ports.get(name) {
                                Some((named_protocol, number))
                                    if protocol.matches(*named_protocol) =>
                                {
                                    let only = match named_protocol {
                                        Protocol::Tcp => crate::policy::model::ProtocolMatch::Tcp,
                                        Protocol::Udp => crate::policy::model::ProtocolMatch::Udp,
                                        Protocol::Other => continue,
                                    };
                                    (only, *number, *number)
                                }
                                // This endpoint has no such port: the rule opens nothing here.
                                _ => continue,
                            }
                        }
                    };
                    for transport in [Protocol::Tcp, Protocol::Udp] {
                        if protocol.matches(transport) {
                            ranges.entry((direction, transport)).or_default().push((
                                first,
                                last,
                                rank,
                                slots,
                                policy.rule_ref(rule),
                            ));
                        }
                    }
                }
            }
        }
        for (key, list) in ranges {
            result.entries.insert(key, disjoint(&list));
        }
        compiled.endpoints.insert(endpoint.id, result);
    }
    let members = (members, members_hash(members));
    let cached_slots = cache.slots_for(&compiled.selectors, members.1);
    let same_selectors = cache.primed
        && cache.selectors.len() == cached_slots.len()
        && cached_slots
            .iter()
            .enumerate()
            .all(|(slot, cached)| *cached == Some(slot));
    if let (true, Some(changed)) = (same_selectors, changed) {
        // Every slot means what it meant: only the changed identities are matched.
        let mut touched = BTreeSet::new();
        for (identity, kind) in changed {
            match kind {
                Some(kind) => {
                    let mut set = PeerSet::default();
                    for (slot, peer) in compiled.selectors.iter().enumerate() {
                        if identity_matches(*identity, kind, peer, members.0) {
                            set.insert(slot);
                        }
                    }
                    if cache.sets.insert(*identity, set) != Some(set) {
                        touched.insert(*identity);
                    }
                    cache.kinds.insert(*identity, (*kind).clone());
                }
                None => {
                    if cache.sets.remove(identity).is_some() {
                        touched.insert(*identity);
                    }
                    cache.kinds.remove(identity);
                }
            }
        }
        cache.members = members.1;
        compiled.peer_sets = cache.sets.clone();
        compiled.changed_peer_sets = Some(touched);
        return Ok(compiled);
    }
    // A cached set is carried over through its set bits (cached slot → slot now); only the
    // selectors the cache cannot answer for are matched, so an unchanged identity costs what
    // it matches, not the number of selectors.
    let mut slot_now: Vec<Option<usize>> = vec![None; cache.selectors.len()];
    let mut unanswered: Vec<usize> = Vec::new();
    for (slot, cached_slot) in cached_slots.iter().enumerate() {
        match cached_slot {
            Some(cached_slot) => slot_now[*cached_slot] = Some(slot),
            None => unanswered.push(slot),
        }
    }
    let mut kinds = HashMap::new();
    for (identity, kind) in identities {
        let identity = &identity;
        let cached = match (cache.kinds.remove(identity), cache.sets.get(identity)) {
            (Some(cached_kind), Some(cached)) if cached_kind == *kind => {
                Some((cached_kind, *cached))
            }
            _ => None,
        };
        let mut set = PeerSet::default();
        match &cached {
            Some((_, cached)) => {
                for cached_slot in cached.slots() {
                    if let Some(Some(slot)) = slot_now.get(cached_slot) {
                        set.insert(*slot);
                    }
                }
                for &slot in &unanswered {
                    if identity_matches(*identity, kind, &compiled.selectors[slot], members.0) {
                        set.insert(slot);
                    }
                }
            }
            None => {
                for (slot, peer) in compiled.selectors.iter().enumerate() {
                    if identity_matches(*identity, kind, peer, members.0) {
                        set.insert(slot);
                    }
                }
            }
        }
        compiled.peer_sets.insert(*identity, set);
        let kind = cached.map_or_else(|| kind.clone(), |(kind, _)| kind);
        kinds.insert(*identity, kind);
    }
    *cache = MatchCache {
        selectors: compiled.selectors.clone(),
        members: members.1,
        kinds,
        sets: compiled.peer_sets.clone(),
        primed: true,
    };
    Ok(compiled)
}

/// Splits overlapping ranges into disjoint intervals, each with the union of what covers it;
/// neighbours with equal contents merge.
fn disjoint(ranges: &[RangeRule]) -> Vec<PortEntry> {
    let mut bounds: BTreeSet<u32> = BTreeSet::new();
    for (first, last, ..) in ranges {
        bounds.insert(u32::from(*first));
        bounds.insert(u32::from(*last) + 1);
    }
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut entries: Vec<PortEntry> = Vec::new();
    for window in bounds.windows(2) {
        let (start, end) = (window[0], window[1] - 1);
        let mut entry = PortEntry {
            first: start as u16,
            last: end as u16,
            ..PortEntry::default()
        };
        for (first, last, rank, slots, rule) in ranges {
            if u32::from(*first) <= start && end <= u32::from(*last) {
                match rank {
                    ActionRank::Deny => entry.deny.union(slots),
                    ActionRank::Allow => entry.allow.union(slots),
                }
                for slot in slots.slots() {
                    entry
                        .rules
                        .entry(slot)
                        .or_default()
                        .insert((*rank, rule.clone()));
                }
            }
        }
        if entry.allow.is_empty() && entry.deny.is_empty() {
            continue;
        }
        match entries.last_mut() {
            Some(previous)
                if u32::from(previous.last) + 1 == start
                    && previous.allow == entry.allow
                    && previous.deny == entry.deny
                    && previous.rules == entry.rules =>
            {
                previous.last = entry.last;
            }
            _ => entries.push(entry),
        }
    }
    entries
}

/// The LPM prefixes (port, prefix length over the 16 port bits) covering `first..=last`.
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut prefixes = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest aligned block starting at `start` that stays within `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1u32 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        prefixes.push((start as u16, 16 - size.trailing_zeros() as u8));
        start += size;
    }
    prefixes
}

#[cfg(test)]
mod tests {
    use crate::policy::fixtures::{app, labels, rule};
    use std::net::Ipv4Addr;

    use super::*;
    use crate::policy::evaluate::{decide, Connection, PeerView, Reason, SubjectView};
    use crate::policy::model::{Entity, PolicyId, PolicyKind, ProtocolMatch, Rule, Section};
    use crate::policy::selector::Selector;

    fn ports(protocol: ProtocolMatch, first: u16, last: u16) -> PortMatch {
        PortMatch::Range {
            protocol,
            first,
            last,
        }
    }

    fn policy(name: &str, subject: Selector, rules: Vec<Rule>, isolates: (bool, bool)) -> Policy {
        Policy {
            id: PolicyId {
                kind: PolicyKind::WeftNetworkPolicy,
                namespace: Some("ml".into()),
                name: name.into(),
            },
            subject,
            rules,
            isolates_ingress: isolates.0,
            isolates_egress: isolates.1,
            unenforced: Vec::new(),
        }
    }

    fn scenario() -> (Vec<Policy>, Vec<EndpointInput>, BTreeMap<u32, IdentityKind>) {
        let cidr = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        let policies = vec![
            policy(
                "trainers",
                app("trainer"),
                vec![
                    rule(
                        Section::Ingress,
                        0,
                        vec![Peer::Endpoints(app("trainer"))],
                        vec![ports(ProtocolMatch::Tcp, 29400, 29500)],
                    ),
                    rule(
                        Section::Ingress,
                        1,
                        vec![Peer::Entity(Entity::Host)],
                        vec![],
                    ),
                    rule(
                        Section::Egress,
                        0,
                        vec![Peer::Cidr {
                            cidr: cidr("10.0.0.0/8"),
                            except: vec![cidr("10.1.0.0/16")],
                        }],
                        vec![ports(ProtocolMatch::Tcp, 443, 443)],
                    ),
                    rule(
                        Section::Egress,
                        1,
                        vec![Peer::Endpoints(app("trainer"))],
                        vec![ports(ProtocolMatch::Any, 29000, 29999)],
                    ),
                ],
                (true, true),
            ),
            policy(
                "no-ssh-anywhere",
                Selector::all(),
                vec![rule(
                    Section::IngressDeny,
                    0,
                    vec![],
                    vec![ports(ProtocolMatch::Tcp, 22, 22)],
                )],
                (false, false),
            ),
            policy(
                "model",
                app("model"),
                vec![
                    rule(
                        Section::Ingress,
                        0,
                        vec![Peer::Endpoints(app("gateway")), Peer::Entity(Entity::World)],
                        vec![PortMatch::Named {
                            protocol: ProtocolMatch::Tcp,
                            name: "http".into(),
                        }],
                    ),
                    rule(
                        Section::IngressDeny,
                        0,
                        vec![Peer::Cidr {
                            cidr: cidr("0.0.0.0/0"),
                            except: vec![],
                        }],
                        vec![ports(ProtocolMatch::Tcp, 8000, 8100)],
                    ),
                    rule(
                        Section::Egress,
                        0,
                        vec![],
                        vec![ports(ProtocolMatch::Udp, 53, 53)],
                    ),
                ],
                (true, true),
            ),
        ];
        let named = NamedPorts::from([("http".into(), (Protocol::Tcp, 8080))]);
        let endpoints = vec![
            EndpointInput {
                id: 1,
                labels: labels(&[("app", "trainer")]),
                named_ports: NamedPorts::new(),
            },
            EndpointInput {
                id: 2,
                labels: labels(&[("app", "model")]),
                named_ports: named,
            },
            EndpointInput {
                id: 3,
                labels: labels(&[("app", "gateway")]),
                named_ports: NamedPorts::new(),
            },
        ];
        let mut identities = BTreeMap::from([
            (1, IdentityKind::Reserved(PeerKind::Host)),
            (2, IdentityKind::Reserved(PeerKind::World)),
            (6, IdentityKind::Reserved(PeerKind::RemoteNode)),
            (7, IdentityKind::Reserved(PeerKind::KubeApiserver)),
            (300, IdentityKind::Endpoint(labels(&[("app", "trainer")]))),
            (301, IdentityKind::Endpoint(labels(&[("app", "model")]))),
            (302, IdentityKind::Endpoint(labels(&[("app", "gateway")]))),
        ]);
        for (index, prefix) in policy_prefixes(&policies).into_iter().enumerate() {
            identities.insert(16_777_216 + index as u32, IdentityKind::Cidr(prefix));
        }
        (policies, endpoints, identities)
    }

    /// An address the identity stands for: inside its prefix and no more specific listed one.
    fn address_of(kind: &IdentityKind, identities: &BTreeMap<u32, IdentityKind>) -> PeerView {
        let more_specific = |ip: Ipv4Addr, prefix: &Ipv4Net| {
            identities.values().any(|other| matches!(other, IdentityKind::Cidr(p) if p != prefix && p.prefix_len() > prefix.prefix_len() && p.contains(&ip)))
        };
        let (kind, ip) = match kind {
            IdentityKind::Endpoint(labels) => (PeerKind::Endpoint(labels.clone()), None),
            IdentityKind::Reserved(PeerKind::World) => {
                (PeerKind::World, Some(Ipv4Addr::new(203, 0, 113, 7)))
            }
            IdentityKind::Reserved(kind) => (kind.clone(), None),
            IdentityKind::Cidr(prefix) => {
                let ip = prefix
                    .hosts()
                    .find(|ip| !more_specific(*ip, prefix))
                    .expect("an address of the prefix");
                (PeerKind::World, Some(ip))
            }
        };
        PeerView {
            kind,
            ip,
            named_ports: NamedPorts::new(),
        }
    }

    fn member(ip: [u8; 4], ports: &[(&str, Protocol, u16)]) -> Member {
        Member {
            ip: Ipv4Addr::from(ip),
            named_ports: ports
                .iter()
                .map(|(name, protocol, port)| (name.to_string(), (*protocol, *port)))
                .collect(),
        }
    }

    #[test]
    fn slots_follow_the_policies_so_endpoints_coming_and_going_move_none() {
        let (policies, endpoints, identities) = scenario();
        let mode = EnforcementMode::Default;
        let before = compile(&policies, mode, &endpoints, &identities).expect("compiles");
        // The same endpoints in another order, and one more under policies already applying.
        let mut moved: Vec<EndpointInput> = endpoints.iter().rev().cloned().collect();
        let mut another = endpoints[0].clone();
        another.id = 99;
        moved.push(another);
        let after = compile(&policies, mode, &moved, &identities).expect("compiles");
        assert_eq!(before.selectors, after.selectors);
        assert_eq!(before.peer_sets, after.peer_sets);
        assert_eq!(before.endpoints[&endpoints[0].id], after.endpoints[&99]);
    }

    #[test]
    fn a_compilation_reusing_the_last_ones_matches_gives_what_one_from_scratch_does() {
        let (mut policies, mut endpoints, mut identities) = scenario();
        let mut members = Members::new();
        let mut cache = MatchCache::default();
        let mut previous: Option<BTreeMap<u32, IdentityKind>> = None;
        let mut previous_sets: BTreeMap<u32, PeerSet> = BTreeMap::new();
        let mut step = |what: &str,
                        policies: &[Policy],
                        endpoints: &[EndpointInput],
                        identities: &BTreeMap<u32, IdentityKind>,
                        members: &Members| {
            let mode = EnforcementMode::Default;
            // What changed since the last step, as the agent's index reports it.
            let changed: Option<Vec<(u32, Option<&IdentityKind>)>> =
                previous
                    .as_ref()
                    .map(|before: &BTreeMap<u32, IdentityKind>| {
                        before
                            .keys()
                            .chain(identities.keys())
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .filter(|identity| before.get(identity) != identities.get(identity))
                            .map(|identity| (*identity, identities.get(identity)))
                            .collect()
                    });
            let reused = compile_reusing(
                policies,
                mode,
                endpoints,
                identities.iter().map(|(identity, kind)| (*identity, kind)),
                changed.as_deref(),
                members,
                &mut cache,
            )
            .expect("compiles");
            let scratch = compile_with_members(policies, mode, endpoints, identities, members)
                .expect("compiles");
            assert_eq!(reused.selectors, scratch.selectors, "{what}");
            assert_eq!(reused.peer_sets, scratch.peer_sets, "{what}");
            if matches!(what, "pod added" | "identity relabelled") {
                assert!(
                    reused.changed_peer_sets.is_some(),
                    "{what}: the selectors did not move, so only changed identities are matched"
                );
            }
            if let Some(touched) = &reused.changed_peer_sets {
                let differ: BTreeSet<u32> = previous_sets
                    .keys()
                    .chain(reused.peer_sets.keys())
                    .filter(|identity| {
                        previous_sets.get(*identity) != reused.peer_sets.get(*identity)
                    })
                    .copied()
                    .collect();
                assert_eq!(*touched, differ, "{what}: the changed peer sets named");
            }
            previous = Some(identities.clone());
            previous_sets = reused.peer_sets.clone();
            reused.peer_sets
        };
        let first = step("first", &policies, &endpoints, &identities, &members);

        // A pod starts with an identity of its own.
        identities.insert(303, IdentityKind::Endpoint(labels(&[("app", "trainer")])));
        endpoints.push(EndpointInput {
            id: 4,
            labels: labels(&[("app", "trainer"), ("rank", "1")]),
            named_ports: NamedPorts::new(),
        });
        step("pod added", &policies, &endpoints, &identities, &members);

        // An identity number released and taken again by other labels.
        identities.insert(301, IdentityKind::Endpoint(labels(&[("app", "trainer")])));
        let relabelled = step(
            "identity relabelled",
            &policies,
            &endpoints,
            &identities,
            &members,
        );
        assert_ne!(
            first[&301], relabelled[&301],
            "the reused number matches what it now stands for"
        );

        // The first policy goes: every slot moves.
        let trainers = policies.remove(0);
        step(
            "policy removed",
            &policies,
            &endpoints,
            &identities,
            &members,
        );
        policies.push(trainers);

        // Pods selected by address: the sets follow where the identity's pods are.
        let block = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        policies.push(policy(
            "from-the-rack",
            app("gateway"),
            vec![rule(
                Section::Ingress,
                0,
                vec![Peer::IpBlock {
                    cidr: block("10.8.0.0/16"),
                    except: vec![],
                }],
                vec![],
            )],
            (true, false),
        ));
        members.insert(300, vec![member([10, 8, 0, 5], &[])]);
        let inside = step(
            "ipBlock added",
            &policies,
            &endpoints,
            &identities,
            &members,
        );
        members.insert(300, vec![member([10, 9, 0, 5], &[])]);
        let outside = step("member moved", &policies, &endpoints, &identities, &members);
        assert_ne!(inside[&300], outside[&300], "the pod left the block");
    }

    #[test]
    fn an_egress_rule_naming_a_port_resolves_it_on_each_destination() {
        // Upstream: "should allow egress access on one named port".
        let policies = vec![policy(
            "egress-named",
            app("client"),
            vec![rule(
                Section::Egress,
                0,
                vec![],
                vec![PortMatch::Named {
                    protocol: ProtocolMatch::Tcp,
                    name: "serve".into(),
                }],
            )],
            (false, true),
        )];
        let endpoints = vec![EndpointInput {
            id: 1,
            labels: labels(&[("app", "client")]),
            named_ports: NamedPorts::new(),
        }];
        let identities = BTreeMap::from([
            (2, IdentityKind::Reserved(PeerKind::World)),
            (300, IdentityKind::Endpoint(labels(&[("app", "web")]))),
            (301, IdentityKind::Endpoint(labels(&[("app", "api")]))),
            (302, IdentityKind::Endpoint(labels(&[("app", "mixed")]))),
            (303, IdentityKind::Endpoint(labels(&[("app", "dns")]))),
        ]);
        let members = Members::from([
            (
                300,
                vec![member([10, 1, 0, 1], &[("serve", Protocol::Tcp, 80)])],
            ),
            (
                301,
                vec![
                    member([10, 1, 0, 2], &[("serve", Protocol::Tcp, 8080)]),
                    member([10, 1, 1, 2], &[("serve", Protocol::Tcp, 8080)]),
                ],
            ),
            // Pods of one identity that disagree: the rule allows none of them.
            (
                302,
                vec![
                    member([10, 1, 0, 3], &[("serve", Protocol::Tcp, 80)]),
                    member([10, 1, 1, 3], &[("serve", Protocol::Tcp, 81)]),
                ],
            ),
            // The name on UDP: a TCP rule does not open it.
            (
                303,
                vec![member([10, 1, 0, 4], &[("serve", Protocol::Udp, 53)])],
            ),
        ]);
        let compiled = compile_with_members(
            &policies,
            EnforcementMode::Default,
            &endpoints,
            &identities,
            &members,
        )
        .expect("an egress rule naming a port compiles");
        let verdict = |identity, protocol, port| {
            compiled
                .lookup(1, Direction::Egress, identity, protocol, port)
                .0
        };
        assert_eq!(verdict(300, Protocol::Tcp, 80), Verdict::Allowed);
        assert_eq!(verdict(300, Protocol::Tcp, 8080), Verdict::Denied);
        assert_eq!(verdict(301, Protocol::Tcp, 8080), Verdict::Allowed);
        assert_eq!(verdict(301, Protocol::Tcp, 80), Verdict::Denied);
        assert_eq!(verdict(302, Protocol::Tcp, 80), Verdict::Denied);
        assert_eq!(verdict(302, Protocol::Tcp, 81), Verdict::Denied);
        assert_eq!(verdict(303, Protocol::Udp, 53), Verdict::Denied);
        assert_eq!(
            verdict(2, Protocol::Tcp, 80),
            Verdict::Denied,
            "the world has no named ports"
        );
        // The rule is named for what it allowed.
        let (_, rule) = compiled.lookup(1, Direction::Egress, 300, Protocol::Tcp, 80);
        assert_eq!(
            rule.map(|r| r.to_string()).as_deref(),
            Some("WeftNetworkPolicy ml/egress-named egress[0]")
        );
        // Without members (`compile`), the rule opens nothing: never more than it says.
        let blind = compile(&policies, EnforcementMode::Default, &endpoints, &identities)
            .expect("compiles");
        assert_eq!(
            blind.lookup(1, Direction::Egress, 300, Protocol::Tcp, 80).0,
            Verdict::Denied
        );
    }

    #[test]
    fn an_ip_block_matches_a_pod_identity_only_when_every_pod_of_it_is_inside() {
        let cidr = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        // Upstream: "should enforce except clause while egress access to server in CIDR block".
        let policies = vec![policy(
            "to-block",
            app("client"),
            vec![rule(
                Section::Egress,
                0,
                vec![Peer::IpBlock {
                    cidr: cidr("0.0.0.0/4"),
                    except: vec![cidr("10.1.0.7/32")],
                }],
                vec![],
            )],
            (false, true),
        )];
        let endpoints = vec![EndpointInput {
            id: 1,
            labels: labels(&[("app", "client")]),
            named_ports: NamedPorts::new(),
        }];
        let mut identities = BTreeMap::from([
            (2, IdentityKind::Reserved(PeerKind::World)),
            (300, IdentityKind::Endpoint(labels(&[("app", "in")]))),
            (301, IdentityKind::Endpoint(labels(&[("app", "excepted")]))),
            (302, IdentityKind::Endpoint(labels(&[("app", "straddles")]))),
            (303, IdentityKind::Endpoint(labels(&[("app", "unknown")]))),
        ]);
        for (index, prefix) in policy_prefixes(&policies).into_iter().enumerate() {
            identities.insert(16_777_216 + index as u32, IdentityKind::Cidr(prefix));
        }
        let members = Members::from([
            (300, vec![member([10, 1, 0, 5], &[])]),
            (301, vec![member([10, 1, 0, 7], &[])]),
            (
                302,
                vec![member([10, 1, 0, 8], &[]), member([10, 1, 0, 7], &[])],
            ),
        ]);
        let compiled = compile_with_members(
            &policies,
            EnforcementMode::Default,
            &endpoints,
            &identities,
            &members,
        )
        .expect("compiles");
        let verdict = |identity| {
            compiled
                .lookup(1, Direction::Egress, identity, Protocol::Tcp, 80)
                .0
        };
        assert_eq!(verdict(300), Verdict::Allowed);
        assert_eq!(verdict(301), Verdict::Denied);
        assert_eq!(verdict(302), Verdict::Denied, "one of its pods is excepted");
        assert_eq!(
            verdict(303),
            Verdict::Denied,
            "no pod known: no address known"
        );
        // Outside addresses in the block, by their CIDR identity.
        assert_eq!(verdict(16_777_216), Verdict::Allowed);
        assert_eq!(verdict(16_777_217), Verdict::Denied, "the excepted /32");
        assert_eq!(
            verdict(2),
            Verdict::Denied,
            "the world is outside the block"
        );
    }

    #[test]
    fn the_compiled_datapath_agrees_with_the_reference_semantics() {
        let (policies, endpoints, identities) = scenario();
        let compiled = compile(&policies, EnforcementMode::Default, &endpoints, &identities)
            .expect("compiles");
        let ports = [
            0, 21, 22, 53, 80, 443, 8000, 8080, 8100, 8101, 29000, 29399, 29400, 29450, 29500,
            29501, 29999, 65535,
        ];
        let mut checked = 0;
        for endpoint in &endpoints {
            let subject = SubjectView {
                labels: endpoint.labels.clone(),
                named_ports: endpoint.named_ports.clone(),
            };
            for (identity, kind) in &identities {
                let peer = address_of(kind, &identities);
                for direction in [Direction::Ingress, Direction::Egress] {
                    for (protocol, ports) in [
                        (Protocol::Tcp, &ports[..]),
                        (Protocol::Udp, &ports[..]),
                        (Protocol::Other, &[0][..]),
                    ] {
                        for &port in ports {
                            let expected = decide(
                                &policies,
                                EnforcementMode::Default,
                                &subject,
                                &peer,
                                &Connection {
                                    direction,
                                    protocol,
                                    port,
                                },
                            );
                            let (verdict, rule) =
                                compiled.lookup(endpoint.id, direction, *identity, protocol, port);
                            let expected_rule = match &expected.reason {
                                Reason::Rule(rule) => Some(rule.clone()),
                                _ => None,
                            };
                            assert_eq!(
                                (verdict, rule),
                                (expected.verdict, expected_rule),
                                "endpoint {} peer {identity} ({kind:?}) {direction} {protocol:?}/{port}",
                                endpoint.id
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked} connections checked");
    }

    #[test]
    fn map_entries_grow_with_rules_not_with_identities() {
        let (policies, endpoints, _) = scenario();
        let many: BTreeMap<u32, IdentityKind> = (0..10_000)
            .map(|i| {
                (
                    1000 + i,
                    IdentityKind::Endpoint(labels(&[
                        ("app", if i % 2 == 0 { "trainer" } else { "other" }),
                        ("replica", &i.to_string()),
                    ])),
                )
            })
            .collect();
        let few: BTreeMap<u32, IdentityKind> =
            many.iter().take(10).map(|(k, v)| (*k, v.clone())).collect();
        let with_few = compile(&policies, EnforcementMode::Default, &endpoints, &few).expect("few");
        let with_many =
            compile(&policies, EnforcementMode::Default, &endpoints, &many).expect("many");
        assert_eq!(
            with_few.map_entries().0,
            with_many.map_entries().0,
            "per-endpoint entries do not depend on identities"
        );
        assert_eq!(
            with_many.map_entries().1,
            10_000,
            "one peer-set entry per identity"
        );
    }

    #[test]
    fn too_many_distinct_peers_is_a_clear_error_not_a_partial_policy() {
        let rules: Vec<Rule> = (0..=SELECTOR_CAPACITY)
            .map(|i| {
                rule(
                    Section::Ingress,
                    i,
                    vec![Peer::Endpoints(app(&format!("client-{i}")))],
                    vec![],
                )
            })
            .collect();
        let policies = vec![policy("huge", Selector::all(), rules, (true, false))];
        let endpoints = vec![EndpointInput {
            id: 1,
            labels: labels(&[("app", "x")]),
            named_ports: NamedPorts::new(),
        }];
        let error = compile(
            &policies,
            EnforcementMode::Default,
            &endpoints,
            &BTreeMap::new(),
        )
        .expect_err("over the bound");
        assert_eq!(
            error,
            CompileError::TooManySelectors {
                count: SELECTOR_CAPACITY + 1
            }
        );
        assert!(error.to_string().contains("at most 1024"), "{error}");
    }

    #[test]
    fn port_ranges_become_exact_lpm_prefixes() {
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        for (first, last) in [
            (29400u16, 29500u16),
            (1, 1023),
            (8000, 8100),
            (65535, 65535),
            (0, 0),
            (1024, 65535),
        ] {
            let prefixes = port_prefixes(first, last);
            let covered: Vec<u32> = prefixes
                .iter()
                .flat_map(|(port, len)| {
                    let size = 1u32 << (16 - u32::from(*len));
                    u32::from(*port)..u32::from(*port) + size
                })
                .collect();
            let expected: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            assert_eq!(covered, expected, "{first}..={last} as {prefixes:?}");
            assert!(prefixes.len() <= 32);
        }
    }

    #[test]
    fn an_address_takes_the_identity_of_its_longest_prefix() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        let compiled = Compiled {
            address_identities: [
                (net("0.0.0.0/0"), 2),
                (net("10.0.0.0/8"), 100),
                (net("10.1.0.0/16"), 101),
                (net("10.1.2.3/32"), 7),
            ]
            .into_iter()
            .collect(),
            ..Compiled::default()
        };
        let at = |ip: [u8; 4]| compiled.address_identity(Ipv4Addr::from(ip));
        assert_eq!(at([10, 1, 2, 3]), Some(7));
        assert_eq!(at([10, 1, 2, 4]), Some(101));
        assert_eq!(at([10, 2, 0, 1]), Some(100));
        assert_eq!(at([192, 0, 2, 1]), Some(2));
        let without_default = Compiled {
            address_identities: [(net("10.0.0.0/8"), 100)].into_iter().collect(),
            ..Compiled::default()
        };
        assert_eq!(
            without_default.address_identity(Ipv4Addr::new(11, 0, 0, 1)),
            None
        );
    }
}
