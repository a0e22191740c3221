//! Services as a user of a kube-proxy replacement sees them, on real packets: ClusterIP from
//! pods on the same and another node, NodePort from a node and from outside the cluster, UDP,
//! a service with no endpoints refusing at once, getpeername showing the service, session
//! affinity, backends scaled up and drained under steady traffic, and Maglev's bounded
//! remapping when a backend goes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{address_on_fabric, answered_by, in_netns, run_in_pod, until, TestSandbox};
use weft_sandbox::{host, PodState, Sandbox};

/// An address on the fabric that belongs to no node and no pod: a client outside the cluster.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 253);

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: dns, containerPort: 5353, protocol: UDP}}\n---\n"
    )
}

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: shop}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: dns, port: 53, targetPort: dns, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: shop}
spec:
  type: NodePort
  selector: {app: nobody-has-this-label}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30099}]
---
apiVersion: v1
kind: Service
metadata: {name: web-ext, namespace: shop}
spec:
  selector: {app: web}
  externalIPs: [192.0.2.10]
  ports: [{name: http, port: 8088, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: shop}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
";

fn shop() -> TestSandbox {
    let pods = [
        pod("client1", "client", "n1"),
        pod("client2", "client", "n2"),
        // More clients on n1, each with its own session affinity (see the restart test).
        pod("client3", "client", "n1"),
        pod("client4", "client", "n1"),
        pod("web-1", "web", "n1"),
        pod("web-2", "web", "n2"),
        pod("web-3", "web", "n2"),
    ]
    .concat();
    TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.96.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, services.yaml]}\n",
        &[("pods.yaml", &pods), ("services.yaml", SERVICES)],
    )
}

/// The cluster IP the sandbox allocated to a service.
fn cluster_ip(sandbox: &TestSandbox, name: &str) -> Ipv4Addr {
    let state = Sandbox::load(Some(&sandbox.name)).expect("state");
    state
        .objects
        .get("c1")
        .into_iter()
        .flatten()
        .find(|object| object["kind"] == "Service" && object["metadata"]["name"] == name)
        .and_then(|service| service["spec"]["clusterIP"].as_str())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("service {name} has a cluster IP"))
}

/// One HTTP GET over a fresh connection: who answered, what the server saw as the client, and
/// what getpeername() said on the client's side.
fn get(netns: &str, target: SocketAddr) -> Result<(String, String, SocketAddr), String> {
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .map_err(|e| format!("connect to {target}: {e}"))?;
        let peer = stream.peer_addr().map_err(|e| e.to_string())?;
        http_exchange(&mut stream).map(|(pod, client)| (pod, client, peer))
    })
}

fn http_exchange(stream: &mut TcpStream) -> Result<(String, String), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| format!("no HTTP answer: {response:?}"))?;
    let client = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["client"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok((answered_by(&body), client))
}

/// Runs a Python client inside a pod: its network namespace *and* its cgroup, so its sockets
/// are balanced at connect() as a real pod's are. Returns what it printed.
fn python_in_pod(pod: &PodState, script: &str, args: &[String]) -> String {
    let mut command_args = vec!["-c".to_owned(), script.to_owned()];
    command_args.extend(args.iter().cloned());
    let arg_refs: Vec<&str> = command_args.iter().map(String::as_str).collect();
    let output = run_in_pod(pod, "python3", &arg_refs);
    assert!(
        output.status.success(),
        "python in {}: {}",
        pod.name,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// HTTP GETs over fresh connections; prints [answering pod, client seen by it, getpeername()].
const GETS: &str = r#"
import json, socket, sys
target = (sys.argv[1], int(sys.argv[2]))
answers = []
for _ in range(int(sys.argv[3])):
    s = socket.create_connection(target, timeout=3)
    peer = "%s:%d" % s.getpeername()
    s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    answers.append([body["pod"], body["client"], peer])
print(json.dumps(answers))
"#;

/// What pods answer `count` connections from a pod's own sockets (socket-level balancing).
fn socket_gets(pod: &PodState, target: SocketAddr, count: usize) -> Vec<(String, String, String)> {
    let out = python_in_pod(
        pod,
        GETS,
        &[
            target.ip().to_string(),
            target.port().to_string(),
            count.to_string(),
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn tally<'a>(pods: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    pods.into_iter().fold(BTreeMap::new(), |mut counts, pod| {
        *counts.entry(pod.clone()).or_insert(0) += 1;
        counts
    })
}

/// Waits until the agents balance `target` (they apply services within a second or two).
fn wait_until_served(netns: &str, target: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(netns, target).is_err() {
        assert!(Instant::now() < deadline, "{target} never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spread(netns: &str, target: SocketAddr, connections: usize) -> BTreeMap<String, usize> {
    let mut answered = BTreeMap::new();
    for _ in 0..connections {
        let (pod, _, _) = get(netns, target).unwrap_or_else(|e| panic!("{e}"));
        *answered.entry(pod).or_insert(0) += 1;
    }
    answered
}

/// A UDP exchange from a pod's own socket: the answer and the address recvfrom() reports.
const UDP_PING: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
data, source = s.recvfrom(64)
print("%s %s:%d" % (data.decode(), source[0], source[1]))
"#;

/// How a connect() from a pod's own socket ends, and how long it took.
const CONNECT: &str = r#"
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    outcome = "connected"
except ConnectionRefusedError:
    outcome = "refused"
except OSError as error:
    outcome = type(error).__name__
print("%s %.3f" % (outcome, time.monotonic() - started))
"#;

#[test]
fn cluster_ip_node_port_udp_and_refusals() {
    let sandbox = shop();
    let web = SocketAddr::from((cluster_ip(&sandbox, "web"), 80));
    let (client1, client2) = (sandbox.pod("client1"), sandbox.pod("client2"));
    wait_until_served(&client1.netns, web);
    wait_until_served(&client2.netns, web);
    let backends: BTreeSet<String> = ["web-1", "web-2", "web-3"].map(String::from).into();

    // ClusterIP from a pod's own sockets on each node (balanced at connect()): every backend
    // answers, the backend sees the pod's real address, getpeername() shows the service.
    for client in [client1, client2] {
        let answers = socket_gets(client, web, 60);
        let answered = tally(answers.iter().map(|(pod, _, _)| pod));
        assert_eq!(
            answered.keys().cloned().collect::<BTreeSet<_>>(),
            backends,
            "from {} (node {}): {answered:?}",
            client.name,
            client.node
        );
        for (pod, seen_client, peer) in &answers {
            assert!(
                seen_client.starts_with(&format!("{}:", client.ip)),
                "{pod} sees the pod's own address: {seen_client}"
            );
            assert_eq!(peer, &web.to_string(), "getpeername() shows the service");
        }
    }

    // A host process of a node (in the node's cgroup, as every process on a real node is under
    // the root cgroup the agent hooks): balanced at connect() too.
    let n2_netns = sandbox.node_netns("c1", "n2");
    let n2_cgroup = sandbox
        .sandbox
        .cgroup
        .as_ref()
        .map(|root| root.join("c1-n2"))
        .expect("the sandbox has a cgroup v2 hierarchy");
    let mut command = std::process::Command::new("python3");
    command.args([
        "-c",
        GETS,
        &web.ip().to_string(),
        &web.port().to_string(),
        "30",
    ]);
    let output = host::in_namespaces(&mut command, Some(&n2_netns), Some(&n2_cgroup))
        .expect("prepare")
        .output()
        .expect("python on the node");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<(String, String, String)> =
        serde_json::from_slice(&output.stdout).expect("answers");
    let n2 = sandbox.sandbox.plan.node("c1", "n2").expect("n2").clone();
    for (pod, seen_client, peer) in &answers {
        assert!(backends.contains(pod), "{pod}");
        assert_eq!(
            peer,
            &web.to_string(),
            "getpeername() on the node shows the service"
        );
        assert!(
            seen_client.starts_with(&format!("{}:", n2.ip)),
            "the backend sees the node's address: {seen_client}"
        );
    }

    // The same from sockets outside the hooked cgroup (translated per packet at the pod's
    // veth): same backends, same real client address.
    for client in [client1, client2] {
        let answered = spread(&client.netns, web, 60);
        assert_eq!(
            answered.keys().cloned().collect::<BTreeSet<_>>(),
            backends,
            "per packet from {}: {answered:?}",
            client.name
        );
        let (_, seen_client, peer) = get(&client.netns, web).expect("get");
        assert!(
            seen_client.starts_with(&format!("{}:", client.ip)),
            "{seen_client}"
        );
        assert_eq!(peer, web);
    }

    // NodePort from another node, and from outside the cluster (a host on the fabric).
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    let n2 = sandbox.sandbox.plan.node("c1", "n2").expect("n2").clone();
    let node_port = SocketAddr::from((n2.ip, 30080));
    wait_until_served(&n1.netns, node_port);
    let answered = spread(&n1.netns, node_port, 40);
    assert_eq!(
        answered.keys().cloned().collect::<BTreeSet<_>>(),
        backends,
        "NodePort on n2 from node n1 reaches backends on both nodes: {answered:?}"
    );
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    address_on_fabric(&sandbox, OUTSIDE);
    for node in [&n1, &n2] {
        let target = SocketAddr::from((node.ip, 30080));
        let answered = spread(&fabric, target, 40);
        assert_eq!(
            answered.keys().cloned().collect::<BTreeSet<_>>(),
            backends,
            "NodePort on {} from outside the cluster: {answered:?}",
            node.name
        );
        let (_, seen_client, peer) = get(&fabric, target).expect("get");
        assert_eq!(
            peer, target,
            "the outside client talks to the node port throughout"
        );
        assert!(
            seen_client.starts_with(&format!("{OUTSIDE}:"))
                || seen_client.starts_with(&format!("{}:", node.ip)),
            "the backend sees the client, or the node that forwarded it (SNAT): {seen_client}"
        );
    }

    // An external IP: from a pod's own socket, and from outside through a route to a node
    // (as a router or a cloud load balancer would send it).
    let external = SocketAddr::from(([192, 0, 2, 10], 8088));
    let answers = socket_gets(client1, external, 30);
    let answered = tally(answers.iter().map(|(pod, _, _)| pod));
    assert_eq!(
        answered.keys().cloned().collect::<BTreeSet<_>>(),
        backends,
        "externalIP from a pod: {answered:?}"
    );
    host::ip(&[
        "-n",
        &fabric,
        "route",
        "add",
        "192.0.2.10/32",
        "via",
        &n1.ip.to_string(),
    ])
    .expect("route the external IP to n1");
    let answered = spread(&fabric, external, 30);
    assert_eq!(
        answered.keys().cloned().collect::<BTreeSet<_>>(),
        backends,
        "externalIP from outside: {answered:?}"
    );

    // A UDP service: the answer comes back from the service address, from a pod's own socket
    // (recvmsg() rewritten) and from one outside the cgroup (reverse-translated per packet).
    let dns = SocketAddr::from((cluster_ip(&sandbox, "dns"), 53));
    let answer = python_in_pod(client2, UDP_PING, &[dns.ip().to_string(), "53".into()]);
    assert_eq!(answer.trim(), format!("ping {dns}"));
    let (reply, from) = in_netns(&client2.netns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        socket.send_to(b"ping", dns).expect("send");
        let mut buffer = [0u8; 16];
        let (length, from) = socket.recv_from(&mut buffer).expect("a UDP answer");
        (buffer[..length].to_vec(), from)
    });
    assert_eq!(reply, b"ping");
    assert_eq!(from, dns, "the UDP answer shows the service address");

    // No endpoints: refused at once, never a hang — at connect() for a pod's own socket, by an
    // RST from the pod's veth per packet, and by the node's own stack for a NodePort.
    let nobody = SocketAddr::from((cluster_ip(&sandbox, "nobody"), 80));
    let outcome = python_in_pod(client1, CONNECT, &[nobody.ip().to_string(), "80".into()]);
    let (result, seconds) = outcome.trim().split_once(' ').expect("outcome");
    assert_eq!(
        result, "refused",
        "a pod's connect() to a service with no endpoint"
    );
    assert!(
        seconds.parse::<f64>().unwrap_or(9.0) < 0.5,
        "refused in {seconds} s"
    );
    for (netns, target, from) in [
        (&client1.netns, nobody, "a pod's veth, ClusterIP"),
        (
            &fabric,
            SocketAddr::from((n1.ip, 30099)),
            "outside, NodePort",
        ),
    ] {
        let started = Instant::now();
        let error = in_netns(netns, || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect_err("refused")
        });
        assert_eq!(
            error.kind(),
            ErrorKind::ConnectionRefused,
            "from {from}: {error}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "from {from}: refused in {:?}",
            started.elapsed()
        );
    }

    // Session affinity: every connection from a pod goes to one backend.
    let sticky = SocketAddr::from((cluster_ip(&sandbox, "sticky"), 80));
    wait_until_served(&client2.netns, sticky);
    let answers = socket_gets(client2, sticky, 30);
    let answered = tally(answers.iter().map(|(pod, _, _)| pod));
    assert_eq!(answered.len(), 1, "ClientIP affinity: {answered:?}");
}

/// Connections that stay open, exchanging a request every few milliseconds.
struct SteadyTraffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl SteadyTraffic {
    fn start(netns: &str, target: SocketAddr, connections: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..connections)
            .map(|_| {
                let (netns, stop) = (netns.to_owned(), stop.clone());
                std::thread::spawn(move || {
                    in_netns(&netns, || {
                        let mut errors = Vec::new();
                        let mut exchanges = 0;
                        let mut stream =
                            TcpStream::connect_timeout(&target, Duration::from_secs(2))
                                .expect("connect");
                        stream
                            .set_read_timeout(Some(Duration::from_secs(10)))
                            .expect("timeout");
                        let mut reply = [0u8; 4];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            match stream
                                .write_all(b"ping")
                                .and_then(|()| stream.read_exact(&mut reply))
                            {
                                Ok(()) if &reply == b"ping" => exchanges += 1,
                                Ok(()) => errors.push(format!("wrong echo {reply:?}")),
                                Err(error) => {
                                    errors.push(error.to_string());
                                    break;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        (exchanges, errors)
                    })
                })
            })
            .collect();
        Self { stop, workers }
    }

    fn finish(self) -> Vec<(usize, Vec<String>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.workers
            .into_iter()
            .map(|worker| worker.join().expect("traffic worker"))
            .collect()
    }
}

/// Connections from a pod's own sockets that stay open, exchanging "ping" until stdin closes;
/// prints how many exchanges succeeded and every error.
const STEADY: &str = r#"
import json, socket, sys, threading, time
target = (sys.argv[1], int(sys.argv[2]))
# Generous timeouts: a loaded 2-core machine may stall a while; a broken connection still
# fails (reset, or no answer at all).
sockets = [socket.create_connection(target, timeout=10) for _ in range(int(sys.argv[3]))]
print("open", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
exchanges, errors = 0, []
while not stop.is_set():
    for s in sockets:
        try:
            s.sendall(b"ping")
            data = b""
            while len(data) < 4:
                chunk = s.recv(4 - len(data))
                if not chunk:
                    raise OSError("closed by the other end")
                data += chunk
            exchanges += 1
        except OSError as error:
            errors.append(str(error))
    time.sleep(0.005)
print(json.dumps({"exchanges": exchanges, "errors": errors}))
"#;

#[test]
fn backends_scale_up_and_drain_under_steady_traffic() {
    let sandbox = shop();
    let web = SocketAddr::from((cluster_ip(&sandbox, "web"), 80));
    let client = sandbox.pod("client1").clone();
    wait_until_served(&client.netns, web);
    // The checks below connect from client2 too: client1's sockets are all balanced at
    // connect(), as a real pod's are.
    // Twelve connections over three backends from client1's own sockets (balanced at
    // connect()), and twelve from sockets outside the hooked cgroup in client2 (translated per
    // packet); web-2 almost surely holds some of each. Not both in one pod: the kernel may give
    // a socket to the VIP and one to a backend the same source port, which are one tuple on
    // the wire once translated — real pods have every socket in their cgroup.
    let other = sandbox.pod("client2").clone();
    wait_until_served(&other.netns, web);
    let traffic = SteadyTraffic::start(&other.netns, web, 12);
    let mut command = std::process::Command::new("python3");
    command.args(["-c", STEADY, &web.ip().to_string(), "80", "12"]);
    let mut pod_traffic =
        host::in_namespaces(&mut command, Some(&client.netns), client.cgroup.as_deref())
            .expect("prepare")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the pod's traffic");
    let mut pod_output = std::io::BufReader::new(pod_traffic.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut pod_output, &mut line).expect("the pod's connections open");
    assert_eq!(line.trim(), "open");
    std::thread::sleep(Duration::from_millis(500));

    // Scale up: two more backends; new connections reach them, established ones go on.
    let dir = tempfile::tempdir().expect("tempdir");
    let more = dir.path().join("more.yaml");
    std::fs::write(
        &more,
        [pod("web-4", "web", "n1"), pod("web-5", "web", "n2")].concat(),
    )
    .expect("write");
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &more)
        .expect("scale up");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = spread(&other.netns, web, 40);
        if answered.contains_key("web-4") && answered.contains_key("web-5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new backends never chosen: {answered:?}"
        );
    }

    // Drain web-2: no new connection goes to it, and established connections keep working.
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .set_terminating(None, "shop", "web-2")
        .expect("drain web-2");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = spread(&other.netns, web, 40);
        if !answered.contains_key("web-2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web-2 still chosen while draining"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(pod_traffic.stdin.take());
    let mut summary = String::new();
    pod_output
        .read_to_string(&mut summary)
        .expect("the pod's summary");
    let status = pod_traffic.wait().expect("the pod's traffic ends");
    assert!(status.success());
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("json summary");
    assert_eq!(
        summary["errors"],
        serde_json::json!([]),
        "a pod's established connection failed"
    );
    assert!(
        summary["exchanges"].as_u64().unwrap_or(0) > 100,
        "{summary}"
    );
    let results = traffic.finish();
    for (exchanges, errors) in &results {
        assert!(
            errors.is_empty(),
            "an established connection failed: {errors:?}"
        );
        assert!(
            *exchanges > 10,
            "the connection kept exchanging: {exchanges}"
        );
    }
}

const FLOWS: usize = 10_000;

/// One HTTP GET per source port, each from a socket bound to that port, so a flow (pod, port)
/// is the same in every round; prints the answering pod per port.
const FLOWS_FROM_PORTS: &str = r#"
import json, socket, struct, sys
target = (sys.argv[1], int(sys.argv[2]))
first, count = int(sys.argv[3]), int(sys.argv[4])
answers = []
for port in range(first, first + count):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(3)
    s.connect(target)
    s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    # Closing with RST leaves no TIME_WAIT, so the next round can use the port again.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    answers.append(json.loads(data.split(b"\r\n\r\n", 1)[1])["pod"])
print(json.dumps(answers))
"#;

fn backend_per_flow(pod: &PodState, target: SocketAddr) -> Vec<String> {
    let out = python_in_pod(
        pod,
        FLOWS_FROM_PORTS,
        &[
            target.ip().to_string(),
            target.port().to_string(),
            "20000".into(),
            FLOWS.to_string(),
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn maglev_remaps_about_one_nth_of_flows_when_a_backend_goes() {
    let backends = 5;
    let pods: String = (1..=backends)
        .map(|i| {
            pod(
                &format!("web-{i}"),
                "web",
                if i % 2 == 0 { "n2" } else { "n1" },
            )
        })
        .chain([pod("client1", "client", "n1")])
        .collect();
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, services.yaml]}\n",
        &[
            ("pods.yaml", &pods),
            (
                "services.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
            ),
        ],
    );
    let web = SocketAddr::from((cluster_ip(&sandbox, "web"), 80));
    let client = sandbox.pod("client1").clone();
    wait_until_served(&client.netns, web);

    let before = backend_per_flow(&client, web);
    let counts = tally(&before);
    assert_eq!(
        counts.len(),
        backends,
        "every backend takes flows: {counts:?}"
    );

    // web-3 goes.
    let gone = Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .set_terminating(None, "shop", "web-3");
    gone.expect("drain web-3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while spread(&client.netns, web, 100).contains_key("web-3") {
        assert!(Instant::now() < deadline, "web-3 still chosen");
    }
    let after = backend_per_flow(&client, web);
    let moved_elsewhere = before
        .iter()
        .zip(&after)
        .filter(|(was, now)| was.as_str() != "web-3" && was != now)
        .count();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(was, now)| was != now)
        .count();
    // Maglev's promise, "about 1/N + 1%": the removed backend's flows move (its share is about
    // 1/N of a sample of 10,000), and at most 1% of all flows move besides them.
    let on_removed = before.iter().filter(|pod| pod.as_str() == "web-3").count();
    eprintln!("{moved} of {FLOWS} flows moved: {on_removed} from web-3, {moved_elsewhere} others");
    let share = on_removed as f64 / FLOWS as f64;
    assert!(
        (share - 1.0 / backends as f64).abs() < 0.03,
        "web-3 held {share:.3} of the flows, not about 1/{backends}"
    );
    assert_eq!(
        moved - moved_elsewhere,
        on_removed,
        "every flow of web-3 moved"
    );
    assert!(
        moved_elsewhere <= FLOWS / 100,
        "{moved_elsewhere} of {FLOWS} flows not on the removed backend moved (bound 1%)"
    );
    assert!(after.iter().all(|pod| pod != "web-3"));
}

/// The same service in both clusters, made global with the annotations, once per affinity.
fn global_services() -> String {
    ["local", "remote", "none"]
        .map(|affinity| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: api-{affinity}\n  namespace: shop\n  annotations: {{weft.io/global: \"true\", weft.io/affinity: {affinity}}}\nspec:\n  selector: {{app: api}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
            )
        })
        .concat()
        + "apiVersion: v1\nkind: Service\nmetadata: {name: api-here, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n"
}

fn service_ip(sandbox: &TestSandbox, cluster: &str, name: &str) -> Ipv4Addr {
    let state = Sandbox::load(Some(&sandbox.name)).expect("state");
    state
        .objects
        .get(cluster)
        .into_iter()
        .flatten()
        .find(|object| object["kind"] == "Service" && object["metadata"]["name"] == name)
        .and_then(|service| service["spec"]["clusterIP"].as_str())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("service {name} in {cluster} has a cluster IP"))
}

#[test]
fn global_services_choose_local_or_remote_backends_and_fail_over() {
    let east_pods = [pod("client", "client", "n1"), pod("api-east", "api", "n1")].concat();
    let west_pods = pod("api-west", "api", "n1");
    let sandbox = TestSandbox::up(
        "- {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [east.yaml, east-svc.yaml]}\n- {name: west, id: 2, podCIDR: 10.2.0.0/16, nodes: [n1], manifests: [west.yaml, west-svc.yaml]}\n",
        &[
            ("east.yaml", &east_pods),
            ("west.yaml", &west_pods),
            ("east-svc.yaml", &global_services()),
            ("west-svc.yaml", &global_services()),
        ],
    );
    let client = sandbox.pod("client").clone();
    let target = |name: &str| SocketAddr::from((service_ip(&sandbox, "east", name), 80));
    for name in ["api-local", "api-remote", "api-none", "api-here"] {
        wait_until_served(&client.netns, target(name));
    }
    let answered = |name: &str| -> BTreeSet<String> {
        let answers = socket_gets(&client, target(name), 40);
        answers.into_iter().map(|(pod, _, _)| pod).collect()
    };
    let one = |pod: &str| BTreeSet::from([pod.to_owned()]);
    let both = BTreeSet::from(["api-east".to_owned(), "api-west".to_owned()]);
    // The other cluster's backends arrive once both clusters' pods are up (the mesh's job
    // later, the sandbox's now): wait until they are balanced over.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered("api-none") != both {
        assert!(
            Instant::now() < deadline,
            "no affinity never reached both clusters"
        );
    }
    assert_eq!(answered("api-local"), one("api-east"), "affinity local");
    assert_eq!(answered("api-remote"), one("api-west"), "affinity remote");
    assert_eq!(
        answered("api-here"),
        one("api-east"),
        "not global: this cluster only"
    );

    // The local backend drains: local affinity fails over to the other cluster.
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .set_terminating(Some("east"), "shop", "api-east")
        .expect("drain api-east");
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered("api-local") != one("api-west") {
        assert!(
            Instant::now() < deadline,
            "local affinity never failed over"
        );
    }
}

#[test]
fn services_keep_working_while_the_agent_is_down_and_after_it_restarts() {
    let sandbox = shop();
    let web = SocketAddr::from((cluster_ip(&sandbox, "web"), 80));
    let client = sandbox.pod("client1").clone();
    wait_until_served(&client.netns, web);
    let backends: BTreeSet<String> = ["web-1", "web-2", "web-3"].map(String::from).into();
    let answered = |count| -> BTreeSet<String> {
        let answers = socket_gets(&client, web, count);
        answers.into_iter().map(|(pod, _, _)| pod).collect()
    };
    // Clients with session affinity keep their backends across the restart. Three clients:
    // a forgotten choice is made again at random, and lands on the same backend by chance
    // one time in three for each.
    let sticky = SocketAddr::from((cluster_ip(&sandbox, "sticky"), 80));
    let sticky_clients: Vec<PodState> = ["client1", "client3", "client4"]
        .map(|name| sandbox.pod(name).clone())
        .into();
    let stuck_to = |client: &PodState, count| -> BTreeSet<String> {
        socket_gets(client, sticky, count)
            .into_iter()
            .map(|(pod, _, _)| pod)
            .collect()
    };
    let mut chosen = Vec::new();
    for client in &sticky_clients {
        wait_until_served(&client.netns, sticky);
        let stuck = stuck_to(client, 10);
        assert_eq!(
            stuck.len(),
            1,
            "affinity holds before the restart: {stuck:?}"
        );
        chosen.push(stuck);
    }

    let agent = sandbox
        .sandbox
        .agents
        .iter()
        .find(|a| a.node == "n1")
        .expect("agent of n1")
        .clone();
    // SAFETY: SIGKILL to the agent this sandbox started.
    unsafe { libc::kill(agent.pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        answered(40),
        backends,
        "balanced while the agent is down (pinned maps)"
    );

    let mut restarted = Sandbox::load(Some(&sandbox.name)).expect("state");
    restarted
        .restart_agent("c1", "n1")
        .expect("restart the agent");
    // The new agent writes everything again under its own ids and removes what the old one
    // left: the service answers throughout, and a change after the restart takes effect.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        // Every connection succeeds (socket_gets fails on any error) and reaches a backend.
        let seen = answered(10);
        assert!(
            seen.is_subset(&backends),
            "{seen:?} while the new agent takes over"
        );
    }
    assert_eq!(
        answered(60),
        backends,
        "balanced over every backend after the restart"
    );
    for (client, chosen) in sticky_clients.iter().zip(&chosen) {
        assert_eq!(
            &stuck_to(client, 10),
            chosen,
            "{} keeps its backend across the agent's restart",
            client.name
        );
    }
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .set_terminating(None, "shop", "web-1")
        .expect("drain web-1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered(30).contains("web-1") {
        assert!(
            Instant::now() < deadline,
            "the restarted agent never applied the drain"
        );
    }
}

/// A UDP echo pod `name` for the stale-socket test, as a manifest.
fn dns_pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: dns}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: dns, containerPort: 5353, protocol: UDP}}\n"
    )
}

/// One datagram out and its echo back on a connected socket.
fn udp_echo(socket: &UdpSocket) -> std::io::Result<()> {
    socket.send(b"q")?;
    let mut reply = [0u8; 1];
    socket.recv(&mut reply).map(|_| ())
}

/// A process in `pod` (in its cgroup, so the socket balancer sees it) holding one connected UDP
/// socket to `target`, as glibc's resolver does; it prints `ok`, `timeout` or `error <errno>`
/// for each exchange, and stops at an error.
fn resolver_like(pod: &PodState, target: SocketAddr) -> std::process::Child {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
while True:
    try:
        s.send(b"q")
        s.recv(1)
        print("ok", flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except ConnectionRefusedError:
        # The backend's server stopped before its pod went (ICMP port unreachable): a
        # resolver tries again, as glibc does; the socket is still connected to it.
        print("refused", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
        break
"#;
    let mut command = std::process::Command::new("python3");
    command
        .args([
            "-c",
            script,
            &target.ip().to_string(),
            &target.port().to_string(),
        ])
        .stdout(std::process::Stdio::piped());
    host::in_namespaces(&mut command, Some(&pod.netns), pod.cgroup.as_deref())
        .expect("prepare")
        .spawn()
        .expect("python3")
}

#[test]
fn connected_udp_sockets_move_off_a_deleted_backend() {
    use std::io::BufRead;
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.96.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, dns.yaml]}\n",
        &[
            ("pods.yaml", &[pod("client1", "client", "n1"), dns_pod("dns-1", "n2")].concat()),
            (
                "dns.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: shop}\nspec:\n  selector: {app: dns}\n  ports: [{name: dns, port: 53, targetPort: dns, protocol: UDP}]\n",
            ),
        ],
    );
    let dns = SocketAddr::from((cluster_ip(&sandbox, "dns"), 53));
    let client = sandbox.pod("client1").clone();
    let connected = |netns: &str| {
        in_netns(netns, || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.connect(dns).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            socket
        })
    };
    // Two long-lived connected sockets to the service, whose one backend is dns-1: one in the
    // pod's cgroup (balanced at connect(), so connected to dns-1 itself), one outside it
    // (translated per packet at the pod's veth).
    let deadline = Instant::now() + Duration::from_secs(20);
    let outside_cgroup = loop {
        let socket = connected(&client.netns);
        if udp_echo(&socket).is_ok() {
            break socket;
        }
        assert!(Instant::now() < deadline, "the DNS service never answered");
    };
    let mut resolver = resolver_like(&client, dns);
    let mut lines = std::io::BufReader::new(resolver.stdout.take().expect("stdout")).lines();
    let mut next_line = || lines.next().and_then(Result::ok).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = next_line();
        if line == "ok" {
            break;
        }
        assert!(
            Instant::now() < deadline && !line.is_empty(),
            "the resolver-like socket never got an answer (last: {line:?})"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let (new_pod, old_pod) = (dir.path().join("dns-2.yaml"), dir.path().join("dns-1.yaml"));
    std::fs::write(&new_pod, dns_pod("dns-2", "n2")).expect("manifest");
    std::fs::write(&old_pod, dns_pod("dns-1", "n2")).expect("manifest");
    let mut state = Sandbox::load(Some(&sandbox.name)).expect("state");
    state.apply(None, &new_pod).expect("start dns-2");
    state.delete(None, &old_pod).expect("delete dns-1");

    // The balanced socket is destroyed (ECONNABORTED, or "destination address required" once
    // it is no longer connected) instead of sending into the void.
    let deadline = Instant::now() + Duration::from_secs(15);
    let told = loop {
        let line = next_line();
        if let Some(errno) = line.strip_prefix("error ") {
            break errno.parse::<i32>().unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline && !line.is_empty(),
            "the socket connected to deleted dns-1 was never told (last: {line:?})"
        );
    };
    let _ = resolver.kill();
    let _ = resolver.wait();
    assert!(
        [libc::ECONNABORTED, libc::EDESTADDRREQ].contains(&told),
        "errno {told}"
    );
    // The per-packet socket's next datagrams reach dns-2.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(error) = udp_echo(&outside_cgroup) {
        assert!(
            Instant::now() < deadline,
            "the translated socket still sends to deleted dns-1: {error}"
        );
    }
}

/// A backend that leaves a service with session affinity but still serves another service
/// stays in the node's backend table; the clients pinned to it must move on, as they would if
/// it had gone altogether (kube-proxy forgets affinity to endpoints a service no longer has).
#[test]
fn affinity_lets_go_of_a_backend_that_left_the_service_but_serves_another() {
    let web = |name: &str, app: &str, node: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}, tier: front}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n")
    };
    let services = "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: shop}\nspec:\n  selector: {app: web}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: front, namespace: shop}\nspec:\n  selector: {tier: front}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.96.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, services.yaml]}\n",
        &[
            (
                "pods.yaml",
                &[pod("client1", "client", "n1"), web("web-1", "web", "n1"), web("web-2", "web", "n2")].concat(),
            ),
            ("services.yaml", services),
        ],
    );
    let client = sandbox.pod("client1").clone();
    let sticky = SocketAddr::from((cluster_ip(&sandbox, "sticky"), 80));
    wait_until_served(&client.netns, sticky);
    let answered = tally(
        socket_gets(&client, sticky, 10)
            .iter()
            .map(|(pod, _, _)| pod),
    );
    assert_eq!(answered.len(), 1, "ClientIP affinity: {answered:?}");
    let pinned = answered.keys().next().expect("one backend").clone();
    let other = if pinned == "web-1" { "web-2" } else { "web-1" };

    // The pinned backend leaves `sticky` (its app label changes) and stays in `front`.
    let node = if pinned == "web-1" { "n1" } else { "n2" };
    let dir = tempfile::tempdir().expect("tempdir");
    let relabelled = dir.path().join("relabel.yaml");
    std::fs::write(&relabelled, web(&pinned, "retired", node)).expect("manifest");
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &relabelled)
        .expect("relabel");
    let front = SocketAddr::from((cluster_ip(&sandbox, "front"), 80));
    let serves_front = |pod: &str| {
        socket_gets(&client, front, 20)
            .iter()
            .any(|(answered, _, _)| answered == pod)
    };
    assert!(serves_front(&pinned), "{pinned} still serves front");

    until(
        "sticky lets go of the backend that left it",
        Duration::from_secs(20),
        || {
            let answered = tally(
                socket_gets(&client, sticky, 10)
                    .iter()
                    .map(|(pod, _, _)| pod),
            );
            match answered.len() == 1 && answered.contains_key(other) {
                true => Ok(()),
                false => Err(format!(
                    "sticky still sends the client to {pinned}, which left it: {answered:?}"
                )),
            }
        },
    );
}
