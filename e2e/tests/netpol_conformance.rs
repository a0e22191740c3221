//! Upstream Kubernetes NetworkPolicy conformance (`test/e2e/network/netpol/network_policy.go`),
//! on real packets: the connectivity cases of the "NetworkPolicy between server and client"
//! (TCP) and "NetworkPolicy between server and client using UDP" contexts, each transcribed
//! with its policies and its truth table (upstream's `Reachability`: `Expect`, `ExpectPeer`,
//! `ExpectAllIngress`, `ExpectAllEgress`, applied in upstream's order).
//!
//! The model is upstream's: namespaces x, y, z (labelled `ns: <name>` and, as the API server
//! does, `kubernetes.io/metadata.name: <name>`), pods a, b, c in each (labelled `pod: <name>`),
//! every pod serving TCP and UDP on 80 and 81 with upstream's port names (`serve-80-tcp`, …),
//! pods spread over two nodes. Every case probes the full 9×9 matrix (loopback ignored, as
//! upstream's `ignoreLoopback`). Newer upstream versions create only the pods a case needs;
//! where such a case's truth table leaves out a pod of the full model, the pod's expectation
//! is the one the older, full-model upstream version of the case states (noted per case).
//!
//! Out of scope: the SCTP context (Weft does not carry SCTP). The two TCP-context cases about
//! SCTP policies are in: they check that such a policy still isolates.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{in_netns, TestSandbox};
use weft_sandbox::{default_bin_dir, PodState, Sandbox};

const CLUSTER: &str = "c1";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 2] = ["n1", "n2"];
/// A probe that gets no answer within this is a drop.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long the datapath may take to agree with a change (policies, labels).
const CONVERGE: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
}

/// `x/a` → 0 … `z/c` → 8.
fn index(pod: &str) -> usize {
    let (namespace, name) = pod.split_once('/').expect("namespace/pod");
    let n = NAMESPACES
        .iter()
        .position(|n| *n == namespace)
        .expect("namespace");
    let p = PODS.iter().position(|p| *p == name).expect("pod");
    n * 3 + p
}

fn pod_string(index: usize) -> String {
    format!("{}/{}", NAMESPACES[index / 3], PODS[index % 3])
}

/// Upstream's `Peer`: a namespace and/or a pod name; `None` is any.
#[derive(Clone, Copy)]
struct Peer {
    namespace: Option<&'static str>,
    pod: Option<&'static str>,
}

const ANY: Peer = Peer {
    namespace: None,
    pod: None,
};

fn ns(namespace: &'static str) -> Peer {
    Peer {
        namespace: Some(namespace),
        pod: None,
    }
}

fn pod(namespace: &'static str, pod: &'static str) -> Peer {
    Peer {
        namespace: Some(namespace),
        pod: Some(pod),
    }
}

impl Peer {
    fn matches(&self, index: usize) -> bool {
        self.namespace.is_none_or(|n| n == NAMESPACES[index / 3])
            && self.pod.is_none_or(|p| p == PODS[index % 3])
    }
}

/// Upstream's `Reachability`: the expected truth table, from → to.
#[derive(Clone, PartialEq, Eq)]
struct Reachability([[bool; 9]; 9]);

impl Reachability {
    fn new(connected: bool) -> Self {
        Self([[connected; 9]; 9])
    }

    fn expect(&mut self, from: &str, to: &str, connected: bool) {
        self.0[index(from)][index(to)] = connected;
    }

    fn expect_peer(&mut self, from: Peer, to: Peer, connected: bool) {
        for f in (0..9).filter(|f| from.matches(*f)) {
            for t in (0..9).filter(|t| to.matches(*t)) {
                self.0[f][t] = connected;
            }
        }
    }

    fn expect_all_ingress(&mut self, to: &str, connected: bool) {
        for from in 0..9 {
            self.0[from][index(to)] = connected;
        }
    }

    fn expect_all_egress(&mut self, from: &str, connected: bool) {
        for to in 0..9 {
            self.0[index(from)][to] = connected;
        }
    }

    /// Whether `observed` agrees, loopback ignored (upstream's `ignoreLoopback`).
    fn agrees(&self, observed: &Self) -> bool {
        (0..9).all(|f| (0..9).all(|t| f == t || self.0[f][t] == observed.0[f][t]))
    }

    /// A table as upstream prints one: `.` connected, `X` not (or, for a comparison, `.`
    /// agrees, `X` differs); rows are clients, columns servers.
    fn render(&self, cell: impl Fn(usize, usize) -> char) -> String {
        let mut out = String::from("     ");
        for to in 0..9 {
            out.push_str(&format!("{:<4}", pod_string(to)));
        }
        out.push('\n');
        for from in 0..9 {
            out.push_str(&format!("{:<5}", pod_string(from)));
            for to in 0..9 {
                out.push_str(&format!("{:<4}", cell(from, to)));
            }
            out.push('\n');
        }
        out
    }

    fn table(&self) -> String {
        self.render(|f, t| if self.0[f][t] { '.' } else { 'X' })
    }

    fn diff(&self, observed: &Self) -> String {
        format!(
            "expected:\n{}observed:\n{}comparison (X: differs; loopback ignored):\n{}",
            self.table(),
            observed.table(),
            self.render(|f, t| if f == t || self.0[f][t] == observed.0[f][t] {
                '.'
            } else {
                'X'
            })
        )
    }
}

fn namespace_manifest(name: &str, extra: &[(&str, &str)]) -> String {
    // Names are quoted: YAML 1.1 reads a bare `y` as a boolean.
    let mut labels = format!("{{ns: '{name}', kubernetes.io/metadata.name: '{name}'");
    for (key, value) in extra {
        labels.push_str(&format!(", {key}: '{value}'"));
    }
    labels.push('}');
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: '{name}', labels: {labels}}}\n---\n"
    )
}

/// A pod as upstream's model makes it: one container per port and protocol.
fn pod_manifest(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: '{v}'")).collect();
    let mut containers = String::new();
    for port in [80, 81] {
        for protocol in ["TCP", "UDP"] {
            let lower = protocol.to_lowercase();
            containers.push_str(&format!(
                "  - name: cont-{port}-{lower}\n    image: agnhost\n    ports: [{{name: serve-{port}-{lower}, containerPort: {port}, protocol: {protocol}}}]\n"
            ));
        }
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: '{name}'\n  namespace: '{namespace}'\n  labels: {{{}}}\nspec:\n  nodeName: {node}\n  containers:\n{containers}---\n",
        labels.join(", ")
    )
}

fn node_of(index: usize) -> &'static str {
    NODES[index % 2]
}

fn model_manifests() -> (String, String) {
    let namespaces: String = NAMESPACES
        .iter()
        .map(|n| namespace_manifest(n, &[]))
        .collect();
    let pods: String = (0..9)
        .map(|i| {
            pod_manifest(
                NAMESPACES[i / 3],
                PODS[i % 3],
                node_of(i),
                &[("pod", PODS[i % 3])],
            )
        })
        .collect();
    (namespaces, pods)
}

/// A NetworkPolicy; `spec` is its spec's YAML, indented by two spaces.
fn np(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: '{namespace}'}}\nspec:\n{spec}"
    )
}

/// One probe: a TCP echo exchange, or a UDP echo round trip.
fn probe(netns: &str, target: SocketAddr, protocol: Protocol) -> bool {
    in_netns(netns, || match protocol {
        Protocol::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&target, PROBE_TIMEOUT) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
            let mut reply = [0u8; 4];
            stream.write_all(b"ping").is_ok()
                && stream.read_exact(&mut reply).is_ok()
                && &reply == b"ping"
        }
        Protocol::Udp => {
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                return false;
            };
            let _ = socket.set_read_timeout(Some(PROBE_TIMEOUT));
            let mut reply = [0u8; 16];
            socket.send_to(b"ping", target).is_ok()
                && matches!(socket.recv_from(&mut reply), Ok((4, from)) if from == target && &reply[..4] == b"ping")
        }
    })
}

struct Conformance {
    sandbox: TestSandbox,
    /// The model's pods, by [`index`].
    pods: Vec<PodState>,
    /// The policies applied now: (namespace, name) → manifest.
    applied: BTreeMap<(String, String), String>,
    /// Pods (by [`index`]) and namespaces whose labels a case changed.
    relabelled_pods: Vec<usize>,
    relabelled_namespaces: Vec<&'static str>,
    dir: tempfile::TempDir,
    written: usize,
}

impl Conformance {
    fn up() -> Self {
        let (namespaces, pods) = model_manifests();
        let sandbox = TestSandbox::up(
            &format!(
                "- {{name: {CLUSTER}, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [ns.yaml, pods.yaml]}}\n"
            ),
            &[("ns.yaml", &namespaces), ("pods.yaml", &pods)],
        );
        let pods = (0..9)
            .map(|i| {
                sandbox
                    .sandbox
                    .pod(PODS[i % 3], Some(NAMESPACES[i / 3]), None)
                    .expect("model pod")
                    .clone()
            })
            .collect();
        Self {
            sandbox,
            pods,
            applied: BTreeMap::new(),
            relabelled_pods: Vec::new(),
            relabelled_namespaces: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
            written: 0,
        }
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[index(pod)].ip
    }

    fn file(&mut self, content: &str) -> std::path::PathBuf {
        self.written += 1;
        let path = self.dir.path().join(format!("step-{}.yaml", self.written));
        std::fs::write(&path, content).expect("write manifest");
        path
    }

    fn state(&self) -> Sandbox {
        Sandbox::load(Some(&self.sandbox.name)).expect("sandbox state")
    }

    /// Creates or updates policies, as upstream's `CreatePolicy`/`UpdatePolicy`.
    fn apply(&mut self, policies: &[String]) -> Result<(), String> {
        let file = self.file(&policies.join("---\n"));
        self.state()
            .apply(None, &file)
            .map_err(|e| format!("apply: {e}"))?;
        for policy in policies {
            let object: serde_json::Value = serde_saphyr::from_str(policy).expect("policy YAML");
            let key = (
                object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                object["metadata"]["name"].as_str().unwrap_or("").to_owned(),
            );
            self.applied.insert(key, policy.clone());
        }
        Ok(())
    }

    /// Deletes every policy, as upstream's `cleanNetworkPolicies`.
    fn delete_policies(&mut self) -> Result<(), String> {
        if self.applied.is_empty() {
            return Ok(());
        }
        let all: Vec<String> = self.applied.values().cloned().collect();
        let file = self.file(&all.join("---\n"));
        self.state()
            .delete(None, &file)
            .map_err(|e| format!("delete: {e}"))?;
        self.applied.clear();
        Ok(())
    }

    /// Sets a pod's labels, as upstream's `AddPodLabels` (an update of the live pod).
    fn label_pod(&mut self, pod: &str, labels: &[(&str, &str)]) -> Result<(), String> {
        let i = index(pod);
        let manifest = pod_manifest(NAMESPACES[i / 3], PODS[i % 3], node_of(i), labels);
        let file = self.file(&manifest);
        let before = self.identity(i);
        self.state()
            .apply(None, &file)
            .map_err(|e| format!("relabel pod {pod}: {e}"))?;
        self.relabelled_pods.push(i);
        if self.identity(i) == before {
            return Err(format!(
                "relabel pod {pod}: its identity {before} did not change with its labels"
            ));
        }
        Ok(())
    }

    /// A model pod's identity as the sandbox (standing in for the operator) allocated it.
    fn identity(&self, i: usize) -> u32 {
        self.state()
            .pod(PODS[i % 3], Some(NAMESPACES[i / 3]), None)
            .expect("model pod")
            .identity
    }

    /// Adds labels to a namespace, as upstream's `AddNamespaceLabel`.
    fn label_namespace(
        &mut self,
        namespace: &'static str,
        extra: &[(&str, &str)],
    ) -> Result<(), String> {
        let file = self.file(&namespace_manifest(namespace, extra));
        let pods: Vec<usize> = (0..9).filter(|i| NAMESPACES[i / 3] == namespace).collect();
        let before: Vec<u32> = pods.iter().map(|i| self.identity(*i)).collect();
        self.state()
            .apply(None, &file)
            .map_err(|e| format!("relabel namespace {namespace}: {e}"))?;
        self.relabelled_namespaces.push(namespace);
        for (i, before) in pods.into_iter().zip(before) {
            if self.identity(i) == before {
                return Err(format!(
                    "relabel namespace {namespace}: {} kept identity {before}",
                    pod_string(i)
                ));
            }
        }
        Ok(())
    }

    /// Puts the model's labels back (upstream's `ResetPodLabels`, `DeleteNamespaceLabel`).
    fn reset_labels(&mut self) -> Result<(), String> {
        let mut manifests: String = self
            .relabelled_namespaces
            .iter()
            .map(|namespace| namespace_manifest(namespace, &[]))
            .collect();
        for &i in &self.relabelled_pods {
            manifests.push_str(&pod_manifest(
                NAMESPACES[i / 3],
                PODS[i % 3],
                node_of(i),
                &[("pod", PODS[i % 3])],
            ));
        }
        if manifests.is_empty() {
            return Ok(());
        }
        let file = self.file(&manifests);
        self.state()
            .apply(None, &file)
            .map_err(|e| format!("reset labels: {e}"))?;
        self.relabelled_pods.clear();
        self.relabelled_namespaces.clear();
        Ok(())
    }

    /// Whether every agent's enforcement report isolates each model pod as the policies in
    /// force say (the agents have taken the policies and labels in).
    fn agents_agree_on_isolation(&self) -> Result<(), String> {
        let state = self.state();
        let policies: Vec<weft_core::policy::model::Policy> = self
            .applied
            .values()
            // A policy this build refuses is not waited for: the truth table judges it.
            .filter_map(|manifest| {
                let policy: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_saphyr::from_str(manifest).expect("NetworkPolicy");
                weft_crds::policy_model::kubernetes_policy(&policy).ok()
            })
            .collect();
        let mut reports = BTreeMap::new();
        for node in NODES {
            let path = state
                .node_state_dir(CLUSTER, node)
                .join("policy-enforcement.json");
            let report: serde_json::Value = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default();
            reports.insert(node, report);
        }
        for pod in state.pods.iter().filter(|p| p.cluster == CLUSTER) {
            let labels = state.security_labels(pod);
            let selecting: Vec<_> = policies
                .iter()
                .filter(|p| p.subject.matches(&labels))
                .collect();
            let expected = (
                selecting.iter().any(|p| p.isolates_ingress),
                selecting.iter().any(|p| p.isolates_egress),
            );
            let entry = &reports[pod.node.as_str()]["endpoints"][pod.ip.to_string()];
            let reported = (
                entry["ingress"].as_bool().unwrap_or(false),
                entry["egress"].as_bool().unwrap_or(false),
            );
            if reported != expected {
                return Err(format!(
                    "{}/{} on {}: isolation (ingress, egress) reported {reported:?}, the policies say {expected:?}",
                    pod.namespace, pod.name, pod.node
                ));
            }
        }
        Ok(())
    }

    /// The whole matrix on one port and protocol, every probe at once.
    fn probe_matrix(&self, port: u16, protocol: Protocol) -> Reachability {
        let mut observed = Reachability::new(false);
        std::thread::scope(|scope| {
            let probes: Vec<_> = (0..9)
                .flat_map(|from| (0..9).map(move |to| (from, to)))
                .filter(|(from, to)| from != to)
                .map(|(from, to)| {
                    let netns = self.pods[from].netns.clone();
                    let target = SocketAddr::from((self.pods[to].ip, port));
                    (
                        from,
                        to,
                        scope.spawn(move || probe(&netns, target, protocol)),
                    )
                })
                .collect();
            for (from, to, probe) in probes {
                observed.0[from][to] = probe.join().expect("probe thread");
            }
        });
        for i in 0..9 {
            observed.0[i][i] = true;
        }
        observed
    }

    /// Upstream's `ValidateOrFail`: waits until the agents have the policies in force, then
    /// probes until the matrix agrees with `expected` (a change takes the agents a moment),
    /// failing with upstream's tables when it never does.
    fn validate(
        &self,
        port: u16,
        protocol: Protocol,
        expected: &Reachability,
    ) -> Result<(), String> {
        let deadline = Instant::now() + CONVERGE;
        while let Err(problem) = self.agents_agree_on_isolation() {
            if Instant::now() > deadline {
                let observed = self.probe_matrix(port, protocol);
                return Err(format!(
                    "the agents never isolated the pods as the policies say: {problem}\n{protocol:?}/{port}:\n{}",
                    expected.diff(&observed)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            let observed = self.probe_matrix(port, protocol);
            if expected.agrees(&observed) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{protocol:?}/{port}: the datapath disagrees with the truth table\n{}",
                    expected.diff(&observed)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Back to the model without policies, everything reachable again.
    fn clean(&mut self) -> Result<(), String> {
        self.delete_policies()?;
        self.reset_labels()?;
        self.validate(80, Protocol::Tcp, &Reachability::new(true))
    }
}

type Case = fn(&mut Conformance) -> Result<(), String>;

use Protocol::{Tcp, Udp};

// ---- "NetworkPolicy between server and client" ----

/// "should support a 'default-deny-ingress' policy"
fn default_deny_ingress(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(80, Tcp, &r)
}

/// "should support a 'default-deny-all' policy"
fn default_deny_all(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    r.expect_peer(ns("x"), ANY, false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy to allow traffic from pods within server namespace based on
/// PodSelector"
fn within_namespace_by_pod_selector(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "x-a-allows-x-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("x/b", "x/a", true);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy to allow ingress traffic for a target"
fn ingress_for_a_target(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )])?;
    h.apply(&[np(
        "x",
        "allow-all-to-a",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {}, namespaceSelector: {}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", true);
    r.expect_all_ingress("x/b", false);
    // Full model (older upstream): x/c is under deny-all too.
    r.expect_all_ingress("x/c", false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy to allow ingress traffic from pods in all namespaces"
fn ingress_from_all_namespaces(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-from-another-ns",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))
}

/// "should enforce policy to allow traffic only from a different namespace, based on
/// NamespaceSelector"
fn only_from_other_namespace(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on PodSelector with MatchExpressions"
fn pod_selector_match_expressions(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "x-a-allows-x-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("x/b", "x/a", true);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on NamespaceSelector with MatchExpressions"
fn namespace_selector_match_expressions(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-match-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: ['y']}]}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on PodSelector or NamespaceSelector"
fn pod_selector_or_namespace_selector(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-match-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ['x']}]}\n    - podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect("x/a", "x/a", false);
    r.expect("x/c", "x/a", false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on PodSelector and NamespaceSelector"
fn pod_selector_and_namespace_selector(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-podselector-and-nsselector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ['x']}]}\n      podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("y/b", "x/a", true);
    r.expect("z/b", "x/a", true);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on Multiple PodSelectors and NamespaceSelectors"
fn multiple_pod_and_namespace_selectors(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-z-pod-b-c",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ['x']}]}\n      podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect("y/a", "x/a", false);
    // Full model (older upstream): z/a matches no pod selector either.
    r.expect("z/a", "x/a", false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on any PodSelectors"
fn any_pod_selectors(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-x-pod-b-c",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}, {podSelector: {matchLabels: {pod: c}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("x/b", "x/a", true);
    r.expect("x/c", "x/a", true);
    h.validate(80, Tcp, &r)
}

fn only_from_y_a(h: &mut Conformance, protocol: Protocol) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-pod-a-via-namespace-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}\n      podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("y/a", "x/a", true);
    h.validate(80, protocol, &r)
}

/// "should enforce policy to allow traffic only from a pod in a different namespace based on
/// PodSelector and NamespaceSelector"
fn only_from_pod_in_other_namespace(h: &mut Conformance) -> Result<(), String> {
    only_from_y_a(h, Tcp)
}

fn allow_port_81_from_y(protocol: &str, name: &str) -> String {
    np(
        "x",
        name,
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: 'y'}}}}}}]\n    ports: [{{port: 81, protocol: {protocol}}}]\n  policyTypes: [Ingress]\n"),
    )
}

/// "should enforce policy based on Ports"
fn by_ports(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[allow_port_81_from_y(
        "TCP",
        "allow-client-a-via-ns-selector",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("y"), pod("x", "a"), true);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(81, Tcp, &r)
}

/// "should enforce multiple, stacked policies with overlapping podSelectors"
fn stacked_policies(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[allow_port_81_from_y(
        "TCP",
        "allow-client-a-via-ns-selector",
    )])?;
    let mut allow = Reachability::new(true);
    allow.expect_peer(ns("x"), pod("x", "a"), false);
    allow.expect_peer(ns("y"), pod("x", "a"), true);
    allow.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(81, Tcp, &allow)?;
    let mut deny = Reachability::new(true);
    deny.expect_all_ingress("x/a", false);
    h.validate(80, Tcp, &deny)?;
    h.apply(&[np(
        "x",
        "allow-client-a-via-ns-selector-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}}]\n    ports: [{port: 80, protocol: TCP}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(80, Tcp, &allow)
}

/// "should support allow-all policy"
fn allow_all(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-all",
        "  podSelector: {}\n  ingress: [{}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))?;
    h.validate(81, Tcp, &Reachability::new(true))
}

/// "should allow ingress access on one named port"
fn ingress_on_named_port(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-all",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: serve-81-tcp}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(81, Tcp, &Reachability::new(true))?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(80, Tcp, &r)
}

/// "should allow ingress access from namespace on one named port"
fn ingress_from_namespace_on_named_port(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-ns-selector-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}}]\n    ports: [{port: serve-80-tcp, protocol: TCP}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(80, Tcp, &r)?;
    let mut fail = Reachability::new(true);
    fail.expect_all_ingress("x/a", false);
    h.validate(81, Tcp, &fail)
}

/// "should allow egress access on one named port"
fn egress_on_named_port(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-egress",
        "  podSelector: {}\n  egress:\n  - ports: [{port: serve-80-tcp}]\n  policyTypes: [Egress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), ANY, false);
    h.validate(81, Tcp, &r)
}

/// "should enforce updated policy"
fn updated_policy(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-all-mutate-to-deny-all",
        "  podSelector: {}\n  ingress: [{}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(81, Tcp, &Reachability::new(true))?;
    h.apply(&[np(
        "x",
        "allow-all-mutate-to-deny-all",
        "  podSelector: {}\n  ingress: []\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(81, Tcp, &r)
}

/// "should allow ingress access from updated namespace"
fn ingress_from_updated_namespace(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(80, Tcp, &r)?;
    h.label_namespace("y", &[("ns2", "updated")])?;
    let mut with_label = Reachability::new(true);
    with_label.expect_all_ingress("x/a", false);
    with_label.expect_peer(ns("y"), ANY, true);
    h.validate(80, Tcp, &with_label)
}

/// "should allow ingress access from updated pod"
fn ingress_from_updated_pod(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b, pod2: updated}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(80, Tcp, &r)?;
    h.label_pod("x/b", &[("pod", "b"), ("pod2", "updated")])?;
    let mut with_label = Reachability::new(true);
    with_label.expect_all_ingress("x/a", false);
    with_label.expect("x/b", "x/a", true);
    h.validate(80, Tcp, &with_label)
}

/// "should deny ingress from pods on other namespaces"
fn deny_ingress_from_other_namespaces(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-empty-policy",
        "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("y"), ns("x"), false);
    r.expect_peer(ns("z"), ns("x"), false);
    h.validate(80, Tcp, &r)
}

/// "should deny ingress access to updated pod"
fn deny_ingress_to_updated_pod(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))?;
    h.label_pod("x/a", &[("pod", "a"), ("target", "isolated")])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(80, Tcp, &r)
}

/// "should deny egress from pods based on PodSelector"
fn deny_egress_by_pod_selector(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-egress-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_egress("x/a", false);
    h.validate(80, Tcp, &r)
}

/// "should deny egress from all pods in a namespace"
fn deny_egress_from_namespace(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-egress-ns-x",
        "  podSelector: {}\n  policyTypes: [Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), ANY, false);
    h.validate(80, Tcp, &r)
}

/// "should work with Ingress, Egress specified together"
fn ingress_and_egress_together(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n  egress:\n  - ports: [{port: 80}]\n  policyTypes: [Egress, Ingress]\n",
    )])?;
    let mut port80 = Reachability::new(true);
    port80.expect_all_ingress("x/a", false);
    port80.expect("x/b", "x/a", true);
    h.validate(80, Tcp, &port80)?;
    let mut port81 = Reachability::new(true);
    port81.expect_all_ingress("x/a", false);
    port81.expect_all_egress("x/a", false);
    port81.expect("x/b", "x/a", true);
    h.validate(81, Tcp, &port81)
}

/// "should support denying of egress traffic on the client side (even if the server
/// explicitly allows this traffic)"
fn egress_denied_on_client_side(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-to-ns-y-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}\n      podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    )])?;
    let from_x_a = "  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'x'}}\n      podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n";
    h.apply(&[
        np(
            "y",
            "allow-from-xa-on-ya-match-selector",
            &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n{from_x_a}"),
        ),
        np(
            "y",
            "allow-from-xa-on-yb-match-selector",
            &format!("  podSelector: {{matchLabels: {{pod: b}}}}\n{from_x_a}"),
        ),
    ])?;
    let mut r = Reachability::new(true);
    r.expect_peer(pod("x", "a"), ANY, false);
    r.expect_peer(ANY, pod("y", "a"), false);
    r.expect_peer(pod("x", "a"), pod("y", "a"), true);
    r.expect_peer(ANY, pod("y", "b"), false);
    h.validate(80, Tcp, &r)
}

/// "should enforce egress policy allowing traffic to a server in a different namespace based
/// on PodSelector and NamespaceSelector"
fn egress_to_pod_in_other_namespace(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-to-ns-y-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}\n      podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_egress("x/a", false);
    r.expect("x/a", "y/a", true);
    h.validate(80, Tcp, &r)
}

/// "should enforce ingress policy allowing any port traffic to a server on a specific
/// protocol"
fn ingress_any_port_on_a_protocol(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ingress-by-proto",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{protocol: TCP}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))?;
    let mut udp = Reachability::new(true);
    udp.expect_peer(ANY, pod("x", "a"), false);
    h.validate(80, Udp, &udp)
}

/// "should enforce multiple ingress policies with ingress allow-all policy taking precedence"
fn ingress_allow_all_takes_precedence(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ingress-port-80",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(81, Tcp, &r)?;
    h.apply(&[np(
        "x",
        "allow-ingress",
        "  podSelector: {}\n  ingress: [{}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(81, Tcp, &Reachability::new(true))
}

/// "should enforce multiple egress policies with egress allow-all policy taking precedence"
fn egress_allow_all_takes_precedence(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-egress-port-80",
        "  podSelector: {}\n  egress:\n  - ports: [{port: 80}]\n  policyTypes: [Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), ANY, false);
    h.validate(81, Tcp, &r)?;
    h.apply(&[np(
        "x",
        "allow-egress",
        "  podSelector: {}\n  egress: [{}]\n  policyTypes: [Egress]\n",
    )])?;
    h.validate(81, Tcp, &Reachability::new(true))
}

/// "should stop enforcing policies after they are deleted"
fn stop_enforcing_after_delete(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), ANY, false);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(80, Tcp, &r)?;
    h.delete_policies()?;
    h.validate(80, Tcp, &Reachability::new(true))
}

/// "should allow egress access to server in CIDR block"
fn egress_to_cidr_block(h: &mut Conformance) -> Result<(), String> {
    let y_b = h.ip("y/b");
    h.apply(&[np(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  egress:\n  - to: [{{ipBlock: {{cidr: {y_b}/32}}}}]\n  policyTypes: [Egress]\n"),
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_egress("x/a", false);
    r.expect("x/a", "y/b", true);
    h.validate(80, Tcp, &r)
}

/// upstream's `makeLargeCIDRForIP`: the /4 holding the address.
fn large_cidr(ip: Ipv4Addr) -> String {
    format!("{}/4", Ipv4Addr::from(u32::from(ip) & 0xf000_0000))
}

fn allow_around_x_b(h: &mut Conformance) -> Result<(), String> {
    let x_b = h.ip("x/b");
    h.apply(&[np(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  egress:\n  - to: [{{ipBlock: {{cidr: {}, except: [{x_b}/32]}}}}]\n  policyTypes: [Egress]\n",
            large_cidr(x_b)
        ),
    )])?;
    let mut r = Reachability::new(true);
    r.expect("x/a", "x/b", false);
    h.validate(80, Tcp, &r)
}

/// "should enforce except clause while egress access to server in CIDR block"
fn egress_cidr_except(h: &mut Conformance) -> Result<(), String> {
    allow_around_x_b(h)
}

/// "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"
fn cidr_and_except_overlap(h: &mut Conformance) -> Result<(), String> {
    allow_around_x_b(h)?;
    let x_b = h.ip("x/b");
    h.apply(&[np(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  egress:\n  - to: [{{ipBlock: {{cidr: {x_b}/32}}}}]\n  policyTypes: [Egress]\n"),
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_egress("x/a", false);
    r.expect("x/a", "x/b", true);
    h.validate(80, Tcp, &r)
}

/// "should enforce policies to check ingress and egress policies can be controlled
/// independently based on PodSelector"
fn ingress_and_egress_independent(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-egress-for-target",
        "  podSelector: {matchLabels: {pod: a}}\n  egress: [{}]\n  policyTypes: [Egress]\n",
    )])?;
    h.validate(80, Tcp, &Reachability::new(true))?;
    h.apply(&[np(
        "x",
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(80, Tcp, &r)
}

/// "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin
/// doesn't support SCTP"
fn sctp_is_not_tcp(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )])?;
    h.apply(&[np(
        "x",
        "allow-only-sctp-ingress-on-port-81",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81, protocol: SCTP}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(81, Tcp, &r)
}

/// "should properly isolate pods that are selected by a policy allowing SCTP, even if the
/// plugin doesn't support SCTP"; and `weftctl policy status` says what is not enforced.
fn sctp_policy_still_isolates(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-only-sctp-ingress-on-port-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 80, protocol: SCTP}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(81, Tcp, &r)?;
    let output = Command::new(default_bin_dir().join("weftctl"))
        .args(["policy", "status", "--sandbox", &h.sandbox.name])
        .output()
        .map_err(|e| format!("weftctl policy status: {e}"))?;
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .find(|line| line.contains("x/allow-only-sctp-ingress-on-port-80"))
        .ok_or_else(|| format!("policy status does not list the policy:\n{table}"))?;
    if !(line.contains("True") && line.contains("PartlyEnforced") && line.contains("SCTP")) {
        return Err(format!(
            "policy status should say the policy is valid and its SCTP port not enforced:\n{table}"
        ));
    }
    Ok(())
}

/// "should not allow access by TCP when a policy specifies only UDP"
fn udp_only_policy_denies_tcp(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-only-udp-ingress-on-port-81",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81, protocol: UDP}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    h.validate(81, Tcp, &r)
}

/// "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using
/// default ns label"
fn default_ns_label_match_labels(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-client-a-via-ns-selector-for-immutable-ns-label",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}}]\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(80, Tcp, &r)
}

/// "should enforce policy based on NamespaceSelector with MatchExpressions using default ns
/// label"
fn default_ns_label_match_expressions(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-ns-y-match-selector-for-immutable-ns-label",
        "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ['y']}]}}]\n  policyTypes: [Egress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(pod("x", "a"), ns("y"), false);
    h.validate(80, Tcp, &r)
}

// ---- "NetworkPolicy between server and client using UDP" ----

/// UDP: "should support a 'default-deny-ingress' policy"
fn udp_default_deny_ingress(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(80, Udp, &r)
}

/// UDP: "should enforce policy based on Ports"
fn udp_by_ports(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[allow_port_81_from_y("UDP", "allow-ingress-on-port-81-ns-x")])?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), pod("x", "a"), false);
    r.expect_peer(ns("z"), pod("x", "a"), false);
    h.validate(81, Udp, &r)
}

/// UDP: "should enforce policy to allow traffic only from a pod in a different namespace
/// based on PodSelector and NamespaceSelector"
fn udp_only_from_pod_in_other_namespace(h: &mut Conformance) -> Result<(), String> {
    only_from_y_a(h, Udp)
}

// ---- UDP variants of TCP-context cases: not in upstream's UDP context, added because named
// ports resolve per protocol (`serve-81-udp` is UDP 81; a rule naming it opens no TCP port).

/// UDP variant of "should allow ingress access on one named port".
fn udp_ingress_on_named_port(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-all",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: serve-81-udp, protocol: UDP}]\n  policyTypes: [Ingress]\n",
    )])?;
    h.validate(81, Udp, &Reachability::new(true))?;
    let mut r = Reachability::new(true);
    r.expect_peer(ANY, ns("x"), false);
    h.validate(81, Tcp, &r)
}

/// UDP variant of "should allow egress access on one named port".
fn udp_egress_on_named_port(h: &mut Conformance) -> Result<(), String> {
    h.apply(&[np(
        "x",
        "allow-egress",
        "  podSelector: {}\n  egress:\n  - ports: [{port: serve-80-udp, protocol: UDP}]\n  policyTypes: [Egress]\n",
    )])?;
    h.validate(80, Udp, &Reachability::new(true))?;
    let mut r = Reachability::new(true);
    r.expect_peer(ns("x"), ANY, false);
    h.validate(81, Udp, &r)?;
    h.validate(80, Tcp, &r)
}

const CASES: &[(&str, Case)] = &[
    (
        "should support a 'default-deny-ingress' policy",
        default_deny_ingress,
    ),
    ("should support a 'default-deny-all' policy", default_deny_all),
    (
        "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        within_namespace_by_pod_selector,
    ),
    (
        "should enforce policy to allow ingress traffic for a target",
        ingress_for_a_target,
    ),
    (
        "should enforce policy to allow ingress traffic from pods in all namespaces",
        ingress_from_all_namespaces,
    ),
    (
        "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        only_from_other_namespace,
    ),
    (
        "should enforce policy based on PodSelector with MatchExpressions",
        pod_selector_match_expressions,
    ),
    (
        "should enforce policy based on NamespaceSelector with MatchExpressions",
        namespace_selector_match_expressions,
    ),
    (
        "should enforce policy based on PodSelector or NamespaceSelector",
        pod_selector_or_namespace_selector,
    ),
    (
        "should enforce policy based on PodSelector and NamespaceSelector",
        pod_selector_and_namespace_selector,
    ),
    (
        "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        multiple_pod_and_namespace_selectors,
    ),
    (
        "should enforce policy based on any PodSelectors",
        any_pod_selectors,
    ),
    (
        "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        only_from_pod_in_other_namespace,
    ),
    ("should enforce policy based on Ports", by_ports),
    (
        "should enforce multiple, stacked policies with overlapping podSelectors",
        stacked_policies,
    ),
    ("should support allow-all policy", allow_all),
    (
        "should allow ingress access on one named port",
        ingress_on_named_port,
    ),
    (
        "should allow ingress access from namespace on one named port",
        ingress_from_namespace_on_named_port,
    ),
    (
        "should allow egress access on one named port",
        egress_on_named_port,
    ),
    ("should enforce updated policy", updated_policy),
    (
        "should allow ingress access from updated namespace",
        ingress_from_updated_namespace,
    ),
    (
        "should allow ingress access from updated pod",
        ingress_from_updated_pod,
    ),
    (
        "should deny ingress from pods on other namespaces",
        deny_ingress_from_other_namespaces,
    ),
    (
        "should deny ingress access to updated pod",
        deny_ingress_to_updated_pod,
    ),
    (
        "should deny egress from pods based on PodSelector",
        deny_egress_by_pod_selector,
    ),
    (
        "should deny egress from all pods in a namespace",
        deny_egress_from_namespace,
    ),
    (
        "should work with Ingress, Egress specified together",
        ingress_and_egress_together,
    ),
    (
        "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        egress_denied_on_client_side,
    ),
    (
        "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        egress_to_pod_in_other_namespace,
    ),
    (
        "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        ingress_any_port_on_a_protocol,
    ),
    (
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        ingress_allow_all_takes_precedence,
    ),
    (
        "should enforce multiple egress policies with egress allow-all policy taking precedence",
        egress_allow_all_takes_precedence,
    ),
    (
        "should stop enforcing policies after they are deleted",
        stop_enforcing_after_delete,
    ),
    (
        "should allow egress access to server in CIDR block",
        egress_to_cidr_block,
    ),
    (
        "should enforce except clause while egress access to server in CIDR block",
        egress_cidr_except,
    ),
    (
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        cidr_and_except_overlap,
    ),
    (
        "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        ingress_and_egress_independent,
    ),
    (
        "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        sctp_is_not_tcp,
    ),
    (
        "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        sctp_policy_still_isolates,
    ),
    (
        "should not allow access by TCP when a policy specifies only UDP",
        udp_only_policy_denies_tcp,
    ),
    (
        "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        default_ns_label_match_labels,
    ),
    (
        "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        default_ns_label_match_expressions,
    ),
    (
        "UDP: should support a 'default-deny-ingress' policy",
        udp_default_deny_ingress,
    ),
    ("UDP: should enforce policy based on Ports", udp_by_ports),
    (
        "UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        udp_only_from_pod_in_other_namespace,
    ),
    (
        "UDP variant: should allow ingress access on one named port",
        udp_ingress_on_named_port,
    ),
    (
        "UDP variant: should allow egress access on one named port",
        udp_egress_on_named_port,
    ),
];

#[test]
fn upstream_network_policy_cases_pass() {
    let started = Instant::now();
    let mut h = Conformance::up();
    // The model answers on every port and protocol before any policy.
    for (port, protocol) in [(80, Tcp), (81, Tcp), (80, Udp), (81, Udp)] {
        if let Err(problem) = h.validate(port, protocol, &Reachability::new(true)) {
            panic!("the model is not fully connected without policies: {problem}");
        }
    }
    // As `kubectl apply`, only labels of a live pod may change: another node is refused, and
    // nothing changes.
    let moved = pod_manifest("x", "a", NODES[1], &[("pod", "a")]);
    let file = h.file(&moved);
    let refused = h.state().apply(None, &file).expect_err("a pod cannot move");
    assert!(refused.to_string().contains("only labels"), "{refused}");
    assert_eq!(
        h.state().pod("a", Some("x"), None).expect("x/a").node,
        NODES[0]
    );
    // Every case runs, so one run names every failing case; then the test fails.
    let only = std::env::var("NETPOL_CASE").ok();
    let mut failed = Vec::new();
    for (name, case) in CASES {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let case_started = Instant::now();
        let outcome = case(&mut h);
        let cleaned = h.clean();
        eprintln!(
            "[{:>5.1}s] {} {name}",
            case_started.elapsed().as_secs_f32(),
            if outcome.is_ok() { "PASS" } else { "FAIL" }
        );
        if let Err(problem) = &outcome {
            eprintln!("{problem}");
            failed.push(*name);
        }
        if let Err(problem) = cleaned {
            panic!("could not return to the model without policies after {name:?}: {problem}");
        }
    }
    eprintln!(
        "{} cases, {} failed, in {:.0}s",
        CASES.len(),
        failed.len(),
        started.elapsed().as_secs_f32()
    );
    assert!(failed.is_empty(), "failing upstream cases: {failed:#?}");
}
