//! Ports on the nodes themselves. NodePorts answer on every address of a node, not only its
//! node IP: a secondary address on the uplink, and the address of a second NIC the agent is told
//! about (`--device`), as on multi-homed GPU nodes. A pod's `hostPort` takes that port on its
//! own node's addresses (and only there), the client's address kept.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weft_e2e::netns::unique_prefix;
use weft_e2e::sandbox::{address_on_fabric, answered_by, http_get, TestSandbox};
use weft_sandbox::{host, Sandbox};

const NODE_PORT: u16 = 30080;
const HOST_PORT: u16 = 8443;
/// The client, outside the cluster on the fabric.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 249);
/// A second address on n1's uplink, in the fabric's network.
const SECONDARY: Ipv4Addr = Ipv4Addr::new(172, 30, 201, 1);
/// A second network: n1's second NIC and the client's address on it.
const SECOND_NIC: Ipv4Addr = Ipv4Addr::new(172, 29, 0, 1);
const CLIENT_ON_SECOND_NETWORK: Ipv4Addr = Ipv4Addr::new(172, 29, 0, 254);

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
kind: Pod
metadata: {name: ingress, namespace: default, labels: {app: ingress}}
spec:
  nodeName: n1
  containers:
  - name: c
    image: weft/echo
    ports: [{name: http, containerPort: 8080, hostPort: 8443}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";

/// Polls until `target` answers from `netns`; who answered.
fn served(netns: &str, target: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(netns, target.ip(), target.port()) {
            Ok(body) => return answered_by(&body),
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "nothing answered at {target}: {error}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[test]
fn node_ports_answer_on_a_secondary_address_and_on_a_second_nic() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [web.yaml]}\n",
        &[("web.yaml", MANIFESTS)],
    );
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    let n1 = sandbox.sandbox.plan.node("c1", "n1").expect("n1").clone();
    for address in [
        format!("{OUTSIDE}/16"),
        format!("{CLIENT_ON_SECOND_NETWORK}/24"),
    ] {
        host::ip(&["-n", &fabric, "addr", "add", &address, "dev", "fabric0"])
            .expect("address the fabric");
    }
    assert_eq!(served(&fabric, SocketAddr::from((n1.ip, NODE_PORT))), "web");

    // A secondary address: the agent picks it up from the kernel.
    host::ip(&[
        "-n",
        &n1.netns,
        "addr",
        "add",
        &format!("{SECONDARY}/16"),
        "dev",
        "eth0",
    ])
    .expect("secondary address");
    assert_eq!(
        served(&fabric, SocketAddr::from((SECONDARY, NODE_PORT))),
        "web",
        "NodePort on n1's secondary address"
    );

    // A second NIC on another network, which the agent attaches to with --device.
    let fabric_end = format!("{}s", unique_prefix());
    host::ip(&[
        "-n",
        &fabric,
        "link",
        "add",
        &fabric_end,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &n1.netns,
    ])
    .expect("second NIC");
    host::ip(&[
        "-n",
        &fabric,
        "link",
        "set",
        &fabric_end,
        "master",
        "fabric0",
        "up",
    ])
    .expect("onto the fabric");
    host::ip(&[
        "-n",
        &n1.netns,
        "addr",
        "add",
        &format!("{SECOND_NIC}/24"),
        "dev",
        "eth1",
    ])
    .expect("second NIC address");
    host::ip(&["-n", &n1.netns, "link", "set", "eth1", "up"]).expect("second NIC up");
    // Each NIC answers ARP only for its own addresses, as on a multi-homed host set up for it:
    // the client's packets then arrive on eth1, not on the uplink.
    host::sysctl_in(&n1.netns, "net.ipv4.conf.all.arp_ignore", "1").expect("arp_ignore");
    let mut state = Sandbox::load(Some(&sandbox.name)).expect("state");
    state
        .plan
        .nodes
        .iter_mut()
        .filter(|node| node.cluster == "c1" && node.name == "n1")
        .for_each(|node| node.agent_args.extend(["--device".into(), "eth1".into()]));
    state
        .restart_agent("c1", "n1")
        .expect("restart n1's agent with --device eth1");
    assert_eq!(
        served(&fabric, SocketAddr::from((SECOND_NIC, NODE_PORT))),
        "web",
        "NodePort on n1's second NIC"
    );
}

#[test]
fn a_host_port_reaches_its_pod_on_the_pods_node_only() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [web.yaml]}\n",
        &[("web.yaml", MANIFESTS)],
    );
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    address_on_fabric(&sandbox, OUTSIDE);
    let node = |name: &str| sandbox.sandbox.plan.node("c1", name).expect("node").clone();
    let (n1, n2) = (node("n1"), node("n2"));
    let target = SocketAddr::from((n1.ip, HOST_PORT));
    assert_eq!(served(&fabric, target), "ingress");
    let body = http_get(&fabric, n1.ip, HOST_PORT).expect("through the host port");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("echo answer");
    assert!(
        reply["client"]
            .as_str()
            .is_some_and(|client| client.starts_with(&format!("{OUTSIDE}:"))),
        "the pod sees the client's address: {reply}"
    );
    // From a pod on another node, through the socket balancer, too.
    let web = sandbox.pod("web").clone();
    let from_pod = http_get(&web.netns, n1.ip, HOST_PORT).expect("from a pod");
    assert_eq!(answered_by(&from_pod), "ingress");
    // n2 has no such pod: its port is its own (nothing listens there).
    assert!(
        http_get(&fabric, n2.ip, HOST_PORT).is_err(),
        "the host port is taken on the pod's node only"
    );
}
