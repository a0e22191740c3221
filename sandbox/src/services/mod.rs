//! Services in local mode: what the API server and the controllers would give Weft's
//! kube-proxy replacement in a cluster. The sandbox allocates cluster IPs and node ports when a
//! Service is stored (`allocate`), computes each Service's EndpointSlices from its pods
//! (`slices`), copies global Services' slices between clusters as the mesh will (`global`),
//! and writes it all to one file per cluster that the agents read.

pub mod allocate;
pub mod global;
pub mod slices;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde_json::Value;

pub use allocate::{allocate, Allocations};
pub use global::Scope;

use crate::PodState;

/// Whether a stored object is a core/v1 Service.
pub fn is_service(object: &Value) -> bool {
    object["kind"] == "Service" && object["apiVersion"] == "v1"
}

fn is_global_service(object: &Value) -> bool {
    object["kind"] == "GlobalService"
        && object["apiVersion"]
            .as_str()
            .is_some_and(|version| version.starts_with("weft.io/"))
}

/// A namespaced object's namespace (`default` when it names none) and name.
pub fn service_key(object: &Value) -> (String, String) {
    let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    (
        text("/metadata/namespace").unwrap_or("default").to_owned(),
        text("/metadata/name").unwrap_or_default().to_owned(),
    )
}

/// One cluster, as the computation needs it.
pub struct ClusterInput<'a> {
    pub name: &'a str,
    pub id: u16,
    /// The cluster's stored objects (any kind; Services and GlobalServices are used).
    pub objects: &'a [Value],
    /// The cluster's pods.
    pub pods: Vec<&'a PodState>,
}

/// A Service of a cluster, as stored (with its allocations) and as understood.
#[derive(Clone, Debug)]
pub struct ClusterService {
    pub object: Value,
    pub service: Service,
    pub scope: Scope,
}

/// Everything a cluster's agents learn about Services.
#[derive(Clone, Debug, Default)]
pub struct ClusterServices {
    pub services: Vec<ClusterService>,
    pub global_services: Vec<Value>,
    /// Slices of this cluster's Services, over its own pods.
    pub slices: Vec<EndpointSlice>,
    /// Slices other clusters share for this cluster's global Services.
    pub remote_slices: Vec<EndpointSlice>,
}

/// Every cluster's Services, slices and remote slices, keyed by cluster name.
pub fn compute(clusters: &[ClusterInput<'_>]) -> BTreeMap<String, ClusterServices> {
    // First each cluster on its own: Services, their scope and their slices.
    let mut local: BTreeMap<&str, (ClusterServices, Vec<Vec<EndpointSlice>>)> = BTreeMap::new();
    for cluster in clusters {
        let global_services: Vec<&Value> = cluster
            .objects
            .iter()
            .filter(|object| is_global_service(object))
            .collect();
        let mut services = Vec::new();
        let mut per_service = Vec::new();
        for object in cluster.objects.iter().filter(|object| is_service(object)) {
            let service: Service = match serde_json::from_value(object.clone()) {
                Ok(service) => service,
                Err(error) => {
                    tracing::warn!(%error, cluster = cluster.name, object = ?service_key(object), "skipping a Service that does not parse");
                    continue;
                }
            };
            per_service.push(slices::endpoint_slices(&service, &cluster.pods));
            services.push(ClusterService {
                scope: global::scope(&service, &global_services),
                object: object.clone(),
                service,
            });
        }
        let computed = ClusterServices {
            slices: per_service.iter().flatten().cloned().collect(),
            services,
            global_services: global_services.into_iter().cloned().collect(),
            remote_slices: Vec::new(),
        };
        local.insert(cluster.name, (computed, per_service));
    }
    // Then each global Service takes the slices the other clusters share for it.
    let mut result = BTreeMap::new();
    for cluster in clusters {
        let Some((mut computed, _)) = local.get(cluster.name).cloned() else {
            continue;
        };
        for wanted in computed.services.iter().filter(|s| s.scope.is_global()) {
            let key = service_key(&wanted.object);
            for other in clusters.iter().filter(|other| other.name != cluster.name) {
                let Some((theirs, their_slices)) = local.get(other.name) else {
                    continue;
                };
                let shared = theirs
                    .services
                    .iter()
                    .zip(their_slices)
                    .find(|(service, _)| {
                        service.scope.is_shared() && service_key(&service.object) == key
                    });
                if let Some((_, slices)) = shared {
                    computed
                        .remote_slices
                        .extend(global::remote_copies(slices, other.name, other.id));
                }
            }
        }
        result.insert(cluster.name.to_owned(), computed);
    }
    result
}

impl ClusterServices {
    /// What the cluster's agents are told: Services, GlobalServices, this cluster's slices,
    /// then the remote ones.
    pub fn agent_objects(&self) -> Vec<Value> {
        let slices = self
            .slices
            .iter()
            .chain(&self.remote_slices)
            .filter_map(|slice| serde_json::to_value(slice).ok());
        self.services
            .iter()
            .map(|service| service.object.clone())
            .chain(self.global_services.iter().cloned())
            .chain(slices)
            .collect()
    }

    /// Each Service with its ports and the backends its slices give it, for `sandbox status`.
    pub fn status(&self, cluster: &str) -> Vec<ServiceStatus> {
        self.services
            .iter()
            .map(|entry| {
                let (namespace, name) = service_key(&entry.object);
                let spec = entry.service.spec.clone().unwrap_or_default();
                let ports = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|port| PortStatus {
                        name: port.name.clone().unwrap_or_default(),
                        protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        port: port.port,
                        target_port: port
                            .target_port
                            .clone()
                            .unwrap_or(IntOrString::Int(port.port)),
                        node_port: port.node_port,
                    })
                    .collect();
                let backends = self
                    .slices
                    .iter()
                    .chain(&self.remote_slices)
                    .filter(|slice| {
                        slice.metadata.namespace.as_deref() == Some(&namespace)
                            && slice
                                .metadata
                                .labels
                                .as_ref()
                                .and_then(|labels| labels.get(slices::SERVICE_NAME_LABEL))
                                == Some(&name)
                    })
                    .flat_map(|slice| backends(slice, cluster))
                    .collect();
                ServiceStatus {
                    namespace,
                    name,
                    kind: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    cluster_ip: spec.cluster_ip,
                    global: entry.scope.is_global(),
                    shared: entry.scope.is_shared(),
                    ports,
                    backends,
                }
            })
            .collect()
    }
}

/// One address and port behind a Service port, per endpoint and slice port.
fn backends(slice: &EndpointSlice, local_cluster: &str) -> Vec<Backend> {
    let cluster = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(global::CLUSTER_LABEL))
        .map_or(local_cluster, String::as_str);
    let mut backends = Vec::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let target = endpoint.target_ref.clone().unwrap_or_default();
        for port in slice.ports.iter().flatten() {
            for ip in &endpoint.addresses {
                backends.push(Backend {
                    ip: ip.clone(),
                    port: port.port.unwrap_or_default(),
                    port_name: port.name.clone().unwrap_or_default(),
                    protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    pod: target.name.clone().unwrap_or_default(),
                    node: endpoint.node_name.clone().unwrap_or_default(),
                    cluster: cluster.to_owned(),
                    ready: conditions.ready.unwrap_or(false),
                    serving: conditions.serving.unwrap_or(false),
                    terminating: conditions.terminating.unwrap_or(false),
                });
            }
        }
    }
    backends
}

/// A Service as `weftctl sandbox status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    pub global: bool,
    pub shared: bool,
    pub ports: Vec<PortStatus>,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    /// As the Service says it (a number or a pod's port name); its backends resolve it.
    pub target_port: IntOrString,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub ip: String,
    pub port: i32,
    /// The Service port it backs.
    pub port_name: String,
    pub protocol: String,
    pub pod: String,
    pub node: String,
    pub cluster: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[cfg(test)]
pub(crate) mod fixtures {
    use std::sync::atomic::{AtomicU8, Ordering};

    use crate::manifests::PodPort;
    use crate::PodState;

    /// A running pod with TCP ports named as given; each gets its own address.
    pub fn pod(
        cluster: &str,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u16)],
    ) -> PodState {
        static NEXT: AtomicU8 = AtomicU8::new(2);
        PodState {
            cluster: cluster.into(),
            namespace: namespace.into(),
            name: name.into(),
            node: format!("{cluster}-1"),
            netns: String::new(),
            ip: std::net::Ipv4Addr::new(10, 1, 1, NEXT.fetch_add(1, Ordering::Relaxed)),
            container_id: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ports: ports
                .iter()
                .map(|(name, port)| PodPort {
                    port: *port,
                    protocol: "TCP".into(),
                    name: Some((*name).to_owned()),
                    host_port: None,
                    host_ip: None,
                })
                .collect(),
            server_pid: 0,
            cgroup: None,
            identity: 0,
            terminating: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::pod;
    use super::*;
    use serde_json::json;

    fn service(name: &str, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        })
    }

    fn names(slices: &[EndpointSlice]) -> Vec<String> {
        slices
            .iter()
            .filter_map(|slice| slice.metadata.name.clone())
            .collect()
    }

    #[test]
    fn global_services_take_the_slices_other_clusters_share() {
        let global = json!({"weft.io/global": "true"});
        let east_objects = vec![
            service("model", global.clone()),
            service("cache", global.clone()),
            service("local", json!({})),
        ];
        let west_objects = vec![
            // Shared by its GlobalService.
            service("model", json!({})),
            json!({"apiVersion": "weft.io/v1alpha1", "kind": "GlobalService",
                   "metadata": {"name": "model", "namespace": "ml"}, "spec": {"serviceName": "model"}}),
            // Global but kept private.
            service(
                "cache",
                json!({"weft.io/global": "true", "weft.io/shared": "false"}),
            ),
            // Not global in west: west keeps it.
            service("local", json!({})),
        ];
        let pods = [
            pod(
                "east",
                "ml",
                "model-e",
                &[("app", "model")],
                &[("http", 8080)],
            ),
            pod(
                "west",
                "ml",
                "model-w",
                &[("app", "model")],
                &[("http", 8000)],
            ),
            pod(
                "west",
                "ml",
                "cache-w",
                &[("app", "cache")],
                &[("http", 8000)],
            ),
            pod(
                "west",
                "ml",
                "local-w",
                &[("app", "local")],
                &[("http", 8000)],
            ),
        ];
        let input = |name: &'static str, id, objects| ClusterInput {
            name,
            id,
            objects,
            pods: pods.iter().filter(|p| p.cluster == name).collect(),
        };
        let all = compute(&[
            input("east", 1, &east_objects),
            input("west", 2, &west_objects),
        ]);
        let east = &all["east"];
        assert_eq!(
            names(&east.slices),
            vec!["model-weft", "cache-weft", "local-weft"]
        );
        // Only west's model is both global and shared.
        assert_eq!(names(&east.remote_slices), vec!["model-west"]);
        let remote = serde_json::to_value(&east.remote_slices[0]).expect("json");
        assert_eq!(
            remote["metadata"]["labels"],
            json!({
                "kubernetes.io/service-name": "model",
                "endpointslice.kubernetes.io/managed-by": "sandbox.weft.io",
                "weft.io/cluster": "west",
                "weft.io/cluster-id": "2"
            })
        );
        assert_eq!(
            remote["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 8000}])
        );
        // West's cache is global, so it still takes east's shared backends.
        let west = &all["west"];
        assert_eq!(names(&west.remote_slices), vec!["model-east", "cache-east"]);

        // The file: Services, then the GlobalService, then local and remote slices.
        let kinds: Vec<String> = east
            .agent_objects()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "Service/model",
                "Service/cache",
                "Service/local",
                "EndpointSlice/model-weft",
                "EndpointSlice/cache-weft",
                "EndpointSlice/local-weft",
                "EndpointSlice/model-west"
            ]
        );

        // Status: east's model is backed by its own pod and west's.
        let status = east.status("east");
        let model = &status[0];
        assert_eq!((model.global, model.shared), (true, true));
        let backends: Vec<(String, i32, String, String)> = model
            .backends
            .iter()
            .map(|b| (b.pod.clone(), b.port, b.node.clone(), b.cluster.clone()))
            .collect();
        assert_eq!(
            backends,
            vec![
                ("model-e".into(), 8080, "east-1".into(), "east".into()),
                ("model-w".into(), 8000, "west-1".into(), "west".into()),
            ]
        );
        let json = serde_json::to_value(model).expect("json");
        assert_eq!(json["type"], "ClusterIP");
        assert_eq!(json["clusterIP"], "10.96.0.10");
        assert_eq!(
            json["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http", "nodePort": null}])
        );
    }
}
