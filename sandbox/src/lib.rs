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

    fn create_fabric(&self) -> Result<(), SandboxError> {
        let fabric = &self.plan.fabric_netns;
        host::add_netns(fabric)?;
        host::ip(&["-n", fabric, "link", "add", FABRIC_BRIDGE, "type", "bridge"])?;
        host::ip(&["-n", fabric, "link", "set", FABRIC_BRIDGE, "up"])?;
        Ok(())
    }

    fn create_node(&self, node: &NodePlan) -> Result<(), SandboxError> {
        let fabric = &self.plan.fabric_netns;
        host::add_netns(&node.netns)?;
        host::ip(&[
            "-n",
            fabric,
            "link",
            "add",
            &node.fabric_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node.netns,
        ])?;
        host::ip(&[
            "-n",
            fabric,
            "link",
            "set",
            &node.fabric_veth,
            "master",
            FABRIC_BRIDGE,
            "up",
        ])?;
        let address = format!("{}/{FABRIC_PREFIX}", node.ip);
        host::ip(&["-n", &node.netns, "addr", "add", &address, "dev", "eth0"])?;
        host::ip(&["-n", &node.netns, "link", "set", "eth0", "up"])?;
        host::sysctl_in(&node.netns, "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// The state directory of a node's agent (`--state-dir`).
    pub fn node_state_dir(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("state")
    }

    fn node_dir(&self, node: &NodePlan) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{}-{}", node.cluster, node.name))
    }

    fn start_agent(&mut self, node: &NodePlan) -> Result<(), SandboxError> {
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).map_err(|e| HostError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })?;
        let socket = dir.join("cni.sock");
        let log = dir.join("agent.log");
        let cgroup = self
            .cgroup
            .as_ref()
            .map(|root| root.join(format!("{}-{}", node.cluster, node.name)));
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "json".into(),
            "--node-name".into(),
            node.name.clone(),
            "--cluster-name".into(),
            node.cluster.clone(),
            "--cluster-id".into(),
            node.cluster_id.to_string(),
            "--pod-cidr".into(),
            node.pod_cidr.to_string(),
            "--node-ip".into(),
            node.ip.to_string(),
            "--uplink".into(),
            "eth0".into(),
            "--routing-mode".into(),
            node.routing_mode.as_flag().into(),
            "--bpffs".into(),
            self.bpffs
                .join(format!("{}-{}", node.cluster, node.name))
                .display()
                .to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--cni-socket".into(),
            socket.display().to_string(),
            "--admin-addr".into(),
            "127.0.0.1:9962".into(),
            "--observe-socket".into(),
            dir.join("observe.sock").display().to_string(),
            "--endpoint-directory".into(),
            self.run_dir.join("endpoints.json").display().to_string(),
            "--policy-file".into(),
            self.policy_file(&node.cluster).display().to_string(),
            "--service-file".into(),
            self.service_file(&node.cluster).display().to_string(),
        ];
        if let Some(cgroup) = &cgroup {
            args.extend(["--cgroup-root".into(), cgroup.display().to_string()]);
        }
        // Every other node of the sandbox, once: a restarted agent reads the file as it was
        // left (tests change it to take nodes away and bring them back).
        let peers_file = self.peers_file(&node.cluster, &node.name);
        if !peers_file.exists() {
            let others: Vec<&NodePlan> = self
                .plan
                .nodes
                .iter()
                .filter(|peer| peer.netns != node.netns)
                .collect();
            self.write_peers_file(node, &others)?;
        }
        args.extend(["--peers-file".into(), peers_file.display().to_string()]);
        args.extend([
            "--local-pods-file".into(),
            self.local_pods_file(&node.cluster, &node.name)
                .display()
                .to_string(),
        ]);
        args.extend(node.agent_args.iter().cloned());
        let pid = host::spawn_daemon(
            &self.bin_dir.join("weft-agent"),
            &args,
            Some(&node.netns),
            cgroup.as_deref(),
            &log,
        )?;
        self.agents.push(AgentState {
            cluster: node.cluster.clone(),
            node: node.name.clone(),
            pid,
            cni_socket: socket.clone(),
            log: log.clone(),
        });
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        while !socket.exists() {
            if Instant::now() > deadline || !process_alive(pid) {
                return Err(SandboxError::AgentDidNotStart {
                    node: node.name.clone(),
                    seconds: AGENT_START_TIMEOUT.as_secs(),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The file a node's agent finds its pods in by name, with their identities
    /// (`--local-pods-file`): what the node-scoped Pod watch and the allocated `WeftIdentity`
    /// objects give it in a cluster. CNI ADD waits until the new pod's entry is there.
    pub fn local_pods_file(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("local-pods.json")
    }

    /// Writes a node's local pods file: its running pods, and the pods being created on it
    /// (`pending`: written before their CNI ADD, which waits for them). Another process may be
    /// creating a pod this one does not know yet, so pending entries already in the file are
    /// kept until that pod is recorded or `change` withdraws it. Callers hold the state lock.
    fn write_local_pods(
        &self,
        cluster: &str,
        node: &str,
        change: PendingPod,
    ) -> Result<(), SandboxError> {
        let path = self.local_pods_file(cluster, node);
        let running: Vec<serde_json::Value> = self
            .pods
            .iter()
            .filter(|pod| pod.cluster == cluster && pod.node == node)
            .map(|pod| {
                local_pod_entry(
                    &pod.namespace,
                    &pod.name,
                    pod.identity,
                    self.security_labels(pod),
                    &pod.ports,
                )
            })
            .collect();
        let same_pod = |a: &serde_json::Value, b: &serde_json::Value| {
            a["namespace"] == b["namespace"] && a["pod"] == b["pod"]
        };
        let mut pending: Vec<serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<serde_json::Value>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|entry| entry["pending"] == true)
            .filter(|entry| !running.iter().any(|pod| same_pod(pod, entry)))
            .collect();
        match change {
            PendingPod::Keep => {}
            PendingPod::Add(mut entry) => {
                entry["pending"] = serde_json::Value::Bool(true);
                pending.retain(|known| !same_pod(known, &entry));
                pending.push(entry);
            }
            PendingPod::Withdraw(entry) => pending.retain(|known| !same_pod(known, &entry)),
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let entries: Vec<serde_json::Value> = running.into_iter().chain(pending).collect();
        write_atomically(&path, &serde_json::to_vec(&entries).unwrap_or_default())
    }

    /// The file a node's agent reads its peers from (`--peers-file`): what the Node watch
    /// gives it in a cluster.
    pub fn peers_file(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("peers.json")
    }

    /// Writes `node`'s peers file with `peers` (`up` writes every other node of the sandbox);
    /// the agent wires new peers and unwires those left out within a second.
    pub fn write_peers_file(
        &self,
        node: &NodePlan,
        peers: &[&NodePlan],
    ) -> Result<(), SandboxError> {
        let entries: Vec<serde_json::Value> = peers
            .iter()
            .map(|peer| {
                serde_json::json!({
                    "name": format!("{}-{}", peer.cluster, peer.name),
                    "nodeIP": peer.ip,
                    "podCIDR": peer.pod_cidr,
                })
            })
            .collect();
        write_atomically(
            &self.peers_file(&node.cluster, &node.name),
            &serde_json::to_vec(&entries).unwrap_or_default(),
        )
    }

    /// Restarts a node's agent (after it was killed, say), with the same arguments.
    pub fn restart_agent(&mut self, cluster: &str, node: &str) -> Result<(), SandboxError> {
        let plan =
            self.plan.node(cluster, node).cloned().ok_or_else(|| {
                SandboxError::Invalid(format!("no node {node} in cluster {cluster}"))
            })?;
        if let Some(index) = self
            .agents
            .iter()
            .position(|agent| agent.cluster == cluster && agent.node == node)
        {
            let old = self.agents.remove(index);
            host::stop_process(old.pid);
            let _ = std::fs::remove_file(&old.cni_socket);
        }
        self.start_agent(&plan)?;
        let restarted = self
            .agents
            .iter()
            .find(|agent| agent.cluster == cluster && agent.node == node)
            .cloned();
        self.commit(|fresh| {
            fresh
                .agents
                .retain(|agent| !(agent.cluster == plan.cluster && agent.node == plan.name));
            fresh.agents.extend(restarted);
        })
    }

    fn create_pod(&mut self, cluster: &str, pod: &SandboxPod) -> Result<(), SandboxError> {
        let node = self.plan.node(cluster, &pod.node).cloned().ok_or_else(|| {
            SandboxError::Invalid(format!("pod {} names unknown node {}", pod.name, pod.node))
        })?;
        if self
            .pods
            .iter()
            .any(|p| p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name)
        {
            return Err(SandboxError::Invalid(format!(
                "pod {}/{} already exists in cluster {cluster}",
                pod.namespace, pod.name
            )));
        }
        let identity =
            self.acquire_identity(cluster, node.cluster_id, &pod.namespace, &pod.labels)?;
        // As the Pod watch and the operator would tell the node's agent: ADD waits for it.
        let security_labels = self.pod_security_labels(cluster, &pod.namespace, &pod.labels);
        let entry = local_pod_entry(
            &pod.namespace,
            &pod.name,
            identity,
            security_labels,
            &pod.ports,
        );
        {
            let _lock = self.lock_state()?;
            self.write_local_pods(cluster, &pod.node, PendingPod::Add(entry.clone()))?;
        }
        let netns = self.plan.pod_netns(cluster, &pod.namespace, &pod.name);
        host::add_netns(&netns)?;
        let container_id = random_container_id();
        // As kubelet does: while the agent is away (CNI code 11, "try again later"), retry.
        let deadline = Instant::now() + CNI_RETRY_TIMEOUT;
        let (succeeded, result) = loop {
            let (succeeded, result) = self.run_cni(
                "ADD",
                &node,
                &container_id,
                &netns,
                Some((&pod.namespace, &pod.name)),
            )?;
            let try_again = result.get("code").and_then(|code| code.as_u64()) == Some(11);
            if succeeded || !try_again || Instant::now() > deadline {
                break (succeeded, result);
            }
            tracing::info!(
                pod = %pod.name,
                reason = result.get("details").and_then(|d| d.as_str()).unwrap_or("the node's agent is unavailable"),
                "the node's agent says try again later; retrying"
            );
            std::thread::sleep(CNI_RETRY_INTERVAL);
        };
        if !succeeded {
            host::del_netns(&netns);
            if let Ok(_lock) = self.lock_state() {
                let _ = self.write_local_pods(cluster, &pod.node, PendingPod::Withdraw(entry));
            }
            return Err(SandboxError::Cni {
                pod: format!("{}/{}", pod.namespace, pod.name),
                message: result
                    .get("details")
                    .or_else(|| result.get("msg"))
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| result.to_string()),
            });
        }
        let ip: Ipv4Addr = result
            .pointer("/ips/0/address")
            .and_then(|a| a.as_str())
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| SandboxError::Cni {
                pod: pod.name.clone(),
                message: format!("the result has no address: {result}"),
            })?;
        let cgroup = self.cgroup.as_ref().map(|root| {
            root.join(format!("{cluster}-{}", pod.node))
                .join(format!("{}-{}", pod.namespace, pod.name))
        });
        let log = self
            .run_dir
            .join("pods")
            .join(format!("{cluster}-{}-{}.log", pod.namespace, pod.name));
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let ready_file = log.with_extension("ready");
        let _ = std::fs::remove_file(&ready_file);
        let args = vec![
            "sandbox".into(),
            "serve".into(),
            "--pod".into(),
            pod.name.clone(),
            "--namespace".into(),
            pod.namespace.clone(),
            "--node".into(),
            pod.node.clone(),
            "--cluster".into(),
            cluster.to_owned(),
            "--ports".into(),
            serde_json::to_string(&pod.ports).unwrap_or_else(|_| "[]".into()),
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        let server_pid = host::spawn_daemon(
            &self.bin_dir.join("weftctl"),
            &args,
            Some(&netns),
            cgroup.as_deref(),
            &log,
        )?;
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while !ready_file.exists() {
            if Instant::now() > deadline || !process_alive(server_pid) {
                return Err(SandboxError::Invalid(format!(
                    "the echo server of pod {}/{} did not start; see {}",
                    pod.namespace,
                    pod.name,
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pods.push(PodState {
            cluster: cluster.to_owned(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: pod.node.clone(),
            netns,
            ip,
            container_id,
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            server_pid,
            cgroup,
            identity,
            terminating: false,
        });
        Ok(())
    }

    fn identities_path(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("identities")
            .join(format!("{cluster}.json"))
    }

    /// The pod's identity, counting it as a user, from the cluster's persisted allocator (the
    /// operator's job in a cluster; the sandbox's here).
    fn acquire_identity(
        &self,
        cluster: &str,
        cluster_id: u16,
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
    ) -> Result<u32, SandboxError> {
        let path = self.identities_path(cluster);
        let id = ClusterId::new(u64::from(cluster_id))
            .map_err(|e| SandboxError::Invalid(e.to_string()))?;
        let identity_error =
            |e: IdentityError| SandboxError::Invalid(format!("identity allocation failed: {e}"));
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut allocator = IdentityAllocator::load_or_new(&path, id).map_err(identity_error)?;
        let namespace_labels = self
            .namespaces
            .get(cluster)
            .and_then(|namespaces| namespaces.get(namespace))
            .cloned()
            .unwrap_or_default();
        let labels = SecurityLabels::for_pod(
            namespace,
            pod_labels,
            &namespace_labels,
            &LabelFilter::default(),
        );
        let identity = allocator.acquire(&labels).map_err(identity_error)?;
        allocator.collect_garbage(std::time::SystemTime::now(), IDENTITY_GRACE);
        allocator.save(&path).map_err(identity_error)?;
        Ok(identity)
    }

    fn release_identity(&self, pod: &PodState) {
        let Some(cluster_id) = self
            .plan
            .nodes
            .iter()
            .find(|n| n.cluster == pod.cluster)
            .map(|n| n.cluster_id)
        else {
            return;
        };
        let path = self.identities_path(&pod.cluster);
        let released = ClusterId::new(u64::from(cluster_id))
            .map_err(|e| e.to_string())
            .and_then(|id| IdentityAllocator::load_or_new(&path, id).map_err(|e| e.to_string()))
            .and_then(|mut allocator| {
                allocator.release(pod.identity).map_err(|e| e.to_string())?;
                allocator.collect_garbage(std::time::SystemTime::now(), IDENTITY_GRACE);
                allocator.save(&path).map_err(|e| e.to_string())
            });
        if let Err(error) = released {
            tracing::warn!(%error, pod = %pod.name, "cannot release the pod's identity");
        }
    }

    /// Gives every pod of `cluster` the identity its labels and its namespace's labels stand
    /// for now (after a relabel), as the operator would: the new one is acquired before the
    /// old one is released. The agents follow through the endpoint directory. Returns the
    /// pods whose identity changed.
    fn reidentify(&mut self, cluster: &str) -> Result<Vec<String>, SandboxError> {
        let Some(cluster_id) = self.plan.cluster_id(cluster) else {
            return Ok(Vec::new());
        };
        let mut changed = Vec::new();
        for index in 0..self.pods.len() {
            let pod = self.pods[index].clone();
            if pod.cluster != cluster {
                continue;
            }
            let identity =
                self.acquire_identity(cluster, cluster_id, &pod.namespace, &pod.labels)?;
            if identity == pod.identity {
                // Acquired once more above: give that use back.
                self.release_identity(&pod);
                continue;
            }
            self.release_identity(&pod);
            self.pods[index].identity = identity;
            changed.push(format!("{}/{}", pod.namespace, pod.name));
        }
        Ok(changed)
    }

    /// Adds the Pods (and keeps the other objects) of a manifest file to a cluster. Services
    /// get their cluster IPs and node ports; a Service that cannot have the ones it asks for
    /// refuses the file before anything changes. As `kubectl apply`, a Namespace or Pod that
    /// exists is updated: new labels give its pods the identities they now stand for (which
    /// the agents and so the policies follow). A Pod's other fields cannot change (delete and
    /// apply it again).
    pub fn apply(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
    ) -> Result<Vec<String>, SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        let service_cidr = self.plan.service_cidr(&cluster);
        let mut read = Manifests::default();
        read.add_file(file)?;
        let mut trial = self.objects.get(&cluster).cloned().unwrap_or_default();
        record_all(&mut trial, &read.others, service_cidr).map_err(SandboxError::Invalid)?;
        let mut created = Vec::new();
        let exists = |sandbox: &Self, pod: &SandboxPod| {
            sandbox
                .pods
                .iter()
                .find(|p| {
                    p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name
                })
                .cloned()
        };
        // Pods that exist may change their labels only: refuse the file before anything else.
        for pod in &read.pods {
            if let Some(state) = exists(self, pod) {
                if state.node != pod.node || state.ports != pod.ports {
                    return Err(SandboxError::Invalid(format!(
                        "pod {}/{}: only labels of an existing pod can change (its node and ports cannot); delete it first",
                        pod.namespace, pod.name
                    )));
                }
            }
        }
        let updates: Vec<&SandboxPod> = read
            .pods
            .iter()
            .filter(|pod| exists(self, pod).is_some())
            .collect();
        if !read.namespaces.is_empty() || !updates.is_empty() {
            let namespaces = read.namespaces.clone();
            let target = cluster.clone();
            let relabelled: Vec<SandboxPod> = updates.iter().map(|pod| (*pod).clone()).collect();
            let changed = self.try_commit(|fresh| {
                let known = fresh.namespaces.entry(target.clone()).or_default();
                let mut lines = Vec::new();
                for (name, labels) in &namespaces {
                    lines.push(match known.insert(name.clone(), labels.clone()) {
                        None => format!("namespace/{name} created"),
                        Some(old) if old == *labels => format!("namespace/{name} unchanged"),
                        Some(_) => format!("namespace/{name} configured"),
                    });
                }
                for pod in &relabelled {
                    if let Some(state) = fresh.pods.iter_mut().find(|p| {
                        p.cluster == target && p.namespace == pod.namespace && p.name == pod.name
                    }) {
                        lines.push(if state.labels == pod.labels {
                            format!("pod/{} unchanged", pod.name)
                        } else {
                            state.labels = pod.labels.clone();
                            format!("pod/{} configured", pod.name)
                        });
                    }
                }
                let moved = fresh.reidentify(&target)?;
                lines.extend(
                    moved
                        .into_iter()
                        .map(|pod| format!("pod/{pod}: new identity")),
                );
                Ok(lines)
            })?;
            created.extend(changed);
        }
        for pod in &read.pods {
            if updates.iter().any(|updated| std::ptr::eq(*updated, pod)) {
                continue;
            }
            self.create_pod(&cluster, pod)?;
            if let Some(state) = self.pods.last().cloned() {
                self.commit(|fresh| fresh.pods.push(state))?;
            }
            created.push(format!("pod/{} created", pod.name));
        }
        // As `kubectl apply`: an object with the same kind, namespace and name is replaced.
        // Allocation is redone on the fresh state, under the lock.
        let recorded = self.try_commit(|fresh| {
            let objects = fresh.objects.entry(cluster.clone()).or_default();
            record_all(objects, &read.others, service_cidr).map_err(SandboxError::Invalid)
        })?;
        for object in &recorded {
            let (kind, _, name) = object_key(object);
            let kind = if kind.is_empty() {
                "object".to_owned()
            } else {
                kind.to_lowercase()
            };
            let allocated = match object.pointer("/spec/clusterIP").and_then(|ip| ip.as_str()) {
                Some(ip) if services::is_service(object) => format!(" (clusterIP {ip})"),
                _ => String::new(),
            };
            created.push(format!("{kind}/{name} recorded{allocated}"));
        }
        Ok(created)
    }

    /// Removes the objects and Pods of a manifest file: CNI DEL, then the pod's processes and
    /// namespace.
    pub fn delete(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
    ) -> Result<Vec<String>, SandboxError> {
        let mut lines = Vec::new();
        self.delete_with_grace(cluster, file, Duration::ZERO, |line| {
            lines.push(line.to_owned())
        })?;
        Ok(lines)
    }

    /// As `delete`, but the pods first terminate for `grace` (as `kubectl delete
    /// --grace-period`): their endpoints turn not-ready so Services send them no new
    /// connections, while the connections they have go on. `report` hears of each step as it
    /// happens.
    pub fn delete_with_grace(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
        grace: Duration,
        mut report: impl FnMut(&str),
    ) -> Result<(), SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        let mut read = Manifests::default();
        read.add_file(file)?;
        let doomed: Vec<_> = read.others.iter().map(object_key).collect();
        if !doomed.is_empty() {
            let target = cluster.clone();
            self.commit(|fresh| {
                if let Some(objects) = fresh.objects.get_mut(&target) {
                    objects.retain(|object| !doomed.contains(&object_key(object)));
                }
            })?;
            for (kind, _, name) in &doomed {
                report(&format!("{}/{name} deleted", kind.to_lowercase()));
            }
        }
        let exists = |sandbox: &Self, pod: &SandboxPod| {
            sandbox
                .pods
                .iter()
                .any(|p| p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name)
        };
        if !grace.is_zero() {
            let mut draining = false;
            for pod in &read.pods {
                if exists(self, pod) {
                    self.set_terminating(Some(&cluster), &pod.namespace, &pod.name)?;
                    report(&format!(
                        "pod/{} terminating (grace period {} s)",
                        pod.name,
                        grace.as_secs_f64()
                    ));
                    draining = true;
                }
            }
            if draining {
                std::thread::sleep(grace);
                // Others may have changed the sandbox meanwhile.
                *self = Self::load(Some(&self.plan.name))?;
            }
        }
        for pod in &read.pods {
            let Some(index) = self.pods.iter().position(|p| {
                p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name
            }) else {
                report(&format!("pod/{} not found", pod.name));
                continue;
            };
            let state = self.pods.remove(index);
            self.remove_pod(&state)?;
            self.commit(|fresh| fresh.pods.retain(|p| p.container_id != state.container_id))?;
            report(&format!("pod/{} deleted", pod.name));
        }
        Ok(())
    }

    /// Marks a pod terminating: it keeps running, so established connections finish, but its
    /// endpoints become ready=false, serving=true, terminating=true.
    pub fn set_terminating(
        &mut self,
        cluster: Option<&str>,
        namespace: &str,
        pod: &str,
    ) -> Result<(), SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        self.try_commit(|fresh| {
            let state = fresh
                .pods
                .iter_mut()
                .find(|p| p.cluster == cluster && p.namespace == namespace && p.name == pod)
                .ok_or_else(|| {
                    SandboxError::Invalid(format!("no pod {namespace}/{pod} in cluster {cluster}"))
                })?;
            state.terminating = true;
            Ok(())
        })
    }

    fn remove_pod(&self, pod: &PodState) -> Result<(), SandboxError> {
        host::stop_process(pod.server_pid);
        let has_agent = self
            .agents
            .iter()
            .any(|agent| agent.cluster == pod.cluster && agent.node == pod.node);
        if let (true, Some(node)) = (has_agent, self.plan.node(&pod.cluster, &pod.node)) {
            let (succeeded, result) =
                self.run_cni("DEL", node, &pod.container_id, &pod.netns, None)?;
            if !succeeded {
                return Err(SandboxError::Cni {
                    pod: pod.name.clone(),
                    message: result.to_string(),
                });
            }
        }
        if let Some(cgroup) = &pod.cgroup {
            host::remove_cgroup_tree(cgroup);
        }
        host::del_netns(&pod.netns);
        self.release_identity(pod);
        Ok(())
    }

    /// Runs `weft-cni` for a pod as a container runtime would: in the node's network
    /// namespace, with the `CNI_*` variables and the network configuration on stdin. Returns
    /// whether it succeeded and what it printed (the result, or the CNI error).
    fn run_cni(
        &self,
        command: &str,
        node: &NodePlan,
        container_id: &str,
        pod_netns: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<(bool, serde_json::Value), SandboxError> {
        let agent = self
            .agents
            .iter()
            .find(|agent| agent.cluster == node.cluster && agent.node == node.name)
            .ok_or_else(|| SandboxError::Invalid(format!("node {} has no agent", node.name)))?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "agentSocket": agent.cni_socket,
        })
        .to_string();
        let mut envs = vec![
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", container_id.to_owned()),
            (
                "CNI_NETNS",
                host::netns_path(pod_netns).display().to_string(),
            ),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", self.bin_dir.display().to_string()),
        ];
        if let Some((namespace, name)) = pod {
            envs.push((
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            ));
        }
        let output = host::run_in(
            &self.bin_dir.join("weft-cni"),
            &[],
            &envs,
            Some(&node.netns),
            &conf,
        )?;
        let result = serde_json::from_slice(&output.stdout).unwrap_or_default();
        Ok((output.status.success(), result))
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

    /// Runs a command inside a pod, as `kubectl exec` would.
    pub fn exec(
        &self,
        pod: &PodState,
        argv: &[String],
    ) -> Result<std::process::ExitStatus, SandboxError> {
        Ok(host::exec_in(argv, &pod.netns, pod.cgroup.as_deref())?)
    }

    fn state_path(run_dir: &Path) -> PathBuf {
        run_dir.join("state.json")
    }

    /// The Observe API socket of each node's agent.
    pub fn observe_sockets(&self) -> Vec<(String, PathBuf)> {
        self.plan
            .nodes
            .iter()
            .map(|node| (node.name.clone(), self.node_dir(node).join("observe.sock")))
            .collect()
    }

    /// The labels policies select a pod by: its labels (minus the ignore list), its namespace
    /// and its namespace's labels.
    pub fn security_labels(&self, pod: &PodState) -> BTreeMap<String, String> {
        self.pod_security_labels(&pod.cluster, &pod.namespace, &pod.labels)
    }

    fn pod_security_labels(
        &self,
        cluster: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let namespace_labels = self
            .namespaces
            .get(cluster)
            .and_then(|namespaces| namespaces.get(namespace))
            .cloned()
            .unwrap_or_default();
        SecurityLabels::for_pod(
            namespace,
            labels,
            &namespace_labels,
            &LabelFilter::default(),
        )
        .into_map()
    }

    fn policy_file(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("policies")
            .join(format!("{cluster}.json"))
    }

    /// The file a cluster's agents read Services and EndpointSlices from (`--service-file`).
    pub fn service_file(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("services")
            .join(format!("{cluster}.json"))
    }

    /// Each cluster's policies, for its agents (what the policy watch gives them in a cluster).
    fn write_policy_files(&self) -> Result<(), SandboxError> {
        for cluster in self.plan.clusters() {
            let policies: Vec<&serde_json::Value> = self
                .objects
                .get(cluster)
                .into_iter()
                .flatten()
                .filter(|object| {
                    matches!(
                        object["kind"].as_str(),
                        Some(
                            "WeftNetworkPolicy" | "WeftClusterwideNetworkPolicy" | "NetworkPolicy"
                        )
                    )
                })
                .collect();
            write_atomically(
                &self.policy_file(cluster),
                &serde_json::to_vec(&policies).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    /// Every cluster's Services (with their allocations), GlobalServices and EndpointSlices —
    /// its own and those other clusters share for its global Services — computed from the
    /// stored objects and the pods as they are now.
    pub fn services(&self) -> BTreeMap<String, ClusterServices> {
        let inputs: Vec<ClusterInput<'_>> = self
            .plan
            .clusters()
            .into_iter()
            .map(|cluster| ClusterInput {
                name: cluster,
                id: self.plan.cluster_id(cluster).unwrap_or_default(),
                objects: self.objects.get(cluster).map_or(&[], Vec::as_slice),
                pods: self.pods.iter().filter(|p| p.cluster == cluster).collect(),
            })
            .collect();
        services::compute(&inputs)
    }

    /// Each cluster's service file, for its agents (what the Service and EndpointSlice watches
    /// give them in a cluster).
    fn write_service_files(&self) -> Result<(), SandboxError> {
        let computed = self.services();
        for cluster in self.plan.clusters() {
            let objects = computed
                .get(cluster)
                .map(ClusterServices::file_objects)
                .unwrap_or_default();
            write_atomically(
                &self.service_file(cluster),
                &serde_json::to_vec(&objects).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    /// Every pod of every cluster, for the agents to name the far end of flows (what the
    /// Kubernetes endpoint watch gives them in a cluster).
    fn write_endpoint_directory(&self) -> Result<(), SandboxError> {
        let entries: Vec<serde_json::Value> = self
            .pods
            .iter()
            .map(|pod| {
                serde_json::json!({
                    "ip": pod.ip, "cluster": pod.cluster, "namespace": pod.namespace,
                    "pod": pod.name, "node": pod.node, "labels": pod.labels,
                    "identity": pod.identity,
                    "security_labels": self.security_labels(pod),
                    "named_ports": pod.ports.iter().filter_map(|port| {
                        Some((port.name.clone()?, (port.protocol.clone(), port.port)))
                    }).collect::<BTreeMap<_, _>>(),
                })
            })
            .collect();
        write_atomically(
            &self.run_dir.join("endpoints.json"),
            &serde_json::to_vec(&entries).unwrap_or_default(),
        )
    }

    pub fn save(&self) -> Result<(), SandboxError> {
        self.write_endpoint_directory()?;
        for node in &self.plan.nodes {
            self.write_local_pods(&node.cluster, &node.name, PendingPod::Keep)?;
        }
        self.write_policy_files()?;
        self.write_service_files()?;
        let path = Self::state_path(&self.run_dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| SandboxError::State {
            what: "write",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, &json)
    }

    /// Records a change made after `up`: under an exclusive lock, re-reads the state, applies
    /// `change` to it and writes it back, so two commands at once (an `apply` waiting for an
    /// agent while another restarts it) never undo each other's changes. `self` becomes the
    /// state written.
    pub fn commit(&mut self, change: impl FnOnce(&mut Self)) -> Result<(), SandboxError> {
        self.try_commit(|fresh| {
            change(fresh);
            Ok(())
        })
    }

    /// Serialises the processes that change this sandbox's files; held until the returned file
    /// is dropped. Not reentrant: never take it while holding it.
    fn lock_state(&self) -> Result<std::fs::File, SandboxError> {
        let lock_path = self.run_dir.join("state.lock");
        let lock_error = |reason: String| SandboxError::State {
            what: "lock",
            path: lock_path.clone(),
            reason,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| lock_error(e.to_string()))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(lock_error(std::io::Error::last_os_error().to_string()));
        }
        Ok(lock)
    }

    /// As `commit`, for a change that may refuse: then nothing is written and `self` stays.
    pub fn try_commit<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<T, SandboxError>,
    ) -> Result<T, SandboxError> {
        let _lock = self.lock_state()?;
        let mut fresh = Self::load(Some(&self.plan.name))?;
        let value = change(&mut fresh)?;
        fresh.save()?;
        *self = fresh;
        Ok(value)
    }

    /// The running sandbox called `name`, or the only one when `name` is `None`.
    pub fn load(name: Option<&str>) -> Result<Self, SandboxError> {
        let name = match name {
            Some(name) => name.to_owned(),
            None => {
                let running = running_sandboxes();
                match running.as_slice() {
                    [only] => only.clone(),
                    [] => return Err(SandboxError::NoneUp),
                    many => return Err(SandboxError::Ambiguous(many.join(", "))),
                }
            }
        };
        let path = Self::state_path(&Path::new(RUN_ROOT).join(&name));
        let bytes = std::fs::read(&path).map_err(|_| SandboxError::NotUp(name.clone()))?;
        serde_json::from_slice(&bytes).map_err(|e| SandboxError::State {
            what: "read",
            path,
            reason: e.to_string(),
        })
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

/// What names an object: kind, namespace (`default` when it names none, as kubectl reads
/// it; cluster-scoped kinds name none on either side), name.
fn object_key(object: &serde_json::Value) -> (String, String, String) {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(|value| value.as_str())
            .map(str::to_owned)
    };
    (
        text("/kind").unwrap_or_default(),
        text("/metadata/namespace").unwrap_or_else(|| "default".into()),
        text("/metadata/name").unwrap_or_default(),
    )
}

/// Stores objects in a cluster's `objects` as `kubectl apply` would, in order: one of the same
/// kind, namespace and name is replaced. A Service first gets its cluster IP and node ports
/// (kept from the one it replaces). Returns the objects as stored.
fn record_all(
    objects: &mut Vec<serde_json::Value>,
    new: &[serde_json::Value],
    service_cidr: Ipv4Net,
) -> Result<Vec<serde_json::Value>, String> {
    let mut allocations = services::Allocations::of(objects, service_cidr);
    let mut index: std::collections::HashMap<(String, String, String), usize> = objects
        .iter()
        .enumerate()
        .map(|(position, object)| (object_key(object), position))
        .collect();
    let mut stored = Vec::with_capacity(new.len());
    for object in new {
        let mut object = object.clone();
        if services::is_service(&object) {
            allocations.allocate(&mut object)?;
        }
        match index.get(&object_key(&object)) {
            Some(&position) => objects[position] = object.clone(),
            None => {
                index.insert(object_key(&object), objects.len());
                objects.push(object.clone());
            }
        }
        stored.push(object);
    }
    Ok(stored)
}

/// [`record_all`] for one object.
/// What [`Sandbox::write_local_pods`] does with the pods being created.
enum PendingPod {
    Keep,
    Add(serde_json::Value),
    Withdraw(serde_json::Value),
}

/// One entry of a node's local pods file (the agent's `LocalPod`).
fn local_pod_entry(
    namespace: &str,
    name: &str,
    identity: u32,
    security_labels: BTreeMap<String, String>,
    ports: &[PodPort],
) -> serde_json::Value {
    serde_json::json!({
        "namespace": namespace, "pod": name, "identity": identity,
        "security_labels": security_labels,
        "named_ports": ports.iter().filter_map(|port| {
            Some((port.name.clone()?, (port.protocol.clone(), port.port)))
        }).collect::<BTreeMap<_, _>>(),
        "host_ports": ports.iter().filter_map(|port| {
            Some(serde_json::json!({
                "protocol": port.protocol, "host_port": port.host_port?,
                "container_port": port.port, "host_ip": port.host_ip,
            }))
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
fn record(
    objects: &mut Vec<serde_json::Value>,
    object: serde_json::Value,
    service_cidr: Ipv4Net,
) -> Result<serde_json::Value, String> {
    record_all(objects, &[object], service_cidr).map(|mut stored| stored.remove(0))
}

/// Writes a file others poll so that they never see half of it: a temporary file, then a
/// rename over the old one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SandboxError> {
    let write_error = |reason: String| SandboxError::State {
        what: "write",
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write_error(e.to_string()))?;
    }
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes).map_err(|e| write_error(e.to_string()))?;
    std::fs::rename(&temporary, path).map_err(|e| write_error(e.to_string()))
}

/// Names of sandboxes with a state file.
pub fn running_sandboxes() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("state.json").exists())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: reap if it is our child and has exited; signal 0 probes.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) != pid && libc::kill(pid, 0) == 0
    }
}

/// A container ID as runtimes make them: 64 hex characters.
fn random_container_id() -> String {
    let mut bytes = [0u8; 32];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = random.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_SERVICE_CIDR;
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
        }
    }

    #[test]
    fn save_writes_each_clusters_service_file_with_allocations_and_shared_slices() {
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

        let file: Vec<serde_json::Value> = serde_json::from_slice(
            &std::fs::read(dir.path().join("services/west.json")).expect("the service file"),
        )
        .expect("JSON");
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
        assert!(!dir.path().join("services/west.json.tmp").exists());

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
