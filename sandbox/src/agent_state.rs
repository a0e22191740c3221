//! What the sandbox tells each node's agent, as the Kubernetes watches do in a cluster: the
//! cluster's endpoints, the node's pods by name, the cluster's policies and services, and the
//! other nodes. It is sent over the agent's state socket (`weft.state.v1.AgentState`) as
//! changes: the sandbox remembers, per agent, a hash of every row it sent (`sent.json` in the
//! node's directory) and sends only rows that differ and deletions. An agent it has not told
//! anything yet (just started) gets a complete listing, marked synced: the agent's engines
//! wait for it. Pods being created (their ADD waits for their row) are kept in the node's
//! `pending.json` until they run or their ADD fails, whichever process creates them, so an
//! agent that starts meanwhile is told of them too.

use std::collections::BTreeSet;
use std::hash::Hasher;

use hyper_util::rt::TokioIo;
use siphasher::sip::SipHasher13;
use tonic::transport::{Endpoint, Uri};
use weft_api::state::agent_state_client::AgentStateClient;
use weft_api::state::{ApplyRequest, Change};
use weft_core::state::{
    EncodedChange, EndpointMeta, HostPort, LocalPod, PeerNode, PolicyObject, Row, ServiceObject,
    TableName,
};

use super::*;

/// How long a running agent's socket is tried before its changes wait for the next save.
const SEND_ATTEMPTS: u32 = 5;
const SEND_RETRY: Duration = Duration::from_millis(200);

/// What the sandbox last sent one agent: a hash of each row by table and key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Sent {
    rows: BTreeMap<TableName, BTreeMap<String, u64>>,
}

/// What a save does with the pods being created on a node.
pub(crate) enum PendingPod {
    /// Sent before the pod's CNI ADD, which waits for it.
    Add(LocalPod),
    /// Its ADD failed: it goes.
    Withdraw(LocalPod),
}

impl Sandbox {
    /// The socket on which `node`'s agent takes the cluster's state (`--state-socket`).
    pub fn state_socket(&self, node: &NodePlan) -> PathBuf {
        self.node_dir(node).join("state.sock")
    }

    fn sent_path(&self, node: &NodePlan) -> PathBuf {
        self.node_dir(node).join("sent.json")
    }

    fn pending_path(&self, node: &NodePlan) -> PathBuf {
        self.node_dir(node).join("pending.json")
    }

    /// The pods being created on `node` after `change`, less those that run now (`running`:
    /// local pod keys); kept on disk when they changed.
    fn pending_pods(
        &self,
        node: &NodePlan,
        running: &BTreeSet<String>,
        change: Option<&PendingPod>,
    ) -> Result<Vec<LocalPod>, SandboxError> {
        let path = self.pending_path(node);
        let before: Vec<LocalPod> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let key = |pod: &LocalPod| LocalPod::key_string(&Row::key(pod));
        let mut pending: BTreeMap<String, LocalPod> = before
            .iter()
            .filter(|pod| !running.contains(&key(pod)))
            .map(|pod| (key(pod), pod.clone()))
            .collect();
        match change {
            Some(PendingPod::Add(pod)) => {
                pending.insert(key(pod), pod.clone());
            }
            Some(PendingPod::Withdraw(pod)) => {
                pending.remove(&key(pod));
            }
            None => {}
        }
        let after: Vec<LocalPod> = pending.into_values().collect();
        if after != before {
            write_atomically(&path, &serde_json::to_vec(&after).unwrap_or_default())?;
        }
        Ok(after)
    }

    /// Forgets what `node`'s agent was told: the next save sends it a complete listing (an
    /// agent that starts knows nothing).
    pub(crate) fn forget_sent(&self, node: &NodePlan) {
        let _ = std::fs::remove_file(self.sent_path(node));
    }

    /// Sends every running agent what changed for it. `pending` changes the pods being
    /// created on one node (cluster, node). Callers hold the state lock.
    pub(crate) fn publish(
        &self,
        pending: Option<(&str, &str, PendingPod)>,
    ) -> Result<(), SandboxError> {
        let services = self.services();
        let endpoints: Vec<EndpointMeta> = self.pods.iter().map(|pod| self.endpoint(pod)).collect();
        for node in &self.plan.nodes {
            let Some(agent) = self
                .agents
                .iter()
                .find(|agent| agent.cluster == node.cluster && agent.node == node.name)
            else {
                continue;
            };
            let change = match &pending {
                Some((cluster, name, change)) if *cluster == node.cluster && *name == node.name => {
                    Some(change)
                }
                _ => None,
            };
            let mut desired = Desired::default();
            desired.add_all(&endpoints);
            desired.add_all(&self.local_pods(node));
            desired.add_all(&self.policies(&node.cluster));
            desired.add_all(
                &services
                    .get(&node.cluster)
                    .map(ClusterServices::agent_objects)
                    .unwrap_or_default()
                    .into_iter()
                    .map(ServiceObject)
                    .collect::<Vec<_>>(),
            );
            desired.add_all(&self.peers_of(node));
            self.send(node, agent.pid, desired, change)?;
        }
        Ok(())
    }

    /// Diffs `desired` against what `node`'s agent was sent and sends the difference.
    fn send(
        &self,
        node: &NodePlan,
        pid: u32,
        mut desired: Desired,
        pending: Option<&PendingPod>,
    ) -> Result<(), SandboxError> {
        let sent_path = self.sent_path(node);
        let first = !sent_path.exists();
        let mut sent: Sent = std::fs::read(&sent_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let running: BTreeSet<String> = desired
            .rows
            .get(&TableName::LocalPods)
            .map(|rows| rows.keys().cloned().collect())
            .unwrap_or_default();
        // Pods being created, by this process or another, until they run or are withdrawn.
        for pod in self.pending_pods(node, &running, pending)? {
            desired.add(EncodedChange::upsert(&pod));
        }
        let mut changes = Vec::new();
        let mut now: BTreeMap<TableName, BTreeMap<String, u64>> = BTreeMap::new();
        for (table, rows) in &desired.rows {
            let before = sent.rows.get(table);
            for (key, row) in rows {
                let hash = hash(row);
                if before.and_then(|rows| rows.get(key)) != Some(&hash) {
                    changes.push(Change {
                        table: table.as_str().to_owned(),
                        key: key.clone(),
                        row: Some(row.clone()),
                    });
                }
                now.entry(*table).or_default().insert(key.clone(), hash);
            }
        }
        for (table, rows) in &sent.rows {
            for key in rows.keys() {
                if now.get(table).is_some_and(|now| now.contains_key(key)) {
                    continue;
                }
                changes.push(Change {
                    table: table.as_str().to_owned(),
                    key: key.clone(),
                    row: None,
                });
            }
        }
        if changes.is_empty() && !first {
            return Ok(());
        }
        let request = ApplyRequest {
            changes,
            complete: first,
            synced: first,
        };
        let socket = self.state_socket(node);
        let mut attempt = 0;
        loop {
            match apply(&socket, request.clone()) {
                Ok(()) => break,
                // Stopped (a test killed it, say): it gets everything when it starts again.
                Err(_) if !process_alive(pid) => return Ok(()),
                Err(error) if attempt + 1 >= SEND_ATTEMPTS => {
                    tracing::warn!(node = %node.name, %error, "cannot tell the agent the cluster's changes; the next change sends them again");
                    return Ok(());
                }
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(SEND_RETRY);
                }
            }
        }
        sent.rows = now;
        write_atomically(&sent_path, &serde_json::to_vec(&sent).unwrap_or_default())
    }

    /// Sends every running agent `rows` besides the sandbox's own (a bench adds endpoints the
    /// sandbox does not run, say); they stay until the agent restarts.
    pub fn send_extra_rows(&self, rows: &[EncodedChange]) -> Result<(), SandboxError> {
        let changes: Vec<Change> = rows
            .iter()
            .map(|row| Change {
                table: row.table.as_str().to_owned(),
                key: row.key.clone(),
                row: row.value.clone(),
            })
            .collect();
        for node in &self.plan.nodes {
            if !self
                .agents
                .iter()
                .any(|agent| agent.cluster == node.cluster && agent.node == node.name)
            {
                continue;
            }
            let request = ApplyRequest {
                changes: changes.clone(),
                complete: false,
                synced: false,
            };
            apply(&self.state_socket(node), request).map_err(|reason| {
                SandboxError::Invalid(format!("cannot send {} rows: {reason}", node.name))
            })?;
        }
        Ok(())
    }

    /// `node`'s peers (every other node of the sandbox unless [`Self::set_peers`] said else).
    fn peers_of(&self, node: &NodePlan) -> Vec<PeerNode> {
        let key = format!("{}-{}", node.cluster, node.name);
        let told = self.peers.get(&key);
        self.plan
            .nodes
            .iter()
            .filter(|peer| peer.netns != node.netns)
            .filter(|peer| {
                told.is_none_or(|names| names.contains(&format!("{}-{}", peer.cluster, peer.name)))
            })
            .map(|peer| PeerNode {
                name: format!("{}-{}", peer.cluster, peer.name),
                node_ip: peer.ip,
                pod_cidr: peer.pod_cidr,
            })
            .collect()
    }

    /// Tells `node`'s agent that its peers are `peers` (tests take nodes away and bring them
    /// back); remembered across agent restarts, until changed again.
    pub fn set_peers(&mut self, node: &NodePlan, peers: &[&NodePlan]) -> Result<(), SandboxError> {
        let key = format!("{}-{}", node.cluster, node.name);
        let names: Vec<String> = peers
            .iter()
            .map(|peer| format!("{}-{}", peer.cluster, peer.name))
            .collect();
        self.commit(|fresh| {
            fresh.peers.insert(key, names);
        })
    }

    /// The cluster's policies (what the policy watches give the agents in a cluster).
    fn policies(&self, cluster: &str) -> Vec<PolicyObject> {
        self.objects
            .get(cluster)
            .into_iter()
            .flatten()
            .filter(|object| {
                matches!(
                    object["kind"].as_str(),
                    Some("WeftNetworkPolicy" | "WeftClusterwideNetworkPolicy" | "NetworkPolicy")
                )
            })
            .cloned()
            .map(PolicyObject)
            .collect()
    }

    /// Every cluster's Services (with their allocations), GlobalServices and EndpointSlices —
    /// its own and those other clusters share for its global Services — computed from the
    /// stored objects and the pods as they are now.
    pub fn services(&self) -> BTreeMap<String, ClusterServices> {
        let inputs: Vec<ClusterInput<'_>> = self
            .plan
            .clusters()
            .into_iter()
            .map(|cluster| ClusterInput {
                name: cluster,
                id: self.plan.cluster_id(cluster).unwrap_or_default(),
                objects: self.objects.get(cluster).map_or(&[], Vec::as_slice),
                pods: self.pods.iter().filter(|p| p.cluster == cluster).collect(),
            })
            .collect();
        services::compute(&inputs)
    }

    /// A pod as every agent knows it (what the Kubernetes endpoint watch gives them).
    fn endpoint(&self, pod: &PodState) -> EndpointMeta {
        EndpointMeta {
            ip: pod.ip,
            cluster: pod.cluster.clone(),
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            node: pod.node.clone(),
            labels: pod.labels.clone(),
            identity: pod.identity,
            security_labels: self.security_labels(pod),
            named_ports: named_ports(&pod.ports),
        }
    }

    /// `node`'s running pods by name, with their identities.
    fn local_pods(&self, node: &NodePlan) -> Vec<LocalPod> {
        self.pods
            .iter()
            .filter(|pod| pod.cluster == node.cluster && pod.node == node.name)
            .map(|pod| {
                local_pod(
                    &pod.namespace,
                    &pod.name,
                    pod.identity,
                    self.security_labels(pod),
                    &pod.ports,
                )
            })
            .collect()
    }
}

/// The rows one agent should have, encoded, by table and key.
#[derive(Default)]
struct Desired {
    rows: BTreeMap<TableName, BTreeMap<String, Vec<u8>>>,
}

impl Desired {
    fn add_all<R: Row>(&mut self, rows: &[R]) {
        for row in rows {
            self.add(EncodedChange::upsert(row));
        }
    }

    fn add(&mut self, change: EncodedChange) {
        self.rows
            .entry(change.table)
            .or_default()
            .insert(change.key, change.value.unwrap_or_default());
    }
}

fn hash(row: &[u8]) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(0, 0);
    hasher.write(row);
    hasher.finish()
}

/// Sends `request` to the agent behind `socket` (on a thread of its own: callers may be
/// inside an async runtime).
fn apply(socket: &Path, request: ApplyRequest) -> Result<(), String> {
    let socket = socket.to_owned();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| error.to_string())?;
                runtime.block_on(async move {
                    // The URI is required by tonic but unused: the connector dials the socket.
                    let channel = Endpoint::try_from("http://agent.invalid")
                        .map_err(|error| error.to_string())?
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(10))
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let socket = socket.clone();
                            async move {
                                Ok::<_, std::io::Error>(TokioIo::new(
                                    tokio::net::UnixStream::connect(socket).await?,
                                ))
                            }
                        }))
                        .await
                        .map_err(|error| error.to_string())?;
                    AgentStateClient::new(channel)
                        .apply(request)
                        .await
                        .map(drop)
                        .map_err(|status| status.message().to_owned())
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the sending thread panicked".to_owned()))
    })
}

/// A pod's named ports as the agent's rows carry them: name → (protocol, number).
pub(crate) fn named_ports(ports: &[PodPort]) -> BTreeMap<String, (String, u16)> {
    ports
        .iter()
        .filter_map(|port| Some((port.name.clone()?, (port.protocol.clone(), port.port))))
        .collect()
}

/// A pod of a node as its agent finds it by name.
pub(crate) fn local_pod(
    namespace: &str,
    name: &str,
    identity: u32,
    security_labels: BTreeMap<String, String>,
    ports: &[PodPort],
) -> LocalPod {
    LocalPod {
        namespace: namespace.to_owned(),
        pod: name.to_owned(),
        identity,
        security_labels,
        named_ports: named_ports(ports),
        host_ports: ports
            .iter()
            .filter_map(|port| {
                Some(HostPort {
                    protocol: port.protocol.clone(),
                    host_port: port.host_port?,
                    container_port: port.port,
                    host_ip: port.host_ip,
                })
            })
            .collect(),
    }
}
