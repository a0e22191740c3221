//! A Kubernetes API server for `weftctl`'s read-only commands: a kube `Client` over a
//! `tower_test` mock, answered from fixtures as the real server answers LIST requests —
//! field selectors (`metadata.name`, `metadata.namespace`, `status.podIP`, others refused
//! with 400 as the server does), pages of at most two items with `continue` tokens, 404 for
//! kinds it does not serve. Every request is recorded (path and decoded query).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

/// What the server holds.
#[derive(Clone, Debug, Default)]
pub struct Fixtures {
    pub namespaces: Vec<Value>,
    pub pods: Vec<Value>,
    pub weft_policies: Vec<Value>,
    pub clusterwide_policies: Vec<Value>,
    pub network_policies: Vec<Value>,
    pub weft_endpoints: Vec<Value>,
    /// Whether Weft's CRDs are installed (the Weft kinds are served).
    pub without_crds: bool,
}

/// The requests the server received, as `path?query` with the query decoded.
#[derive(Clone, Default)]
pub struct Recorded(Arc<Mutex<Vec<String>>>);

impl Recorded {
    pub fn requests(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
}

/// Answers at most this many items per page, whatever `limit` asks (the server may).
const PAGE: usize = 2;

/// A client whose requests the fixtures answer, until the client is dropped.
pub fn serve(fixtures: Fixtures) -> (Client, Recorded) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let recorded = Recorded::default();
    let log = recorded.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            assert_eq!(request.method(), http::Method::GET, "weftctl only reads");
            let path = request.uri().path().to_owned();
            let query = decode(request.uri().query().unwrap_or_default());
            log.0
                .lock()
                .expect("lock")
                .push(format!("{path}?{}", query_string(&query)));
            let (status, body) = answer(&fixtures, &path, &query);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        }
    });
    (Client::new(service, "default"), recorded)
}

fn answer(fixtures: &Fixtures, path: &str, query: &[(String, String)]) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (objects, kind, namespace): (&[Value], &str, Option<&str>) = match segments.as_slice() {
        ["api", "v1", "pods"] => (&fixtures.pods, "PodList", None),
        ["api", "v1", "namespaces", namespace, "pods"] => {
            (&fixtures.pods, "PodList", Some(*namespace))
        }
        ["api", "v1", "namespaces"] => (&fixtures.namespaces, "NamespaceList", None),
        ["apis", "networking.k8s.io", "v1", "networkpolicies"] => {
            (&fixtures.network_policies, "NetworkPolicyList", None)
        }
        ["apis", "weft.io", "v1alpha1", "weftnetworkpolicies"] if !fixtures.without_crds => {
            (&fixtures.weft_policies, "WeftNetworkPolicyList", None)
        }
        ["apis", "weft.io", "v1alpha1", "weftendpoints"] if !fixtures.without_crds => {
            (&fixtures.weft_endpoints, "WeftEndpointList", None)
        }
        ["apis", "weft.io", "v1alpha1", "weftclusterwidenetworkpolicies"]
            if !fixtures.without_crds =>
        {
            (
                &fixtures.clusterwide_policies,
                "WeftClusterwideNetworkPolicyList",
                None,
            )
        }
        _ => {
            return (
                404,
                failure(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )
        }
    };
    let mut selected: Vec<&Value> = objects
        .iter()
        .filter(|o| namespace.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        .collect();
    if let Some((_, selector)) = query.iter().find(|(k, _)| k == "fieldSelector") {
        for term in selector.split(',') {
            let (field, value, equal) = match term.split_once("!=") {
                Some((field, value)) => (field, value, false),
                None => match term.split_once('=') {
                    Some((field, value)) => (field, value.trim_start_matches('='), true),
                    None => return (400, failure(400, "BadRequest", "invalid field selector")),
                },
            };
            let pointer = match field {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                "status.podIP" if kind == "PodList" => "/status/podIP",
                _ => {
                    return (
                        400,
                        failure(
                            400,
                            "BadRequest",
                            &format!("field label not supported: {field}"),
                        ),
                    )
                }
            };
            selected
                .retain(|o| (o.pointer(pointer).and_then(Value::as_str) == Some(value)) == equal);
        }
    }
    let offset: usize = query
        .iter()
        .find(|(k, _)| k == "continue")
        .map(|(_, v)| v.parse().expect("a token this server gave"))
        .unwrap_or(0);
    let page: Vec<Value> = selected
        .iter()
        .skip(offset)
        .take(PAGE)
        .map(|o| (*o).clone())
        .collect();
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": "100"});
    if next < selected.len() {
        metadata["continue"] = json!(next.to_string());
    }
    (
        200,
        json!({"kind": kind, "apiVersion": "v1", "metadata": metadata, "items": page}),
    )
}

/// A `metav1.Status` failure body.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn decode(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (unescape(key), unescape(value))
        })
        .collect()
}

fn query_string(query: &[(String, String)]) -> String {
    query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).expect("utf-8")
}

// --- Objects --------------------------------------------------------------------------------

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A running pod with its container ports (`(name, port)`, TCP).
pub fn pod(
    namespace: &str,
    name: &str,
    labels: Value,
    node: (&str, &str),
    ip: &str,
    ports: &[(&str, u16)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node.0, "containers": [{"name": "main", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "hostIP": node.1, "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}
