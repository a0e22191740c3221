//! Peer nodes follow the nodes an agent is told of while it runs: a node taken out of another
//! node's peers is unwired there (its route and ipcache entry go, and pods can no longer reach
//! its pods), and put back it is wired again — no agent restarts, as for a node that leaves or joins a cluster.
//! A node that left while the agent was down is unwired when the agent starts again.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::sandbox::{echo_reachable, TestSandbox};
use weft_sandbox::config::RoutingMode;
use weft_sandbox::plan::NodePlan;

fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: echo, containerPort: 9000}}\n---\n"
    )
}

/// Prefix → (identity, tunnel endpoint) in a node's pinned ipcache (`struct ipcache_key`:
/// prefix length, then the address in network order; `struct ipcache_entry`: identity, then the
/// tunnel endpoint in network order).
fn ipcache(node_bpffs: &Path) -> BTreeMap<String, Entry> {
    pinned_map_entries(&node_bpffs.join("weft/ipcache"))
        .into_iter()
        .filter_map(|(key, value)| {
            let prefix_len = u32::from_le_bytes(key.get(0..4)?.try_into().ok()?);
            let address: [u8; 4] = key.get(4..8)?.try_into().ok()?;
            let identity = u32::from_le_bytes(value.get(0..4)?.try_into().ok()?);
            let endpoint: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            Some((
                format!("{}/{prefix_len}", Ipv4Addr::from(address)),
                (identity, Ipv4Addr::from(endpoint)),
            ))
        })
        .collect()
}

/// An ipcache entry: (identity, tunnel endpoint).
type Entry = (u32, Ipv4Addr);

/// The node's route to `destination`, as `ip route` shows it ("" for none).
fn route(netns: &str, destination: &str) -> String {
    let output = Command::new("ip")
        .args(["-n", netns, "route", "show", "exact", destination])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// What `node` has of `peer` and of `remote_pod` (a pod on the peer): (route, the peer's pod
/// CIDR entry, the pod's /32 entry).
fn wiring(
    sandbox: &TestSandbox,
    node: &NodePlan,
    peer: &NodePlan,
    remote_pod: Ipv4Addr,
) -> (String, Option<Entry>, Option<Entry>) {
    let bpffs = sandbox
        .sandbox
        .bpffs
        .join(format!("{}-{}", node.cluster, node.name));
    let cache = ipcache(&bpffs);
    (
        route(&node.netns, &peer.pod_cidr.to_string()),
        cache.get(&peer.pod_cidr.to_string()).copied(),
        cache.get(&format!("{remote_pod}/32")).copied(),
    )
}

fn wait_for(what: &str, mut done: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match done() {
            Ok(()) => return,
            Err(state) if Instant::now() > deadline => panic!("{what}: still {state}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn assert_wired(sandbox: &TestSandbox, node: &NodePlan, peer: &NodePlan, remote_pod: Ipv4Addr) {
    wait_for(&format!("{} wires {}", node.name, peer.name), || {
        let (route, cidr, pod) = wiring(sandbox, node, peer, remote_pod);
        let way = match node.routing_mode {
            RoutingMode::Tunnel => "dev weft_vxlan".to_owned(),
            RoutingMode::Native => format!("via {} dev eth0", peer.ip),
        };
        let ok = route.contains(&way)
            // identity unknown, behind the peer
            && cidr == Some((0, peer.ip))
            // the policy engine's entry for the remote pod names the peer too
            && pod.is_some_and(|(_, endpoint)| endpoint == peer.ip);
        if ok {
            Ok(())
        } else {
            Err(format!("route {route:?}, CIDR {cidr:?}, pod {pod:?}"))
        }
    });
}

/// Waits until `node` has neither a route nor an ipcache entry for `peer`'s pod CIDR, and no
/// entry for `remote_pod` either.
fn assert_unwired(sandbox: &TestSandbox, node: &NodePlan, peer: &NodePlan, remote_pod: Ipv4Addr) {
    wait_for(
        &format!("{} unwires {}", node.name, peer.name),
        || match wiring(sandbox, node, peer, remote_pod) {
            (route, None, None) if route.is_empty() => Ok(()),
            state => Err(format!("{state:?}")),
        },
    );
}

#[test]
fn nodes_leave_and_join_in_tunnel_mode() {
    nodes_leave_and_join("tunnel");
}

#[test]
fn nodes_leave_and_join_with_native_routing() {
    nodes_leave_and_join("native");
}

fn nodes_leave_and_join(routing_mode: &str) {
    let mut sandbox = TestSandbox::up(
        &format!("- {{name: c1, id: 1, podCIDR: 10.1.0.0/16, routingMode: {routing_mode}, nodes: [n1, n2], manifests: [pods.yaml]}}\n"),
        &[("pods.yaml", &[pod("a1", "n1"), pod("b1", "n2")].concat())],
    );
    let (a1, b1) = (sandbox.pod("a1").clone(), sandbox.pod("b1").clone());
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    let n2 = sandbox.sandbox.plan.node("c1", "n2").expect("n2").clone();
    let b1_echo = SocketAddr::from((b1.ip, 9000));
    assert_wired(&sandbox, &n1, &n2, b1.ip);
    assert!(echo_reachable(&a1.netns, b1_echo, 5), "a1 -> b1 at start");

    // n2 leaves n1's peers: the route, the CIDR entry and b1's entry go, and so does the way.
    sandbox
        .sandbox
        .set_peers(&n1, &[])
        .expect("tell n1 its peers");
    assert_unwired(&sandbox, &n1, &n2, b1.ip);
    assert!(
        !echo_reachable(&a1.netns, b1_echo, 1),
        "a1 -> b1 works although n1 no longer knows n2"
    );

    // n2 joins again.
    sandbox
        .sandbox
        .set_peers(&n1, &[&n2])
        .expect("tell n1 its peers");
    assert_wired(&sandbox, &n1, &n2, b1.ip);
    assert!(
        echo_reachable(&a1.netns, b1_echo, 5),
        "a1 -> b1 once n2 is back"
    );

    // n2 leaves while n1's agent is down: the restarted agent finds n2's entry in the pinned
    // ipcache and unwires it (entry and route), and the policy engine removes b1's /32, which
    // the earlier run wrote.
    sandbox.stop_agent("c1", "n1");
    sandbox
        .sandbox
        .set_peers(&n1, &[])
        .expect("tell n1 its peers");
    let (route_meanwhile, cidr_meanwhile, _) = wiring(&sandbox, &n1, &n2, b1.ip);
    assert!(
        !route_meanwhile.is_empty() && cidr_meanwhile.is_some(),
        "the route and the pinned entry outlive the agent"
    );
    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart n1's agent");
    assert_unwired(&sandbox, &n1, &n2, b1.ip);
    // And the restarted agent follows its peers as well.
    sandbox
        .sandbox
        .set_peers(&n1, &[&n2])
        .expect("tell n1 its peers");
    assert_wired(&sandbox, &n1, &n2, b1.ip);
    assert!(
        echo_reachable(&a1.netns, b1_echo, 5),
        "a1 -> b1 once n2 is back after the restart"
    );

    // A policy naming n2's pod CIDR as a CIDR leaves n2's entry as it is: n1 still forwards
    // to n2's pods through it (CIDR rules select addresses outside the cluster only).
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("cidr.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: from-n2-cidr, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a1}}}}\n  ingress:\n  - fromCIDR: [\"{}\"]\n",
            n2.pod_cidr
        ),
    )
    .expect("write the policy");
    sandbox.sandbox.apply(None, &policy).expect("apply");
    std::thread::sleep(Duration::from_secs(2));
    assert_wired(&sandbox, &n1, &n2, b1.ip);
    assert!(
        echo_reachable(&a1.netns, b1_echo, 5),
        "a1 -> b1 with a policy naming n2's pod CIDR"
    );
}
