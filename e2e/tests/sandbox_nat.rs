//! Service NAT never leaks: an SNAT port (NodePort traffic to a backend on another node) belongs
//! to its connection and comes back when the connection ends, so a node can translate any
//! number of short connections, and its NAT tables shrink back once they are over.
//!
//! The SNAT range is narrowed to 1,000 ports (`agentArgs`), so 50,000 connections take each
//! port about 50 times; before ports were released, new connections failed after the first
//! thousand. And ICMP errors about translated packets reach the end that sent them, rewritten,
//! so Path MTU discovery works through a NodePort.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::measure::prepare_short_connections;
use weft_e2e::netns::{run, unique_prefix, NetNs};
use weft_e2e::sandbox::{
    address_on_fabric, agent_metric, echo_reachable, in_netns, until, TestSandbox,
};
use weft_sandbox::host;
use weft_sandbox::plan::NodePlan;

/// A client outside the cluster, on the fabric.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 252);
const NODE_PORT: u16 = 30080;
const SNAT_PORTS: &str = "61000-61999";
const CONNECTIONS: usize = 50_000;
/// How long an ended connection's entries stay before the collector may remove them.
const CLOSING_LIFETIME: Duration = Duration::from_secs(2);

const MANIFESTS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  nodeName: n2
  containers:
  - name: c
    image: weft/echo
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";

fn sandbox() -> TestSandbox {
    TestSandbox::up(
        &format!(
            "- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [web.yaml], agentArgs: [--snat-port-range, {SNAT_PORTS}, --ct-lifetime-closing, {}s, --ct-gc-interval, 1s]}}\n",
            CLOSING_LIFETIME.as_secs()
        ),
        &[("web.yaml", MANIFESTS)],
    )
}

/// Entries in `node`'s two NAT tables together.
fn nat_entries(sandbox: &TestSandbox, node: &str) -> usize {
    let pins = sandbox.sandbox.bpffs.join(format!("c1-{node}/weft"));
    pinned_map_entries(&pins.join("lb_flows")).len()
        + pinned_map_entries(&pins.join("lb_reverse")).len()
}

/// One short connection: connect, exchange two bytes, close.
fn exchange(target: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(b"hi")
        .map_err(|error| format!("send: {error}"))?;
    let mut reply = [0u8; 2];
    stream
        .read_exact(&mut reply)
        .map_err(|error| format!("receive: {error}"))?;
    Ok(())
}

#[test]
fn fifty_thousand_short_nodeport_connections_all_succeed_and_leave_no_nat_state_behind() {
    let sandbox = sandbox();
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    address_on_fabric(&sandbox, OUTSIDE);
    // The client's own ports: it keeps each closed connection in TIME_WAIT, and must not run
    // out before the node does.
    prepare_short_connections(&fabric).expect("prepare the client");

    let before = nat_entries(&sandbox, "n1");
    // NodePort on n1, backend on n2: every connection is SNATed by n1.
    let target = SocketAddr::from((n1.ip, NODE_PORT));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !echo_reachable(&fabric, target, 1) {
        assert!(Instant::now() < deadline, "the NodePort never answered");
        std::thread::sleep(Duration::from_millis(200));
    }

    let (made, failures) = in_netns(&fabric, || {
        let mut failures = Vec::new();
        let mut made = 0;
        while made < CONNECTIONS && failures.len() < 10 {
            if let Err(error) = exchange(target) {
                failures.push(format!("connection {made}: {error}"));
            }
            made += 1;
        }
        (made, failures)
    });
    assert!(
        failures.is_empty(),
        "{} of {made} NodePort connections failed: {failures:?}",
        failures.len()
    );

    // Every connection ended: once their closing lifetime is over, the collector removes their
    // entries and the tables are back where they started.
    let deadline = Instant::now() + CLOSING_LIFETIME + Duration::from_secs(30);
    let mut left = nat_entries(&sandbox, "n1");
    while left > before {
        assert!(
            Instant::now() < deadline,
            "NAT tables on n1 hold {left} entries, {before} before {CONNECTIONS} connections"
        );
        std::thread::sleep(Duration::from_millis(500));
        left = nat_entries(&sandbox, "n1");
    }
    let collected =
        agent_metric(&sandbox, "c1", "n1", "weft_agent_nat_collected_total").unwrap_or(0.0);
    // Some ports were taken back by new connections before the collector came by; the rest
    // (two entries per connection) were collected.
    assert!(
        collected >= 1000.0,
        "weft_agent_nat_collected_total is {collected}"
    );
}

/// The router between the client and the fabric, and the client's own network behind it.
const ROUTER_ON_FABRIC: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 250);
const CLIENT_NET: &str = "192.168.77.0/24";
const ROUTER_ON_CLIENT_NET: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The narrow hop: the router forwards at most this much towards the client, and says so with
/// ICMP "fragmentation needed" when a packet is larger (every link is 1,500 bytes).
const HOP_MTU: &str = "1400";
const TRANSFER: usize = 10 * 1024 * 1024;

/// A veth pair from `a` (named `a_end`) to `b` (named `b_end`), both ends up.
fn wire(a: &str, a_end: &str, b: &str, b_end: &str) {
    run(
        "ip",
        &["link", "add", a_end, "type", "veth", "peer", "name", b_end],
    )
    .expect("veth");
    run("ip", &["link", "set", a_end, "netns", a]).expect("move veth");
    run("ip", &["link", "set", b_end, "netns", b]).expect("move veth");
    run("ip", &["-n", a, "link", "set", a_end, "up"]).expect("up");
    run("ip", &["-n", b, "link", "set", b_end, "up"]).expect("up");
}

/// A client network behind a router on the fabric whose link towards the client carries at
/// most `HOP_MTU` bytes (every other link: 1,500), routed from `n1`: (router, client).
fn narrow_hop(sandbox: &TestSandbox, n1: &NodePlan) -> (NetNs, NetNs) {
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    let prefix = unique_prefix();
    let router = NetNs::create(format!("{prefix}r")).expect("router netns");
    let client = NetNs::create(format!("{prefix}c")).expect("client netns");
    let (router_fabric, fabric_router) = (format!("{prefix}rf"), format!("{prefix}fr"));
    wire(router.name(), &router_fabric, &fabric, &fabric_router);
    host::ip(&[
        "-n",
        &fabric,
        "link",
        "set",
        &fabric_router,
        "master",
        "fabric0",
    ])
    .expect("router onto the fabric");
    let (router_client, client_router) = (format!("{prefix}rc"), format!("{prefix}cr"));
    wire(router.name(), &router_client, client.name(), &client_router);
    router
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_ON_FABRIC}/16"),
            "dev",
            &router_fabric,
        ])
        .expect("router address");
    router
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_ON_CLIENT_NET}/24"),
            "dev",
            &router_client,
        ])
        .expect("router address");
    router
        .exec(&[
            "ip",
            "route",
            "replace",
            CLIENT_NET,
            "dev",
            &router_client,
            "mtu",
            "lock",
            HOP_MTU,
        ])
        .expect("the narrow hop");
    router
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect("router forwards");
    client
        .exec(&[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            &client_router,
        ])
        .expect("client address");
    client
        .exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &ROUTER_ON_CLIENT_NET.to_string(),
        ])
        .expect("client route");
    host::ip(&[
        "-n",
        &n1.netns,
        "route",
        "add",
        CLIENT_NET,
        "via",
        &ROUTER_ON_FABRIC.to_string(),
    ])
    .expect("n1 routes to the client");

    (router, client)
}

#[test]
fn a_large_transfer_through_a_node_port_crosses_a_hop_with_a_smaller_mtu() {
    let sandbox = sandbox();
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    // client --(router: 1,400 towards the client)-- fabric -- n1 (NodePort) -- n2 (backend).
    let (_router, client) = narrow_hop(&sandbox, &n1);

    let target = SocketAddr::from((n1.ip, NODE_PORT));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !echo_reachable(client.name(), target, 1) {
        assert!(
            Instant::now() < deadline,
            "the NodePort never answered the client"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 10 MB up and, echoed by the backend on n2, 10 MB back down through the narrow hop: the
    // backend's full-size segments are refused there until the router's "fragmentation needed"
    // reaches it, translated by n1, and it sends smaller ones.
    let stream = in_netns(client.name(), || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2))
    })
    .expect("connect through the NodePort");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..TRANSFER / chunk.len() {
            writer.write_all(&chunk)?;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = stream;
    let mut received = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    let outcome = loop {
        match reader.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(read) => received += read,
            Err(error) => break Err(error),
        }
    };
    assert!(
        outcome.is_ok() && received == TRANSFER,
        "{received} of {TRANSFER} bytes came back through the narrow hop before {outcome:?}"
    );
    sender
        .join()
        .expect("sender thread")
        .expect("all 10 MB sent");
}

/// A pod whose ingress a policy isolates uploads through the narrow hop: the router's
/// "fragmentation needed" is not traffic any rule allows, but it is about the pod's own
/// connection (related), so it reaches the pod, which sends smaller segments. Dropped, the
/// upload would stall: the pod would resend full-size segments the hop cannot carry.
#[test]
fn an_isolated_pod_learns_its_path_mtu_from_errors_about_its_own_connection() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml]}\n",
        &[(
            "pods.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: uploader, namespace: default, labels: {app: uploader}}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: weft/echo, ports: [{containerPort: 8080}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: isolate-uploader, namespace: default}\nspec: {podSelector: {matchLabels: {app: uploader}}, policyTypes: [Ingress]}\n",
        )],
    );
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    let (router, client) = narrow_hop(&sandbox, &n1);
    router
        .exec(&[
            "ip",
            "route",
            "add",
            "10.1.0.0/16",
            "via",
            &n1.ip.to_string(),
        ])
        .expect("the router reaches the pods through n1");
    let uploader = sandbox.pod("uploader").clone();
    until(
        "the policy isolates the pod's ingress",
        Duration::from_secs(20),
        || match echo_reachable(client.name(), SocketAddr::from((uploader.ip, 8080)), 1) {
            false => Ok(()),
            true => Err("the client still reaches the pod".into()),
        },
    );

    // The far end counts what arrives and says how much.
    let listener = in_netns(client.name(), || {
        std::net::TcpListener::bind(SocketAddr::from((CLIENT, 9000)))
    })
    .expect("listen behind the narrow hop");
    let sink = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut received = 0usize;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buffer)? {
                0 => break,
                read => received += read,
            }
        }
        stream.write_all(&(received as u64).to_be_bytes())?;
        Ok(received)
    });
    let uploaded = in_netns(&uploader.netns, || -> std::io::Result<u64> {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((CLIENT, 9000)), Duration::from_secs(2))?;
        stream.set_write_timeout(Some(Duration::from_secs(15)))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..TRANSFER / chunk.len() {
            stream.write_all(&chunk)?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        Ok(u64::from_be_bytes(count))
    });
    assert_eq!(
        uploaded.ok(),
        Some(TRANSFER as u64),
        "the upload stalled at the narrow hop"
    );
    assert_eq!(sink.join().expect("sink thread").ok(), Some(TRANSFER));
}
