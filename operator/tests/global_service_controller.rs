//! GlobalService scenarios against a scripted API server: materialisation from Service
//! annotations (create, leave the user's alone, update, delete) and the GlobalService status.

mod apiserver_mock;

use std::sync::Arc;

use apiserver_mock::{client, ApiServer};
use http::Method;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::{json, Value};
use weft_crds::GlobalService;
use weft_operator::global_service_controller::{
    global_services_for, reconcile_service, reconcile_status, Context,
};

const GLOBAL_SERVICE_URI: &str = "/apis/weft.io/v1alpha1/namespaces/shop/globalservices/web";
const APPLY_URI: &str = "/apis/weft.io/v1alpha1/namespaces/shop/globalservices/web?&force=true&fieldManager=weft-operator";
const STATUS_URI: &str = "/apis/weft.io/v1alpha1/namespaces/shop/globalservices/web/status?&force=true&fieldManager=weft-operator";
const SERVICE_URI: &str = "/api/v1/namespaces/shop/services/web";
const SERVICE_UID: &str = "0b5e6a4c-8d1f-4e2a-9c3b-7f6e5d4c3b2a";
const GLOBAL_UID: &str = "c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f";

fn service(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": SERVICE_UID, "resourceVersion": "7", "annotations": annotations},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

/// A GlobalService `web` in `shop`; `owned` gives it Weft's controller reference to the
/// Service `web`.
fn global(owned: bool, spec: Value, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "GlobalService",
        "metadata": {"name": "web", "namespace": "shop", "uid": GLOBAL_UID, "resourceVersion": "55", "generation": 1},
        "spec": spec,
    });
    if owned {
        object["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "weft-operator"});
        object["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Service", "name": "web", "uid": SERVICE_UID, "controller": true,
        }]);
    }
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn typed<K: serde::de::DeserializeOwned>(object: &Value) -> Arc<K> {
    Arc::new(serde_json::from_value(object.clone()).expect("object"))
}

/// A filled GlobalService cache, as the status controller's watch would have it.
fn cache(objects: &[Value]) -> Store<GlobalService> {
    let (reader, mut writer) = reflector::store::<GlobalService>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(
            serde_json::from_value(object.clone()).expect("GlobalService"),
        ));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

fn context(cached: &[Value]) -> (Arc<Context>, ApiServer) {
    let (client, server) = client();
    (Arc::new(Context::new(client, cache(cached))), server)
}

// ------------------------------------------------------------ materialisation

#[tokio::test]
async fn an_annotated_service_gets_an_owned_global_service_by_server_side_apply() {
    let (ctx, mut server) = context(&[]);
    let svc = service(json!({"weft.io/global": "true", "weft.io/affinity": "local"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));

    // Whose object it is is decided on a fresh read, not the cache.
    server
        .next()
        .await
        .expect_request(Method::GET, GLOBAL_SERVICE_URI)
        .respond_not_found_global();

    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, APPLY_URI)
        .expect_apply();
    assert_eq!(
        apply.body,
        json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": "GlobalService",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "weft-operator"},
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Service", "name": "web", "uid": SERVICE_UID, "controller": true,
                }],
            },
            "spec": {"serviceName": "web", "affinity": "local", "shared": true},
        }),
        "a create carries no resourceVersion"
    );
    let created = apply.body.clone();
    apply.respond(201, created);

    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn ciliums_annotations_are_honoured_too() {
    let (ctx, mut server) = context(&[]);
    let svc =
        service(json!({"io.cilium/global-service": "true", "service.cilium.io/shared": "false"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, GLOBAL_SERVICE_URI)
        .respond_not_found_global();
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, APPLY_URI)
        .expect_apply();
    assert_eq!(
        apply.body["spec"],
        json!({"serviceName": "web", "affinity": "none", "shared": false})
    );
    let created = apply.body.clone();
    apply.respond(201, created);
    reconciler.await.expect("task").expect("reconcile");
}

#[tokio::test]
async fn a_hand_written_global_service_is_never_overwritten() {
    let (ctx, mut server) = context(&[]);
    let svc = service(json!({"weft.io/global": "true", "weft.io/affinity": "local"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, GLOBAL_SERVICE_URI)
        .respond(
            200,
            global(
                false,
                json!({"serviceName": "web", "affinity": "remote"}),
                None,
            ),
        );
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_up_to_date_owned_global_service_is_not_written_again() {
    let (ctx, mut server) = context(&[]);
    let svc = service(json!({"weft.io/global": "true", "weft.io/affinity": "local"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, GLOBAL_SERVICE_URI)
        .respond(
            200,
            global(
                true,
                json!({"serviceName": "web", "affinity": "local", "shared": true}),
                None,
            ),
        );
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_changed_annotation_updates_the_owned_global_service_only_if_unchanged_since_read() {
    let (ctx, mut server) = context(&[]);
    let svc = service(json!({"weft.io/global": "true", "weft.io/affinity": "local"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, GLOBAL_SERVICE_URI)
        .respond(
            200,
            global(
                true,
                json!({"serviceName": "web", "affinity": "none", "shared": true}),
                None,
            ),
        );
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, APPLY_URI)
        .expect_apply();
    assert_eq!(apply.body["metadata"]["resourceVersion"], "55");
    assert_eq!(apply.body["spec"]["affinity"], "local");
    // Someone changed it in between: the API server refuses, the reconcile is retried.
    apply.respond_conflict();
    let error = reconciler
        .await
        .expect("task")
        .expect_err("a 409 is a reconcile error");
    assert!(
        error.to_string().contains("GlobalService shop/web"),
        "{error}"
    );
}

#[tokio::test]
async fn removing_the_annotation_deletes_the_owned_global_service() {
    let owned = global(
        true,
        json!({"serviceName": "web", "affinity": "local", "shared": true}),
        None,
    );
    let (ctx, mut server) = context(&[owned]);
    let svc = service(json!({"weft.io/affinity": "local"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    let delete = server
        .next()
        .await
        .expect_request(Method::DELETE, &format!("{GLOBAL_SERVICE_URI}?"));
    assert_eq!(
        delete.body["preconditions"],
        json!({"uid": GLOBAL_UID}),
        "deletes exactly the object it saw, never one created since"
    );
    delete.respond(
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
    );
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn global_false_deletes_too_and_a_gone_object_is_fine() {
    let owned = global(
        true,
        json!({"serviceName": "web", "affinity": "local", "shared": true}),
        None,
    );
    let (ctx, mut server) = context(&[owned]);
    let svc = service(json!({"weft.io/global": "false"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    let delete = server
        .next()
        .await
        .expect_request(Method::DELETE, &format!("{GLOBAL_SERVICE_URI}?"));
    delete.respond_not_found("globalservices.weft.io", "web");
    reconciler
        .await
        .expect("task")
        .expect("already gone is success");
}

#[tokio::test]
async fn removing_the_annotation_leaves_a_hand_written_global_service() {
    let user = global(false, json!({"serviceName": "web"}), None);
    let (ctx, mut server) = context(&[user]);
    let svc = service(json!({}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_bad_annotation_changes_nothing_and_is_reported_on_the_service() {
    let owned = global(
        true,
        json!({"serviceName": "web", "affinity": "local", "shared": true}),
        None,
    );
    let (ctx, mut server) = context(&[owned]);
    let svc = service(json!({"weft.io/global": "yes"}));
    let reconciler = tokio::spawn(reconcile_service(typed(&svc), ctx));
    let event = server.expect_event("shop").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidAnnotation");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert!(
        event["note"]
            .as_str()
            .unwrap_or_default()
            .contains("metadata.annotations[weft.io/global]"),
        "{event}"
    );
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

// ------------------------------------------------------------ status

#[tokio::test]
async fn a_global_service_whose_service_is_missing_waits_with_service_not_found() {
    let (ctx, mut server) = context(&[]);
    let object = global(false, json!({"serviceName": "web"}), None);
    let reconciler = tokio::spawn(reconcile_status(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond_not_found("services", "web");
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_apply()
        .expect_condition("Valid", "True", "Valid")
        .expect_condition("Ready", "False", "ServiceNotFound")
        .expect_condition("Reconciling", "True", "ServiceNotFound")
        .expect_condition("Stalled", "False", "Valid");
    assert!(apply.body.get("spec").is_none(), "never writes the spec");
    assert_eq!(apply.body["status"]["observedGeneration"], 1);
    assert_eq!(
        apply.body["status"]["conditions"].as_array().map(Vec::len),
        Some(4),
        "no conflict condition: {}",
        apply.body
    );
    apply.respond_with_status(object);
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_hand_written_global_service_reports_the_annotation_conflict_and_an_event() {
    let (ctx, mut server) = context(&[]);
    let object = global(
        false,
        json!({"serviceName": "web", "affinity": "remote"}),
        None,
    );
    let reconciler = tokio::spawn(reconcile_status(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond(200, service(json!({"service.cilium.io/global": "true"})));
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_apply()
        .expect_condition("Valid", "True", "Valid")
        .expect_condition("Ready", "True", "Accepted")
        .expect_condition("AnnotationConflict", "True", "AnnotationConflict");
    let message = apply.condition("AnnotationConflict")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("Service shop/web is annotated service.cilium.io/global"),
        "{message}"
    );
    apply.respond_with_status(object);

    let event = server.expect_event("shop").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "AnnotationConflict");
    assert_eq!(event["regarding"]["kind"], "GlobalService");
    assert_eq!(event["related"]["kind"], "Service");
    assert_eq!(event["related"]["name"], "web");
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_owned_global_service_is_ready_without_a_conflict() {
    let (ctx, mut server) = context(&[]);
    let object = global(
        true,
        json!({"serviceName": "web", "affinity": "local", "shared": true}),
        None,
    );
    let reconciler = tokio::spawn(reconcile_status(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond(200, service(json!({"weft.io/global": "true"})));
    let apply = server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .expect_condition("Ready", "True", "Accepted");
    assert!(apply.body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .all(|c| c["type"] != "AnnotationConflict"));
    apply.respond_with_status(object);
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn an_unchanged_global_service_status_is_not_written_again() {
    let (ctx, mut server) = context(&[]);
    let first = global(false, json!({"serviceName": "web"}), None);
    // The status the first reconcile writes…
    let reconciler = tokio::spawn(reconcile_status(typed(&first), ctx.clone()));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond(200, service(json!({})));
    let apply = server.next().await;
    let written = apply.body["status"].clone();
    apply.respond_with_status(first);
    reconciler.await.expect("task").expect("reconcile");

    // …is what the object carries next time: one read, no write.
    let again = global(false, json!({"serviceName": "web"}), Some(written));
    let reconciler = tokio::spawn(reconcile_status(typed(&again), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond(200, service(json!({})));
    reconciler.await.expect("task").expect("reconcile");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_conflict_writing_the_status_is_a_reconcile_error() {
    let (ctx, mut server) = context(&[]);
    let object = global(false, json!({"serviceName": "web"}), None);
    let reconciler = tokio::spawn(reconcile_status(typed(&object), ctx));
    server
        .next()
        .await
        .expect_request(Method::GET, SERVICE_URI)
        .respond(200, service(json!({})));
    server
        .next()
        .await
        .expect_request(Method::PATCH, STATUS_URI)
        .respond_conflict();
    let error = reconciler.await.expect("task").expect_err("409");
    assert!(
        error.to_string().contains("GlobalService shop/web"),
        "{error}"
    );
}

#[test]
fn a_service_change_rechecks_the_global_services_naming_it_and_the_one_of_its_name() {
    let mut naming = global(false, json!({"serviceName": "web"}), None);
    naming["metadata"]["name"] = json!("web-global");
    let same_name = global(false, json!({"serviceName": "web-v2"}), None);
    let mut elsewhere = global(false, json!({"serviceName": "web"}), None);
    elsewhere["metadata"]["namespace"] = json!("other");
    let mut unrelated = global(false, json!({"serviceName": "db"}), None);
    unrelated["metadata"]["name"] = json!("db");
    let store = cache(&[naming, same_name, elsewhere, unrelated]);
    let svc: Service = serde_json::from_value(service(json!({}))).expect("Service");
    let mut found = global_services_for(&store, &svc);
    found.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        found,
        [
            ObjectRef::new("web").within("shop"),
            ObjectRef::new("web-global").within("shop"),
        ]
    );
}

trait NotFoundGlobal {
    fn respond_not_found_global(self);
}

impl NotFoundGlobal for apiserver_mock::Exchange {
    fn respond_not_found_global(self) {
        self.respond_not_found("globalservices.weft.io", "web");
    }
}
