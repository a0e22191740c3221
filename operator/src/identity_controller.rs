//! Identity allocation in Kubernetes mode: every pod's security label set gets a `WeftIdentity`.
//!
//! # Design (Cilium's CRD allocator, made race-free for several operator replicas)
//!
//! - A pod's security labels are its labels plus its namespace and the namespace's labels,
//!   minus the ignore list (`SecurityLabels::for_pod`, `LabelFilter` in `weft-core`). Host-
//!   network pods (they use the `host` identity) and finished pods need none.
//! - `WeftIdentity` is cluster-scoped; an object's **name is its number** in decimal and its
//!   spec holds the labels (`spec.id` repeats the name; both are immutable by a CEL rule). Numbers
//!   are `cluster ID << 16 | local`, local in 256..=65535 (`weft_core::identity::make_identity`).
//! - **Lookup first**: an [`IdentityIndex`] fed by a watch on `WeftIdentity` answers "which
//!   number stands for these labels" (the lowest if there are several). Allocation waits for its
//!   first complete list. An existing identity is reused without any write, unless the garbage
//!   collector has marked it unused (status `lastUsedTime`): then its status is rewritten as in
//!   use, which changes its resourceVersion so a concurrent delete (which carries the version it
//!   decided on as a precondition) fails with 409 instead of deleting an identity in use.
//! - **Create-if-absent claims a number**: allocation POSTs the object (not server-side apply:
//!   an apply of an existing name by the same field manager would overwrite it). The API server
//!   refuses a second object with the same name (409 AlreadyExists), so one number never gets
//!   two label sets, whatever the replicas' caches say.
//! - **Deterministic search order makes racing replicas meet**: the search starts at a number
//!   derived from a stable hash of the labels ([`preferred_local`]) and goes up, wrapping around,
//!   skipping numbers the index knows are taken. Two replicas allocating the same new label set
//!   try the same numbers in the same order: one's create wins, the other's gets 409, re-reads
//!   the object (GET), finds the same labels and adopts it. If the number holds other labels the
//!   loser moves on to the next. A 404 on the re-read (deleted in between) restarts the search.
//! - Every identity carries the label [`LABELS_HASH_LABEL`] (the labels' hash), so a label
//!   selector finds the identity of a label set, and `app.kubernetes.io/managed-by`.
//! - Remaining window, stated plainly: two replicas could still give one label set two numbers
//!   if, during a leader hand-over, both allocate it while a number on its search path is being
//!   garbage-collected (one sees it taken, the other free). Readers take the lowest number, and
//!   the other one, unused, is collected after the grace period. Leader election
//!   (`crate::leader`) makes even that overlap rare.
//! - Within one replica, allocations (and garbage-collection deletes) are serialised by a mutex,
//!   and each create is recorded in the index at once, so concurrent reconciles of pods with the
//!   same labels never race each other.
//!
//! Garbage collection of identities and of `WeftEndpoint` objects is in `crate::identity_gc`.
//!
//! Writes: POST `weftidentities` (field manager `weft-operator`), server-side apply of
//! `weftidentities/status`; the collector also deletes `weftidentities` and `weftendpoints`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use weft_core::cluster::ClusterId;
use weft_core::identity::{
    make_identity, search_order, LabelFilter, SecurityLabels, LOCAL_IDENTITY_CAPACITY,
};
use weft_crds::identity::{WeftIdentitySpec, WeftIdentityStatus};
use weft_crds::{WeftEndpoint, WeftIdentity};

use crate::conditions;
pub use crate::identity_index::{
    labels_hash, preferred_local, IdentityIndex, KnownIdentity, LABELS_HASH_LABEL,
};
use crate::identity_index::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::identity_status::{self, Usage};
use crate::metrics::Metrics;

/// Whose writes these are (create and server-side apply).
pub const FIELD_MANAGER: &str = "weft-operator";
/// The controller name in metrics.
pub const CONTROLLER: &str = "identity";
/// How long an identity no pod or endpoint uses is kept (Cilium's default too).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(15 * 60);
/// How often the garbage collector counts users.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(60);
/// Re-check every pod this often even without events (an identity deleted by hand comes back).
const RESYNC: Duration = Duration::from_secs(600);
/// Creates refused (409) in one allocation before giving up for now: a cache this far behind
/// catches up before the retry.
const MAX_CONFLICTS: usize = 16;
/// Times the search restarts because a number vanished between a 409 and the re-read.
const MAX_ROUNDS: usize = 4;

/// What identity allocation and garbage collection are configured with.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// This cluster's ID: the high bits of every number allocated.
    pub cluster_id: ClusterId,
    /// Label keys left out of identities (default: `LabelFilter::DEFAULT_IGNORED`).
    pub ignore: LabelFilter,
    /// How long an identity without users is kept before it is deleted.
    pub gc_grace: Duration,
    /// How often the garbage collector runs.
    pub gc_interval: Duration,
}

impl IdentityConfig {
    /// The defaults: the default ignore list, 15 minutes' grace, a pass a minute.
    pub fn new(cluster_id: ClusterId) -> Self {
        Self {
            cluster_id,
            ignore: LabelFilter::default(),
            gc_grace: DEFAULT_GC_GRACE,
            gc_interval: DEFAULT_GC_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("namespace {namespace} is not in the cache yet")]
    NamespaceUnknown { namespace: String },
    #[error("creating WeftIdentity {id}: {source}")]
    Create {
        id: u32,
        #[source]
        source: kube::Error,
    },
    #[error("reading WeftIdentity {id}: {source}")]
    Read {
        id: u32,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of WeftIdentity {id}: {source}")]
    WriteStatus {
        id: u32,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading Pod {name}: {source}")]
    ReadPod {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "all {LOCAL_IDENTITY_CAPACITY} identities of cluster {cluster_id} are taken: \
         lower the garbage-collection grace period or ignore labels that differ per pod"
    )]
    Exhausted { cluster_id: ClusterId },
    #[error(
        "{conflicts} creates for labels {{{labels}}} found their number taken; \
         retrying once the WeftIdentity cache has caught up"
    )]
    Contended {
        labels: SecurityLabels,
        conflicts: usize,
    },
}

/// What every reconcile and garbage-collection pass needs.
pub struct Context {
    pub client: Client,
    pub config: IdentityConfig,
    /// Every pod (the controller's cache).
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub endpoints: Store<WeftEndpoint>,
    pub identities: Arc<IdentityIndex>,
    pub metrics: Metrics,
    /// Warning Events for identities the operator does not allocate.
    pub recorder: Recorder,
    /// Serialises this replica's allocations and garbage-collection deletes.
    pub(crate) allocation: tokio::sync::Mutex<()>,
}

impl Context {
    pub fn new(
        client: Client,
        config: IdentityConfig,
        pods: Store<Pod>,
        namespaces: Store<Namespace>,
        endpoints: Store<WeftEndpoint>,
        identities: Arc<IdentityIndex>,
        metrics: Metrics,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), conditions::REPORTER.into()),
            client,
            config,
            pods,
            namespaces,
            endpoints,
            identities,
            metrics,
            allocation: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn identity_api(&self) -> Api<WeftIdentity> {
        Api::all(self.client.clone())
    }
}

/// Whether `pod` needs an identity of its own: not on the host network (those are `host`) and
/// not finished (no network any more).
pub fn needs_identity(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.host_network)
        .unwrap_or(false);
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !host_network && !finished
}

/// The security labels of `pod`, from the namespace cache.
pub fn pod_security_labels(
    pod: &Pod,
    namespaces: &Store<Namespace>,
    ignore: &LabelFilter,
) -> Result<SecurityLabels, Error> {
    let namespace = pod.namespace().unwrap_or_else(|| "default".to_owned());
    let ns =
        namespaces
            .get(&ObjectRef::new(&namespace))
            .ok_or_else(|| Error::NamespaceUnknown {
                namespace: namespace.clone(),
            })?;
    Ok(SecurityLabels::for_pod(
        &namespace,
        pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        ns.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        ignore,
    ))
}

/// Makes sure the pod's label set has a `WeftIdentity`. Records the reconcile in the metrics.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_pod(&pod, &ctx).await;
    ctx.metrics
        .reconcile
        .observe(CONTROLLER, started.elapsed(), result.is_ok());
    result
}

async fn reconcile_pod(pod: &Pod, ctx: &Context) -> Result<Action, Error> {
    if !needs_identity(pod) {
        return Ok(Action::await_change());
    }
    ctx.identities.wait_ready().await;
    let _ = ctx.namespaces.wait_until_ready().await;
    let labels = pod_security_labels(pod, &ctx.namespaces, &ctx.config.ignore)?;
    let id = ensure_identity(ctx, &labels).await?;
    tracing::debug!(
        pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
        identity = id,
        "pod identity"
    );
    Ok(Action::requeue(RESYNC))
}

pub fn error_policy(_pod: Arc<Pod>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::NamespaceUnknown { .. } => Action::requeue(Duration::from_secs(2)),
        _ => {
            tracing::warn!(%error, "identity allocation failed; retrying");
            Action::requeue(Duration::from_secs(10))
        }
    }
}

/// Server-side applies the whole status `known` should carry with `usage` (conditions
/// included: see `crate::identity_status`); returns the object as written.
pub(crate) async fn write_status(
    ctx: &Context,
    known: &KnownIdentity,
    usage: Usage,
) -> Result<WeftIdentity, kube::Error> {
    let status =
        identity_status::desired(known, ctx.config.cluster_id, usage, &Time(Timestamp::now()));
    apply_status(ctx, known.id, &status).await
}

/// Server-side applies `status` (whole) to identity `id` and records the result in the index.
pub(crate) async fn apply_status(
    ctx: &Context,
    id: u32,
    status: &WeftIdentityStatus,
) -> Result<WeftIdentity, kube::Error> {
    let written =
        conditions::apply_status(&ctx.identity_api(), &id.to_string(), "WeftIdentity", status)
            .await?;
    ctx.identities.insert(&written);
    Ok(written)
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// The identity of `labels`: the existing one (revived if marked unused), or a newly claimed
/// number. See the module comment for why this is safe with several replicas.
pub async fn ensure_identity(ctx: &Context, labels: &SecurityLabels) -> Result<u32, Error> {
    let cluster = ctx.config.cluster_id;
    // The common case (a resync, a pod of a known label set) needs no lock.
    if let Some(known) = ctx.identities.identity_for(labels, cluster) {
        if !known.marked_unused() {
            return Ok(known.id);
        }
    }
    let _guard = ctx.allocation.lock().await;
    let mut rounds = 0;
    loop {
        rounds += 1;
        if let Some(known) = ctx.identities.identity_for(labels, cluster) {
            if !known.marked_unused() {
                return Ok(known.id);
            }
            // Back in use: say so, which also defeats a delete decided on the old version.
            match write_status(ctx, &known, Usage::in_use(1)).await {
                Ok(_) => {
                    tracing::info!(identity = known.id, labels = %labels, "unused identity in use again");
                    return Ok(known.id);
                }
                Err(error) if is_status(&error, 404) && rounds < MAX_ROUNDS => {
                    // Collected meanwhile: allocate again (most likely the same number).
                    ctx.identities.remove(known.id);
                    continue;
                }
                Err(source) => {
                    return Err(Error::WriteStatus {
                        id: known.id,
                        source,
                    })
                }
            }
        }
        match allocate(ctx, labels).await? {
            Some(id) => return Ok(id),
            None if rounds < MAX_ROUNDS => continue,
            None => {
                return Err(Error::Contended {
                    labels: labels.clone(),
                    conflicts: rounds,
                })
            }
        }
    }
}

/// The object allocation creates for number `id`.
pub fn identity_object(id: u32, labels: &SecurityLabels) -> WeftIdentity {
    let mut object = WeftIdentity::new(
        &id.to_string(),
        WeftIdentitySpec {
            id: i64::from(id),
            security_labels: labels.as_map().clone(),
        },
    );
    object.metadata.labels = Some(BTreeMap::from([
        (LABELS_HASH_LABEL.to_owned(), labels_hash(labels)),
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
    ]));
    object
}

/// Searches from the labels' preferred number for one to claim. `Ok(None)`: a number vanished
/// between a 409 and its re-read; the caller starts over.
async fn allocate(ctx: &Context, labels: &SecurityLabels) -> Result<Option<u32>, Error> {
    let cluster = ctx.config.cluster_id;
    let api = ctx.identity_api();
    let mut conflicts = 0;
    for local in search_order(labels, LOCAL_IDENTITY_CAPACITY) {
        let id = make_identity(cluster, local);
        if let Some(known) = ctx.identities.get(id) {
            if known.consistent && &known.labels == labels {
                return Ok(Some(id));
            }
            continue;
        }
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match api.create(&params, &identity_object(id, labels)).await {
            Ok(created) => {
                let known = ctx.identities.insert(&created);
                ctx.metrics.identity.allocated.inc();
                tracing::info!(identity = id, labels = %labels, "allocated identity");
                // Conditions now rather than at the next garbage-collection pass, which also
                // writes them if this fails: the identity is allocated either way.
                if let Some(known) = known {
                    if let Err(error) = write_status(ctx, &known, Usage::in_use(1)).await {
                        tracing::warn!(identity = id, %error, "cannot write the new identity's status; the next garbage-collection pass will");
                    }
                }
                return Ok(Some(id));
            }
            Err(error) if is_status(&error, 409) => {
                ctx.metrics.identity.conflicts.inc();
                conflicts += 1;
                // Taken (by another replica, or our cache is behind): see by what.
                match api.get_opt(&id.to_string()).await {
                    Ok(Some(existing)) => {
                        let known = ctx.identities.insert(&existing);
                        if known.is_some_and(|k| k.consistent && &k.labels == labels) {
                            tracing::info!(identity = id, labels = %labels, "adopted the identity another replica allocated");
                            return Ok(Some(id));
                        }
                    }
                    Ok(None) => return Ok(None),
                    Err(source) => return Err(Error::Read { id, source }),
                }
                if conflicts >= MAX_CONFLICTS {
                    return Err(Error::Contended {
                        labels: labels.clone(),
                        conflicts,
                    });
                }
            }
            Err(source) => return Err(Error::Create { id, source }),
        }
    }
    Err(Error::Exhausted {
        cluster_id: cluster,
    })
}

/// Turns namespace watch events into a trigger that fires when a namespace's labels change
/// (they are part of its pods' identities). The initial list only records them.
fn namespace_label_changes<S>(events: S) -> impl Stream<Item = ()> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<Namespace>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns)) => {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                match seen.insert(ns.name_any(), labels.clone()) {
                    Some(before) => before != labels,
                    None => false,
                }
            }
            Ok(watcher::Event::Delete(ns)) => {
                seen.remove(&ns.name_any());
                false
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "watching Namespaces; retrying");
                false
            }
        };
        futures::future::ready(changed.then_some(()))
    })
}

/// Runs identity allocation (a controller over Pods, re-run when namespace labels change) and
/// garbage collection (identities and endpoints, see `identity_gc`) until the future is dropped.
/// Run it only while leader (`crate::leader::LeaderElector::run_while_leader`); dropping it
/// stops every watch.
///
/// - `client`: the operator's client.
/// - `config`: cluster ID (`--cluster-id`), ignore list, GC grace period and interval.
/// - `metrics`: from `Metrics::register` on the admin registry (`Metrics::unregistered()` works
///   too).
///
/// RBAC: pods and namespaces get/list/watch; weftidentities get/list/watch/create/delete;
/// weftidentities/status patch; weftendpoints list/watch/delete.
pub async fn run(client: Client, config: IdentityConfig, metrics: Metrics) {
    let identities = Arc::new(IdentityIndex::new());
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let (endpoints, endpoint_writer) = reflector::store::<WeftEndpoint>();
    let controller = Controller::new(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        controller.store(),
        namespaces,
        endpoints,
        Arc::clone(&identities),
        metrics,
    ));
    let namespace_events = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(namespace_writer);
    let allocation = controller
        .reconcile_all_on(namespace_label_changes(namespace_events))
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "identity reconcile");
            }
        });
    let endpoint_feed = watcher(
        Api::<WeftEndpoint>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(endpoint_writer)
    .for_each(|event| async move {
        if let Err(error) = event {
            tracing::warn!(%error, "watching WeftEndpoint objects; retrying");
        }
    });
    let index_feed = crate::identity_index::feed(Api::all(client), identities);
    let gc = crate::identity_gc::run(Arc::clone(&ctx));
    tokio::join!(allocation, endpoint_feed, index_feed, gc);
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn namespace(name: &str, team: &str) -> Namespace {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"team": team}},
        }))
        .expect("namespace")
    }

    #[tokio::test]
    async fn only_namespace_label_changes_trigger_a_reconcile_of_all_pods() {
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(namespace("shop", "a"))),
            Ok(watcher::Event::InitDone),
            // An annotation or status change: same labels.
            Ok(watcher::Event::Apply(namespace("shop", "a"))),
            Ok(watcher::Event::Apply(namespace("blog", "b"))),
            Ok(watcher::Event::Apply(namespace("shop", "c"))),
            Ok(watcher::Event::Delete(namespace("blog", "b"))),
            // Changed while the watch was down: seen in the relist.
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(namespace("shop", "d"))),
            Ok(watcher::Event::InitDone),
        ];
        let triggers: Vec<()> = namespace_label_changes(futures::stream::iter(events))
            .collect()
            .await;
        assert_eq!(triggers.len(), 2);
    }

    /// `run` can be handed to `LeaderElector::run_while_leader` (which spawns it).
    #[allow(dead_code)]
    fn run_is_send_and_static(client: Client, config: IdentityConfig, metrics: Metrics) {
        fn spawnable<T: std::future::Future<Output = ()> + Send + 'static>(_: &T) {}
        spawnable(&run(client, config, metrics));
    }

    #[test]
    fn host_network_and_finished_pods_need_no_identity() {
        let pod = |spec: Value, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop"},
                "spec": spec, "status": {"phase": phase},
            }))
            .expect("pod")
        };
        let containers = json!([{"name": "app"}]);
        assert!(needs_identity(&pod(
            json!({"containers": containers}),
            "Running"
        )));
        assert!(needs_identity(&pod(
            json!({"containers": containers}),
            "Pending"
        )));
        assert!(!needs_identity(&pod(
            json!({"containers": containers, "hostNetwork": true}),
            "Running"
        )));
        assert!(!needs_identity(&pod(
            json!({"containers": containers}),
            "Succeeded"
        )));
        assert!(!needs_identity(&pod(
            json!({"containers": containers}),
            "Failed"
        )));
    }
}
