//! Converts Kubernetes Services, their EndpointSlices and Weft GlobalServices into Weft's
//! service model ([`weft_core::service`]), the way kube-proxy and Cilium read them: IPv4
//! frontends only, backends from EndpointSlice conditions, cluster-mesh settings from a
//! GlobalService or from Weft's and Cilium's annotations.
//!
//! What the API server would have refused (a malformed address, a port out of range) and
//! what Weft cannot balance (SCTP) is an error naming the object and field, so the sandbox
//! and the agent can report it instead of half-applying the service.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_core::cluster::ClusterId;
use weft_core::service::{
    self as model, Affinity, Backend, BackendCondition, GlobalSettings, Protocol,
};

use crate::global_service::{self, GlobalService};

/// Marks a service global, in order of precedence: Weft's, Cilium's, Cilium's older spelling.
pub const GLOBAL_ANNOTATIONS: [&str; 3] = [
    "weft.io/global",
    "service.cilium.io/global",
    "io.cilium/global-service",
];
/// Whether a global service's local backends are offered to other clusters.
pub const SHARED_ANNOTATIONS: [&str; 3] = [
    "weft.io/shared",
    "service.cilium.io/shared",
    "io.cilium/shared-service",
];
/// Which backends a global service prefers: `local`, `remote` or `none`.
pub const AFFINITY_ANNOTATIONS: [&str; 3] = [
    "weft.io/affinity",
    "service.cilium.io/affinity",
    "io.cilium/service-affinity",
];
/// On an EndpointSlice: the cluster whose backends it carries. The mesh mirrors remote
/// clusters' endpoints into slices labelled with it; unlabelled slices are this cluster's.
pub const CLUSTER_ID_LABEL: &str = "weft.io/cluster-id";
/// The EndpointSlice controller names a slice's Service with this label.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// Kubernetes' upper bound for the same field (1 day).
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// Why an object could not be turned into (part of) a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ServiceError {
    /// Kind and `namespace/name`, e.g. `Service shop/web`.
    pub object: String,
    /// The offending field's path, e.g. `spec.ports[1].protocol`.
    pub field: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

fn error(object: &str, field: impl Into<String>, message: impl Into<String>) -> ServiceError {
    ServiceError {
        object: object.to_owned(),
        field: field.into(),
        message: message.into(),
    }
}

/// `Kind namespace/name`; objects from files may leave the namespace out, meaning `default`.
fn describe(kind: &str, metadata: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or("")
    )
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

/// The first of `keys` present, in precedence order. Lower-precedence aliases are not read, so
/// a stale Cilium annotation cannot break a service that also carries Weft's.
fn first_annotation<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    keys.iter()
        .find_map(|&key| annotations.get(key).map(|value| (key, value.as_str())))
}

fn bool_annotation(
    annotations: &BTreeMap<String, String>,
    keys: &[&'static str],
    object: &str,
) -> Result<Option<bool>, ServiceError> {
    let Some((key, value)) = first_annotation(annotations, keys) else {
        return Ok(None);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        _ => Err(error(
            object,
            annotation_field(key),
            format!("{value:?} is not a boolean: use \"true\" or \"false\""),
        )),
    }
}

/// Global-service settings: a GlobalService naming the Service wins over annotations;
/// `weft.io/global`, `weft.io/shared`, `weft.io/affinity` win over Cilium's aliases
/// `service.cilium.io/global|shared|affinity` (also accept the older `io.cilium/global-service`,
/// `io.cilium/shared-service`, `io.cilium/service-affinity`). Booleans "true"/"false"
/// (case-insensitive); anything else is an error naming the annotation.
///
/// Affinity is `local`, `remote` or `none` (case-insensitive). Unset, a service is not global,
/// is shared and has no affinity. `object` names the Service in errors (`Service ns/name`).
pub fn global_settings(
    annotations: &BTreeMap<String, String>,
    global: Option<&GlobalService>,
    object: &str,
) -> Result<GlobalSettings, ServiceError> {
    if let Some(global) = global {
        return Ok(GlobalSettings {
            global: true,
            shared: global.spec.shared,
            affinity: match global.spec.affinity {
                global_service::Affinity::Local => Affinity::Local,
                global_service::Affinity::Remote => Affinity::Remote,
                global_service::Affinity::None => Affinity::None,
            },
        });
    }
    let defaults = GlobalSettings::default();
    let affinity = match first_annotation(annotations, &AFFINITY_ANNOTATIONS) {
        None => defaults.affinity,
        Some((key, value)) => match value.trim().to_ascii_lowercase().as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            "none" => Affinity::None,
            _ => {
                return Err(error(
                    object,
                    annotation_field(key),
                    format!("{value:?} is not an affinity: use \"local\", \"remote\" or \"none\""),
                ))
            }
        },
    };
    Ok(GlobalSettings {
        global: bool_annotation(annotations, &GLOBAL_ANNOTATIONS, object)?
            .unwrap_or(defaults.global),
        shared: bool_annotation(annotations, &SHARED_ANNOTATIONS, object)?
            .unwrap_or(defaults.shared),
        affinity,
    })
}

/// An address list's IPv4 members, each once. IPv6 members are skipped: Weft balances IPv4
/// only, and a dual-stack service still works over its IPv4 half.
fn ipv4_addresses<'a>(
    values: impl IntoIterator<Item = (String, &'a str)>,
    object: &str,
    into: &mut Vec<Ipv4Addr>,
) -> Result<(), ServiceError> {
    for (field, value) in values {
        match value.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(address)) => {
                if !into.contains(&address) {
                    into.push(address);
                }
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(error(
                    object,
                    field,
                    format!("{value:?} is not an IP address"),
                ))
            }
        }
    }
    Ok(())
}

fn port_number(value: i32, object: &str, field: String) -> Result<u16, ServiceError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(error(
            object,
            field,
            format!("{value} is not a port: use 1 to 65535"),
        )),
    }
}

fn protocol(value: Option<&str>, object: &str, field: String) -> Result<Protocol, ServiceError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(error(object, field, "SCTP is not supported")),
        other => Err(error(
            object,
            field,
            format!("{other:?} is not a protocol: use TCP or UDP"),
        )),
    }
}

/// What Weft uses of an IPv4 EndpointSlice.
struct SliceBackends {
    /// Named ports: (name, `""` when unnamed; protocol as spelled; port).
    ports: Vec<(String, String, u16)>,
    /// Each endpoint as a backend with port 0, filled in per service port.
    endpoints: Vec<Backend>,
}

/// Reads an EndpointSlice; `Ok(None)` for slices of another address family.
fn read_slice(
    slice: &EndpointSlice,
    local_cluster: u16,
) -> Result<Option<SliceBackends>, ServiceError> {
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let object = describe("EndpointSlice", &slice.metadata);
    let cluster_id = match slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(CLUSTER_ID_LABEL))
    {
        None => local_cluster,
        Some(value) => value
            .parse::<ClusterId>()
            .map_err(|e| {
                error(
                    &object,
                    format!("metadata.labels[{CLUSTER_ID_LABEL}]"),
                    e.to_string(),
                )
            })?
            .get(),
    };

    let mut ports = Vec::new();
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        // A slice port without a number means "all ports", which only headless services use.
        let Some(number) = port.port else { continue };
        ports.push((
            port.name.clone().unwrap_or_default(),
            port.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port_number(number, &object, format!("ports[{index}].port"))?,
        ));
    }

    let slice_namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let mut endpoints = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{index}].addresses");
        let Some(first) = endpoint.addresses.first() else {
            return Err(error(&object, field, "the endpoint has no address"));
        };
        let address = first.trim().parse::<Ipv4Addr>().map_err(|_| {
            error(
                &object,
                format!("{field}[0]"),
                format!("{first:?} is not an IPv4 address (the slice's addressType is IPv4)"),
            )
        })?;
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        let condition = if ready {
            BackendCondition::Ready
        } else if serving && terminating {
            BackendCondition::Terminating
        } else {
            BackendCondition::NotServing
        };
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| {
                let name = target.name.as_deref()?;
                let namespace = target.namespace.as_deref().unwrap_or(slice_namespace);
                Some(format!("{namespace}/{name}"))
            });
        endpoints.push(Backend {
            address,
            port: 0,
            cluster_id,
            condition,
            node: endpoint.node_name.clone(),
            pod,
        });
    }
    Ok(Some(SliceBackends { ports, endpoints }))
}

/// Backends of one service port: from every slice, the endpoints at the slice port with the
/// same name and protocol.
fn port_backends(slices: &[SliceBackends], name: &str, protocol: Protocol) -> Vec<Backend> {
    let mut backends = Vec::new();
    for slice in slices {
        for (port_name, port_protocol, number) in &slice.ports {
            if port_name == name && port_protocol == protocol.name() {
                backends.extend(slice.endpoints.iter().map(|endpoint| Backend {
                    port: *number,
                    ..endpoint.clone()
                }));
            }
        }
    }
    model::dedup_backends(backends)
}

/// Ok(None) for services Weft does not balance: type ExternalName, headless (clusterIP
/// "None"), or no IPv4 frontend at all.
///
/// `slices` are the Service's EndpointSlices (label `kubernetes.io/service-name`); slices of
/// another address family are skipped, and a slice that cannot be read is an error naming the
/// slice. `global` is the GlobalService naming this Service, if any. Backends of each port are
/// sorted by address, port and cluster, each once.
pub fn service_model(
    service: &Service,
    slices: &[&EndpointSlice],
    global: Option<&GlobalService>,
    local_cluster: u16,
) -> Result<Option<model::Service>, ServiceError> {
    let object = describe("Service", &service.metadata);
    let default_spec = ServiceSpec::default();
    let spec = service.spec.as_ref().unwrap_or(&default_spec);

    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (node_ports, load_balancer) = match kind {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => return Ok(None),
        other => {
            return Err(error(
                &object,
                "spec.type",
                format!("{other:?} is not a Service type: use ClusterIP, NodePort, LoadBalancer or ExternalName"),
            ))
        }
    };

    let (raw_cluster_ips, cluster_ip_field): (Vec<&str>, fn(usize) -> String) =
        match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => (ips.iter().map(String::as_str).collect(), |index| {
                format!("spec.clusterIPs[{index}]")
            }),
            _ => (spec.cluster_ip.as_deref().into_iter().collect(), |_| {
                "spec.clusterIP".to_owned()
            }),
        };
    if raw_cluster_ips.first().map(|ip| ip.trim()) == Some("None") {
        return Ok(None);
    }
    // An empty clusterIP asks the API server to allocate one; in a file, it is just unset.
    let raw_cluster_ips: Vec<(usize, &str)> = raw_cluster_ips
        .into_iter()
        .enumerate()
        .filter(|(_, ip)| !ip.trim().is_empty())
        .collect();
    let mut cluster_ips = Vec::new();
    ipv4_addresses(
        raw_cluster_ips
            .iter()
            .map(|&(index, ip)| (cluster_ip_field(index), ip)),
        &object,
        &mut cluster_ips,
    )?;

    let mut external_ips = Vec::new();
    ipv4_addresses(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(index, ip)| (format!("spec.externalIPs[{index}]"), ip.as_str())),
        &object,
        &mut external_ips,
    )?;

    // Only a LoadBalancer service has load-balancer addresses: status left over from an
    // earlier type must not keep attracting traffic.
    let mut load_balancer_ips = Vec::new();
    if load_balancer {
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        ipv4_addresses(
            ingress
                .into_iter()
                .flatten()
                .enumerate()
                // With ipMode Proxy the load balancer proxies to node ports itself; answering
                // its address in the node would bypass it (as kube-proxy does, KEP-1860).
                .filter(|(_, ingress)| ingress.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|(index, ingress)| {
                    let ip = ingress.ip.as_deref()?;
                    Some((format!("status.loadBalancer.ingress[{index}].ip"), ip))
                }),
            &object,
            &mut load_balancer_ips,
        )?;
        ipv4_addresses(
            spec.load_balancer_ip
                .as_deref()
                .filter(|ip| !ip.trim().is_empty())
                .map(|ip| ("spec.loadBalancerIP".to_owned(), ip)),
            &object,
            &mut load_balancer_ips,
        )?;
    }

    // Node ports answer on the nodes' addresses, so they need an IPv4 service, not one that
    // is IPv6 only by its families or its cluster IPs.
    let ipv4_service = match spec.ip_families.as_deref() {
        Some(families) if !families.is_empty() => families.iter().any(|f| f == "IPv4"),
        _ => raw_cluster_ips.is_empty() || !cluster_ips.is_empty(),
    };
    let node_ports = node_ports && ipv4_service;

    let mut read = Vec::new();
    for slice in slices {
        if let Some(backends) = read_slice(slice, local_cluster)? {
            read.push(backends);
        }
    }

    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{index}]");
        let protocol = protocol(
            port.protocol.as_deref(),
            &object,
            format!("{field}.protocol"),
        )?;
        let number = port_number(port.port, &object, format!("{field}.port"))?;
        let node_port = match port.node_port {
            Some(node_port) if node_ports && node_port != 0 => Some(port_number(
                node_port,
                &object,
                format!("{field}.nodePort"),
            )?),
            _ => None,
        };
        let name = port.name.clone().unwrap_or_default();
        ports.push(model::ServicePort {
            backends: port_backends(&read, &name, protocol),
            name,
            protocol,
            port: number,
            node_port,
        });
    }

    let has_frontend = !cluster_ips.is_empty()
        || !external_ips.is_empty()
        || !load_balancer_ips.is_empty()
        || ports.iter().any(|port| port.node_port.is_some());
    if !has_frontend {
        return Ok(None);
    }

    let session_affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
            if !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&seconds) {
                return Err(error(
                    &object,
                    field,
                    format!("{seconds} is out of range: use 1 to {MAX_AFFINITY_TIMEOUT_SECONDS} seconds"),
                ));
            }
            Some(Duration::from_secs(seconds.unsigned_abs().into()))
        }
        Some(other) => {
            return Err(error(
                &object,
                "spec.sessionAffinity",
                format!("{other:?} is not a session affinity: use None or ClientIP"),
            ))
        }
    };

    let traffic_policy = |value: Option<&str>, field: &str| match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(error(
            &object,
            field,
            format!("{other:?} is not a traffic policy: use Cluster or Local"),
        )),
    };
    let external_traffic_local = traffic_policy(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_traffic_local = traffic_policy(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;
    // Served only where the API server allocates it: a LoadBalancer with a Local policy.
    let health_check_node_port =
        match spec.health_check_node_port {
            Some(port) if load_balancer && external_traffic_local && port != 0 => Some(
                port_number(port, &object, "spec.healthCheckNodePort".to_owned())?,
            ),
            _ => None,
        };

    let empty = BTreeMap::new();
    let annotations = service.metadata.annotations.as_ref().unwrap_or(&empty);
    Ok(Some(model::Service {
        namespace: service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: service.metadata.name.clone().unwrap_or_default(),
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        session_affinity_timeout,
        global: global_settings(annotations, global, &object)?,
        external_traffic_local,
        internal_traffic_local,
        health_check_node_port,
    }))
}

/// A decoded object of a kind this module uses.
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Global(Box<GlobalService>),
}

/// Lists (`kubectl get -o yaml` gives `kind: List`, the API `ServiceList` and friends) are
/// opened; items of a typed list may omit their kind, so they inherit it from the list's.
fn flatten<'a>(
    value: &'a serde_json::Value,
    inherited: Option<&str>,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) {
    let kind = value
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .or(inherited)
        .unwrap_or("");
    if let (Some(items), Some(item_kind)) = (
        value.get("items").and_then(serde_json::Value::as_array),
        kind.strip_suffix("List"),
    ) {
        let item_kind = (!item_kind.is_empty()).then_some(item_kind);
        for item in items {
            flatten(item, item_kind, out);
        }
        return;
    }
    out.push((kind.to_owned(), value));
}

/// Decodes one object; `None` for kinds (or API groups: Knative has a `Service` too) this
/// module does not use.
fn decode(kind: &str, value: &serde_json::Value) -> Option<Result<Object, ServiceError>> {
    let api_version = value.get("apiVersion").and_then(serde_json::Value::as_str);
    let expected = match kind {
        "Service" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "GlobalService" => "weft.io/v1alpha1",
        _ => return None,
    };
    if api_version.is_some_and(|version| version != expected) {
        return None;
    }
    let failed = |e: serde_json::Error| {
        let metadata = value
            .get("metadata")
            .cloned()
            .and_then(|m| serde_json::from_value::<ObjectMeta>(m).ok())
            .unwrap_or_default();
        error(
            &describe(kind, &metadata),
            "(object)",
            format!("is not a valid {expected} {kind}: {e}"),
        )
    };
    let value = value.clone();
    Some(match kind {
        "Service" => serde_json::from_value(value)
            .map(|o| Object::Service(Box::new(o)))
            .map_err(failed),
        "EndpointSlice" => serde_json::from_value(value)
            .map(|o| Object::Slice(Box::new(o)))
            .map_err(failed),
        _ => serde_json::from_value(value)
            .map(|o| Object::Global(Box::new(o)))
            .map_err(failed),
    })
}

fn namespace_of(metadata: &ObjectMeta) -> String {
    metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// Everything from a list of objects of mixed kinds (Service, EndpointSlice, GlobalService;
/// others ignored) as JSON values, the way the sandbox's service file and the Kubernetes
/// watches deliver them. Slices join their Service by namespace + label
/// `kubernetes.io/service-name`; a GlobalService joins by namespace + spec.serviceName.
/// Returns the services and, for each object that could not be used, its error (one bad object
/// never hides the others).
///
/// A slice that cannot be read is left out (its Service keeps the other slices' backends); of
/// two GlobalServices naming one Service, or two Services of one name, the first by name /
/// position is used and the other reported. Services come sorted by namespace and name.
pub fn services_from_objects(
    objects: &[serde_json::Value],
    local_cluster: u16,
) -> (Vec<model::Service>, Vec<ServiceError>) {
    let mut errors = Vec::new();
    let mut flat = Vec::new();
    for object in objects {
        flatten(object, None, &mut flat);
    }

    let mut services: BTreeMap<(String, String), Service> = BTreeMap::new();
    let mut slices: BTreeMap<(String, String), Vec<EndpointSlice>> = BTreeMap::new();
    let mut globals: Vec<GlobalService> = Vec::new();
    for (kind, value) in flat {
        match decode(&kind, value) {
            None => {}
            Some(Err(e)) => errors.push(e),
            Some(Ok(Object::Service(service))) => {
                let key = (
                    namespace_of(&service.metadata),
                    service.metadata.name.clone().unwrap_or_default(),
                );
                match services.entry(key) {
                    Entry::Occupied(_) => errors.push(error(
                        &describe("Service", &service.metadata),
                        "metadata.name",
                        "appears more than once; the first is used",
                    )),
                    Entry::Vacant(slot) => {
                        slot.insert(*service);
                    }
                }
            }
            Some(Ok(Object::Slice(slice))) => {
                let Some(service_name) = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
                    .cloned()
                else {
                    continue;
                };
                if let Err(e) = read_slice(&slice, local_cluster) {
                    errors.push(e);
                    continue;
                }
                slices
                    .entry((namespace_of(&slice.metadata), service_name))
                    .or_default()
                    .push(*slice);
            }
            Some(Ok(Object::Global(global))) => globals.push(*global),
        }
    }

    globals.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut global_of: BTreeMap<(String, String), GlobalService> = BTreeMap::new();
    for global in globals {
        let key = (
            namespace_of(&global.metadata),
            global.spec.service_name.clone(),
        );
        if let Some(first) = global_of.get(&key) {
            errors.push(error(
                &describe("GlobalService", &global.metadata),
                "spec.serviceName",
                format!(
                    "GlobalService {} already names Service {}; this one is ignored",
                    first.metadata.name.as_deref().unwrap_or(""),
                    key.1
                ),
            ));
        } else {
            global_of.insert(key, global);
        }
    }

    let no_slices = Vec::new();
    let mut models = Vec::new();
    for (key, service) in &services {
        let own: Vec<&EndpointSlice> = slices.get(key).unwrap_or(&no_slices).iter().collect();
        match service_model(service, &own, global_of.get(key), local_cluster) {
            Ok(Some(model)) => models.push(model),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    (models, errors)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use super::*;

    const LOCAL: u16 = 1;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_saphyr::from_str(text).expect("test YAML")
    }

    fn service(text: &str) -> Service {
        yaml(text)
    }

    fn model(text: &str) -> model::Service {
        service_model(&service(text), &[], None, LOCAL)
            .expect("valid service")
            .expect("balanced service")
    }

    fn model_error(text: &str) -> ServiceError {
        service_model(&service(text), &[], None, LOCAL).expect_err("invalid service")
    }

    fn ips(list: &[&str]) -> Vec<Ipv4Addr> {
        list.iter().map(|ip| ip.parse().expect("test IP")).collect()
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.12.7
  clusterIPs: [10.96.12.7, "fd00:10:96::c"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [192.0.2.10, "2001:db8::10"]
  loadBalancerIP: 203.0.113.9
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.5}
    - {hostname: web.elb.example.com}
    - {ip: 203.0.113.6, ipMode: Proxy}
    - {ip: "2001:db8::5"}
"#;

    #[test]
    fn a_dual_stack_load_balancer_service_gives_its_ipv4_frontends() {
        let web = model(WEB);
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
        assert_eq!(web.cluster_ips, ips(&["10.96.12.7"]));
        assert_eq!(web.external_ips, ips(&["192.0.2.10"]));
        assert_eq!(web.load_balancer_ips, ips(&["203.0.113.5", "203.0.113.9"]));
        let ports: Vec<(&str, Protocol, u16, Option<u16>)> = web
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port, p.node_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", Protocol::Tcp, 80, Some(30080)),
                ("dns", Protocol::Udp, 53, Some(30053)),
            ]
        );
        assert_eq!(web.session_affinity_timeout, None);
        assert_eq!(web.global, GlobalSettings::default());
    }

    #[test]
    fn cluster_ip_alone_is_used_when_cluster_ips_is_absent() {
        let svc = model(
            "metadata: {name: api, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 443}]}\n",
        );
        assert_eq!(svc.cluster_ips, ips(&["10.96.0.1"]));
        assert_eq!(svc.ports[0].name, "");
        assert_eq!(svc.ports[0].protocol, Protocol::Tcp);
        assert_eq!(svc.ports[0].node_port, None);
    }

    #[test]
    fn node_ports_only_for_node_port_and_load_balancer_services() {
        let cluster_ip = model(
            "metadata: {name: a, namespace: d}\nspec: {type: ClusterIP, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30001}]}\n",
        );
        assert_eq!(cluster_ip.ports[0].node_port, None);
        let node_port = model(
            "metadata: {name: a, namespace: d}\nspec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30001}]}\n",
        );
        assert_eq!(node_port.ports[0].node_port, Some(30001));
        // allocateLoadBalancerNodePorts: false leaves nodePort unset.
        let lb = model(
            "metadata: {name: a, namespace: d}\nspec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, clusterIP: 10.96.0.2, ports: [{port: 80}]}\n",
        );
        assert_eq!(lb.ports[0].node_port, None);
    }

    #[test]
    fn load_balancer_addresses_count_only_for_type_load_balancer() {
        let changed = model(
            "metadata: {name: a, namespace: d}\nspec: {type: ClusterIP, clusterIP: 10.96.0.3, loadBalancerIP: 203.0.113.1, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.2}]}}\n",
        );
        assert!(changed.load_balancer_ips.is_empty());
    }

    #[test]
    fn services_weft_does_not_balance_are_none() {
        for text in [
            "metadata: {name: ext, namespace: d}\nspec: {type: ExternalName, externalName: db.example.com}\n",
            "metadata: {name: headless, namespace: d}\nspec: {clusterIP: None, ports: [{port: 80}]}\n",
            "metadata: {name: headless, namespace: d}\nspec: {clusterIPs: [None], ports: [{port: 80}]}\n",
            "metadata: {name: v6, namespace: d}\nspec: {clusterIPs: [\"fd00::1\"], ipFamilies: [IPv6], ports: [{port: 80}]}\n",
            "metadata: {name: v6np, namespace: d}\nspec: {type: NodePort, clusterIPs: [\"fd00::1\"], ports: [{port: 80, nodePort: 30080}]}\n",
        ] {
            let parsed = service(text);
            assert_eq!(
                service_model(&parsed, &[], None, LOCAL),
                Ok(None),
                "{text}"
            );
        }
    }

    #[test]
    fn traffic_policies_and_the_health_check_port_are_read() {
        let local = model(
            "metadata: {name: lb, namespace: d}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.9, externalTrafficPolicy: Local, internalTrafficPolicy: Local, healthCheckNodePort: 31000, ports: [{port: 80, nodePort: 30080}]}\n",
        );
        assert!(local.external_traffic_local && local.internal_traffic_local);
        assert_eq!(local.health_check_node_port, Some(31000));
        // The API server keeps a health check port only for a Local LoadBalancer.
        let cluster = model(
            "metadata: {name: np, namespace: d}\nspec: {type: NodePort, clusterIP: 10.96.0.9, externalTrafficPolicy: Cluster, healthCheckNodePort: 31000, ports: [{port: 80, nodePort: 30080}]}\n",
        );
        assert!(!cluster.external_traffic_local && !cluster.internal_traffic_local);
        assert_eq!(cluster.health_check_node_port, None);
        let wrong = model_error(
            "metadata: {name: x, namespace: d}\nspec: {clusterIP: 10.96.0.9, internalTrafficPolicy: Nearby, ports: [{port: 80}]}\n",
        );
        assert_eq!(wrong.field, "spec.internalTrafficPolicy");
    }

    #[test]
    fn a_node_port_service_from_a_file_without_a_cluster_ip_is_still_balanced() {
        let svc = model(
            "metadata: {name: np, namespace: d}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
        );
        assert!(svc.cluster_ips.is_empty());
        assert_eq!(svc.ports[0].node_port, Some(30080));
    }

    #[test]
    fn malformed_addresses_and_ports_name_the_field() {
        let cases = [
            (
                "spec: {clusterIPs: [10.96.0.1, 10.96.0.300], ports: [{port: 80}]}",
                "spec.clusterIPs[1]",
            ),
            ("spec: {clusterIP: banana, ports: [{port: 80}]}", "spec.clusterIP"),
            (
                "spec: {clusterIP: 10.96.0.1, externalIPs: [1.2.3], ports: [{port: 80}]}",
                "spec.externalIPs[0]",
            ),
            (
                "spec: {type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 1.1.1.1}, {ip: nope}]}}",
                "status.loadBalancer.ingress[1].ip",
            ),
            (
                "spec: {type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerIP: x, ports: [{port: 80}]}",
                "spec.loadBalancerIP",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 70000}]}",
                "spec.ports[1].port",
            ),
            (
                "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: -1}]}",
                "spec.ports[0].nodePort",
            ),
            ("spec: {type: Magic, clusterIP: 10.96.0.1}", "spec.type"),
        ];
        for (spec, field) in cases {
            let e = model_error(&format!("metadata: {{name: bad, namespace: d}}\n{spec}\n"));
            assert_eq!(e.object, "Service d/bad");
            assert_eq!(e.field, field, "{spec}: {e}");
        }
    }

    #[test]
    fn sctp_is_refused_with_the_port_named() {
        let e = model_error(
            "metadata: {name: sig, namespace: telco}\nspec:\n  clusterIP: 10.96.0.9\n  ports:\n  - {name: http, port: 80}\n  - {name: sig, port: 3868, protocol: SCTP}\n",
        );
        assert_eq!(
            e.to_string(),
            "Service telco/sig: spec.ports[1].protocol: SCTP is not supported"
        );
    }

    #[test]
    fn client_ip_session_affinity_takes_its_timeout_or_three_hours() {
        let sticky = model(
            "metadata: {name: s, namespace: d}\nspec: {clusterIP: 10.96.0.4, sessionAffinity: ClientIP, ports: [{port: 80}]}\n",
        );
        assert_eq!(
            sticky.session_affinity_timeout,
            Some(Duration::from_secs(10_800))
        );
        let short = model(
            "metadata: {name: s, namespace: d}\nspec:\n  clusterIP: 10.96.0.4\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports: [{port: 80}]\n",
        );
        assert_eq!(
            short.session_affinity_timeout,
            Some(Duration::from_secs(60))
        );
        let none = model(
            "metadata: {name: s, namespace: d}\nspec: {clusterIP: 10.96.0.4, sessionAffinity: None, ports: [{port: 80}]}\n",
        );
        assert_eq!(none.session_affinity_timeout, None);
        let e = model_error(
            "metadata: {name: s, namespace: d}\nspec:\n  clusterIP: 10.96.0.4\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
        );
        assert_eq!(
            e.field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
    }

    fn global_service(text: &str) -> GlobalService {
        yaml(text)
    }

    #[test]
    fn weft_annotations_win_over_cilium_ones() {
        let settings = global_settings(
            &annotations(&[
                ("weft.io/global", "TRUE"),
                ("service.cilium.io/global", "false"),
                ("service.cilium.io/shared", "false"),
                ("io.cilium/shared-service", "true"),
                ("io.cilium/service-affinity", "Remote"),
            ]),
            None,
            "Service d/s",
        )
        .expect("valid annotations");
        assert_eq!(
            settings,
            GlobalSettings {
                global: true,
                shared: false,
                affinity: Affinity::Remote,
            }
        );
        let cilium_only = global_settings(
            &annotations(&[
                ("io.cilium/global-service", "true"),
                ("service.cilium.io/affinity", "local"),
            ]),
            None,
            "Service d/s",
        )
        .expect("valid annotations");
        assert_eq!(
            cilium_only,
            GlobalSettings {
                global: true,
                shared: true,
                affinity: Affinity::Local,
            }
        );
        assert_eq!(
            global_settings(&BTreeMap::new(), None, "Service d/s"),
            Ok(GlobalSettings::default())
        );
    }

    #[test]
    fn a_bad_annotation_value_names_the_annotation() {
        let e = global_settings(
            &annotations(&[("service.cilium.io/global", "yes")]),
            None,
            "Service d/s",
        )
        .expect_err("not a boolean");
        assert_eq!(e.field, "metadata.annotations[service.cilium.io/global]");
        assert!(e.message.contains("\"yes\" is not a boolean"), "{e}");
        let e = global_settings(
            &annotations(&[("weft.io/affinity", "nearest")]),
            None,
            "Service d/s",
        )
        .expect_err("not an affinity");
        assert_eq!(e.field, "metadata.annotations[weft.io/affinity]");
        // A lower-precedence alias is not read at all.
        assert!(global_settings(
            &annotations(&[
                ("weft.io/global", "true"),
                ("io.cilium/global-service", "maybe")
            ]),
            None,
            "Service d/s",
        )
        .is_ok());
    }

    #[test]
    fn a_global_service_wins_over_annotations() {
        let gsvc = global_service(
            "apiVersion: weft.io/v1alpha1\nkind: GlobalService\nmetadata: {name: web, namespace: shop}\nspec: {serviceName: web, affinity: local, shared: false}\n",
        );
        let settings = global_settings(
            &annotations(&[("weft.io/global", "false"), ("weft.io/affinity", "bogus")]),
            Some(&gsvc),
            "Service shop/web",
        )
        .expect("the GlobalService decides");
        assert_eq!(
            settings,
            GlobalSettings {
                global: true,
                shared: false,
                affinity: Affinity::Local,
            }
        );
        let web = service_model(&service(WEB), &[], Some(&gsvc), LOCAL)
            .expect("valid")
            .expect("balanced");
        assert_eq!(web.global, settings);
    }

    fn slice(value: Value) -> EndpointSlice {
        serde_json::from_value(value).expect("test slice")
    }

    /// A slice of `shop/web` as the EndpointSlice controller writes it during a rollout.
    fn web_slice() -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc12",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
            },
            "addressType": "IPv4",
            "ports": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "dns", "port": 5354, "protocol": "TCP"}
            ],
            "endpoints": [
                {"addresses": ["10.1.0.12"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-b", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-7d9f-x2"}},
                {"addresses": ["10.1.0.11"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": "web-7d9f-q1"}},
                {"addresses": ["10.1.0.13"], "conditions": {"ready": false, "serving": false, "terminating": true}, "nodeName": "node-a"},
                {"addresses": ["10.1.0.14"], "conditions": {"ready": false}},
                {"addresses": ["10.1.0.15"]},
                {"addresses": ["192.168.5.5"], "targetRef": {"kind": "Node", "name": "gpu-1"}}
            ]
        })
    }

    fn summary(backends: &[Backend]) -> Vec<(String, u16, u16, BackendCondition)> {
        backends
            .iter()
            .map(|b| (b.address.to_string(), b.port, b.cluster_id, b.condition))
            .collect()
    }

    #[test]
    fn backends_come_from_the_matching_slice_port_with_their_conditions() {
        use BackendCondition::*;
        let slice = slice(web_slice());
        let web = service_model(&service(WEB), &[&slice], None, LOCAL)
            .expect("valid")
            .expect("balanced");
        let http = &web.ports[0];
        assert_eq!(
            summary(&http.backends),
            [
                ("10.1.0.11".into(), 8080, LOCAL, Terminating),
                ("10.1.0.12".into(), 8080, LOCAL, Ready),
                ("10.1.0.13".into(), 8080, LOCAL, NotServing),
                ("10.1.0.14".into(), 8080, LOCAL, NotServing),
                ("10.1.0.15".into(), 8080, LOCAL, Ready),
                ("192.168.5.5".into(), 8080, LOCAL, Ready),
            ]
        );
        assert_eq!(http.backends[0].node.as_deref(), Some("node-a"));
        // targetRef without a namespace is in the slice's namespace.
        assert_eq!(http.backends[0].pod.as_deref(), Some("shop/web-7d9f-q1"));
        assert_eq!(http.backends[1].pod.as_deref(), Some("shop/web-7d9f-x2"));
        assert_eq!(http.backends[5].pod, None, "a Node target is not a pod");
        // The UDP service port takes the UDP slice port of the same name, not the TCP one.
        let dns = &web.ports[1];
        assert!(dns.backends.iter().all(|b| b.port == 5353));
        assert_eq!(dns.backends.len(), 6);
    }

    #[test]
    fn an_unnamed_service_port_matches_an_unnamed_slice_port() {
        let svc = service(
            "metadata: {name: api, namespace: d}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80, targetPort: 8080}]}\n",
        );
        let unnamed = slice(json!({
            "metadata": {"name": "api-1", "namespace": "d", "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090}],
            "endpoints": [{"addresses": ["10.1.0.20"]}]
        }));
        let api = service_model(&svc, &[&unnamed], None, LOCAL)
            .expect("valid")
            .expect("balanced");
        assert_eq!(
            summary(&api.ports[0].backends),
            [("10.1.0.20".into(), 8080, LOCAL, BackendCondition::Ready)]
        );
    }

    #[test]
    fn ipv6_slices_are_skipped_and_a_labelled_slice_carries_a_remote_cluster() {
        let v6 = slice(json!({
            "metadata": {"name": "web-v6", "namespace": "shop"},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::12"]}]
        }));
        let remote = slice(json!({
            "metadata": {"name": "web-c2", "namespace": "shop", "labels": {"weft.io/cluster-id": "2"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.2.0.12"], "nodeName": "c2-node-a"}]
        }));
        let web = service_model(&service(WEB), &[&v6, &remote], None, LOCAL)
            .expect("valid")
            .expect("balanced");
        assert_eq!(
            summary(&web.ports[0].backends),
            [("10.2.0.12".into(), 8080, 2, BackendCondition::Ready)]
        );

        let mut bad = remote.clone();
        bad.metadata
            .labels
            .get_or_insert_default()
            .insert(CLUSTER_ID_LABEL.into(), "east".into());
        let e = service_model(&service(WEB), &[&bad], None, LOCAL).expect_err("bad label");
        assert_eq!(e.object, "EndpointSlice shop/web-c2");
        assert_eq!(e.field, "metadata.labels[weft.io/cluster-id]");
    }

    #[test]
    fn a_slice_endpoint_that_is_not_ipv4_names_the_field() {
        let mut value = web_slice();
        value["endpoints"][2]["addresses"] = json!(["fd00::13"]);
        let e = service_model(&service(WEB), &[&slice(value)], None, LOCAL)
            .expect_err("IPv6 in an IPv4 slice");
        assert_eq!(e.object, "EndpointSlice shop/web-abc12");
        assert_eq!(e.field, "endpoints[2].addresses[0]");
    }

    fn web_service_json() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.12.7", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })
    }

    #[test]
    fn objects_of_mixed_kinds_join_into_services() {
        let objects = vec![
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "shop"}}),
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "kn", "namespace": "shop"}, "spec": {}}),
            web_slice(),
            web_service_json(),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-c2", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "web", "weft.io/cluster-id": "2"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.2.0.12"]}]
            }),
            // Same service name in another namespace: its slice must not join shop/web.
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-x", "namespace": "staging", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.9.9.9"]}]
            }),
            json!({
                "apiVersion": "weft.io/v1alpha1", "kind": "GlobalService",
                "metadata": {"name": "web-global", "namespace": "shop"},
                "spec": {"serviceName": "web", "affinity": "local"}
            }),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
                   "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "default"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}}),
        ];
        let (services, errors) = services_from_objects(&objects, LOCAL);
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<String> = services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        assert_eq!(names, ["default/api", "shop/web"]);
        let web = &services[1];
        assert_eq!(
            web.global,
            GlobalSettings {
                global: true,
                shared: true,
                affinity: Affinity::Local,
            }
        );
        let clusters: BTreeSet<u16> = web.ports[0].backends.iter().map(|b| b.cluster_id).collect();
        assert_eq!(clusters, BTreeSet::from([1, 2]));
        assert!(web.ports[0]
            .backends
            .iter()
            .all(|b| b.address != "10.9.9.9".parse::<Ipv4Addr>().expect("ip")));
        assert!(services[0].ports[0].backends.is_empty());
    }

    #[test]
    fn one_bad_object_never_hides_the_others() {
        let mut bad_slice = web_slice();
        bad_slice["metadata"]["name"] = json!("web-bad");
        bad_slice["metadata"]["labels"]["weft.io/cluster-id"] = json!("0");
        let objects = vec![
            web_service_json(),
            web_slice(),
            bad_slice,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sig", "namespace": "telco"},
                   "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 3868, "protocol": "SCTP"}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "broken", "namespace": "shop"},
                   "spec": {"ports": "eighty"}}),
            json!({"apiVersion": "weft.io/v1alpha1", "kind": "GlobalService",
                   "metadata": {"name": "a-web", "namespace": "shop"}, "spec": {"serviceName": "web"}}),
            json!({"apiVersion": "weft.io/v1alpha1", "kind": "GlobalService",
                   "metadata": {"name": "b-web", "namespace": "shop"}, "spec": {"serviceName": "web", "affinity": "remote"}}),
        ];
        let (services, errors) = services_from_objects(&objects, LOCAL);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].name, "web");
        assert_eq!(services[0].global.affinity, Affinity::None, "a-web wins");
        assert_eq!(
            services[0].ports[0].backends.len(),
            6,
            "the good slice still counts"
        );
        let reported: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            reported,
            [
                (
                    "EndpointSlice shop/web-bad",
                    "metadata.labels[weft.io/cluster-id]"
                ),
                ("Service shop/broken", "(object)"),
                ("GlobalService shop/b-web", "spec.serviceName"),
                ("Service telco/sig", "spec.ports[0].protocol"),
            ]
        );
    }

    #[test]
    fn lists_are_opened_and_their_items_inherit_the_kind() {
        let objects = vec![
            json!({"apiVersion": "v1", "kind": "ServiceList", "items": [
                {"metadata": {"name": "web", "namespace": "shop"},
                 "spec": {"clusterIP": "10.96.12.7", "ports": [{"name": "http", "port": 80}]}}
            ]}),
            json!({"apiVersion": "v1", "kind": "List", "items": [web_slice()]}),
        ];
        let (services, errors) = services_from_objects(&objects, LOCAL);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].ports[0].backends.len(), 6);
    }
}
