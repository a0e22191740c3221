//! What the node's load-balancing maps should hold, kept across changes: each service's
//! frontends are planned when the service changes, and the claims on every frontend, the
//! backends they use and the Maglev tables their active sets need are counted, so a change
//! names exactly the frontends, backends and tables it touched.
//!
//! A frontend two claim goes to the first claimant: services by namespace/name, then pods'
//! host ports; when the first goes, the next takes over. A backend drains (new connections
//! pass it over) when no frontend has it active and some frontend drains it as terminating.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use weft_core::service::{Backend, BackendCondition, FrontendKind, Protocol, Service};
use weft_core::state::HostPort;
use weft_node_bpf::maps::{LbBackend, LbFrontendKey, LbFrontendKind};

use crate::health_check::{HealthCheck, HealthChecks};
use crate::node::EndpointRecord;

/// A Service by namespace and name.
pub type ServiceName = (String, String);

/// A backend as the datapath knows it: one address and port in one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendRef {
    pub address: Ipv4Addr,
    pub port: u16,
    pub cluster_id: u16,
}

impl BackendRef {
    pub fn of_backend(backend: &Backend) -> Self {
        Self {
            address: backend.address,
            port: backend.port,
            cluster_id: backend.cluster_id,
        }
    }

    /// The backend an `lb_backends` entry describes.
    pub fn of_entry(entry: &LbBackend) -> Self {
        Self {
            address: Ipv4Addr::from(u32::from_be(entry.address)),
            port: u16::from_be(entry.port),
            cluster_id: entry.cluster_id,
        }
    }

    /// What Maglev hashes: the same on every node, so every node builds the same table.
    pub fn maglev_key(&self) -> String {
        format!("{}:{}@{}", self.address, self.port, self.cluster_id)
    }
}

/// A pod's `hostPort` on this node: traffic to the node's address (or `host_ip`) and
/// `host_port` goes to the pod, as the portmap CNI plugin's DNAT would send it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPortBinding {
    /// `namespace/name` of the pod.
    pub pod: String,
    pub protocol: Protocol,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub pod_ip: Ipv4Addr,
    pub container_port: u16,
}

impl HostPortBinding {
    /// The binding of `port` of the wired pod `record`; `None` for protocols not balanced.
    pub fn of(record: &EndpointRecord, port: &HostPort) -> Option<Self> {
        let protocol = match port.protocol.as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => return None,
        };
        Some(Self {
            pod: format!("{}/{}", record.pod.namespace, record.pod.name),
            protocol,
            host_ip: port.host_ip,
            host_port: port.host_port,
            pod_ip: record.ip,
            container_port: port.container_port,
        })
    }

    /// Its frontend: the pod's port, alone, behind the host port.
    fn frontend(&self, local_cluster: u16) -> (LbFrontendKey, PlannedFrontend) {
        let key = frontend_key(self.host_ip, self.host_port, self.protocol);
        let backend = BackendRef {
            address: self.pod_ip,
            port: self.container_port,
            cluster_id: local_cluster,
        };
        let frontend = PlannedFrontend {
            service_port: format!(
                "{} hostPort {}/{}",
                self.pod,
                self.host_port,
                self.protocol.name()
            ),
            kind: LbFrontendKind::HostPort,
            active: vec![backend],
            draining: Vec::new(),
            affinity_timeout_s: 0,
        };
        (key, frontend)
    }
}

fn frontend_key(address: Option<Ipv4Addr>, port: u16, protocol: Protocol) -> LbFrontendKey {
    LbFrontendKey {
        address: address.map(|a| u32::from(a).to_be()).unwrap_or(0),
        port: port.to_be(),
        protocol: protocol.number(),
        pad: 0,
    }
}

fn describe(key: &LbFrontendKey) -> String {
    let address = match key.address {
        0 => "<node>".to_owned(),
        address => Ipv4Addr::from(u32::from_be(address)).to_string(),
    };
    let protocol = match key.protocol {
        6 => "TCP",
        17 => "UDP",
        _ => "?",
    };
    format!("{address}:{}/{protocol}", u16::from_be(key.port))
}

/// One frontend as planned: who gets new connections, for how long a client sticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFrontend {
    /// `namespace/name:port` of the service port, for affinity and logs.
    pub service_port: String,
    pub kind: LbFrontendKind,
    /// Sorted; empty makes the frontend refuse new connections.
    pub active: Vec<BackendRef>,
    /// Backends kept for established connections, and whether each is terminating.
    pub draining: Vec<(BackendRef, bool)>,
    pub affinity_timeout_s: u32,
}

/// One service's part of the plan: its frontends on this node and its health-check port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub frontends: Vec<(LbFrontendKey, PlannedFrontend)>,
    pub health_check: Option<(u16, HealthCheck)>,
}

/// Plans `service`'s frontends on `node`.
pub fn plan_service(service: &Service, local_cluster: u16, node: &str) -> ServicePlan {
    let frontends = service.frontends(local_cluster, node);
    let health_check = service.health_check_node_port.map(|port| {
        // Its external frontends balance over this node's backends only; a pod serving
        // several ports is one endpoint, as kube-proxy counts them.
        let local: BTreeSet<Ipv4Addr> = frontends
            .iter()
            .filter(|frontend| frontend.frontend.kind != FrontendKind::ClusterIp)
            .flat_map(|frontend| frontend.active.iter().map(|backend| backend.address))
            .collect();
        let check = HealthCheck {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            local_endpoints: local.len(),
        };
        (port, check)
    });
    let frontends = frontends
        .into_iter()
        .map(|frontend| {
            let key = frontend_key(
                frontend.frontend.address,
                frontend.frontend.port,
                frontend.frontend.protocol,
            );
            let service_port = format!(
                "{}/{}:{}",
                frontend.namespace,
                frontend.service,
                if frontend.port_name.is_empty() {
                    frontend.frontend.port.to_string()
                } else {
                    frontend.port_name.clone()
                }
            );
            let mut active: Vec<BackendRef> =
                frontend.active.iter().map(BackendRef::of_backend).collect();
            active.sort();
            active.dedup();
            let mut draining: Vec<(BackendRef, bool)> = Vec::new();
            for backend in &frontend.draining {
                let backend_ref = BackendRef::of_backend(backend);
                if !draining.iter().any(|(known, _)| *known == backend_ref) {
                    draining.push((
                        backend_ref,
                        backend.condition == BackendCondition::Terminating,
                    ));
                }
            }
            let planned = PlannedFrontend {
                service_port,
                kind: match frontend.frontend.kind {
                    FrontendKind::ClusterIp => LbFrontendKind::ClusterIp,
                    FrontendKind::NodePort => LbFrontendKind::NodePort,
                    FrontendKind::ExternalIp => LbFrontendKind::ExternalIp,
                    FrontendKind::LoadBalancer => LbFrontendKind::LoadBalancer,
                },
                active,
                draining,
                affinity_timeout_s: frontend
                    .affinity_timeout
                    .map(|timeout| u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1))
                    .unwrap_or(0),
            };
            (key, planned)
        })
        .collect();
    ServicePlan {
        frontends,
        health_check,
    }
}

/// Who claims a frontend; the order is who keeps it: services by namespace/name, then
/// pods' host ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Claimant {
    Service(ServiceName),
    HostPort(HostPortBinding),
}

/// How the winning frontends use a backend.
#[derive(Clone, Copy, Debug, Default)]
struct BackendUse {
    active: u32,
    terminating: u32,
    draining: u32,
}

impl BackendUse {
    fn unused(&self) -> bool {
        self.active == 0 && self.terminating == 0 && self.draining == 0
    }

    /// Whether the backend is kept only for established connections of terminating pods.
    fn terminating(&self) -> bool {
        self.active == 0 && self.terminating > 0
    }
}

/// What changed in the desired state since [`Desired::take_changes`] was last called: the
/// only entries a writer needs to look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub frontends: BTreeSet<LbFrontendKey>,
    pub backends: BTreeSet<BackendRef>,
    /// Active sets whose table became needed or unneeded.
    pub tables: BTreeSet<Vec<BackendRef>>,
    /// Service ports whose frontends (or what those balance over) changed.
    pub service_ports: BTreeSet<String>,
    pub health_checks: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.backends.is_empty()
            && self.tables.is_empty()
            && self.service_ports.is_empty()
            && !self.health_checks
    }

    /// Adds `other` (changes not yet written) to these.
    pub fn merge(&mut self, other: Changes) {
        self.frontends.extend(other.frontends);
        self.backends.extend(other.backends);
        self.tables.extend(other.tables);
        self.service_ports.extend(other.service_ports);
        self.health_checks |= other.health_checks;
    }
}

/// The node's load-balancing state as wanted, kept across changes.
#[derive(Default)]
pub struct Desired {
    /// Every claim on each frontend; the first claimant's frontend is the one in force.
    claims: HashMap<LbFrontendKey, BTreeMap<Claimant, PlannedFrontend>>,
    /// Each service's plan as last set.
    services: HashMap<ServiceName, ServicePlan>,
    host_ports: BTreeSet<HostPortBinding>,
    /// Health-check port → the services asking for it; the first answers.
    health_claims: BTreeMap<u16, BTreeMap<ServiceName, HealthCheck>>,
    /// How the frontends in force use each backend.
    backends: HashMap<BackendRef, BackendUse>,
    /// Active set → how many frontends in force balance over it.
    tables: HashMap<Vec<BackendRef>, usize>,
    /// Service port → its frontends in force.
    by_service_port: HashMap<String, BTreeSet<LbFrontendKey>>,
    changes: Changes,
    /// Frontends claimed twice, touched since the last [`Desired::take_conflicts`].
    contested: BTreeSet<LbFrontendKey>,
    health_contested: BTreeSet<u16>,
}

impl Desired {
    /// Sets `name`'s plan (`None`: the service is gone).
    pub fn set_service(&mut self, name: &ServiceName, plan: Option<ServicePlan>) {
        let before = self.services.remove(name).unwrap_or_default();
        let after = plan.unwrap_or_default();
        let claimant = Claimant::Service(name.clone());
        self.replace_claims(&claimant, &before.frontends, &after.frontends);
        if before.health_check != after.health_check {
            if let Some((port, _)) = &before.health_check {
                if let Some(claims) = self.health_claims.get_mut(port) {
                    claims.remove(name);
                    if claims.is_empty() {
                        self.health_claims.remove(port);
                    }
                }
                self.health_contested.insert(*port);
            }
            if let Some((port, check)) = &after.health_check {
                self.health_claims
                    .entry(*port)
                    .or_default()
                    .insert(name.clone(), check.clone());
                self.health_contested.insert(*port);
            }
            self.changes.health_checks = true;
        }
        if after != ServicePlan::default() {
            self.services.insert(name.clone(), after);
        }
    }

    /// Sets the node's pods' host ports to `bindings`.
    pub fn set_host_ports(&mut self, bindings: &[HostPortBinding], local_cluster: u16) {
        let after: BTreeSet<HostPortBinding> = bindings.iter().cloned().collect();
        let gone: Vec<HostPortBinding> = self.host_ports.difference(&after).cloned().collect();
        let new: Vec<HostPortBinding> = after.difference(&self.host_ports).cloned().collect();
        for binding in gone {
            let frontend = binding.frontend(local_cluster);
            self.replace_claims(&Claimant::HostPort(binding), &[frontend], &[]);
        }
        for binding in new {
            let frontend = binding.frontend(local_cluster);
            self.replace_claims(&Claimant::HostPort(binding), &[], &[frontend]);
        }
        self.host_ports = after;
    }

    /// Replaces `claimant`'s claims `before` with `after`; a frontend whose claim in force
    /// changes is counted out with its old version and in with its new one.
    fn replace_claims(
        &mut self,
        claimant: &Claimant,
        before: &[(LbFrontendKey, PlannedFrontend)],
        after: &[(LbFrontendKey, PlannedFrontend)],
    ) {
        let before: HashMap<&LbFrontendKey, &PlannedFrontend> = before
            .iter()
            .map(|(key, frontend)| (key, frontend))
            .collect();
        let after_by_key: HashMap<&LbFrontendKey, &PlannedFrontend> = after
            .iter()
            .map(|(key, frontend)| (key, frontend))
            .collect();
        let keys: BTreeSet<LbFrontendKey> = before
            .keys()
            .chain(after_by_key.keys())
            .map(|key| **key)
            .collect();
        for key in keys {
            let wanted = after_by_key.get(&key).copied();
            if before.get(&key).copied() == wanted {
                continue;
            }
            let claims = self.claims.entry(key).or_default();
            let in_force_before = claims
                .iter()
                .next()
                .map(|(who, frontend)| (who.clone(), frontend.clone()));
            match wanted {
                Some(frontend) => {
                    claims.insert(claimant.clone(), frontend.clone());
                }
                None => {
                    claims.remove(claimant);
                }
            }
            let in_force_after = claims
                .iter()
                .next()
                .map(|(who, frontend)| (who.clone(), frontend.clone()));
            if claims.len() > 1 {
                self.contested.insert(key);
            }
            if claims.is_empty() {
                self.claims.remove(&key);
            }
            if in_force_before != in_force_after {
                if let Some((_, frontend)) = &in_force_before {
                    self.count(key, frontend, false);
                }
                if let Some((_, frontend)) = &in_force_after {
                    self.count(key, frontend, true);
                }
                self.changes.frontends.insert(key);
            }
        }
    }

    /// Counts `frontend` at `key` in (`up`) or out of what backends, tables and service ports
    /// the frontends in force use, noting each as changed.
    fn count(&mut self, key: LbFrontendKey, frontend: &PlannedFrontend, up: bool) {
        let step = |count: &mut u32| {
            if up {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
            }
        };
        let uses = frontend
            .active
            .iter()
            .map(|backend| (*backend, None))
            .chain(
                frontend
                    .draining
                    .iter()
                    .map(|(backend, terminating)| (*backend, Some(*terminating))),
            );
        for (backend, draining) in uses {
            let usage = self.backends.entry(backend).or_default();
            match draining {
                None => step(&mut usage.active),
                Some(true) => step(&mut usage.terminating),
                Some(false) => step(&mut usage.draining),
            }
            if usage.unused() {
                self.backends.remove(&backend);
            }
            self.changes.backends.insert(backend);
        }
        if !frontend.active.is_empty() {
            let users = self.tables.entry(frontend.active.clone()).or_default();
            if up {
                *users += 1;
            } else {
                *users = users.saturating_sub(1);
            }
            if *users == 0 || (up && *users == 1) {
                self.changes.tables.insert(frontend.active.clone());
            }
            if *users == 0 {
                self.tables.remove(&frontend.active);
            }
        }
        let keys = self
            .by_service_port
            .entry(frontend.service_port.clone())
            .or_default();
        if up {
            keys.insert(key);
        } else {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_service_port.remove(&frontend.service_port);
            }
        }
        self.changes
            .service_ports
            .insert(frontend.service_port.clone());
    }

    /// The frontend in force at `key`.
    pub fn frontend(&self, key: &LbFrontendKey) -> Option<&PlannedFrontend> {
        self.claims.get(key)?.values().next()
    }

    /// Whether `backend` is wanted, and if so whether it only drains terminating pods'
    /// connections.
    pub fn backend(&self, backend: &BackendRef) -> Option<bool> {
        self.backends.get(backend).map(BackendUse::terminating)
    }

    /// Whether a frontend in force balances over `active`.
    pub fn table_used(&self, active: &[BackendRef]) -> bool {
        self.tables.contains_key(active)
    }

    /// The frontends in force of `service_port`.
    pub fn frontends_of(&self, service_port: &str) -> impl Iterator<Item = &PlannedFrontend> {
        self.by_service_port
            .get(service_port)
            .into_iter()
            .flatten()
            .filter_map(|key| self.frontend(key))
    }

    /// What the node's health-check ports answer: the first service asking for each.
    pub fn health_checks(&self) -> HealthChecks {
        self.health_claims
            .iter()
            .filter_map(|(port, claims)| Some((*port, claims.values().next()?.clone())))
            .collect()
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The claims that lost, among the frontends and health-check ports touched since the
    /// last call, described.
    pub fn take_conflicts(&mut self) -> Vec<String> {
        let mut conflicts = Vec::new();
        for key in std::mem::take(&mut self.contested) {
            let Some(claims) = self.claims.get(&key) else {
                continue;
            };
            let mut claims = claims.values();
            let Some(winner) = claims.next() else {
                continue;
            };
            for loser in claims {
                conflicts.push(if loser.kind == LbFrontendKind::HostPort {
                    format!("{} is already {}", loser.service_port, winner.service_port)
                } else {
                    format!(
                        "{} wants {}, which {} already has",
                        loser.service_port,
                        describe(&key),
                        winner.service_port
                    )
                });
            }
        }
        for port in std::mem::take(&mut self.health_contested) {
            let Some(claims) = self.health_claims.get(&port) else {
                continue;
            };
            let mut claims = claims.values();
            let Some(winner) = claims.next() else {
                continue;
            };
            for loser in claims {
                conflicts.push(format!(
                    "{}/{} wants health check port {port}, which {}/{} already has",
                    loser.namespace, loser.name, winner.namespace, winner.name
                ));
            }
        }
        conflicts
    }

    /// The whole plan in force: what a plan from scratch must equal.
    #[cfg(test)]
    pub fn snapshot(&self) -> Plan {
        Plan {
            frontends: self
                .claims
                .keys()
                .filter_map(|key| Some((*key, self.frontend(key)?.clone())))
                .collect(),
            backends: self
                .backends
                .iter()
                .map(|(backend, usage)| (*backend, usage.terminating()))
                .collect(),
            health_checks: self.health_checks(),
        }
    }
}

/// The whole node's load-balancing state, before ids are assigned.
#[cfg(test)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub frontends: BTreeMap<LbFrontendKey, PlannedFrontend>,
    /// Every backend a frontend uses or drains, and whether it drains a terminating pod.
    pub backends: BTreeMap<BackendRef, bool>,
    /// What the node's health-check ports answer.
    pub health_checks: HealthChecks,
}

/// Plans the datapath of `node` for `services` and its pods' `host_ports` from scratch, with
/// the conflicts found.
#[cfg(test)]
pub fn plan<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    local_cluster: u16,
    node: &str,
    host_ports: &[HostPortBinding],
) -> (Plan, Vec<String>) {
    let mut desired = Desired::default();
    for service in services {
        desired.set_service(
            &(service.namespace.clone(), service.name.clone()),
            Some(plan_service(service, local_cluster, node)),
        );
    }
    desired.set_host_ports(host_ports, local_cluster);
    let conflicts = desired.take_conflicts();
    (desired.snapshot(), conflicts)
}
