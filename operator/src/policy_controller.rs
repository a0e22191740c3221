//! Reconciles `WeftNetworkPolicy` and `WeftClusterwideNetworkPolicy`: checks each against what
//! the datapath can honour, counts the endpoints it selects, and writes its status (conditions,
//! `observedGeneration`, `selectedEndpoints`; server-side apply on the status subresource, field
//! manager `weft-operator`) only when it changed. Never writes a spec.
//!
//! # Recounting when pods or namespaces change
//!
//! The controllers keep reflector caches of every Pod and Namespace (how a count is made:
//! [`crate::policy_status`]). A change that can move a count — a pod's labels, a pod becoming
//! or ceasing to be an endpoint (address, phase), a pod or namespace appearing or going, a
//! namespace's labels — re-reconciles **every** policy; anything else (status churn such as
//! readiness, annotations) triggers nothing. Working out which policies a change affects would
//! need every policy's converted selector kept per pod change; recounting all of them is
//! simpler and always right. Its cost, and what bounds it:
//!
//! - one recount reconciles every policy, each matching the pods in its scope (a namespaced
//!   policy: its namespace's pods; a clusterwide one: every pod), so a recount costs about
//!   policies × pods-in-scope label matches, in memory, and writes only the statuses whose
//!   count changed;
//! - recounts are throttled ([`Settings::recount_interval`], 5 s): the first change starts one
//!   at once, changes during the next interval are folded into one more at its end, so a
//!   rollout of hundreds of pods costs one recount per interval and a count is at most one
//!   interval (plus the debounce) behind;
//! - the controllers debounce requests ([`Settings::debounce`], 1 s), so a recount and a
//!   policy's own change close together reconcile it once.
//!
//! Until both caches have their first complete list, a policy's status is written without a
//! (new) count; the caches' first list starts a recount. RBAC: pods and namespaces list, watch.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use weft_core::identity::LabelFilter;
use weft_core::policy::model::Policy;
use weft_crds::policy::PolicyStatus;
use weft_crds::policy_model::{self, PolicyError};
use weft_crds::{WeftClusterwideNetworkPolicy, WeftNetworkPolicy};

use crate::conditions::{self, ErrorBackoff};
use crate::metrics::ReconcileMetrics;
use crate::policy_status::{self, desired_status, is_endpoint, selected_endpoints};

/// Whose writes these are, for server-side apply.
pub const FIELD_MANAGER: &str = "weft-operator";
/// Re-check valid policies this often even without events.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the status of {kind} {name}: {source}")]
    WriteStatus {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    /// Every pod, to count the endpoints a policy selects.
    pub pods: Store<Pod>,
    /// Every namespace, for the namespace labels in pods' security labels.
    pub namespaces: Store<Namespace>,
    /// Label keys left out of security labels: identity allocation's default.
    pub ignore: LabelFilter,
    pub backoff: ErrorBackoff,
    /// Warning Events for invalid policies.
    pub recorder: Recorder,
}

impl Context {
    pub fn new(client: Client, pods: Store<Pod>, namespaces: Store<Namespace>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), conditions::REPORTER.into()),
            client,
            pods,
            namespaces,
            ignore: LabelFilter::default(),
            backoff: ErrorBackoff::default(),
        }
    }

    /// Whether both caches have had their first complete list.
    fn caches_ready(&self) -> bool {
        matches!(self.pods.wait_until_ready().now_or_never(), Some(Ok(())))
            && matches!(
                self.namespaces.wait_until_ready().now_or_never(),
                Some(Ok(()))
            )
    }
}

/// How often the controllers recount and how they debounce; [`Settings::default`] is what the
/// operator runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// At most one recount of every policy per interval (see the module comment).
    pub recount_interval: Duration,
    /// The controllers' debounce of reconcile requests.
    pub debounce: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            recount_interval: Duration::from_secs(5),
            debounce: Duration::from_secs(1),
        }
    }
}

/// The two policy kinds share a reconciler; this is what differs.
pub trait PolicyObject:
    Resource<DynamicType = ()>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn convert(&self) -> Result<Policy, PolicyError>;
    fn status(&self) -> Option<&PolicyStatus>;
    fn api(client: Client, namespace: Option<&str>) -> Api<Self>;
}

impl PolicyObject for WeftNetworkPolicy {
    const KIND: &'static str = "WeftNetworkPolicy";
    fn convert(&self) -> Result<Policy, PolicyError> {
        policy_model::weft_policy(self)
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, namespace: Option<&str>) -> Api<Self> {
        Api::namespaced(client, namespace.unwrap_or("default"))
    }
}

impl PolicyObject for WeftClusterwideNetworkPolicy {
    const KIND: &'static str = "WeftClusterwideNetworkPolicy";
    fn convert(&self) -> Result<Policy, PolicyError> {
        policy_model::clusterwide_policy(self)
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
}

pub async fn reconcile<P: PolicyObject>(
    policy: Arc<P>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let outcome = policy.convert();
    let counted = match &outcome {
        Ok(model) if ctx.caches_ready() => Some(selected_endpoints(
            model,
            &ctx.pods,
            &ctx.namespaces,
            &ctx.ignore,
        )),
        _ => None,
    };
    let status = desired_status(
        policy.meta().generation,
        &outcome,
        policy.status(),
        counted,
        Time(Timestamp::now()),
    );
    if policy.status() != Some(&status) {
        let api = P::api(ctx.client.clone(), policy.meta().namespace.as_deref());
        conditions::apply_status(&api, &policy.name_any(), P::KIND, &status)
            .await
            .map_err(|source| Error::WriteStatus {
                kind: P::KIND,
                name: policy.name_any(),
                source,
            })?;
        // Said when the conditions change, not on every recount.
        let conditions_changed =
            policy.status().map(|current| &current.conditions) != Some(&status.conditions);
        if conditions_changed {
            conditions::warn_if_invalid(
                &ctx.recorder,
                &policy.object_ref(&()),
                P::KIND,
                &policy_status::outcome(&outcome),
            )
            .await;
        }
    }
    ctx.backoff.succeeded(&ErrorBackoff::key(policy.as_ref()));
    Ok(Action::requeue(RESYNC))
}

pub fn error_policy<P: PolicyObject>(policy: Arc<P>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&ErrorBackoff::key(policy.as_ref()));
    tracing::warn!(%error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn fingerprint(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Keeps only what counting reads of a pod (name, namespace, labels, `hostNetwork`, phase,
/// addresses), so this cache costs a fraction of the full objects.
fn slim_pod(pod: &mut Pod) {
    let metadata = &mut pod.metadata;
    metadata.annotations = None;
    metadata.managed_fields = None;
    metadata.owner_references = None;
    metadata.finalizers = None;
    let host_network = pod.spec.as_ref().and_then(|spec| spec.host_network);
    pod.spec = Some(PodSpec {
        host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

/// Keeps only a namespace's name and labels.
fn slim_namespace(namespace: &mut Namespace) {
    namespace.metadata.annotations = None;
    namespace.metadata.managed_fields = None;
    namespace.spec = None;
    namespace.status = None;
}

/// What of a pod can move a count: whether it is an endpoint and, if so, its labels.
fn pod_view(pod: &Pod) -> Option<u64> {
    is_endpoint(pod).then(|| fingerprint(pod.labels()))
}

/// What of a namespace can move a count: that it exists, and its labels.
fn namespace_view(namespace: &Namespace) -> Option<u64> {
    Some(fingerprint(namespace.labels()))
}

/// Turns watch events into a trigger that fires when `view` of an object changes: it appears
/// or goes (as `Some`), or its view differs. The first complete list fires once (the caches
/// are complete: counting can start); a relist after a broken watch fires if anything differs
/// from before, deletions included. Keeps a fingerprint per object, not the object.
fn selection_changes<K, S>(
    events: S,
    view: fn(&K) -> Option<u64>,
) -> impl Stream<Item = ()> + Send + 'static
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    type Key = (Option<String>, String);
    let key = |object: &K| (object.meta().namespace.clone(), object.name_any());
    let mut seen: HashMap<Key, u64> = HashMap::new();
    let mut relist: Option<HashMap<Key, u64>> = None;
    let mut listed = false;
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(object)) => {
                let now = view(&object);
                let before = match now {
                    Some(now) => seen.insert(key(&object), now),
                    None => seen.remove(&key(&object)),
                };
                before != now
            }
            Ok(watcher::Event::Delete(object)) => seen.remove(&key(&object)).is_some(),
            Ok(watcher::Event::Init) => {
                relist = Some(HashMap::new());
                false
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let (Some(relist), Some(now)) = (relist.as_mut(), view(&object)) {
                    relist.insert(key(&object), now);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                let now = relist.take().unwrap_or_default();
                let changed = !listed || now != seen;
                seen = now;
                listed = true;
                changed
            }
            Err(error) => {
                tracing::warn!(%error, "watching for policy recounts; retrying");
                false
            }
        };
        futures::future::ready(changed.then_some(()))
    })
}

/// One controller's recount trigger: fires when `changes` has news, at most once per
/// `interval` (news during an interval fire once at its end). Ends when the sender is gone.
fn throttled(
    changes: tokio::sync::watch::Receiver<()>,
    interval: Duration,
) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold((changes, false), move |(mut changes, fired)| async move {
        if fired {
            tokio::time::sleep(interval).await;
        }
        changes.changed().await.ok()?;
        Some(((), (changes, true)))
    })
}

/// Runs the policy controllers until the process stops (or the future is dropped), with the
/// default [`Settings`].
///
/// RBAC: `weftnetworkpolicies` and `weftclusterwidenetworkpolicies` list, watch, and their
/// `/status` patch; `pods` and `namespaces` list, watch.
pub async fn run(client: Client, metrics: ReconcileMetrics) {
    run_with(client, Settings::default(), metrics).await;
}

/// [`run`] with `settings`.
pub async fn run_with(client: Client, settings: Settings, metrics: ReconcileMetrics) {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let ctx = Arc::new(Context::new(client.clone(), pods, namespaces));
    let pod_changes = selection_changes(
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(slim_pod)
            .reflect(pod_writer),
        pod_view,
    );
    let namespace_changes = selection_changes(
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(slim_namespace)
        .reflect(namespace_writer),
        namespace_view,
    );
    // One feed for both controllers; a watch channel folds news neither has seen yet into one.
    let (news, _) = tokio::sync::watch::channel(());
    let recount_namespaced = throttled(news.subscribe(), settings.recount_interval);
    let recount_clusterwide = throttled(news.subscribe(), settings.recount_interval);
    let feed = futures::stream::select(pod_changes, namespace_changes).for_each(|()| {
        news.send_replace(());
        futures::future::ready(())
    });
    let config = controller::Config::default().debounce(settings.debounce);
    let namespaced = Controller::new(
        Api::<WeftNetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(config.clone())
    .reconcile_all_on(recount_namespaced)
    .run(
        metrics.instrument("weftnetworkpolicy", reconcile::<WeftNetworkPolicy>),
        error_policy::<WeftNetworkPolicy>,
        Arc::clone(&ctx),
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "WeftNetworkPolicy reconcile");
        }
    });
    let clusterwide = Controller::new(
        Api::<WeftClusterwideNetworkPolicy>::all(client),
        watcher::Config::default(),
    )
    .with_config(config)
    .reconcile_all_on(recount_clusterwide)
    .run(
        metrics.instrument(
            "weftclusterwidenetworkpolicy",
            reconcile::<WeftClusterwideNetworkPolicy>,
        ),
        error_policy::<WeftClusterwideNetworkPolicy>,
        ctx,
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "WeftClusterwideNetworkPolicy reconcile");
        }
    });
    tokio::join!(feed, namespaced, clusterwide);
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};

    use super::*;

    type Verifier = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// An empty cache, complete (as after the first list).
    fn empty<K>() -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = reflector::store::<K>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        store
    }

    fn context() -> (Arc<Context>, Verifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            Arc::new(Context::new(
                Client::new(service, "default"),
                empty(),
                empty(),
            )),
            handle,
        )
    }

    fn policy(egress_cidr: &str, status: Option<Value>) -> WeftNetworkPolicy {
        let mut object = json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": "WeftNetworkPolicy",
            "metadata": {"name": "egress", "namespace": "ml", "generation": 3, "resourceVersion": "10"},
            "spec": {"endpointSelector": {}, "egress": [{"toCIDR": [egress_cidr]}]},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        serde_json::from_value(object).expect("policy")
    }

    /// Answers the next request as the API server would, handing its body to `check`.
    async fn expect_status_patch(
        handle: &mut Verifier,
        object: WeftNetworkPolicy,
        check: impl FnOnce(&Value),
    ) {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method(), Method::PATCH);
        let uri = request.uri().to_string();
        assert!(
            uri.starts_with(
                "/apis/weft.io/v1alpha1/namespaces/ml/weftnetworkpolicies/egress/status?"
            ),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=weft-operator") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(
            request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/apply-patch+yaml"),
            "server-side apply"
        );
        let body: Value =
            serde_json::from_slice(&request.into_body().collect_bytes().await.expect("body"))
                .expect("JSON body");
        assert!(body.get("spec").is_none(), "never writes the spec");
        check(&body);
        let mut answered = serde_json::to_value(&object).expect("object");
        answered["status"] = body["status"].clone();
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&answered).expect("json")))
                .expect("response"),
        );
    }

    #[tokio::test]
    async fn an_invalid_policy_gets_valid_false_naming_the_field() {
        let (ctx, mut handle) = context();
        let object = policy("999.1.1.1/8", None);
        let server = tokio::spawn({
            let object = object.clone();
            async move {
                expect_status_patch(&mut handle, object, |body| {
                    let conditions = body["status"]["conditions"].as_array().expect("conditions");
                    let valid = conditions
                        .iter()
                        .find(|c| c["type"] == "Valid")
                        .expect("Valid");
                    assert_eq!(valid["status"], "False");
                    assert_eq!(valid["reason"], "BadCIDR");
                    assert!(valid["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("spec.egress[0].toCIDR[0].cidr"));
                    assert_eq!(body["status"]["observedGeneration"], 3);
                    assert!(conditions
                        .iter()
                        .any(|c| c["type"] == "Stalled" && c["status"] == "True"));
                })
                .await;
            }
        });
        reconcile(Arc::new(object), ctx).await.expect("reconcile");
        server.await.expect("verifier");
    }

    #[tokio::test]
    async fn a_valid_policy_becomes_ready() {
        let (ctx, mut handle) = context();
        let object = policy("10.0.0.0/8", None);
        let server = tokio::spawn({
            let object = object.clone();
            async move {
                expect_status_patch(&mut handle, object, |body| {
                    let conditions = body["status"]["conditions"].as_array().expect("conditions");
                    for (kind, status) in [
                        ("Valid", "True"),
                        ("Ready", "True"),
                        ("Reconciling", "False"),
                        ("Stalled", "False"),
                    ] {
                        assert!(
                            conditions
                                .iter()
                                .any(|c| c["type"] == kind && c["status"] == status),
                            "{kind}={status}: {conditions:?}"
                        );
                    }
                })
                .await;
            }
        });
        reconcile(Arc::new(object), ctx).await.expect("reconcile");
        server.await.expect("verifier");
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_written_again() {
        let (ctx, mut handle) = context();
        // The status the first reconcile would write.
        let first = policy("10.0.0.0/8", None);
        let status = desired_status(
            Some(3),
            &first.convert(),
            None,
            Some(0),
            Time(Timestamp::now()),
        );
        let current = policy(
            "10.0.0.0/8",
            Some(serde_json::to_value(&status).expect("status")),
        );
        // A write would wait for an answer that never comes: finishing at all means no write.
        tokio::time::timeout(Duration::from_secs(2), reconcile(Arc::new(current), ctx))
            .await
            .expect("reconcile finished without writing")
            .expect("reconcile");
        // Either nothing arrives, or the client is gone without having sent anything.
        let next = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
        assert!(matches!(next, Err(_) | Ok(None)), "no request was made");
    }

    #[tokio::test]
    async fn an_api_error_is_a_reconcile_error_for_the_retry_policy() {
        let (ctx, mut handle) = context();
        let object = policy("10.0.0.0/8", None);
        let server = tokio::spawn(async move {
            let (_request, send) = handle.next_request().await.expect("a request");
            let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"});
            send.send_response(
                Response::builder()
                    .status(409)
                    .body(Body::from(serde_json::to_vec(&conflict).expect("json")))
                    .expect("response"),
            );
        });
        let error = reconcile(Arc::new(object), ctx)
            .await
            .expect_err("a 409 is an error");
        server.await.expect("verifier");
        assert!(
            error.to_string().contains("WeftNetworkPolicy egress"),
            "{error}"
        );
        let _ = error_policy::<WeftNetworkPolicy>;
    }

    fn pod(name: &str, app: &str, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": phase, "podIP": "10.1.0.9",
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("pod")
    }

    fn namespace(name: &str, team: &str) -> Namespace {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"team": team}},
        }))
        .expect("namespace")
    }

    #[tokio::test]
    async fn only_changes_that_can_move_a_count_trigger_a_recount() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        // Each case: events, and how many recounts they start.
        let base = || {
            vec![
                Init,
                InitApply(pod("web-1", "web", "Running", true)),
                InitDone,
            ]
        };
        let cases: Vec<(&str, Vec<watcher::Event<Pod>>, usize)> = vec![
            ("the first complete list (counting can start)", base(), 1),
            (
                "readiness flaps: no",
                [base(), vec![Apply(pod("web-1", "web", "Running", false))]].concat(),
                1,
            ),
            (
                "a label change",
                [base(), vec![Apply(pod("web-1", "db", "Running", true))]].concat(),
                2,
            ),
            (
                "a new endpoint, then one that is not (finished)",
                [
                    base(),
                    vec![
                        Apply(pod("web-2", "web", "Running", true)),
                        Apply(pod("job-1", "job", "Succeeded", false)),
                    ],
                ]
                .concat(),
                2,
            ),
            (
                "an endpoint finishing, then deleted",
                [
                    base(),
                    vec![
                        Apply(pod("web-1", "web", "Failed", false)),
                        Delete(pod("web-1", "web", "Failed", false)),
                    ],
                ]
                .concat(),
                2,
            ),
            (
                "a relist with the same pods: no",
                [base(), base()].concat(),
                1,
            ),
            (
                "a relist missing a pod deleted while the watch was down",
                [base(), vec![Init, InitDone]].concat(),
                2,
            ),
        ];
        for (case, events, expected) in cases {
            let fired: Vec<()> =
                selection_changes(futures::stream::iter(events.into_iter().map(Ok)), pod_view)
                    .collect()
                    .await;
            assert_eq!(fired.len(), expected, "{case}");
        }
        let namespaces: Vec<()> = selection_changes(
            futures::stream::iter(
                vec![
                    Init,
                    InitApply(namespace("shop", "a")),
                    InitDone,
                    Apply(namespace("shop", "a")),
                    Apply(namespace("shop", "b")),
                    Apply(namespace("blog", "b")),
                    Delete(namespace("blog", "b")),
                ]
                .into_iter()
                .map(Ok),
            ),
            namespace_view,
        )
        .collect()
        .await;
        assert_eq!(
            namespaces.len(),
            4,
            "first list, label change, new namespace, deleted namespace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recounts_are_throttled_and_news_during_an_interval_fires_once_at_its_end() {
        let (news, _) = tokio::sync::watch::channel(());
        let trigger = throttled(news.subscribe(), Duration::from_secs(5));
        futures::pin_mut!(trigger);
        let start = tokio::time::Instant::now();
        news.send_replace(());
        trigger.next().await.expect("fires");
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first news fires at once"
        );
        for _ in 0..100 {
            news.send_replace(());
        }
        trigger.next().await.expect("fires");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "then once per interval"
        );
        // Nothing new: nothing fires, however long.
        let quiet = tokio::time::timeout(Duration::from_secs(60), trigger.next()).await;
        assert!(quiet.is_err());
        news.send_replace(());
        trigger.next().await.expect("fires");
        drop(news);
        assert!(trigger.next().await.is_none(), "ends with its sender");
    }

    #[test]
    fn the_slim_cache_keeps_what_counting_reads() {
        let full = |extra: serde_json::Value| -> Pod {
            let mut object = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                             "annotations": {"big": "x".repeat(4096)}, "resourceVersion": "7",
                             "managedFields": [{"manager": "kubelet"}]},
                "spec": {"containers": [{"name": "app", "image": "echo", "env": [{"name": "A", "value": "1"}]}],
                         "nodeName": "node-1"},
                "status": {"phase": "Running", "podIP": "10.1.0.9", "podIPs": [{"ip": "10.1.0.9"}],
                           "containerStatuses": [{"name": "app", "image": "echo", "imageID": "", "ready": true, "restartCount": 0}]},
            });
            for (path, value) in extra.as_object().expect("object") {
                let (section, key) = path.split_once('.').expect("section.key");
                object[section][key] = value.clone();
            }
            serde_json::from_value(object).expect("pod")
        };
        for extra in [
            json!({}),
            json!({"spec.hostNetwork": true}),
            json!({"status.phase": "Succeeded"}),
            json!({"status.podIP": null, "status.podIPs": null}),
        ] {
            let pod = full(extra.clone());
            let mut slim = pod.clone();
            slim_pod(&mut slim);
            assert_eq!(is_endpoint(&slim), is_endpoint(&pod), "{extra}");
            assert_eq!(pod_view(&slim), pod_view(&pod), "{extra}");
            assert_eq!(slim.labels(), pod.labels());
            assert_eq!(slim.namespace(), pod.namespace());
            assert!(slim.annotations().is_empty() && slim.metadata.managed_fields.is_none());
            let size = |pod: &Pod| serde_json::to_vec(pod).expect("json").len();
            assert!(
                size(&slim) * 4 < size(&pod),
                "{} vs {}",
                size(&slim),
                size(&pod)
            );
        }
        let mut ns = namespace("shop", "a");
        ns.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into());
        slim_namespace(&mut ns);
        assert_eq!(namespace_view(&ns), namespace_view(&namespace("shop", "a")));
    }
}
