//! Garbage collection of `WeftIdentity` and `WeftEndpoint` objects, one pass every
//! `IdentityConfig::gc_interval` on the leader.
//!
//! A pass:
//! 1. **Endpoints**: a `WeftEndpoint` is named and namespaced as its pod (agents write one per
//!    pod, as Cilium's CiliumEndpoint). One whose pod is gone from the cache — or whose `Pod`
//!    owner reference names another uid, i.e. the pod was re-created under its name — is
//!    confirmed gone by a GET of the pod (the cache may lag behind a new pod), then deleted with
//!    a precondition on its uid and resourceVersion, so an endpoint an agent has just rewritten
//!    is not deleted (409, left for the next pass).
//! 2. **Counting**: an identity's users are the pods whose security labels it stands for plus
//!    the remaining endpoints naming it (`spec.identity`).
//! 3. **Identities** (this cluster's only): the count goes to `status.endpoints`, with the
//!    conditions (`crate::identity_status`), written only when something changed; identities the
//!    operator does not allocate (another cluster's range, a name that is not the number) get
//!    only their `Valid=False` conditions. An identity found without users gets `status.lastUsedTime` = now: the
//!    clock lives in the object, so an operator restart (or a new leader) does not restart it.
//!    One unused for the grace period is deleted with a precondition on its uid and
//!    resourceVersion: if it was taken into use again meanwhile, the allocator rewrote its
//!    status (new resourceVersion) and the delete fails with 409 instead. An identity in use
//!    again before then gets its `lastUsedTime` removed.
//!
//! The pass waits for the pod, namespace, endpoint and identity caches to be complete, and skips
//! a pass in which a pod's namespace is missing from the cache rather than miscount.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use weft_core::identity::cluster_of;
use weft_crds::WeftEndpoint;

use crate::conditions;
use crate::identity_controller::{
    apply_status, needs_identity, pod_security_labels, Context, Error,
};
use crate::identity_index::KnownIdentity;
use crate::identity_status::{self, Usage};

/// The controller name in metrics.
pub const CONTROLLER: &str = "identity-gc";

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// `namespace/name` of the endpoints deleted.
    pub endpoints_deleted: Vec<String>,
    /// Identities whose unused clock started in this pass.
    pub identities_marked_unused: Vec<u32>,
    pub identities_deleted: Vec<u32>,
    /// Identities whose user count was written.
    pub identities_counted: Vec<u32>,
}

fn preconditions(uid: Option<String>, resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid,
        }),
        ..DeleteParams::default()
    }
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The uid of the pod an endpoint says it belongs to, if it has a `Pod` owner reference.
fn owner_pod_uid(endpoint: &WeftEndpoint) -> Option<&str> {
    endpoint
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| owner.kind == "Pod")
        .map(|owner| owner.uid.as_str())
}

fn is_pod_of(endpoint: &WeftEndpoint, pod: &Pod) -> bool {
    owner_pod_uid(endpoint).is_none_or(|uid| pod.metadata.uid.as_deref() == Some(uid))
}

/// Deletes the endpoint if its pod is gone; `Ok(true)` if it was deleted (or already gone).
async fn collect_endpoint(ctx: &Context, endpoint: &WeftEndpoint) -> Result<bool, Error> {
    let namespace = endpoint.namespace().unwrap_or_default();
    let name = endpoint.name_any();
    if let Some(pod) = ctx.pods.get(&ObjectRef::new(&name).within(&namespace)) {
        if is_pod_of(endpoint, &pod) {
            return Ok(false);
        }
    }
    // The cache says gone; the cache may be behind a pod created a moment ago.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    match pods.get_opt(&name).await {
        Ok(Some(pod)) if is_pod_of(endpoint, &pod) => return Ok(false),
        Ok(_) => {}
        Err(source) => {
            return Err(Error::ReadPod {
                name: format!("{namespace}/{name}"),
                source,
            })
        }
    }
    let endpoints: Api<WeftEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = preconditions(
        endpoint.metadata.uid.clone(),
        endpoint.metadata.resource_version.clone(),
    );
    match endpoints.delete(&name, &params).await {
        Ok(_) => {
            tracing::info!(endpoint = %format!("{namespace}/{name}"), "deleted the WeftEndpoint of a pod that is gone");
            ctx.metrics.identity.collected("WeftEndpoint");
            Ok(true)
        }
        Err(error) if api_code(&error) == Some(404) => Ok(true),
        // Rewritten since we looked (its agent is alive): the next pass decides again.
        Err(error) if api_code(&error) == Some(409) => Ok(false),
        Err(source) => Err(Error::Delete {
            kind: "WeftEndpoint",
            name: format!("{namespace}/{name}"),
            source,
        }),
    }
}

/// A reference to the identity, for its Events.
fn object_reference(known: &KnownIdentity) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{}/{}", weft_crds::GROUP, weft_crds::VERSION)),
        kind: Some("WeftIdentity".into()),
        name: Some(known.id.to_string()),
        uid: known.uid.clone(),
        resource_version: known.resource_version.clone(),
        ..ObjectReference::default()
    }
}

fn unused_for(since: &Time, now: Timestamp) -> Duration {
    let millis = now.as_millisecond() - since.0.as_millisecond();
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// One garbage-collection pass at `now` (see the module comment). Errors on single objects do
/// not stop the pass; the first is returned after it.
pub async fn collect_garbage(ctx: &Context, now: Timestamp) -> Result<GcReport, Error> {
    let mut report = GcReport::default();
    let mut first_error = None;
    let cluster = ctx.config.cluster_id;

    // Users by identity. Pods first: a missing namespace would miscount, so skip the pass.
    let mut users: HashMap<u32, i64> = HashMap::new();
    for pod in ctx.pods.state() {
        if !needs_identity(&pod) {
            continue;
        }
        let labels = pod_security_labels(&pod, &ctx.namespaces, &ctx.config.ignore)?;
        if let Some(known) = ctx.identities.identity_for(&labels, cluster) {
            *users.entry(known.id).or_default() += 1;
        }
    }

    let mut endpoints = ctx.endpoints.state();
    endpoints.sort_by_key(|e| (e.namespace(), e.name_any()));
    for endpoint in endpoints {
        match collect_endpoint(ctx, &endpoint).await {
            Ok(true) => report.endpoints_deleted.push(format!(
                "{}/{}",
                endpoint.namespace().unwrap_or_default(),
                endpoint.name_any()
            )),
            Ok(false) => {
                if let Ok(id) = u32::try_from(endpoint.spec.identity) {
                    *users.entry(id).or_default() += 1;
                }
            }
            Err(error) => {
                // Unsure whether it is gone: count it as a user.
                if let Ok(id) = u32::try_from(endpoint.spec.identity) {
                    *users.entry(id).or_default() += 1;
                }
                tracing::warn!(%error, "endpoint garbage collection");
                first_error.get_or_insert(error);
            }
        }
    }

    for known in ctx.identities.all() {
        let ours = cluster_of(known.id) == cluster.get() && known.consistent;
        let recorded = Usage::recorded(&known);
        let usage = if !ours {
            // Not an identity this operator allocates: only its conditions are written.
            recorded.clone()
        } else {
            match (
                users.get(&known.id).copied().unwrap_or(0),
                &recorded.last_used_time,
            ) {
                (count, _) if count > 0 => Usage::in_use(count),
                (_, None) => Usage {
                    endpoints: Some(0),
                    last_used_time: Some(Time(now)),
                },
                (_, Some(since)) if unused_for(since, now) >= ctx.config.gc_grace => {
                    match delete_identity(ctx, &known).await {
                        Ok(true) => report.identities_deleted.push(known.id),
                        Ok(false) => {}
                        Err(error) => {
                            tracing::warn!(%error, "identity garbage collection");
                            first_error.get_or_insert(error);
                        }
                    }
                    continue;
                }
                (_, Some(since)) => Usage {
                    endpoints: Some(0),
                    last_used_time: Some(since.clone()),
                },
            }
        };
        let status = identity_status::desired(&known, cluster, usage.clone(), &Time(now));
        if !identity_status::differs(&known, &status) {
            continue;
        }
        if usage.last_used_time.is_some() && recorded.last_used_time.is_none() {
            report.identities_marked_unused.push(known.id);
            tracing::info!(identity = known.id, labels = %known.labels, grace = ?ctx.config.gc_grace, "identity unused; it will be deleted after the grace period");
        } else if usage != recorded {
            report.identities_counted.push(known.id);
        }
        match apply_status(ctx, known.id, &status).await {
            Ok(_) if !ours => {
                let outcome = identity_status::outcome(&known, cluster, &recorded);
                conditions::warn_if_invalid(
                    &ctx.recorder,
                    &object_reference(&known),
                    "WeftIdentity",
                    &outcome,
                )
                .await;
                continue;
            }
            Ok(_) => continue,
            Err(source) if api_code(&source) == Some(404) => {
                ctx.identities.remove(known.id);
                continue;
            }
            Err(source) => {
                let error = Error::WriteStatus {
                    id: known.id,
                    source,
                };
                tracing::warn!(%error, "identity garbage collection");
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// Deletes an identity unused for the grace period, unless it changed since it was judged.
async fn delete_identity(
    ctx: &Context,
    judged: &crate::identity_index::KnownIdentity,
) -> Result<bool, Error> {
    // No allocation of this replica runs meanwhile; one that ran since we looked changed it.
    let _guard = ctx.allocation.lock().await;
    match ctx.identities.get(judged.id) {
        Some(current) if current.resource_version == judged.resource_version => {}
        _ => return Ok(false),
    }
    let params = preconditions(judged.uid.clone(), judged.resource_version.clone());
    match ctx
        .identity_api()
        .delete(&judged.id.to_string(), &params)
        .await
    {
        Ok(_) => {
            tracing::info!(identity = judged.id, labels = %judged.labels, "deleted unused identity");
            ctx.identities.remove(judged.id);
            ctx.metrics.identity.collected("WeftIdentity");
            Ok(true)
        }
        Err(error) if api_code(&error) == Some(404) => {
            ctx.identities.remove(judged.id);
            Ok(false)
        }
        // Taken into use (or otherwise changed) by another replica meanwhile.
        Err(error) if api_code(&error) == Some(409) => Ok(false),
        Err(source) => Err(Error::Delete {
            kind: "WeftIdentity",
            name: judged.id.to_string(),
            source,
        }),
    }
}

/// Runs a pass every `gc_interval` once every cache is complete, until dropped.
pub async fn run(ctx: Arc<Context>) {
    ctx.identities.wait_ready().await;
    let _ = ctx.pods.wait_until_ready().await;
    let _ = ctx.namespaces.wait_until_ready().await;
    let _ = ctx.endpoints.wait_until_ready().await;
    let mut ticks = tokio::time::interval(ctx.config.gc_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let result = collect_garbage(&ctx, Timestamp::now()).await;
        ctx.metrics
            .reconcile
            .observe(CONTROLLER, started.elapsed(), result.is_ok());
        match result {
            Ok(report) if report != GcReport::default() => {
                tracing::debug!(?report, "garbage collection pass")
            }
            Ok(_) => {}
            Err(Error::NamespaceUnknown { namespace }) => {
                tracing::debug!(
                    namespace,
                    "namespace cache behind; garbage collection pass skipped"
                )
            }
            Err(error) => tracing::warn!(%error, "garbage collection pass incomplete"),
        }
    }
}
