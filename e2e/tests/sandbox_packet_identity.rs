//! Where the receiver's policy gets the sender's identity from.
//!
//! - A pod cannot borrow another pod's identity by sending with its address: the datapath drops
//!   every packet whose source is not the sending endpoint's own, before policy or service
//!   translation read it, and reports the drop with its reason, naming the pod that sent it.
//! - In tunnel mode the receiving node takes the sender's identity from the VXLAN VNI, so a
//!   remote pod is recognised even before (or without) its ipcache entry on the receiver.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::sandbox::{
    echo_reachable, http_get_path, in_netns, observe, run_in_pod, TestSandbox,
};
use weft_sandbox::{host, PodState};

const SPOOFED_REASON: &str = "source address is not the endpoint's";
const TCP_PORT: u16 = 7001;
const UDP_PORT: u16 = 7002;
const CONTROL_UDP_PORT: u16 = 7003;

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: lab\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

/// The victim takes traffic from `app: trusted` only: before source validation, any pod that
/// claimed the trusted pod's address was let in as if it were that pod.
const POLICY: &str = "\
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: only-trusted, namespace: lab}
spec:
  endpointSelector: {matchLabels: {app: victim}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: trusted}}]
";

/// A UDP socket inside the victim's namespace that collects whatever reaches it.
fn listen_udp(victim: &PodState, port: u16) -> UdpSocket {
    let socket = in_netns(&victim.netns, || {
        UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).expect("bind")
    });
    socket.set_nonblocking(true).expect("nonblocking");
    socket
}

/// The senders of every datagram queued on `socket` so far.
fn received_from(socket: &UdpSocket) -> Vec<SocketAddr> {
    let mut buffer = [0u8; 64];
    let mut senders = Vec::new();
    while let Ok((_, from)) = socket.recv_from(&mut buffer) {
        senders.push(from);
    }
    senders
}

fn send_udp(netns: &str, source: Ipv4Addr, target: SocketAddr) {
    in_netns(netns, || {
        let socket = UdpSocket::bind(SocketAddr::from((source, 0))).expect("bind the source");
        socket.send_to(b"spoofed?", target).expect("send");
    });
}

/// Polls flows until every protocol in `protocols` shows a spoofing drop sent by `sender`.
fn wait_for_spoofing_drops(sandbox: &TestSandbox, sender: &PodState, protocols: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let drops = observe(sandbox, &["--verdict", "DROPPED"]);
        let missing: Vec<&str> = protocols
            .iter()
            .copied()
            .filter(|protocol| {
                !drops.iter().any(|flow| {
                    let flow = &flow["flow"];
                    flow["drop_reason_desc"] == SPOOFED_REASON
                        && flow["l4"].get(*protocol).is_some()
                        && flow["source"]["pod_name"] == sender.name.as_str()
                        && flow["trace_observation_point"] == "FROM_ENDPOINT"
                })
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no spoofing drop reported for {missing:?}; drops: {drops:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lab(routing_mode: &str) -> TestSandbox {
    TestSandbox::up(
        &format!("- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, routingMode: {routing_mode}, nodes: [n1, n2], manifests: [ns.yaml, pods.yaml, policy.yaml]}}\n"),
        &[
            ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: lab}\n"),
            (
                "pods.yaml",
                &[
                    pod("victim", "victim", "n2"),
                    pod("trusted", "trusted", "n1"),
                    pod("attacker", "attacker", "n1"),
                ]
                .concat(),
            ),
            ("policy.yaml", POLICY),
        ],
    )
}

/// Waits until the attacker, as itself, is refused by the victim's policy.
fn wait_for_isolation(attacker: &PodState, victim_http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo_reachable(&attacker.netns, victim_http, 1) {
        assert!(Instant::now() < deadline, "policy never came into force");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pod_sending_with_another_pods_address_is_dropped_and_reported() {
    let sandbox = lab("native");
    let victim = sandbox.pod("victim").clone();
    let trusted = sandbox.pod("trusted").clone();
    let attacker = sandbox.pod("attacker").clone();
    let victim_http = SocketAddr::from((victim.ip, 8080));

    // The policy is in force: the attacker, as itself, is refused; the trusted pod is not.
    wait_for_isolation(&attacker, victim_http);
    assert!(echo_reachable(&trusted.netns, victim_http, 3));

    // The listener hears the trusted pod, so silence later means the datagrams were dropped.
    let control = listen_udp(&victim, CONTROL_UDP_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send_udp(
            &trusted.netns,
            trusted.ip,
            SocketAddr::from((victim.ip, CONTROL_UDP_PORT)),
        );
        if received_from(&control)
            .iter()
            .any(|from| from.ip() == trusted.ip)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trusted pod's UDP never reached the victim"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The attacker takes the trusted pod's address as a second one on its eth0.
    host::ip(&[
        "-n",
        &attacker.netns,
        "addr",
        "add",
        &format!("{}/32", trusted.ip),
        "dev",
        "eth0",
    ])
    .expect("add the borrowed address");
    let spoofed_udp = listen_udp(&victim, UDP_PORT);
    for _ in 0..3 {
        send_udp(
            &attacker.netns,
            trusted.ip,
            SocketAddr::from((victim.ip, UDP_PORT)),
        );
    }
    let tcp = run_in_pod(
        &attacker,
        "curl",
        &[
            "-s",
            "--max-time",
            "2",
            "--interface",
            &trusted.ip.to_string(),
            &format!("http://{}:{TCP_PORT}/", victim.ip),
        ],
    );
    assert!(
        !tcp.status.success(),
        "a TCP connection from the borrowed address completed"
    );
    let ping = run_in_pod(
        &attacker,
        "ping",
        &[
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            &trusted.ip.to_string(),
            &victim.ip.to_string(),
        ],
    );
    assert!(
        !ping.status.success(),
        "ping from the borrowed address was answered: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Every protocol's drop is reported, naming the pod that really sent it.
    wait_for_spoofing_drops(&sandbox, &attacker, &["TCP", "UDP", "ICMP"]);
    // ...and counted under its reason on the attacker's node.
    let metrics = http_get_path(
        &sandbox.node_netns("c1", &attacker.node),
        "127.0.0.1",
        9962,
        "/metrics",
    )
    .expect("the agent's metrics");
    let counted = metrics.lines().any(|line| {
        line.starts_with(&format!(
            "weft_agent_drops_total{{reason=\"{SPOOFED_REASON}\"}}"
        )) && line
            .rsplit(' ')
            .next()
            .and_then(|count| count.parse::<f64>().ok())
            .is_some_and(|count| count >= 3.0)
    });
    assert!(counted, "no spoofing drops in the metrics:\n{metrics}");
    // The datagrams' drops were reported above, so the datapath has handled all three: any
    // that had been delivered would already be queued on the listener.
    assert_eq!(
        received_from(&spoofed_udp),
        Vec::<SocketAddr>::new(),
        "datagrams from the borrowed address reached the victim"
    );
    // Nothing from the borrowed address was delivered to the victim, on any protocol.
    let delivered = observe(&sandbox, &["--pod", "lab/victim", "--verdict", "FORWARDED"]);
    let borrowed = trusted.ip.to_string();
    let leaked: Vec<_> = delivered
        .iter()
        .filter(|flow| {
            let flow = &flow["flow"];
            flow["trace_observation_point"] == "TO_ENDPOINT"
                && flow["IP"]["source"] == borrowed.as_str()
                && (flow["l4"].get("ICMP").is_some()
                    || [("TCP", TCP_PORT), ("UDP", UDP_PORT)]
                        .iter()
                        .any(|(protocol, port)| flow["l4"][protocol]["destination_port"] == *port))
        })
        .collect();
    assert!(leaked.is_empty(), "delivered to the victim: {leaked:?}");

    // Without the borrowed address, the attacker talks as itself wherever policy lets it.
    host::ip(&[
        "-n",
        &attacker.netns,
        "addr",
        "del",
        &format!("{}/32", trusted.ip),
        "dev",
        "eth0",
    ])
    .expect("drop the borrowed address");
    assert!(echo_reachable(
        &attacker.netns,
        SocketAddr::from((trusted.ip, 8080)),
        3
    ));
}

/// Whether `node_bpffs`'s pinned ipcache holds an entry for `prefix` (`struct ipcache_key`:
/// prefix length in host order, then the address in network order).
fn ipcache_has(node_bpffs: &Path, prefix_len: u32, address: Ipv4Addr) -> bool {
    let key: Vec<u8> = prefix_len
        .to_le_bytes()
        .into_iter()
        .chain(address.octets())
        .collect();
    pinned_map_entries(&node_bpffs.join("weft/ipcache"))
        .iter()
        .any(|(entry_key, _)| *entry_key == key)
}

#[test]
fn in_tunnel_mode_the_receiver_takes_the_senders_identity_from_the_vni() {
    let sandbox = lab("tunnel");
    let victim = sandbox.pod("victim").clone();
    let trusted = sandbox.pod("trusted").clone();
    let attacker = sandbox.pod("attacker").clone();
    let victim_http = SocketAddr::from((victim.ip, 8080));
    wait_for_isolation(&attacker, victim_http);
    assert!(echo_reachable(&trusted.netns, victim_http, 3));

    // The victim's node forgets the trusted pod's address, as a node does before the pod's
    // entry has reached it. Its agent is stopped first so that nothing writes the entry back;
    // the pinned datapath goes on forwarding without it.
    sandbox.stop_agent("c1", "n2");
    let bpffs = sandbox.sandbox.bpffs.join("c1-n2");
    assert!(ipcache_has(&bpffs, 32, trusted.ip), "no entry to remove");
    let key: Vec<String> = 32u32
        .to_le_bytes()
        .into_iter()
        .chain(trusted.ip.octets())
        .map(|byte| byte.to_string())
        .collect();
    let deleted = Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(bpffs.join("weft/ipcache"))
        .arg("key")
        .args(&key)
        .output()
        .expect("run bpftool");
    assert!(
        deleted.status.success(),
        "bpftool map delete: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert!(!ipcache_has(&bpffs, 32, trusted.ip));

    // The VNI still says who sent it: the trusted pod is let in, the attacker still is not.
    assert!(
        echo_reachable(&trusted.netns, victim_http, 3),
        "the trusted pod was refused without its ipcache entry"
    );
    assert!(!echo_reachable(&attacker.netns, victim_http, 2));
}
