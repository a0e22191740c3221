//! EndpointSlices, computed as Kubernetes' EndpointSlice controller computes them: the pods of
//! the Service's namespace its selector matches, each port's `targetPort` resolved per pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ObjectReference, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::PodState;

/// Names the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Who computed the slices: the sandbox, standing in for the controller.
pub const MANAGED_BY: &str = "sandbox.weft.io";

/// A Service port as one pod serves it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ResolvedPort {
    name: String,
    protocol: String,
    port: u16,
    app_protocol: Option<String>,
}

/// The slices of a Service, named `<service>-weft` (then `-weft-2`, … when pods resolve a
/// named `targetPort` differently: one slice per distinct port mapping, as the controller
/// makes). A Service without a selector (or with an empty one) or of type ExternalName has
/// none: its endpoints are someone else's business. `pods` may hold pods of any namespace.
pub fn endpoint_slices(service: &Service, pods: &[&PodState]) -> Vec<EndpointSlice> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut selected: Vec<&PodState> = pods
        .iter()
        .copied()
        .filter(|pod| pod.namespace == namespace)
        .filter(|pod| {
            selector
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
        })
        .collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    let mut by_ports: BTreeMap<Vec<ResolvedPort>, Vec<Endpoint>> = BTreeMap::new();
    for pod in selected {
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|port| resolve(port, pod))
            .collect();
        by_ports
            .entry(ports)
            .or_default()
            .push(endpoint(pod, publish_not_ready));
    }
    if by_ports.is_empty() {
        // The controller keeps a placeholder slice for a Service no pod backs.
        by_ports.insert(Vec::new(), Vec::new());
    }
    by_ports
        .into_iter()
        .enumerate()
        .map(|(index, (ports, endpoints))| {
            let slice_name = match index {
                0 => format!("{name}-weft"),
                n => format!("{name}-weft-{}", n + 1),
            };
            slice(&namespace, &name, slice_name, ports, endpoints)
        })
        .collect()
}

/// What a pod serves a Service port on: `targetPort` as a number (the Service port when
/// unset), or the pod's container port of that name and protocol — `None` when it has none,
/// and then the pod is no endpoint for that port.
fn resolve(port: &ServicePort, pod: &PodState) -> Option<ResolvedPort> {
    let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
    let number = match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(number)) => u16::try_from(*number).ok(),
        Some(IntOrString::String(name)) => pod
            .ports
            .iter()
            .find(|own| own.name.as_deref() == Some(name.as_str()) && own.protocol == protocol)
            .map(|own| own.port),
    }
    .filter(|number| *number != 0)?;
    Some(ResolvedPort {
        name: port.name.clone().unwrap_or_default(),
        protocol,
        port: number,
        app_protocol: port.app_protocol.clone(),
    })
}

fn endpoint(pod: &PodState, publish_not_ready: bool) -> Endpoint {
    // Sandbox pods are ready once their server listens; a terminating pod still serves the
    // connections it has, but takes no new ones (unless the Service publishes not-ready ones).
    let serving = true;
    Endpoint {
        addresses: vec![pod.ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(publish_not_ready || (serving && !pod.terminating)),
            serving: Some(serving),
            terminating: Some(pod.terminating),
        }),
        node_name: Some(pod.node.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

fn slice(
    namespace: &str,
    service: &str,
    name: String,
    ports: Vec<ResolvedPort>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), service.to_owned()),
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        ports: Some(
            ports
                .into_iter()
                .map(|port| EndpointPort {
                    name: Some(port.name),
                    protocol: Some(port.protocol),
                    port: Some(i32::from(port.port)),
                    app_protocol: port.app_protocol,
                })
                .collect(),
        ),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u16)],
    ) -> PodState {
        crate::services::fixtures::pod("east", namespace, name, labels, ports)
    }

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("a Service")
    }

    /// A slice's name, ports (name, number) and pods.
    type Summary = (String, Vec<(String, i32)>, Vec<String>);

    fn summary(slices: &[EndpointSlice]) -> Vec<Summary> {
        slices
            .iter()
            .map(|slice| {
                (
                    slice.metadata.name.clone().unwrap_or_default(),
                    slice
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| {
                            (
                                p.name.clone().unwrap_or_default(),
                                p.port.unwrap_or_default(),
                            )
                        })
                        .collect(),
                    slice
                        .endpoints
                        .iter()
                        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_selector_picks_pods_of_the_services_namespace_with_every_label() {
        let pods = [
            pod("shop", "web-1", &[("app", "web"), ("tier", "front")], &[]),
            pod("shop", "web-2", &[("app", "web")], &[]),
            pod("shop", "db", &[("app", "db"), ("tier", "front")], &[]),
            pod("other", "web-3", &[("app", "web"), ("tier", "front")], &[]),
        ];
        let refs: Vec<&PodState> = pods.iter().collect();
        let web = service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web", "tier": "front"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }));
        let slices = endpoint_slices(&web, &refs);
        assert_eq!(
            summary(&slices),
            vec![(
                "web-weft".into(),
                vec![(String::new(), 8080)],
                vec!["web-1".into()]
            )]
        );
        let slice = serde_json::to_value(&slices[0]).expect("json");
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(
            slice["metadata"]["labels"],
            json!({"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "sandbox.weft.io"})
        );
        assert_eq!(
            slice["endpoints"][0],
            json!({
                "addresses": [pods[0].ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "east-1",
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}
            })
        );

        // No selector: no slices (endpoints managed by hand); no pod: one empty placeholder.
        let manual =
            service(json!({"metadata": {"name": "ext"}, "spec": {"ports": [{"port": 80}]}}));
        assert!(endpoint_slices(&manual, &refs).is_empty());
        let nobody =
            service(json!({"metadata": {"name": "x"}, "spec": {"selector": {"app": "none"}}}));
        assert_eq!(
            summary(&endpoint_slices(&nobody, &refs)),
            vec![("x-weft".into(), vec![], vec![])]
        );
    }

    #[test]
    fn a_named_target_port_is_resolved_per_pod_and_pods_without_it_are_left_out_for_that_port() {
        let pods = [
            pod(
                "default",
                "a",
                &[("app", "m")],
                &[("http", 8080), ("metrics", 9090)],
            ),
            pod(
                "default",
                "b",
                &[("app", "m")],
                &[("http", 8000), ("metrics", 9090)],
            ),
            pod("default", "c", &[("app", "m")], &[("metrics", 9090)]),
            pod(
                "default",
                "d",
                &[("app", "m")],
                &[("http", 8080), ("metrics", 9090)],
            ),
        ];
        let refs: Vec<&PodState> = pods.iter().collect();
        let model = service(json!({
            "metadata": {"name": "model"},
            "spec": {"selector": {"app": "m"}, "ports": [
                {"name": "web", "port": 80, "targetPort": "http"},
                {"name": "metrics", "port": 9090}
            ]}
        }));
        assert_eq!(
            summary(&endpoint_slices(&model, &refs)),
            vec![
                // c has no port named http: it backs only the metrics port.
                (
                    "model-weft".into(),
                    vec![("metrics".into(), 9090)],
                    vec!["c".into()]
                ),
                (
                    "model-weft-2".into(),
                    vec![("web".into(), 8000), ("metrics".into(), 9090)],
                    vec!["b".into()]
                ),
                (
                    "model-weft-3".into(),
                    vec![("web".into(), 8080), ("metrics".into(), 9090)],
                    vec!["a".into(), "d".into()]
                ),
            ]
        );
        // The name must match with the protocol too.
        let udp = service(json!({
            "metadata": {"name": "u"},
            "spec": {"selector": {"app": "m"}, "ports": [{"port": 53, "protocol": "UDP", "targetPort": "http"}]}
        }));
        let slices = endpoint_slices(&udp, &refs);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].ports, Some(vec![]));
        assert_eq!(slices[0].endpoints.len(), 4);
    }

    #[test]
    fn a_terminating_pod_serves_but_is_not_ready() {
        let mut draining = pod("default", "old", &[("app", "m")], &[]);
        draining.terminating = true;
        let fresh = pod("default", "new", &[("app", "m")], &[]);
        let refs = [&draining, &fresh];
        let spec = json!({"selector": {"app": "m"}, "ports": [{"port": 80}]});
        let conditions = |publish: bool| -> Vec<(String, EndpointConditions)> {
            let mut spec = spec.clone();
            spec["publishNotReadyAddresses"] = publish.into();
            let svc = service(json!({"metadata": {"name": "m"}, "spec": spec}));
            endpoint_slices(&svc, &refs)[0]
                .endpoints
                .iter()
                .map(|e| {
                    (
                        e.target_ref
                            .as_ref()
                            .and_then(|r| r.name.clone())
                            .unwrap_or_default(),
                        e.conditions.clone().unwrap_or_default(),
                    )
                })
                .collect()
        };
        let state = |ready, terminating| EndpointConditions {
            ready: Some(ready),
            serving: Some(true),
            terminating: Some(terminating),
        };
        assert_eq!(
            conditions(false),
            vec![
                ("new".into(), state(true, false)),
                ("old".into(), state(false, true))
            ]
        );
        assert_eq!(
            conditions(true),
            vec![
                ("new".into(), state(true, false)),
                ("old".into(), state(true, true))
            ]
        );
    }
}
