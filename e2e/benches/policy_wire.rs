//! Part of `make bench`: the cost of policy on the wire. Two pods on different nodes, TCP_RR
//! and new-connection rate, first with no policy, then with 1,000 more identities known to the
//! nodes and 500 rules selecting the destination (the client's rule among them), same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_e2e::measure::{median, tcp_crr, tcp_rr};
use weft_e2e::sandbox::TestSandbox;

const SECONDS: u64 = 3;
const ROUNDS: usize = 3;
const IDENTITIES: u32 = 1000;
const RULES: usize = 500;

fn measure(sandbox: &TestSandbox) -> (f64, f64) {
    let (client, server) = (sandbox.pod("client").clone(), sandbox.pod("server").clone());
    let target = SocketAddr::from((server.ip, 9000));
    let rr: Vec<f64> = (0..ROUNDS)
        .map(|_| tcp_rr(&client.netns, target, SECONDS))
        .collect();
    let crr: Vec<f64> = (0..ROUNDS)
        .map(|_| tcp_crr(&client.netns, target, SECONDS))
        .collect();
    (median(rr), median(crr))
}

fn main() {
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench, labels: {app: client}}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: x, ports: [{name: echo, containerPort: 9000}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\nspec:\n  nodeName: n2\n  containers: [{name: c, image: x, ports: [{name: echo, containerPort: 9000}]}]\n";
    let sandbox = TestSandbox::up(
        "- {name: bench, id: 1, podCIDR: 10.1.0.0/16, routingMode: native, nodes: [n1, n2], manifests: [pods.yaml]}\n",
        &[("pods.yaml", pods)],
    );
    // Tens of thousands of short connections: reuse TIME_WAIT ports rather than run out.
    for (key, value) in [
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/ipv4/ip_local_port_range", "1024 65535"),
    ] {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", &format!("echo '{value}' > /proc/sys/{key}")]);
        let status = weft_sandbox::host::in_namespaces(
            &mut command,
            Some(&sandbox.pod("client").netns),
            None,
        )
        .expect("prepare")
        .status()
        .expect("sysctl");
        assert!(status.success(), "setting {key}");
    }
    let (rr_without, crr_without) = measure(&sandbox);

    // 1,000 more identities in the cluster (endpoints elsewhere), as the sandbox tells the
    // agents about them.
    let endpoints: Vec<weft_core::state::EncodedChange> = (0..IDENTITIES)
        .map(|i| {
            weft_core::state::EncodedChange::upsert(&weft_core::state::EndpointMeta {
                ip: std::net::Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250 + 1) as u8),
                cluster: "bench".into(),
                namespace: "bench".into(),
                pod: format!("client-{i}"),
                node: "elsewhere".into(),
                identity: 70_000 + i,
                security_labels: [
                    ("app".to_owned(), format!("client-{i}")),
                    ("io.kubernetes.pod.namespace".to_owned(), "bench".to_owned()),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            })
        })
        .collect();
    sandbox
        .sandbox
        .send_extra_rows(&endpoints)
        .expect("send the endpoints");

    // 500 rules selecting the server; the client's is the last.
    let mut rules = String::new();
    for i in 0..RULES - 1 {
        rules.push_str(&format!("  - fromEndpoints: [{{matchLabels: {{app: client-{i}}}}}]\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]\n", 10_000 + i));
    }
    rules.push_str("  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: '9000', protocol: TCP}]}]\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, format!("apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: server, namespace: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n{rules}")).expect("write");
    weft_sandbox::Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &policy)
        .expect("apply");
    // Wait until the server's node has the policy in force.
    let log = sandbox.sandbox.run_dir.join("nodes/bench-n2/agent.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|line| line.contains("policy in force") && line.contains("\"policies\":1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy did not come into force"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rr_with, crr_with) = measure(&sandbox);

    println!("\npolicy on the wire: client -> server across nodes, {IDENTITIES} extra identities, {RULES} rules selecting the server; medians of {ROUNDS} x {SECONDS} s");
    println!(
        "{:<20} {:>14} {:>14} {:>8}",
        "", "no policy", "with policy", "ratio"
    );
    println!(
        "{:<20} {rr_without:>14.0} {rr_with:>14.0} {:>8.3}",
        "TCP_RR  (trans/s)",
        rr_with / rr_without
    );
    println!(
        "{:<20} {crr_without:>14.0} {crr_with:>14.0} {:>8.3}",
        "TCP_CRR (conn/s)",
        crr_with / crr_without
    );
    println!("ratio = with policy / without (target >= 0.9)");
}
