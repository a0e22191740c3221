//! Node-local traffic and entities. Traffic from a pod's own node (kubelet's probes,
//! host-network agents) passes whatever isolates the pod, as Kubernetes documents; another
//! node's traffic is policy's to allow; flows name the rule that decided, for nodes' traffic
//! too; `--allow-from-node=false` leaves the node's traffic to policies. `toEntities:
//! [kube-apiserver]` selects the API server's addresses (here given to the agents, as a
//! sandbox has no API server; in a cluster, the `default/kubernetes` Service's endpoints).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{echo_reachable, observe, outside_host, TestSandbox};

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n---\n";

fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: app\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: metrics, containerPort: 9100}}\n---\n"
    )
}

/// `app` is default-deny for ingress; `remote-node` may reach the metrics port only.
const POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: app}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: scrape, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [remote-node]
    toPorts: [{ports: [{port: '9100', protocol: TCP}]}]
";

fn sandbox(agent_args: &str) -> TestSandbox {
    TestSandbox::up(
        &format!("- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [ns.yaml, pods.yaml, policies.yaml], agentArgs: [{agent_args}]}}\n"),
        &[
            ("ns.yaml", NAMESPACE),
            ("pods.yaml", &[pod("web", "n1"), pod("other", "n2")].concat()),
            ("policies.yaml", POLICIES),
        ],
    )
}

/// Waits until `web` is isolated: a pod of another node cannot reach it.
fn wait_for_isolation(sandbox: &TestSandbox) {
    let (web, other) = (sandbox.pod("web"), sandbox.pod("other"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo_reachable(&other.netns, SocketAddr::from((web.ip, 8080)), 1) {
        assert!(Instant::now() < deadline, "policy never came into force");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The rules flows name for TCP traffic to `web`'s `port` at `web`, in `field`
/// (`ingress_allowed_by` or `ingress_denied_by`), from `source`.
fn named_rules(sandbox: &TestSandbox, source: &str, port: u16, field: &str) -> Vec<String> {
    observe(sandbox, &["--pod", "app/web", "--port", &port.to_string()])
        .iter()
        .filter(|flow| {
            flow["flow"]["IP"]["source"] == source
                && flow["flow"]["trace_observation_point"] == "TO_ENDPOINT"
        })
        .filter_map(|flow| flow["flow"][field].as_array().cloned())
        .flatten()
        .filter_map(|rule| rule.as_str().map(str::to_owned))
        .collect()
}

fn wait_for_rule(sandbox: &TestSandbox, source: &str, port: u16, field: &str, rule: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let named = named_rules(sandbox, source, port, field);
        if named.iter().any(|named| named == rule) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no flow from {source} names {rule} in {field}: {named:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pods_own_node_reaches_it_whatever_isolates_it_and_flows_name_the_rule() {
    let sandbox = sandbox("");
    wait_for_isolation(&sandbox);
    let web = sandbox.pod("web").clone();
    let n1 = sandbox.node_netns("c1", "n1");
    let n2 = sandbox.node_netns("c1", "n2");
    let n1_ip = sandbox.sandbox.plan.node("c1", "n1").expect("n1").ip;
    let n2_ip = sandbox.sandbox.plan.node("c1", "n2").expect("n2").ip;

    // Its own node: kubelet's probe gets through the default-deny.
    assert!(
        echo_reachable(&n1, SocketAddr::from((web.ip, 8080)), 3),
        "the pod's own node was refused"
    );
    wait_for_rule(
        &sandbox,
        &n1_ip.to_string(),
        8080,
        "ingress_allowed_by",
        "built-in allow-from-node ingress[0]",
    );

    // Another node: only what the policies allow, named by the rule that decided.
    assert!(!echo_reachable(&n2, SocketAddr::from((web.ip, 8080)), 2));
    wait_for_rule(
        &sandbox,
        &n2_ip.to_string(),
        8080,
        "ingress_denied_by",
        "default deny: NetworkPolicy app/default-deny",
    );
    assert!(echo_reachable(&n2, SocketAddr::from((web.ip, 9100)), 3));
    wait_for_rule(
        &sandbox,
        &n2_ip.to_string(),
        9100,
        "ingress_allowed_by",
        "WeftNetworkPolicy app/scrape ingress[0]",
    );
}

#[test]
fn with_allow_from_node_off_the_nodes_traffic_is_policys_to_allow() {
    let sandbox = sandbox("--allow-from-node=false");
    wait_for_isolation(&sandbox);
    let web = sandbox.pod("web").clone();
    let n1 = sandbox.node_netns("c1", "n1");
    assert!(
        !echo_reachable(&n1, SocketAddr::from((web.ip, 8080)), 2),
        "the node reached an isolated pod with --allow-from-node=false"
    );
}

/// Where the sandbox's "API server" listens: a host on the fabric, outside the cluster.
const API_SERVER: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 250);
/// Another outside host: the world.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 251);

#[test]
fn the_kube_apiserver_entity_selects_the_api_servers_addresses_only() {
    let sandbox = TestSandbox::up(
        &format!("- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [ns.yaml, pods.yaml, policies.yaml], agentArgs: [--kube-apiserver-address, '{API_SERVER}']}}\n"),
        &[
            ("ns.yaml", NAMESPACE),
            ("pods.yaml", &pod("operator", "n1")),
            (
                "policies.yaml",
                "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: api-only, namespace: app}\nspec:\n  endpointSelector: {}\n  egress:\n  - toEntities: [kube-apiserver]\n",
            ),
        ],
    );
    let _outside = outside_host(&sandbox, &[API_SERVER, ELSEWHERE]);
    let operator = sandbox.pod("operator").clone();
    // The world is refused once the policy is in force...
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo_reachable(&operator.netns, SocketAddr::from((ELSEWHERE, 8080)), 1) {
        assert!(Instant::now() < deadline, "policy never came into force");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...and the API server is not.
    assert!(
        echo_reachable(&operator.netns, SocketAddr::from((API_SERVER, 8080)), 3),
        "toEntities: [kube-apiserver] did not allow the API server"
    );
    let allowed = observe(&sandbox, &["--pod", "app/operator", "--port", "8080"]);
    assert!(
        allowed.iter().any(|flow| {
            flow["flow"]["IP"]["destination"] == API_SERVER.to_string().as_str()
                && flow["flow"]["egress_allowed_by"]
                    .as_array()
                    .is_some_and(|by| {
                        by.iter()
                            .any(|rule| rule == "WeftNetworkPolicy app/api-only egress[0]")
                    })
        }),
        "{allowed:?}"
    );
}
