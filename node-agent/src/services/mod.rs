//! Service load balancing on this node: reads the cluster's Services, EndpointSlices and
//! GlobalServices, keeps the last good version of a Service that turns invalid, plans
//! frontends, backends and Maglev tables, and writes the datapath's load-balancing maps.
//!
//! Work follows the change: a changed object reloads only its service, a reloaded service is
//! planned again alone (see [`plan::Desired`]), and only the frontends, backends and tables
//! that plan touched are compared with what is written.
//!
//! Updates never open a gap: backends and tables first, then frontends switch over, then what
//! nothing references any more goes. Services whose active backends are the same set share
//! one Maglev table, so memory grows with distinct backend sets, not with services.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use tokio::sync::watch;

use weft_core::service::maglev::{self, TableSize};
use weft_core::service::Service;
use weft_crds::service_model::{self, ServiceError};
use weft_node_bpf::maps::{LbBackend, LbFrontend, LbFrontendKey, LB_BACKEND_TERMINATING};

use crate::datapath::{Datapath, DatapathError};
use crate::health_check::HealthChecks;
use crate::state::{Changed, ClusterState, TableView};
use weft_core::state::ServiceObject;

use plan::{plan_service, Changes, Desired, ServiceName};
pub use plan::{BackendRef, HostPortBinding};

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
    /// (service id, backend id): backends that left a service, whose clients' affinity to
    /// them is still to be forgotten.
    departed: BTreeSet<(u32, u32)>,
}

impl Installed {
    /// Whether an earlier agent's entries still await removal.
    fn has_stale(&self) -> bool {
        !self.stale_frontends.is_empty()
            || !self.stale_tables.is_empty()
            || !self.stale_backends.is_empty()
            || !self.adopted_service_ids.is_empty()
    }

    /// The id of `service_port` (whose frontend `key` is being written): the one it has, else
    /// the one an earlier agent gave this frontend if no one has it now, else a new one.
    fn service_id(&mut self, key: &LbFrontendKey, service_port: &str) -> u32 {
        if let Some(&id) = self.service_ids.get(service_port) {
            return id;
        }
        let adopted = self
            .adopted_service_ids
            .get(key)
            .copied()
            .filter(|id| !self.used_service_ids.contains(id));
        let id = adopted.unwrap_or_else(|| {
            let id = self.next_service_id;
            self.next_service_id += 1;
            id
        });
        self.service_ids.insert(service_port.to_owned(), id);
        self.used_service_ids.insert(id);
        id
    }
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
    /// What the maps should hold, kept across changes.
    desired: Desired,
    /// What changed in `desired` and is not written yet (a failed apply leaves it here).
    pending: Changes,
    installed: Installed,
    adopted: bool,
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
            desired: Desired::default(),
            pending: Changes::default(),
            adopted: false,
        }
    }

    /// Takes in the service objects that changed since the last call: only the services they
    /// belong to are read again (their Service, slices and GlobalServices), so one changed
    /// slice costs one service, not the cluster's. Returns the services read again.
    fn reload(&mut self) -> BTreeSet<ServiceName> {
        let Some(changed) = self.objects.changed_keys() else {
            return BTreeSet::new();
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
        // Copied out so that the sources are not held up while they are decoded.
        let read: Vec<(ServiceName, Vec<serde_json::Value>)> = dirty
            .iter()
            .map(|service| {
                let objects = self
                    .objects_by_service
                    .objects(service)
                    .filter_map(|key| table.get(key))
                    .map(|ServiceObject(object)| object.clone())
                    .collect();
                (service.clone(), objects)
            })
            .collect();
        drop(tables);
        for (service, objects) in read {
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
        dirty
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

    /// The service `namespace/name` in force, if any.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.last_good.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Brings the datapath in line with the cluster's services and the node's pods'
    /// `host_ports`; does nothing when neither changed, nor before the state's sources have
    /// listed everything (what an earlier run wrote stays until then).
    pub fn sync(
        &mut self,
        datapath: &mut Datapath,
        host_ports: Vec<HostPortBinding>,
    ) -> Result<(), DatapathError> {
        if !self.objects.state().synced() {
            return Ok(());
        }
        if !self.adopted {
            self.adopt(datapath)?;
        }
        for service in self.reload() {
            let planned = self
                .last_good
                .get(&service)
                .map(|model| plan_service(model, self.local_cluster, &self.node));
            self.desired.set_service(&service, planned);
        }
        self.desired.set_host_ports(&host_ports, self.local_cluster);
        for conflict in self.desired.take_conflicts() {
            tracing::warn!(%conflict, "two claim one frontend; the first keeps it");
        }
        self.pending.merge(self.desired.take_changes());
        if self.pending.is_empty() && !self.installed.has_stale() {
            return Ok(());
        }
        if self.pending.health_checks {
            let wanted = self.desired.health_checks();
            self.health_checks.send_if_modified(|current| {
                let changed = *current != wanted;
                if changed {
                    *current = wanted;
                }
                changed
            });
        }
        // A failed write (a full map, say) is tried again on the next sync with what is still
        // pending; what was written stays, and every step leaves the maps consistent.
        let pending = std::mem::take(&mut self.pending);
        let applied = self.apply(datapath, &pending);
        if applied.is_err() {
            self.pending = pending;
        }
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
        // Each adopted backend is looked at by the first apply: kept if wanted, else removed.
        self.pending
            .backends
            .extend(installed.backends.keys().copied());
        self.adopted = true;
        Ok(())
    }

    /// Writes what `changes` touched: backends, then tables, then frontends, then removes
    /// what nothing uses any more; then forgets clients' affinity to backends that left a
    /// service.
    fn apply(&mut self, datapath: &mut Datapath, changes: &Changes) -> Result<(), DatapathError> {
        let desired = &self.desired;
        let installed = &mut self.installed;
        // 1. Backends, new ones and changed drain flags.
        for backend in &changes.backends {
            let Some(terminating) = desired.backend(backend) else {
                continue;
            };
            let value = LbBackend {
                address: u32::from(backend.address).to_be(),
                port: backend.port.to_be(),
                cluster_id: backend.cluster_id,
                flags: if terminating {
                    LB_BACKEND_TERMINATING
                } else {
                    0
                },
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
        for active in &changes.tables {
            if !desired.table_used(active) || installed.tables.contains_key(active) {
                continue;
            }
            let keys: Vec<String> = active.iter().map(BackendRef::maglev_key).collect();
            let ids: Vec<u32> = active
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
            installed.tables.insert(active.clone(), table_id);
        }
        // 3. Frontends switch to their tables.
        for key in &changes.frontends {
            let Some(frontend) = desired.frontend(key) else {
                continue;
            };
            let service_id = installed.service_id(key, &frontend.service_port);
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
        for key in &changes.frontends {
            if desired.frontend(key).is_none() && installed.frontends.contains_key(key) {
                datapath.remove_frontend(*key)?;
                installed.frontends.remove(key);
            }
        }
        while let Some(key) = installed.stale_frontends.pop_first() {
            if !installed.frontends.contains_key(&key) {
                if let Err(error) = datapath.remove_frontend(key) {
                    installed.stale_frontends.insert(key);
                    return Err(error);
                }
            }
        }
        for active in &changes.tables {
            if desired.table_used(active) {
                continue;
            }
            if let Some(&id) = installed.tables.get(active) {
                datapath.remove_maglev_table(id)?;
                installed.tables.remove(active);
            }
        }
        while let Some(id) = installed.stale_tables.pop_first() {
            if let Err(error) = datapath.remove_maglev_table(id) {
                installed.stale_tables.insert(id);
                return Err(error);
            }
        }
        for backend in &changes.backends {
            if desired.backend(backend).is_some() {
                continue;
            }
            if let Some(&(id, _)) = installed.backends.get(backend) {
                datapath.remove_backend(id)?;
                installed.backends.remove(backend);
                installed.removed.push(*backend);
            }
        }
        while let Some(id) = installed.stale_backends.pop_first() {
            if let Err(error) = datapath.remove_backend(id) {
                installed.stale_backends.insert(id);
                return Err(error);
            }
        }
        // 5. Which backends each changed service port takes new connections to; a service
        // port with no frontend left gives up its id.
        for service_port in &changes.service_ports {
            let Some(&service_id) = installed.service_ids.get(service_port) else {
                continue;
            };
            let now: BTreeSet<u32> = desired
                .frontends_of(service_port)
                .flat_map(|frontend| &frontend.active)
                .filter_map(|backend| installed.backends.get(backend).map(|(id, _)| *id))
                .collect();
            let before = installed
                .active_by_service
                .remove(&service_id)
                .unwrap_or_default();
            installed.departed.extend(
                before
                    .difference(&now)
                    .map(|backend_id| (service_id, *backend_id)),
            );
            if desired.frontends_of(service_port).next().is_some() {
                installed.active_by_service.insert(service_id, now);
            } else {
                installed.service_ids.remove(service_port);
                installed.used_service_ids.remove(&service_id);
            }
        }
        if !installed.adopted_service_ids.is_empty() {
            // The first apply after adoption: affinity the earlier agent recorded stays only
            // where it names a backend its service still takes new connections to.
            prune_affinity(datapath, &installed.active_by_service)?;
            installed.adopted_service_ids.clear();
            installed.departed.clear();
        } else if !installed.departed.is_empty() {
            let departed = &installed.departed;
            datapath.retain_affinity(|key, choice| {
                !departed.contains(&(key.service_id, choice.backend_id))
            })?;
            installed.departed.clear();
        }
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

    use weft_core::service::{Backend, BackendCondition, GlobalSettings, Protocol, ServicePort};
    use weft_node_bpf::maps::LbFrontendKind;

    use super::plan::{plan, Plan};
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

    /// Keeps `desired` and a from-scratch plan of the same services side by side.
    struct Scenario {
        desired: Desired,
        services: BTreeMap<ServiceName, Service>,
        host_ports: Vec<HostPortBinding>,
    }

    impl Scenario {
        fn set(&mut self, service: Service) -> Changes {
            let name = (service.namespace.clone(), service.name.clone());
            self.desired
                .set_service(&name, Some(plan::plan_service(&service, 1, "node-a")));
            self.services.insert(name, service);
            self.check()
        }

        fn remove(&mut self, name: &str) -> Changes {
            let name = ("shop".to_owned(), name.to_owned());
            self.desired.set_service(&name, None);
            self.services.remove(&name);
            self.check()
        }

        fn set_host_ports(&mut self, host_ports: Vec<HostPortBinding>) -> Changes {
            self.desired.set_host_ports(&host_ports, 1);
            self.host_ports = host_ports;
            self.check()
        }

        /// The kept plan equals one made from scratch; returns what changed.
        fn check(&mut self) -> Changes {
            let (scratch, _) = plan(self.services.values(), 1, "node-a", &self.host_ports);
            assert_eq!(self.desired.snapshot(), scratch);
            self.desired.take_changes()
        }
    }

    #[test]
    fn the_kept_plan_equals_a_plan_from_scratch_and_names_only_what_a_change_touched() {
        let mut scenario = Scenario {
            desired: Desired::default(),
            services: BTreeMap::new(),
            host_ports: Vec::new(),
        };
        let b1 = backend([10, 1, 0, 1], BackendCondition::Ready);
        let b2 = backend([10, 1, 0, 2], BackendCondition::Ready);
        let b3 = backend([10, 1, 0, 3], BackendCondition::Ready);
        let set_of = |backends: &[&Backend]| -> Vec<BackendRef> {
            backends.iter().map(|b| BackendRef::of_backend(b)).collect()
        };
        scenario.set(service("a", [10, 96, 0, 10], vec![b1.clone(), b2.clone()]));
        // b wants a's node port and balances over the same set: one table for both.
        scenario.set(service("b", [10, 96, 0, 11], vec![b1.clone(), b2.clone()]));
        let conflicts = scenario.desired.take_conflicts();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("shop/b:http") && conflicts[0].contains("shop/a:http"));
        assert!(scenario.desired.table_used(&set_of(&[&b1, &b2])));

        // b moves to another backend: only its cluster IP frontend changes; the shared table
        // stays (a still uses it) and b's new set needs one.
        let changes = scenario.set(service("b", [10, 96, 0, 11], vec![b3.clone()]));
        assert_eq!(
            changes.frontends,
            BTreeSet::from([key([10, 96, 0, 11], 80)])
        );
        assert_eq!(changes.tables, BTreeSet::from([set_of(&[&b3])]));
        assert_eq!(
            changes.service_ports,
            BTreeSet::from(["shop/b:http".to_owned()])
        );
        assert!(scenario.desired.table_used(&set_of(&[&b1, &b2])));

        // a goes: b takes the node port over; a's backends and table are no longer used.
        let changes = scenario.remove("a");
        assert_eq!(
            changes.frontends,
            BTreeSet::from([key([10, 96, 0, 10], 80), key([0, 0, 0, 0], 30080)])
        );
        assert!(!scenario.desired.table_used(&set_of(&[&b1, &b2])));
        assert_eq!(scenario.desired.backend(&BackendRef::of_backend(&b1)), None);
        assert_eq!(
            scenario
                .desired
                .frontend(&key([0, 0, 0, 0], 30080))
                .map(|f| &f.service_port),
            Some(&"shop/b:http".to_owned())
        );

        // A pod's host port on the same port waits behind the service, then takes over.
        let binding = HostPortBinding {
            pod: "shop/web-0".into(),
            protocol: Protocol::Tcp,
            host_ip: None,
            host_port: 30080,
            pod_ip: Ipv4Addr::new(10, 1, 0, 7),
            container_port: 8080,
        };
        let changes = scenario.set_host_ports(vec![binding.clone()]);
        assert!(
            changes.frontends.is_empty(),
            "the service keeps its frontend"
        );
        assert_eq!(scenario.desired.take_conflicts().len(), 1);
        scenario.remove("b");
        assert_eq!(
            scenario
                .desired
                .frontend(&key([0, 0, 0, 0], 30080))
                .map(|f| f.kind),
            Some(LbFrontendKind::HostPort)
        );
        scenario.set_host_ports(Vec::new());
        assert!(scenario.desired.snapshot().frontends.is_empty());

        // A backend one service drains as terminating drains only while no service has it
        // active.
        let terminating = backend([10, 1, 0, 1], BackendCondition::Terminating);
        scenario.set(service("c", [10, 96, 0, 12], vec![b2.clone(), terminating]));
        let mut d = service("d", [10, 96, 0, 13], vec![b1.clone()]);
        d.ports[0].node_port = Some(30081);
        scenario.set(d);
        assert_eq!(
            scenario.desired.backend(&BackendRef::of_backend(&b1)),
            Some(false)
        );
        let changes = scenario.remove("d");
        assert!(changes.backends.contains(&BackendRef::of_backend(&b1)));
        assert_eq!(
            scenario.desired.backend(&BackendRef::of_backend(&b1)),
            Some(true)
        );
        scenario.remove("c");
        assert_eq!(scenario.desired.snapshot(), Plan::default());
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
        assert!(!incremental.reload().is_empty());
        assert!(incremental.reload().is_empty(), "nothing changed since");
        let same_as_a_whole_read = |incremental: &ServiceEngine| {
            let mut whole = engine(&state);
            assert!(!whole.reload().is_empty());
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
        assert!(!incremental.reload().is_empty());
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
        assert!(!incremental.reload().is_empty());
        assert_eq!(backends_of(&incremental, "b").map(|b| b.len()), Some(2));
        assert_eq!(incremental.problems().count(), 1);
        state.change(|tables| tables.upsert(source, service_object("b", "10.96.0.12")));
        assert!(!incremental.reload().is_empty());
        assert_eq!(incremental.problems().count(), 0);
        same_as_a_whole_read(&incremental);

        // A Service deleted goes, though its slices stay; its slices alone bring nothing.
        state.change(|tables| tables.delete::<ServiceObject>(source, &"Service/shop/b".to_owned()));
        assert!(!incremental.reload().is_empty());
        assert_eq!(backends_of(&incremental, "b"), None);
        same_as_a_whole_read(&incremental);
        state.change(|tables| tables.upsert(source, service_object("b", "10.96.0.12")));
        assert!(!incremental.reload().is_empty());
        assert_eq!(backends_of(&incremental, "b").map(|b| b.len()), Some(2));
        same_as_a_whole_read(&incremental);
    }
}
