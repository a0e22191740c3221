//! `make bench`: pod-to-pod across nodes through Weft versus the same namespaces wired with
//! plain veths and kernel routes and no BPF, measured in the same run.
//!
//! TCP_STREAM: iperf3 throughput. TCP_RR: one byte each way on one connection, transactions per
//! second (what netperf's TCP_RR measures; netperf is not packaged here). Each measurement runs
//! ROUNDS times alternating baseline and Weft; medians are compared.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weft_e2e::measure::{median, tcp_rr};
use weft_e2e::netns::{unique_prefix, NetNs};
use weft_e2e::sandbox::TestSandbox;
use weft_sandbox::{default_bin_dir, host};

const ROUNDS: usize = 3;
const SECONDS: u64 = 4;

/// Two "nodes" joined through a bridge in a fabric namespace (as the sandbox joins its nodes),
/// each with one "pod" wired as weft-cni wires pods (veth, /32, link-local gateway with a static
/// neighbour), routed by the kernel alone.
struct Baseline {
    _namespaces: Vec<NetNs>,
    client: String,
    server: String,
    server_ip: String,
}

impl Baseline {
    fn build() -> Result<Self, String> {
        let p = unique_prefix();
        let (n1, n2) = (
            NetNs::create(format!("{p}-n1"))?,
            NetNs::create(format!("{p}-n2"))?,
        );
        let (a, b) = (
            NetNs::create(format!("{p}-a"))?,
            NetNs::create(format!("{p}-b"))?,
        );
        let fabric = NetNs::create(format!("{p}-fab"))?;
        fabric.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        fabric.exec(&["ip", "link", "set", "br0", "up"])?;
        for (port, node) in [("f1", &n1), ("f2", &n2)] {
            fabric.exec(&[
                "ip",
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                node.name(),
            ])?;
            fabric.exec(&["ip", "link", "set", port, "master", "br0", "up"])?;
        }
        for (node, ip, pod, pod_ip, remote_cidr, remote_node) in [
            (
                &n1,
                "172.31.0.1",
                &a,
                "10.9.1.1",
                "10.9.2.0/24",
                "172.31.0.2",
            ),
            (
                &n2,
                "172.31.0.2",
                &b,
                "10.9.2.1",
                "10.9.1.0/24",
                "172.31.0.1",
            ),
        ] {
            node.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            node.exec(&["ip", "link", "set", "eth0", "up"])?;
            node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            node.exec(&[
                "ip",
                "link",
                "add",
                "hv",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ])?;
            node.exec(&["ip", "link", "set", "hv", "up"])?;
            pod.exec(&["ip", "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
            pod.exec(&["ip", "link", "set", "eth0", "up"])?;
            pod.exec(&[
                "ip",
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            pod.exec(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            let host_mac = node.link("hv")?.mac;
            pod.exec(&[
                "ip",
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
            node.exec(&[
                "ip",
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                "hv",
                "scope",
                "link",
            ])?;
            node.exec(&["ip", "route", "add", remote_cidr, "via", remote_node])?;
        }
        Ok(Self {
            client: a.name().to_owned(),
            server: b.name().to_owned(),
            server_ip: "10.9.2.1".into(),
            _namespaces: vec![fabric, n1, n2, a, b],
        })
    }
}

fn spawn_in(netns: &str, program: &str, args: &[&str]) -> Child {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    host::in_namespaces(&mut command, Some(netns), None)
        .expect("prepare")
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"))
}

/// iperf3 throughput from `client` to `server_ip`, in Gbit/s.
fn tcp_stream(client: &str, server: &str, server_ip: &str) -> f64 {
    let mut iperf_server = spawn_in(server, "iperf3", &["-s", "-1", "-p", "5301"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut command = Command::new("iperf3");
    command.args([
        "-c",
        server_ip,
        "-p",
        "5301",
        "-t",
        &SECONDS.to_string(),
        "-J",
    ]);
    let output = host::in_namespaces(&mut command, Some(client), None)
        .expect("prepare")
        .output()
        .expect("iperf3 client");
    let _ = iperf_server.wait();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn main() {
    // `cargo bench` passes --bench; there is nothing to filter.
    let baseline = Baseline::build().expect("baseline namespaces");
    let mut echo = spawn_in(
        &baseline.server,
        default_bin_dir().join("weftctl").to_str().expect("path"),
        &[
            "sandbox",
            "serve",
            "--pod",
            "b",
            "--namespace",
            "bench",
            "--node",
            "n2",
            "--cluster",
            "bench",
            "--ports",
            r#"[{"port":9000,"protocol":"TCP","name":"echo"}]"#,
        ],
    );
    let mut results = Vec::new();
    for mode in ["native", "tunnel"] {
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: bench}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: weft/echo, ports: [{name: echo, containerPort: 9000}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: bench}\nspec:\n  nodeName: n2\n  containers: [{name: c, image: weft/echo, ports: [{name: echo, containerPort: 9000}]}]\n";
        let sandbox = TestSandbox::up(
            &format!("- {{name: bench, id: 1, podCIDR: 10.1.0.0/16, routingMode: {mode}, nodes: [n1, n2], manifests: [pods.yaml]}}\n"),
            &[("pods.yaml", pods)],
        );
        let (a, b) = (sandbox.pod("a").clone(), sandbox.pod("b").clone());
        let (mut base_stream, mut weft_stream, mut base_rr, mut weft_rr) =
            (vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            base_stream.push(tcp_stream(
                &baseline.client,
                &baseline.server,
                &baseline.server_ip,
            ));
            weft_stream.push(tcp_stream(&a.netns, &b.netns, &b.ip.to_string()));
            base_rr.push(tcp_rr(
                &baseline.client,
                SocketAddr::new(baseline.server_ip.parse().expect("ip"), 9000),
                SECONDS,
            ));
            weft_rr.push(tcp_rr(&a.netns, SocketAddr::from((b.ip, 9000)), SECONDS));
        }
        results.push((
            mode,
            median(base_stream),
            median(weft_stream),
            median(base_rr),
            median(weft_rr),
        ));
    }
    let _ = echo.kill();
    let _ = echo.wait();
    println!("\npod-to-pod across nodes, medians of {ROUNDS} runs of {SECONDS} s each (baseline: plain veths and kernel routes, no BPF)");
    println!(
        "{:<8} {:>16} {:>14} {:>8}   {:>14} {:>14} {:>8}",
        "weft", "baseline Gbit/s", "weft Gbit/s", "ratio", "baseline RR/s", "weft RR/s", "latency"
    );
    for (mode, base_stream, weft_stream, base_rr, weft_rr) in &results {
        println!(
            "{mode:<8} {base_stream:>16.2} {weft_stream:>14.2} {:>8.3}   {base_rr:>14.0} {weft_rr:>14.0} {:>8.3}",
            weft_stream / base_stream,
            base_rr / weft_rr
        );
    }
    println!("throughput ratio = weft / baseline (target >= 0.95); latency ratio = weft latency / baseline latency (target <= 1.1)");
}
