//! Pod connectivity in the sandbox, as a user sees it: real agents, real weft-cni, real
//! packets between network namespaces.

use weft_e2e::sandbox::{
    answered_by, assert_connection_observed, http_get, observe, run_in_pod, TestSandbox,
};

/// A pod with an HTTP port 8080, a TCP echo port 9000 and a UDP echo port 5353.
fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: echo, containerPort: 9000}}\n    - {{name: dns, containerPort: 5353, protocol: UDP}}\n---\n"
    )
}

fn one_cluster(routing_mode: &str) -> TestSandbox {
    let pods = [pod("a1", "n1"), pod("a2", "n1"), pod("b1", "n2")].concat();
    TestSandbox::up(
        &format!("- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, routingMode: {routing_mode}, nodes: [n1, n2], manifests: [pods.yaml]}}\n"),
        &[("pods.yaml", &pods)],
    )
}

fn assert_pods_talk(sandbox: &TestSandbox) {
    let (a1, a2, b1) = (sandbox.pod("a1"), sandbox.pod("a2"), sandbox.pod("b1"));
    for (from, to, path) in [
        (a1, a2, "same node"),
        (a1, b1, "across nodes"),
        (b1, a1, "across nodes, back"),
    ] {
        let body = http_get(&from.netns, to.ip, 8080).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(answered_by(&body), to.name, "{path}: {body}");
        assert!(
            body.contains(&format!("\"client\":\"{}:", from.ip)),
            "{path}: the pod sees the real client address: {body}"
        );
        assert_connection_observed(sandbox, from, to);
    }
}

#[test]
fn pods_talk_on_one_node_and_across_nodes_through_the_vxlan_tunnel() {
    let sandbox = one_cluster("tunnel");
    assert_pods_talk(&sandbox);
}

#[test]
fn pods_talk_across_nodes_with_native_routing() {
    let sandbox = one_cluster("native");
    assert_pods_talk(&sandbox);
}

#[test]
fn pods_and_nodes_reach_each_other() {
    let sandbox = one_cluster("tunnel");
    let (a1, b1) = (sandbox.pod("a1"), sandbox.pod("b1"));
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    let n2 = sandbox.sandbox.plan.node("c1", "n2").expect("n2").clone();
    // A node reaches its own pods and another node's pods.
    for (pod, what) in [(a1, "local pod"), (b1, "remote pod")] {
        let body =
            http_get(&n1.netns, pod.ip, 8080).unwrap_or_else(|e| panic!("node -> {what}: {e}"));
        assert_eq!(answered_by(&body), pod.name, "node -> {what}");
    }
    // The node's connection to the remote pod is observed where it is delivered; the node end
    // is shown by its address.
    let flows = observe(
        &sandbox,
        &["--pod", "default/b1", "--ip", &n1.ip.to_string()],
    );
    assert!(
        flows.iter().any(|flow| {
            flow["flow"]["IP"]["source"] == n1.ip.to_string()
                && flow["flow"]["destination"]["pod_name"] == "b1"
                && flow["flow"]["trace_observation_point"] == "TO_ENDPOINT"
        }),
        "node n1 -> b1 not observed: {flows:?}"
    );
    // A pod reaches its own node and another node.
    for node in [&n1, &n2] {
        let ping = run_in_pod(a1, "ping", &["-c", "1", "-W", "2", &node.ip.to_string()]);
        assert!(
            ping.status.success(),
            "pod a1 -> node {}: {}",
            node.name,
            String::from_utf8_lossy(&ping.stdout)
        );
    }
}

#[test]
fn tcp_and_udp_echo_across_nodes() {
    let sandbox = one_cluster("tunnel");
    let (a1, b1) = (sandbox.pod("a1"), sandbox.pod("b1"));
    let tcp = run_in_pod(
        a1,
        "bash",
        &[
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/9000; echo tcp-hello >&3; head -c 9 <&3",
                b1.ip
            ),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&tcp.stdout), "tcp-hello");
    let udp = run_in_pod(
        a1,
        "bash",
        &[
            "-c",
            &format!(
                "exec 3<>/dev/udp/{}/5353; echo udp-hello >&3; timeout 3 head -c 9 <&3",
                b1.ip
            ),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&udp.stdout), "udp-hello");
}

#[test]
fn two_clusters_with_distinct_pod_cidrs_share_one_fabric() {
    let sandbox = TestSandbox::up(
        "- {name: east, id: 1, podCIDR: 10.1.0.0/16, routingMode: tunnel, nodes: [e1], manifests: [east.yaml]}\n- {name: west, id: 2, podCIDR: 10.2.0.0/16, routingMode: native, nodes: [w1], manifests: [west.yaml]}\n",
        &[("east.yaml", &pod("east-app", "e1")), ("west.yaml", &pod("west-app", "w1"))],
    );
    let (east, west) = (sandbox.pod("east-app"), sandbox.pod("west-app"));
    assert!(east.ip.to_string().starts_with("10.1."), "{}", east.ip);
    assert!(west.ip.to_string().starts_with("10.2."), "{}", west.ip);
    for (from, to) in [(east, west), (west, east)] {
        let body = http_get(&from.netns, to.ip, 8080)
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.cluster, to.cluster));
        let reply: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(reply["cluster"], to.cluster.as_str(), "{body}");
        assert_connection_observed(&sandbox, from, to);
    }
}
