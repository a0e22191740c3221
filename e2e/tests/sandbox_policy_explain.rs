//! `weftctl policy status` and `weftctl policy explain` on a sandbox: validity with the bad
//! field named, and verdicts naming the deciding rule in both directions.

use std::process::Command;

use weft_e2e::sandbox::TestSandbox;
use weft_sandbox::default_bin_dir;

fn pod(name: &str, namespace: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

const POLICIES: &str = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: model-from-gateway, namespace: ml}\nspec:\n  endpointSelector: {matchLabels: {app: model}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: gateway}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-debug, namespace: ml}\nspec:\n  podSelector: {matchLabels: {app: debug}}\n  policyTypes: [Egress]\n---\napiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: typo-cidr, namespace: ml}\nspec:\n  endpointSelector: {}\n  egress: [{toCIDR: ['999.1.1.1/8']}]\n";

fn weftctl(sandbox: &TestSandbox, args: &[&str]) -> (bool, String) {
    let output = Command::new(default_bin_dir().join("weftctl"))
        .args(args)
        .args(["--sandbox", &sandbox.name])
        .output()
        .expect("run weftctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn status_names_invalid_policies_and_explain_names_the_deciding_rules() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, policies.yaml]}\n",
        &[
            ("pods.yaml", &[pod("model", "ml", "model", "n1"), pod("gateway", "ml", "gateway", "n2"), pod("debug", "ml", "debug", "n2")].concat()),
            ("policies.yaml", POLICIES),
        ],
    );

    let (ok, status) = weftctl(&sandbox, &["policy", "status"]);
    assert!(
        !ok,
        "an invalid policy makes status fail, as a CI gate: {status}"
    );
    let line = |name: &str| {
        status
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("ml/model-from-gateway").contains("True"), "{status}");
    assert!(
        line("ml/model-from-gateway").split_whitespace().nth(4) == Some("1"),
        "selects the model pod: {status}"
    );
    assert!(
        line("ml/typo-cidr").contains("BadCIDR: spec.egress[0].toCIDR[0].cidr"),
        "{status}"
    );

    let (_, allowed) = weftctl(
        &sandbox,
        &[
            "policy",
            "explain",
            "--from",
            "ml/gateway",
            "--to",
            "ml/model:8080",
        ],
    );
    assert!(
        allowed.contains(
            "ingress (ml/model): ALLOWED by WeftNetworkPolicy ml/model-from-gateway ingress[0]"
        ),
        "{allowed}"
    );
    assert!(allowed.contains("verdict: ALLOWED"), "{allowed}");

    let (_, other_port) = weftctl(
        &sandbox,
        &[
            "policy",
            "explain",
            "--from",
            "gateway",
            "--to",
            "model:9090",
        ],
    );
    assert!(
        other_port
            .contains("DENIED  by default: isolated by WeftNetworkPolicy ml/model-from-gateway"),
        "{other_port}"
    );
    assert!(other_port.contains("verdict: DENIED"), "{other_port}");

    let model_ip = sandbox.pod("model").ip.to_string();
    let (_, debug) = weftctl(
        &sandbox,
        &[
            "policy",
            "explain",
            "--from",
            "debug",
            "--to",
            &format!("{model_ip}:8080"),
        ],
    );
    assert!(
        debug.contains(
            "egress  (ml/debug): DENIED  by default: isolated by NetworkPolicy ml/no-debug"
        ),
        "{debug}"
    );
}
