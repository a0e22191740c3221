//! Local mode: a sandbox of Weft clusters on one machine. Each node is a network namespace
//! joined to a shared fabric, runs a real `weft-agent`, and gets its pods wired by the real
//! `weft-cni` invoked as a container runtime would; each pod runs an echo server in its own
//! namespace and cgroup. Everything is named after the sandbox, so `down` finds it all, also
//! after a crash.

pub mod config;
pub mod echo;
pub mod host;
pub mod manifests;
pub mod plan;
pub mod services;

mod agent_state;
mod agents;
mod identities;
mod objects;
mod pods;
mod store;
mod topology;

pub use store::running_sandboxes;

// Shared between the modules (each reaches its siblings' helpers through `use super::*`).
use agent_state::{local_pod, PendingPod};
use agents::process_alive;
use objects::record_all;
use store::write_atomically;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, SandboxConfig};
use crate::host::HostError;
use crate::manifests::{ManifestError, Manifests, PodPort, SandboxPod};
use crate::plan::{NodePlan, Plan, FABRIC_BRIDGE, FABRIC_PREFIX};
use crate::services::{ClusterInput, ClusterServices};
use weft_core::cluster::ClusterId;
use weft_core::identity::{IdentityAllocator, IdentityError, LabelFilter, SecurityLabels};

/// Every sandbox keeps its state, logs, sockets and private bpffs below here.
pub const RUN_ROOT: &str = "/run/weft-sandbox";
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a pod waits for its node's agent, as kubelet keeps retrying a sandbox.
const CNI_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
const CNI_RETRY_INTERVAL: Duration = Duration::from_millis(250);
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an identity no pod uses is kept (a pod recreated soon gets its number back).
const IDENTITY_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("sandbox {0} is already up; run `weftctl sandbox down --name {0}` first")]
    AlreadyUp(String),
    #[error("no sandbox {0} is up; start one with `weftctl sandbox up --config FILE`")]
    NotUp(String),
    #[error("several sandboxes are up ({0}); say which with --name")]
    Ambiguous(String),
    #[error("no sandbox is up; start one with `weftctl sandbox up --config FILE`")]
    NoneUp,
    #[error("{0}")]
    Invalid(String),
    #[error("the agent of node {node} did not start within {seconds} s; see its log {log}")]
    AgentDidNotStart {
        node: String,
        seconds: u64,
        log: PathBuf,
    },
    #[error("wiring pod {pod} failed (weft-cni ADD): {message}")]
    Cni { pod: String, message: String },
    #[error("cannot {what} the state file {path}: {reason}")]
    State {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Where the Weft binaries are: `WEFT_BIN_DIR`, else next to the running executable (test
/// executables live one level deeper, in `deps/`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
        .unwrap_or_default();
    if exe_dir.ends_with("deps") {
        exe_dir.parent().map(Path::to_owned).unwrap_or(exe_dir)
    } else {
        exe_dir
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub cluster: String,
    pub node: String,
    pub pid: u32,
    pub cni_socket: PathBuf,
    pub log: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PodPort>,
    pub server_pid: u32,
    pub cgroup: Option<PathBuf>,
    /// The pod's security identity, allocated by the sandbox as the operator would.
    pub identity: u32,
    /// Deleted, within its grace period: it still runs, so the connections it has finish, but
    /// its endpoints are no longer ready, so Services send it no new ones.
    #[serde(default)]
    pub terminating: bool,
}

/// A running sandbox, as persisted in `<run dir>/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sandbox {
    pub plan: Plan,
    pub run_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub agents: Vec<AgentState>,
    pub pods: Vec<PodState>,
    /// Objects other than Pods and Namespaces, per cluster (Services, policies, …).
    pub objects: BTreeMap<String, Vec<serde_json::Value>>,
    /// Namespaces and their labels, per cluster.
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// Nodes (`cluster-node`) told a peer set of their own by [`Sandbox::set_peers`]: the
    /// peers' `cluster-node` names. The others have every other node as a peer.
    #[serde(default)]
    pub peers: BTreeMap<String, Vec<String>>,
}

impl Sandbox {
    /// Creates the sandbox described by the config file and brings up its pods.
    pub fn up(config_path: &Path, bin_dir: &Path) -> Result<Self, SandboxError> {
        let config = SandboxConfig::load(config_path)?;
        let plan = Plan::new(&config);
        let run_dir = Path::new(RUN_ROOT).join(&config.name);
        if run_dir.join("state.json").exists()
            || !host::netns_with_prefix(&format!("{}-", plan.prefix)).is_empty()
        {
            return Err(SandboxError::AlreadyUp(config.name));
        }
        // Read and check every manifest before anything is created.
        let mut manifests = BTreeMap::new();
        let mut objects = BTreeMap::new();
        for cluster in &config.clusters {
            let read = Manifests::read(&cluster.manifests)?;
            // Services get their cluster IPs and node ports as they are stored, in file order.
            let mut stored = Vec::new();
            record_all(&mut stored, &read.others, cluster.service_cidr()).map_err(|message| {
                SandboxError::Invalid(format!("cluster {}: {message}", cluster.name))
            })?;
            objects.insert(cluster.name.clone(), stored);
            for pod in &read.pods {
                if plan.node(&cluster.name, &pod.node).is_none() {
                    return Err(SandboxError::Invalid(format!(
                        "pod {}/{} names node {:?}, which cluster {} does not have (nodes: {})",
                        pod.namespace,
                        pod.name,
                        pod.node,
                        cluster.name,
                        cluster.nodes.join(", ")
                    )));
                }
            }
            manifests.insert(cluster.name.clone(), read);
        }
        for binary in ["weft-agent", "weft-cni", "weftctl"] {
            if !bin_dir.join(binary).exists() {
                return Err(SandboxError::Invalid(format!(
                    "{} is missing; build with `cargo build --workspace` or set WEFT_BIN_DIR",
                    bin_dir.join(binary).display()
                )));
            }
        }

        std::fs::create_dir_all(&run_dir).map_err(|e| HostError::Io {
            what: format!("creating {}", run_dir.display()),
            source: e,
        })?;
        let cgroup = host::cgroup2_root().map(|root| root.join(&plan.prefix));
        if cgroup.is_none() {
            tracing::warn!("no cgroup v2 hierarchy found: pods run in the caller's cgroup, and socket-level hooks will not see them apart");
        }
        let mut sandbox = Self {
            plan,
            bpffs: run_dir.join("bpffs"),
            run_dir,
            bin_dir: bin_dir.to_owned(),
            cgroup,
            agents: Vec::new(),
            pods: Vec::new(),
            objects: BTreeMap::new(),
            namespaces: manifests
                .iter()
                .map(|(cluster, read)| (cluster.clone(), read.namespaces.clone()))
                .collect(),
            peers: BTreeMap::new(),
        };
        // From here on, a failure leaves state that `down` can clean up.
        sandbox.save()?;
        host::mount_bpffs(&sandbox.bpffs)?;
        sandbox.create_fabric()?;
        let nodes = sandbox.plan.nodes.clone();
        for node in &nodes {
            sandbox.create_node(node)?;
        }
        for node in &nodes {
            sandbox.start_agent(node)?;
            sandbox.save()?;
        }
        for (cluster, read) in manifests {
            for pod in &read.pods {
                sandbox.create_pod(&cluster, pod)?;
                sandbox.save()?;
            }
            let stored = objects.remove(&cluster).unwrap_or_default();
            sandbox.objects.insert(cluster, stored);
        }
        sandbox.save()?;
        Ok(sandbox)
    }

    fn cluster_name(&self, cluster: Option<&str>) -> Result<String, SandboxError> {
        let mut clusters: Vec<&str> = self.plan.nodes.iter().map(|n| n.cluster.as_str()).collect();
        clusters.dedup();
        match cluster {
            Some(name) if clusters.contains(&name) => Ok(name.to_owned()),
            Some(name) => Err(SandboxError::Invalid(format!(
                "no cluster {name} in this sandbox (clusters: {})",
                clusters.join(", ")
            ))),
            None if clusters.len() == 1 => Ok(clusters[0].to_owned()),
            None => Err(SandboxError::Invalid(format!(
                "this sandbox has several clusters ({}); say which with --cluster",
                clusters.join(", ")
            ))),
        }
    }

    /// Finds a pod by name (and namespace and cluster when given).
    pub fn pod(
        &self,
        name: &str,
        namespace: Option<&str>,
        cluster: Option<&str>,
    ) -> Result<&PodState, SandboxError> {
        let matches: Vec<&PodState> = self
            .pods
            .iter()
            .filter(|pod| pod.name == name)
            .filter(|pod| namespace.is_none_or(|ns| pod.namespace == ns))
            .filter(|pod| cluster.is_none_or(|c| pod.cluster == c))
            .collect();
        match matches.as_slice() {
            [pod] => Ok(pod),
            [] => Err(SandboxError::Invalid(format!(
                "no pod {name} in this sandbox"
            ))),
            _ => Err(SandboxError::Invalid(format!(
                "pod {name} exists in several namespaces or clusters; say which with -n / --cluster"
            ))),
        }
    }

    /// Removes everything a sandbox made: processes, namespaces (and their links), cgroups,
    /// pinned objects and the run directory. Safe to repeat, and works without the state file
    /// (after a crash) by finding things by name.
    pub fn down(name: &str) -> Vec<String> {
        let mut removed = Vec::new();
        let run_dir = Path::new(RUN_ROOT).join(name);
        let prefix = plan::prefix_for(name);
        if let Ok(sandbox) = Self::load(Some(name)) {
            for pod in &sandbox.pods {
                host::stop_process(pod.server_pid);
            }
            for agent in &sandbox.agents {
                host::stop_process(agent.pid);
            }
            removed.push(format!(
                "{} agents and {} pods stopped",
                sandbox.agents.len(),
                sandbox.pods.len()
            ));
        }
        if let Some(root) = host::cgroup2_root() {
            let cgroup = root.join(&prefix);
            if cgroup.exists() {
                host::remove_cgroup_tree(&cgroup);
                removed.push(format!("cgroup {}", cgroup.display()));
            }
        }
        let namespaces = host::netns_with_prefix(&format!("{prefix}-"));
        for netns in &namespaces {
            host::del_netns(netns);
        }
        if !namespaces.is_empty() {
            removed.push(format!("{} network namespaces", namespaces.len()));
        }
        let bpffs = run_dir.join("bpffs");
        if bpffs.exists() {
            host::unmount(&bpffs);
            removed.push(format!("bpffs {}", bpffs.display()));
        }
        if run_dir.exists() {
            let _ = std::fs::remove_dir_all(&run_dir);
            removed.push(format!("run directory {}", run_dir.display()));
        }
        removed
    }
}

#[cfg(test)]
fn record(
    objects: &mut Vec<serde_json::Value>,
    object: serde_json::Value,
    service_cidr: Ipv4Net,
) -> Result<serde_json::Value, String> {
    record_all(objects, &[object], service_cidr).map(|mut stored| stored.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_SERVICE_CIDR;
    use crate::objects::object_key;
    use serde_json::json;

    fn sandbox(run_dir: &Path) -> Sandbox {
        let config: SandboxConfig = serde_saphyr::from_str(
            "name: demo\nclusters:\n- {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: [e1]}\n- {name: west, id: 2, podCIDR: 10.2.0.0/16, serviceCIDR: 10.200.0.0/16, nodes: [w1]}\n",
        )
        .expect("config");
        Sandbox {
            plan: Plan::new(&config),
            run_dir: run_dir.to_owned(),
            bin_dir: PathBuf::new(),
            bpffs: PathBuf::new(),
            cgroup: None,
            agents: Vec::new(),
            pods: vec![
                services::fixtures::pod("east", "ml", "model-e", &[("app", "model")], &[]),
                services::fixtures::pod("west", "ml", "model-w", &[("app", "model")], &[]),
            ],
            objects: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            peers: BTreeMap::new(),
        }
    }

    #[test]
    fn each_cluster_gets_its_services_with_allocations_and_shared_slices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sandbox = sandbox(dir.path());
        let model = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "model", "namespace": "ml", "annotations": {"weft.io/global": "true"}},
            "spec": {"selector": {"app": "model"}, "ports": [{"port": 80}]}
        });
        let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                            "metadata": {"name": "p", "namespace": "ml"}, "spec": {}});
        for cluster in ["east", "west"] {
            let cidr = sandbox.plan.service_cidr(cluster);
            let objects = sandbox.objects.entry(cluster.to_owned()).or_default();
            for object in [&model, &policy, &model] {
                record(objects, object.clone(), cidr).expect("recorded");
            }
        }
        assert_eq!(
            sandbox.objects["east"].len(),
            2,
            "re-applied objects replace"
        );
        sandbox.save().expect("save");

        let file = sandbox.services()["west"].agent_objects();
        let summary: Vec<String> = file
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                "Service model",
                "EndpointSlice model-weft",
                "EndpointSlice model-east"
            ]
        );
        assert_eq!(
            file[0]["spec"]["clusterIP"], "10.200.0.1",
            "west's own service CIDR"
        );
        assert_eq!(
            sandbox.services()["east"].services[0].object["spec"]["clusterIP"],
            "10.96.0.1"
        );

        // Deleting by a manifest that names no namespace finds what was stored as `default`.
        let unnamespaced =
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}});
        let stored =
            record(&mut Vec::new(), unnamespaced.clone(), DEFAULT_SERVICE_CIDR).expect("stored");
        assert_eq!(stored["metadata"]["namespace"], "default");
        assert_eq!(object_key(&stored), object_key(&unnamespaced));
    }

    #[test]
    fn the_example_sandboxes_load_and_their_services_get_cluster_ips() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sandbox");
        for (file, clusters) in [("one-cluster.yaml", 1), ("two-clusters.yaml", 2)] {
            let config = SandboxConfig::load(&examples.join(file)).expect("config");
            assert_eq!(config.clusters.len(), clusters);
            for cluster in &config.clusters {
                let read = Manifests::read(&cluster.manifests).expect("manifests");
                let mut stored = Vec::new();
                for object in &read.others {
                    record(&mut stored, object.clone(), cluster.service_cidr()).expect("stored");
                }
                assert!(
                    stored
                        .iter()
                        .any(|o| services::is_service(o) && o["spec"]["clusterIP"] == "10.96.0.1"),
                    "{file}: cluster {} has a Service with an address",
                    cluster.name
                );
            }
        }
    }
}
