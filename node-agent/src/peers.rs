//! Peer nodes: where the other nodes' pods live and how this node reaches them.
//!
//! The peers the agent wants are the static ones (`--peer NODE_IP=POD_CIDR`) and the nodes table
//! of the agent's state ([`crate::state`]), which its source keeps current — the sandbox in
//! local mode, the Node watch in Kubernetes mode ([`crate::kubernetes::node`]). This node (by
//! its address) is never a peer.
//!
//! For every peer the agent keeps
//! - an ipcache entry: the peer's pod CIDR → identity `unknown`, tunnel endpoint the peer's node
//!   address (the datapath forwards to remote pods by it; a remote pod's own /32 with its
//!   identity is the policy engine's), and
//! - a kernel route for the pod CIDR: via the peer in native routing (for FIB lookups and the
//!   kernel's fallback path), into the VXLAN device in tunnel mode (for the node's own traffic,
//!   which `to_tunnel` addresses from the ipcache).
//!
//! [`PeerSync`] brings both in line with the wanted set on every pass of the agent's sync loop:
//! new and changed peers are written before peers that are gone are removed, so a change never
//! opens a gap, and this node's own pod CIDR is never touched. What fails is logged and tried
//! again on the next pass; a nodes table that holds an invalid entry keeps the last good set in
//! force, and nothing is removed before the source has listed every node.
//!
//! The ipcache is pinned, so it outlives the agent: peers that left while the agent was down are
//! still in it when the agent starts. [`PeerSync::adopt`] takes over the entries only this
//! module writes — identity `unknown` with a tunnel endpoint (local endpoints have no tunnel
//! endpoint, remote pods and policy CIDRs carry an identity, node addresses are `host` or
//! `remote-node`) — so the first pass removes those no longer wanted, with their routes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_core::identity::ReservedIdentity;
use weft_node_bpf::maps::IpcacheEntry;

use crate::datapath::{Datapath, DatapathError};
use crate::netlink::{self, NetlinkError, RouteNextHop};
use crate::state::{ClusterState, TableView};

pub use weft_core::state::PeerNode;

/// Why the datapath cannot use `peer`, if it cannot.
fn peer_problem(peer: &PeerNode) -> Option<String> {
    let ip = peer.node_ip;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        // A zero tunnel endpoint would even mark the CIDR as this node's.
        return Some(format!(
            "nodeIP {ip} is not a node address (unspecified, loopback, multicast or broadcast)"
        ));
    }
    if peer.pod_cidr.prefix_len() == 0 {
        return Some(format!(
            "podCIDR {} would send every address to this node",
            peer.pod_cidr
        ));
    }
    None
}

/// Parses `--peer NODE_IP=POD_CIDR`.
pub fn parse_peer_flag(value: &str) -> Result<PeerNode, String> {
    let (ip, cidr) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: write a peer as NODE_IP=POD_CIDR"))?;
    let peer = PeerNode {
        name: format!("--peer {value}"),
        node_ip: ip.trim().parse().map_err(|e| format!("{ip:?}: {e}"))?,
        pod_cidr: cidr
            .trim()
            .parse::<Ipv4Net>()
            .map_err(|e| format!("{cidr:?}: {e}"))?
            .trunc(),
    };
    match peer_problem(&peer) {
        Some(problem) => Err(format!("{value:?}: {problem}")),
        None => Ok(peer),
    }
}

/// The nodes table's entries (pod CIDRs truncated to their network), or what is wrong with the
/// first bad one: then none is used, so one broken entry never tears down the others.
pub fn validate_peers(nodes: Vec<PeerNode>) -> Result<Vec<PeerNode>, String> {
    nodes
        .into_iter()
        .map(|mut peer| {
            peer.pod_cidr = peer.pod_cidr.trunc();
            match peer_problem(&peer) {
                Some(problem) => Err(format!("node {:?}: {problem}", peer.name)),
                None => Ok(peer),
            }
        })
        .collect()
}

/// This node, which is never its own peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// Pod CIDR → node address of every peer to wire, from `peers` in order: this node (by
/// address) is left out, so one list can serve every node; a peer whose pod CIDR overlaps this
/// node's, or is one an earlier peer claimed for another node, is left out with a warning.
pub fn wanted_peers<'a>(
    me: LocalNode,
    peers: impl IntoIterator<Item = &'a PeerNode>,
) -> BTreeMap<Ipv4Net, (Ipv4Addr, String)> {
    let mut wanted: BTreeMap<Ipv4Net, (Ipv4Addr, String)> = BTreeMap::new();
    for peer in peers {
        if peer.node_ip == me.node_ip {
            continue;
        }
        if overlaps(peer.pod_cidr, me.pod_cidr) {
            tracing::warn!(
                peer = %peer.name,
                node_ip = %peer.node_ip,
                pod_cidr = %peer.pod_cidr,
                own_pod_cidr = %me.pod_cidr,
                "a peer's pod CIDR overlaps this node's; ignoring the peer (are two nodes given the same pod CIDR?)"
            );
            continue;
        }
        match wanted.get(&peer.pod_cidr) {
            Some((ip, _)) if *ip == peer.node_ip => {}
            Some((ip, name)) => tracing::warn!(
                peer = %peer.name,
                node_ip = %peer.node_ip,
                pod_cidr = %peer.pod_cidr,
                kept = %name,
                kept_node_ip = %ip,
                "two peers claim one pod CIDR; keeping the first"
            ),
            None => {
                wanted.insert(peer.pod_cidr, (peer.node_ip, peer.name.clone()));
            }
        }
    }
    wanted
}

/// How the peers wired now differ from those wanted, by pod CIDR.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// (pod CIDR, node address) not wired yet.
    pub added: Vec<(Ipv4Net, Ipv4Addr)>,
    /// (pod CIDR, wired node address, wanted node address): the CIDR moved to another node.
    pub changed: Vec<(Ipv4Net, Ipv4Addr, Ipv4Addr)>,
    /// (pod CIDR, node address) wired but no longer wanted.
    pub removed: Vec<(Ipv4Net, Ipv4Addr)>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The difference between what is `wired` and what is `wanted` (pod CIDR → node address).
pub fn diff(wired: &BTreeMap<Ipv4Net, Ipv4Addr>, wanted: &BTreeMap<Ipv4Net, Ipv4Addr>) -> PeerDiff {
    let mut diff = PeerDiff::default();
    for (cidr, ip) in wanted {
        match wired.get(cidr) {
            None => diff.added.push((*cidr, *ip)),
            Some(old) if old != ip => diff.changed.push((*cidr, *old, *ip)),
            Some(_) => {}
        }
    }
    for (cidr, ip) in wired {
        if !wanted.contains_key(cidr) {
            diff.removed.push((*cidr, *ip));
        }
    }
    diff
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("ipcache: {0}")]
    Datapath(#[from] DatapathError),
    #[error("route: {0}")]
    Netlink(#[from] NetlinkError),
}

/// Where peers are wired: the datapath's ipcache and the kernel's routes ([`KernelPeers`]; a
/// recording fake in tests).
#[allow(async_fn_in_trait)] // used with concrete types only, in this crate
pub trait PeerDataplane {
    /// Adds or replaces the ipcache entry of `pod_cidr`: identity `unknown`, behind `node_ip`.
    fn upsert_ipcache(&mut self, pod_cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), PeerError>;
    /// Removes it; nothing to do when it is gone already.
    fn remove_ipcache(&mut self, pod_cidr: Ipv4Net) -> Result<(), PeerError>;
    /// Adds or replaces the route of `pod_cidr` towards `node_ip`.
    async fn add_route(&mut self, pod_cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), PeerError>;
    /// Removes the route of `pod_cidr` towards `node_ip`; nothing to do when it is gone.
    async fn remove_route(&mut self, pod_cidr: Ipv4Net, node_ip: Ipv4Addr)
        -> Result<(), PeerError>;
}

/// How routes to peers' pods go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRouting {
    /// Via the peer on the node network.
    Native,
    /// Into the VXLAN device `ifindex`, with this node's address as the source.
    Tunnel { ifindex: u32, source: Ipv4Addr },
}

/// The real dataplane: the pinned ipcache and the node namespace's main routing table.
pub struct KernelPeers<'a> {
    pub datapath: &'a mut Datapath,
    pub routing: PeerRouting,
}

impl PeerDataplane for KernelPeers<'_> {
    fn upsert_ipcache(&mut self, pod_cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), PeerError> {
        Ok(self.datapath.upsert_ipcache(
            pod_cidr,
            IpcacheEntry {
                identity: ReservedIdentity::Unknown.id(),
                tunnel_endpoint: u32::from(node_ip).to_be(),
            },
        )?)
    }

    fn remove_ipcache(&mut self, pod_cidr: Ipv4Net) -> Result<(), PeerError> {
        Ok(self.datapath.remove_ipcache(pod_cidr)?)
    }

    async fn add_route(&mut self, pod_cidr: Ipv4Net, node_ip: Ipv4Addr) -> Result<(), PeerError> {
        match self.routing {
            PeerRouting::Native => netlink::route_via(pod_cidr, node_ip).await?,
            PeerRouting::Tunnel { ifindex, source } => {
                netlink::route_dev(pod_cidr, ifindex, source).await?
            }
        }
        Ok(())
    }

    async fn remove_route(
        &mut self,
        pod_cidr: Ipv4Net,
        node_ip: Ipv4Addr,
    ) -> Result<(), PeerError> {
        let next_hop = match self.routing {
            PeerRouting::Native => RouteNextHop::Gateway(node_ip),
            PeerRouting::Tunnel { ifindex, .. } => RouteNextHop::Device(ifindex),
        };
        netlink::route_del(pod_cidr, next_hop).await?;
        Ok(())
    }
}

/// The ipcache entries this module owns: identity `unknown` with a tunnel endpoint.
pub fn owned_entry(entry: &IpcacheEntry) -> Option<Ipv4Addr> {
    (entry.identity == ReservedIdentity::Unknown.id() && entry.tunnel_endpoint != 0)
        .then(|| Ipv4Addr::from(u32::from_be(entry.tunnel_endpoint)))
}

/// Keeps the wired peers equal to the wanted ones.
pub struct PeerSync {
    me: LocalNode,
    static_peers: Vec<PeerNode>,
    /// The nodes table; `None`: static peers only.
    nodes: Option<TableView<PeerNode>>,
    /// The nodes table's last good content.
    from_table: Vec<PeerNode>,
    /// Pod CIDR → (node address, name) of every peer wanted.
    wanted: BTreeMap<Ipv4Net, (Ipv4Addr, String)>,
    /// Pod CIDR → node address of every peer whose ipcache entry and route are in place (or,
    /// after [`Self::adopt`], were written by an earlier agent).
    wired: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// The names of the wired peers, for logs (adopted ones have none).
    wired_names: BTreeMap<Ipv4Net, String>,
    /// Some change is not applied yet (new wanted set, or a failure to try again).
    pending: bool,
    /// Write every wanted peer again, not only the changes: entries adopted from an earlier run
    /// may lack their route. Cleared after a pass without failures.
    rewrite_all: bool,
    /// The last failure logged per pod CIDR, so a persistent one is warned about once.
    failures: BTreeMap<Ipv4Net, String>,
    /// The peer list last handed out by [`Self::sync`].
    reported: Option<Vec<(Ipv4Addr, Ipv4Net)>>,
}

impl PeerSync {
    /// `state`: where the other nodes are listed, if anywhere; read on the first
    /// [`Self::sync`] after its sources have listed everything.
    pub fn new(me: LocalNode, static_peers: Vec<PeerNode>, state: Option<ClusterState>) -> Self {
        let wanted = wanted_peers(me, &static_peers);
        Self {
            me,
            static_peers,
            nodes: state.map(TableView::new),
            from_table: Vec::new(),
            wanted,
            wired: BTreeMap::new(),
            wired_names: BTreeMap::new(),
            pending: true,
            rewrite_all: false,
            failures: BTreeMap::new(),
            reported: None,
        }
    }

    /// Takes over the ipcache entries an earlier agent wrote for peers (see the module
    /// documentation), so that the next pass removes those of peers no longer wanted. Returns
    /// how many it took.
    pub fn adopt(&mut self, ipcache: impl IntoIterator<Item = (Ipv4Net, IpcacheEntry)>) -> usize {
        let mut adopted = 0;
        for (prefix, entry) in ipcache {
            let Some(node_ip) = owned_entry(&entry) else {
                continue;
            };
            if overlaps(prefix, self.me.pod_cidr) || node_ip == self.me.node_ip {
                continue;
            }
            self.wired.insert(prefix, node_ip);
            adopted += 1;
        }
        if adopted > 0 {
            self.rewrite_all = true;
            self.pending = true;
        }
        adopted
    }

    /// Whether some change could not be applied yet (the next pass tries again).
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// Every peer wanted, as (node address, pod CIDR).
    pub fn peers(&self) -> Vec<(Ipv4Addr, Ipv4Net)> {
        self.wanted
            .iter()
            .map(|(cidr, (ip, _))| (*ip, *cidr))
            .collect()
    }

    /// Takes the nodes table if it changed; returns whether the wanted set was recomputed.
    fn reload(&mut self) -> bool {
        let Some(nodes) = self.nodes.as_mut().and_then(TableView::changed_rows) else {
            return false;
        };
        match validate_peers(nodes) {
            Ok(peers) => self.from_table = peers,
            Err(problem) => {
                tracing::error!(
                    %problem,
                    "the cluster's nodes include an invalid entry; keeping the peers in force until it is fixed"
                );
                return false;
            }
        }
        let wanted = wanted_peers(self.me, self.static_peers.iter().chain(&self.from_table));
        if wanted == self.wanted {
            return false;
        }
        self.wanted = wanted;
        true
    }

    /// One pass: takes the nodes table if it changed, wires new and changed peers, then
    /// unwires those gone. Nothing is done before the table's source listed every node (a
    /// restarted agent would otherwise unwire the peers an earlier run wired).
    /// Returns the peer list when it differs from the one returned before (always on the first
    /// call), for the policy engine (remote-node identities, remote pods' tunnel endpoints).
    pub async fn sync<D: PeerDataplane>(
        &mut self,
        dataplane: &mut D,
    ) -> Option<Vec<(Ipv4Addr, Ipv4Net)>> {
        if self
            .nodes
            .as_ref()
            .is_some_and(|nodes| !nodes.state().synced())
        {
            return None;
        }
        if self.reload() {
            self.pending = true;
        }
        if self.pending {
            self.pending = !self.apply(dataplane).await;
        }
        let peers = self.peers();
        if self.reported.as_ref() == Some(&peers) {
            return None;
        }
        self.reported = Some(peers.clone());
        Some(peers)
    }

    /// Applies the wanted set; returns whether everything succeeded.
    async fn apply<D: PeerDataplane>(&mut self, dataplane: &mut D) -> bool {
        let wanted: BTreeMap<Ipv4Net, Ipv4Addr> = self
            .wanted
            .iter()
            .map(|(cidr, (ip, _))| (*cidr, *ip))
            .collect();
        let plan = diff(&self.wired, &wanted);
        // (pod CIDR, node address, the address wired before if any)
        let mut writes: Vec<(Ipv4Net, Ipv4Addr, Option<Ipv4Addr>)> = plan
            .added
            .iter()
            .map(|(cidr, ip)| (*cidr, *ip, None))
            .chain(
                plan.changed
                    .iter()
                    .map(|(cidr, old, ip)| (*cidr, *ip, Some(*old))),
            )
            .collect();
        if self.rewrite_all {
            // Adopted from an earlier run: their routes may be gone, write them again.
            writes.extend(
                wanted
                    .iter()
                    .filter(|(cidr, ip)| self.wired.get(cidr) == Some(ip))
                    .map(|(cidr, ip)| (*cidr, *ip, Some(*ip))),
            );
        }
        let mut ok = true;
        // New and changed peers first: a pod CIDR that moved keeps a way until the new one is
        // in place, and a node replaced by another is reachable before the old one is dropped.
        for (cidr, ip, old) in writes {
            let result = async {
                dataplane.upsert_ipcache(cidr, ip)?;
                dataplane.add_route(cidr, ip).await
            }
            .await;
            let name = self.wanted.get(&cidr).map(|(_, name)| name.clone());
            let name = name.unwrap_or_default();
            match result {
                Ok(()) => {
                    self.failures.remove(&cidr);
                    self.wired.insert(cidr, ip);
                    self.wired_names.insert(cidr, name.clone());
                    match old {
                        None => {
                            tracing::info!(peer = %name, pod_cidr = %cidr, node_ip = %ip, "peer node wired")
                        }
                        Some(old) if old != ip => {
                            tracing::info!(peer = %name, pod_cidr = %cidr, node_ip = %ip, old_node_ip = %old, "peer node moved")
                        }
                        Some(_) => {
                            tracing::debug!(peer = %name, pod_cidr = %cidr, node_ip = %ip, "peer node rewired after a restart")
                        }
                    }
                }
                Err(error) => {
                    ok = false;
                    self.failed(
                        cidr,
                        format!("cannot wire peer node {name} ({cidr} via {ip}): {error}"),
                    );
                }
            }
        }
        // Then what is gone: the route before the ipcache entry, so an entry is left (and
        // adopted by the next run) as long as something of the peer's is.
        for (cidr, ip) in &plan.removed {
            let result = async {
                dataplane.remove_route(*cidr, *ip).await?;
                dataplane.remove_ipcache(*cidr)
            }
            .await;
            match result {
                Ok(()) => {
                    self.failures.remove(cidr);
                    self.wired.remove(cidr);
                    let name = self.wired_names.remove(cidr);
                    let name = name.as_deref().unwrap_or("(wired by a previous run)");
                    tracing::info!(peer = %name, pod_cidr = %cidr, node_ip = %ip, "peer node removed");
                }
                Err(error) => {
                    ok = false;
                    self.failed(
                        *cidr,
                        format!("cannot remove peer node {cidr} via {ip}: {error}"),
                    );
                }
            }
        }
        if ok {
            self.rewrite_all = false;
        }
        ok
    }

    /// Logs a failure (a warning the first time, a debug line while it repeats); the next pass
    /// tries again.
    fn failed(&mut self, cidr: Ipv4Net, message: String) {
        if self.failures.get(&cidr) != Some(&message) {
            tracing::warn!("{message}; trying again on the next pass");
            self.failures.insert(cidr, message);
        } else {
            tracing::debug!("{message}; trying again on the next pass");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Net {
        text.parse().expect("CIDR")
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("address")
    }

    fn peer(name: &str, node_ip: &str, pod_cidr: &str) -> PeerNode {
        PeerNode {
            name: name.into(),
            node_ip: ip(node_ip),
            pod_cidr: net(pod_cidr),
        }
    }

    const ME: LocalNode = LocalNode {
        node_ip: Ipv4Addr::new(192, 168, 0, 1),
        pod_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 1, 1, 0), 24),
    };

    #[test]
    fn node_rows_are_truncated_and_one_bad_row_rejects_them_naming_it() {
        assert_eq!(
            validate_peers(vec![
                peer("gpu-7", "192.168.0.7", "10.1.7.0/24"),
                // Not truncated: the network is what counts.
                peer("gpu-8", "192.168.0.8", "10.1.8.9/24"),
            ]),
            Ok(vec![
                peer("gpu-7", "192.168.0.7", "10.1.7.0/24"),
                peer("gpu-8", "192.168.0.8", "10.1.8.0/24")
            ])
        );
        for (bad, expected) in [
            (peer("b", "0.0.0.0", "10.1.2.0/24"), "nodeIP 0.0.0.0"),
            (peer("b", "192.168.0.2", "0.0.0.0/0"), "every address"),
        ] {
            let error = validate_peers(vec![peer("a", "192.168.0.3", "10.1.3.0/24"), bad])
                .expect_err("invalid");
            assert!(error.contains(expected), "{error} should say {expected}");
            assert!(error.contains("\"b\""), "{error} names the node");
        }
    }

    #[test]
    fn peer_flags_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            parse_peer_flag("192.168.0.2=10.1.2.0/24").map(|p| (p.node_ip, p.pod_cidr)),
            Ok((ip("192.168.0.2"), net("10.1.2.0/24")))
        );
        let error = parse_peer_flag("192.168.0.2").expect_err("no CIDR");
        assert!(error.contains("NODE_IP=POD_CIDR"), "{error}");
        assert!(parse_peer_flag("192.168.0.2=10.1.2.0/33").is_err());
        assert!(parse_peer_flag("127.0.0.1=10.1.2.0/24").is_err());
    }

    #[test]
    fn wanted_peers_leave_out_this_node_overlaps_and_conflicting_claims() {
        let peers = [
            peer("me", "192.168.0.1", "10.1.1.0/24"),
            peer("b", "192.168.0.2", "10.1.2.0/24"),
            // Same CIDR as b, another node: b was first.
            peer("b-again", "192.168.0.9", "10.1.2.0/24"),
            // Same as b: no conflict.
            peer("b", "192.168.0.2", "10.1.2.0/24"),
            // Overlaps this node's pod CIDR either way.
            peer("wide", "192.168.0.4", "10.1.0.0/16"),
            peer("narrow", "192.168.0.5", "10.1.1.128/25"),
            peer("c", "192.168.0.3", "10.1.3.0/24"),
        ];
        let wanted: Vec<(Ipv4Net, Ipv4Addr)> = wanted_peers(ME, &peers)
            .into_iter()
            .map(|(cidr, (ip, _))| (cidr, ip))
            .collect();
        assert_eq!(
            wanted,
            vec![
                (net("10.1.2.0/24"), ip("192.168.0.2")),
                (net("10.1.3.0/24"), ip("192.168.0.3")),
            ]
        );
    }

    #[test]
    fn the_diff_names_added_changed_and_removed_pod_cidrs() {
        let wired = BTreeMap::from([
            (net("10.1.2.0/24"), ip("192.168.0.2")),
            (net("10.1.3.0/24"), ip("192.168.0.3")),
            (net("10.1.4.0/24"), ip("192.168.0.4")),
        ]);
        let wanted = BTreeMap::from([
            (net("10.1.2.0/24"), ip("192.168.0.2")),
            (net("10.1.3.0/24"), ip("192.168.0.33")),
            (net("10.1.5.0/24"), ip("192.168.0.5")),
        ]);
        assert_eq!(
            diff(&wired, &wanted),
            PeerDiff {
                added: vec![(net("10.1.5.0/24"), ip("192.168.0.5"))],
                changed: vec![(net("10.1.3.0/24"), ip("192.168.0.3"), ip("192.168.0.33"))],
                removed: vec![(net("10.1.4.0/24"), ip("192.168.0.4"))],
            }
        );
        assert!(diff(&wanted, &wanted).is_empty());
    }

    /// Records what is done, and fails what it is told to.
    #[derive(Default)]
    struct Fake {
        ops: Vec<String>,
        ipcache: BTreeMap<Ipv4Net, Ipv4Addr>,
        routes: BTreeMap<Ipv4Net, Ipv4Addr>,
        fail_routes_to: Option<Ipv4Addr>,
    }

    impl PeerDataplane for Fake {
        fn upsert_ipcache(
            &mut self,
            pod_cidr: Ipv4Net,
            node_ip: Ipv4Addr,
        ) -> Result<(), PeerError> {
            self.ops.push(format!("ipcache+ {pod_cidr} {node_ip}"));
            self.ipcache.insert(pod_cidr, node_ip);
            Ok(())
        }

        fn remove_ipcache(&mut self, pod_cidr: Ipv4Net) -> Result<(), PeerError> {
            self.ops.push(format!("ipcache- {pod_cidr}"));
            self.ipcache.remove(&pod_cidr);
            Ok(())
        }

        async fn add_route(
            &mut self,
            pod_cidr: Ipv4Net,
            node_ip: Ipv4Addr,
        ) -> Result<(), PeerError> {
            if self.fail_routes_to == Some(node_ip) {
                return Err(NetlinkError::Unexpected("Network is unreachable".into()).into());
            }
            self.ops.push(format!("route+ {pod_cidr} {node_ip}"));
            self.routes.insert(pod_cidr, node_ip);
            Ok(())
        }

        async fn remove_route(
            &mut self,
            pod_cidr: Ipv4Net,
            node_ip: Ipv4Addr,
        ) -> Result<(), PeerError> {
            self.ops.push(format!("route- {pod_cidr} {node_ip}"));
            self.routes.remove(&pod_cidr);
            Ok(())
        }
    }

    /// A synced state whose nodes are `peers`.
    fn listed(peers: &[PeerNode]) -> ClusterState {
        let state = ClusterState::new(vec![crate::state::LOCAL_SOURCE.into()]);
        list(&state, peers);
        state
    }

    fn list(state: &ClusterState, peers: &[PeerNode]) {
        state.change(|tables| {
            tables.replace(crate::state::LOCAL_SOURCE, peers.iter().cloned());
            tables.mark_synced(crate::state::LOCAL_SOURCE);
        });
    }

    #[tokio::test]
    async fn peers_follow_the_table_new_before_gone_and_never_this_node() {
        let b = peer("b", "192.168.0.2", "10.1.2.0/24");
        let c = peer("c", "192.168.0.3", "10.1.3.0/24");
        let me = peer("a", "192.168.0.1", "10.1.1.0/24");
        let state = listed(&[me.clone(), b.clone()]);
        let static_peer = parse_peer_flag("192.168.0.9=10.1.9.0/24").expect("flag");
        let mut sync = PeerSync::new(ME, vec![static_peer], Some(state.clone()));
        let mut fake = Fake::default();

        let first = sync
            .sync(&mut fake)
            .await
            .expect("first pass reports the peers");
        assert_eq!(
            first,
            vec![
                (ip("192.168.0.2"), net("10.1.2.0/24")),
                (ip("192.168.0.9"), net("10.1.9.0/24"))
            ]
        );
        assert_eq!(
            fake.ops,
            [
                "ipcache+ 10.1.2.0/24 192.168.0.2",
                "route+ 10.1.2.0/24 192.168.0.2",
                "ipcache+ 10.1.9.0/24 192.168.0.9",
                "route+ 10.1.9.0/24 192.168.0.9",
            ]
        );
        fake.ops.clear();
        assert_eq!(sync.sync(&mut fake).await, None, "nothing changed");
        assert!(fake.ops.is_empty());

        // b leaves, c joins: c is wired before b is removed.
        list(&state, &[me.clone(), c.clone()]);
        let peers = sync.sync(&mut fake).await.expect("changed");
        assert_eq!(
            peers,
            vec![
                (ip("192.168.0.3"), net("10.1.3.0/24")),
                (ip("192.168.0.9"), net("10.1.9.0/24"))
            ]
        );
        assert_eq!(
            fake.ops,
            [
                "ipcache+ 10.1.3.0/24 192.168.0.3",
                "route+ 10.1.3.0/24 192.168.0.3",
                "route- 10.1.2.0/24 192.168.0.2",
                "ipcache- 10.1.2.0/24",
            ]
        );
        fake.ops.clear();

        // c changes its address: replaced in place, nothing removed.
        let c_moved = peer("c", "192.168.0.33", "10.1.3.0/24");
        list(&state, &[c_moved]);
        sync.sync(&mut fake).await.expect("changed");
        assert_eq!(
            fake.ops,
            [
                "ipcache+ 10.1.3.0/24 192.168.0.33",
                "route+ 10.1.3.0/24 192.168.0.33"
            ]
        );
        // This node's own pod CIDR was never touched.
        assert!(!fake.ipcache.contains_key(&ME.pod_cidr));
        assert!(!fake.routes.contains_key(&ME.pod_cidr));
        // The static peer stays whatever the table says.
        assert_eq!(
            fake.routes.get(&net("10.1.9.0/24")),
            Some(&ip("192.168.0.9"))
        );
    }

    #[tokio::test]
    async fn a_bad_row_keeps_the_last_good_peers_and_nothing_moves_before_the_listing() {
        let b = peer("b", "192.168.0.2", "10.1.2.0/24");
        let state = ClusterState::new(vec![crate::state::LOCAL_SOURCE.into()]);
        let mut sync = PeerSync::new(ME, Vec::new(), Some(state.clone()));
        sync.adopt([(
            net("10.1.2.0/24"),
            IpcacheEntry {
                identity: 0,
                tunnel_endpoint: u32::from(ip("192.168.0.2")).to_be(),
            },
        )]);
        let mut fake = Fake::default();
        assert_eq!(sync.sync(&mut fake).await, None, "not listed yet");
        assert!(fake.ops.is_empty(), "what an earlier run wired stays");
        list(&state, std::slice::from_ref(&b));
        sync.sync(&mut fake).await.expect("first pass");
        fake.ops.clear();

        list(&state, &[peer("b", "0.0.0.0", "10.1.2.0/24")]);
        assert_eq!(sync.sync(&mut fake).await, None, "the peers stay");
        assert!(fake.ops.is_empty(), "{:?}", fake.ops);
        // Fixed: back to following the table.
        list(&state, &[]);
        assert_eq!(sync.sync(&mut fake).await, Some(vec![]));
        assert_eq!(
            fake.ops,
            ["route- 10.1.2.0/24 192.168.0.2", "ipcache- 10.1.2.0/24"]
        );
    }

    #[tokio::test]
    async fn a_failure_is_tried_again_on_the_next_pass() {
        let state = listed(&[
            peer("b", "192.168.0.2", "10.1.2.0/24"),
            peer("far", "192.168.9.9", "10.1.9.0/24"),
        ]);
        let mut sync = PeerSync::new(ME, Vec::new(), Some(state));
        let mut fake = Fake {
            fail_routes_to: Some(ip("192.168.9.9")),
            ..Fake::default()
        };
        sync.sync(&mut fake).await.expect("first pass");
        assert_eq!(fake.routes.len(), 1, "b is wired despite the failure");
        assert!(!fake.routes.contains_key(&net("10.1.9.0/24")));
        fake.ops.clear();
        // Still failing: tried again (and only what failed).
        sync.sync(&mut fake).await;
        assert_eq!(fake.ops, ["ipcache+ 10.1.9.0/24 192.168.9.9"]);
        fake.fail_routes_to = None;
        fake.ops.clear();
        sync.sync(&mut fake).await;
        assert_eq!(
            fake.ops,
            [
                "ipcache+ 10.1.9.0/24 192.168.9.9",
                "route+ 10.1.9.0/24 192.168.9.9"
            ]
        );
        fake.ops.clear();
        sync.sync(&mut fake).await;
        assert!(fake.ops.is_empty(), "done: {:?}", fake.ops);
    }

    #[tokio::test]
    async fn entries_left_by_an_earlier_run_are_adopted_and_the_gone_ones_removed() {
        let state = listed(&[peer("b", "192.168.0.2", "10.1.2.0/24")]);
        let mut sync = PeerSync::new(ME, Vec::new(), Some(state));
        let entry = |identity: u32, endpoint: &str| IpcacheEntry {
            identity,
            tunnel_endpoint: u32::from(ip(endpoint)).to_be(),
        };
        let pinned = [
            // Peers of the earlier run: b stays, d left meanwhile.
            (net("10.1.2.0/24"), entry(0, "192.168.0.2")),
            (net("10.1.4.0/24"), entry(0, "192.168.0.4")),
            // Not this module's: a remote pod (the policy engine's), a local pod, a node
            // address, a policy's CIDR.
            (net("10.1.4.7/32"), entry(70_000, "192.168.0.4")),
            (net("10.1.1.5/32"), entry(70_001, "0.0.0.0")),
            (net("192.168.0.4/32"), entry(6, "0.0.0.0")),
            (net("203.0.113.0/24"), entry(1 << 24, "0.0.0.0")),
            // Never this node's own pod CIDR.
            (net("10.1.1.0/24"), entry(0, "192.168.0.77")),
        ];
        assert_eq!(sync.adopt(pinned), 2);
        let mut fake = Fake::default();
        sync.sync(&mut fake).await.expect("first pass");
        assert_eq!(
            fake.ops,
            [
                // Written again: its route may be gone.
                "ipcache+ 10.1.2.0/24 192.168.0.2",
                "route+ 10.1.2.0/24 192.168.0.2",
                "route- 10.1.4.0/24 192.168.0.4",
                "ipcache- 10.1.4.0/24",
            ]
        );
        fake.ops.clear();
        sync.sync(&mut fake).await;
        assert!(fake.ops.is_empty(), "{:?}", fake.ops);
    }
}
