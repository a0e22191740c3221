//! Every object in `docs/examples/valid`, driven through the operator's own reconcilers against a
//! scripted API server: the closest offline stand-in for "the operator, run against an API
//! server with the CRDs applied". Each example gets a fresh server that answers what its
//! reconciler reads (a Service for a GlobalService, a TLS Secret for a ClusterPeering, a 404 for
//! the pod of a WeftEndpoint) and takes the status the operator server-side applies to
//! `/status`, which must say:
//!
//! - `Valid=True`, `Ready=True`, `Reconciling=False`, `Stalled=False`, every condition and the
//!   status stamped with the object's `metadata.generation`: every valid example, except
//! - policies using L7 rules (`toPorts[].rules`) or `toFQDNs`, which this version cannot
//!   enforce: they apply without those parts (which allow nothing), so `Valid=True`,
//!   `Ready=False` and `Stalled=True` with reason `PartlyEnforced`, the message naming every
//!   such field. They are found by their content, not by file name.
//! - A WeftEndpoint gets no status from the operator (its agent writes it); the operator's
//!   garbage collection deletes one whose pod does not exist, which is what is asserted.
//!
//! A kind this test cannot drive fails it, and so does a Weft kind without a valid example.
//! Allocating an identity for a pod and materialising a GlobalService from an annotated Service
//! are covered by `identity.rs` (`a_new_pod_gets_a_weft_identity_created_with_a_post`) and
//! `global_service_controller.rs`
//! (`an_annotated_service_gets_an_owned_global_service_by_server_side_apply`).

mod apiserver_mock;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use apiserver_mock::{client, status, stored, ApiServer, Exchange};
use http::Method;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use weft_core::cluster::{ClusterId, ClusterName};
use weft_crds::validate::parse_documents;
use weft_crds::{WeftClusterwideNetworkPolicy, WeftEndpoint, WeftIdentity, WeftNetworkPolicy};
use weft_operator::identity_controller::{self, IdentityConfig, IdentityIndex};
use weft_operator::identity_gc::collect_garbage;
use weft_operator::metrics::Metrics;
use weft_operator::peering_controller::{self, PeeringSettings};
use weft_operator::policy_controller::{self, PolicyObject};
use weft_operator::{bandwidth_controller, global_service_controller};

/// What the server-side apply of a status is sent with.
const APPLY: &str = "?&force=true&fieldManager=weft-operator";
/// The generation given to examples that carry none (they never do: the API server sets it).
const GENERATION: i64 = 3;
/// This cluster. The WeftIdentity example's 65792 is local number 256 of cluster 1.
const CLUSTER_ID: u64 = 1;
const CLUSTER_NAME: &str = "gpu-central";
/// The namespace Weft runs in.
const WEFT_NAMESPACE: &str = "weft-system";

// ------------------------------------------------------------------ the examples

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/valid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

/// One object of one example file, as the API server would hand it to the operator: with a
/// uid, a resourceVersion and a generation.
struct Example {
    file: String,
    object: Value,
}

impl Example {
    fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> Option<&str> {
        self.object["metadata"]["namespace"].as_str()
    }

    fn generation(&self) -> i64 {
        self.object["metadata"]["generation"]
            .as_i64()
            .expect("a generation")
    }

    fn label(&self) -> String {
        let name = match self.namespace() {
            Some(namespace) => format!("{namespace}/{}", self.name()),
            None => self.name().to_owned(),
        };
        format!("{} ({} {name})", self.file, self.kind())
    }
}

fn examples() -> Vec<Example> {
    let mut examples = Vec::new();
    for path in example_files() {
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).expect("read example");
        let documents = parse_documents(&text)
            .unwrap_or_else(|error| panic!("{file} is not valid YAML: {error}"));
        assert!(!documents.is_empty(), "{file} holds no object");
        for (index, mut object) in documents.into_iter().enumerate() {
            let uid = format!("00000000-0000-4000-8000-{:08}{index:04}", examples.len());
            if object["metadata"].get("generation").is_none() {
                object["metadata"]["generation"] = json!(GENERATION);
            }
            let object = stored(object, &uid, "1000");
            examples.push(Example {
                file: file.clone(),
                object,
            });
        }
    }
    examples
}

/// Where a kind lives: its plural and whether it is namespaced, from the CRDs themselves.
fn resources() -> &'static BTreeMap<String, (String, bool)> {
    static RESOURCES: LazyLock<BTreeMap<String, (String, bool)>> = LazyLock::new(|| {
        weft_crds::manifests::all()
            .into_iter()
            .map(|crd| {
                (
                    crd.spec.names.kind,
                    (crd.spec.names.plural, crd.spec.scope == "Namespaced"),
                )
            })
            .collect()
    });
    &RESOURCES
}

/// The URI of the server-side apply of `example`'s status.
fn status_uri(example: &Example) -> String {
    let (plural, namespaced) = resources()
        .get(example.kind())
        .unwrap_or_else(|| panic!("{} is not a Weft kind", example.kind()));
    let group = format!("/apis/{}/{}", weft_crds::GROUP, weft_crds::VERSION);
    match (*namespaced, example.namespace()) {
        (true, Some(namespace)) => format!(
            "{group}/namespaces/{namespace}/{plural}/{}/status{APPLY}",
            example.name()
        ),
        (true, None) => panic!("{}: a namespaced object without a namespace", example.file),
        (false, _) => format!("{group}/{plural}/{}/status{APPLY}", example.name()),
    }
}

/// The fields of a policy this version cannot enforce: L7 rules (`toPorts[].rules`) and
/// `toFQDNs`, wherever they occur in the spec, as paths like `spec.egress[1].toFQDNs`.
fn unenforceable_fields(object: &Value) -> Vec<String> {
    fn walk(value: &Value, path: &str, in_ports: bool, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let child_path = format!("{path}.{key}");
                    if key == "toFQDNs" || (in_ports && key == "rules") {
                        found.push(child_path);
                    } else {
                        walk(child, &child_path, key == "toPorts", found);
                    }
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{index}]"), in_ports, found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(&object["spec"], "spec", false, &mut found);
    found
}

/// What the operator must do with an example.
#[derive(Debug)]
enum Expected {
    /// `Valid=True`, `Ready=True`, current.
    Ready,
    /// `Valid=True`, `Ready=False` and `Stalled=True` (`PartlyEnforced`), naming these fields.
    PartlyEnforced(Vec<String>),
    /// No status; deleted by garbage collection because its pod does not exist.
    Collected,
}

fn expected(example: &Example) -> Expected {
    match example.kind() {
        "WeftEndpoint" => Expected::Collected,
        "WeftNetworkPolicy" | "WeftClusterwideNetworkPolicy" => {
            let unenforceable = unenforceable_fields(&example.object);
            if unenforceable.is_empty() {
                Expected::Ready
            } else {
                Expected::PartlyEnforced(unenforceable)
            }
        }
        _ => Expected::Ready,
    }
}

// ------------------------------------------------------------------ serving one reconcile

/// What the operator did with one example.
#[derive(Debug, Default)]
struct Observed {
    /// The `status` of its server-side apply to `/status`, if it made one.
    status: Option<Value>,
    /// Every request but status applies and Events, as `METHOD path`.
    requests: Vec<String>,
    /// The Events it published.
    events: Vec<Value>,
    /// What garbage collection reports deleting (`namespace/name`).
    deleted: Vec<String>,
}

/// Serves `task`'s requests until it finishes: a status apply must go to `example`'s `/status`
/// (answered with the object carrying it), Events are accepted, everything else goes to
/// `answer`.
async fn serve<T: Send + 'static>(
    mut server: ApiServer,
    example: &Example,
    mut task: JoinHandle<T>,
    mut answer: impl FnMut(Exchange),
) -> (T, Observed) {
    let mut observed = Observed::default();
    let status_uri = status_uri(example);
    loop {
        tokio::select! {
            biased;
            done = &mut task => return (done.expect("the reconciler does not panic"), observed),
            request = server.next_within(Duration::from_secs(10)) => {
                let exchange = request.expect("a request or the end of the reconcile within 10 s");
                if exchange.method == Method::POST && exchange.path.ends_with("/events") {
                    let event = exchange.body.clone();
                    observed.events.push(event.clone());
                    exchange.respond(201, event);
                } else if exchange.method == Method::PATCH && exchange.path.ends_with("/status") {
                    let apply = exchange.expect_request(Method::PATCH, &status_uri).expect_apply();
                    assert!(apply.body.get("spec").is_none(), "never writes the spec");
                    assert_eq!(apply.body["kind"], example.object["kind"], "kind");
                    assert_eq!(apply.body["apiVersion"], example.object["apiVersion"], "apiVersion");
                    assert!(observed.status.is_none(), "one status apply, got a second: {}", apply.body);
                    observed.status = Some(apply.body["status"].clone());
                    apply.respond_with_status(example.object.clone());
                } else {
                    observed.requests.push(format!("{} {}", exchange.method, exchange.path));
                    answer(exchange);
                }
            }
        }
    }
}

fn unexpected(exchange: Exchange) {
    panic!(
        "unexpected request {} {} {}",
        exchange.method, exchange.uri, exchange.body
    );
}

/// A store holding `objects`, complete (as after the first list).
fn store<K>(objects: Vec<Value>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        writer.apply_watcher_event(&Event::InitApply(
            serde_json::from_value(object).expect("object"),
        ));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

fn typed<K: serde::de::DeserializeOwned>(example: &Example) -> K {
    serde_json::from_value(example.object.clone())
        .unwrap_or_else(|error| panic!("{} does not deserialise: {error}", example.file))
}

// ------------------------------------------------------------------ the cluster around them

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-ns-{name}"), "resourceVersion": "2",
                     "labels": {"kubernetes.io/metadata.name": name}},
    })
}

fn pod(namespace: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-pod-{name}"),
                     "labels": labels, "resourceVersion": "5"},
        "spec": {"containers": [{"name": "main", "image": "example"}], "nodeName": "gpu-node-a100-03"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// The namespaces the examples talk about, for the policy controller's complete caches.
fn namespaces() -> Vec<Value> {
    [
        "default",
        "inference",
        "kube-system",
        "monitoring",
        "training",
    ]
    .into_iter()
    .map(namespace)
    .collect()
}

/// A few pods of the kinds the examples are about, so that counts mean something.
fn pods() -> Vec<Value> {
    vec![
        pod(
            "training",
            "trainer-1",
            json!({"app": "trainer"}),
            "10.244.3.18",
        ),
        pod(
            "inference",
            "model-server-0",
            json!({"app": "model-server"}),
            "10.244.3.30",
        ),
        pod(
            "kube-system",
            "nvidia-device-plugin-x7k2p",
            json!({"app.kubernetes.io/component": "nvidia-device-plugin"}),
            "10.244.3.40",
        ),
    ]
}

/// A CA and a client certificate naming this cluster as the peering controller requires
/// (`remote-<cluster name>`), as (ca.crt, tls.crt, tls.key) PEM.
fn peering_tls() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name.push(DnType::CommonName, "mesh ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = date_time_ymd(2020, 1, 1);
    ca.not_after = date_time_ymd(2200, 1, 1);
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(
        DnType::CommonName,
        peering_controller::client_certificate_name(&cluster_name()),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2200, 1, 1);
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    (ca_pem, cert.pem(), key.serialize_pem())
}

fn cluster_name() -> ClusterName {
    ClusterName::new(CLUSTER_NAME).expect("cluster name")
}

fn base64(text: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec()))
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .expect("base64")
}

fn identity_context(
    client: kube::Client,
    endpoints: Vec<Value>,
    identities: Vec<WeftIdentity>,
) -> Arc<identity_controller::Context> {
    let index = Arc::new(IdentityIndex::new());
    index.apply(&Event::Init);
    for identity in identities {
        index.apply(&Event::InitApply(identity));
    }
    index.apply(&Event::InitDone);
    Arc::new(identity_controller::Context::new(
        client,
        IdentityConfig::new(ClusterId::new(CLUSTER_ID).expect("cluster ID")),
        store::<Pod>(vec![]),
        store::<Namespace>(namespaces()),
        store::<WeftEndpoint>(endpoints),
        index,
        Metrics::unregistered(),
    ))
}

// ------------------------------------------------------------------ one driver per kind

/// The kinds this test drives.
const DRIVEN: [&str; 7] = [
    "WeftNetworkPolicy",
    "WeftClusterwideNetworkPolicy",
    "BandwidthClass",
    "GlobalService",
    "ClusterPeering",
    "WeftIdentity",
    "WeftEndpoint",
];

async fn drive(example: Arc<Example>) -> Observed {
    match example.kind() {
        "WeftNetworkPolicy" => drive_policy::<WeftNetworkPolicy>(&example).await,
        "WeftClusterwideNetworkPolicy" => {
            drive_policy::<WeftClusterwideNetworkPolicy>(&example).await
        }
        "BandwidthClass" => {
            let (client, server) = client();
            let ctx = Arc::new(bandwidth_controller::Context::new(client));
            let task = tokio::spawn(bandwidth_controller::reconcile(
                Arc::new(typed(&example)),
                ctx,
            ));
            let (result, observed) = serve(server, &example, task, unexpected).await;
            result.expect("reconcile");
            observed
        }
        "GlobalService" => {
            let (client, server) = client();
            let ctx = Arc::new(global_service_controller::Context::new(
                client,
                store(vec![]),
            ));
            let task = tokio::spawn(global_service_controller::reconcile_status(
                Arc::new(typed(&example)),
                ctx,
            ));
            let namespace = example.namespace().unwrap_or("default").to_owned();
            let target = example.object["spec"]["serviceName"]
                .as_str()
                .expect("spec.serviceName")
                .to_owned();
            let services = format!("/api/v1/namespaces/{namespace}/services/");
            let (result, observed) = serve(server, &example, task, |exchange| {
                let name = exchange
                    .path
                    .strip_prefix(&services)
                    .filter(|_| exchange.method == Method::GET)
                    .map(str::to_owned);
                match name {
                    // The Service the GlobalService names exists (not annotated global).
                    Some(name) if name == target => exchange.respond(
                        200,
                        json!({
                            "apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": name, "namespace": namespace, "uid": "uid-svc",
                                         "resourceVersion": "12"},
                            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.50",
                                     "selector": {"app": "model-server"},
                                     "ports": [{"name": "http", "port": 8000, "targetPort": 8000,
                                                "protocol": "TCP"}]},
                        }),
                    ),
                    Some(name) => exchange.respond_not_found("services", &name),
                    None => unexpected(exchange),
                }
            })
            .await;
            result.expect("reconcile");
            observed
        }
        "ClusterPeering" => {
            let (client, server) = client();
            let settings = PeeringSettings {
                cluster_name: cluster_name(),
                namespace: WEFT_NAMESPACE.into(),
            };
            let ctx = Arc::new(peering_controller::Context::new(client, settings));
            let task = tokio::spawn(peering_controller::reconcile(
                Arc::new(typed(&example)),
                ctx,
            ));
            let reference = &example.object["spec"]["tlsSecretRef"];
            let secret_namespace = reference["namespace"]
                .as_str()
                .unwrap_or(WEFT_NAMESPACE)
                .to_owned();
            let secret_name = reference["name"].as_str().expect("tlsSecretRef.name");
            let secret_path =
                format!("/api/v1/namespaces/{secret_namespace}/secrets/{secret_name}");
            let (ca, cert, key) = peering_tls();
            let (result, observed) = serve(server, &example, task, |exchange| {
                let exchange = exchange.expect_request(Method::GET, &secret_path);
                exchange.respond(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": secret_name, "namespace": secret_namespace,
                                     "resourceVersion": "9"},
                        "type": "kubernetes.io/tls",
                        "data": {"ca.crt": base64(&ca), "tls.crt": base64(&cert),
                                 "tls.key": base64(&key)},
                    }),
                );
            })
            .await;
            result.expect("reconcile");
            observed
        }
        "WeftIdentity" => {
            // Its conditions are written by the garbage-collection pass (or at allocation).
            let (client, server) = client();
            let ctx = identity_context(client, vec![], vec![typed(&example)]);
            let task = tokio::spawn(async move { collect_garbage(&ctx, Timestamp::now()).await });
            let (result, mut observed) = serve(server, &example, task, unexpected).await;
            observed.deleted = result.expect("gc").endpoints_deleted;
            observed
        }
        "WeftEndpoint" => {
            // Its status is the agent's. The operator's garbage collection deletes it when its
            // pod is gone: not in the cache, and confirmed by the API server.
            let (client, server) = client();
            let ctx = identity_context(client, vec![example.object.clone()], vec![]);
            let task = tokio::spawn(async move { collect_garbage(&ctx, Timestamp::now()).await });
            let namespace = example.namespace().expect("namespace").to_owned();
            let name = example.name().to_owned();
            let pod_path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
            let endpoint_path =
                format!("/apis/weft.io/v1alpha1/namespaces/{namespace}/weftendpoints/{name}");
            let preconditions = json!({
                "uid": example.object["metadata"]["uid"],
                "resourceVersion": example.object["metadata"]["resourceVersion"],
            });
            let (result, mut observed) = serve(server, &example, task, |exchange| {
                if exchange.method == Method::GET && exchange.path == pod_path {
                    exchange.fail(404, "NotFound", &format!("pods \"{name}\" not found"));
                } else {
                    assert_eq!(
                        (&exchange.method, exchange.path.as_str()),
                        (&Method::DELETE, endpoint_path.as_str()),
                        "after the 404, the endpoint is deleted"
                    );
                    assert_eq!(
                        exchange.body["preconditions"], preconditions,
                        "deleted only as it was judged"
                    );
                    exchange.respond(200, status(200, "Success", ""));
                }
            })
            .await;
            observed.deleted = result.expect("gc").endpoints_deleted;
            observed
        }
        other => panic!("no driver for kind {other}"),
    }
}

async fn drive_policy<P: PolicyObject>(example: &Example) -> Observed {
    let (client, server) = client();
    let ctx = Arc::new(policy_controller::Context::new(
        client,
        store(pods()),
        store(namespaces()),
    ));
    let task = tokio::spawn(policy_controller::reconcile(
        Arc::new(typed::<P>(example)),
        ctx,
    ));
    let (result, observed) = serve(server, example, task, unexpected).await;
    result.expect("reconcile");
    observed
}

// ------------------------------------------------------------------ judging

fn condition<'a>(status: &'a Value, type_: &str) -> Result<&'a Value, String> {
    status["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .ok_or_else(|| format!("no {type_} condition in {status}"))
}

fn is(status: &Value, type_: &str, expected: &str) -> Result<(), String> {
    let found = condition(status, type_)?;
    if found["status"] == expected {
        Ok(())
    } else {
        Err(format!(
            "{type_}={} ({}: {}), expected {type_}={expected}",
            found["status"].as_str().unwrap_or("?"),
            found["reason"].as_str().unwrap_or("?"),
            found["message"].as_str().unwrap_or("")
        ))
    }
}

/// The status is stamped with the object's generation, and so is every condition.
fn current(status: &Value, generation: i64) -> Result<(), String> {
    if status["observedGeneration"] != generation {
        return Err(format!(
            "status.observedGeneration {} is not metadata.generation {generation}",
            status["observedGeneration"]
        ));
    }
    for condition in status["conditions"].as_array().into_iter().flatten() {
        if condition["observedGeneration"] != generation {
            return Err(format!(
                "condition {} has observedGeneration {}, not {generation}",
                condition["type"], condition["observedGeneration"]
            ));
        }
    }
    Ok(())
}

/// Whether `observed` is what `expected` calls for; `Ok` says what it was, for the summary.
fn judge(example: &Example, expected: &Expected, observed: &Observed) -> Result<String, String> {
    let warnings: Vec<&Value> = observed
        .events
        .iter()
        .filter(|event| event["type"] == "Warning")
        .collect();
    match expected {
        Expected::Ready => {
            let status = observed.status.as_ref().ok_or("no status was applied")?;
            is(status, "Valid", "True")?;
            is(status, "Ready", "True")?;
            is(status, "Reconciling", "False")?;
            is(status, "Stalled", "False")?;
            current(status, example.generation())?;
            if let Some(event) = warnings.first() {
                return Err(format!("a Warning Event for a valid object: {event}"));
            }
            let ready = condition(status, "Ready")?;
            let mut said = format!(
                "Ready=True ({}: {})",
                ready["reason"].as_str().unwrap_or_default(),
                ready["message"].as_str().unwrap_or_default()
            );
            if let Some(count) = status.get("selectedEndpoints") {
                let _ = write!(said, "; selectedEndpoints={count}");
            }
            if let Some(count) = status.get("endpoints") {
                let _ = write!(said, "; endpoints={count}");
            }
            if let Ok(connected) = condition(status, "Connected") {
                let _ = write!(
                    said,
                    "; Connected={} ({})",
                    connected["status"].as_str().unwrap_or_default(),
                    connected["reason"].as_str().unwrap_or_default()
                );
            }
            Ok(said)
        }
        Expected::PartlyEnforced(fields) => {
            let status = observed.status.as_ref().ok_or("no status was applied")?;
            is(status, "Valid", "True")?;
            is(status, "Ready", "False")?;
            is(status, "Stalled", "True")?;
            current(status, example.generation())?;
            let ready = condition(status, "Ready")?;
            if ready["reason"] != "PartlyEnforced" {
                return Err(format!(
                    "Ready=False for {ready}, expected reason PartlyEnforced"
                ));
            }
            let message = ready["message"].as_str().unwrap_or_default();
            let missing: Vec<&String> = fields
                .iter()
                .filter(|field| !message.contains(&format!("{field}:")))
                .collect();
            if !missing.is_empty() {
                return Err(format!("the message {message:?} does not name {missing:?}"));
            }
            Ok(format!(
                "Valid=True, Ready=False PartlyEnforced naming {}; Warning Events: {}",
                fields.join(", "),
                warnings.len()
            ))
        }
        Expected::Collected => {
            if let Some(status) = &observed.status {
                return Err(format!("the operator wrote a status: {status}"));
            }
            let namespaced = format!(
                "{}/{}",
                example.namespace().unwrap_or_default(),
                example.name()
            );
            if observed.deleted != [namespaced.clone()] {
                return Err(format!(
                    "garbage collection deleted {:?}, expected [{namespaced}]",
                    observed.deleted
                ));
            }
            Ok(format!(
                "no status; deleted after its pod was not found ({})",
                observed.requests.join(", ")
            ))
        }
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn every_valid_example_gets_the_status_the_operator_promises() {
    let known: BTreeSet<&str> = DRIVEN.into_iter().collect();
    let mut ready = Vec::new();
    let mut partly = Vec::new();
    let mut collected = Vec::new();
    let mut failures = Vec::new();
    let mut kinds = BTreeSet::new();

    for example in examples() {
        let label = example.label();
        if !known.contains(example.kind()) {
            failures.push(format!(
                "{label}: this test does not know how to drive kind {:?}",
                example.kind()
            ));
            continue;
        }
        kinds.insert(example.kind().to_owned());
        let expected = expected(&example);
        let example = Arc::new(example);
        let observed = tokio::spawn(drive(Arc::clone(&example))).await;
        let verdict = match observed {
            Ok(observed) => judge(&example, &expected, &observed),
            Err(error) => Err(format!("driving it failed: {}", panic_message(error))),
        };
        let group = match expected {
            Expected::Ready => &mut ready,
            Expected::PartlyEnforced(_) => &mut partly,
            Expected::Collected => &mut collected,
        };
        match verdict {
            Ok(said) => group.push(format!("{label}: {said}")),
            Err(why) => failures.push(format!("{label}: expected {expected:?}: {why}")),
        }
    }

    let every_kind: BTreeSet<String> = resources().keys().cloned().collect();
    for kind in every_kind.difference(&kinds) {
        failures.push(format!("no valid example of {kind} was driven"));
    }

    let mut summary = String::new();
    for (title, lines) in [
        ("Valid=True, Ready=True", &ready),
        (
            "L7 rules / toFQDNs left out (they allow nothing): Valid=True, Ready=False, PartlyEnforced",
            &partly,
        ),
        (
            "WeftEndpoint: garbage-collected, no operator status",
            &collected,
        ),
        ("FAILED", &failures),
    ] {
        let _ = writeln!(summary, "{title} ({}):", lines.len());
        for line in lines {
            let _ = writeln!(summary, "  {line}");
        }
    }
    println!("{summary}");
    assert!(failures.is_empty(), "docs/examples/valid:\n{summary}");
    assert!(!ready.is_empty() && !partly.is_empty() && !collected.is_empty());
}
