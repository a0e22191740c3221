//! A policy the datapath cannot hold — more distinct peer selectors on a node than a peer set
//! has bits — is a clear error where users look (`weftctl policy status`, which fails), never
//! a silent allow: the policy in force before stays, and the error clears once it is fixed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{echo_reachable, policy_status, TestSandbox};
use weft_sandbox::Sandbox;

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ml\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: echo, containerPort: 9000}}\n---\n"
    )
}

/// Only the gateway may reach the model.
const GOOD: &str = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: model, namespace: ml}\nspec:\n  endpointSelector: {matchLabels: {app: model}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: gateway}}]\n";

/// The same policy with 1,100 more peer selectors: beyond a node's 1,024.
fn too_many_peers() -> String {
    let mut rules = String::from("  - fromEndpoints: [{matchLabels: {app: gateway}}]\n");
    for i in 0..1100 {
        rules.push_str(&format!(
            "  - fromEndpoints: [{{matchLabels: {{app: client-{i}}}}}]\n"
        ));
    }
    format!("apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: model, namespace: ml}}\nspec:\n  endpointSelector: {{matchLabels: {{app: model}}}}\n  ingress:\n{rules}")
}

fn apply(sandbox: &TestSandbox, yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, yaml).expect("write");
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &file)
        .expect("apply");
}

/// Polls `weftctl policy status` until `done` holds for its outcome.
fn status_until(sandbox: &TestSandbox, what: &str, done: impl Fn(bool, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = policy_status(sandbox);
        if done(ok, &out) {
            return out;
        }
        assert!(Instant::now() < deadline, "{what}: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_policy_too_big_for_the_datapath_is_a_status_error_and_the_last_good_one_stays() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, policy.yaml]}\n",
        &[
            (
                "pods.yaml",
                &[pod("model", "model", "n1"), pod("gateway", "gateway", "n2"), pod("intruder", "intruder", "n2")].concat(),
            ),
            ("policy.yaml", GOOD),
        ],
    );
    let model = SocketAddr::from((sandbox.pod("model").ip, 9000));
    let (gateway, intruder) = (
        sandbox.pod("gateway").clone(),
        sandbox.pod("intruder").clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while echo_reachable(&intruder.netns, model, 1) {
        assert!(
            Instant::now() < deadline,
            "the good policy never took effect"
        );
    }
    assert!(echo_reachable(&gateway.netns, model, 5));
    status_until(&sandbox, "a good policy is not an error", |ok, _| ok);

    apply(&sandbox, &too_many_peers());
    let out = status_until(&sandbox, "the node never reported the policy", |ok, out| {
        !ok && out.contains("node c1/n1 does not enforce the policies as written")
    });
    assert!(out.contains("1024"), "the error names the bound: {out}");
    // Never a silent allow: the policy in force before still decides.
    assert!(echo_reachable(&gateway.netns, model, 5));
    assert!(!echo_reachable(&intruder.netns, model, 3));

    apply(&sandbox, GOOD);
    status_until(&sandbox, "the error never cleared", |ok, out| {
        ok && !out.contains("does not enforce")
    });
}

/// A new policy whose L7 rules and FQDNs this version cannot enforce: the gateway may call the
/// model only with `GET`s (an L7 rule), and the model may reach one DNS name (an FQDN). Both
/// parts allow nothing, everything else the policy says holds: the model is isolated both ways
/// and its metrics port stays open to the gateway.
const PARTLY: &str = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: model-l7, namespace: ml}\nspec:\n  endpointSelector: {matchLabels: {app: model}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: gateway}}]\n    toPorts:\n    - ports: [{port: '9000', protocol: TCP}]\n      rules: {http: [{method: GET}]}\n    - ports: [{port: '9100', protocol: TCP}]\n  egress:\n  - toFQDNs: [{matchName: models.example.com}]\n";

#[test]
fn a_policy_weft_cannot_fully_enforce_isolates_and_opens_only_what_it_can() {
    let metrics_pod = |name: &str, app: &str, node: &str| {
        pod(name, app, node).replace(
            "    - {name: echo, containerPort: 9000}\n",
            "    - {name: echo, containerPort: 9000}\n    - {name: metrics, containerPort: 9100}\n",
        )
    };
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, policy.yaml]}\n",
        &[
            (
                "pods.yaml",
                &[metrics_pod("model", "model", "n1"), metrics_pod("gateway", "gateway", "n2")].concat(),
            ),
            ("policy.yaml", PARTLY),
        ],
    );
    let (model, gateway) = (sandbox.pod("model").clone(), sandbox.pod("gateway").clone());
    // The L7-restricted port is not opened at L4: it would allow every request.
    let deadline = Instant::now() + Duration::from_secs(20);
    while echo_reachable(&gateway.netns, SocketAddr::from((model.ip, 9000)), 1) {
        assert!(
            Instant::now() < deadline,
            "the model was never isolated: the policy was not applied"
        );
    }
    assert!(echo_reachable(
        &gateway.netns,
        SocketAddr::from((model.ip, 9100)),
        5
    ));
    // Egress is isolated too: the FQDN allows nothing, and nothing else is allowed.
    assert!(!echo_reachable(
        &model.netns,
        SocketAddr::from((gateway.ip, 9000)),
        3
    ));
    let out = status_until(&sandbox, "the omissions are not shown", |_, out| {
        out.contains("spec.ingress[0].toPorts[0].rules") && out.contains("spec.egress[0].toFQDNs")
    });
    assert!(out.contains("PartlyEnforced"), "{out}");
}
