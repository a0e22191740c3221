//! A pod runs only once its policy is in place: CNI ADD returns when the pod's identity is
//! resolved and its policy is in the maps, so a pod isolated by policy is never reachable, not
//! even in its first instant; a pod a policy allows is reachable as soon as ADD has returned;
//! and an ADD whose pod never gets an identity fails with the reason and leaves nothing wired.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::sandbox::{echo_reachable, in_netns, observe, TestSandbox};
use weft_sandbox::{default_bin_dir, host};

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: secure, labels: {zone: secure}}
---
apiVersion: v1
kind: Namespace
metadata: {name: open, labels: {zone: open}}
---
apiVersion: v1
kind: Namespace
metadata: {name: probe, labels: {zone: probe}}
---
";

/// `secure` is default-deny for ingress; `open` takes traffic from the `probe` namespace only.
const POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: secure}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-probe, namespace: open}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {zone: probe}}}]
";

fn pod(name: &str, namespace: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

fn sandbox() -> TestSandbox {
    TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [namespaces.yaml, pods.yaml, policies.yaml]}\n",
        &[
            ("namespaces.yaml", NAMESPACES),
            ("pods.yaml", &pod("prober", "probe", "n2")),
            ("policies.yaml", POLICIES),
        ],
    )
}

fn apply(sandbox: &mut TestSandbox, name: &str, manifest: &str) {
    let file = std::env::temp_dir().join(format!("{}-{name}.yaml", sandbox.name));
    std::fs::write(&file, manifest).expect("write manifest");
    let applied = sandbox.sandbox.apply(None, &file);
    let _ = std::fs::remove_file(&file);
    applied.expect("apply");
}

/// Connects, from `netns`, to port 8080 of every address in `candidates` over and over until
/// stopped; collects the addresses that ever accepted.
struct Prober {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<Ipv4Addr>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(netns: &str, candidates: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let threads = candidates
            .into_iter()
            .map(|ip| {
                let (stop, accepted, netns) =
                    (Arc::clone(&stop), Arc::clone(&accepted), netns.to_owned());
                std::thread::spawn(move || {
                    in_netns(&netns, || {
                        let target = SocketAddr::from((ip, 8080));
                        while !stop.load(Ordering::Relaxed) {
                            match TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
                                Ok(_) => {
                                    accepted.lock().unwrap_or_else(|p| p.into_inner()).push(ip)
                                }
                                // Refused or unreachable answers at once: do not spin.
                                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                            }
                        }
                    })
                })
            })
            .collect();
        Self {
            stop,
            accepted,
            threads,
        }
    }

    fn finish(self) -> Vec<Ipv4Addr> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        accepted.clone()
    }
}

#[test]
fn a_pod_isolated_by_policy_is_never_reachable_from_its_first_instant() {
    let mut sandbox = sandbox();
    let prober = sandbox.pod("prober").clone();
    // Every address n1 can hand out next: the new pods' addresses are among them.
    let candidates: Vec<Ipv4Addr> = sandbox
        .sandbox
        .plan
        .node("c1", "n1")
        .expect("node n1")
        .pod_cidr
        .hosts()
        .take(12)
        .collect();
    let probing = Prober::start(&prober.netns, candidates);

    let names = ["fresh-0", "fresh-1", "fresh-2"];
    for name in names {
        apply(&mut sandbox, name, &pod(name, "secure", "n1"));
    }
    let fresh: Vec<Ipv4Addr> = names.iter().map(|name| sandbox.pod(name).ip).collect();
    // Go on probing until every new pod's policy has visibly dropped the prober.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let drops = observe(&sandbox, &["--verdict", "DROPPED", "--namespace", "secure"]);
        let refused = |ip: &Ipv4Addr| {
            drops.iter().any(|flow| {
                flow["flow"]["IP"]["destination"] == ip.to_string().as_str()
                    && flow["flow"]["IP"]["source"] == prober.ip.to_string().as_str()
            })
        };
        if fresh.iter().all(refused) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the prober was never dropped by every new pod's policy: {drops:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let accepted = probing.finish();
    let leaked: std::collections::BTreeSet<&Ipv4Addr> =
        accepted.iter().filter(|ip| fresh.contains(ip)).collect();
    assert!(
        leaked.is_empty(),
        "new pods under a default-deny policy accepted connections: {leaked:?}"
    );
}

#[test]
fn a_pod_a_policy_allows_is_reachable_as_soon_as_add_returns() {
    let mut sandbox = sandbox();
    let prober = sandbox.pod("prober").clone();
    for name in ["welcome-0", "welcome-1"] {
        apply(&mut sandbox, name, &pod(name, "open", "n1"));
        let target = SocketAddr::from((sandbox.pod(name).ip, 8080));
        assert!(
            echo_reachable(&prober.netns, target, 1),
            "{name} was not reachable right after ADD returned"
        );
    }
}

/// Runs `weft-cni ADD` for a pod the cluster never assigns an identity, as a runtime would.
fn add_unknown_pod(sandbox: &TestSandbox, pod_netns: &str) -> std::process::Output {
    let agent = sandbox
        .sandbox
        .agents
        .iter()
        .find(|agent| agent.node == "n1")
        .expect("agent of n1");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
        "agentSocket": agent.cni_socket,
    })
    .to_string();
    let envs = [
        ("CNI_COMMAND", "ADD".to_owned()),
        ("CNI_CONTAINERID", "ghost0123456789".to_owned()),
        (
            "CNI_NETNS",
            host::netns_path(pod_netns).display().to_string(),
        ),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", default_bin_dir().display().to_string()),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=secure;K8S_POD_NAME=ghost".to_owned(),
        ),
    ];
    host::run_in(
        &default_bin_dir().join("weft-cni"),
        &[],
        &envs,
        Some(&sandbox.node_netns("c1", "n1")),
        &conf,
    )
    .expect("run weft-cni")
}

fn links(netns: &str) -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(':').nth(1).map(|name| name.trim().to_owned()))
        .collect()
}

/// The node's address allocations (container → address); none before the first pod.
fn allocations(state_dir: &Path) -> serde_json::Value {
    std::fs::read(state_dir.join("ipam.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .map(|ipam| ipam["allocations"].clone())
        .filter(|allocations| !allocations.is_null())
        .unwrap_or_else(|| serde_json::json!({}))
}

#[test]
fn add_fails_with_the_reason_when_a_pod_never_gets_its_identity_and_leaves_nothing_wired() {
    let sandbox = sandbox();
    let node_netns = sandbox.node_netns("c1", "n1");
    let state_dir = sandbox.sandbox.node_state_dir("c1", "n1");
    let (links_before, ipam_before) = (links(&node_netns), allocations(&state_dir));
    let pod_netns = format!("{}-ghost", sandbox.name);
    host::add_netns(&pod_netns).expect("pod netns");
    let started = Instant::now();
    let output = add_unknown_pod(&sandbox, &pod_netns);
    let waited = started.elapsed();
    host::del_netns(&pod_netns);
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert!(!output.status.success(), "ADD succeeded: {result}");
    assert_eq!(result["code"], 11, "try again later: {result}");
    let details = result["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("security identity") && details.contains("secure/ghost"),
        "the error says why: {result}"
    );
    assert!(
        waited >= Duration::from_secs(15),
        "ADD gave up after {waited:?}, before its timeout"
    );
    assert_eq!(links(&node_netns), links_before, "a veth was left behind");
    assert_eq!(
        allocations(&state_dir),
        ipam_before,
        "an address stayed allocated"
    );
}

/// How many entries each per-endpoint map of node n1 holds.
fn per_endpoint_entries(sandbox: &TestSandbox) -> Vec<(&'static str, usize)> {
    let pins = sandbox.sandbox.bpffs.join("c1-n1/weft");
    ["endpoints", "endpoint_counters", "endpoint_policies"]
        .into_iter()
        .map(|map| (map, pinned_map_entries(&pins.join(map)).len()))
        .collect()
}

#[test]
fn deleted_pods_leave_no_per_endpoint_entries_behind() {
    let mut sandbox = sandbox();
    let prober = sandbox.pod("prober").clone();
    let before = per_endpoint_entries(&sandbox);
    let names: Vec<String> = (0..8).map(|i| format!("churn-{i}")).collect();
    let manifest: String = names.iter().map(|name| pod(name, "open", "n1")).collect();
    apply(&mut sandbox, "churn", &manifest);
    // Traffic both ways, so that every endpoint has counters.
    for name in &names {
        let target = SocketAddr::from((sandbox.pod(name).ip, 8080));
        assert!(echo_reachable(&prober.netns, target, 3), "{name}");
    }
    let during = per_endpoint_entries(&sandbox);
    assert!(
        during
            .iter()
            .zip(&before)
            .all(|((_, now), (_, then))| *now >= then + names.len()),
        "every pod has its entries: {before:?} -> {during:?}"
    );
    let file = std::env::temp_dir().join(format!("{}-churn.yaml", sandbox.name));
    std::fs::write(&file, &manifest).expect("write manifest");
    let deleted = sandbox.sandbox.delete(None, &file);
    let _ = std::fs::remove_file(&file);
    deleted.expect("delete the pods");
    assert_eq!(
        per_endpoint_entries(&sandbox),
        before,
        "entries left behind by deleted pods"
    );
}
