//! Identity allocation and garbage collection against a scripted API server: each scenario
//! asserts every request the operator makes, in order, and answers as the API server would.

mod apiserver_mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use kube::Api;
use serde_json::{json, Value};
use weft_core::cluster::ClusterId;
use weft_core::identity::{
    make_identity, LabelFilter, SecurityLabels, FIRST_LOCAL_IDENTITY, MAX_LOCAL_IDENTITY,
};
use weft_crds::{WeftEndpoint, WeftIdentity};
use weft_operator::identity_controller::{
    self, labels_hash, preferred_local, Context, IdentityConfig, IdentityIndex, LABELS_HASH_LABEL,
};
use weft_operator::identity_gc::{collect_garbage, GcReport};
use weft_operator::identity_index::{self, KnownIdentity};
use weft_operator::identity_status::{self, Usage};
use weft_operator::metrics::Metrics;

use apiserver_mock::{client, status, stored, ApiServer, Exchange};

const IDENTITIES: &str = "/apis/weft.io/v1alpha1/weftidentities";

fn cluster() -> ClusterId {
    ClusterId::new(3).expect("cluster ID")
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": map(labels), "resourceVersion": "1"},
    }))
    .expect("namespace")
}

fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "labels": map(labels), "resourceVersion": "5"},
        "spec": {"containers": [{"name": "app", "image": "echo"}]},
        "status": {"phase": "Running"},
    }))
    .expect("pod")
}

/// The security labels of a pod labelled `app=<app>` in namespace `shop` (labelled `team=a`).
fn shop_labels(app: &str) -> SecurityLabels {
    SecurityLabels::for_pod(
        "shop",
        &map(&[("app", app)]),
        &map(&[("team", "a")]),
        &LabelFilter::default(),
    )
}

fn identity_json(id: u32, labels: &SecurityLabels, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftIdentity",
        "metadata": {"name": id.to_string(), "uid": format!("uid-{id}"), "resourceVersion": format!("{}", id % 1000),
                     "labels": {LABELS_HASH_LABEL: labels_hash(labels)}},
        "spec": {"id": id, "securityLabels": labels.as_map()},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn identity(id: u32, labels: &SecurityLabels, status: Option<Value>) -> WeftIdentity {
    serde_json::from_value(identity_json(id, labels, status)).expect("identity")
}

/// An identity whose status is what the operator last wrote: `usage` (the `endpoints` and
/// `lastUsedTime` fields) and the conditions that go with it.
fn settled(id: u32, labels: &SecurityLabels, usage: Value) -> WeftIdentity {
    let mut object = identity(id, labels, Some(usage));
    let known = KnownIdentity::from_object(&object).expect("one of ours");
    object.status = Some(identity_status::desired(
        &known,
        cluster(),
        Usage::recorded(&known),
        &Time(Timestamp::now()),
    ));
    object
}

fn endpoint(namespace: &str, name: &str, identity: u32, owner_uid: Option<&str>) -> WeftEndpoint {
    let mut object = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftEndpoint",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("ep-{name}"), "resourceVersion": "77"},
        "spec": {"ips": ["10.1.0.9"], "identity": identity, "nodeName": "node-1"},
    });
    if let Some(uid) = owner_uid {
        object["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]);
    }
    serde_json::from_value(object).expect("endpoint")
}

/// A store holding `objects`, complete (as after the first list).
fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        writer.apply_watcher_event(&Event::InitApply(object));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

struct Fixture {
    ctx: Arc<Context>,
    server: ApiServer,
}

fn fixture(pods: Vec<Pod>, endpoints: Vec<WeftEndpoint>, identities: Vec<WeftIdentity>) -> Fixture {
    let (client, server) = client();
    let index = Arc::new(IdentityIndex::new());
    index.apply(&Event::Init);
    for object in identities {
        index.apply(&Event::InitApply(object));
    }
    index.apply(&Event::InitDone);
    let ctx = Context::new(
        client,
        IdentityConfig::new(cluster()),
        store(pods),
        store(vec![namespace("shop", &[("team", "a")])]),
        store(endpoints),
        index,
        Metrics::unregistered(),
    );
    Fixture {
        ctx: Arc::new(ctx),
        server,
    }
}

fn next_local(local: u32) -> u32 {
    if local == MAX_LOCAL_IDENTITY {
        FIRST_LOCAL_IDENTITY
    } else {
        local + 1
    }
}

async fn reconcile(ctx: &Arc<Context>, pod: Pod) -> tokio::task::JoinHandle<Result<(), String>> {
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        identity_controller::reconcile(Arc::new(pod), ctx)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

fn assert_create(call: &Exchange, id: u32, labels: &SecurityLabels) {
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.path, IDENTITIES);
    assert_eq!(call.param("fieldManager").as_deref(), Some("weft-operator"));
    let body = &call.body;
    assert_eq!(body["kind"], "WeftIdentity");
    assert_eq!(
        body["metadata"]["name"],
        id.to_string(),
        "named by its number"
    );
    assert_eq!(body["spec"]["id"], id);
    assert_eq!(body["spec"]["securityLabels"], json!(labels.as_map()));
    assert_eq!(
        body["metadata"]["labels"][LABELS_HASH_LABEL],
        labels_hash(labels)
    );
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "weft-operator"
    );
    assert!(body.get("status").is_none(), "create writes no status");
    assert!(
        body["metadata"].get("resourceVersion").is_none(),
        "a create claims a name that must not exist"
    );
}

/// The condition `type_` of a written status, as (status, reason).
fn condition(status: &Value, type_: &str) -> (String, String) {
    let found = status["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
    (
        found["status"].as_str().unwrap_or_default().to_owned(),
        found["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Right after a create the allocator applies the new identity's status: in use, Ready.
async fn expect_status_of_new(server: &mut ApiServer, created: Value) {
    let id = created["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    let call = server
        .expect(Method::PATCH, &format!("{IDENTITIES}/{id}/status"))
        .await;
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(call.param("fieldManager").as_deref(), Some("weft-operator"));
    assert!(call.body.get("spec").is_none(), "never a spec");
    let status = call.body["status"].clone();
    assert_eq!(status["endpoints"], 1);
    assert_eq!(condition(&status, "Valid"), ("True".into(), "Valid".into()));
    assert_eq!(
        condition(&status, "Ready"),
        ("True".into(), "Allocated".into())
    );
    let mut written = created;
    written["status"] = status;
    call.respond(200, written);
}

#[tokio::test]
async fn a_new_pod_gets_a_weft_identity_created_with_a_post() {
    let Fixture { ctx, mut server } = fixture(vec![], vec![], vec![]);
    let web = pod(
        "shop",
        "web-1",
        &[("app", "web"), ("pod-template-hash", "5d9f")],
    );
    let running = reconcile(&ctx, web).await;

    let labels = shop_labels("web");
    assert_eq!(
        labels.as_map(),
        &map(&[
            ("app", "web"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            ("io.kubernetes.pod.namespace", "shop"),
        ]),
        "pod-template-hash is ignored, the namespace and its labels are in"
    );
    let id = make_identity(cluster(), preferred_local(&labels));
    assert_eq!(id >> 16, 3, "cluster ID in the high bits");
    let call = server.next().await;
    assert_create(&call, id, &labels);
    let created = stored(call.body.clone(), "uid-new", "101");
    call.respond(201, created.clone());
    expect_status_of_new(&mut server, created).await;

    running.await.expect("task").expect("reconcile");
    let known = ctx.identities.get(id).expect("recorded at once");
    assert_eq!(known.labels, labels);
    assert_eq!(
        ctx.identities
            .identity_for(&labels, cluster())
            .map(|k| k.id),
        Some(id)
    );
    assert_eq!(ctx.metrics.reconcile.count("identity", true), 1);
    assert_eq!(ctx.metrics.identity.allocated.get(), 1);

    // A second pod with the same labels (another rollout) reuses it without a request.
    let twin = pod(
        "shop",
        "web-2",
        &[("app", "web"), ("pod-template-hash", "77c4")],
    );
    reconcile(&ctx, twin)
        .await
        .await
        .expect("task")
        .expect("reconcile");
    server.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_409_on_create_rereads_and_takes_the_next_number() {
    let Fixture { ctx, mut server } = fixture(vec![], vec![], vec![]);
    let running = reconcile(&ctx, pod("shop", "web-1", &[("app", "web")])).await;
    let labels = shop_labels("web");
    let first = make_identity(cluster(), preferred_local(&labels));
    let second = make_identity(cluster(), next_local(preferred_local(&labels)));

    // Another replica took the number first, for another label set.
    let call = server.next().await;
    assert_create(&call, first, &labels);
    call.fail(
        409,
        "AlreadyExists",
        &format!("weftidentities.weft.io \"{first}\" already exists"),
    );
    let call = server
        .expect(Method::GET, &format!("{IDENTITIES}/{first}"))
        .await;
    call.respond(200, identity_json(first, &shop_labels("db"), None));
    let call = server.next().await;
    assert_create(&call, second, &labels);
    let created = stored(call.body.clone(), "uid-2", "102");
    call.respond(201, created.clone());
    expect_status_of_new(&mut server, created).await;

    running.await.expect("task").expect("reconcile");
    assert_eq!(
        ctx.identities
            .identity_for(&labels, cluster())
            .map(|k| k.id),
        Some(second)
    );
    assert_eq!(
        ctx.identities
            .identity_for(&shop_labels("db"), cluster())
            .map(|k| k.id),
        Some(first),
        "what the re-read found is remembered"
    );
    assert_eq!(ctx.metrics.identity.conflicts.get(), 1);
}

#[tokio::test]
async fn a_409_for_the_same_labels_adopts_the_other_replicas_identity() {
    let Fixture { ctx, mut server } = fixture(vec![], vec![], vec![]);
    let running = reconcile(&ctx, pod("shop", "web-1", &[("app", "web")])).await;
    let labels = shop_labels("web");
    let id = make_identity(cluster(), preferred_local(&labels));

    let call = server.next().await;
    assert_create(&call, id, &labels);
    call.fail(409, "AlreadyExists", "already exists");
    server
        .expect(Method::GET, &format!("{IDENTITIES}/{id}"))
        .await
        .respond(200, identity_json(id, &labels, None));

    running.await.expect("task").expect("reconcile");
    server.expect_nothing(Duration::from_millis(100)).await;
    assert_eq!(
        ctx.identities
            .identity_for(&labels, cluster())
            .map(|k| k.id),
        Some(id)
    );
    assert_eq!(
        ctx.metrics.identity.allocated.get(),
        0,
        "adopted, not allocated"
    );
}

#[tokio::test]
async fn a_number_the_cache_knows_is_taken_is_skipped_without_a_request() {
    let labels = shop_labels("web");
    let first = make_identity(cluster(), preferred_local(&labels));
    let second = make_identity(cluster(), next_local(preferred_local(&labels)));
    let Fixture { ctx, mut server } = fixture(
        vec![],
        vec![],
        vec![identity(first, &shop_labels("db"), None)],
    );
    let running = reconcile(&ctx, pod("shop", "web-1", &[("app", "web")])).await;
    let call = server.next().await;
    assert_create(&call, second, &labels);
    let created = stored(call.body.clone(), "uid-2", "102");
    call.respond(201, created.clone());
    expect_status_of_new(&mut server, created).await;
    running.await.expect("task").expect("reconcile");
}

#[tokio::test]
async fn an_existing_identity_for_the_label_set_is_reused_without_a_write() {
    let labels = shop_labels("web");
    // Not at its preferred number (allocated after a conflict): found by labels all the same.
    let id = make_identity(cluster(), 300);
    let Fixture { ctx, mut server } = fixture(
        vec![],
        vec![],
        vec![identity(id, &labels, Some(json!({"endpoints": 2})))],
    );
    let result = tokio::time::timeout(
        Duration::from_secs(2),
        identity_controller::ensure_identity(&ctx, &labels),
    )
    .await
    .expect("finished without waiting for the API");
    assert_eq!(result.expect("identity"), id);
    // Host-network pods need no identity.
    let mut host = pod("shop", "node-exporter", &[("app", "exporter")]);
    host.spec.as_mut().expect("spec").host_network = Some(true);
    reconcile(&ctx, host)
        .await
        .await
        .expect("task")
        .expect("reconcile");
    server.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn an_identity_marked_unused_is_marked_in_use_again() {
    let labels = shop_labels("web");
    let id = make_identity(cluster(), 300);
    let Fixture { ctx, mut server } = fixture(
        vec![],
        vec![],
        vec![identity(
            id,
            &labels,
            Some(json!({"endpoints": 0, "lastUsedTime": "2026-11-02T09:00:00Z"})),
        )],
    );
    let running = reconcile(&ctx, pod("shop", "web-1", &[("app", "web")])).await;
    let call = server
        .expect(Method::PATCH, &format!("{IDENTITIES}/{id}/status"))
        .await;
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "server-side apply"
    );
    assert_eq!(call.param("fieldManager").as_deref(), Some("weft-operator"));
    assert_eq!(call.body["status"]["endpoints"], 1);
    assert!(
        call.body["status"].get("lastUsedTime").is_none(),
        "lastUsedTime removed"
    );
    assert_eq!(
        condition(&call.body["status"], "Ready"),
        ("True".into(), "Allocated".into())
    );
    assert!(call.body.get("spec").is_none());
    let mut written = identity_json(id, &labels, Some(call.body["status"].clone()));
    written["metadata"]["resourceVersion"] = json!("900");
    call.respond(200, written);
    running.await.expect("task").expect("reconcile");
    let known = ctx.identities.get(id).expect("known");
    assert_eq!(known.resource_version.as_deref(), Some("900"));
    assert!(!known.marked_unused());
}

fn ago(minutes: i64) -> String {
    (Timestamp::now() - SignedDuration::from_mins(minutes)).to_string()
}

#[tokio::test]
async fn gc_deletes_an_identity_unused_past_the_grace_period_with_a_precondition() {
    let old = make_identity(cluster(), 300);
    let used = make_identity(cluster(), 301);
    let recent = make_identity(cluster(), 302);
    let Fixture { ctx, mut server } = fixture(
        vec![pod("shop", "web-1", &[("app", "web")])],
        vec![],
        vec![
            identity(
                old,
                &shop_labels("old"),
                Some(json!({"endpoints": 0, "lastUsedTime": ago(16)})),
            ),
            settled(used, &shop_labels("web"), json!({"endpoints": 1})),
            settled(
                recent,
                &shop_labels("recent"),
                json!({"endpoints": 0, "lastUsedTime": ago(5)}),
            ),
        ],
    );
    let gc = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move {
            collect_garbage(&ctx, Timestamp::now())
                .await
                .map_err(|e| e.to_string())
        }
    });
    let call = server
        .expect(Method::DELETE, &format!("{IDENTITIES}/{old}"))
        .await;
    assert_eq!(
        call.body["preconditions"],
        json!({"uid": format!("uid-{old}"), "resourceVersion": format!("{}", old % 1000)}),
        "deleted only if unchanged since it was judged unused"
    );
    call.respond(200, status(200, "", ""));
    let report = gc.await.expect("task").expect("gc");
    server.expect_nothing(Duration::from_millis(100)).await;
    assert_eq!(
        report,
        GcReport {
            identities_deleted: vec![old],
            ..GcReport::default()
        }
    );
    assert!(ctx.identities.get(old).is_none());
    assert!(ctx.identities.get(used).is_some(), "in use: kept");
    assert!(
        ctx.identities.get(recent).is_some(),
        "within the grace period: kept"
    );
    assert_eq!(ctx.metrics.identity.collected_count("WeftIdentity"), 1);
}

#[tokio::test]
async fn gc_leaves_an_identity_that_changed_since_it_was_judged() {
    let old = make_identity(cluster(), 300);
    let Fixture { ctx, mut server } = fixture(
        vec![],
        vec![],
        vec![identity(
            old,
            &shop_labels("old"),
            Some(json!({"endpoints": 0, "lastUsedTime": ago(60)})),
        )],
    );
    let gc = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move {
            collect_garbage(&ctx, Timestamp::now())
                .await
                .map_err(|e| e.to_string())
        }
    });
    // Another replica took it into use: its resourceVersion moved on.
    server
        .expect(Method::DELETE, &format!("{IDENTITIES}/{old}"))
        .await
        .fail(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the ResourceVersion in the precondition (300) does not match the ResourceVersion in record (301)",
        );
    let report = gc.await.expect("task").expect("a conflict is not an error");
    assert!(report.identities_deleted.is_empty());
    assert!(ctx.identities.get(old).is_some());
}

#[tokio::test]
async fn gc_starts_the_clock_of_an_unused_identity_and_counts_used_ones() {
    let fresh = make_identity(cluster(), 300);
    let revived = make_identity(cluster(), 301);
    let Fixture { ctx, mut server } = fixture(
        vec![
            pod("shop", "web-1", &[("app", "web")]),
            pod("shop", "web-2", &[("app", "web")]),
        ],
        vec![],
        vec![
            identity(fresh, &shop_labels("gone"), None),
            identity(
                revived,
                &shop_labels("web"),
                Some(json!({"endpoints": 0, "lastUsedTime": ago(3)})),
            ),
        ],
    );
    let now = Timestamp::now();
    let gc = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move { collect_garbage(&ctx, now).await.map_err(|e| e.to_string()) }
    });
    let call = server
        .expect(Method::PATCH, &format!("{IDENTITIES}/{fresh}/status"))
        .await;
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(call.body["status"]["endpoints"], 0);
    let since: Timestamp = call.body["status"]["lastUsedTime"]
        .as_str()
        .expect("lastUsedTime")
        .parse()
        .expect("a time");
    assert_eq!(
        since.as_second(),
        now.as_second(),
        "the clock starts now, in the object"
    );
    let body = identity_json(
        fresh,
        &shop_labels("gone"),
        Some(call.body["status"].clone()),
    );
    call.respond(200, body);
    let call = server
        .expect(Method::PATCH, &format!("{IDENTITIES}/{revived}/status"))
        .await;
    assert_eq!(call.body["status"]["endpoints"], 2, "in use by two pods");
    assert!(
        call.body["status"].get("lastUsedTime").is_none(),
        "the unused clock is removed"
    );
    let body = identity_json(
        revived,
        &shop_labels("web"),
        Some(call.body["status"].clone()),
    );
    call.respond(200, body);
    let report = gc.await.expect("task").expect("gc");
    assert_eq!(report.identities_marked_unused, vec![fresh]);
    assert_eq!(report.identities_counted, vec![revived]);
    assert!(report.identities_deleted.is_empty());
}

#[tokio::test]
async fn gc_deletes_the_endpoint_of_a_vanished_pod() {
    let id = make_identity(cluster(), 300);
    let Fixture { ctx, mut server } = fixture(
        vec![pod("shop", "web-1", &[("app", "web")])],
        vec![
            endpoint("shop", "web-1", id, Some("uid-web-1")),
            endpoint("shop", "web-2", id, Some("uid-web-2")),
            endpoint("shop", "web-3", id, None),
        ],
        // Users: pod web-1, endpoints web-1 and web-3 (web-2 is deleted).
        vec![settled(id, &shop_labels("web"), json!({"endpoints": 3}))],
    );
    let gc = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move {
            collect_garbage(&ctx, Timestamp::now())
                .await
                .map_err(|e| e.to_string())
        }
    });
    // web-2 is not in the cache: confirmed gone by the API server before the delete.
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/pods/web-2")
        .await
        .fail(404, "NotFound", "pods \"web-2\" not found");
    let call = server
        .expect(
            Method::DELETE,
            "/apis/weft.io/v1alpha1/namespaces/shop/weftendpoints/web-2",
        )
        .await;
    assert_eq!(
        call.body["preconditions"],
        json!({"uid": "ep-web-2", "resourceVersion": "77"})
    );
    call.respond(200, status(200, "", ""));
    // web-3's pod is missing from the cache only: the API server has it.
    server
        .expect(Method::GET, "/api/v1/namespaces/shop/pods/web-3")
        .await
        .respond(
            200,
            serde_json::to_value(pod("shop", "web-3", &[("app", "web")])).expect("pod"),
        );
    let report = gc.await.expect("task").expect("gc");
    server.expect_nothing(Duration::from_millis(100)).await;
    assert_eq!(report.endpoints_deleted, vec!["shop/web-2".to_owned()]);
    assert_eq!(ctx.metrics.identity.collected_count("WeftEndpoint"), 1);
}

#[tokio::test]
async fn a_watch_ending_in_410_gone_relists_and_the_relist_replaces_the_index() {
    let (client, mut server) = client();
    let index = Arc::new(IdentityIndex::new());
    let feed = tokio::spawn(identity_index::feed(
        Api::<WeftIdentity>::all(client),
        Arc::clone(&index),
    ));
    let a = make_identity(cluster(), 300);
    let b = make_identity(cluster(), 301);

    let list = server.expect(Method::GET, IDENTITIES).await;
    assert_eq!(list.param("watch"), None, "a LIST first");
    list.respond(
        200,
        json!({"apiVersion": "weft.io/v1alpha1", "kind": "WeftIdentityList",
               "metadata": {"resourceVersion": "100"},
               "items": [identity_json(a, &shop_labels("a"), None)]}),
    );
    let watch = server.expect(Method::GET, IDENTITIES).await;
    assert_eq!(watch.param("watch").as_deref(), Some("true"));
    assert_eq!(watch.param("resourceVersion").as_deref(), Some("100"));
    assert!(index.is_ready());
    assert!(index.get(a).is_some());
    // The version was compacted away while watching: the server ends the watch with 410.
    let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version: 100 (150)")});
    watch.respond_watch(&[gone]);

    let relist = server.expect(Method::GET, IDENTITIES).await;
    assert_eq!(
        relist.param("watch"),
        None,
        "410 Gone leads to a second LIST"
    );
    relist.respond(
        200,
        json!({"apiVersion": "weft.io/v1alpha1", "kind": "WeftIdentityList",
               "metadata": {"resourceVersion": "200"},
               "items": [identity_json(b, &shop_labels("b"), None)]}),
    );
    let watch = server.expect(Method::GET, IDENTITIES).await;
    assert_eq!(watch.param("watch").as_deref(), Some("true"));
    assert_eq!(watch.param("resourceVersion").as_deref(), Some("200"));
    assert!(index.get(b).is_some());
    assert!(
        index.get(a).is_none(),
        "deleted while the watch was down: gone after the relist"
    );
    feed.abort();
}

#[tokio::test]
async fn gc_gives_identities_it_does_not_allocate_valid_false_once() {
    let foreign = make_identity(ClusterId::new(4).expect("cluster ID"), 300);
    let mismatched = make_identity(cluster(), 310);
    let mut wrong = identity_json(mismatched, &shop_labels("db"), None);
    wrong["spec"]["id"] = json!(mismatched + 1);
    let Fixture { ctx, mut server } = fixture(
        vec![],
        vec![],
        vec![
            identity(foreign, &shop_labels("web"), None),
            serde_json::from_value(wrong.clone()).expect("identity"),
        ],
    );
    let run_gc = |ctx: Arc<Context>| {
        tokio::spawn(async move {
            collect_garbage(&ctx, Timestamp::now())
                .await
                .map_err(|e| e.to_string())
        })
    };
    let gc = run_gc(Arc::clone(&ctx));
    let mut written = Vec::new();
    for _ in 0..2 {
        let call = server.next().await;
        assert_eq!(call.method, Method::PATCH);
        let status = call.body["status"].clone();
        let (id, object) = if call.path.ends_with(&format!("/{foreign}/status")) {
            assert_eq!(
                condition(&status, "Valid"),
                ("False".into(), "OtherCluster".into())
            );
            (foreign, identity_json(foreign, &shop_labels("web"), None))
        } else {
            assert_eq!(call.path, format!("{IDENTITIES}/{mismatched}/status"));
            assert_eq!(
                condition(&status, "Valid"),
                ("False".into(), "NameMismatch".into())
            );
            (mismatched, wrong.clone())
        };
        assert_eq!(
            condition(&status, "Stalled"),
            ("True".into(), condition(&status, "Valid").1)
        );
        assert!(status.get("endpoints").is_none(), "not counted: not ours");
        let mut object = object;
        object["status"] = status;
        object["metadata"]["resourceVersion"] = json!("500");
        call.respond(200, object);
        // A Warning Event says the same (cluster-scoped objects' Events go to `default`).
        let event = server.expect_event("default").await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["regarding"]["kind"], "WeftIdentity");
        assert_eq!(event["regarding"]["name"], id.to_string());
        written.push(id);
    }
    written.sort_unstable();
    assert_eq!(written, vec![mismatched, foreign]);
    let report = gc.await.expect("task").expect("gc");
    assert!(report.identities_deleted.is_empty(), "never collected");
    // The next pass finds the conditions current: no write.
    let gc = run_gc(Arc::clone(&ctx));
    gc.await.expect("task").expect("gc");
    server.expect_nothing(Duration::from_millis(100)).await;
}
