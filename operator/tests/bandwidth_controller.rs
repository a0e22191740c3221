//! BandwidthClass reconciler scenarios against a scripted API server.

mod apiserver_mock;

use std::sync::Arc;
use std::time::Duration;

use apiserver_mock::client;
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use weft_crds::bandwidth::BandwidthClassStatus;
use weft_crds::BandwidthClass;
use weft_operator::bandwidth_controller::{self, error_policy, reconcile, Context};
use weft_operator::conditions;
use weft_operator::metrics::ReconcileMetrics;

const STATUS_URI: &str =
    "/apis/weft.io/v1alpha1/bandwidthclasses/bulk/status?&force=true&fieldManager=weft-operator";

fn class(max: &str, guaranteed: Option<&str>, status: Option<Value>) -> Value {
    let mut egress = json!({"maxRate": max});
    if let Some(guaranteed) = guaranteed {
        egress["guaranteedRate"] = json!(guaranteed);
    }
    let mut object = json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "BandwidthClass",
        "metadata": {"name": "bulk", "generation": 2, "resourceVersion": "41", "uid": "6f0c3b1e-1b2a-4c5d-9e8f-0a1b2c3d4e5f"},
        "spec": {"egress": egress},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn typed(object: &Value) -> Arc<BandwidthClass> {
    Arc::new(serde_json::from_value(object.clone()).expect("BandwidthClass"))
}

#[tokio::test]
async fn a_valid_class_becomes_ready_with_one_status_apply() {
    let (client, mut server) = client();
    let ctx = Arc::new(Context::new(client));
    let object = class("10G", Some("1G"), None);
    let reconciler = tokio::spawn(reconcile(typed(&object), ctx));

    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_apply()
        .expect_condition("Valid", "True", "Valid")
        .expect_condition("Ready", "True", "Accepted")
        .expect_condition("Reconciling", "False", "Done")
        .expect_condition("Stalled", "False", "Valid");
    assert_eq!(apply.body["apiVersion"], "weft.io/v1alpha1");
    assert_eq!(apply.body["kind"], "BandwidthClass");
    assert!(apply.body.get("spec").is_none(), "never writes the spec");
    assert_eq!(apply.body["status"]["observedGeneration"], 2);
    assert_eq!(apply.condition("Ready")["observedGeneration"], 2);
    apply.respond_with_status(object);

    let action = reconciler.await.expect("task").expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_invalid_class_is_valid_false_stalled_and_gets_a_warning_event() {
    let (client, mut server) = client();
    let ctx = Arc::new(Context::new(client));
    let object = class("1G", Some("2G"), None);
    let reconciler = tokio::spawn(reconcile(typed(&object), ctx));

    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_apply()
        .expect_condition("Valid", "False", "GuaranteedRateAboveMaxRate")
        .expect_condition("Ready", "False", "GuaranteedRateAboveMaxRate")
        .expect_condition("Stalled", "True", "GuaranteedRateAboveMaxRate");
    let message = apply.condition("Valid")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("spec.egress.guaranteedRate: 2G is more than maxRate 1G"),
        "{message}"
    );
    apply.respond_with_status(object);

    // Cluster-scoped objects' Events go to the default namespace.
    let event = server.expect_event("default").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "GuaranteedRateAboveMaxRate");
    assert_eq!(event["note"], message.as_str());
    assert_eq!(event["reportingController"], "weft-operator");
    assert_eq!(event["regarding"]["kind"], "BandwidthClass");
    assert_eq!(event["regarding"]["name"], "bulk");

    // Not an error: an invalid spec waits for a change, it does not retry hot.
    let action = reconciler
        .await
        .expect("task")
        .expect("invalid is not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let (client, mut server) = client();
    let ctx = Arc::new(Context::new(client));
    let spec = typed(&class("1G", Some("2G"), None)).spec.clone();
    let status = BandwidthClassStatus {
        observed_generation: Some(2),
        conditions: conditions::conditions(
            Some(2),
            &bandwidth_controller::outcome(&spec),
            &[],
            &[],
            &Time(Timestamp::from_second(1_700_000_000).expect("time")),
        ),
        pods: Some(3),
    };
    let object = class(
        "1G",
        Some("2G"),
        Some(serde_json::to_value(&status).expect("status")),
    );
    let reconciler = tokio::spawn(reconcile(typed(&object), ctx));
    server.no_more_requests().await;
    reconciler.await.expect("task").expect("reconcile");
}

#[tokio::test]
async fn a_conflict_is_a_reconcile_error_retried_with_growing_backoff() {
    let (client, mut server) = client();
    let ctx = Arc::new(Context::new(client));
    let object = typed(&class("10G", None, None));
    let reconciler = tokio::spawn(reconcile(object.clone(), ctx.clone()));
    server.next().await.respond_conflict();
    let error = reconciler
        .await
        .expect("task")
        .expect_err("a 409 is an error");
    assert!(error.to_string().contains("BandwidthClass bulk"), "{error}");
    assert_eq!(
        error_policy(object.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(object.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );

    // A successful reconcile resets the backoff.
    let reconciler = tokio::spawn(reconcile(object.clone(), ctx.clone()));
    let apply = server.next().await;
    apply.respond_with_status(class("10G", None, None));
    reconciler.await.expect("task").expect("reconcile");
    assert_eq!(
        error_policy(object, &error, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_watch_ending_in_410_gone_is_followed_by_a_new_list() {
    let (client, mut server) = client();
    let controller = tokio::spawn(bandwidth_controller::run(
        client,
        ReconcileMetrics::unregistered(),
    ));

    let list = server.next().await;
    assert_eq!(list.method, Method::GET);
    assert!(
        list.uri
            .starts_with("/apis/weft.io/v1alpha1/bandwidthclasses?")
            && !list.uri.contains("watch=true"),
        "a LIST first: {}",
        list.uri
    );
    list.respond(
        200,
        json!({"apiVersion": "weft.io/v1alpha1", "kind": "BandwidthClassList", "metadata": {"resourceVersion": "100"}, "items": []}),
    );

    let watch = server.next().await;
    assert!(
        watch
            .uri
            .starts_with("/apis/weft.io/v1alpha1/bandwidthclasses?")
            && watch.uri.contains("watch=true")
            && watch.uri.contains("resourceVersion=100"),
        "then a WATCH from the list's version: {}",
        watch.uri
    );
    watch.respond_watch(&[json!({
        "type": "ERROR",
        "object": apiserver_mock::status(410, "Expired", "too old resource version: 100 (250)"),
    })]);

    let relist = server.next().await;
    assert_eq!(relist.method, Method::GET);
    assert!(
        relist
            .uri
            .starts_with("/apis/weft.io/v1alpha1/bandwidthclasses?")
            && !relist.uri.contains("watch=true"),
        "410 Gone: the watcher lists again instead of resuming: {}",
        relist.uri
    );
    controller.abort();
}
