//! Service traffic policies as Kubernetes defines them, on real packets: with
//! `externalTrafficPolicy: Local` a node port reaches only the backends on the node it was
//! addressed to, the backend sees the client's own address, and every node answers on the
//! service's `healthCheckNodePort` whether it has a backend (200) or not (503); with
//! `internalTrafficPolicy: Local` a cluster IP reaches only backends on the client's node.
//!
//! n1 and n2 have one backend each, n3 none.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{
    address_on_fabric, answered_by, http_get, http_response, in_netns, TestSandbox,
};
use weft_sandbox::Sandbox;

/// A client outside the cluster, on the fabric.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 251);
const NODE_PORT: u16 = 30080;

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: edge, namespace: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: inner, namespace: shop}
spec:
  internalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

fn sandbox() -> TestSandbox {
    let pods = [
        pod("web-1", "web", "n1"),
        pod("web-2", "web", "n2"),
        pod("client-1", "client", "n1"),
        pod("client-3", "client", "n3"),
    ]
    .concat();
    TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.96.0.0/16, nodes: [n1, n2, n3], manifests: [pods.yaml, services.yaml]}\n",
        &[("pods.yaml", &pods), ("services.yaml", SERVICES)],
    )
}

/// A field of a stored Service's spec, as the sandbox (the API server here) allocated it.
fn service_spec(sandbox: &TestSandbox, name: &str, field: &str) -> serde_json::Value {
    let state = Sandbox::load(Some(&sandbox.name)).expect("state");
    state
        .objects
        .get("c1")
        .into_iter()
        .flatten()
        .find(|object| object["kind"] == "Service" && object["metadata"]["name"] == name)
        .map(|service| service["spec"][field].clone())
        .unwrap_or_else(|| panic!("service {name} is stored"))
}

/// Who answers `tries` fresh connections to `ip:port` from `netns`, and the clients they saw.
fn answers(
    netns: &str,
    ip: Ipv4Addr,
    port: u16,
    tries: usize,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut pods, mut clients) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..tries {
        let body = http_get(netns, ip, port).unwrap_or_else(|error| panic!("{ip}:{port}: {error}"));
        pods.insert(answered_by(&body));
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let client = reply["client"].as_str().unwrap_or_default();
        clients.insert(
            client
                .rsplit_once(':')
                .map_or(client, |(ip, _)| ip)
                .to_owned(),
        );
    }
    (pods, clients)
}

/// Polls until `netns` gets an answer from `target` (the agents have compiled the services).
fn wait_until_served(netns: &str, target: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(netns, target.ip(), target.port()).is_err() {
        assert!(
            Instant::now() < deadline,
            "{target} never answered from {netns}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The answer of `edge`'s health check port on the node at `ip`, polled until it is served.
fn health(sandbox: &TestSandbox, netns: &str, ip: Ipv4Addr) -> (u16, serde_json::Value) {
    let port = service_spec(sandbox, "edge", "healthCheckNodePort")
        .as_u64()
        .and_then(|port| u16::try_from(port).ok())
        .expect("the sandbox allocated a healthCheckNodePort");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_response(netns, ip, port, "/") {
            Ok((status, body)) => {
                let body = serde_json::from_str(&body).expect("a JSON health answer");
                return (status, body);
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "health check on {ip}: {error}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[test]
fn external_traffic_local_keeps_traffic_on_the_node_and_health_checks_say_where_backends_are() {
    let sandbox = sandbox();
    let fabric = sandbox.sandbox.plan.fabric_netns.clone();
    address_on_fabric(&sandbox, OUTSIDE);
    let node = |name: &str| sandbox.sandbox.plan.node("c1", name).expect("node").ip;
    let (n1, n2, n3) = (node("n1"), node("n2"), node("n3"));
    wait_until_served(&fabric, SocketAddr::from((n1, NODE_PORT)));
    wait_until_served(&fabric, SocketAddr::from((n2, NODE_PORT)));

    for (ip, backend) in [(n1, "web-1"), (n2, "web-2")] {
        let (pods, clients) = answers(&fabric, ip, NODE_PORT, 12);
        assert_eq!(
            pods,
            BTreeSet::from([backend.to_string()]),
            "node port on {ip} reaches its own backend only"
        );
        assert_eq!(
            clients,
            BTreeSet::from([OUTSIDE.to_string()]),
            "the backend sees the client's own address"
        );
    }
    let (status, body) = health(&sandbox, &fabric, n1);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "edge");
    assert_eq!(body["service"]["namespace"], "shop");
    // n3 has no backend (its answer shows it has the service): nothing goes elsewhere.
    let (status, body) = health(&sandbox, &fabric, n3);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);
    let refused = in_netns(&fabric, || {
        TcpStream::connect_timeout(&SocketAddr::from((n3, NODE_PORT)), Duration::from_secs(2))
    });
    assert!(
        refused.is_err(),
        "node port on n3 must not reach another node's backend"
    );
}

#[test]
fn internal_traffic_local_reaches_only_backends_on_the_clients_node() {
    let sandbox = sandbox();
    let inner: Ipv4Addr = service_spec(&sandbox, "inner", "clusterIP")
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .expect("a cluster IP");
    let client_1 = sandbox.pod("client-1").clone();
    let client_3 = sandbox.pod("client-3").clone();
    wait_until_served(&client_1.netns, SocketAddr::from((inner, 80)));
    let (pods, _) = answers(&client_1.netns, inner, 80, 12);
    assert_eq!(pods, BTreeSet::from(["web-1".to_string()]));
    // Once n3's agent has the services (its health check answers), its socket balancer
    // refuses at once: no backend on n3.
    let n3 = sandbox.sandbox.plan.node("c1", "n3").expect("n3").clone();
    health(&sandbox, &n3.netns, n3.ip);
    let refused = in_netns(&client_3.netns, || {
        TcpStream::connect_timeout(&SocketAddr::from((inner, 80)), Duration::from_secs(2))
    });
    assert!(
        refused.is_err(),
        "client-3 on n3 must not reach a backend on another node"
    );
}
