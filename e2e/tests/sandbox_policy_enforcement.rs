//! Policy on real packets: every connection of a matrix passes or not exactly as
//! `weftctl policy explain` says; denied connections name their rule in flows; replies pass;
//! a policy update keeps connections it still allows and stops the ones it denies; a policy
//! changed or deleted while a node's agent was down is enforced as it now stands once the agent
//! is back (nothing the earlier run wrote outlives it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{echo_reachable, in_netns, observe, TestSandbox};
use weft_sandbox::default_bin_dir;

fn pod(name: &str, namespace: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: nccl, containerPort: 29400}}\n    - {{name: ssh, containerPort: 22}}\n---\n"
    )
}

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: training, labels: {team: ml}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: inference, labels: {team: ml}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ops, labels: {team: ops}}\n---\n";

const POLICIES: &str = "\
# Trainers talk NCCL to each other, across nodes.
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: nccl, namespace: training}
spec:
  endpointSelector: {matchLabels: {app: trainer}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: trainer}}]
    toPorts: [{ports: [{port: '29400', endPort: 29500, protocol: TCP}]}]
---
# The model server takes HTTP from pods of namespaces labelled team=ml.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: model-from-ml, namespace: inference}
spec:
  podSelector: {matchLabels: {app: model}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: ml}}}]
    ports: [{protocol: TCP, port: http}]
---
# No SSH to anything, whatever else allows it.
apiVersion: weft.io/v1alpha1
kind: WeftClusterwideNetworkPolicy
metadata: {name: no-ssh}
spec:
  endpointSelector: {}
  ingressDeny: [{toPorts: [{ports: [{port: '22', protocol: TCP}]}]}]
";

fn sandbox() -> TestSandbox {
    TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [namespaces.yaml, pods.yaml, policies.yaml]}\n",
        &[
            ("namespaces.yaml", NAMESPACES),
            (
                "pods.yaml",
                &[
                    pod("trainer-0", "training", "trainer", "n1"),
                    pod("trainer-1", "training", "trainer", "n2"),
                    pod("model", "inference", "model", "n1"),
                    pod("gateway", "inference", "gateway", "n2"),
                    pod("debug", "ops", "debug", "n2"),
                ]
                .concat(),
            ),
            ("policies.yaml", POLICIES),
        ],
    )
}

fn connects(netns: &str, target: SocketAddr) -> bool {
    echo_reachable(netns, target, 1)
}

fn explained(sandbox: &TestSandbox, from: &str, to: &str, port: u16) -> bool {
    let output = Command::new(default_bin_dir().join("weftctl"))
        .args([
            "policy",
            "explain",
            "--from",
            from,
            "--to",
            &format!("{to}:{port}"),
            "--sandbox",
            &sandbox.name,
        ])
        .output()
        .expect("weftctl policy explain");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("verdict:"), "{text}");
    text.contains("verdict: ALLOWED")
}

/// Waits until the agents have the policies in force (a connection they deny is denied).
fn wait_for_enforcement(sandbox: &TestSandbox) {
    let (from, to) = (
        sandbox.pod("debug").clone(),
        sandbox.pod("trainer-0").clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(&from.netns, SocketAddr::from((to.ip, 29400))) {
        assert!(Instant::now() < deadline, "policy never came into force");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_connection_of_the_matrix_does_what_explain_says() {
    let sandbox = sandbox();
    wait_for_enforcement(&sandbox);
    let pods = ["trainer-0", "trainer-1", "model", "gateway", "debug"];
    let mut expectations = Vec::new();
    for from in pods {
        for to in pods.iter().filter(|to| **to != from) {
            for port in [8080u16, 29400, 22] {
                let (client, server) = (sandbox.pod(from), sandbox.pod(to));
                let expected = explained(&sandbox, from, to, port);
                let actual = connects(&client.netns, SocketAddr::from((server.ip, port)));
                assert_eq!(
                    actual, expected,
                    "{from} -> {to}:{port}: datapath {actual}, explain {expected}"
                );
                expectations.push((from, *to, port, actual));
            }
        }
    }
    // The cases the policies are about, spelled out.
    let outcome = |from: &str, to: &str, port: u16| {
        expectations
            .iter()
            .find(|(f, t, p, _)| *f == from && *t == to && *p == port)
            .map(|e| e.3)
    };
    assert_eq!(
        outcome("trainer-0", "trainer-1", 29400),
        Some(true),
        "NCCL across nodes"
    );
    assert_eq!(
        outcome("trainer-0", "trainer-1", 8080),
        Some(false),
        "trainers are isolated otherwise"
    );
    assert_eq!(
        outcome("gateway", "model", 8080),
        Some(true),
        "NetworkPolicy: from a team=ml namespace, named port"
    );
    assert_eq!(
        outcome("debug", "model", 8080),
        Some(false),
        "NetworkPolicy: ops is not team=ml"
    );
    assert_eq!(
        outcome("gateway", "debug", 22),
        Some(false),
        "deny wins on an unisolated pod"
    );
    assert_eq!(
        outcome("gateway", "debug", 8080),
        Some(true),
        "unisolated pods stay open"
    );
}

#[test]
fn a_denied_connection_names_what_denied_it_in_flows() {
    let sandbox = sandbox();
    wait_for_enforcement(&sandbox);
    let (debug, model) = (sandbox.pod("debug").clone(), sandbox.pod("model").clone());
    assert!(!connects(&debug.netns, SocketAddr::from((model.ip, 22))));
    let drops = observe(
        &sandbox,
        &[
            "--verdict",
            "DROPPED",
            "--pod",
            "inference/model",
            "--port",
            "22",
        ],
    );
    let named = drops.iter().any(|flow| {
        flow["flow"]["drop_reason_desc"] == "denied by policy"
            && flow["flow"]["ingress_denied_by"]
                .as_array()
                .is_some_and(|by| {
                    by.iter()
                        .any(|rule| rule == "WeftClusterwideNetworkPolicy no-ssh ingressDeny[0]")
                })
    });
    assert!(named, "{drops:?}");

    // Allowed flows name the rule that allowed them.
    let gateway = sandbox.pod("gateway").clone();
    assert!(connects(&gateway.netns, SocketAddr::from((model.ip, 8080))));
    let allowed = observe(
        &sandbox,
        &[
            "--verdict",
            "FORWARDED",
            "--pod",
            "inference/model",
            "--port",
            "8080",
        ],
    );
    assert!(
        allowed.iter().any(
            |flow| flow["flow"]["ingress_allowed_by"]
                .as_array()
                .is_some_and(|by| by
                    .iter()
                    .any(|rule| rule == "NetworkPolicy inference/model-from-ml ingress[0]"))
        ),
        "{allowed:?}"
    );
}

#[test]
fn an_invalid_update_keeps_the_last_good_enforcement() {
    let sandbox = sandbox();
    wait_for_enforcement(&sandbox);
    let (trainer_0, trainer_1, debug) = (
        sandbox.pod("trainer-0").clone(),
        sandbox.pod("trainer-1").clone(),
        sandbox.pod("debug").clone(),
    );
    // The same policy, now with a CIDR the schema lets through but no datapath can honour.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("nccl.yaml");
    std::fs::write(&broken, "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: nccl, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: trainer}}\n  ingress:\n  - fromCIDR: ['999.0.0.0/8']\n").expect("write");
    let mut handle = weft_sandbox::Sandbox::load(Some(&sandbox.name)).expect("state");
    handle.apply(None, &broken).expect("apply");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        connects(&trainer_0.netns, SocketAddr::from((trainer_1.ip, 29400))),
        "the last good version still allows NCCL"
    );
    assert!(
        !connects(&debug.netns, SocketAddr::from((trainer_1.ip, 29400))),
        "and still isolates the trainers"
    );
    let status = Command::new(default_bin_dir().join("weftctl"))
        .args(["policy", "status", "--sandbox", &sandbox.name])
        .output()
        .expect("weftctl policy status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!status.status.success());
    assert!(
        text.lines()
            .any(|l| l.contains("training/nccl") && l.contains("BadCIDR")),
        "{text}"
    );
}

#[test]
fn replies_pass_and_an_update_keeps_allowed_connections_and_stops_denied_ones() {
    let sandbox = sandbox();
    wait_for_enforcement(&sandbox);
    let (trainer_0, trainer_1) = (
        sandbox.pod("trainer-0").clone(),
        sandbox.pod("trainer-1").clone(),
    );
    // An established NCCL connection (its replies pass although trainer-0's ingress is isolated).
    let mut established = in_netns(&trainer_0.netns, || {
        TcpStream::connect_timeout(
            &SocketAddr::from((trainer_1.ip, 29400)),
            Duration::from_secs(2),
        )
        .expect("connect")
    });
    established
        .set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let exchange = |stream: &mut TcpStream| {
        let mut reply = [0u8; 4];
        stream.write_all(b"ping").is_ok() && stream.read_exact(&mut reply).is_ok()
    };
    assert!(exchange(&mut established));

    // An update that still allows NCCL keeps the connection.
    let dir = tempfile::tempdir().expect("tempdir");
    let still_allowed = dir.path().join("still.yaml");
    std::fs::write(&still_allowed, "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: extra, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: trainer}}\n  ingress: [{fromEntities: [host]}]\n").expect("write");
    let mut handle = weft_sandbox::Sandbox::load(Some(&sandbox.name)).expect("state");
    handle.apply(None, &still_allowed).expect("apply");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        exchange(&mut established),
        "a connection the new policy still allows survives"
    );

    // A deny on the port stops it, and new connections too.
    let deny = dir.path().join("deny.yaml");
    std::fs::write(&deny, "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: stop-nccl, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: trainer}}\n  ingressDeny: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '29400', protocol: TCP}]}]}]\n").expect("write");
    handle.apply(None, &deny).expect("apply deny");
    let deadline = Instant::now() + Duration::from_secs(5);
    while exchange(&mut established) {
        assert!(
            Instant::now() < deadline,
            "the denied connection kept flowing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !connects(&trainer_0.netns, SocketAddr::from((trainer_1.ip, 29400))),
        "new connections are denied"
    );

    // Deleting the deny restores NCCL.
    handle.delete(None, &deny).expect("delete deny");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !connects(&trainer_0.netns, SocketAddr::from((trainer_1.ip, 29400))) {
        assert!(
            Instant::now() < deadline,
            "NCCL did not come back after the deny was deleted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The server takes `ports` from the client, and is isolated otherwise.
fn server_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|port| format!("{{port: '{port}', protocol: TCP}}"))
        .collect();
    format!("apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: server, namespace: training}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{}]}}]\n---\n", ports.join(", "))
}

/// No SSH from the client to the server, whatever allows it.
const SERVER_NO_SSH: &str = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: server-no-ssh, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n---\n";

/// Another pod takes anything from the client: this policy stays throughout, so the client's
/// peer set keeps the bit that the server's rules name (they name the same peers).
const DEBUG_FROM_CLIENT: &str = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: debug-from-client, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: debug}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n";

/// Polls until `from` reaching `to` is `expected` (agents apply policy within a second or two).
fn wait_until_connects(from: &str, to: SocketAddr, expected: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(from, to) != expected {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_policy_changed_or_deleted_while_the_agent_is_down_is_enforced_as_it_stands_after_a_restart() {
    let mut sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [namespaces.yaml, pods.yaml, policies.yaml]}\n",
        &[
            ("namespaces.yaml", NAMESPACES),
            (
                "pods.yaml",
                &[
                    pod("server", "training", "server", "n1"),
                    pod("client", "training", "client", "n1"),
                    pod("debug", "training", "debug", "n1"),
                ]
                .concat(),
            ),
            (
                "policies.yaml",
                &[&server_policy(&[8080, 29400]), SERVER_NO_SSH, DEBUG_FROM_CLIENT].concat(),
            ),
        ],
    );
    let (server, client, debug) = (
        sandbox.pod("server").clone(),
        sandbox.pod("client").clone(),
        sandbox.pod("debug").clone(),
    );
    let port = |port: u16| SocketAddr::from((server.ip, port));
    wait_until_connects(
        &debug.netns,
        port(8080),
        false,
        "the policies never came into force",
    );
    assert!(
        connects(&client.netns, port(8080)),
        "the client may use 8080"
    );
    assert!(connects(&client.netns, port(29400)), "and 29400");
    assert!(!connects(&client.netns, port(22)), "but not 22");

    let dir = tempfile::tempdir().expect("tempdir");

    // 29400 is taken out of the rule while the agent is down: the restarted agent removes the
    // allow entry the earlier run wrote for it.
    sandbox.stop_agent("c1", "n1");
    let narrowed = dir.path().join("narrowed.yaml");
    std::fs::write(&narrowed, server_policy(&[8080])).expect("write");
    sandbox.sandbox.apply(None, &narrowed).expect("apply");
    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart n1's agent");
    wait_until_connects(
        &client.netns,
        port(29400),
        false,
        "29400 is still allowed after the restart, though no rule allows it any more",
    );
    assert!(connects(&client.netns, port(8080)), "8080 is still allowed");
    assert!(
        !connects(&debug.netns, port(8080)),
        "the server is still isolated"
    );

    // The server's policies are deleted while the agent is down: the server is open again,
    // and the deny the earlier run wrote does not outlive its policy.
    sandbox.stop_agent("c1", "n1");
    let servers = dir.path().join("servers.yaml");
    std::fs::write(&servers, [&server_policy(&[8080]), SERVER_NO_SSH].concat()).expect("write");
    sandbox.sandbox.delete(None, &servers).expect("delete");
    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart n1's agent");
    wait_until_connects(
        &debug.netns,
        port(8080),
        true,
        "the server is still isolated after the restart, though no policy selects it",
    );
    assert!(
        connects(&client.netns, port(22)),
        "22 is still denied after the restart, though no policy denies it any more"
    );
    assert!(connects(&client.netns, port(29400)), "29400 is open again");
}
