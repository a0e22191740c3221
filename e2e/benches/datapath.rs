//! `make bench`: pod-to-pod across nodes through Weft versus the same namespaces without BPF,
//! measured in the same run: native routing against plain veths and kernel routes, tunnel mode
//! against a kernel VXLAN overlay wired as flannel wires it (bridge + VXLAN device).
//!
//! TCP_STREAM: iperf3 throughput. TCP_RR: one byte each way on one connection, transactions per
//! second (what netperf's TCP_RR measures; netperf is not packaged here). Each measurement runs
//! ROUNDS times alternating baseline and Weft; medians are compared.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weft_e2e::measure::{median, tcp_rr};
use weft_e2e::netns::{unique_prefix, NetNs};
use weft_e2e::sandbox::TestSandbox;
use weft_sandbox::{default_bin_dir, host};

const ROUNDS: usize = 3;
const SECONDS: u64 = 4;

/// How the baseline's nodes carry pod traffic between them, without any BPF.
#[derive(Clone, Copy)]
enum BaselineKind {
    /// Pods on veths with kernel routes, as weft-cni wires them (compared with native routing).
    Routed,
    /// Flannel's VXLAN backend: pods on a bridge, a VXLAN device with static neighbour and FDB
    /// entries for the other node (compared with tunnel mode).
    Vxlan,
}

/// Two "nodes" joined through a bridge in a fabric namespace (as the sandbox joins its nodes),
/// each with one "pod", forwarded by the kernel alone.
struct Baseline {
    _namespaces: Vec<NetNs>,
    client: String,
    server: String,
    server_ip: String,
}

/// The pod MTU of an encapsulating CNI on a 1,500-byte network (VXLAN's 50 bytes off).
const VXLAN_POD_MTU: &str = "1450";

impl Baseline {
    fn build(kind: BaselineKind) -> Result<Self, String> {
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
        let nodes = [
            (&n1, "172.31.0.1", &a, 1u8, "172.31.0.2", 2u8),
            (&n2, "172.31.0.2", &b, 2u8, "172.31.0.1", 1u8),
        ];
        for (node, ip, _, _, _, _) in nodes {
            node.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            node.exec(&["ip", "link", "set", "eth0", "up"])?;
            node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        match kind {
            BaselineKind::Routed => {
                for (node, _, pod, subnet, remote_node, remote_subnet) in nodes {
                    routed_pod(node, pod, subnet)?;
                    let remote_cidr = format!("10.9.{remote_subnet}.0/24");
                    node.exec(&["ip", "route", "add", &remote_cidr, "via", remote_node])?;
                }
            }
            BaselineKind::Vxlan => {
                for (node, ip, pod, subnet, _, _) in nodes {
                    vxlan_node(node, ip, pod, subnet)?;
                }
                // What flanneld writes for each other node: a route through the VXLAN device to
                // that node's VTEP address, its MAC, and where that MAC lives.
                for (node, _, _, _, remote_node, remote_subnet) in nodes {
                    let remote = if remote_subnet == 1 { &n1 } else { &n2 };
                    let remote_mac = remote.link("vx0")?.mac;
                    let vtep = format!("10.9.{remote_subnet}.0");
                    node.exec(&[
                        "ip",
                        "route",
                        "add",
                        &format!("{vtep}/24"),
                        "via",
                        &vtep,
                        "dev",
                        "vx0",
                        "onlink",
                    ])?;
                    node.exec(&[
                        "ip",
                        "neigh",
                        "replace",
                        &vtep,
                        "lladdr",
                        &remote_mac,
                        "dev",
                        "vx0",
                        "nud",
                        "permanent",
                    ])?;
                    node.exec(&[
                        "bridge",
                        "fdb",
                        "append",
                        &remote_mac,
                        "dev",
                        "vx0",
                        "dst",
                        remote_node,
                    ])?;
                }
            }
        }
        let server_ip = match kind {
            BaselineKind::Routed => "10.9.2.1",
            BaselineKind::Vxlan => "10.9.2.2",
        };
        Ok(Self {
            client: a.name().to_owned(),
            server: b.name().to_owned(),
            server_ip: server_ip.into(),
            _namespaces: vec![fabric, n1, n2, a, b],
        })
    }
}

/// A pod at 10.9.`subnet`.1/32 on a veth, routed by its node: weft-cni's wiring.
fn routed_pod(node: &NetNs, pod: &NetNs, subnet: u8) -> Result<(), String> {
    let pod_ip = format!("10.9.{subnet}.1");
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
    Ok(())
}

/// Flannel's node: bridge `cni0` at 10.9.`subnet`.1/24 with the pod at .2 on it, and the VXLAN
/// device `vx0` (VNI 1, port 4789, no learning) holding 10.9.`subnet`.0/32.
fn vxlan_node(node: &NetNs, node_ip: &str, pod: &NetNs, subnet: u8) -> Result<(), String> {
    node.exec(&[
        "ip",
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "4789",
        "local",
        node_ip,
        "dev",
        "eth0",
        "nolearning",
    ])?;
    node.exec(&["ip", "link", "set", "vx0", "mtu", VXLAN_POD_MTU, "up"])?;
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.9.{subnet}.0/32"),
        "dev",
        "vx0",
    ])?;
    node.exec(&["ip", "link", "add", "cni0", "type", "bridge"])?;
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.9.{subnet}.1/24"),
        "dev",
        "cni0",
    ])?;
    node.exec(&["ip", "link", "set", "cni0", "mtu", VXLAN_POD_MTU, "up"])?;
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
    node.exec(&[
        "ip",
        "link",
        "set",
        "hv",
        "master",
        "cni0",
        "mtu",
        VXLAN_POD_MTU,
        "up",
    ])?;
    pod.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.9.{subnet}.2/24"),
        "dev",
        "eth0",
    ])?;
    pod.exec(&["ip", "link", "set", "eth0", "mtu", VXLAN_POD_MTU, "up"])?;
    pod.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("10.9.{subnet}.1"),
    ])?;
    Ok(())
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

/// Medians of ROUNDS alternating runs: (baseline Gbit/s, Weft Gbit/s, baseline RR/s, Weft RR/s).
fn compare(
    baseline: &Baseline,
    weft_client: &str,
    weft_server: &str,
    weft_server_ip: Ipv4Addr,
) -> [f64; 4] {
    let (mut base_stream, mut weft_stream, mut base_rr, mut weft_rr) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        base_stream.push(tcp_stream(
            &baseline.client,
            &baseline.server,
            &baseline.server_ip,
        ));
        weft_stream.push(tcp_stream(
            weft_client,
            weft_server,
            &weft_server_ip.to_string(),
        ));
        base_rr.push(tcp_rr(
            &baseline.client,
            SocketAddr::new(baseline.server_ip.parse().expect("ip"), ECHO_PORT),
            SECONDS,
        ));
        weft_rr.push(tcp_rr(
            weft_client,
            SocketAddr::from((weft_server_ip, ECHO_PORT)),
            SECONDS,
        ));
    }
    [
        median(base_stream),
        median(weft_stream),
        median(base_rr),
        median(weft_rr),
    ]
}

const ECHO_PORT: u16 = 9000;

/// The sandbox's echo server in a baseline's server pod.
fn echo_server(netns: &str) -> Child {
    spawn_in(
        netns,
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
    )
}

fn main() {
    // `cargo bench` passes --bench; there is nothing to filter.
    let mut results = Vec::new();
    for (mode, kind, baseline_name) in [
        ("native", BaselineKind::Routed, "routed veths"),
        ("tunnel", BaselineKind::Vxlan, "flannel-style VXLAN"),
    ] {
        let baseline = Baseline::build(kind).expect("baseline namespaces");
        let mut echo = echo_server(&baseline.server);
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: bench}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: weft/echo, ports: [{name: echo, containerPort: 9000}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: bench}\nspec:\n  nodeName: n2\n  containers: [{name: c, image: weft/echo, ports: [{name: echo, containerPort: 9000}]}]\n";
        let sandbox = TestSandbox::up(
            &format!("- {{name: bench, id: 1, podCIDR: 10.1.0.0/16, routingMode: {mode}, nodes: [n1, n2], manifests: [pods.yaml]}}\n"),
            &[("pods.yaml", pods)],
        );
        let (a, b) = (sandbox.pod("a").clone(), sandbox.pod("b").clone());
        let measured = compare(&baseline, &a.netns, &b.netns, b.ip);
        let _ = echo.kill();
        let _ = echo.wait();
        results.push((mode, baseline_name, measured));
    }
    println!("\npod-to-pod across nodes, medians of {ROUNDS} runs of {SECONDS} s each; each mode against a baseline without BPF");
    println!(
        "{:<8} {:<20} {:>16} {:>14} {:>8}   {:>14} {:>14} {:>8}",
        "weft",
        "baseline",
        "baseline Gbit/s",
        "weft Gbit/s",
        "ratio",
        "baseline RR/s",
        "weft RR/s",
        "latency"
    );
    let mut ratios = Vec::new();
    for (mode, baseline_name, [base_stream, weft_stream, base_rr, weft_rr]) in &results {
        let throughput = weft_stream / base_stream;
        // One transaction per round trip: latency is the inverse of the rate.
        let latency = base_rr / weft_rr;
        println!(
            "{mode:<8} {baseline_name:<20} {base_stream:>16.2} {weft_stream:>14.2} {throughput:>8.3}   {base_rr:>14.0} {weft_rr:>14.0} {latency:>8.3}",
        );
        ratios.push((throughput, latency));
    }
    println!("throughput ratio = weft / baseline (targets: native >= 0.97, tunnel >= 0.95); latency ratio = weft latency / baseline latency (target: native <= 1.05)");
    let [(native_throughput, native_latency), (tunnel_throughput, tunnel_latency)] = ratios[..]
    else {
        unreachable!("two modes measured")
    };
    println!(
        "RESULT datapath native_throughput_ratio={native_throughput:.3} native_latency_ratio={native_latency:.3} tunnel_vs_vxlan_throughput_ratio={tunnel_throughput:.3} tunnel_vs_vxlan_latency_ratio={tunnel_latency:.3}"
    );
}
