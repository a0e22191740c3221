//! `weftctl policy explain` and `policy status` against a cluster, whose API server is a fake
//! answering LIST requests from fixtures: two namespaces (`ml`, `web`), three pods, a
//! WeftNetworkPolicy guarding the model and a NetworkPolicy limiting the frontend's egress.

mod fake_apiserver;

use std::process::ExitCode;

use fake_apiserver::{namespace, pod, serve, Fixtures};
use serde_json::{json, Value};
use weft_core::policy::evaluate::Verdict;
use weftctl::policy::cluster::{explain_from_cluster, status_from_cluster};

/// `ml/model` takes HTTP from the gateway and the web frontend, never metrics from anyone, and
/// may not call the gateway.
fn model_access(status: Option<Value>) -> Value {
    let mut policy = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
        "metadata": {"name": "model-access", "namespace": "ml", "generation": 2},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "model"}},
            "ingress": [
                {"fromEndpoints": [{"matchLabels": {"app": "gateway"}}],
                 "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]},
                {"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "web", "app": "frontend"}}],
                 "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]},
            ],
            "ingressDeny": [
                {"fromEntities": ["all"], "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}]}]},
            ],
            "egressDeny": [
                {"toEndpoints": [{"matchLabels": {"app": "gateway"}}]},
            ],
        },
    });
    if let Some(status) = status {
        policy["status"] = status;
    }
    policy
}

/// The frontend may reach namespaces labelled `team: ml` on 8080 and 9090, and 203.0.113.0/24
/// on 443; nothing else.
fn frontend_egress() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "frontend-egress", "namespace": "web", "generation": 1},
        "spec": {
            "podSelector": {"matchLabels": {"app": "frontend"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
                 "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]},
                {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                 "ports": [{"port": 443, "protocol": "TCP"}]},
            ],
        },
    })
}

fn cluster(weft_policies: Vec<Value>) -> Fixtures {
    Fixtures {
        namespaces: vec![
            namespace("ml", json!({"team": "ml"})),
            namespace("web", json!({"team": "web"})),
        ],
        pods: vec![
            pod(
                "ml",
                "model",
                json!({"app": "model", "pod-template-hash": "7d9f"}),
                ("n1", "192.168.0.11"),
                "10.244.1.10",
                &[("http", 8080), ("metrics", 9090)],
            ),
            pod(
                "ml",
                "gateway",
                json!({"app": "gateway"}),
                ("n2", "192.168.0.12"),
                "10.244.2.20",
                &[("http", 8080)],
            ),
            pod(
                "web",
                "frontend",
                json!({"app": "frontend"}),
                ("n2", "192.168.0.12"),
                "10.244.2.30",
                &[],
            ),
        ],
        weft_policies,
        clusterwide_policies: vec![],
        network_policies: vec![frontend_egress()],
        weft_endpoints: vec![],
        without_crds: false,
    }
}

fn valid_status(selected: i64) -> Value {
    json!({
        "observedGeneration": 2,
        "conditions": [
            {"type": "Valid", "status": "True", "reason": "Valid", "message": "the policy is valid",
             "observedGeneration": 2, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "reason": "Accepted", "message": "accepted",
             "observedGeneration": 2, "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ],
        "selectedEndpoints": selected,
    })
}

fn columns_line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(name))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn line<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line {start:?} in\n{text}"))
}

// --- explain --------------------------------------------------------------------------------

#[tokio::test]
async fn an_allowed_pair_names_the_allowing_rule_in_both_directions() {
    let (client, _) = serve(cluster(vec![model_access(None)]));
    let explanation = explain_from_cluster(&client, "web/frontend", "ml/model:8080")
        .await
        .expect("explained");
    let text = explanation.to_string();
    assert_eq!(explanation.verdict(), Verdict::Allowed, "{text}");
    assert_eq!(
        line(&text, "web/frontend ->"),
        "web/frontend -> ml/model:8080/TCP"
    );
    assert_eq!(
        line(&text, "egress"),
        "egress  (web/frontend): ALLOWED by NetworkPolicy web/frontend-egress egress[0]"
    );
    assert_eq!(
        line(&text, "ingress"),
        "ingress (ml/model): ALLOWED by WeftNetworkPolicy ml/model-access ingress[1]"
    );
    assert_eq!(line(&text, "verdict"), "verdict: ALLOWED");

    // A named port (`http`) resolved on the server's side, the client found by name alone.
    let gateway = explain_from_cluster(&client, "gateway", "model:8080/TCP")
        .await
        .expect("explained")
        .to_string();
    assert_eq!(
        line(&gateway, "ingress"),
        "ingress (ml/model): ALLOWED by WeftNetworkPolicy ml/model-access ingress[0]"
    );
    assert_eq!(
        line(&gateway, "egress"),
        "egress  (ml/gateway): ALLOWED no policy isolates this direction"
    );
}

#[tokio::test]
async fn a_denied_pair_names_the_denying_rule_in_either_direction() {
    let (client, _) = serve(cluster(vec![model_access(None)]));

    let metrics = explain_from_cluster(&client, "web/frontend", "ml/model:9090")
        .await
        .expect("explained");
    let text = metrics.to_string();
    assert_eq!(metrics.verdict(), Verdict::Denied, "{text}");
    assert_eq!(
        line(&text, "egress"),
        "egress  (web/frontend): ALLOWED by NetworkPolicy web/frontend-egress egress[0]"
    );
    assert_eq!(
        line(&text, "ingress"),
        "ingress (ml/model): DENIED  by WeftNetworkPolicy ml/model-access ingressDeny[0]"
    );
    assert_eq!(line(&text, "verdict"), "verdict: DENIED");

    let outbound = explain_from_cluster(&client, "ml/model", "ml/gateway:8080")
        .await
        .expect("explained");
    let text = outbound.to_string();
    assert_eq!(outbound.verdict(), Verdict::Denied, "{text}");
    assert_eq!(
        line(&text, "egress"),
        "egress  (ml/model): DENIED  by WeftNetworkPolicy ml/model-access egressDeny[0]"
    );
    assert_eq!(
        line(&text, "ingress"),
        "ingress (ml/gateway): ALLOWED no policy isolates this direction"
    );
}

#[tokio::test]
async fn an_address_outside_the_cluster_is_the_world_where_cidr_rules_apply() {
    let (client, recorded) = serve(cluster(vec![model_access(None)]));

    let inside_cidr = explain_from_cluster(&client, "web/frontend", "203.0.113.7:443")
        .await
        .expect("explained");
    let text = inside_cidr.to_string();
    assert_eq!(inside_cidr.verdict(), Verdict::Allowed, "{text}");
    assert_eq!(
        line(&text, "egress"),
        "egress  (web/frontend): ALLOWED by NetworkPolicy web/frontend-egress egress[1]"
    );
    assert_eq!(
        line(&text, "ingress"),
        "ingress (203.0.113.7): not a Weft endpoint, no policy here"
    );

    let elsewhere = explain_from_cluster(&client, "web/frontend", "198.51.100.1:443")
        .await
        .expect("explained");
    let text = elsewhere.to_string();
    assert_eq!(elsewhere.verdict(), Verdict::Denied, "{text}");
    assert_eq!(
        line(&text, "egress"),
        "egress  (web/frontend): DENIED  by default: isolated by NetworkPolicy web/frontend-egress"
    );

    // Only the pods needed were read: by name, and by address for the target.
    let requests = recorded.requests();
    let pod_requests: Vec<&String> = requests.iter().filter(|r| r.contains("/pods?")).collect();
    assert!(
        pod_requests
            .iter()
            .all(|r| r.contains("fieldSelector=metadata.name=")
                || r.contains("fieldSelector=status.podIP=")),
        "{requests:#?}"
    );
    assert!(
        requests.contains(
            &"/api/v1/namespaces/web/pods?fieldSelector=metadata.name=frontend&limit=500"
                .to_owned()
        ),
        "{requests:#?}"
    );
    assert!(
        requests
            .contains(&"/api/v1/pods?fieldSelector=status.podIP=203.0.113.7&limit=500".to_owned()),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn an_address_that_is_a_pods_is_that_pod() {
    let (client, _) = serve(cluster(vec![model_access(None)]));
    let explanation = explain_from_cluster(&client, "ml/gateway", "10.244.1.10:8080")
        .await
        .expect("explained");
    let text = explanation.to_string();
    assert_eq!(
        line(&text, "ml/gateway ->"),
        "ml/gateway -> ml/model:8080/TCP"
    );
    assert_eq!(
        line(&text, "ingress"),
        "ingress (ml/model): ALLOWED by WeftNetworkPolicy ml/model-access ingress[0]"
    );
}

#[tokio::test]
async fn invalid_policies_take_no_part_and_unknown_pods_are_named() {
    let typo = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
        "metadata": {"name": "typo-cidr", "namespace": "web"},
        "spec": {"endpointSelector": {}, "egressDeny": [{"toCIDR": ["999.1.1.1/8"]}]},
    });
    let (client, _) = serve(cluster(vec![model_access(None), typo]));
    let explanation = explain_from_cluster(&client, "web/frontend", "203.0.113.7:443")
        .await
        .expect("explained");
    assert_eq!(explanation.verdict(), Verdict::Allowed, "{explanation}");

    let error = explain_from_cluster(&client, "web/ghost", "ml/model:8080")
        .await
        .expect_err("no such pod");
    assert!(
        error
            .to_string()
            .contains("no pod web/ghost in the cluster"),
        "{error}"
    );
}

#[tokio::test]
async fn a_cluster_without_weft_crds_is_told_so() {
    let mut fixtures = cluster(vec![]);
    fixtures.without_crds = true;
    let (client, _) = serve(fixtures);
    let error = explain_from_cluster(&client, "web/frontend", "ml/model:8080")
        .await
        .expect_err("no CRDs");
    assert!(
        error.to_string().contains("are Weft's CRDs installed"),
        "{error}"
    );
}

// --- status ---------------------------------------------------------------------------------

#[tokio::test]
async fn status_shows_conditions_and_counts_and_fails_on_an_invalid_policy() {
    let typo = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
        "metadata": {"name": "typo-cidr", "namespace": "ml", "generation": 1},
        "spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["999.1.1.1/8"]}]},
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {"type": "Valid", "status": "False", "reason": "BadCIDR",
                 "message": "spec.egress[0].toCIDR[0].cidr: \"999.1.1.1/8\" is not an IPv4 address or CIDR",
                 "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Ready", "status": "False", "reason": "Invalid", "message": "not applied",
                 "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            ],
        },
    });
    let (client, recorded) = serve(cluster(vec![model_access(Some(valid_status(1))), typo]));
    let report = status_from_cluster(&client, "kind-dev")
        .await
        .expect("status");
    let table = report.render(None);
    let columns = |name: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name} in\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        columns("CLUSTER")[..6],
        ["CLUSTER", "KIND", "NAME", "VALID", "READY", "SELECTED"],
        "{table}"
    );
    assert_eq!(
        columns("ml/model-access")[..7],
        [
            "kind-dev",
            "WeftNetworkPolicy",
            "ml/model-access",
            "True",
            "True",
            "1",
            "-"
        ],
        "{table}"
    );
    assert_eq!(
        columns("ml/typo-cidr")[..7],
        [
            "kind-dev",
            "WeftNetworkPolicy",
            "ml/typo-cidr",
            "False",
            "False",
            "-",
            "BadCIDR:"
        ],
        "{table}"
    );
    assert!(
        columns_line(&table, "ml/typo-cidr").ends_with("BadCIDR: spec.egress[0].toCIDR[0].cidr: \"999.1.1.1/8\" is not an IPv4 address or CIDR"),
        "{table}"
    );
    // A Kubernetes NetworkPolicy has no Weft status: validity and count are worked out here.
    assert_eq!(
        columns("web/frontend-egress")[..7],
        [
            "kind-dev",
            "NetworkPolicy",
            "web/frontend-egress",
            "True",
            "-",
            "1",
            "-"
        ],
        "{table}"
    );
    assert!(report.any_invalid());
    assert_eq!(report.exit_code(), ExitCode::from(1));

    // Pods were listed (for the NetworkPolicy's count), page by page.
    let requests = recorded.requests();
    assert!(
        requests.contains(&"/api/v1/pods?limit=500&continue=2".to_owned()),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn status_trusts_only_a_current_status_and_succeeds_when_all_are_valid() {
    // The operator judged generation 1 invalid; the spec was fixed since (generation 2).
    let stale = json!({
        "observedGeneration": 1,
        "conditions": [
            {"type": "Valid", "status": "False", "reason": "BadCIDR", "message": "old",
             "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Ready", "status": "False", "reason": "Invalid", "message": "old",
             "observedGeneration": 1, "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ],
        "selectedEndpoints": 7,
    });
    let mut fixtures = cluster(vec![model_access(Some(stale))]);
    fixtures.network_policies.clear();
    let (client, _) = serve(fixtures);
    let report = status_from_cluster(&client, "kind-dev")
        .await
        .expect("status");
    let table = report.render(None);
    let row: Vec<&str> = line(&table, "kind-dev").split_whitespace().collect();
    assert_eq!(
        row[..6],
        [
            "kind-dev",
            "WeftNetworkPolicy",
            "ml/model-access",
            "True",
            "False",
            "1"
        ],
        "judged here, counted here: {table}"
    );
    assert!(!report.any_invalid());
    assert_eq!(report.exit_code(), ExitCode::SUCCESS);
}

#[tokio::test]
async fn status_with_every_count_in_the_statuses_reads_no_pods() {
    let mut fixtures = cluster(vec![model_access(Some(valid_status(1)))]);
    fixtures.network_policies.clear();
    let (client, recorded) = serve(fixtures);
    let report = status_from_cluster(&client, "kind-dev")
        .await
        .expect("status");
    assert_eq!(report.exit_code(), ExitCode::SUCCESS);
    let requests = recorded.requests();
    assert!(
        !requests.iter().any(|r| r.contains("/pods")),
        "{requests:#?}"
    );
}

/// A WeftEndpoint as node `node`'s agent writes it, `Ready` with `reason` and `message`.
fn weft_endpoint(name: &str, node: &str, reason: &str, message: &str) -> Value {
    let ready = if reason == "Enforced" {
        "True"
    } else {
        "False"
    };
    json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftEndpoint",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"ips": ["10.244.1.10"], "identity": 65792, "nodeName": node},
        "status": {"state": "ready", "conditions": [
            {"type": "Valid", "status": "True", "reason": "Valid", "message": "wired",
             "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Ready", "status": ready, "reason": reason, "message": message,
             "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ]},
    })
}

#[tokio::test]
async fn status_names_the_nodes_whose_endpoints_report_their_policy_is_not_enforced_and_fails() {
    let mut fixtures = cluster(vec![model_access(Some(valid_status(1)))]);
    fixtures.network_policies.clear();
    fixtures.weft_endpoints = vec![
        weft_endpoint("model", "n1", "Enforced", "identity 65792; policy isolates ingress"),
        weft_endpoint("a", "n2", "PolicyNotEnforced", "the policies do not compile (too many peer selectors: 1100, at most 1024); the policy in force before stays"),
        weft_endpoint("b", "n2", "PolicyNotEnforced", "the policies do not compile (too many peer selectors: 1100, at most 1024); the policy in force before stays"),
        weft_endpoint("c", "n3", "WaitingForIdentity", "not yet"),
    ];
    let (client, _) = serve(fixtures);
    let report = status_from_cluster(&client, "kind-dev")
        .await
        .expect("status");
    let text = report.render(None);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("node ")).collect();
    assert_eq!(
        lines,
        ["node kind-dev/n2 does not enforce the policies as written: the policies do not compile (too many peer selectors: 1100, at most 1024); the policy in force before stays"],
        "one line per node, only for nodes that say so:\n{text}"
    );
    assert!(!report.any_invalid(), "the policies themselves are valid");
    assert_eq!(report.exit_code(), ExitCode::FAILURE);
}
