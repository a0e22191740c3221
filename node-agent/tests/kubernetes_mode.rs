//! The agent's Kubernetes edge against a mock API server (tower-test): the requests it makes
//! (method, URI, body), and what it makes of the answers — this node's addressing, the
//! engines' files, the WeftEndpoints it publishes, the CNI files it installs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::Notify;
use weft_agent::cni::api::PodRef;
use weft_agent::flows::directory::EndpointMeta;
use weft_agent::kubernetes::rows::{self, DirectoryInputs};
use weft_agent::kubernetes::{cni_install, endpoints, node, watch};
use weft_agent::node::EndpointRecord;
use weft_agent::state::{ClusterState, KUBERNETES_SOURCE};
use weft_crds::{
    GlobalService, WeftClusterwideNetworkPolicy, WeftEndpoint, WeftIdentity, WeftNetworkPolicy,
};

type ApiServer = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

fn ok(body: &Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

async fn body_of(request: Request<Body>) -> Value {
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON request body")
    }
}

fn node_object(name: &str, pod_cidrs: &[&str], internal_ip: Option<&str>) -> Value {
    let mut addresses = vec![json!({"type": "Hostname", "address": name})];
    if let Some(ip) = internal_ip {
        addresses.push(json!({"type": "InternalIP", "address": ip}));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "7"},
        "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
        "status": {"addresses": addresses},
    })
}

fn pod_object(namespace: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "labels": labels, "resourceVersion": "3"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "x", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9000},
            ]}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn namespace_object(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn identity_object(id: i64, labels: Value) -> Value {
    json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "WeftIdentity",
        "metadata": {"name": id.to_string()},
        "spec": {"id": id, "securityLabels": labels},
    })
}

fn endpoint_object(namespace: &str, name: &str, node: &str, ip: &str, identity: i64) -> Value {
    json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "WeftEndpoint",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("wep-{name}")},
        "spec": {"ips": [ip], "identity": identity, "nodeName": node, "namedPorts": [{"name": "grpc", "port": 9090, "protocol": "TCP"}]},
    })
}

fn list_of<K: serde::Serialize>(objects: &[Arc<K>]) -> Value {
    objects
        .iter()
        .map(|object| serde_json::to_value(object.as_ref()).expect("json"))
        .collect()
}

fn parse<K: serde::de::DeserializeOwned>(value: Value) -> Arc<K> {
    Arc::new(serde_json::from_value(value).expect("object"))
}

// --- Node ---------------------------------------------------------------------------------

#[tokio::test]
async fn the_node_object_gives_the_pod_cidr_and_the_internal_ip() {
    let (client, mut server) = mock_client();
    let api = tokio::spawn(async move {
        let (request, send) = server.next_request().await.expect("GET node");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().to_string(), "/api/v1/nodes/node-a");
        send.send_response(ok(&node_object(
            "node-a",
            &["10.244.3.0/24"],
            Some("192.168.7.3"),
        )));
    });
    let addressing =
        node::wait_for_addressing(&client, "node-a", None, None, 1, Duration::from_millis(1))
            .await
            .expect("addressing");
    api.await.expect("api server");
    assert_eq!(
        addressing.pod_cidr,
        "10.244.3.0/24".parse::<ipnet::Ipv4Net>().unwrap()
    );
    assert_eq!(
        addressing.node_ip,
        "192.168.7.3".parse::<std::net::Ipv4Addr>().unwrap()
    );
}

#[tokio::test]
async fn a_node_without_a_pod_cidr_is_a_clear_error_naming_what_to_configure() {
    let (client, mut server) = mock_client();
    let api = tokio::spawn(async move {
        let (_request, send) = server.next_request().await.expect("GET node");
        send.send_response(ok(&node_object("node-a", &[], Some("192.168.7.3"))));
    });
    let error =
        node::wait_for_addressing(&client, "node-a", None, None, 1, Duration::from_millis(1))
            .await
            .expect_err("no pod CIDR");
    api.await.expect("api server");
    let message = error.to_string();
    assert!(message.contains("node-a"), "{message}");
    assert!(message.contains("--allocate-node-cidrs"), "{message}");
    assert!(message.contains("--pod-cidr"), "{message}");
}

#[tokio::test]
async fn a_missing_node_is_an_error_naming_the_flag() {
    let (client, mut server) = mock_client();
    let api = tokio::spawn(async move {
        let (_request, send) = server.next_request().await.expect("GET node");
        send.send_response(status(404, "NotFound"));
    });
    let error = node::read(&client, "node-x").await.expect_err("no node");
    api.await.expect("api server");
    assert!(error.to_string().contains("--node-name"), "{error}");
}

/// Answers a held WATCH with `events` (the body ends after them: the watcher watches again from
/// the last version, as after a server-side timeout).
fn watch_events(events: &[Value]) -> Response<Body> {
    let mut bytes = Vec::new();
    for event in events {
        bytes.extend(serde_json::to_vec(event).expect("json"));
        bytes.push(b'\n');
    }
    Response::builder()
        .body(Body::from(bytes))
        .expect("response")
}

/// The state's nodes as (name, node IP, pod CIDR) once they read as `expected` (within 5 s).
async fn nodes_become(state: &ClusterState, expected: &[(&str, &str, &str)]) {
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(name, ip, cidr)| (name.to_string(), ip.to_string(), cidr.to_string()))
        .collect();
    let read = || -> Vec<(String, String, String)> {
        state
            .read()
            .nodes
            .rows()
            .map(|peer| {
                (
                    peer.name.clone(),
                    peer.node_ip.to_string(),
                    peer.pod_cidr.to_string(),
                )
            })
            .collect()
    };
    let mut changes = state.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while read() != expected {
        assert!(
            tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_ok(),
            "the nodes are {:?}, expected {expected:?}",
            read()
        );
    }
}

#[tokio::test]
async fn the_node_watch_keeps_the_nodes_current_as_they_join_change_and_leave() {
    let (client, mut server) = mock_client();
    let state = ClusterState::new(vec![KUBERNETES_SOURCE.into()]);
    let (tasks, synced) = watch::peer_nodes(client, "node-a", state.clone());

    let (list, send) = server.next_request().await.expect("LIST nodes");
    assert_eq!(list.uri().path(), "/api/v1/nodes");
    assert!(!list
        .uri()
        .query()
        .unwrap_or_default()
        .contains("watch=true"));
    send.send_response(ok(&json!({
        "apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "10"},
        "items": [
            node_object("node-a", &["10.244.0.0/24"], Some("192.168.7.1")),
            node_object("node-b", &["10.244.1.0/24"], Some("192.168.7.2")),
            // Registered, no pod CIDR yet.
            node_object("node-c", &[], Some("192.168.7.3")),
        ],
    })));
    tokio::time::timeout(Duration::from_secs(5), synced)
        .await
        .expect("the nodes are published once listed")
        .expect("publisher alive");
    nodes_become(&state, &[("node-b", "192.168.7.2", "10.244.1.0/24")]).await;

    // An autoscaled node joins, and node-c gets its pod CIDR.
    let (watch_request, send) = server.next_request().await.expect("WATCH nodes");
    let query = watch_request.uri().query().unwrap_or_default().to_owned();
    assert!(query.contains("watch=true"), "{query}");
    assert!(query.contains("resourceVersion=10"), "{query}");
    send.send_response(watch_events(&[
        json!({"type": "ADDED", "object": node_object("gpu-7", &["10.244.7.0/24"], Some("192.168.7.7"))}),
        json!({"type": "MODIFIED", "object": node_object("node-c", &["10.244.3.0/24"], Some("192.168.7.3"))}),
    ]));
    nodes_become(
        &state,
        &[
            ("gpu-7", "192.168.7.7", "10.244.7.0/24"),
            ("node-b", "192.168.7.2", "10.244.1.0/24"),
            ("node-c", "192.168.7.3", "10.244.3.0/24"),
        ],
    )
    .await;

    // node-b leaves, gpu-7 comes back with another address.
    let (watch_request, send) = server.next_request().await.expect("WATCH nodes again");
    assert!(watch_request
        .uri()
        .query()
        .unwrap_or_default()
        .contains("watch=true"));
    send.send_response(watch_events(&[
        json!({"type": "DELETED", "object": node_object("node-b", &["10.244.1.0/24"], Some("192.168.7.2"))}),
        json!({"type": "MODIFIED", "object": node_object("gpu-7", &["10.244.7.0/24"], Some("192.168.7.77"))}),
    ]));
    nodes_become(
        &state,
        &[
            ("gpu-7", "192.168.7.77", "10.244.7.0/24"),
            ("node-c", "192.168.7.3", "10.244.3.0/24"),
        ],
    )
    .await;
    let (_held, _send) = server.next_request().await.expect("watching on");
    for task in tasks {
        task.abort();
    }
}

// --- The pod watch --------------------------------------------------------------------------

#[tokio::test]
async fn the_pod_watch_lists_and_watches_only_this_nodes_pods() {
    let (client, mut server) = mock_client();
    let changed = Arc::new(Notify::new());
    let pods = watch::local_pods(client, "node-a", Arc::clone(&changed));
    let store = pods.store.clone();
    let running = tokio::spawn(pods.task);

    let (list, send) = server.next_request().await.expect("LIST pods");
    assert_eq!(list.method(), Method::GET);
    assert_eq!(list.uri().path(), "/api/v1/pods");
    let query = list.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{query}"
    );
    assert!(!query.contains("watch=true"), "{query}");
    send.send_response(ok(&json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
        "items": [pod_object("ml", "trainer", "node-a", "10.244.0.5", json!({"app": "trainer"}))],
    })));

    let (watch_request, _held) = server.next_request().await.expect("WATCH pods");
    assert_eq!(watch_request.uri().path(), "/api/v1/pods");
    let query = watch_request.uri().query().unwrap_or_default().to_owned();
    assert!(query.contains("watch=true"), "{query}");
    assert!(
        query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{query}"
    );
    assert!(query.contains("resourceVersion=10"), "{query}");

    tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready())
        .await
        .expect("store ready")
        .expect("writer alive");
    assert_eq!(store.state().len(), 1);
    tokio::time::timeout(Duration::from_secs(5), changed.notified())
        .await
        .expect("the listing is announced as a change");
    running.abort();
}

// --- The files --------------------------------------------------------------------------------

fn sample_security_labels() -> Value {
    json!({
        "app": "trainer",
        "io.kubernetes.pod.namespace": "ml",
        "io.cilium.k8s.namespace.labels.team": "research",
    })
}

#[test]
fn the_endpoint_directory_names_local_pods_from_their_pods_and_others_from_weft_endpoints() {
    let local_pods: Vec<Arc<Pod>> = vec![
        parse(pod_object(
            "ml",
            "trainer",
            "node-a",
            "10.244.0.5",
            json!({"app": "trainer", "pod-template-hash": "abc"}),
        )),
        // No identity allocated yet: init.
        parse(pod_object(
            "ml",
            "fresh",
            "node-a",
            "10.244.0.6",
            json!({"app": "fresh"}),
        )),
    ];
    let mut host_network = pod_object("kube-system", "proxy", "node-a", "192.168.7.1", json!({}));
    host_network["spec"]["hostNetwork"] = json!(true);
    let mut finished = pod_object("ml", "job", "node-a", "10.244.0.9", json!({}));
    finished["status"]["phase"] = json!("Succeeded");
    let local_pods: Vec<Arc<Pod>> = local_pods
        .into_iter()
        .chain([parse(host_network), parse(finished)])
        .collect();
    let namespaces: Vec<Arc<Namespace>> =
        vec![parse(namespace_object("ml", json!({"team": "research"})))];
    let identities: Vec<Arc<WeftIdentity>> = vec![
        parse(identity_object(65_792, sample_security_labels())),
        parse(identity_object(
            65_793,
            json!({"app": "db", "io.kubernetes.pod.namespace": "data"}),
        )),
    ];
    let endpoints: Vec<Arc<WeftEndpoint>> = vec![
        parse(endpoint_object(
            "data",
            "db-0",
            "node-b",
            "10.244.1.7",
            65_793,
        )),
        // This node's own endpoint for a local pod: the pod's entry wins.
        parse(endpoint_object("ml", "trainer", "node-a", "10.244.0.5", 5)),
    ];
    let directory = rows::endpoint_directory(&DirectoryInputs {
        cluster: "alpha",
        node: "node-a",
        local_pods: &local_pods,
        namespaces: &namespaces,
        identities: &identities,
        endpoints: &endpoints,
    });
    let by_pod: BTreeMap<&str, &EndpointMeta> = directory
        .iter()
        .map(|meta| (meta.pod.as_str(), meta))
        .collect();
    assert_eq!(
        by_pod.keys().copied().collect::<Vec<_>>(),
        vec!["db-0", "fresh", "trainer"],
        "host-network and finished pods own no address"
    );

    let trainer = by_pod["trainer"];
    assert_eq!(
        trainer.ip,
        "10.244.0.5".parse::<std::net::Ipv4Addr>().unwrap()
    );
    assert_eq!(
        trainer.identity, 65_792,
        "the identity of its security labels"
    );
    assert_eq!(trainer.node, "node-a");
    assert_eq!(trainer.cluster, "alpha");
    assert_eq!(
        serde_json::to_value(&trainer.security_labels).unwrap(),
        sample_security_labels(),
        "pod-template-hash is not security-relevant"
    );
    assert_eq!(trainer.labels["pod-template-hash"], "abc");
    assert_eq!(trainer.named_ports["http"], ("TCP".to_owned(), 8080));
    assert_eq!(trainer.named_ports["dns"], ("UDP".to_owned(), 53));
    assert_eq!(
        by_pod["fresh"].identity, 5,
        "init until the operator allocates"
    );

    let db = by_pod["db-0"];
    assert_eq!(db.node, "node-b");
    assert_eq!(db.namespace, "data");
    assert_eq!(db.identity, 65_793);
    assert_eq!(
        db.labels,
        BTreeMap::from([("app".to_owned(), "db".to_owned())])
    );
    assert_eq!(db.security_labels["io.kubernetes.pod.namespace"], "data");
    assert_eq!(db.named_ports["grpc"], ("TCP".to_owned(), 9090));
}

/// One policy of each kind.
type Policies = (
    Vec<Arc<WeftNetworkPolicy>>,
    Vec<Arc<WeftClusterwideNetworkPolicy>>,
    Vec<Arc<NetworkPolicy>>,
);

fn policies() -> Policies {
    (
        vec![parse(json!({
            "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
            "metadata": {"name": "allow-web", "namespace": "ml", "resourceVersion": "41",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]},
            "status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Valid", "message": "",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))],
        vec![parse(json!({
            "apiVersion": "weft.io/v1alpha1", "kind": "WeftClusterwideNetworkPolicy",
            "metadata": {"name": "no-ssh"},
            "spec": {"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}]},
        }))],
        vec![parse(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "data"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }))],
    )
}

#[test]
fn the_policies_are_exactly_the_three_policy_kinds_without_volatile_fields() {
    let (weft, clusterwide, kubernetes) = policies();
    let mut objects = rows::policy_objects(&weft, &clusterwide, &kubernetes);
    objects.sort_by_key(|object| object["kind"].as_str().unwrap_or_default().to_owned());
    let kinds: Vec<&str> = objects
        .iter()
        .map(|object| object["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "NetworkPolicy",
            "WeftClusterwideNetworkPolicy",
            "WeftNetworkPolicy"
        ]
    );
    let weft_policy = &objects[2];
    assert_eq!(weft_policy["apiVersion"], "weft.io/v1alpha1");
    assert_eq!(weft_policy["metadata"]["namespace"], "ml");
    assert!(
        weft_policy.get("status").is_none(),
        "status changes are not policy changes"
    );
    assert!(weft_policy["metadata"].get("resourceVersion").is_none());
    assert!(weft_policy["metadata"].get("managedFields").is_none());
    assert_eq!(
        weft_policy["spec"]["ingress"][0]["fromEndpoints"],
        json!([{}])
    );
    assert_eq!(objects[0]["apiVersion"], "networking.k8s.io/v1");
}

#[test]
fn the_services_are_services_slices_and_global_services() {
    let services: Vec<Arc<Service>> = vec![parse(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "ml", "resourceVersion": "5"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}},
    }))];
    let slices: Vec<Arc<EndpointSlice>> = vec![parse(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "ml", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))];
    let globals: Vec<Arc<GlobalService>> = vec![parse(json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "GlobalService",
        "metadata": {"name": "web", "namespace": "ml"},
        "spec": {"serviceName": "web"},
    }))];
    let mut objects = rows::service_objects(&services, &slices, &globals);
    objects.sort_by_key(|object| object["kind"].as_str().unwrap_or_default().to_owned());
    let kinds: Vec<&str> = objects
        .iter()
        .map(|object| object["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(kinds, vec!["EndpointSlice", "GlobalService", "Service"]);
    assert_eq!(
        objects[2]["status"]["loadBalancer"]["ingress"][0]["ip"], "203.0.113.10",
        "load-balancer addresses are in the status"
    );
    // The agent's service model reads these rows as it reads the sandbox's.
    let (model, problems) = weft_crds::service_model::services_from_objects(&objects, 1);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(model.len(), 1);
}

/// A fake API server that answers every LIST from `lists` (by path) and holds every WATCH
/// open; returns the URIs it was asked.
fn serve_lists(
    mut server: ApiServer,
    lists: BTreeMap<&'static str, Value>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut asked = Vec::new();
        let mut held = Vec::new();
        while let Ok(Some((request, send))) =
            tokio::time::timeout(Duration::from_secs(3), server.next_request()).await
        {
            let uri = request.uri().clone();
            asked.push(uri.to_string());
            if uri.query().unwrap_or_default().contains("watch=true") {
                held.push(send);
                continue;
            }
            let items = lists.get(uri.path()).cloned().unwrap_or_else(|| json!([]));
            send.send_response(ok(&json!({
                "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "100"},
                "items": items,
            })));
        }
        asked
    })
}

#[tokio::test]
async fn the_watches_publish_the_engines_tables_once_everything_is_listed() {
    let (client, server) = mock_client();
    let (weft, clusterwide, kubernetes) = policies();
    let lists = BTreeMap::from([
        (
            "/api/v1/nodes",
            json!([
                node_object("node-a", &["10.244.0.0/24"], Some("192.168.7.1")),
                node_object("node-b", &["10.244.1.0/24"], Some("192.168.7.2")),
            ]),
        ),
        (
            "/api/v1/pods",
            json!([pod_object(
                "ml",
                "trainer",
                "node-a",
                "10.244.0.5",
                json!({"app": "trainer"})
            )]),
        ),
        (
            "/api/v1/namespaces",
            json!([namespace_object("ml", json!({"team": "research"}))]),
        ),
        (
            "/apis/weft.io/v1alpha1/weftidentities",
            json!([identity_object(65_792, sample_security_labels())]),
        ),
        (
            "/apis/weft.io/v1alpha1/weftendpoints",
            json!([endpoint_object(
                "data",
                "db-0",
                "node-b",
                "10.244.1.7",
                65_793
            )]),
        ),
        ("/apis/weft.io/v1alpha1/weftnetworkpolicies", list_of(&weft)),
        (
            "/apis/weft.io/v1alpha1/weftclusterwidenetworkpolicies",
            list_of(&clusterwide),
        ),
        (
            "/apis/networking.k8s.io/v1/networkpolicies",
            list_of(&kubernetes),
        ),
        (
            "/api/v1/services",
            json!([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ml"},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}]),
        ),
    ]);
    let api = serve_lists(server, lists);
    let state = ClusterState::new(vec![KUBERNETES_SOURCE.into()]);
    let mut watches = watch::start(
        client,
        watch::WatchSettings {
            cluster: "alpha".into(),
            node: "node-a".into(),
            state: state.clone(),
        },
    );
    tokio::time::timeout(Duration::from_secs(10), watches.synced())
        .await
        .expect("every table published");
    assert!(state.synced(), "the engines may act");

    {
        let tables = state.read();
        let mut pods: Vec<(&str, u32)> = tables
            .endpoints
            .rows()
            .map(|meta| (meta.pod.as_str(), meta.identity))
            .collect();
        pods.sort();
        assert_eq!(pods, vec![("db-0", 65_793), ("trainer", 65_792)]);
        assert_eq!(tables.local_pods.len(), 1, "this node's pod by name");
        assert_eq!(tables.policies.len(), 3);
        let services: Vec<&Value> = tables.services.rows().map(|row| &row.0).collect();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0]["kind"], "Service");
        let nodes: Vec<Value> = tables
            .nodes
            .rows()
            .map(|node| serde_json::to_value(node).expect("JSON"))
            .collect();
        assert_eq!(
            nodes,
            [json!({"name": "node-b", "nodeIP": "192.168.7.2", "podCIDR": "10.244.1.0/24"})]
        );
    }

    for task in &watches.tasks {
        task.abort();
    }
    let asked = api.await.expect("api server");
    assert!(
        asked
            .iter()
            .filter(|uri| uri.starts_with("/api/v1/pods"))
            .all(|uri| uri.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{asked:?}"
    );
}

// --- WeftEndpoints ------------------------------------------------------------------------------

fn record(namespace: &str, name: &str, ip: &str, identity: u32) -> EndpointRecord {
    EndpointRecord {
        container_id: format!("c-{name}"),
        pod: PodRef {
            namespace: namespace.into(),
            name: name.into(),
        },
        ip: ip.parse().unwrap(),
        host_veth: format!("wc{name}"),
        host_ifindex: 42,
        host_mac: [2, 0, 0, 0, 0, 1],
        pod_mac: [2, 0, 0, 0, 0, 2],
        netns: "/var/run/netns/x".into(),
        identity,
    }
}

#[tokio::test]
async fn a_weft_endpoint_is_server_side_applied_and_owned_by_its_pod() {
    let (client, mut server) = mock_client();
    let pod: Pod = serde_json::from_value(pod_object(
        "ml",
        "trainer",
        "node-a",
        "10.244.0.5",
        json!({"app": "trainer"}),
    ))
    .unwrap();
    let desired = endpoints::desired_endpoint(
        &record("ml", "trainer", "10.244.0.5", 65_792),
        &pod,
        "node-a",
    );
    let api = tokio::spawn(async move {
        let (request, send) = server.next_request().await.expect("PATCH");
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().to_string(),
            "/apis/weft.io/v1alpha1/namespaces/ml/weftendpoints/trainer?&force=true&fieldManager=weft-agent"
        );
        assert_eq!(
            request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/apply-patch+yaml")
        );
        let body = body_of(request).await;
        send.send_response(ok(&body));
        body
    });
    endpoints::apply(&client, &desired).await.expect("applied");
    let body = api.await.expect("api server");
    assert_eq!(body["apiVersion"], "weft.io/v1alpha1");
    assert_eq!(body["kind"], "WeftEndpoint");
    assert_eq!(body["metadata"]["name"], "trainer");
    assert_eq!(body["metadata"]["namespace"], "ml");
    assert_eq!(
        body["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "trainer", "uid": "uid-trainer"}])
    );
    assert_eq!(
        body["spec"],
        json!({
            "ips": ["10.244.0.5"],
            "identity": 65_792,
            "nodeName": "node-a",
            "namedPorts": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        })
    );
    // What is sent is a valid WeftEndpoint.
    let _: WeftEndpoint = serde_json::from_value(body).expect("a WeftEndpoint");
}

/// The next request, which must be a server-side apply to `uri_path`; answered with its body.
async fn expect_apply(server: &mut ApiServer, uri_path: &str) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .expect("a request within 5 s")
        .expect("PATCH");
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(request.uri().path(), uri_path);
    let query = request.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("fieldManager=weft-agent") && query.contains("force=true"),
        "{query}"
    );
    let body = body_of(request).await;
    // The API server answers with the whole object, also for a status write.
    let mut object = endpoint_object("ml", "trainer", "node-a", "10.244.0.5", 5);
    for part in ["spec", "status"] {
        if let Some(value) = body.get(part) {
            object[part] = value.clone();
        }
    }
    send.send_response(ok(&object));
    body
}

/// A written status's condition `type_` as (status, reason).
fn condition(status: &Value, type_: &str) -> (String, String) {
    let found = status["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} in {status}"));
    (
        found["status"].as_str().unwrap_or_default().to_owned(),
        found["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn write_report(path: &std::path::Path, report: &weft_agent::policy::EnforcementReport) {
    std::fs::write(path, serde_json::to_vec(report).unwrap()).unwrap();
}

#[tokio::test]
async fn a_wired_pod_gets_its_weft_endpoint_with_its_enforcement_and_loses_it_when_released() {
    use weft_agent::policy::{EnforcementReport, Isolation};
    const OBJECT: &str = "/apis/weft.io/v1alpha1/namespaces/ml/weftendpoints/trainer";
    const STATUS: &str = "/apis/weft.io/v1alpha1/namespaces/ml/weftendpoints/trainer/status";
    let (client, mut server) = mock_client();
    let records = tempfile::tempdir().expect("tempdir");
    let report = records.path().join("policy-enforcement.json");
    let (pods, mut pod_writer) = reflector::store::<Pod>();
    pod_writer.apply_watcher_event(&Event::Apply(
        serde_json::from_value(pod_object(
            "ml",
            "trainer",
            "node-a",
            "10.244.0.5",
            json!({}),
        ))
        .unwrap(),
    ));
    let (endpoint_store, mut endpoint_writer) = reflector::store::<WeftEndpoint>();
    // Another node's endpoint is never touched.
    endpoint_writer.apply_watcher_event(&Event::Apply(
        serde_json::from_value(endpoint_object("data", "db-0", "node-b", "10.244.1.7", 300))
            .unwrap(),
    ));
    let publisher = endpoints::Publisher {
        client,
        node: "node-a".into(),
        records_dir: records.path().to_owned(),
        pods,
        endpoints: endpoint_store,
        report: report.clone(),
    };
    let mut applied = endpoints::Published::default();

    // CNI ADD wrote the record: the endpoint is applied, then its status, waiting for its
    // identity.
    let record_path = records.path().join("c-trainer.json");
    std::fs::write(
        &record_path,
        serde_json::to_vec(&record("ml", "trainer", "10.244.0.5", 5)).unwrap(),
    )
    .unwrap();
    let api = tokio::spawn(async move {
        let body = expect_apply(&mut server, OBJECT).await;
        assert_eq!(
            body["spec"]["identity"], 5,
            "init until an identity is assigned"
        );
        let body = expect_apply(&mut server, STATUS).await;
        assert!(body.get("spec").is_none(), "a status write carries no spec");
        let status = &body["status"];
        assert_eq!(status["state"], "waiting-for-identity");
        assert_eq!(
            condition(status, "Ready"),
            ("False".into(), "WaitingForIdentity".into())
        );
        assert_eq!(condition(status, "Reconciling").0, "True");
        assert_eq!(condition(status, "Valid").0, "True");
        server
    });
    publisher.pass(&mut applied).await;
    let mut server = api.await.expect("api server");

    // Nothing changed: nothing is written.
    publisher.pass(&mut applied).await;
    let nothing = tokio::time::timeout(Duration::from_millis(100), server.next_request()).await;
    assert!(
        nothing.is_err(),
        "an unchanged endpoint is not applied again"
    );

    // The identity arrives and the node enforces a policy isolating the pod's ingress.
    std::fs::write(
        &record_path,
        serde_json::to_vec(&record("ml", "trainer", "10.244.0.5", 65_792)).unwrap(),
    )
    .unwrap();
    let isolated = EnforcementReport {
        problem: None,
        endpoints: [(
            "10.244.0.5".parse().unwrap(),
            Isolation {
                ingress: true,
                egress: false,
            },
        )]
        .into(),
        full_maps: Vec::new(),
    };
    write_report(&report, &isolated);
    let api = tokio::spawn(async move {
        let body = expect_apply(&mut server, OBJECT).await;
        assert_eq!(body["spec"]["identity"], 65_792);
        let body = expect_apply(&mut server, STATUS).await;
        let status = &body["status"];
        assert_eq!(status["state"], "ready");
        assert_eq!(
            status["enforcement"],
            json!({"ingress": true, "egress": false})
        );
        assert_eq!(
            condition(status, "Ready"),
            ("True".into(), "Enforced".into())
        );
        server
    });
    publisher.pass(&mut applied).await;
    let mut server = api.await.expect("api server");

    // The node cannot enforce the cluster's policies as written: said in the status only.
    write_report(
        &report,
        &EnforcementReport {
            problem: Some("the policies do not compile (1100 peer selectors)".into()),
            ..isolated.clone()
        },
    );
    let api = tokio::spawn(async move {
        let body = expect_apply(&mut server, STATUS).await;
        let status = &body["status"];
        assert_eq!(
            condition(status, "Ready"),
            ("False".into(), "PolicyNotEnforced".into())
        );
        assert_eq!(
            condition(status, "Stalled"),
            ("True".into(), "PolicyNotEnforced".into())
        );
        assert_eq!(condition(status, "Valid").0, "True");
        let message = status["conditions"][1]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.contains("1100 peer selectors"), "{message}");
        server
    });
    publisher.pass(&mut applied).await;
    let mut server = api.await.expect("api server");

    // A map the endpoint's policy needs is full: said as MapFull, naming the map and its flag.
    // A full service map is not the endpoint's problem.
    let mut pressure = weft_agent::map_pressure::MapPressure::default();
    let full_maps = vec![
        pressure.refused("policy_entries", Some(64)),
        pressure.refused("lb_backends", Some(16)),
    ];
    write_report(
        &report,
        &EnforcementReport {
            problem: None,
            full_maps,
            ..isolated.clone()
        },
    );
    let api = tokio::spawn(async move {
        let body = expect_apply(&mut server, STATUS).await;
        let status = &body["status"];
        assert_eq!(
            condition(status, "Ready"),
            ("False".into(), "MapFull".into())
        );
        assert_eq!(
            condition(status, "Stalled"),
            ("True".into(), "MapFull".into())
        );
        let message = status["conditions"][1]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("map policy_entries (64 entries) is full")
                && message.contains("--map-entries policy_entries=N")
                && !message.contains("lb_backends"),
            "{message}"
        );
        server
    });
    publisher.pass(&mut applied).await;
    let mut server = api.await.expect("api server");

    // CNI DEL removed the record: the endpoint is deleted.
    std::fs::remove_file(&record_path).unwrap();
    let api = tokio::spawn(async move {
        let (request, send) = server.next_request().await.expect("DELETE");
        assert_eq!(request.method(), Method::DELETE);
        assert_eq!(request.uri().path(), OBJECT);
        send.send_response(status(404, "NotFound"));
        tokio::time::timeout(Duration::from_millis(100), server.next_request())
            .await
            .is_err()
    });
    publisher.pass(&mut applied).await;
    assert!(
        api.await.expect("api server"),
        "only one request: db-0 is not ours"
    );
    assert!(applied.is_empty());
}

#[tokio::test]
async fn an_endpoint_left_by_an_earlier_run_is_deleted_only_if_it_is_still_this_nodes() {
    let (client, mut server) = mock_client();
    let records = tempfile::tempdir().expect("tempdir");
    let (pods, _pod_writer) = reflector::store::<Pod>();
    let (endpoint_store, mut endpoint_writer) = reflector::store::<WeftEndpoint>();
    endpoint_writer.apply_watcher_event(&Event::Apply(
        serde_json::from_value(endpoint_object("ml", "gone", "node-a", "10.244.0.8", 300)).unwrap(),
    ));
    let publisher = endpoints::Publisher {
        client,
        node: "node-a".into(),
        records_dir: records.path().to_owned(),
        pods,
        endpoints: endpoint_store,
        report: records.path().join("policy-enforcement.json"),
    };
    let api = tokio::spawn(async move {
        let (request, send) = server.next_request().await.expect("DELETE");
        assert_eq!(request.method(), Method::DELETE);
        let body = body_of(request).await;
        send.send_response(status(409, "Conflict"));
        body
    });
    publisher.pass(&mut endpoints::Published::default()).await;
    let body = api.await.expect("api server");
    assert_eq!(
        body["preconditions"]["uid"], "wep-gone",
        "a recreated object of the same name is not deleted"
    );
}

// --- CNI install ----------------------------------------------------------------------------

#[test]
fn cni_install_writes_the_conflist_and_the_plugin_binary() {
    let source = tempfile::tempdir().expect("tempdir");
    let conf_dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let binary = source.path().join("weft-cni");
    std::fs::write(&binary, b"#!/bin/true\n").unwrap();

    let installed = cni_install::install_binary(&binary, bin_dir.path()).expect("binary");
    assert_eq!(installed, bin_dir.path().join("weft-cni"));
    assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/true\n");
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // Installing again (an agent restart) changes nothing.
    cni_install::install_binary(&binary, bin_dir.path()).expect("again");

    let conf = cni_install::install_conflist(
        conf_dir.path(),
        cni_install::DEFAULT_CONF_NAME,
        std::path::Path::new("/run/weft/cni.sock"),
    )
    .expect("conflist");
    assert_eq!(conf, conf_dir.path().join("05-weft.conflist"));
    let conflist: Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    assert_eq!(
        conflist,
        json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "plugins": [{"type": "weft-cni", "agentSocket": "/run/weft/cni.sock"}],
        })
    );
    // The plugin reads its entry as it would from the runtime.
    let entry: weft_agent::cni::plugin::NetConf = serde_json::from_value(json!({
        "cniVersion": conflist["cniVersion"],
        "name": conflist["name"],
        "type": conflist["plugins"][0]["type"],
        "agentSocket": conflist["plugins"][0]["agentSocket"],
    }))
    .expect("plugin config");
    assert_eq!(
        entry.agent_socket.as_deref(),
        Some(std::path::Path::new("/run/weft/cni.sock"))
    );
    for dir in [conf_dir.path(), bin_dir.path()] {
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            1,
            "no temporary file is left in {}",
            dir.display()
        );
    }
}

/// CNI ADD waits for a new pod's identity by name: the local pods file lists this node's pods
/// whether or not they have an address yet, with the identity of their security labels.
#[test]
fn the_local_pods_file_names_this_nodes_pods_with_their_identities_before_they_have_addresses() {
    let mut waiting = pod_object("ml", "trainer", "node-a", "", json!({"app": "trainer"}));
    waiting["status"] = json!({"phase": "Pending"});
    let fresh = pod_object("ml", "fresh", "node-a", "", json!({"app": "fresh"}));
    let elsewhere = pod_object(
        "ml",
        "other",
        "node-b",
        "10.244.1.3",
        json!({"app": "trainer"}),
    );
    let mut host_network = pod_object("kube-system", "proxy", "node-a", "192.168.7.1", json!({}));
    host_network["spec"]["hostNetwork"] = json!(true);
    let pods: Vec<Arc<Pod>> = [waiting, fresh, elsewhere, host_network]
        .into_iter()
        .map(parse)
        .collect();
    let namespaces: Vec<Arc<Namespace>> =
        vec![parse(namespace_object("ml", json!({"team": "research"})))];
    let identities: Vec<Arc<WeftIdentity>> =
        vec![parse(identity_object(65_792, sample_security_labels()))];

    let local = rows::local_pods("node-a", &pods, &namespaces, &identities);
    let names: Vec<&str> = local.iter().map(|pod| pod.pod.as_str()).collect();
    assert_eq!(
        names,
        vec!["fresh", "trainer"],
        "this node's pods, host-network ones left out"
    );
    let trainer = &local[1];
    assert_eq!(
        trainer.identity, 65_792,
        "allocated before it has an address"
    );
    assert!(trainer.resolved());
    assert_eq!(
        serde_json::to_value(&trainer.security_labels).unwrap(),
        sample_security_labels()
    );
    assert_eq!(trainer.named_ports["dns"], ("UDP".to_owned(), 53));
    assert!(
        !local[0].resolved(),
        "no identity allocated yet: init, and ADD waits"
    );
}
