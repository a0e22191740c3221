//! What the sandbox tells each node's agent, as the Kubernetes watches do in a cluster: its local
//! pods, its peers, the cluster's policies and services, and the endpoint directory.

use super::*;

impl Sandbox {
    /// The file a node's agent finds its pods in by name, with their identities
    /// (`--local-pods-file`): what the node-scoped Pod watch and the allocated `WeftIdentity`
    /// objects give it in a cluster. CNI ADD waits until the new pod's entry is there.
    pub fn local_pods_file(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("local-pods.json")
    }

    /// Writes a node's local pods file: its running pods, and the pods being created on it
    /// (`pending`: written before their CNI ADD, which waits for them). Another process may be
    /// creating a pod this one does not know yet, so pending entries already in the file are
    /// kept until that pod is recorded or `change` withdraws it. Callers hold the state lock.
    pub(crate) fn write_local_pods(
        &self,
        cluster: &str,
        node: &str,
        change: PendingPod,
    ) -> Result<(), SandboxError> {
        let path = self.local_pods_file(cluster, node);
        let running: Vec<serde_json::Value> = self
            .pods
            .iter()
            .filter(|pod| pod.cluster == cluster && pod.node == node)
            .map(|pod| {
                local_pod_entry(
                    &pod.namespace,
                    &pod.name,
                    pod.identity,
                    self.security_labels(pod),
                    &pod.ports,
                )
            })
            .collect();
        let same_pod = |a: &serde_json::Value, b: &serde_json::Value| {
            a["namespace"] == b["namespace"] && a["pod"] == b["pod"]
        };
        let mut pending: Vec<serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<serde_json::Value>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|entry| entry["pending"] == true)
            .filter(|entry| !running.iter().any(|pod| same_pod(pod, entry)))
            .collect();
        match change {
            PendingPod::Keep => {}
            PendingPod::Add(mut entry) => {
                entry["pending"] = serde_json::Value::Bool(true);
                pending.retain(|known| !same_pod(known, &entry));
                pending.push(entry);
            }
            PendingPod::Withdraw(entry) => pending.retain(|known| !same_pod(known, &entry)),
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let entries: Vec<serde_json::Value> = running.into_iter().chain(pending).collect();
        write_atomically(&path, &serde_json::to_vec(&entries).unwrap_or_default())
    }

    /// The file a node's agent reads its peers from (`--peers-file`): what the Node watch
    /// gives it in a cluster.
    pub fn peers_file(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("peers.json")
    }

    /// Writes `node`'s peers file with `peers` (`up` writes every other node of the sandbox);
    /// the agent wires new peers and unwires those left out within a second.
    pub fn write_peers_file(
        &self,
        node: &NodePlan,
        peers: &[&NodePlan],
    ) -> Result<(), SandboxError> {
        let entries: Vec<serde_json::Value> = peers
            .iter()
            .map(|peer| {
                serde_json::json!({
                    "name": format!("{}-{}", peer.cluster, peer.name),
                    "nodeIP": peer.ip,
                    "podCIDR": peer.pod_cidr,
                })
            })
            .collect();
        write_atomically(
            &self.peers_file(&node.cluster, &node.name),
            &serde_json::to_vec(&entries).unwrap_or_default(),
        )
    }

    pub(crate) fn policy_file(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("policies")
            .join(format!("{cluster}.json"))
    }

    /// The file a cluster's agents read Services and EndpointSlices from (`--service-file`).
    pub fn service_file(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("services")
            .join(format!("{cluster}.json"))
    }

    /// Each cluster's policies, for its agents (what the policy watch gives them in a cluster).
    pub(crate) fn write_policy_files(&self) -> Result<(), SandboxError> {
        for cluster in self.plan.clusters() {
            let policies: Vec<&serde_json::Value> = self
                .objects
                .get(cluster)
                .into_iter()
                .flatten()
                .filter(|object| {
                    matches!(
                        object["kind"].as_str(),
                        Some(
                            "WeftNetworkPolicy" | "WeftClusterwideNetworkPolicy" | "NetworkPolicy"
                        )
                    )
                })
                .collect();
            write_atomically(
                &self.policy_file(cluster),
                &serde_json::to_vec(&policies).unwrap_or_default(),
            )?;
        }
        Ok(())
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

    /// Each cluster's service file, for its agents (what the Service and EndpointSlice watches
    /// give them in a cluster).
    pub(crate) fn write_service_files(&self) -> Result<(), SandboxError> {
        let computed = self.services();
        for cluster in self.plan.clusters() {
            let objects = computed
                .get(cluster)
                .map(ClusterServices::file_objects)
                .unwrap_or_default();
            write_atomically(
                &self.service_file(cluster),
                &serde_json::to_vec(&objects).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    /// Every pod of every cluster, for the agents to name the far end of flows (what the
    /// Kubernetes endpoint watch gives them in a cluster).
    pub(crate) fn write_endpoint_directory(&self) -> Result<(), SandboxError> {
        let entries: Vec<serde_json::Value> = self
            .pods
            .iter()
            .map(|pod| {
                serde_json::json!({
                    "ip": pod.ip, "cluster": pod.cluster, "namespace": pod.namespace,
                    "pod": pod.name, "node": pod.node, "labels": pod.labels,
                    "identity": pod.identity,
                    "security_labels": self.security_labels(pod),
                    "named_ports": named_ports(&pod.ports),
                })
            })
            .collect();
        write_atomically(
            &self.run_dir.join("endpoints.json"),
            &serde_json::to_vec(&entries).unwrap_or_default(),
        )
    }
}

/// [`record_all`] for one object.
/// What [`Sandbox::write_local_pods`] does with the pods being created.
pub(crate) enum PendingPod {
    Keep,
    Add(serde_json::Value),
    Withdraw(serde_json::Value),
}

/// A pod's named ports as the agent's files carry them: name → (protocol, number).
pub(crate) fn named_ports(ports: &[PodPort]) -> BTreeMap<String, (String, u16)> {
    ports
        .iter()
        .filter_map(|port| Some((port.name.clone()?, (port.protocol.clone(), port.port))))
        .collect()
}

/// One entry of a node's local pods file (the agent's `LocalPod`).
pub(crate) fn local_pod_entry(
    namespace: &str,
    name: &str,
    identity: u32,
    security_labels: BTreeMap<String, String>,
    ports: &[PodPort],
) -> serde_json::Value {
    serde_json::json!({
        "namespace": namespace, "pod": name, "identity": identity,
        "security_labels": security_labels,
        "named_ports": named_ports(ports),
        "host_ports": ports.iter().filter_map(|port| {
            Some(serde_json::json!({
                "protocol": port.protocol, "host_port": port.host_port?,
                "container_port": port.port, "host_ip": port.host_ip,
            }))
        }).collect::<Vec<_>>(),
    })
}
