//! The agent's state for its node: address pool, endpoints and datapath, changed only through
//! the CNI requests it answers. Endpoint records are persisted so a restarted agent adopts the
//! pods that kept running without it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_core::identity::ReservedIdentity;
use weft_node_bpf::maps::{EndpointInfo, IpcacheEntry};

use crate::cni::api::{PodRef, Registration, Request, Response, POD_GATEWAY};
use crate::datapath::{Datapath, DatapathError, InstalledPolicy};
use crate::flows::directory::{Directory, EndpointMeta};
use crate::flows::enrich::Origin;
use crate::ipam::{Ipam, IpamError};
use crate::peers::{KernelPeers, PeerRouting, PeerSync};
use crate::policy::{LocalEndpoint, PolicyEngine, PolicyInputs};
use crate::services::{HostPortBinding, ServiceEngine};
use crate::state::ClusterState;
use std::sync::{Arc, Mutex};
use weft_core::state::LocalPod;

/// CNI error code for "try again later" (spec 1.0, well-known code 11).
pub const CNI_TRY_AGAIN_LATER: u32 = 11;
/// CNI error code for an invalid network configuration or request (code 7).
pub const CNI_INVALID: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("cannot read endpoint record {path}: {reason}")]
    Record { path: PathBuf, reason: String },
}

impl NodeError {
    /// Whether a datapath map had no room: already logged once where it happened
    /// ([`crate::map_pressure`]), and retried on every pass.
    pub fn is_map_full(&self) -> bool {
        matches!(self, Self::Datapath(DatapathError::MapFull(_)))
    }
}

/// What the agent remembers about one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    pub pod: PodRef,
    pub ip: Ipv4Addr,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    pub netns: String,
    pub identity: u32,
}

pub struct NodeAgent {
    ipam: Ipam,
    datapath: Datapath,
    endpoints: BTreeMap<String, EndpointRecord>,
    records_dir: PathBuf,
    mtu: u32,
    origin: Origin,
    directory: Arc<Mutex<Directory>>,
    policy: PolicyEngine,
    services: ServiceEngine,
    node_ip: Ipv4Addr,
    /// (node IP, pod CIDR) of every other node, as [`PeerSync`] last reported them.
    peers: Vec<(Ipv4Addr, Ipv4Net)>,
    peer_sync: PeerSync,
    peer_routing: PeerRouting,
    /// The cluster as the agent's sources list it: this node's pods by name (with their
    /// identities) and the cluster's endpoints.
    state: ClusterState,
    kube_apiserver: Vec<Ipv4Addr>,
    /// Endpoints adopted from an earlier run that still run its programs: (host veth,
    /// ifindex, whether a failure to replace them was already logged).
    outdated_programs: Vec<(String, u32, bool)>,
}

/// Whether a newly registered endpoint may run: CNI ADD answers only once it is
/// [`Readiness::InForce`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Its identity is resolved and its policy (both directions) is in the maps.
    InForce,
    /// Not yet, and why.
    Waiting(String),
}

/// What the node agent is configured with.
pub struct NodeSettings {
    pub state_dir: PathBuf,
    pub pod_cidr: Ipv4Net,
    /// The MTU pods get.
    pub mtu: u32,
    pub origin: Origin,
    /// Where local endpoints are named for flows.
    pub directory: Arc<Mutex<Directory>>,
    /// The cluster as the agent's sources list it (see [`crate::state`]).
    pub state: ClusterState,
    /// How policy applies: `Default` (selected endpoints are isolated), `Always`, `Never`.
    pub enforcement: weft_core::policy::model::EnforcementMode,
    /// Where the compiled policy in force is published (for naming rules in flows).
    pub policy_in_force: Arc<Mutex<Option<weft_core::policy::compile::Compiled>>>,
    pub node_ip: Ipv4Addr,
    /// Wires the other nodes (static peers and the nodes table); see [`NodeAgent::sync_peers`].
    pub peers: PeerSync,
    /// How routes to the other nodes' pods go.
    pub peer_routing: PeerRouting,
    /// Balances the cluster's services.
    pub services: ServiceEngine,
    /// Whether the node's own traffic to its pods passes whatever isolates them.
    pub allow_from_node: bool,
    /// The API server's addresses given on the command line (the `kube-apiserver` entity);
    /// the `default/kubernetes` Service's endpoints are added to them.
    pub kube_apiserver: Vec<Ipv4Addr>,
}

impl NodeAgent {
    /// Opens the node's persisted state in `state_dir` and writes every known endpoint into the
    /// (possibly already pinned) maps again, so the datapath matches the records.
    pub fn open(settings: NodeSettings, mut datapath: Datapath) -> Result<Self, NodeError> {
        let mut peer_sync = settings.peers;
        // Before the policy engine writes anything: what it owns must not be taken for peers.
        let pinned_ipcache = match datapath.ipcache_entries() {
            Ok(entries) => {
                let adopted = peer_sync.adopt(entries.iter().copied());
                if adopted > 0 {
                    tracing::info!(
                        peers = adopted,
                        "found peer nodes wired by a previous run; those no longer wanted are removed on the first pass"
                    );
                }
                entries
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    "cannot read the ipcache: peer nodes a previous run wired and that left since stay wired, and so do the remote pods and policy prefixes it named"
                );
                Vec::new()
            }
        };
        let ipam = Ipam::open(settings.state_dir.join("ipam.json"), settings.pod_cidr)?;
        let records_dir = settings.state_dir.join("endpoints");
        let mut endpoints = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&records_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let record: EndpointRecord = std::fs::read(&path)
                    .map_err(|error| error.to_string())
                    .and_then(|bytes| {
                        serde_json::from_slice(&bytes).map_err(|error| error.to_string())
                    })
                    .map_err(|reason| NodeError::Record {
                        path: path.clone(),
                        reason,
                    })?;
                endpoints.insert(record.container_id.clone(), record);
            }
        }
        let mut policy = PolicyEngine::new(
            settings.state.clone(),
            settings.enforcement,
            settings.policy_in_force,
            Some(settings.state_dir.join(crate::policy::ENFORCEMENT_REPORT)),
        );
        policy.set_allow_from_node(settings.allow_from_node);
        // The policy maps outlive the agent too: what an earlier run wrote for rules, policies,
        // endpoints and remote pods that went away while it was down is removed by the first
        // install, after the new entries and isolation flags are in place.
        let found = datapath.installed_policy().unwrap_or_else(|error| {
            tracing::error!(
                %error,
                "cannot read the policy maps: entries a previous run wrote that the policy in force no longer wants stay in force"
            );
            InstalledPolicy::default()
        });
        let local: BTreeSet<Ipv4Addr> = endpoints.values().map(|record| record.ip).collect();
        let adopted = policy.adopt(found, &pinned_ipcache, &local);
        if !adopted.is_empty() {
            tracing::info!(
                endpoints = adopted.endpoints,
                policy_entries = adopted.entries,
                peer_sets = adopted.peer_sets,
                ipcache = adopted.ipcache,
                "found policy state written by a previous run; what the policy in force does not want is removed on the first install"
            );
        }
        let mut agent = Self {
            ipam,
            datapath,
            endpoints,
            records_dir,
            mtu: settings.mtu,
            origin: settings.origin,
            directory: settings.directory,
            policy,
            node_ip: settings.node_ip,
            peers: Vec::new(),
            peer_sync,
            peer_routing: settings.peer_routing,
            services: settings.services,
            state: settings.state,
            kube_apiserver: settings.kube_apiserver,
            outdated_programs: Vec::new(),
        };
        let adopted: Vec<EndpointRecord> = agent.endpoints.values().cloned().collect();
        for record in &adopted {
            agent.program_endpoint(record)?;
        }
        agent.outdated_programs = adopted
            .iter()
            .map(|record| (record.host_veth.clone(), record.host_ifindex, false))
            .collect();
        if !adopted.is_empty() {
            tracing::info!(
                endpoints = adopted.len(),
                "adopted endpoints from a previous run"
            );
        }
        Ok(agent)
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let container_id = match &request {
            Request::Allocate { container_id, .. }
            | Request::Release { container_id }
            | Request::Check { container_id } => container_id,
            Request::Register(registration) => &registration.container_id,
        };
        if !is_valid_container_id(container_id) {
            return Response::Error {
                code: CNI_INVALID,
                message: format!(
                    "container ID {container_id:?} is invalid: the CNI spec allows only letters, digits, '_', '.' and '-', starting with a letter or digit"
                ),
            };
        }
        let result = match request {
            Request::Allocate { container_id, pod } => {
                self.ipam.allocate(&container_id).map(|ip| {
                    tracing::info!(%ip, pod = %format!("{}/{}", pod.namespace, pod.name), "address allocated");
                    Response::Allocated {
                        ip,
                        gateway: POD_GATEWAY,
                        mtu: self.mtu,
                    }
                }).map_err(NodeError::from)
            }
            Request::Register(registration) => self.register(registration),
            Request::Release { container_id } => self.release(&container_id),
            Request::Check { container_id } => Ok(match self.endpoints.get(&container_id) {
                Some(record) => Response::Checked {
                    ip: record.ip,
                    host_veth: record.host_veth.clone(),
                },
                None => Response::Error {
                    code: CNI_INVALID,
                    message: format!("no endpoint for container {container_id} on this node"),
                },
            }),
        };
        result.unwrap_or_else(|error| {
            if error.is_map_full() {
                // Logged once where the map was found full; the runtime retries ADD.
                tracing::debug!(%error, "CNI request failed");
            } else {
                tracing::error!(%error, "CNI request failed");
            }
            Response::Error {
                code: CNI_TRY_AGAIN_LATER,
                message: error.to_string(),
            }
        })
    }

    fn register(&mut self, registration: Registration) -> Result<Response, NodeError> {
        if self.ipam.address_of(&registration.container_id) != Some(registration.ip) {
            return Ok(Response::Error {
                code: CNI_INVALID,
                message: format!(
                    "{} is not the address allocated to container {}; allocate first",
                    registration.ip, registration.container_id
                ),
            });
        }
        // The identity the cluster assigned the pod by name, when it is known already: the
        // endpoint is then written once, not as `init` first.
        let identity = self
            .local_pod(&registration.pod.namespace, &registration.pod.name)
            .filter(|pod| pod.resolved())
            .map_or(ReservedIdentity::Init.id(), |pod| pod.identity);
        let record = EndpointRecord {
            container_id: registration.container_id,
            pod: registration.pod,
            ip: registration.ip,
            host_veth: registration.host_veth,
            host_ifindex: registration.host_ifindex,
            host_mac: registration.host_mac,
            pod_mac: registration.pod_mac,
            netns: registration.netns,
            identity,
        };
        // Kept from the start, so that a failure part way is undone like any release.
        self.endpoints
            .insert(record.container_id.clone(), record.clone());
        let wired = self
            .datapath
            .attach_endpoint(&record.host_veth)
            .map_err(NodeError::from)
            .and_then(|()| self.program_endpoint(&record))
            .and_then(|()| self.save(&record));
        if let Err(error) = wired {
            // Nothing of this attempt stays: the runtime retries ADD, which wires it afresh.
            self.abandon(&record.container_id);
            return Err(error);
        }
        tracing::info!(
            ip = %record.ip,
            pod = %format!("{}/{}", record.pod.namespace, record.pod.name),
            veth = %record.host_veth,
            "endpoint ready"
        );
        Ok(Response::Registered)
    }

    /// Applies identities the cluster assigned (the directory) to this node's endpoints: the
    /// endpoint map and the ipcache get the new number, and the record keeps it across restarts.
    /// Returns how many endpoints changed.
    pub fn sync_identities(&mut self) -> Result<usize, NodeError> {
        if !self.state.synced() {
            return Ok(0);
        }
        let assigned: Vec<(String, u32)> = {
            let tables = self.state.read();
            self.endpoints
                .values()
                .filter_map(|record| {
                    // By name first: a new pod's address is not among the cluster's endpoints
                    // before ADD has returned, and ADD waits for this identity.
                    let key = (record.pod.namespace.clone(), record.pod.name.clone());
                    let identity = match tables.local_pods.get(&key) {
                        Some(pod) if pod.resolved() => pod.identity,
                        _ => {
                            let meta = tables.endpoints.get(&record.ip)?;
                            let same_pod = meta.namespace == record.pod.namespace
                                && meta.pod == record.pod.name;
                            if !same_pod {
                                return None;
                            }
                            meta.identity
                        }
                    };
                    (identity != record.identity).then(|| (record.container_id.clone(), identity))
                })
                .collect()
        };
        for (container_id, identity) in &assigned {
            let Some(mut record) = self.endpoints.get(container_id).cloned() else {
                continue;
            };
            record.identity = *identity;
            self.program_endpoint(&record)?;
            self.save(&record)?;
            tracing::info!(ip = %record.ip, identity, "endpoint identity updated");
            self.endpoints.insert(container_id.clone(), record);
        }
        Ok(assigned.len())
    }

    /// Brings the other nodes' ipcache entries and routes in line with the static peers and
    /// the nodes table (see [`crate::peers`]); failures are logged and tried again on the next
    /// call. When the peer set changed, the next [`Self::sync_policy`] recomputes the
    /// remote-node identities and remote pods' tunnel endpoints. Returns whether every peer
    /// is wired as wanted.
    pub async fn sync_peers(&mut self) -> bool {
        let mut dataplane = KernelPeers {
            datapath: &mut self.datapath,
            routing: self.peer_routing,
        };
        if let Some(peers) = self.peer_sync.sync(&mut dataplane).await {
            tracing::info!(peers = peers.len(), "peer nodes in force");
            self.peers = peers;
        }
        !self.peer_sync.has_failures()
    }

    /// Brings policy enforcement in line with the cluster's policies, identities and this
    /// node's endpoints.
    pub fn sync_policy(&mut self) -> Result<(), NodeError> {
        if !self.state.synced() {
            return Ok(());
        }
        let local: Vec<LocalEndpoint> = self
            .endpoints
            .values()
            .map(|record| LocalEndpoint {
                ifindex: record.host_ifindex,
                ip: record.ip,
                namespace: record.pod.namespace.clone(),
                identity: record.identity,
                by_name: self
                    .local_pod(&record.pod.namespace, &record.pod.name)
                    .filter(|pod| pod.resolved() && pod.identity == record.identity),
            })
            .collect();
        // As Cilium: the API server is whatever backs `default/kubernetes`, plus what the
        // agent was told.
        let mut kube_apiserver: Vec<Ipv4Addr> = self
            .services
            .service("default", "kubernetes")
            .into_iter()
            .flat_map(|service| &service.ports)
            .flat_map(|port| &port.backends)
            .map(|backend| backend.address)
            .chain(self.kube_apiserver.iter().copied())
            .collect();
        kube_apiserver.sort_unstable();
        kube_apiserver.dedup();
        let inputs = PolicyInputs {
            local,
            kube_apiserver,
            node_ip: self.node_ip,
            peers: &self.peers,
        };
        self.policy.sync(&mut self.datapath, &inputs)?;
        Ok(())
    }

    /// Checks the policy engine's ipcache entries against the map (see
    /// [`PolicyEngine::check_drift`]); returns how many differed.
    pub fn check_drift(&mut self) -> Result<usize, NodeError> {
        Ok(self.policy.check_drift(&mut self.datapath)?)
    }

    /// Puts the datapath's full maps in the node's enforcement report.
    pub fn report_map_pressure(&mut self) {
        self.policy.set_full_maps(self.datapath.full_maps());
    }

    /// Brings a newly registered endpoint as far as its sources allow (its identity, then the
    /// policy for it) and says whether it may run. CNI ADD asks until it may, or gives up.
    pub fn endpoint_readiness(&mut self, container_id: &str) -> Result<Readiness, NodeError> {
        if !self.state.synced() {
            return Ok(Readiness::Waiting(format!(
                "the agent has not heard the whole cluster state from {} yet",
                self.state.waiting_for().join(", ")
            )));
        }
        self.sync_identities()?;
        let Some(record) = self.endpoints.get(container_id) else {
            return Ok(Readiness::Waiting(format!(
                "no endpoint for container {container_id} (released meanwhile)"
            )));
        };
        if record.identity == ReservedIdentity::Init.id() {
            return Ok(Readiness::Waiting(format!(
                "the cluster has not assigned pod {}/{} its security identity yet",
                record.pod.namespace, record.pod.name
            )));
        }
        let ifindex = record.host_ifindex;
        self.sync_policy()?;
        if self.policy.has_state(ifindex) {
            return Ok(Readiness::InForce);
        }
        Ok(Readiness::Waiting(match self.policy.problem() {
            Some(problem) => format!("its policy is not in the maps: {problem}"),
            None => "its policy is not in the maps yet".to_owned(),
        }))
    }

    /// Undoes a registration whose endpoint never became ready: the runtime is told ADD
    /// failed and retries, so nothing of this attempt may stay wired.
    pub fn abandon(&mut self, container_id: &str) {
        if let Err(error) = self.release(container_id) {
            tracing::warn!(%error, container_id, "cannot fully undo an endpoint that never became ready");
        }
    }

    /// Gives the endpoints adopted from an earlier run the programs this agent loaded, each
    /// once its policy state is in the maps (after a sync pass): until then they keep the
    /// programs, and the maps, they had, which a changed layout may have replaced. Attaching
    /// adds the new program before the old link goes, so no packet meets neither.
    pub fn replace_outdated_programs(&mut self) {
        let mut replaced = 0;
        let pending = std::mem::take(&mut self.outdated_programs);
        for (veth, ifindex, warned) in pending {
            // Released meanwhile (CNI DEL): nothing left to replace.
            if !self.endpoints.values().any(|r| r.host_ifindex == ifindex) {
                continue;
            }
            if !self.policy.has_state(ifindex) {
                self.outdated_programs.push((veth, ifindex, warned));
                continue;
            }
            match self.datapath.attach_endpoint(&veth) {
                Ok(()) => replaced += 1,
                Err(error) => {
                    if !warned {
                        tracing::warn!(%error, %veth, "cannot give an adopted endpoint this agent's programs; retrying on every pass");
                    }
                    self.outdated_programs.push((veth, ifindex, true));
                }
            }
        }
        if replaced > 0 {
            tracing::info!(
                endpoints = replaced,
                waiting = self.outdated_programs.len(),
                "adopted endpoints now run this agent's programs"
            );
        }
    }

    /// Whether adopted endpoints still wait for this agent's programs.
    pub fn has_outdated_programs(&self) -> bool {
        !self.outdated_programs.is_empty()
    }

    /// Brings the service load-balancing maps in line with the cluster's services and the
    /// host ports of this node's pods.
    pub fn sync_services(&mut self) -> Result<(), NodeError> {
        let host_ports: Vec<HostPortBinding> = self
            .endpoints
            .values()
            .flat_map(|record| {
                let pod = self.local_pod(&record.pod.namespace, &record.pod.name);
                pod.into_iter()
                    .flat_map(|pod| pod.host_ports)
                    .filter_map(|port| HostPortBinding::of(record, &port))
            })
            .collect();
        self.services.sync(&mut self.datapath, host_ports)?;
        let removed = self.services.take_removed_backends();
        if !removed.is_empty() {
            let namespaces: Vec<PathBuf> = self
                .endpoints
                .values()
                .map(|record| PathBuf::from(&record.netns))
                .collect();
            let pin_dir = self.datapath.pin_dir().to_owned();
            // Off the agent's lock: one sock_diag dump per pod, one pass over the NAT table.
            tokio::task::spawn_blocking(move || {
                crate::stale_backends::forget(pin_dir, namespaces, removed)
            });
        }
        Ok(())
    }

    /// This node's pod `namespace/name` as the cluster lists it.
    fn local_pod(&self, namespace: &str, name: &str) -> Option<LocalPod> {
        let key = (namespace.to_owned(), name.to_owned());
        self.state.read().local_pods.get(&key).cloned()
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn program_endpoint(&mut self, record: &EndpointRecord) -> Result<(), NodeError> {
        self.directory().set_local(
            record.host_ifindex,
            EndpointMeta {
                ip: record.ip,
                cluster: self.origin.cluster.clone(),
                namespace: record.pod.namespace.clone(),
                pod: record.pod.name.clone(),
                node: self.origin.node.clone(),
                labels: Default::default(),
                identity: record.identity,
                security_labels: Default::default(),
                named_ports: Default::default(),
            },
        );
        self.datapath.upsert_endpoint(
            record.ip,
            EndpointInfo {
                ifindex: record.host_ifindex,
                identity: record.identity,
                mac: record.pod_mac,
                node_mac: record.host_mac,
            },
        )?;
        self.datapath.upsert_ipcache(
            Ipv4Net::from(record.ip),
            IpcacheEntry {
                identity: record.identity,
                tunnel_endpoint: 0,
            },
        )?;
        Ok(())
    }

    /// Forgets the endpoint everywhere: every step is tried even when one fails, so a
    /// failure leaves as little as possible behind; the first failure is returned.
    fn release(&mut self, container_id: &str) -> Result<Response, NodeError> {
        let record = self.endpoints.remove(container_id);
        let mut failures: Vec<NodeError> = Vec::new();
        if let Some(record) = &record {
            let steps = [
                self.datapath.remove_endpoint(record.ip),
                self.datapath.remove_ipcache(Ipv4Net::from(record.ip)),
                {
                    self.datapath.detach(&record.host_veth);
                    self.policy
                        .forget_endpoint(&mut self.datapath, record.host_ifindex)
                },
                self.datapath.remove_counters(record.host_ifindex),
            ];
            failures.extend(
                steps
                    .into_iter()
                    .filter_map(Result::err)
                    .map(NodeError::from),
            );
            self.directory().remove_local(record.ip);
            let _ = std::fs::remove_file(self.record_path(container_id));
            // A later pod given this address must not inherit its connections: a tracked
            // "reply" to it would pass its ingress policy.
            let pin_dir = self.datapath.pin_dir().to_owned();
            let address = record.ip;
            let forget = move || crate::conntrack::forget_address(&pin_dir, address);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(forget)),
                Err(_) => forget(),
            }
            tracing::info!(ip = %record.ip, veth = %record.host_veth, "endpoint removed");
        }
        let ip = self.ipam.release(container_id);
        if let Some(error) = failures.into_iter().next() {
            return Err(error);
        }
        Ok(Response::Released {
            ip: ip?,
            host_veth: record.map(|record| record.host_veth),
        })
    }

    fn record_path(&self, container_id: &str) -> PathBuf {
        self.records_dir.join(format!("{container_id}.json"))
    }

    fn save(&self, record: &EndpointRecord) -> Result<(), NodeError> {
        let path = self.record_path(&record.container_id);
        serde_json::to_vec(record)
            .map_err(std::io::Error::other)
            .and_then(|json| weft_core::files::write_atomically(&path, &json))
            .map_err(|error| NodeError::Record {
                path,
                reason: error.to_string(),
            })
    }
}

/// The CNI spec's rule for container IDs; it also keeps them safe as file names.
fn is_valid_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && id.len() <= 256
}
