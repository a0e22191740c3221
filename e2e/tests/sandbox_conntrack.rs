//! Connection tracking is stateful: replies pass only while their connection lives, a "reply"
//! nobody asked for is checked as new traffic, a connection's entry dies with its lifetime (and
//! the collector sweeps it out, counted in metrics), and fragmented datagrams are judged by the
//! ports their first fragment carried.
//!
//! The cluster runs with short lifetimes (`agentArgs`) so that expiry is seen in seconds.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{agent_metric, in_netns, observe, TestSandbox};
use weft_sandbox::PodState;

const CLOSING_LIFETIME: Duration = Duration::from_secs(2);
const OTHER_LIFETIME: Duration = Duration::from_secs(3);

fn pod(name: &str, namespace: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: vault}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab}
---
";

/// `vault` takes no ingress at all; `vault/sink` takes UDP 7400-7401 from anyone, except that
/// 7401 is denied.
const POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: vault}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sink-udp, namespace: vault}
spec:
  podSelector: {matchLabels: {app: sink}}
  ingress:
  - ports: [{protocol: UDP, port: 7400, endPort: 7401}]
---
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: no-7401, namespace: vault}
spec:
  endpointSelector: {matchLabels: {app: sink}}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - toPorts: [{ports: [{port: '7401', protocol: UDP}]}]
";

fn sandbox() -> TestSandbox {
    TestSandbox::up(
        &format!(
            "- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [ns.yaml, pods.yaml, policies.yaml], agentArgs: [--ct-lifetime-closing, {}s, --ct-lifetime-other, {}s, --ct-gc-interval, 1s]}}\n",
            CLOSING_LIFETIME.as_secs(),
            OTHER_LIFETIME.as_secs()
        ),
        &[
            ("ns.yaml", NAMESPACES),
            (
                "pods.yaml",
                &[
                    pod("keeper", "vault", "n1"),
                    pod("sink", "vault", "n1"),
                    pod("peer", "lab", "n2"),
                    pod("stranger", "lab", "n2"),
                ]
                .concat(),
            ),
            ("policies.yaml", POLICIES),
        ],
    )
}

/// Waits until `keeper`'s isolation is in force: `peer` cannot reach its HTTP port.
fn wait_for_isolation(keeper: &PodState, peer: &PodState) {
    let target = SocketAddr::from((keeper.ip, 8080));
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_netns(&peer.netns, || {
        TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok()
    }) {
        assert!(Instant::now() < deadline, "policy never came into force");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn udp_socket(netns: &str, address: SocketAddr) -> UdpSocket {
    let socket = in_netns(netns, || UdpSocket::bind(address).expect("bind"));
    socket
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    socket
}

/// Whether a datagram arrives within the socket's 400 ms read timeout. Where a test asserts
/// that nothing arrives, that is long enough: between two namespaces of this machine a datagram
/// takes well under a millisecond, and each such assertion follows a positive one on the same
/// path (the answer that came back, the allowed port that received) that waited the same way.
fn receives(socket: &UdpSocket) -> bool {
    let mut buffer = vec![0u8; 65_536];
    socket.recv_from(&mut buffer).is_ok()
}

/// The agent's metric `name` on `node`, if it reports one.
#[test]
fn a_udp_reply_passes_while_its_flow_lives_and_is_checked_as_new_traffic_after() {
    let sandbox = sandbox();
    let (keeper, peer, stranger) = (
        sandbox.pod("keeper").clone(),
        sandbox.pod("peer").clone(),
        sandbox.pod("stranger").clone(),
    );
    wait_for_isolation(&keeper, &peer);
    let keeper_end = SocketAddr::from((keeper.ip, 5000));
    let peer_end = SocketAddr::from((peer.ip, 6000));
    let keeper_socket = udp_socket(&keeper.netns, keeper_end);
    let peer_socket = udp_socket(&peer.netns, peer_end);

    // A host the keeper never contacted cannot "reply".
    let stranger_socket = udp_socket(&stranger.netns, SocketAddr::from((stranger.ip, 6000)));
    stranger_socket
        .send_to(b"unasked", keeper_end)
        .expect("send");
    assert!(
        !receives(&keeper_socket),
        "an unasked UDP 'reply' reached the isolated pod"
    );

    // The keeper asks; the answer passes.
    keeper_socket.send_to(b"ask", peer_end).expect("send");
    assert!(receives(&peer_socket), "the peer got the question");
    peer_socket.send_to(b"answer", keeper_end).expect("send");
    assert!(receives(&keeper_socket), "the answer came back");

    // Every packet keeps the flow alive, so it must go quiet for its lifetime to end: what is
    // tested here is that time, not a condition to poll for. The agents run with exactly this
    // lifetime (`agentArgs`); the extra second covers the gap between the answer's timestamp
    // in the datapath and this clock.
    std::thread::sleep(OTHER_LIFETIME + Duration::from_secs(1));
    peer_socket.send_to(b"late", keeper_end).expect("send");
    assert!(
        !receives(&keeper_socket),
        "a 'reply' after the flow expired reached the isolated pod"
    );
    let drops = observe(&sandbox, &["--verdict", "DROPPED", "--pod", "vault/keeper"]);
    assert!(
        drops.iter().any(|flow| {
            flow["flow"]["IP"]["source"] == peer.ip.to_string().as_str()
                && flow["flow"]["l4"]["UDP"]["destination_port"] == 5000
                && flow["flow"]["drop_reason_desc"] == "denied by policy"
        }),
        "{drops:?}"
    );

    // The collector sweeps dead entries out and counts them.
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent_metric(&sandbox, "c1", "n1", "weft_agent_conntrack_collected_total").unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "no dead connection was ever collected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent_metric(&sandbox, "c1", "n1", "weft_agent_conntrack_pressure").is_some());
    assert!(agent_metric(&sandbox, "c1", "n1", "weft_agent_conntrack_entries").is_some());
}

/// One's-complement sum of 16-bit words, folded.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one bare TCP segment from `netns` (a raw socket: no connection behind it), as a peer
/// whose connection is long gone would.
fn send_tcp_segment(netns: &str, from: SocketAddr, to: SocketAddr, flags: u8) {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only");
    };
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&from.port().to_be_bytes());
    segment[2..4].copy_from_slice(&to.port().to_be_bytes());
    segment[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    segment[8..12].copy_from_slice(&2_000_000u32.to_be_bytes());
    segment[12] = 5 << 4; // header length: 5 words
    segment[13] = flags;
    segment[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&segment);
    segment[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    in_netns(netns, || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new, valid descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address for the call's duration.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&address as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, 20, "sendto: {}", std::io::Error::last_os_error());
    });
}

#[test]
fn a_late_tcp_reply_after_the_connection_closed_is_dropped() {
    let sandbox = sandbox();
    let (keeper, peer) = (sandbox.pod("keeper").clone(), sandbox.pod("peer").clone());
    wait_for_isolation(&keeper, &peer);
    // The keeper opens and closes a connection to the peer (its egress is open).
    let peer_http = SocketAddr::from((peer.ip, 8080));
    let keeper_end = in_netns(&keeper.netns, || {
        let stream =
            TcpStream::connect_timeout(&peer_http, Duration::from_secs(3)).expect("connect");
        let local = stream.local_addr().expect("local address");
        drop(stream);
        local
    });
    // A stray segment of that connection while it is closing is still its reply; it goes
    // through (the keeper's kernel answers it with a reset, which its open egress lets out).
    send_tcp_segment(&peer.netns, peer_http, keeper_end, 0x10);
    // Once the connection has been quiet for its closing lifetime, a "reply" is new traffic
    // that the keeper's policy refuses. Every packet would renew the lifetime, so the wait is
    // the lifetime itself: the agents run with exactly this one (`agentArgs`), and the extra
    // second covers the gap between the stray segment's timestamp and this clock.
    std::thread::sleep(CLOSING_LIFETIME + Duration::from_secs(1));
    send_tcp_segment(&peer.netns, peer_http, keeper_end, 0x04 | 0x10);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let drops = observe(&sandbox, &["--verdict", "DROPPED", "--pod", "vault/keeper"]);
        let refused = drops.iter().any(|flow| {
            flow["flow"]["IP"]["source"] == peer.ip.to_string().as_str()
                && flow["flow"]["l4"]["TCP"]["destination_port"] == keeper_end.port()
                && flow["flow"]["drop_reason_desc"] == "denied by policy"
        });
        if refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a late segment of a closed connection was not refused: {drops:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_fragmented_datagram_is_judged_by_its_first_fragments_ports() {
    let sandbox = sandbox();
    let (sink, peer) = (sandbox.pod("sink").clone(), sandbox.pod("peer").clone());
    // The deny comes into force with the namespace's isolation (one policy pass).
    wait_for_isolation(sandbox.pod("keeper"), &peer);
    let allowed = udp_socket(&sink.netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7400)));
    let denied = udp_socket(&sink.netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7401)));
    allowed
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let sender = udp_socket(&peer.netns, SocketAddr::from((peer.ip, 0)));
    // 60 KiB: about 42 fragments on a 1500-byte link.
    let datagram: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
    let mut buffer = vec![0u8; 65_536];
    let deadline = Instant::now() + Duration::from_secs(10);
    let received = loop {
        sender
            .send_to(&datagram, SocketAddr::from((sink.ip, 7400)))
            .expect("send 60 KiB");
        if let Ok((length, _)) = allowed.recv_from(&mut buffer) {
            break length;
        }
        assert!(
            Instant::now() < deadline,
            "a fragmented datagram to an allowed port never arrived"
        );
    };
    assert_eq!(received, datagram.len());
    assert_eq!(&buffer[..received], &datagram[..]);

    sender
        .send_to(&datagram, SocketAddr::from((sink.ip, 7401)))
        .expect("send 60 KiB");
    assert!(
        !receives(&denied),
        "a fragmented datagram to a denied port arrived"
    );
    let drops = observe(&sandbox, &["--verdict", "DROPPED", "--pod", "vault/sink"]);
    assert!(
        drops.iter().any(|flow| {
            flow["flow"]["l4"]["UDP"]["destination_port"] == 7401
                && flow["flow"]["ingress_denied_by"]
                    .as_array()
                    .is_some_and(|by| {
                        by.iter()
                            .any(|rule| rule == "WeftNetworkPolicy vault/no-7401 ingressDeny[0]")
                    })
        }),
        "{drops:?}"
    );
}
