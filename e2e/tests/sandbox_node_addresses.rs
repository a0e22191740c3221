//! NodePorts answer on every address of a node, not only its node IP: a secondary address on
//! the uplink, and the address of a second NIC the agent is told about (`--device`), as on
//! multi-homed GPU nodes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weft_e2e::netns::unique_prefix;
use weft_e2e::sandbox::{answered_by, http_get, TestSandbox};
use weft_sandbox::{host, Sandbox};

const NODE_PORT: u16 = 30080;
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
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";

/// Polls until `target` answers from `netns` through the node port; who answered.
fn served(netns: &str, target: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(netns, target.ip(), target.port()) {
            Ok(body) => return answered_by(&body),
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "NodePort at {target} never answered: {error}"
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
