//! Cluster IPs and node ports, handed out as the API server's allocators do: a Service that
//! names its own keeps it (when it is free and in range), one that names none gets the next
//! free one, and a re-applied Service keeps what it was given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use serde_json::Value;

use super::{is_service, service_key};

/// The API server's default `--service-node-port-range`.
pub const NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// What a cluster's stored Services already hold, indexed once, so storing thousands of
/// Services at once costs one pass over them, not one per Service.
pub struct Allocations {
    cidr: Ipv4Net,
    specs: HashMap<(String, String), ServiceSpec>,
    ips: HashMap<Ipv4Addr, (String, String)>,
    node_ports: HashMap<i32, (String, String)>,
    /// No usable address below this one is free: allocations only add addresses.
    lowest_maybe_free: u32,
}

impl Allocations {
    /// Indexes the Services among a cluster's stored `objects`.
    pub fn of(objects: &[Value], cidr: Ipv4Net) -> Self {
        let mut allocations = Self {
            cidr,
            specs: HashMap::new(),
            ips: HashMap::new(),
            node_ports: HashMap::new(),
            lowest_maybe_free: *usable(cidr).start(),
        };
        for object in objects.iter().filter(|object| is_service(object)) {
            if let Some(spec) = spec_of(object) {
                allocations.hold(service_key(object), spec);
            }
        }
        allocations
    }

    fn hold(&mut self, key: (String, String), spec: ServiceSpec) {
        if let Some(previous) = self.specs.remove(&key) {
            for ip in spec_ips(&previous) {
                if self.ips.get(&ip) == Some(&key) {
                    self.ips.remove(&ip);
                }
            }
            for node_port in spec_node_ports(&previous) {
                if self.node_ports.get(&node_port) == Some(&key) {
                    self.node_ports.remove(&node_port);
                }
            }
        }
        for ip in spec_ips(&spec) {
            self.ips.insert(ip, key.clone());
        }
        for node_port in spec_node_ports(&spec) {
            self.node_ports.insert(node_port, key.clone());
        }
        self.specs.insert(key, spec);
    }

    /// Gives `service` (a core/v1 Service about to be stored) its cluster IP and node ports,
    /// writing them into `spec.clusterIP`, `spec.clusterIPs` and `spec.ports[*].nodePort`, and
    /// its namespace into `metadata` when it names none. A stored Service of the same namespace
    /// and name is the one being replaced: its allocations are kept, and never count as taken.
    pub fn allocate(&mut self, service: &mut Value) -> Result<(), String> {
        let name = service
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or("a Service needs metadata.name")?
            .to_owned();
        let namespace = service
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        service["metadata"]["namespace"] = namespace.clone().into();
        let what = format!("service {namespace}/{name}");
        let parsed: Service = serde_json::from_value(service.clone())
            .map_err(|e| format!("{what} is not a valid Service: {e}"))?;
        let spec = parsed.spec.unwrap_or_default();
        let key = (namespace, name);
        let previous = self.specs.get(&key).cloned();

        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !matches!(
            kind,
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        ) {
            return Err(format!(
                "{what}: spec.type {kind:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
            ));
        }
        let ips = &self.ips;
        let ip_taken = |ip: &Ipv4Addr| ips.get(ip).is_some_and(|owner| owner != &key);
        let mut lowest = self.lowest_maybe_free;
        let mut free_ip = || {
            let found = (lowest..=*usable(self.cidr).end())
                .map(Ipv4Addr::from)
                .find(|ip| !ip_taken(ip));
            if let Some(ip) = found {
                lowest = u32::from(ip);
            }
            found
        };
        let chosen = cluster_ip(
            &what,
            kind,
            &spec,
            previous.as_ref(),
            &ip_taken,
            &mut free_ip,
            self.cidr,
        )?;
        self.lowest_maybe_free = lowest;
        let node_ports_held = &self.node_ports;
        let port_taken = |n: i32| node_ports_held.get(&n).is_some_and(|owner| owner != &key);
        let written = node_ports(&what, kind, &spec, previous.as_ref(), &port_taken)?;
        let service_ports: BTreeSet<i32> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|port| port.node_port)
            .chain(written.iter().map(|(_, port)| i32::from(*port)))
            .collect();
        let health_check = health_check_node_port(&what, kind, &spec, previous.as_ref(), &|n| {
            port_taken(n) || service_ports.contains(&n)
        })?;
        if let Some(ip) = chosen {
            service["spec"]["clusterIP"] = ip.clone().into();
            service["spec"]["clusterIPs"] = vec![ip].into();
        }
        for (index, node_port) in written {
            service["spec"]["ports"][index]["nodePort"] = node_port.into();
        }
        if let Some(port) = health_check {
            service["spec"]["healthCheckNodePort"] = port.into();
        }
        if let Some(stored) = spec_of(service) {
            self.hold(key, stored);
        }
        Ok(())
    }
}

/// Gives one `service` its allocations against a cluster's stored `objects` (see
/// [`Allocations::allocate`]).
pub fn allocate(service: &mut Value, objects: &[Value], cidr: Ipv4Net) -> Result<(), String> {
    Allocations::of(objects, cidr).allocate(service)
}

fn spec_ips(spec: &ServiceSpec) -> Vec<Ipv4Addr> {
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn spec_node_ports(spec: &ServiceSpec) -> Vec<i32> {
    spec.ports
        .iter()
        .flatten()
        .filter_map(|port| port.node_port)
        .chain(spec.health_check_node_port)
        .collect()
}

fn spec_of(object: &Value) -> Option<ServiceSpec> {
    serde_json::from_value::<Service>(object.clone())
        .ok()
        .and_then(|service| service.spec)
}

fn non_empty(value: Option<&String>) -> Option<&str> {
    value.map(String::as_str).filter(|value| !value.is_empty())
}

/// The Service's cluster IP (`None` for ExternalName, which has none), or why it cannot have
/// the one it asks for.
fn cluster_ip(
    what: &str,
    kind: &str,
    spec: &ServiceSpec,
    previous: Option<&ServiceSpec>,
    taken: &dyn Fn(&Ipv4Addr) -> bool,
    free_ip: &mut dyn FnMut() -> Option<Ipv4Addr>,
    cidr: Ipv4Net,
) -> Result<Option<String>, String> {
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let requested = non_empty(spec.cluster_ip.as_ref());
    if listed.len() > 1 {
        return Err(format!(
            "{what}: the sandbox is IPv4-only; spec.clusterIPs may hold one address"
        ));
    }
    let requested = match (requested, non_empty(listed.first())) {
        (Some(single), Some(first)) if single != first => {
            return Err(format!(
                "{what}: spec.clusterIPs[0] ({first}) must equal spec.clusterIP ({single})"
            ))
        }
        (single, first) => single.or(first),
    };
    if kind == "ExternalName" {
        return match requested {
            Some(ip) => Err(format!(
                "{what}: an ExternalName service has no cluster IP, but spec.clusterIP is {ip}"
            )),
            None => Ok(None),
        };
    }
    let kept = previous.and_then(|previous| non_empty(previous.cluster_ip.as_ref()));
    let chosen = match (requested, kept) {
        (Some(requested), Some(kept)) if requested != kept => {
            return Err(format!(
                "{what}: spec.clusterIP is immutable: it is {kept}, and the manifest asks for {requested}"
            ))
        }
        (Some(ip), _) | (None, Some(ip)) => ip.to_owned(),
        (None, None) => {
            return free_ip()
                .map(|ip| Some(ip.to_string()))
                .ok_or_else(|| format!("{what}: no cluster IP is free in {cidr}"));
        }
    };
    if chosen == "None" {
        return if kind == "ClusterIP" {
            Ok(Some(chosen))
        } else {
            Err(format!(
                "{what}: a headless service (clusterIP: None) must be of type ClusterIP, not {kind}"
            ))
        };
    }
    let ip: Ipv4Addr = chosen.parse().map_err(|_| {
        format!("{what}: spec.clusterIP {chosen:?} is not an IPv4 address (or \"None\")")
    })?;
    if !usable(cidr).contains(&u32::from(ip)) {
        return Err(format!(
            "{what}: spec.clusterIP {ip} is not in the cluster's service CIDR {cidr} (network and broadcast addresses excluded)"
        ));
    }
    if taken(&ip) {
        return Err(format!(
            "{what}: spec.clusterIP {ip} is already allocated to another service"
        ));
    }
    Ok(Some(chosen))
}

/// The addresses of a service CIDR the allocator hands out: all but the network and broadcast
/// addresses, as the API server's.
fn usable(cidr: Ipv4Net) -> RangeInclusive<u32> {
    u32::from(cidr.network()) + 1..=u32::from(cidr.broadcast()).saturating_sub(1)
}

/// The node ports to write, by index into `spec.ports`, or why one the manifest names cannot
/// be had.
fn node_ports(
    what: &str,
    kind: &str,
    spec: &ServiceSpec,
    previous: Option<&ServiceSpec>,
    taken: &dyn Fn(i32) -> bool,
) -> Result<Vec<(usize, u16)>, String> {
    let needs_node_ports = kind == "NodePort"
        || (kind == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
    let ports = spec.ports.as_deref().unwrap_or_default();
    // Node ports this Service names itself, by protocol: the same number may serve TCP and UDP.
    let mut named: BTreeSet<(i32, String)> = BTreeSet::new();
    for (index, port) in ports.iter().enumerate() {
        let Some(node_port) = port.node_port.filter(|n| *n != 0) else {
            continue;
        };
        let field = format!("{what}: spec.ports[{index}].nodePort {node_port}");
        if matches!(kind, "ClusterIP" | "ExternalName") {
            return Err(format!("{field}: a {kind} service has no node ports"));
        }
        if !NODE_PORT_RANGE.contains(&u16::try_from(node_port).unwrap_or(0)) {
            return Err(format!(
                "{field} is outside the node port range {}-{}",
                NODE_PORT_RANGE.start(),
                NODE_PORT_RANGE.end()
            ));
        }
        if taken(node_port) {
            return Err(format!("{field} is already allocated to another service"));
        }
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        if !named.insert((node_port, protocol)) {
            return Err(format!("{field} is used twice for the same protocol"));
        }
    }
    if !needs_node_ports {
        return Ok(Vec::new());
    }
    let mut used: BTreeSet<i32> = named.iter().map(|(number, _)| *number).collect();
    // As the API server on update: a port that names no node port keeps the one the port of
    // the same name had, unless another port now claims it.
    let kept: BTreeMap<String, i32> = previous
        .into_iter()
        .flat_map(|previous| previous.ports.iter().flatten())
        .filter_map(|port| Some((port.name.clone().unwrap_or_default(), port.node_port?)))
        .collect();
    // Ports of the same number (TCP and UDP 53, say) share one node port.
    let mut by_port_number: BTreeMap<i32, i32> = ports
        .iter()
        .filter_map(|port| Some((port.port, port.node_port.filter(|n| *n != 0)?)))
        .collect();
    let mut written = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        if port.node_port.is_some_and(|n| n != 0) {
            continue;
        }
        let previous = kept
            .get(port.name.as_deref().unwrap_or_default())
            .copied()
            .filter(|n| !used.contains(n) && !taken(*n));
        let node_port = match by_port_number.get(&port.port).copied().or(previous) {
            Some(node_port) => node_port,
            None => NODE_PORT_RANGE
                .map(i32::from)
                .find(|n| !used.contains(n) && !taken(*n))
                .ok_or_else(|| format!("{what}: no node port is free"))?,
        };
        used.insert(node_port);
        by_port_number.insert(port.port, node_port);
        written.push((index, u16::try_from(node_port).unwrap_or_default()));
    }
    Ok(written)
}

/// `spec.healthCheckNodePort` to write, as the API server gives it: only a LoadBalancer with
/// `externalTrafficPolicy: Local` has one; one it names must be in range and free (`taken`
/// includes the Service's own node ports); otherwise it keeps the one it had, or gets the first
/// free node port.
fn health_check_node_port(
    what: &str,
    kind: &str,
    spec: &ServiceSpec,
    previous: Option<&ServiceSpec>,
    taken: &dyn Fn(i32) -> bool,
) -> Result<Option<i32>, String> {
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let named = spec.health_check_node_port.filter(|n| *n != 0);
    if kind != "LoadBalancer" || !local {
        return match named {
            Some(port) => Err(format!(
                "{what}: spec.healthCheckNodePort {port} may only be set when type is LoadBalancer and externalTrafficPolicy is Local"
            )),
            None => Ok(None),
        };
    }
    if let Some(port) = named {
        if !NODE_PORT_RANGE.contains(&u16::try_from(port).unwrap_or(0)) {
            return Err(format!(
                "{what}: spec.healthCheckNodePort {port} is outside the node port range {}-{}",
                NODE_PORT_RANGE.start(),
                NODE_PORT_RANGE.end()
            ));
        }
        if taken(port) {
            return Err(format!(
                "{what}: spec.healthCheckNodePort {port} is already allocated"
            ));
        }
        return Ok(None); // kept as written
    }
    let kept = previous
        .and_then(|previous| previous.health_check_node_port)
        .filter(|n| !taken(*n));
    kept.or_else(|| NODE_PORT_RANGE.map(i32::from).find(|n| !taken(*n)))
        .map(Some)
        .ok_or_else(|| format!("{what}: no node port is free for the health check"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cidr() -> Ipv4Net {
        "10.96.0.0/16".parse().expect("cidr")
    }

    /// Applies each Service in turn to an empty cluster, as `kubectl apply` would; returns the
    /// stored objects or the first error.
    fn apply_all(services: Vec<Value>) -> Result<Vec<Value>, String> {
        let mut objects: Vec<Value> = Vec::new();
        for mut service in services {
            allocate(&mut service, &objects, cidr())?;
            let key = service_key(&service);
            objects.retain(|object| service_key(object) != key);
            objects.push(service);
        }
        Ok(objects)
    }

    fn service(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn a_service_without_a_cluster_ip_gets_the_next_free_address() {
        let objects = apply_all(vec![
            service("first", json!({"ports": [{"port": 80}]})),
            service(
                "pinned",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
            ),
            service("third", json!({"clusterIP": "", "ports": [{"port": 80}]})),
        ])
        .expect("allocated");
        let ips: Vec<(&str, &Value, &Value)> = objects
            .iter()
            .map(|o| {
                (
                    o["metadata"]["name"].as_str().unwrap_or_default(),
                    &o["spec"]["clusterIP"],
                    &o["spec"]["clusterIPs"],
                )
            })
            .collect();
        assert_eq!(
            ips,
            vec![
                ("first", &json!("10.96.0.1"), &json!(["10.96.0.1"])),
                ("pinned", &json!("10.96.0.2"), &json!(["10.96.0.2"])),
                ("third", &json!("10.96.0.3"), &json!(["10.96.0.3"])),
            ]
        );
        assert_eq!(objects[0]["metadata"]["namespace"], "default");
    }

    #[test]
    fn an_explicit_cluster_ip_outside_the_cidr_or_taken_is_refused() {
        let outside = apply_all(vec![service("web", json!({"clusterIP": "10.97.0.1"}))]);
        let error = outside.expect_err("outside the CIDR");
        assert!(
            error.contains("service default/web: spec.clusterIP 10.97.0.1 is not in the cluster's service CIDR 10.96.0.0/16"),
            "{error}"
        );
        let network = apply_all(vec![service("web", json!({"clusterIP": "10.96.0.0"}))]);
        assert!(network.expect_err("network address").contains("not in"));

        let taken = apply_all(vec![
            service("web", json!({"ports": [{"port": 80}]})),
            service("api", json!({"clusterIP": "10.96.0.1"})),
        ]);
        let error = taken.expect_err("taken");
        assert!(
            error.contains("service default/api: spec.clusterIP 10.96.0.1 is already allocated"),
            "{error}"
        );

        // The same name in another namespace is another service.
        let mut other_namespace = service("web", json!({"clusterIP": "10.96.0.1"}));
        other_namespace["metadata"]["namespace"] = "shop".into();
        let error = apply_all(vec![
            service("web", json!({"clusterIP": "10.96.0.1"})),
            other_namespace,
        ])
        .expect_err("taken across namespaces");
        assert!(error.contains("service shop/web"), "{error}");
    }

    #[test]
    fn headless_services_are_allowed_and_get_no_address() {
        let objects = apply_all(vec![
            service(
                "peers",
                json!({"clusterIP": "None", "selector": {"app": "db"}}),
            ),
            service("web", json!({})),
        ])
        .expect("allocated");
        assert_eq!(objects[0]["spec"]["clusterIPs"], json!(["None"]));
        assert_eq!(objects[1]["spec"]["clusterIP"], "10.96.0.1");
        let error = apply_all(vec![service(
            "peers",
            json!({"clusterIP": "None", "type": "NodePort"}),
        )])
        .expect_err("headless NodePort");
        assert!(error.contains("must be of type ClusterIP"), "{error}");
    }

    #[test]
    fn node_ports_come_from_the_range_unique_in_the_cluster() {
        let objects = apply_all(vec![
            service(
                "web",
                json!({"type": "NodePort", "ports": [
                    {"name": "http", "port": 80},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "dns-udp", "port": 53, "protocol": "UDP"}
                ]}),
            ),
            service(
                "lb",
                json!({"type": "LoadBalancer", "ports": [{"port": 443, "nodePort": 30005}, {"name": "b", "port": 8443}]}),
            ),
            service(
                "inner",
                json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": [{"port": 443}]}),
            ),
        ])
        .expect("allocated");
        let node_ports = |index: usize| -> Vec<Value> {
            objects[index]["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|port| port["nodePort"].clone())
                .collect()
        };
        // TCP and UDP 53 share one node port, as the API server does.
        assert_eq!(
            node_ports(0),
            vec![json!(30000), json!(30001), json!(30001)]
        );
        assert_eq!(node_ports(1), vec![json!(30005), json!(30002)]);
        assert_eq!(node_ports(2), vec![Value::Null]);

        let taken = apply_all(vec![
            service("a", json!({"type": "NodePort", "ports": [{"port": 80}]})),
            service(
                "b",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}),
            ),
        ]);
        assert!(taken.expect_err("taken").contains("already allocated"));
        let outside = apply_all(vec![service(
            "a",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]}),
        )]);
        assert!(outside
            .expect_err("outside")
            .contains("outside the node port range 30000-32767"));
        let cluster_ip = apply_all(vec![service(
            "a",
            json!({"ports": [{"port": 80, "nodePort": 30000}]}),
        )]);
        assert!(cluster_ip
            .expect_err("ClusterIP")
            .contains("a ClusterIP service has no node ports"));
    }

    #[test]
    fn a_local_load_balancer_gets_a_health_check_port_of_its_own() {
        let objects = apply_all(vec![
            service(
                "lb",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            ),
            service(
                "lb2",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31500, "ports": [{"port": 80}]}),
            ),
        ])
        .expect("allocated");
        // After the service's own node port, and never one another service holds.
        assert_eq!(objects[0]["spec"]["ports"][0]["nodePort"], json!(30000));
        assert_eq!(objects[0]["spec"]["healthCheckNodePort"], json!(30001));
        assert_eq!(objects[1]["spec"]["healthCheckNodePort"], json!(31500));
        assert_eq!(objects[1]["spec"]["ports"][0]["nodePort"], json!(30002));
        let again = apply_all(vec![
            service(
                "lb",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            ),
            service(
                "np",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]}),
            ),
        ]);
        assert!(again.expect_err("held").contains("already allocated"));
        let not_local = apply_all(vec![service(
            "np",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000, "ports": [{"port": 80}]}),
        )]);
        assert!(not_local
            .expect_err("only a Local LoadBalancer")
            .contains("may only be set when type is LoadBalancer"));
    }

    #[test]
    fn re_applying_a_service_keeps_its_allocations() {
        let first = json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}]});
        let objects = apply_all(vec![
            service("web", first.clone()),
            service("other", first.clone()),
            // The same manifest again, and once more with a port added: what was given stays.
            service("web", first),
            service(
                "web",
                json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]}),
            ),
        ])
        .expect("allocated");
        assert_eq!(objects.len(), 2, "re-applying replaces");
        let web = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "web")
            .expect("web");
        assert_eq!(web["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(web["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(web["spec"]["ports"][1]["nodePort"], 30002);

        let changed = apply_all(vec![
            service("web", json!({})),
            service("web", json!({"clusterIP": "10.96.0.9"})),
        ]);
        assert!(changed.expect_err("immutable").contains("immutable"));
        // Naming the address it was given is fine.
        apply_all(vec![
            service("web", json!({})),
            service("web", json!({"clusterIP": "10.96.0.1"})),
        ])
        .expect("same address");
    }
}
