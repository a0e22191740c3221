//! `status.selectedEndpoints` of WeftNetworkPolicy and WeftClusterwideNetworkPolicy against a
//! scripted API server: first the reconciler over filled caches (every request asserted in
//! order), then the running controllers, whose pod and namespace watches start recounts.

mod apiserver_mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apiserver_mock::{client, ApiServer, Exchange};
use http::Method;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher::Event;
use kube::Client;
use serde_json::{json, Value};
use weft_crds::{WeftClusterwideNetworkPolicy, WeftNetworkPolicy};
use weft_operator::metrics::ReconcileMetrics;
use weft_operator::policy_controller::{self, reconcile, Context, PolicyObject, Settings};
use weft_operator::policy_status::desired_status;

const POLICIES: &str = "/apis/weft.io/v1alpha1/weftnetworkpolicies";
const CLUSTERWIDE: &str = "/apis/weft.io/v1alpha1/weftclusterwidenetworkpolicies";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const APPLY: &str = "?&force=true&fieldManager=weft-operator";

fn status_uri(kind: &str, name: &str) -> String {
    match kind {
        "WeftNetworkPolicy" => format!(
            "/apis/weft.io/v1alpha1/namespaces/shop/weftnetworkpolicies/{name}/status{APPLY}"
        ),
        _ => format!("{CLUSTERWIDE}/{name}/status{APPLY}"),
    }
}

// ------------------------------------------------------------------ objects

fn pod(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                     "labels": labels, "resourceVersion": "5"},
        "spec": {"containers": [{"name": "app", "image": "echo"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]},
    })
}

fn namespace(name: &str, team: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"team": team},
                     "resourceVersion": "3"},
    })
}

/// The pods every scenario starts from: in `shop` (team a) two `web` endpoints and one `db`;
/// in `blog` (team b) one `web`; and `web` pods that are no endpoints: on the host network,
/// finished, and not wired yet (no address).
fn pods() -> Vec<Value> {
    let mut host = pod("shop", "web-host", json!({"app": "web"}));
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = pod("shop", "web-done", json!({"app": "web"}));
    done["status"]["phase"] = json!("Succeeded");
    let mut new = pod("shop", "web-new", json!({"app": "web"}));
    new["status"] = json!({"phase": "Pending"});
    vec![
        pod("shop", "web-1", json!({"app": "web"})),
        pod(
            "shop",
            "web-2",
            json!({"app": "web", "pod-template-hash": "5d9f"}),
        ),
        pod("shop", "db-1", json!({"app": "db"})),
        pod("blog", "web-1", json!({"app": "web"})),
        host,
        done,
        new,
    ]
}

fn namespaces() -> Vec<Value> {
    vec![namespace("shop", "a"), namespace("blog", "b")]
}

fn policy(kind: &str, name: &str, selector: Value, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "weft.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "uid": format!("uid-policy-{name}"), "generation": 1, "resourceVersion": "10"},
        "spec": {"endpointSelector": selector, "ingress": [{"fromEntities": ["cluster"]}]},
    });
    if kind == "WeftNetworkPolicy" {
        object["metadata"]["namespace"] = json!("shop");
    }
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn web() -> Value {
    json!({"matchLabels": {"app": "web"}})
}

/// The status a policy carries after a reconcile that counted `count`.
fn status_with<P: PolicyObject>(object: &Value, count: i64) -> Value {
    let typed: P = serde_json::from_value(object.clone()).expect("policy");
    let at = Time(Timestamp::from_second(1_700_000_000).expect("time"));
    serde_json::to_value(desired_status(
        Some(1),
        &typed.convert(),
        None,
        Some(count),
        at,
    ))
    .expect("status")
}

// ------------------------------------------------------------------ caches

fn cache<K>(objects: Vec<Value>) -> (Store<K>, Writer<K>)
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
    (store, writer)
}

struct Fixture {
    ctx: Arc<Context>,
    server: ApiServer,
    pods: Writer<Pod>,
    namespaces: Writer<Namespace>,
}

fn fixture() -> Fixture {
    let (client, server) = client();
    let (pod_store, pods) = cache::<Pod>(pods());
    let (namespace_store, namespaces) = cache::<Namespace>(namespaces());
    Fixture {
        ctx: Arc::new(Context::new(client, pod_store, namespace_store)),
        server,
        pods,
        namespaces,
    }
}

fn reconcile_in_background<P: PolicyObject>(
    ctx: &Arc<Context>,
    object: &Value,
) -> tokio::task::JoinHandle<()> {
    let typed: P = serde_json::from_value(object.clone()).expect("policy");
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        reconcile(Arc::new(typed), ctx).await.expect("reconcile");
    })
}

/// Reconciles `object`, takes its status apply (asserting where it goes and how), answers it
/// as the API server would and returns the applied body.
async fn apply_of<P: PolicyObject>(fixture: &mut Fixture, object: &Value, name: &str) -> Value {
    let running = reconcile_in_background::<P>(&fixture.ctx, object);
    let apply = fixture
        .server
        .next()
        .await
        .expect_request(Method::PATCH, &status_uri(P::KIND, name))
        .expect_apply();
    assert!(apply.body.get("spec").is_none(), "never writes the spec");
    assert_eq!(apply.body["kind"], P::KIND);
    let body = apply.body.clone();
    apply.respond_with_status(object.clone());
    // An invalid policy is also told in a Warning Event, once its conditions change.
    let invalid = body["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Valid" && c["status"] == "False");
    if let Some(valid) = invalid {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let event = fixture.server.expect_event(namespace).await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], valid["reason"]);
        assert_eq!(event["regarding"]["name"], name);
    }
    running.await.expect("reconcile");
    fixture.server.no_more_requests().await;
    body
}

/// Reconciles `object` and asserts it writes nothing.
async fn no_apply_for<P: PolicyObject>(fixture: &mut Fixture, object: &Value) {
    let running = reconcile_in_background::<P>(&fixture.ctx, object);
    fixture.server.no_more_requests().await;
    tokio::time::timeout(Duration::from_secs(2), running)
        .await
        .expect("reconcile finished without writing")
        .expect("reconcile");
}

fn relabel(writer: &mut Writer<Pod>, object: Value) {
    writer.apply_watcher_event(&Event::Apply(serde_json::from_value(object).expect("pod")));
}

// ------------------------------------------------------------------ reconcile scenarios

#[tokio::test]
async fn a_policy_selecting_two_of_three_pods_writes_selected_endpoints_2() {
    let mut fixture = fixture();
    let object = policy("WeftNetworkPolicy", "web", web(), None);
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &object, "web").await;
    assert_eq!(
        body["status"]["selectedEndpoints"], 2,
        "shop's two web endpoints; not blog's, nor the host-network, finished or unwired pods"
    );
    let valid = body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Valid")
        .expect("Valid")
        .clone();
    assert_eq!(valid["status"], "True");
    assert_eq!(body["status"]["observedGeneration"], 1);
}

#[tokio::test]
async fn a_label_change_that_selects_a_third_pod_writes_3_and_keeps_the_conditions() {
    let mut fixture = fixture();
    let object = policy("WeftNetworkPolicy", "web", web(), None);
    let before = status_with::<WeftNetworkPolicy>(&object, 2);
    let object = policy("WeftNetworkPolicy", "web", web(), Some(before.clone()));
    relabel(
        &mut fixture.pods,
        pod("shop", "db-1", json!({"app": "web"})),
    );
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &object, "web").await;
    assert_eq!(body["status"]["selectedEndpoints"], 3);
    assert_eq!(
        body["status"]["conditions"], before["conditions"],
        "only the count changed: the conditions and their transition times stay"
    );
}

#[tokio::test]
async fn an_unchanged_count_writes_nothing() {
    let mut fixture = fixture();
    let object = policy("WeftNetworkPolicy", "web", web(), None);
    let object = policy(
        "WeftNetworkPolicy",
        "web",
        web(),
        Some(status_with::<WeftNetworkPolicy>(&object, 2)),
    );
    no_apply_for::<WeftNetworkPolicy>(&mut fixture, &object).await;
    // A pod change that leaves the count alone (another label, a non-endpoint) writes nothing.
    relabel(
        &mut fixture.pods,
        pod("shop", "web-1", json!({"app": "web", "tier": "front"})),
    );
    let mut host = pod("shop", "web-host", json!({"app": "db"}));
    host["spec"]["hostNetwork"] = json!(true);
    relabel(&mut fixture.pods, host);
    no_apply_for::<WeftNetworkPolicy>(&mut fixture, &object).await;
}

#[tokio::test]
async fn a_clusterwide_policy_counts_across_namespaces() {
    let mut fixture = fixture();
    let object = policy("WeftClusterwideNetworkPolicy", "web", web(), None);
    let body = apply_of::<WeftClusterwideNetworkPolicy>(&mut fixture, &object, "web").await;
    assert_eq!(
        body["status"]["selectedEndpoints"], 3,
        "shop's two and blog's one"
    );
    let everything = policy("WeftClusterwideNetworkPolicy", "all", json!({}), None);
    let body = apply_of::<WeftClusterwideNetworkPolicy>(&mut fixture, &everything, "all").await;
    assert_eq!(body["status"]["selectedEndpoints"], 4, "every endpoint");
}

#[tokio::test]
async fn namespaces_and_their_labels_select_and_a_namespace_relabel_moves_the_count() {
    let mut fixture = fixture();
    let by_name = policy(
        "WeftClusterwideNetworkPolicy",
        "blog",
        json!({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "blog"}}),
        None,
    );
    let body = apply_of::<WeftClusterwideNetworkPolicy>(&mut fixture, &by_name, "blog").await;
    assert_eq!(body["status"]["selectedEndpoints"], 1);

    let team_a = json!({"matchExpressions": [
        {"key": "k8s:io.cilium.k8s.namespace.labels.team", "operator": "In", "values": ["a"]},
    ]});
    let object = policy(
        "WeftClusterwideNetworkPolicy",
        "team-a",
        team_a.clone(),
        None,
    );
    let body = apply_of::<WeftClusterwideNetworkPolicy>(&mut fixture, &object, "team-a").await;
    assert_eq!(body["status"]["selectedEndpoints"], 3, "shop's endpoints");

    // blog joins team a: its endpoint is selected too.
    fixture.namespaces.apply_watcher_event(&Event::Apply(
        serde_json::from_value(namespace("blog", "a")).expect("namespace"),
    ));
    let object = policy(
        "WeftClusterwideNetworkPolicy",
        "team-a",
        team_a,
        Some(body["status"].clone()),
    );
    let body = apply_of::<WeftClusterwideNetworkPolicy>(&mut fixture, &object, "team-a").await;
    assert_eq!(body["status"]["selectedEndpoints"], 4);

    // A namespaced policy selects by its namespace's labels within its namespace only.
    let object = policy(
        "WeftNetworkPolicy",
        "team-a",
        json!({"matchLabels": {"io.cilium.k8s.namespace.labels.team": "a"}}),
        None,
    );
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &object, "team-a").await;
    assert_eq!(body["status"]["selectedEndpoints"], 3, "shop's, not blog's");
}

#[tokio::test]
async fn an_invalid_policy_keeps_the_count_of_its_last_good_version() {
    let mut fixture = fixture();
    let good = policy("WeftNetworkPolicy", "web", web(), None);
    let carried = status_with::<WeftNetworkPolicy>(&good, 2);
    // Generation 2 names a CIDR the datapath cannot honour; meanwhile a third pod matches.
    let mut bad = policy("WeftNetworkPolicy", "web", web(), Some(carried));
    bad["metadata"]["generation"] = json!(2);
    bad["spec"]["egress"] = json!([{"toCIDR": ["999.1.1.1/8"]}]);
    relabel(
        &mut fixture.pods,
        pod("shop", "db-1", json!({"app": "web"})),
    );
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &bad, "web").await;
    let conditions = body["status"]["conditions"].as_array().expect("conditions");
    assert!(conditions
        .iter()
        .any(|c| c["type"] == "Valid" && c["status"] == "False"));
    assert_eq!(
        body["status"]["selectedEndpoints"], 2,
        "the agents keep enforcing the last good version: its count stays, not recounted"
    );

    // Invalid from the start: no count at all.
    let mut never = policy("WeftNetworkPolicy", "never", web(), None);
    never["spec"]["egress"] = json!([{"toCIDR": ["999.1.1.1/8"]}]);
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &never, "never").await;
    assert!(body["status"].get("selectedEndpoints").is_none(), "{body}");
}

#[tokio::test]
async fn before_the_caches_are_complete_the_conditions_are_written_without_a_count() {
    let (client, server) = client();
    // The pod list is half read.
    let (pod_store, mut pods) = reflector::store::<Pod>();
    pods.apply_watcher_event(&Event::Init);
    pods.apply_watcher_event(&Event::InitApply(
        serde_json::from_value(pod("shop", "web-1", json!({"app": "web"}))).expect("pod"),
    ));
    let (namespace_store, namespaces) = cache::<Namespace>(namespaces());
    let mut fixture = Fixture {
        ctx: Arc::new(Context::new(client, pod_store, namespace_store)),
        server,
        pods,
        namespaces,
    };
    let object = policy("WeftNetworkPolicy", "web", web(), None);
    let body = apply_of::<WeftNetworkPolicy>(&mut fixture, &object, "web").await;
    assert!(
        body["status"].get("selectedEndpoints").is_none(),
        "a count from half a list would be wrong: {body}"
    );
    assert!(body["status"]["conditions"].is_array());
}

// ------------------------------------------------------------------ the running controllers

/// Serves the controllers' LISTs and WATCHes from a small in-memory cluster: a WATCH is held
/// open until the test has events for it (then answered with them; the watcher watches again
/// from the last version), and a status apply is handed to the test, whose answer is also sent
/// to the policy watch as the API server would.
struct Cluster {
    server: ApiServer,
    lists: HashMap<&'static str, Vec<Value>>,
    held: HashMap<String, Exchange>,
    queued: HashMap<String, Vec<Value>>,
    version: u64,
}

impl Cluster {
    fn new(server: ApiServer, policies: Vec<Value>, clusterwide: Vec<Value>) -> Self {
        Self {
            server,
            lists: HashMap::from([
                (POLICIES, policies),
                (CLUSTERWIDE, clusterwide),
                (PODS, pods()),
                (NAMESPACES, namespaces()),
            ]),
            held: HashMap::new(),
            queued: HashMap::new(),
            version: 100,
        }
    }

    /// Sends `object` as a `MODIFIED` event on the watch of `collection`.
    fn modify(&mut self, collection: &str, mut object: Value) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.queued
            .entry(collection.to_owned())
            .or_default()
            .push(json!({"type": "MODIFIED", "object": object}));
        self.deliver(collection);
    }

    fn deliver(&mut self, collection: &str) {
        let ready = self.queued.get(collection).is_some_and(|q| !q.is_empty());
        if ready {
            if let Some(watch) = self.held.remove(collection) {
                let events = self.queued.remove(collection).unwrap_or_default();
                watch.respond_watch(&events);
            }
        }
    }

    /// Serves requests until a status apply arrives, which is returned unanswered.
    async fn next_apply(&mut self) -> Exchange {
        loop {
            let exchange = self.server.next().await;
            if let Some(apply) = self.serve(exchange) {
                return apply;
            }
        }
    }

    /// Serves requests for `wait`, failing on a status apply.
    async fn quiet_for(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        while let Ok(exchange) = tokio::time::timeout_at(until, self.server.next()).await {
            if let Some(apply) = self.serve(exchange) {
                panic!("unexpected status apply: {} {}", apply.uri, apply.body);
            }
        }
    }

    fn serve(&mut self, exchange: Exchange) -> Option<Exchange> {
        if exchange.method == Method::PATCH && exchange.path.ends_with("/status") {
            return Some(exchange);
        }
        assert_eq!(exchange.method, Method::GET, "{}", exchange.uri);
        let collection = *self
            .lists
            .keys()
            .find(|c| **c == exchange.path)
            .unwrap_or_else(|| panic!("unexpected request GET {}", exchange.uri));
        if exchange.query.contains("watch=true") {
            self.held.insert(collection.to_owned(), exchange);
            self.deliver(collection);
        } else {
            let (api_version, kind) = match collection {
                PODS => ("v1", "PodList"),
                NAMESPACES => ("v1", "NamespaceList"),
                POLICIES => ("weft.io/v1alpha1", "WeftNetworkPolicyList"),
                _ => ("weft.io/v1alpha1", "WeftClusterwideNetworkPolicyList"),
            };
            let items = self.lists[collection].clone();
            exchange.respond(
                200,
                json!({"apiVersion": api_version, "kind": kind,
                       "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
            );
        }
        None
    }

    /// Answers a status apply with the object carrying it, and sends the change to the
    /// policy's watch. Returns the applied status.
    fn answer(&mut self, apply: Exchange, mut object: Value) -> Value {
        let status = apply.body["status"].clone();
        object["status"] = status.clone();
        let collection = if object["kind"] == "WeftNetworkPolicy" {
            POLICIES
        } else {
            CLUSTERWIDE
        };
        apply.respond(200, object.clone());
        self.modify(collection, object);
        status
    }

    /// Serves until the status apply of `name` carries `count`, answering every apply on the
    /// way (an early one may have no count: the caches were not complete yet).
    async fn until_count(&mut self, object: &Value, count: i64) -> Value {
        for _ in 0..4 {
            let apply = self.next_apply().await;
            assert!(
                apply.uri.contains(&format!(
                    "/{}/status?",
                    object["metadata"]["name"].as_str().expect("name")
                )),
                "{}",
                apply.uri
            );
            let status = self.answer(apply, object.clone());
            match status.get("selectedEndpoints") {
                Some(seen) if *seen == json!(count) => return status,
                None => continue,
                Some(other) => panic!("selectedEndpoints {other}, expected {count}"),
            }
        }
        panic!("no status apply with selectedEndpoints {count}");
    }
}

fn quick() -> Settings {
    Settings {
        recount_interval: Duration::from_millis(300),
        debounce: Duration::from_millis(50),
    }
}

fn start(client: Client) -> tokio::task::JoinHandle<()> {
    start_reporting(client, ReconcileMetrics::unregistered())
}

fn start_reporting(client: Client, metrics: ReconcileMetrics) -> tokio::task::JoinHandle<()> {
    tokio::spawn(policy_controller::run_with(client, quick(), metrics))
}

#[tokio::test]
async fn a_pod_label_change_leads_to_a_new_status_apply_and_an_unchanged_count_to_none() {
    let (client, server) = client();
    let object = policy("WeftNetworkPolicy", "web", web(), None);
    let mut cluster = Cluster::new(server, vec![object.clone()], vec![]);
    let metrics = ReconcileMetrics::unregistered();
    let controllers = start_reporting(client, metrics.clone());

    cluster.until_count(&object, 2).await;
    // Its own status change came back through the watch: nothing more to write.
    cluster.quiet_for(Duration::from_millis(800)).await;
    assert!(
        metrics.count("weftnetworkpolicy", true) >= 1,
        "the reconciles are in the operator's metrics"
    );

    cluster.modify(PODS, pod("shop", "db-1", json!({"app": "web"})));
    let apply = cluster.next_apply().await;
    assert_eq!(
        apply.uri,
        status_uri("WeftNetworkPolicy", "web"),
        "the pod watch started a recount"
    );
    assert_eq!(apply.body["status"]["selectedEndpoints"], 3);
    cluster.answer(apply, object.clone());

    // Another label that moves no count starts a recount too, which writes nothing.
    cluster.modify(
        PODS,
        pod("shop", "web-1", json!({"app": "web", "tier": "front"})),
    );
    cluster.quiet_for(Duration::from_millis(1000)).await;

    // A pod going away is counted out.
    let mut gone = pod("shop", "web-2", json!({"app": "web"}));
    gone["metadata"]["resourceVersion"] = json!("900");
    cluster
        .queued
        .entry(PODS.to_owned())
        .or_default()
        .push(json!({"type": "DELETED", "object": gone}));
    cluster.deliver(PODS);
    let apply = cluster.next_apply().await;
    assert_eq!(apply.body["status"]["selectedEndpoints"], 2);
    cluster.answer(apply, object);
    controllers.abort();
}

#[tokio::test]
async fn a_namespace_label_change_recounts_clusterwide_policies() {
    let (client, server) = client();
    let object = policy(
        "WeftClusterwideNetworkPolicy",
        "team-a",
        json!({"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}}),
        None,
    );
    let mut cluster = Cluster::new(server, vec![], vec![object.clone()]);
    let controllers = start(client);

    cluster.until_count(&object, 3).await;
    cluster.modify(NAMESPACES, namespace("blog", "a"));
    let apply = cluster.next_apply().await;
    assert_eq!(
        apply.uri,
        status_uri("WeftClusterwideNetworkPolicy", "team-a")
    );
    assert_eq!(apply.body["status"]["selectedEndpoints"], 4);
    cluster.answer(apply, object);
    controllers.abort();
}
