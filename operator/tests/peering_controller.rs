//! ClusterPeering scenarios: the TLS Secret is checked with real certificates (made with
//! rcgen) and the status written against a scripted API server.

mod apiserver_mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use apiserver_mock::{client, ApiServer};
use http::Method;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};
use weft_core::cluster::ClusterName;
use weft_crds::ClusterPeering;
use weft_operator::peering_controller::{
    check_tls, peerings_using, reconcile, Context, PeeringSettings,
};

const SECRET_URI: &str = "/api/v1/namespaces/weft-system/secrets/mesh-tls";
const STATUS_URI: &str =
    "/apis/weft.io/v1alpha1/clusterpeerings/east/status?&force=true&fieldManager=weft-operator";

/// A CA and what it issues.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2200, 1, 1);
    let pem = params.self_signed(&key).expect("CA").pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A client certificate with common name `cn` and DNS names `sans`, valid between the years
/// given; returns (certificate PEM, key PEM).
fn client_certificate(ca: &Ca, cn: &str, sans: &[&str], from: i32, until: i32) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = date_time_ymd(from, 1, 1);
    params.not_after = date_time_ymd(until, 1, 1);
    let cert = params.signed_by(&key, &ca.issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn data(ca: &str, cert: &str, key: &str) -> BTreeMap<String, ByteString> {
    [("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn secret(data: &BTreeMap<String, ByteString>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mesh-tls", "namespace": "weft-system", "resourceVersion": "9"},
        "type": "kubernetes.io/tls",
        "data": data,
    })
}

fn peering(secret_namespace: Option<&str>) -> Value {
    let mut reference = json!({"name": "mesh-tls"});
    if let Some(namespace) = secret_namespace {
        reference["namespace"] = json!(namespace);
    }
    json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "ClusterPeering",
        "metadata": {"name": "east", "generation": 4, "resourceVersion": "31", "uid": "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"},
        "spec": {
            "clusterName": "east",
            "clusterID": 2,
            "endpoints": ["mesh.east.example:2379"],
            "tlsSecretRef": reference,
        },
    })
}

fn cluster() -> ClusterName {
    ClusterName::new("west").expect("cluster name")
}

fn context() -> (Arc<Context>, ApiServer) {
    let (client, server) = client();
    let settings = PeeringSettings {
        cluster_name: cluster(),
        namespace: "weft-system".into(),
    };
    (Arc::new(Context::new(client, settings)), server)
}

fn typed(object: &Value) -> Arc<ClusterPeering> {
    Arc::new(serde_json::from_value(object.clone()).expect("ClusterPeering"))
}

/// Runs one reconcile whose Secret read gets `answer`, and returns the status apply.
async fn reconcile_with_secret(
    answer: impl FnOnce(apiserver_mock::Exchange),
) -> (
    apiserver_mock::Exchange,
    ApiServer,
    tokio::task::JoinHandle<Action>,
) {
    let (ctx, mut server) = context();
    let object = peering(None);
    let reconciler = tokio::spawn(async move {
        reconcile(typed(&object), ctx)
            .await
            .expect("an invalid Secret is not a reconcile error")
    });
    answer(server.next().await.expect_request(Method::GET, SECRET_URI));
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_apply();
    assert!(apply.body.get("spec").is_none(), "never writes the spec");
    assert_eq!(apply.body["kind"], "ClusterPeering");
    assert_eq!(apply.body["status"]["observedGeneration"], 4);
    (apply, server, reconciler)
}

fn message(apply: &apiserver_mock::Exchange, type_: &str) -> String {
    apply.condition(type_)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_valid_secret_makes_the_peering_ready_with_connected_unknown() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-west", &[], 2020, 2200);
    let body = secret(&data(&mesh.pem, &cert, &key));
    let (apply, mut server, reconciler) =
        reconcile_with_secret(move |get| get.respond(200, body)).await;
    let apply = apply
        .expect_condition("Valid", "True", "Valid")
        .expect_condition("Ready", "True", "Accepted")
        .expect_condition("Reconciling", "False", "Done")
        .expect_condition("Stalled", "False", "Valid")
        .expect_condition("Connected", "Unknown", "NotImplemented");
    apply.respond_with_status(peering(None));
    let action = reconciler.await.expect("task");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_expired_certificate_is_certificate_expired_with_an_event() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-west", &[], 2020, 2021);
    let body = secret(&data(&mesh.pem, &cert, &key));
    let (apply, mut server, reconciler) =
        reconcile_with_secret(move |get| get.respond(200, body)).await;
    let apply = apply
        .expect_condition("Valid", "False", "CertificateExpired")
        .expect_condition("Ready", "False", "CertificateExpired")
        .expect_condition("Stalled", "True", "CertificateExpired")
        .expect_condition("Connected", "Unknown", "NotImplemented");
    let text = message(&apply, "Valid");
    assert!(
        text.starts_with("Secret weft-system/mesh-tls: tls.crt expired at 2021-01-01T00:00:00Z"),
        "{text}"
    );
    apply.respond_with_status(peering(None));
    let event = server.expect_event("default").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "CertificateExpired");
    assert_eq!(event["regarding"]["kind"], "ClusterPeering");
    reconciler.await.expect("task");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_certificate_for_another_cluster_is_wrong_cluster_name() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-north", &["remote-north"], 2020, 2200);
    let body = secret(&data(&mesh.pem, &cert, &key));
    let (apply, mut server, reconciler) =
        reconcile_with_secret(move |get| get.respond(200, body)).await;
    let apply = apply.expect_condition("Valid", "False", "WrongClusterName");
    let text = message(&apply, "Valid");
    assert!(
        text.contains("\"remote-north\"") && text.contains("must name \"remote-west\""),
        "{text}"
    );
    apply.respond_with_status(peering(None));
    server.expect_event("default").await;
    reconciler.await.expect("task");
}

#[tokio::test]
async fn a_missing_secret_is_secret_not_found() {
    let (apply, mut server, reconciler) =
        reconcile_with_secret(|get| get.respond_not_found("secrets", "mesh-tls")).await;
    let apply = apply
        .expect_condition("Valid", "False", "SecretNotFound")
        .expect_condition("Connected", "Unknown", "NotImplemented");
    assert!(message(&apply, "Valid").contains("weft-system/mesh-tls does not exist"));
    apply.respond_with_status(peering(None));
    server.expect_event("default").await;
    reconciler.await.expect("task");
}

#[tokio::test]
async fn a_secret_the_operator_may_not_read_is_reported_not_retried() {
    let (apply, mut server, reconciler) = reconcile_with_secret(|get| {
        get.respond(
            403,
            apiserver_mock::status(403, "Forbidden", "secrets \"mesh-tls\" is forbidden"),
        )
    })
    .await;
    apply
        .expect_condition("Valid", "False", "SecretNotReadable")
        .respond_with_status(peering(None));
    server.expect_event("default").await;
    reconciler.await.expect("task");
}

#[tokio::test]
async fn a_secret_in_another_namespace_is_read_there() {
    let (ctx, mut server) = context();
    let object = peering(Some("mesh"));
    let reconciler = tokio::spawn(reconcile(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, "/api/v1/namespaces/mesh/secrets/mesh-tls")
        .respond_not_found("secrets", "mesh-tls");
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_condition("Valid", "False", "SecretNotFound");
    assert!(message(&apply, "Valid").contains("Secret mesh/mesh-tls"));
    apply.respond_with_status(object);
    server.expect_event("default").await;
    reconciler.await.expect("task").expect("reconcile");
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-west", &[], 2020, 2200);
    let body = secret(&data(&mesh.pem, &cert, &key));
    let (apply, _server, reconciler) = {
        let body = body.clone();
        reconcile_with_secret(move |get| get.respond(200, body)).await
    };
    let mut current = peering(None);
    current["status"] = apply.body["status"].clone();
    apply.respond_with_status(peering(None));
    reconciler.await.expect("task");

    let (ctx, mut server) = context();
    let reconciler = tokio::spawn(reconcile(typed(&current), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SECRET_URI)
        .respond(200, body);
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_conflict_writing_the_status_is_a_reconcile_error() {
    let (ctx, mut server) = context();
    let object = peering(None);
    let reconciler = tokio::spawn(reconcile(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SECRET_URI)
        .respond_not_found("secrets", "mesh-tls");
    server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .respond_conflict();
    let error = reconciler.await.expect("task").expect_err("409");
    assert!(error.to_string().contains("ClusterPeering east"), "{error}");
}

// ------------------------------------------------------------ the checks, without a server

fn verdict(data: &BTreeMap<String, ByteString>) -> Result<(), (String, String)> {
    let crypto = Arc::new(rustls::crypto::ring::default_provider());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    check_tls(data, &cluster(), now, &crypto)
        .verdict
        .map_err(|finding| (finding.reason, finding.message))
}

fn reason(data: &BTreeMap<String, ByteString>) -> String {
    verdict(data).expect_err("invalid").0
}

#[test]
fn the_cluster_may_be_named_by_a_dns_subject_alternative_name() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "someone", &["remote-west"], 2020, 2200);
    assert_eq!(verdict(&data(&mesh.pem, &cert, &key)), Ok(()));
    // The bare cluster name is not the naming rule.
    let (cert, key) = client_certificate(&mesh, "west", &["west"], 2020, 2200);
    assert_eq!(reason(&data(&mesh.pem, &cert, &key)), "WrongClusterName");
}

#[test]
fn a_certificate_from_another_ca_is_untrusted() {
    let mesh = ca("mesh ca");
    let other = ca("other ca");
    let (cert, key) = client_certificate(&other, "remote-west", &[], 2020, 2200);
    let (reason_, message) = verdict(&data(&mesh.pem, &cert, &key)).expect_err("untrusted");
    assert_eq!(reason_, "UntrustedCertificate");
    assert!(
        message.contains("not issued by a CA in ca.crt"),
        "{message}"
    );
    // A bundle holding both CAs is fine.
    let bundle = format!("{}{}", mesh.pem, other.pem);
    assert_eq!(verdict(&data(&bundle, &cert, &key)), Ok(()));
}

#[test]
fn a_certificate_not_valid_yet_says_from_when() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-west", &[], 2150, 2200);
    let crypto = Arc::new(rustls::crypto::ring::default_provider());
    let check = check_tls(
        &data(&mesh.pem, &cert, &key),
        &cluster(),
        1_800_000_000,
        &crypto,
    );
    let finding = check.verdict.expect_err("not yet valid");
    assert_eq!(finding.reason, "CertificateNotYetValid");
    assert!(
        finding.message.contains("2150-01-01T00:00:00Z"),
        "{}",
        finding.message
    );
    assert_eq!(
        check.changes_at,
        Some(5_680_281_600),
        "re-checked when it becomes valid"
    );
}

#[test]
fn bad_pem_missing_keys_and_a_foreign_key_are_named() {
    let mesh = ca("mesh ca");
    let (cert, key) = client_certificate(&mesh, "remote-west", &[], 2020, 2200);
    let (_, other_key) = client_certificate(&mesh, "remote-west", &[], 2020, 2200);
    assert_eq!(reason(&data("not pem", &cert, &key)), "BadCABundle");
    assert_eq!(
        reason(&data(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            &cert,
            &key
        )),
        "BadCABundle"
    );
    assert_eq!(reason(&data(&mesh.pem, "", &key)), "BadCertificate");
    assert_eq!(reason(&data(&mesh.pem, &cert, "")), "BadPrivateKey");
    let (reason_, message) = verdict(&data(&mesh.pem, &cert, &other_key)).expect_err("mismatch");
    assert_eq!(reason_, "BadPrivateKey");
    assert!(
        message.contains("not the private key of tls.crt"),
        "{message}"
    );
    let mut missing = data(&mesh.pem, &cert, &key);
    missing.remove("ca.crt");
    let (reason_, message) = verdict(&missing).expect_err("no ca.crt");
    assert_eq!(reason_, "BadCABundle");
    assert!(message.contains("has no ca.crt"), "{message}");
}

#[test]
fn a_server_only_certificate_cannot_be_a_client_certificate() {
    let mesh = ca("mesh ca");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["remote-west".to_owned()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2200, 1, 1);
    let cert = params.signed_by(&key, &mesh.issuer).expect("certificate");
    let (reason_, message) =
        verdict(&data(&mesh.pem, &cert.pem(), &key.serialize_pem())).expect_err("server only");
    assert_eq!(reason_, "BadCertificate");
    assert!(message.contains("clientAuth"), "{message}");
}

#[test]
fn a_secret_change_rechecks_the_peerings_naming_it() {
    let (reader, mut writer) = reflector::store::<ClusterPeering>();
    writer.apply_watcher_event(&watcher::Event::Init);
    let mut other = peering(None);
    other["metadata"]["name"] = json!("north");
    other["spec"]["tlsSecretRef"]["name"] = json!("north-tls");
    let mut elsewhere = peering(Some("mesh"));
    elsewhere["metadata"]["name"] = json!("south");
    for object in [peering(None), other, elsewhere] {
        writer.apply_watcher_event(&watcher::Event::InitApply(
            serde_json::from_value(object).expect("ClusterPeering"),
        ));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let secret: Secret = serde_json::from_value(secret(&BTreeMap::new())).expect("Secret");
    assert_eq!(
        peerings_using(&reader, &secret, "weft-system"),
        [ObjectRef::new("east")]
    );
}
