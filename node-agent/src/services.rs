//! Service load balancing on this node: reads the cluster's Services, EndpointSlices and
//! GlobalServices, keeps the last good version of a Service that turns invalid, plans
//! frontends, backends and Maglev tables, and writes the datapath's load-balancing maps.
//!
//! Updates never open a gap: backends and tables first, then frontends switch over, then what
//! nothing references any more goes. Services whose active backends are the same set share
//! one Maglev table, so memory grows with distinct backend sets, not with services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use tokio::sync::watch;

use weft_core::service::maglev::{self, TableSize};
use weft_core::service::{Backend, BackendCondition, FrontendKind, Protocol, Service};
use weft_crds::service_model::{self, ServiceError};
use weft_node_bpf::maps::{
    LbBackend, LbFrontend, LbFrontendKey, LbFrontendKind, LB_BACKEND_TERMINATING,
};

use crate::datapath::{Datapath, DatapathError};
use crate::health_check::{HealthCheck, HealthChecks};
use crate::node::EndpointRecord;
use crate::state::{Changed, ClusterState, TableView};
use weft_core::state::HostPort;
use weft_core::state::ServiceObject;

/// A backend as the datapath knows it: one address and port in one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendRef {
    pub address: Ipv4Addr,
    pub port: u16,
    pub cluster_id: u16,
}

impl BackendRef {
    fn of(backend: &Backend) -> Self {
        Self {
            address: backend.address,
            port: backend.port,
            cluster_id: backend.cluster_id,
        }
    }

    /// The backend an `lb_backends` entry describes.
    fn of_entry(entry: &LbBackend) -> Self {
        Self {
            address: Ipv4Addr::from(u32::from_be(entry.address)),
            port: u16::from_be(entry.port),
            cluster_id: entry.cluster_id,
        }
    }

    /// What Maglev hashes: the same on every node, so every node builds the same table.
    fn maglev_key(&self) -> String {
        format!("{}:{}@{}", self.address, self.port, self.cluster_id)
    }
}

/// A pod's `hostPort` on this node: traffic to the node's address (or `host_ip`) and
/// `host_port` goes to the pod, as the portmap CNI plugin's DNAT would send it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
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
}

/// One frontend as planned: who gets new connections, for how long a client sticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFrontend {
    /// `namespace/name:port` of the service port, for affinity and logs.
    pub service_port: String,
    pub kind: LbFrontendKind,
    /// Sorted; empty makes the frontend refuse new connections.
    pub active: Vec<BackendRef>,
    pub affinity_timeout_s: u32,
}

/// The whole node's load-balancing state, before ids are assigned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub frontends: BTreeMap<LbFrontendKey, PlannedFrontend>,
    /// Every backend a frontend uses or drains, and whether it drains.
    pub backends: BTreeMap<BackendRef, bool>,
    /// What the node's health-check ports answer.
    pub health_checks: HealthChecks,
}

/// Plans the datapath of `node` for `services` and its pods' `host_ports`; a frontend two
/// claim goes to the first (services by namespace/name, then host ports), and the other is
/// reported.
pub fn plan<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    local_cluster: u16,
    node: &str,
    host_ports: &[HostPortBinding],
) -> (Plan, Vec<String>) {
    let mut plan = Plan::default();
    let mut conflicts = Vec::new();
    let mut sorted: Vec<&Service> = services.into_iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for service in sorted {
        let frontends = service.frontends(local_cluster, node);
        if let Some(port) = service.health_check_node_port {
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
            if let Some(existing) = plan.health_checks.get(&port) {
                conflicts.push(format!(
                    "{}/{} wants health check port {port}, which {}/{} already has",
                    service.namespace, service.name, existing.namespace, existing.name
                ));
            } else {
                plan.health_checks.insert(port, check);
            }
        }
        for frontend in frontends {
            let key = LbFrontendKey {
                address: frontend
                    .frontend
                    .address
                    .map(|address| u32::from(address).to_be())
                    .unwrap_or(0),
                port: frontend.frontend.port.to_be(),
                protocol: frontend.frontend.protocol.number(),
                pad: 0,
            };
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
            if let Some(existing) = plan.frontends.get(&key) {
                conflicts.push(format!(
                    "{service_port} wants {}:{}/{}, which {} already has",
                    frontend
                        .frontend
                        .address
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "<node>".into()),
                    frontend.frontend.port,
                    frontend.frontend.protocol.name(),
                    existing.service_port
                ));
                continue;
            }
            let mut active: Vec<BackendRef> = frontend.active.iter().map(BackendRef::of).collect();
            active.sort();
            active.dedup();
            for backend in &frontend.active {
                plan.backends.insert(BackendRef::of(backend), false);
            }
            for backend in &frontend.draining {
                plan.backends
                    .entry(BackendRef::of(backend))
                    .or_insert(backend.condition == BackendCondition::Terminating);
            }
            plan.frontends.insert(
                key,
                PlannedFrontend {
                    service_port,
                    kind: match frontend.frontend.kind {
                        FrontendKind::ClusterIp => LbFrontendKind::ClusterIp,
                        FrontendKind::NodePort => LbFrontendKind::NodePort,
                        FrontendKind::ExternalIp => LbFrontendKind::ExternalIp,
                        FrontendKind::LoadBalancer => LbFrontendKind::LoadBalancer,
                    },
                    active,
                    affinity_timeout_s: frontend
                        .affinity_timeout
                        .map(|timeout| u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1))
                        .unwrap_or(0),
                },
            );
        }
    }
    for binding in host_ports {
        let key = LbFrontendKey {
            address: binding
                .host_ip
                .map(|address| u32::from(address).to_be())
                .unwrap_or(0),
            port: binding.host_port.to_be(),
            protocol: binding.protocol.number(),
            pad: 0,
        };
        let name = format!(
            "{} hostPort {}/{}",
            binding.pod,
            binding.host_port,
            binding.protocol.name()
        );
        if let Some(existing) = plan.frontends.get(&key) {
            conflicts.push(format!("{name} is already {}", existing.service_port));
            continue;
        }
        let backend = BackendRef {
            address: binding.pod_ip,
            port: binding.container_port,
            cluster_id: local_cluster,
        };
        // A service draining the same pod keeps its flag: that is about the service's traffic.
        plan.backends.entry(backend).or_insert(false);
        plan.frontends.insert(
            key,
            PlannedFrontend {
                service_port: name,
                kind: LbFrontendKind::HostPort,
                active: vec![backend],
                affinity_timeout_s: 0,
            },
        );
    }
    (plan, conflicts)
}

/// What this node's maps hold, by the ids the engine gave out.
#[derive(Default)]
struct Installed {
    frontends: BTreeMap<LbFrontendKey, LbFrontend>,
    backends: BTreeMap<BackendRef, (u32, LbBackend)>,
    /// Active backend set → table id.
    tables: BTreeMap<Vec<BackendRef>, u32>,
    service_ids: BTreeMap<String, u32>,
    /// Ids in `service_ids`.
    used_service_ids: BTreeSet<u32>,
    /// The service id an earlier agent gave each frontend: the same service port keeps it,
    /// so session-affinity choices (keyed by service id) survive a restart.
    adopted_service_ids: BTreeMap<LbFrontendKey, u32>,
    /// Left by an earlier agent: replaced, then removed, on the first sync.
    stale_frontends: BTreeSet<LbFrontendKey>,
    stale_backends: BTreeSet<u32>,
    stale_tables: BTreeSet<u32>,
    next_backend_id: u32,
    next_table_id: u32,
    next_service_id: u32,
    /// Backends removed since [`ServiceEngine::take_removed_backends`] was last called.
    removed: Vec<BackendRef>,
    /// Service id → the ids of the backends taking its new connections, as last applied.
    active_by_service: BTreeMap<u32, BTreeSet<u32>>,
}

/// Forgets affinity choices an adopted state no longer backs: a service id no frontend has
/// now, or a backend that is not among that service's `active` ones.
fn prune_affinity(
    datapath: &mut Datapath,
    active: &BTreeMap<u32, BTreeSet<u32>>,
) -> Result<(), DatapathError> {
    datapath.retain_affinity(|key, choice| {
        active
            .get(&key.service_id)
            .is_some_and(|ids| ids.contains(&choice.backend_id))
    })
}

/// A Service by namespace and name.
type ServiceName = (String, String);

/// The Service a service object takes part in: itself (a Service), the one named by its
/// `kubernetes.io/service-name` label (an EndpointSlice) or by `spec.serviceName` (a
/// GlobalService). `None` for other kinds and for a slice that names none.
fn service_of(object: &serde_json::Value) -> Option<ServiceName> {
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let name = match object["kind"].as_str()? {
        "Service" => metadata["name"].as_str(),
        "EndpointSlice" => metadata["labels"][service_model::SERVICE_NAME_LABEL].as_str(),
        "GlobalService" => object["spec"]["serviceName"].as_str(),
        _ => None,
    }?;
    Some((namespace, name.to_owned()))
}

/// The service objects (by table key) that make up each service, so that a changed object
/// leads to the few others read with it.
#[derive(Default)]
struct ObjectsByService {
    service_of: HashMap<String, ServiceName>,
    objects: HashMap<ServiceName, BTreeSet<String>>,
}

impl ObjectsByService {
    /// Files `object` under its service (which is returned), if it has one.
    fn add(&mut self, key: String, object: &serde_json::Value) -> Option<ServiceName> {
        let service = service_of(object)?;
        self.objects
            .entry(service.clone())
            .or_default()
            .insert(key.clone());
        self.service_of.insert(key, service.clone());
        Some(service)
    }

    /// Forgets the object under `key`; returns the service it was part of.
    fn forget(&mut self, key: &str) -> Option<ServiceName> {
        let service = self.service_of.remove(key)?;
        if let Some(objects) = self.objects.get_mut(&service) {
            objects.remove(key);
            if objects.is_empty() {
                self.objects.remove(&service);
            }
        }
        Some(service)
    }

    fn objects(&self, service: &ServiceName) -> impl Iterator<Item = &String> {
        self.objects.get(service).into_iter().flatten()
    }
}

/// The services in force on the node and what was written for them.
pub struct ServiceEngine {
    /// The cluster's Services, EndpointSlices and GlobalServices.
    objects: TableView<ServiceObject>,
    local_cluster: u16,
    node: String,
    health_checks: watch::Sender<HealthChecks>,
    table_size: TableSize,
    seed: u64,
    /// Each service's last valid version.
    last_good: BTreeMap<ServiceName, Service>,
    /// Each service's objects whose current version cannot be used, and why.
    problems: BTreeMap<ServiceName, Vec<ServiceError>>,
    /// Which objects make up each service.
    objects_by_service: ObjectsByService,
    installed: Installed,
    adopted: bool,
    /// The last apply failed, or an earlier agent's entries await removal.
    retry: bool,
    /// The node's pods' host ports as last planned.
    host_ports: Vec<HostPortBinding>,
}

impl ServiceEngine {
    /// `health_checks` gets what the node's health-check ports answer after every change.
    pub fn new(
        state: ClusterState,
        local_cluster: u16,
        node: String,
        table_size: TableSize,
        seed: u64,
        health_checks: watch::Sender<HealthChecks>,
    ) -> Self {
        Self {
            objects: TableView::new(state),
            local_cluster,
            node,
            health_checks,
            table_size,
            seed,
            last_good: BTreeMap::new(),
            problems: BTreeMap::new(),
            objects_by_service: ObjectsByService::default(),
            installed: Installed {
                next_backend_id: 1,
                next_table_id: 1,
                next_service_id: 1,
                ..Installed::default()
            },
            adopted: false,
            retry: false,
            host_ports: Vec::new(),
        }
    }

    /// Takes in the service objects that changed since the last call: only the services they
    /// belong to are read again (their Service, slices and GlobalServices), so one changed
    /// slice costs one service, not the cluster's. Returns whether anything changed.
    fn reload(&mut self) -> bool {
        let Some(changed) = self.objects.changed_keys() else {
            return false;
        };
        let state = self.objects.state().clone();
        let tables = state.read();
        let table = tables.table::<ServiceObject>();
        let mut dirty: BTreeSet<ServiceName> = BTreeSet::new();
        match changed {
            Changed::Keys(keys) => {
                for key in keys {
                    if let Some(before) = self.objects_by_service.forget(&key) {
                        dirty.insert(before);
                    }
                    if let Some(ServiceObject(object)) = table.get(&key) {
                        if let Some(now) = self.objects_by_service.add(key, object) {
                            dirty.insert(now);
                        }
                    }
                }
            }
            Changed::Everything => {
                dirty.extend(self.last_good.keys().cloned());
                dirty.extend(self.problems.keys().cloned());
                self.objects_by_service = ObjectsByService::default();
                for (key, ServiceObject(object)) in table.iter() {
                    if let Some(service) = self.objects_by_service.add(key.clone(), object) {
                        dirty.insert(service);
                    }
                }
            }
        }
        for service in dirty {
            let objects: Vec<serde_json::Value> = self
                .objects_by_service
                .objects(&service)
                .filter_map(|key| table.get(key))
                .map(|ServiceObject(object)| object.clone())
                .collect();
            let (models, problems) =
                service_model::services_from_objects(&objects, self.local_cluster);
            for problem in &problems {
                // The last good version (if any) stays in force.
                tracing::warn!(%problem, "cannot balance this service's current version; its last good version stays in force");
            }
            let present = objects.iter().any(|object| object["kind"] == "Service");
            let broken = problems
                .iter()
                .any(|problem| problem.object.starts_with("Service "));
            let model = models
                .into_iter()
                .find(|model| (&model.namespace, &model.name) == (&service.0, &service.1));
            match model {
                Some(model) if present => {
                    self.last_good.insert(service.clone(), model);
                }
                None if present && broken => {}
                _ => {
                    self.last_good.remove(&service);
                }
            }
            if problems.is_empty() {
                self.problems.remove(&service);
            } else {
                self.problems.insert(service, problems);
            }
        }
        true
    }

    /// Objects whose current version cannot be used, and why.
    pub fn problems(&self) -> impl Iterator<Item = &ServiceError> {
        self.problems.values().flatten()
    }

    /// Backends no service uses any more, by address and port, since the last call: sockets
    /// still connected to them need to be told (see [`crate::stale_backends`]).
    pub fn take_removed_backends(&mut self) -> BTreeSet<(Ipv4Addr, u16)> {
        std::mem::take(&mut self.installed.removed)
            .into_iter()
            .map(|backend| (backend.address, backend.port))
            .collect()
    }

    /// The services in force (for status).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.last_good.values()
    }

    /// Brings the datapath in line with the cluster's services and the node's pods'
    /// `host_ports`; does nothing when neither changed, nor before the state's sources have
    /// listed everything (what an earlier run wrote stays until then).
    pub fn sync(
        &mut self,
        datapath: &mut Datapath,
        mut host_ports: Vec<HostPortBinding>,
    ) -> Result<(), DatapathError> {
        if !self.objects.state().synced() {
            return Ok(());
        }
        if !self.adopted {
            self.adopt(datapath)?;
        }
        let reloaded = self.reload();
        host_ports.sort();
        let host_ports_changed = host_ports != self.host_ports;
        if !reloaded && !self.retry && !host_ports_changed {
            return Ok(());
        }
        self.host_ports = host_ports;
        let (plan, conflicts) = plan(
            self.last_good.values(),
            self.local_cluster,
            &self.node,
            &self.host_ports,
        );
        self.health_checks.send_if_modified(|current| {
            let changed = *current != plan.health_checks;
            if changed {
                current.clone_from(&plan.health_checks);
            }
            changed
        });
        for conflict in conflicts {
            tracing::warn!(%conflict, "two services claim one frontend; the first keeps it");
        }
        // A failed write (a full map, say) is tried again on the next sync; what was written
        // stays, and every step leaves the maps consistent.
        let first_after_adoption = !self.installed.adopted_service_ids.is_empty();
        let mut applied = self.apply(datapath, &plan);
        if applied.is_ok() {
            let active = self.active_by_service(&plan);
            applied = if first_after_adoption {
                prune_affinity(datapath, &active)
            } else {
                self.forget_affinity_to_departed(datapath, &active)
            };
            if applied.is_ok() {
                self.installed.adopted_service_ids.clear();
                self.installed.active_by_service = active;
            }
        }
        self.retry = applied.is_err();
        applied
    }

    /// Takes over what an earlier agent left: its backends keep their ids and each service
    /// port its service id, so clients' session affinity (service id → backend id) survives;
    /// frontends and tables are written again and what nothing uses is removed by the first
    /// sync, which then forgets affinity choices that no longer name an active backend.
    fn adopt(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        let found = datapath.installed_load_balancing()?;
        let installed = &mut self.installed;
        installed.next_backend_id = found
            .backends
            .iter()
            .map(|(id, _)| *id)
            .max()
            .map_or(1, |max| max + 1);
        installed.next_table_id = found.tables.iter().max().map_or(1, |max| max + 1);
        installed.next_service_id = found
            .frontends
            .iter()
            .map(|(_, frontend)| frontend.service_id)
            .max()
            .map_or(1, |max| max + 1);
        for (id, entry) in found.backends {
            match installed.backends.entry(BackendRef::of_entry(&entry)) {
                std::collections::btree_map::Entry::Vacant(vacant) => {
                    vacant.insert((id, entry));
                }
                std::collections::btree_map::Entry::Occupied(_) => {
                    installed.stale_backends.insert(id);
                }
            }
        }
        installed.adopted_service_ids = found
            .frontends
            .iter()
            .map(|(key, frontend)| (*key, frontend.service_id))
            .collect();
        installed.stale_frontends = found.frontends.into_iter().map(|(key, _)| key).collect();
        installed.stale_tables = found.tables.into_iter().collect();
        self.adopted = true;
        self.retry = true;
        Ok(())
    }

    /// Service id → the ids of the backends that take its new connections under `plan`.
    fn active_by_service(&self, plan: &Plan) -> BTreeMap<u32, BTreeSet<u32>> {
        let mut active: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for frontend in plan.frontends.values() {
            let Some(&service_id) = self.installed.service_ids.get(&frontend.service_port) else {
                continue;
            };
            let ids = active.entry(service_id).or_default();
            for backend in &frontend.active {
                if let Some((id, _)) = self.installed.backends.get(backend) {
                    ids.insert(*id);
                }
            }
        }
        active
    }

    /// Forgets the clients' affinity to backends that left a service but still serve another
    /// (and so stay in the backend table, where the datapath would keep finding them). One
    /// pass over the affinity table, and only when some service lost a backend.
    fn forget_affinity_to_departed(
        &self,
        datapath: &mut Datapath,
        now: &BTreeMap<u32, BTreeSet<u32>>,
    ) -> Result<(), DatapathError> {
        let departed: BTreeSet<(u32, u32)> = self
            .installed
            .active_by_service
            .iter()
            .flat_map(|(service, before)| {
                let after = now.get(service);
                before
                    .iter()
                    .filter(move |id| !after.is_some_and(|after| after.contains(id)))
                    .map(move |id| (*service, *id))
            })
            .collect();
        if departed.is_empty() {
            return Ok(());
        }
        datapath
            .retain_affinity(|key, choice| !departed.contains(&(key.service_id, choice.backend_id)))
    }

    fn apply(&mut self, datapath: &mut Datapath, plan: &Plan) -> Result<(), DatapathError> {
        let installed = &mut self.installed;
        // 1. Backends, new ones and changed drain flags.
        for (backend, &draining) in &plan.backends {
            let value = LbBackend {
                address: u32::from(backend.address).to_be(),
                port: backend.port.to_be(),
                cluster_id: backend.cluster_id,
                flags: if draining { LB_BACKEND_TERMINATING } else { 0 },
                pad: [0; 3],
            };
            match installed.backends.get(backend) {
                Some((_, current)) if *current == value => {}
                Some(&(id, _)) => {
                    datapath.upsert_backend(id, value)?;
                    installed.backends.insert(*backend, (id, value));
                }
                None => {
                    let id = installed.next_backend_id;
                    installed.next_backend_id += 1;
                    datapath.upsert_backend(id, value)?;
                    installed.backends.insert(*backend, (id, value));
                }
            }
        }
        // 2. A Maglev table per distinct active set.
        for frontend in plan.frontends.values() {
            if frontend.active.is_empty() || installed.tables.contains_key(&frontend.active) {
                continue;
            }
            let keys: Vec<String> = frontend.active.iter().map(BackendRef::maglev_key).collect();
            let ids: Vec<u32> = frontend
                .active
                .iter()
                .map(|backend| installed.backends.get(backend).map_or(0, |(id, _)| *id))
                .collect();
            let slots: Vec<u32> = maglev::table(&keys, self.table_size, self.seed)
                .into_iter()
                .map(|index| ids.get(index as usize).copied().unwrap_or(0))
                .collect();
            let table_id = installed.next_table_id;
            installed.next_table_id += 1;
            datapath.install_maglev_table(table_id, &slots)?;
            installed.tables.insert(frontend.active.clone(), table_id);
        }
        // 3. Frontends switch to their tables.
        for (key, frontend) in &plan.frontends {
            let service_id = match installed.service_ids.get(&frontend.service_port) {
                Some(&id) => id,
                None => {
                    let adopted = installed
                        .adopted_service_ids
                        .get(key)
                        .copied()
                        .filter(|id| !installed.used_service_ids.contains(id));
                    let id = adopted.unwrap_or_else(|| {
                        let id = installed.next_service_id;
                        installed.next_service_id += 1;
                        id
                    });
                    installed
                        .service_ids
                        .insert(frontend.service_port.clone(), id);
                    installed.used_service_ids.insert(id);
                    id
                }
            };
            let value = LbFrontend {
                service_id,
                table_id: installed.tables.get(&frontend.active).copied().unwrap_or(0),
                affinity_timeout_s: frontend.affinity_timeout_s,
                active_backends: u16::try_from(frontend.active.len()).unwrap_or(u16::MAX),
                kind: frontend.kind as u8,
                pad: 0,
            };
            if installed.frontends.get(key) != Some(&value) {
                datapath.upsert_frontend(*key, value)?;
                installed.frontends.insert(*key, value);
            }
        }
        // 4. What nothing uses any more.
        let gone: Vec<LbFrontendKey> = installed
            .frontends
            .keys()
            .filter(|key| !plan.frontends.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            datapath.remove_frontend(key)?;
            installed.frontends.remove(&key);
        }
        for key in std::mem::take(&mut installed.stale_frontends) {
            if !installed.frontends.contains_key(&key) {
                datapath.remove_frontend(key)?;
            }
        }
        let used_sets: BTreeSet<&Vec<BackendRef>> =
            plan.frontends.values().map(|f| &f.active).collect();
        let unused_tables: Vec<(Vec<BackendRef>, u32)> = installed
            .tables
            .iter()
            .filter(|(set, _)| !used_sets.contains(set))
            .map(|(set, id)| (set.clone(), *id))
            .collect();
        for (set, id) in unused_tables {
            datapath.remove_maglev_table(id)?;
            installed.tables.remove(&set);
        }
        for id in std::mem::take(&mut installed.stale_tables) {
            datapath.remove_maglev_table(id)?;
        }
        let unused_backends: Vec<(BackendRef, u32)> = installed
            .backends
            .iter()
            .filter(|(backend, _)| !plan.backends.contains_key(backend))
            .map(|(backend, (id, _))| (*backend, *id))
            .collect();
        for (backend, id) in unused_backends {
            datapath.remove_backend(id)?;
            installed.backends.remove(&backend);
            installed.removed.push(backend);
        }
        for id in std::mem::take(&mut installed.stale_backends) {
            datapath.remove_backend(id)?;
        }
        let live: BTreeSet<&String> = plan.frontends.values().map(|f| &f.service_port).collect();
        installed.service_ids.retain(|name, _| live.contains(name));
        installed.used_service_ids = installed.service_ids.values().copied().collect();
        tracing::debug!(
            frontends = installed.frontends.len(),
            backends = installed.backends.len(),
            tables = installed.tables.len(),
            "service load balancing updated"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weft_core::service::{GlobalSettings, ServicePort};

    use super::*;

    fn backend(address: [u8; 4], condition: BackendCondition) -> Backend {
        Backend {
            address: Ipv4Addr::from(address),
            port: 8080,
            cluster_id: 1,
            condition,
            node: None,
            pod: None,
        }
    }

    fn service(name: &str, cluster_ip: [u8; 4], backends: Vec<Backend>) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: vec![Ipv4Addr::from(cluster_ip)],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                backends,
            }],
            session_affinity_timeout: None,
            global: GlobalSettings::default(),
            external_traffic_local: false,
            internal_traffic_local: false,
            health_check_node_port: None,
        }
    }

    fn key(address: [u8; 4], port: u16) -> LbFrontendKey {
        LbFrontendKey {
            address: u32::from(Ipv4Addr::from(address)).to_be(),
            port: port.to_be(),
            protocol: 6,
            pad: 0,
        }
    }

    #[test]
    fn a_service_gets_a_cluster_ip_and_a_node_port_frontend_over_its_ready_backends() {
        let web = service(
            "web",
            [10, 96, 0, 10],
            vec![
                backend([10, 1, 0, 3], BackendCondition::Ready),
                backend([10, 1, 0, 2], BackendCondition::Ready),
                backend([10, 1, 0, 4], BackendCondition::Terminating),
                backend([10, 1, 0, 5], BackendCondition::NotServing),
            ],
        );
        let (plan, conflicts) = plan(&[web], 1, "node-a", &[]);
        assert!(conflicts.is_empty());
        let cluster_ip = &plan.frontends[&key([10, 96, 0, 10], 80)];
        let node_port = &plan.frontends[&key([0, 0, 0, 0], 30080)];
        assert_eq!(cluster_ip.kind, LbFrontendKind::ClusterIp);
        assert_eq!(node_port.kind, LbFrontendKind::NodePort);
        let active: Vec<Ipv4Addr> = cluster_ip.active.iter().map(|b| b.address).collect();
        assert_eq!(
            active,
            [Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3)],
            "ready backends, sorted, so equal sets share a Maglev table"
        );
        assert_eq!(node_port.active, cluster_ip.active);
        // The terminating backend stays known (established connections) but drains; the one
        // not serving is gone.
        let drains: BTreeMap<Ipv4Addr, bool> =
            plan.backends.iter().map(|(b, d)| (b.address, *d)).collect();
        assert_eq!(
            drains,
            BTreeMap::from([
                (Ipv4Addr::new(10, 1, 0, 2), false),
                (Ipv4Addr::new(10, 1, 0, 3), false),
                (Ipv4Addr::new(10, 1, 0, 4), true),
            ])
        );
    }

    #[test]
    fn two_services_on_one_frontend_are_a_reported_conflict_the_first_keeps() {
        let first = service(
            "a",
            [10, 96, 0, 10],
            vec![backend([10, 1, 0, 2], BackendCondition::Ready)],
        );
        let mut second = service(
            "b",
            [10, 96, 0, 11],
            vec![backend([10, 1, 0, 9], BackendCondition::Ready)],
        );
        second.ports[0].node_port = Some(30080);
        let (plan, conflicts) = plan(&[second, first], 1, "node-a", &[]);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("shop/b:http") && conflicts[0].contains("shop/a:http"));
        assert_eq!(
            plan.frontends[&key([0, 0, 0, 0], 30080)].service_port,
            "shop/a:http"
        );
        assert_eq!(plan.frontends.len(), 3);
    }

    #[test]
    fn session_affinity_becomes_whole_seconds_and_no_backend_means_refuse() {
        let mut sticky = service("sticky", [10, 96, 0, 12], Vec::new());
        sticky.session_affinity_timeout = Some(Duration::from_secs(10800));
        let (plan, _) = plan(&[sticky], 1, "node-a", &[]);
        let frontend = &plan.frontends[&key([10, 96, 0, 12], 80)];
        assert_eq!(frontend.affinity_timeout_s, 10800);
        assert!(
            frontend.active.is_empty(),
            "no backend: the datapath refuses"
        );
    }

    fn service_object(name: &str, cluster_ip: &str) -> ServiceObject {
        ServiceObject(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
    }

    fn slice_object(name: &str, service: &str, address: &str) -> ServiceObject {
        ServiceObject(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": true}}]
        }))
    }

    fn engine(state: &ClusterState) -> ServiceEngine {
        let (health_checks, _) = watch::channel(HealthChecks::default());
        ServiceEngine::new(
            state.clone(),
            1,
            "node-a".into(),
            TableSize::new(251).expect("prime"),
            0,
            health_checks,
        )
    }

    fn backends_of(engine: &ServiceEngine, name: &str) -> Option<Vec<Ipv4Addr>> {
        let service = engine
            .last_good
            .get(&("shop".to_owned(), name.to_owned()))?;
        Some(
            service.ports[0]
                .backends
                .iter()
                .map(|backend| backend.address)
                .collect(),
        )
    }

    #[test]
    fn a_changed_object_reloads_its_service_as_a_whole_read_would() {
        let state = ClusterState::new(vec![crate::state::LOCAL_SOURCE.into()]);
        let source = crate::state::LOCAL_SOURCE;
        state.change(|tables| {
            tables.upsert(source, service_object("a", "10.96.0.10"));
            tables.upsert(source, service_object("b", "10.96.0.11"));
            tables.upsert(source, slice_object("a-1", "a", "10.1.0.5"));
            tables.upsert(source, slice_object("b-1", "b", "10.1.0.6"));
            tables.mark_synced(source);
        });
        let mut incremental = engine(&state);
        assert!(incremental.reload());
        assert!(!incremental.reload(), "nothing changed since");
        let same_as_a_whole_read = |incremental: &ServiceEngine| {
            let mut whole = engine(&state);
            assert!(whole.reload());
            assert_eq!(incremental.last_good, whole.last_good);
            assert_eq!(
                incremental.problems().count(),
                whole.problems().count(),
                "problems"
            );
        };
        same_as_a_whole_read(&incremental);

        // A slice moves from one service to another: both change.
        state.change(|tables| tables.upsert(source, slice_object("a-1", "b", "10.1.0.5")));
        assert!(incremental.reload());
        assert_eq!(backends_of(&incremental, "a"), Some(Vec::new()));
        assert_eq!(
            backends_of(&incremental, "b").map(|mut b| {
                b.sort();
                b
            }),
            Some(vec![
                "10.1.0.5".parse().expect("ip"),
                "10.1.0.6".parse().expect("ip")
            ])
        );
        same_as_a_whole_read(&incremental);

        // An invalid version keeps the last good one and is reported; a valid one replaces it.
        let mut broken = service_object("b", "10.96.0.11");
        broken.0["spec"]["ports"][0]["port"] = serde_json::json!(-1);
        state.change(|tables| tables.upsert(source, broken));
        assert!(incremental.reload());
        assert_eq!(backends_of(&incremental, "b").map(|b| b.len()), Some(2));
        assert_eq!(incremental.problems().count(), 1);
        state.change(|tables| tables.upsert(source, service_object("b", "10.96.0.12")));
        assert!(incremental.reload());
        assert_eq!(incremental.problems().count(), 0);
        same_as_a_whole_read(&incremental);

        // A Service deleted goes, though its slices stay; its slices alone bring nothing.
        state.change(|tables| tables.delete::<ServiceObject>(source, &"Service/shop/b".to_owned()));
        assert!(incremental.reload());
        assert_eq!(backends_of(&incremental, "b"), None);
        same_as_a_whole_read(&incremental);
        state.change(|tables| tables.upsert(source, service_object("b", "10.96.0.12")));
        assert!(incremental.reload());
        assert_eq!(backends_of(&incremental, "b").map(|b| b.len()), Some(2));
        same_as_a_whole_read(&incremental);
    }
}
