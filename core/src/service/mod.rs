//! Services as Weft's kube-proxy replacement balances them, independent of Kubernetes: a
//! [`Service`] with its addresses, ports and backends, the frontends it exposes
//! ([`Service::frontends`]) and which backends each frontend sends new connections to
//! ([`select_backends`]). `weft-crds::service_model` builds [`Service`]s from Kubernetes
//! Services, EndpointSlices and GlobalServices; [`maglev`] spreads flows over the chosen
//! backends.

pub mod maglev;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A service port's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number the datapath keys frontends with.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// The name as Kubernetes spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// Which backends of a global service new connections prefer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// This cluster's, while any is ready.
    Local,
    /// Other clusters', while any is ready.
    Remote,
    /// All alike.
    #[default]
    None,
}

/// How a service takes part in the cluster mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct GlobalSettings {
    /// Whether backends of other clusters are balanced over.
    pub global: bool,
    /// Whether this cluster's backends are offered to other clusters.
    pub shared: bool,
    /// Which backends new connections prefer.
    pub affinity: Affinity,
}

/// Cilium's defaults: a service is local, and once made global it is shared unless told not.
impl Default for GlobalSettings {
    fn default() -> Self {
        Self {
            global: false,
            shared: true,
            affinity: Affinity::None,
        }
    }
}

/// Whether a backend takes connections, from its EndpointSlice conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BackendCondition {
    /// Takes new connections.
    Ready,
    /// Serving and terminating: keeps its established connections but gets no new ones, unless
    /// no backend is ready at all.
    Terminating,
    /// Takes nothing.
    NotServing,
}

impl BackendCondition {
    /// Higher is more useful; picks which of two reports of one backend counts.
    fn rank(self) -> u8 {
        match self {
            Self::Ready => 2,
            Self::Terminating => 1,
            Self::NotServing => 0,
        }
    }
}

/// One endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// The pod's (or endpoint's) address.
    pub address: Ipv4Addr,
    /// The port on that address (the service's target port, resolved).
    pub port: u16,
    /// The cluster the backend runs in.
    pub cluster_id: u16,
    /// Whether it takes connections.
    pub condition: BackendCondition,
    /// The node it runs on, when known.
    pub node: Option<String>,
    /// `namespace/name` of its pod, when it is one.
    pub pod: Option<String>,
}

impl Backend {
    /// What makes two backends the same for the datapath: address, port and cluster.
    pub fn key(&self) -> (Ipv4Addr, u16, u16) {
        (self.address, self.port, self.cluster_id)
    }
}

/// Backends sorted by [`Backend::key`], each once. A backend reported twice (an endpoint in two
/// slices while the EndpointSlice controller moves it) keeps its most serving condition, so a
/// stale copy never takes a ready backend out of rotation.
pub fn dedup_backends(backends: impl IntoIterator<Item = Backend>) -> Vec<Backend> {
    let mut by_key: BTreeMap<(Ipv4Addr, u16, u16), Backend> = BTreeMap::new();
    for backend in backends {
        match by_key.get(&backend.key()) {
            Some(kept) if kept.condition.rank() >= backend.condition.rank() => {}
            _ => {
                by_key.insert(backend.key(), backend);
            }
        }
    }
    by_key.into_values().collect()
}

/// One port of a service with its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// The port's name; `""` when unnamed.
    pub name: String,
    /// The transport protocol; TCP and UDP on one port number are two ports.
    pub protocol: Protocol,
    /// The port on cluster, external and load-balancer addresses.
    pub port: u16,
    /// The port on every node address, for NodePort and LoadBalancer services.
    pub node_port: Option<u16>,
    /// Every known backend, in any condition and from any cluster.
    pub backends: Vec<Backend>,
}

impl ServicePort {
    /// This port with only the backends of this cluster that run on `node`.
    pub fn on_node(&self, node: &str, local_cluster: u16) -> ServicePort {
        ServicePort {
            backends: self
                .backends
                .iter()
                .filter(|backend| {
                    backend.cluster_id == local_cluster && backend.node.as_deref() == Some(node)
                })
                .cloned()
                .collect(),
            ..self.clone()
        }
    }
}

/// A service Weft balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// IPv4 cluster IPs.
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// Load-balancer ingress addresses.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// The ports, in the Service's order.
    pub ports: Vec<ServicePort>,
    /// How long a client sticks to its backend; `Some` when `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<Duration>,
    /// Cluster-mesh settings.
    pub global: GlobalSettings,
    /// `externalTrafficPolicy: Local`: node ports, external and load-balancer addresses reach
    /// only the backends on the node the traffic arrived at (and keep the client's address).
    #[serde(default)]
    pub external_traffic_local: bool,
    /// `internalTrafficPolicy: Local`: cluster IPs reach only backends on the client's node.
    #[serde(default)]
    pub internal_traffic_local: bool,
    /// `healthCheckNodePort`: where each node answers whether it has a backend of this
    /// service (a load balancer's health check, with `externalTrafficPolicy: Local`).
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrontendKind {
    /// A cluster IP, reachable from inside the cluster.
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// A node port on every address of every node.
    NodePort,
    /// One of `spec.externalIPs`, routed to the nodes by someone else.
    #[serde(rename = "ExternalIP")]
    ExternalIp,
    /// A load balancer's ingress address.
    LoadBalancer,
}

/// An address and port the datapath translates to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    /// How it is reached.
    pub kind: FrontendKind,
    /// `None` for a NodePort: every address of the node.
    pub address: Option<Ipv4Addr>,
    /// The service port, or the node port for a NodePort frontend.
    pub port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
}

/// What one frontend balances over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendPlan {
    /// Where clients connect.
    pub frontend: Frontend,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The service port's name (`""` when unnamed).
    pub port_name: String,
    /// Backends that get new connections.
    pub active: Vec<Backend>,
    /// Backends kept for established flows only: terminating ones, and ready ones that
    /// affinity passes over (so connections survive when the preferred side recovers).
    pub draining: Vec<Backend>,
    /// How long a client sticks to its backend, when the service asks for it.
    pub affinity_timeout: Option<Duration>,
}

impl Service {
    /// Every frontend of the service on `node` and what it balances over: one per cluster IP ×
    /// port, one NodePort frontend per port with a node port, one per external IP × port and
    /// one per load-balancer IP × port, in that order. An address listed twice (or both as
    /// external and load-balancer IP) makes one frontend, of the first kind: the datapath keys
    /// frontends by address, port and protocol. A traffic policy of `Local` leaves a frontend
    /// only the backends on `node`, and none when it has none (Kubernetes drops such traffic
    /// rather than send it elsewhere).
    pub fn frontends(&self, local_cluster: u16, node: &str) -> Vec<FrontendPlan> {
        let mut plans = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let selected: Vec<(Vec<Backend>, Vec<Backend>)> = self
            .ports
            .iter()
            .map(|port| select_backends(port, &self.global, local_cluster))
            .collect();
        let node_local: Vec<(Vec<Backend>, Vec<Backend>)> =
            if self.external_traffic_local || self.internal_traffic_local {
                self.ports
                    .iter()
                    .map(|port| {
                        select_backends(
                            &port.on_node(node, local_cluster),
                            &self.global,
                            local_cluster,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
        let mut add = |kind: FrontendKind, address: Option<Ipv4Addr>, index: usize| {
            let port = &self.ports[index];
            let port_number = match (kind, port.node_port) {
                (FrontendKind::NodePort, Some(node_port)) => node_port,
                (FrontendKind::NodePort, None) => return,
                _ => port.port,
            };
            let frontend = Frontend {
                kind,
                address,
                port: port_number,
                protocol: port.protocol,
            };
            if !seen.insert((address, port_number, port.protocol)) {
                return;
            }
            let local_only = match kind {
                FrontendKind::ClusterIp => self.internal_traffic_local,
                _ => self.external_traffic_local,
            };
            let (active, draining) = if local_only {
                node_local[index].clone()
            } else {
                selected[index].clone()
            };
            plans.push(FrontendPlan {
                frontend,
                namespace: self.namespace.clone(),
                service: self.name.clone(),
                port_name: port.name.clone(),
                active,
                draining,
                affinity_timeout: self.session_affinity_timeout,
            });
        };
        for &address in &self.cluster_ips {
            for index in 0..self.ports.len() {
                add(FrontendKind::ClusterIp, Some(address), index);
            }
        }
        for index in 0..self.ports.len() {
            add(FrontendKind::NodePort, None, index);
        }
        for &address in &self.external_ips {
            for index in 0..self.ports.len() {
                add(FrontendKind::ExternalIp, Some(address), index);
            }
        }
        for &address in &self.load_balancer_ips {
            for index in 0..self.ports.len() {
                add(FrontendKind::LoadBalancer, Some(address), index);
            }
        }
        plans
    }
}

/// Splits backends by affinity into (preferred, passed over). With no preferred backend the
/// other side is preferred instead: affinity is a preference, never a reason to fail.
fn prefer(
    backends: Vec<Backend>,
    affinity: Affinity,
    local_cluster: u16,
) -> (Vec<Backend>, Vec<Backend>) {
    let (local, remote): (Vec<_>, Vec<_>) = backends
        .into_iter()
        .partition(|backend| backend.cluster_id == local_cluster);
    match affinity {
        Affinity::None => {
            let mut all = local;
            all.extend(remote);
            (all, Vec::new())
        }
        Affinity::Local if !local.is_empty() => (local, remote),
        Affinity::Local => (remote, local),
        Affinity::Remote if !remote.is_empty() => (remote, local),
        Affinity::Remote => (local, remote),
    }
}

/// Which backends of a port take new connections and which drain.
///
/// Backends of other clusters count only for a global service. Among ready backends, affinity
/// picks which take new connections; ready ones it passes over drain, as terminating ones do.
/// When no backend is ready, serving terminating ones take new connections (Kubernetes
/// `ProxyTerminatingEndpoints`, KEP-1669), again by affinity. Not-serving backends appear in
/// neither list. Both lists are sorted by address, port and cluster, each backend once.
pub fn select_backends(
    port: &ServicePort,
    global: &GlobalSettings,
    local_cluster: u16,
) -> (Vec<Backend>, Vec<Backend>) {
    let candidates = dedup_backends(
        port.backends
            .iter()
            .filter(|backend| global.global || backend.cluster_id == local_cluster)
            .cloned(),
    );
    let (ready, rest): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|backend| backend.condition == BackendCondition::Ready);
    let terminating: Vec<_> = rest
        .into_iter()
        .filter(|backend| backend.condition == BackendCondition::Terminating)
        .collect();

    let (mut active, mut draining) = if ready.is_empty() {
        prefer(terminating, global.affinity, local_cluster)
    } else {
        let (active, mut passed_over) = prefer(ready, global.affinity, local_cluster);
        passed_over.extend(terminating);
        (active, passed_over)
    };
    active.sort_by_key(Backend::key);
    draining.sort_by_key(Backend::key);
    (active, draining)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: u16 = 1;
    const REMOTE: u16 = 2;

    fn backend(address: &str, cluster_id: u16, condition: BackendCondition) -> Backend {
        Backend {
            address: address.parse().expect("test address"),
            port: 8080,
            cluster_id,
            condition,
            node: None,
            pod: None,
        }
    }

    fn ready(address: &str, cluster_id: u16) -> Backend {
        backend(address, cluster_id, BackendCondition::Ready)
    }

    fn terminating(address: &str, cluster_id: u16) -> Backend {
        backend(address, cluster_id, BackendCondition::Terminating)
    }

    fn not_serving(address: &str, cluster_id: u16) -> Backend {
        backend(address, cluster_id, BackendCondition::NotServing)
    }

    fn port(backends: Vec<Backend>) -> ServicePort {
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            backends,
        }
    }

    fn global(affinity: Affinity) -> GlobalSettings {
        GlobalSettings {
            global: true,
            shared: true,
            affinity,
        }
    }

    fn addresses(backends: &[Backend]) -> Vec<String> {
        backends.iter().map(|b| b.address.to_string()).collect()
    }

    /// Two local and two remote backends, ready, plus one terminating of each side.
    fn mixed() -> ServicePort {
        port(vec![
            ready("10.2.0.2", REMOTE),
            ready("10.1.0.2", LOCAL),
            ready("10.2.0.1", REMOTE),
            ready("10.1.0.1", LOCAL),
            terminating("10.1.0.9", LOCAL),
            terminating("10.2.0.9", REMOTE),
        ])
    }

    #[test]
    fn protocol_numbers_and_names_are_the_ones_on_the_wire() {
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(Protocol::Udp.number(), 17);
        assert_eq!(Protocol::Tcp.name(), "TCP");
        assert_eq!(Protocol::Udp.name(), "UDP");
        assert_eq!(
            serde_json::to_string(&Protocol::Udp).expect("serialize"),
            "\"UDP\""
        );
    }

    #[test]
    fn global_settings_default_to_a_local_shared_service_without_affinity() {
        let defaults = GlobalSettings::default();
        assert!(!defaults.global);
        assert!(defaults.shared);
        assert_eq!(defaults.affinity, Affinity::None);
    }

    #[test]
    fn local_affinity_prefers_local_ready_backends_and_keeps_remote_ones_for_established_flows() {
        let (active, draining) = select_backends(&mixed(), &global(Affinity::Local), LOCAL);
        assert_eq!(addresses(&active), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(
            addresses(&draining),
            ["10.1.0.9", "10.2.0.1", "10.2.0.2", "10.2.0.9"]
        );
    }

    #[test]
    fn local_affinity_fails_over_to_remote_when_no_local_backend_is_ready() {
        let service_port = port(vec![
            not_serving("10.1.0.1", LOCAL),
            ready("10.2.0.1", REMOTE),
            ready("10.2.0.2", REMOTE),
        ]);
        let (active, draining) = select_backends(&service_port, &global(Affinity::Local), LOCAL);
        assert_eq!(addresses(&active), ["10.2.0.1", "10.2.0.2"]);
        assert!(draining.is_empty());
    }

    #[test]
    fn remote_affinity_prefers_remote_ready_backends_and_falls_back_to_local() {
        let (active, _) = select_backends(&mixed(), &global(Affinity::Remote), LOCAL);
        assert_eq!(addresses(&active), ["10.2.0.1", "10.2.0.2"]);

        let only_local = port(vec![
            ready("10.1.0.1", LOCAL),
            not_serving("10.2.0.1", REMOTE),
        ]);
        let (active, draining) = select_backends(&only_local, &global(Affinity::Remote), LOCAL);
        assert_eq!(addresses(&active), ["10.1.0.1"]);
        assert!(draining.is_empty());
    }

    #[test]
    fn no_affinity_balances_over_every_ready_backend_of_every_cluster() {
        let (active, draining) = select_backends(&mixed(), &global(Affinity::None), LOCAL);
        assert_eq!(
            addresses(&active),
            ["10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.2"]
        );
        assert_eq!(addresses(&draining), ["10.1.0.9", "10.2.0.9"]);
    }

    #[test]
    fn a_service_that_is_not_global_ignores_remote_backends() {
        let settings = GlobalSettings {
            global: false,
            affinity: Affinity::Remote,
            ..GlobalSettings::default()
        };
        let (active, draining) = select_backends(&mixed(), &settings, LOCAL);
        assert_eq!(addresses(&active), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(addresses(&draining), ["10.1.0.9"]);

        // Even with no local backend at all, remote ones stay out.
        let only_remote = port(vec![ready("10.2.0.1", REMOTE)]);
        let (active, draining) = select_backends(&only_remote, &settings, LOCAL);
        assert!(active.is_empty() && draining.is_empty());
    }

    #[test]
    fn shared_does_not_change_what_this_cluster_balances_over() {
        let private = GlobalSettings {
            shared: false,
            ..global(Affinity::None)
        };
        assert_eq!(
            select_backends(&mixed(), &private, LOCAL),
            select_backends(&mixed(), &global(Affinity::None), LOCAL)
        );
    }

    #[test]
    fn terminating_backends_take_new_connections_only_when_none_is_ready() {
        let rolling = port(vec![
            terminating("10.1.0.3", LOCAL),
            not_serving("10.1.0.4", LOCAL),
            terminating("10.1.0.1", LOCAL),
        ]);
        let (active, draining) = select_backends(&rolling, &GlobalSettings::default(), LOCAL);
        assert_eq!(addresses(&active), ["10.1.0.1", "10.1.0.3"]);
        assert!(draining.is_empty());

        let mut recovered = rolling.clone();
        recovered.backends.push(ready("10.1.0.5", LOCAL));
        let (active, draining) = select_backends(&recovered, &GlobalSettings::default(), LOCAL);
        assert_eq!(addresses(&active), ["10.1.0.5"]);
        assert_eq!(addresses(&draining), ["10.1.0.1", "10.1.0.3"]);
    }

    #[test]
    fn not_serving_backends_get_nothing() {
        let down = port(vec![not_serving("10.1.0.1", LOCAL)]);
        let (active, draining) = select_backends(&down, &GlobalSettings::default(), LOCAL);
        assert!(active.is_empty() && draining.is_empty());
    }

    #[test]
    fn a_backend_reported_twice_counts_once_with_its_best_condition() {
        let mut duplicate = ready("10.1.0.1", LOCAL);
        duplicate.node = Some("node-a".into());
        let twice = port(vec![
            terminating("10.1.0.1", LOCAL),
            ready("10.1.0.1", LOCAL),
            duplicate,
            ready("10.1.0.1", REMOTE),
        ]);
        let (active, draining) = select_backends(&twice, &global(Affinity::None), LOCAL);
        assert_eq!(active.len(), 2, "{active:?}");
        assert_eq!(active[0].condition, BackendCondition::Ready);
        assert_eq!(active[0].cluster_id, LOCAL);
        assert_eq!(active[1].cluster_id, REMOTE);
        assert!(draining.is_empty());
    }

    fn web() -> Service {
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 10)],
            external_ips: vec![Ipv4Addr::new(192, 0, 2, 7)],
            load_balancer_ips: vec![Ipv4Addr::new(203, 0, 113, 5)],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    backends: vec![ready("10.1.0.1", LOCAL), terminating("10.1.0.2", LOCAL)],
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None,
                    backends: vec![ready("10.1.0.3", LOCAL)],
                },
            ],
            session_affinity_timeout: Some(Duration::from_secs(10800)),
            global: GlobalSettings::default(),
            external_traffic_local: false,
            internal_traffic_local: false,
            health_check_node_port: None,
        }
    }

    fn frontend(
        kind: FrontendKind,
        address: Option<&str>,
        port: u16,
        protocol: Protocol,
    ) -> Frontend {
        Frontend {
            kind,
            address: address.map(|a| a.parse().expect("test address")),
            port,
            protocol,
        }
    }

    #[test]
    fn frontends_cover_cluster_ip_node_port_external_and_load_balancer_addresses() {
        use FrontendKind::*;
        use Protocol::*;
        let plans = web().frontends(LOCAL, "node-a");
        let frontends: Vec<Frontend> = plans.iter().map(|plan| plan.frontend).collect();
        assert_eq!(
            frontends,
            [
                frontend(ClusterIp, Some("10.96.0.10"), 80, Tcp),
                frontend(ClusterIp, Some("10.96.0.10"), 53, Udp),
                frontend(NodePort, None, 30080, Tcp),
                frontend(ExternalIp, Some("192.0.2.7"), 80, Tcp),
                frontend(ExternalIp, Some("192.0.2.7"), 53, Udp),
                frontend(LoadBalancer, Some("203.0.113.5"), 80, Tcp),
                frontend(LoadBalancer, Some("203.0.113.5"), 53, Udp),
            ]
        );
        for plan in &plans {
            assert_eq!(
                (plan.namespace.as_str(), plan.service.as_str()),
                ("shop", "web")
            );
            assert_eq!(plan.affinity_timeout, Some(Duration::from_secs(10800)));
            match plan.frontend.protocol {
                Tcp => {
                    assert_eq!(plan.port_name, "http");
                    assert_eq!(addresses(&plan.active), ["10.1.0.1"]);
                    assert_eq!(addresses(&plan.draining), ["10.1.0.2"]);
                }
                Udp => {
                    assert_eq!(plan.port_name, "dns");
                    assert_eq!(addresses(&plan.active), ["10.1.0.3"]);
                    assert!(plan.draining.is_empty());
                }
            }
        }
    }

    fn on(node: &str, mut backend: Backend) -> Backend {
        backend.node = Some(node.into());
        backend
    }

    #[test]
    fn traffic_policies_of_local_leave_each_node_its_own_backends() {
        let mut service = web();
        service.ports[0].backends = vec![
            on("node-a", ready("10.1.0.1", LOCAL)),
            on("node-b", ready("10.1.1.1", LOCAL)),
            on("node-b", terminating("10.1.1.2", LOCAL)),
        ];
        service.external_traffic_local = true;
        let http = |service: &Service,
                    node: &str,
                    kind: FrontendKind|
         -> (Vec<String>, Vec<String>) {
            let plan = service
                .frontends(LOCAL, node)
                .into_iter()
                .find(|plan| plan.frontend.kind == kind && plan.frontend.protocol == Protocol::Tcp)
                .expect("an http frontend");
            (addresses(&plan.active), addresses(&plan.draining))
        };
        use FrontendKind::*;
        for kind in [NodePort, ExternalIp, LoadBalancer] {
            assert_eq!(http(&service, "node-a", kind).0, ["10.1.0.1"], "{kind:?}");
            assert_eq!(
                http(&service, "node-b", kind),
                (vec!["10.1.1.1".to_string()], vec!["10.1.1.2".to_string()]),
                "{kind:?}"
            );
            assert!(
                http(&service, "node-c", kind).0.is_empty(),
                "no local backend: none"
            );
        }
        // Cluster IPs still reach every backend, until internalTrafficPolicy says Local.
        assert_eq!(
            http(&service, "node-c", ClusterIp).0,
            ["10.1.0.1", "10.1.1.1"]
        );
        service.external_traffic_local = false;
        service.internal_traffic_local = true;
        assert_eq!(http(&service, "node-a", ClusterIp).0, ["10.1.0.1"]);
        assert!(http(&service, "node-c", ClusterIp).0.is_empty());
        assert_eq!(
            http(&service, "node-c", NodePort).0,
            ["10.1.0.1", "10.1.1.1"]
        );
    }

    #[test]
    fn tcp_and_udp_on_the_same_port_are_separate_frontends() {
        let mut dns = web();
        dns.external_ips.clear();
        dns.load_balancer_ips.clear();
        dns.ports[0].port = 53;
        dns.ports[0].node_port = None;
        let frontends: Vec<(u16, Protocol)> = dns
            .frontends(LOCAL, "node-a")
            .iter()
            .map(|plan| (plan.frontend.port, plan.frontend.protocol))
            .collect();
        assert_eq!(frontends, [(53, Protocol::Tcp), (53, Protocol::Udp)]);
    }

    #[test]
    fn an_address_listed_twice_makes_one_frontend() {
        let mut service = web();
        service.external_ips.push(Ipv4Addr::new(192, 0, 2, 7));
        service.load_balancer_ips = vec![Ipv4Addr::new(192, 0, 2, 7)];
        let kinds: Vec<FrontendKind> = service
            .frontends(LOCAL, "node-a")
            .iter()
            .filter(|plan| plan.frontend.address == Some(Ipv4Addr::new(192, 0, 2, 7)))
            .map(|plan| plan.frontend.kind)
            .collect();
        assert_eq!(kinds, [FrontendKind::ExternalIp, FrontendKind::ExternalIp]);
    }

    #[test]
    fn a_cluster_ip_service_without_node_ports_has_only_cluster_ip_frontends() {
        let mut service = web();
        service.external_ips.clear();
        service.load_balancer_ips.clear();
        service.ports[0].node_port = None;
        service.cluster_ips.push(Ipv4Addr::new(10, 96, 0, 11));
        assert!(service
            .frontends(LOCAL, "node-a")
            .iter()
            .all(|plan| plan.frontend.kind == FrontendKind::ClusterIp));
        assert_eq!(service.frontends(LOCAL, "node-a").len(), 4);
    }
}
