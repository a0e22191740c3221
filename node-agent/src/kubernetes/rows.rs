//! The rows of the agent's state built from watched objects: pure functions, objects in, rows
//! out (the same rows the sandbox sends in local mode).
//!
//! - The endpoints ([`EndpointMeta`] per address): this node's pods from the Pod
//!   watch (labels, namespace labels, named ports; the identity is the `WeftIdentity` whose
//!   labels are the pod's security labels, `init` until the operator has allocated one) and
//!   every other pod of the cluster from its `WeftEndpoint` (identity, node, named ports; labels
//!   from that identity's `WeftIdentity`).
//! - This node's pods by name ([`LocalPod`]), with their identities and host ports.
//! - The policies: `WeftNetworkPolicy`, `WeftClusterwideNetworkPolicy` and `NetworkPolicy`.
//! - The services: `Service`, `EndpointSlice` and `GlobalService`.
//!
//! Fields that change without changing what the engines do (`resourceVersion`,
//! `managedFields`, policy statuses the operator writes) are left out, so such changes leave
//! the rows as they are and cost no recompilation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use serde_json::Value;
use weft_core::identity::{
    LabelFilter, ReservedIdentity, SecurityLabels, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
};
use weft_crds::policy::Protocol;
use weft_crds::{
    GlobalService, WeftClusterwideNetworkPolicy, WeftEndpoint, WeftIdentity, WeftNetworkPolicy,
};

use crate::flows::directory::EndpointMeta;
use weft_core::state::{HostPort, LocalPod};

/// What the endpoint directory is built from.
pub struct DirectoryInputs<'a> {
    /// This cluster's name (every entry is in it).
    pub cluster: &'a str,
    /// This node's name.
    pub node: &'a str,
    /// This node's pods.
    pub local_pods: &'a [Arc<Pod>],
    pub namespaces: &'a [Arc<Namespace>],
    pub identities: &'a [Arc<WeftIdentity>],
    /// Every WeftEndpoint of the cluster.
    pub endpoints: &'a [Arc<WeftEndpoint>],
}

/// Allocated identities, both ways.
pub struct IdentityIndex<'a> {
    by_labels: BTreeMap<&'a BTreeMap<String, String>, u32>,
    by_id: BTreeMap<u32, &'a BTreeMap<String, String>>,
}

impl<'a> IdentityIndex<'a> {
    pub fn new(identities: &'a [Arc<WeftIdentity>]) -> Self {
        let mut by_labels = BTreeMap::new();
        let mut by_id = BTreeMap::new();
        for identity in identities {
            let Ok(id) = u32::try_from(identity.spec.id) else {
                continue;
            };
            let labels = &identity.spec.security_labels;
            // Two objects for one label set should not happen; the lower number wins everywhere.
            by_labels
                .entry(labels)
                .and_modify(|existing: &mut u32| *existing = (*existing).min(id))
                .or_insert(id);
            by_id.insert(id, labels);
        }
        Self { by_labels, by_id }
    }

    /// The number allocated for `labels`, or `init` while there is none.
    pub fn identity_of(&self, labels: &BTreeMap<String, String>) -> u32 {
        self.by_labels
            .get(labels)
            .copied()
            .unwrap_or(ReservedIdentity::Init.id())
    }

    pub fn labels_of(&self, id: u32) -> Option<&'a BTreeMap<String, String>> {
        self.by_id.get(&id).copied()
    }
}

/// The namespaces' labels by name.
pub fn namespace_labels(
    namespaces: &[Arc<Namespace>],
) -> BTreeMap<String, BTreeMap<String, String>> {
    namespaces
        .iter()
        .map(|namespace| (namespace.name_any(), namespace.labels().clone()))
        .collect()
}

/// A pod's security labels: its labels (minus the ignore list), its namespace and the
/// namespace's labels — what its identity stands for.
pub fn security_labels_of(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let empty = BTreeMap::new();
    SecurityLabels::for_pod(
        &namespace,
        pod.labels(),
        namespace_labels.get(&namespace).unwrap_or(&empty),
        &LabelFilter::default(),
    )
    .into_map()
}

/// The pod's IPv4 address, if it has one and owns it: host-network pods share the node's
/// address, and finished pods keep theirs in their status after it was freed.
pub fn pod_ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|pod_ip| pod_ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find_map(|ip| ip.parse().ok())
}

/// The pod's named container ports: name → (protocol, port).
pub fn named_ports_of(pod: &Pod) -> BTreeMap<String, (String, u16)> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            Some((
                port.name.clone()?,
                (
                    port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    u16::try_from(port.container_port).ok()?,
                ),
            ))
        })
        .collect()
}

/// The container ports the pod takes on its node (`hostPort`); IPv6 host IPs are left out.
pub fn host_ports_of(pod: &Pod) -> Vec<HostPort> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            let host_ip = match port.host_ip.as_deref() {
                None | Some("") | Some("0.0.0.0") => None,
                Some(ip) => Some(ip.parse().ok()?),
            };
            Some(HostPort {
                protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                host_port: u16::try_from(port.host_port?).ok().filter(|p| *p != 0)?,
                container_port: u16::try_from(port.container_port).ok()?,
                host_ip,
            })
        })
        .collect()
}

/// Every endpoint of the cluster, sorted by address; where a local pod and a WeftEndpoint
/// claim one address, the pod (fresher, with its labels) wins.
pub fn endpoint_directory(inputs: &DirectoryInputs<'_>) -> Vec<EndpointMeta> {
    let identities = IdentityIndex::new(inputs.identities);
    let namespaces = namespace_labels(inputs.namespaces);
    let mut entries: BTreeMap<Ipv4Addr, EndpointMeta> = BTreeMap::new();

    // Newest last, so that of two claims on an address (an agent that died before deleting a
    // pod's endpoint, and the address reused) the newest wins.
    let mut endpoints: Vec<&WeftEndpoint> = inputs.endpoints.iter().map(AsRef::as_ref).collect();
    endpoints.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, a.namespace(), a.name_any()).cmp(&(
            &b.metadata.creation_timestamp,
            b.namespace(),
            b.name_any(),
        ))
    });
    for endpoint in endpoints {
        let Some(ip) = endpoint
            .spec
            .ips
            .iter()
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let namespace = endpoint.namespace().unwrap_or_default();
        let identity = u32::try_from(endpoint.spec.identity).unwrap_or(0);
        let security_labels = identities
            .labels_of(identity)
            .cloned()
            .unwrap_or_else(|| BTreeMap::from([(NAMESPACE_LABEL.to_owned(), namespace.clone())]));
        let labels = security_labels
            .iter()
            .filter(|(key, _)| {
                key.as_str() != NAMESPACE_LABEL && !key.starts_with(NAMESPACE_LABELS_PREFIX)
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        entries.insert(
            ip,
            EndpointMeta {
                ip,
                cluster: inputs.cluster.to_owned(),
                namespace,
                pod: endpoint.name_any(),
                node: endpoint.spec.node_name.clone(),
                labels,
                identity,
                security_labels,
                named_ports: endpoint
                    .spec
                    .named_ports
                    .iter()
                    .filter_map(|port| {
                        let protocol = match port.protocol {
                            Protocol::Udp => "UDP",
                            Protocol::Tcp | Protocol::Any => "TCP",
                        };
                        Some((
                            port.name.clone(),
                            (protocol.to_owned(), u16::try_from(port.port).ok()?),
                        ))
                    })
                    .collect(),
            },
        );
    }

    for pod in inputs.local_pods {
        if pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.as_deref())
            .is_some_and(|node| node != inputs.node)
        {
            continue;
        }
        let Some(ip) = pod_ipv4(pod) else {
            continue;
        };
        let security_labels = security_labels_of(pod, &namespaces);
        entries.insert(
            ip,
            EndpointMeta {
                ip,
                cluster: inputs.cluster.to_owned(),
                namespace: pod.namespace().unwrap_or_default(),
                pod: pod.name_any(),
                node: inputs.node.to_owned(),
                labels: pod.labels().clone(),
                identity: identities.identity_of(&security_labels),
                security_labels,
                named_ports: named_ports_of(pod),
            },
        );
    }
    entries.into_values().collect()
}

/// The local pods table: every pod of this node by name, with the
/// identity allocated for its security labels (`init` until the operator has allocated one),
/// whether or not it has an address yet. Host-network pods are left out: no endpoint is wired
/// for them.
pub fn local_pods(
    node: &str,
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    identities: &[Arc<WeftIdentity>],
) -> Vec<LocalPod> {
    let identities = IdentityIndex::new(identities);
    let namespaces = namespace_labels(namespaces);
    let mut local: Vec<LocalPod> = pods
        .iter()
        .filter(|pod| {
            pod.spec.as_ref().is_some_and(|spec| {
                spec.node_name.as_deref() == Some(node) && spec.host_network != Some(true)
            })
        })
        .map(|pod| {
            let security_labels = security_labels_of(pod, &namespaces);
            LocalPod {
                namespace: pod.namespace().unwrap_or_default(),
                pod: pod.name_any(),
                identity: identities.identity_of(&security_labels),
                security_labels,
                named_ports: named_ports_of(pod),
                host_ports: host_ports_of(pod),
            }
        })
        .collect();
    local.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    local
}

/// The object without what changes on every write (`resourceVersion`, `managedFields`) and,
/// with `drop_status`, without its status.
fn trimmed(object: impl serde::Serialize, drop_status: bool) -> Option<Value> {
    let mut value = serde_json::to_value(object).ok()?;
    if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("resourceVersion");
        metadata.remove("managedFields");
    }
    if drop_status {
        if let Some(object) = value.as_object_mut() {
            object.remove("status");
        }
    }
    Some(value)
}

/// The policies table: every policy of the three kinds the policy engine reads.
pub fn policy_objects(
    weft: &[Arc<WeftNetworkPolicy>],
    clusterwide: &[Arc<WeftClusterwideNetworkPolicy>],
    kubernetes: &[Arc<NetworkPolicy>],
) -> Vec<Value> {
    weft.iter()
        .filter_map(|policy| trimmed(policy.as_ref(), true))
        .chain(
            clusterwide
                .iter()
                .filter_map(|policy| trimmed(policy.as_ref(), true)),
        )
        .chain(
            kubernetes
                .iter()
                .filter_map(|policy| trimmed(policy.as_ref(), true)),
        )
        .collect()
}

/// The services table: Services (with their status: load-balancer addresses), EndpointSlices
/// and GlobalServices.
pub fn service_objects(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    globals: &[Arc<GlobalService>],
) -> Vec<Value> {
    services
        .iter()
        .filter_map(|service| trimmed(service.as_ref(), false))
        .chain(
            slices
                .iter()
                .filter_map(|slice| trimmed(slice.as_ref(), false)),
        )
        .chain(
            globals
                .iter()
                .filter_map(|global| trimmed(global.as_ref(), true)),
        )
        .collect()
}
