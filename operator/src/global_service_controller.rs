//! `GlobalService`: two reconcilers.
//!
//! - **Status** (keyed by GlobalService): the Service it names (`spec.serviceName`, same
//!   namespace) must exist; until it does the GlobalService is `Ready=False`,
//!   `Reconciling=True`, reason `ServiceNotFound` (not stalled: the Service may still appear).
//!   A GlobalService written by hand whose name matches a Service annotated as global also gets
//!   `AnnotationConflict=True`, naming the Service, and a Warning Event: the hand-written object
//!   wins and the annotations are ignored.
//! - **Materialisation** (keyed by Service): a Service annotated global (`weft.io/global`, or
//!   Cilium's `service.cilium.io/global` / `io.cilium/global-service`; see
//!   [`weft_crds::service_model::global_settings`]) gets a GlobalService of the same name and
//!   namespace whose spec comes from the annotations (`shared`, `affinity`), controlled by the
//!   Service (ownerReference with `controller: true`, so Kubernetes' garbage collector deletes
//!   it with the Service), written by server-side apply with field manager `weft-operator`.
//!   A GlobalService without that controller reference is the user's and is never written.
//!   When the annotation goes, the owned GlobalService is deleted (uid precondition, so a
//!   user's object created in between is never deleted).
//!
//! Writes happen only when something changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use weft_core::service::Affinity as ModelAffinity;
use weft_crds::global_service::{Affinity, GlobalServiceStatus};
use weft_crds::service_model::{global_settings, ServiceError, GLOBAL_ANNOTATIONS};
use weft_crds::{GlobalService, GlobalServiceSpec};

use crate::conditions::{
    self, ErrorBackoff, Extra, Finding, Outcome, Status, FIELD_MANAGER, REPORTER,
};
use crate::metrics::ReconcileMetrics;

const KIND: &str = "GlobalService";
/// Re-check GlobalServices this often even without events.
const RESYNC: Duration = Duration::from_secs(300);
/// The condition a hand-written GlobalService gets when it shadows a Service's annotations.
pub const CONDITION_ANNOTATION_CONFLICT: &str = "AnnotationConflict";
/// The label on materialised GlobalServices (for `kubectl get gsvc -l …`); ownership itself
/// is the controller ownerReference.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Service {namespace}/{name}: {source}")]
    ReadService {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading GlobalService {namespace}/{name}: {source}")]
    ReadGlobalService {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of GlobalService {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying GlobalService {namespace}/{name} from its Service's annotations: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "deleting GlobalService {namespace}/{name} (its Service is no longer global): {source}"
    )]
    Delete {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the GlobalService cache stopped before it was filled")]
    CacheGone,
}

/// What both reconcilers need.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Every GlobalService, as the status controller's watch sees it: the Service reconciler
    /// reads it to find owned GlobalServices of Services that are not global (without a GET
    /// per Service).
    pub global_services: Store<GlobalService>,
    pub status_backoff: ErrorBackoff,
    pub service_backoff: ErrorBackoff,
}

impl Context {
    pub fn new(client: Client, global_services: Store<GlobalService>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), REPORTER.into()),
            client,
            global_services,
            status_backoff: ErrorBackoff::default(),
            service_backoff: ErrorBackoff::default(),
        }
    }
}

fn namespace_of<K: Resource>(object: &K) -> String {
    object
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// The controller reference Weft puts on a materialised GlobalService: to the Service of the
/// same name. Its uid is not compared, so a GlobalService left by an earlier Service of that
/// name (which the garbage collector is about to delete) still counts as Weft's.
pub fn weft_controller(global: &GlobalService) -> Option<&OwnerReference> {
    let name = global.meta().name.as_deref()?;
    global.owner_references().iter().find(|owner| {
        owner.controller == Some(true)
            && owner.api_version == "v1"
            && owner.kind == "Service"
            && owner.name == name
    })
}

/// The GlobalService spec a Service's annotations ask for: `Ok(None)` when it is not global.
pub fn materialised_spec(service: &Service) -> Result<Option<GlobalServiceSpec>, ServiceError> {
    let empty = BTreeMap::new();
    let annotations = service.metadata.annotations.as_ref().unwrap_or(&empty);
    let object = format!("Service {}/{}", namespace_of(service), service.name_any());
    let settings = global_settings(annotations, None, &object)?;
    if !settings.global {
        return Ok(None);
    }
    Ok(Some(GlobalServiceSpec {
        service_name: service.name_any(),
        affinity: match settings.affinity {
            ModelAffinity::Local => Affinity::Local,
            ModelAffinity::Remote => Affinity::Remote,
            ModelAffinity::None => Affinity::None,
        },
        shared: settings.shared,
        failover: Vec::new(),
    }))
}

/// The annotation that makes `service` global, for messages.
fn global_annotation(service: &Service) -> &'static str {
    let annotations = service.metadata.annotations.as_ref();
    GLOBAL_ANNOTATIONS
        .iter()
        .copied()
        .find(|key| annotations.is_some_and(|a| a.contains_key(*key)))
        .unwrap_or(GLOBAL_ANNOTATIONS[0])
}

// ---------------------------------------------------------------- status

/// The status a GlobalService should have, given the Service it names (`service`) and, for a
/// hand-written GlobalService, the global Service whose annotations it shadows (`shadowed`).
pub fn status_outcome(
    global: &GlobalService,
    service: Option<&Service>,
    shadowed: Option<&Service>,
) -> (Outcome, Vec<Extra>) {
    let namespace = namespace_of(global);
    let target = &global.spec.service_name;
    let valid = match weft_controller(global) {
        Some(_) => format!("materialised from the annotations of Service {namespace}/{target}"),
        None => "the GlobalService is valid".to_owned(),
    };
    let outcome = match service {
        None => Outcome::Waiting {
            valid,
            waiting: Finding::new(
                "ServiceNotFound",
                format!(
                    "Service {namespace}/{target} does not exist; the GlobalService takes effect \
                     when it is created"
                ),
            ),
        },
        Some(_) => Outcome::Ready {
            valid,
            ready: Finding::new(
                "Accepted",
                if global.spec.shared {
                    format!("Service {namespace}/{target} is global; its backends are shared with meshed clusters")
                } else {
                    format!("Service {namespace}/{target} is global; its backends are not shared (shared: false)")
                },
            ),
        },
    };
    let extra = shadowed
        .map(|service| Extra {
            type_: CONDITION_ANNOTATION_CONFLICT.into(),
            status: Status::True,
            finding: Finding::new(
                "AnnotationConflict",
                format!(
                    "Service {namespace}/{} is annotated {}, but this GlobalService was not made \
                     from it and takes precedence: the Service's global annotations are ignored. \
                     Remove them, or delete this GlobalService to have one made from them",
                    service.name_any(),
                    global_annotation(service)
                ),
            ),
        })
        .into_iter()
        .collect();
    (outcome, extra)
}

pub async fn reconcile_status(
    global: Arc<GlobalService>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = namespace_of(global.as_ref());
    let name = global.name_any();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let get = |service_name: String| {
        let services = services.clone();
        let namespace = namespace.clone();
        async move {
            services
                .get_opt(&service_name)
                .await
                .map_err(|source| Error::ReadService {
                    namespace,
                    name: service_name,
                    source,
                })
        }
    };
    let service = get(global.spec.service_name.clone()).await?;
    // Only a hand-written GlobalService can shadow the Service of its own name.
    let shadowed = if weft_controller(&global).is_some() {
        None
    } else if global.spec.service_name == name {
        service.clone()
    } else {
        get(name.clone()).await?
    }
    .filter(|service| matches!(materialised_spec(service), Ok(Some(_))));

    let (outcome, extra) = status_outcome(&global, service.as_ref(), shadowed.as_ref());
    let generation = global.meta().generation;
    let current = global.status.clone().unwrap_or_default();
    let api: Api<GlobalService> = Api::namespaced(ctx.client.clone(), &namespace);
    let wrote = conditions::update_status(
        &api,
        &name,
        KIND,
        generation,
        (current.observed_generation, &current.conditions),
        &outcome,
        &extra,
        |observed_generation, conditions| GlobalServiceStatus {
            observed_generation,
            conditions,
            ..GlobalServiceStatus::default()
        },
    )
    .await
    .map_err(|source| Error::WriteStatus {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    })?;
    if let (true, Some(conflict), Some(service)) = (wrote, extra.first(), shadowed.as_ref()) {
        tracing::warn!(namespace = %namespace, name = %name, "a hand-written GlobalService shadows a global Service's annotations");
        conditions::warn(
            &ctx.recorder,
            &global.object_ref(&()),
            Some(service.object_ref(&())),
            "Materialise",
            &conflict.finding,
        )
        .await;
    }
    ctx.status_backoff
        .succeeded(&ErrorBackoff::key(global.as_ref()));
    Ok(Action::requeue(RESYNC))
}

pub fn error_policy_status(global: Arc<GlobalService>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx
        .status_backoff
        .failed(&ErrorBackoff::key(global.as_ref()));
    tracing::warn!(%error, retry_in = ?delay, "GlobalService status reconcile failed");
    Action::requeue(delay)
}

/// The GlobalServices whose status depends on `service`: those naming it, and the one of the
/// same name (whose annotation conflict it may raise or settle).
pub fn global_services_for(
    globals: &Store<GlobalService>,
    service: &Service,
) -> Vec<ObjectRef<GlobalService>> {
    let namespace = namespace_of(service);
    let name = service.name_any();
    globals
        .state()
        .iter()
        .filter(|global| {
            namespace_of(global.as_ref()) == namespace
                && (global.spec.service_name == name || global.name_any() == name)
        })
        .map(|global| ObjectRef::from_obj(global.as_ref()))
        .collect()
}

// ---------------------------------------------------------------- materialisation

/// The server-side apply body of a materialised GlobalService. `resource_version`, when given,
/// makes the write conditional on the object not having changed since it was read.
pub fn materialised_object(
    service: &Service,
    spec: &GlobalServiceSpec,
    resource_version: Option<&str>,
) -> serde_json::Value {
    let mut metadata = json!({
        "name": service.name_any(),
        "namespace": namespace_of(service),
        "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
        "ownerReferences": [{
            "apiVersion": "v1",
            "kind": "Service",
            "name": service.name_any(),
            "uid": service.metadata.uid.clone().unwrap_or_default(),
            "controller": true,
        }],
    });
    if let Some(version) = resource_version {
        metadata["resourceVersion"] = json!(version);
    }
    json!({
        "apiVersion": format!("{}/{}", weft_crds::GROUP, weft_crds::VERSION),
        "kind": KIND,
        "metadata": metadata,
        "spec": spec,
    })
}

/// Whether an owned GlobalService already says what `spec` says, controlled by `service`.
fn up_to_date(global: &GlobalService, service: &Service, spec: &GlobalServiceSpec) -> bool {
    let owner_ok = weft_controller(global)
        .is_some_and(|owner| Some(&owner.uid) == service.metadata.uid.as_ref());
    let labelled = global.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(FIELD_MANAGER);
    owner_ok
        && labelled
        && global.spec.service_name == spec.service_name
        && global.spec.affinity == spec.affinity
        && global.spec.shared == spec.shared
}

pub async fn reconcile_service(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = namespace_of(service.as_ref());
    let name = service.name_any();
    let globals: Api<GlobalService> = Api::namespaced(ctx.client.clone(), &namespace);
    let desired = match materialised_spec(&service) {
        Ok(desired) => desired,
        Err(error) => {
            // Keep whatever exists, as for any bad object: the annotation must be fixed.
            let finding = Finding::new(
                "InvalidAnnotation",
                format!(
                    "{}: {}; the global-service settings are unchanged",
                    error.field, error.message
                ),
            );
            tracing::warn!(%error, "invalid global-service annotation");
            conditions::warn(
                &ctx.recorder,
                &service.object_ref(&()),
                None,
                "Materialise",
                &finding,
            )
            .await;
            ctx.service_backoff
                .succeeded(&ErrorBackoff::key(service.as_ref()));
            return Ok(Action::await_change());
        }
    };
    match desired {
        Some(spec) => {
            // The cache may lag; whose object this is is decided on a fresh read.
            let existing =
                globals
                    .get_opt(&name)
                    .await
                    .map_err(|source| Error::ReadGlobalService {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source,
                    })?;
            // `Some(version)`: write, conditional on `version` when updating.
            let write = match &existing {
                Some(global) if weft_controller(global).is_none() => {
                    // The user's: never written. Its status reports the conflict.
                    tracing::info!(namespace = %namespace, name = %name, "Service is annotated global but a hand-written GlobalService of its name exists; leaving it alone");
                    None
                }
                Some(global) if up_to_date(global, &service, &spec) => None,
                Some(global) => Some(global.resource_version()),
                None => Some(None),
            };
            if let Some(version) = write {
                let object = materialised_object(&service, &spec, version.as_deref());
                globals
                    .patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&object),
                    )
                    .await
                    .map_err(|source| Error::Apply {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source,
                    })?;
                tracing::info!(namespace = %namespace, name = %name, "GlobalService applied from the Service's annotations");
            }
        }
        None => {
            ctx.global_services
                .wait_until_ready()
                .await
                .map_err(|_| Error::CacheGone)?;
            let cached = ctx
                .global_services
                .get(&ObjectRef::new(&name).within(&namespace));
            if let Some(global) = cached.filter(|global| weft_controller(global).is_some()) {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: global.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match globals.delete(&name, &params).await {
                    Ok(_) => {
                        tracing::info!(namespace = %namespace, name = %name, "Service is no longer global; its GlobalService was deleted")
                    }
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(source) => {
                        return Err(Error::Delete {
                            namespace,
                            name,
                            source,
                        })
                    }
                }
            }
        }
    }
    ctx.service_backoff
        .succeeded(&ErrorBackoff::key(service.as_ref()));
    // Every change that matters (the Service, a GlobalService of its name) is watched.
    Ok(Action::await_change())
}

pub fn error_policy_service(service: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx
        .service_backoff
        .failed(&ErrorBackoff::key(service.as_ref()));
    tracing::warn!(%error, retry_in = ?delay, "Service materialisation failed");
    Action::requeue(delay)
}

/// Runs both GlobalService reconcilers until the process stops.
///
/// RBAC: `globalservices` get, list, watch, create, patch, delete (create: a server-side apply
/// that creates the object is authorised as create); `globalservices/status` patch;
/// `services` get, list, watch; `events` (`events.k8s.io`) create, patch.
pub async fn run(client: Client, metrics: ReconcileMetrics) {
    let status = Controller::new(
        Api::<GlobalService>::all(client.clone()),
        watcher::Config::default(),
    );
    let globals = status.store();
    let ctx = Arc::new(Context::new(client.clone(), globals.clone()));
    let status = status
        .watches(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            move |service| global_services_for(&globals, &service),
        )
        .run(
            metrics.instrument("globalservice-status", reconcile_status),
            error_policy_status,
            Arc::clone(&ctx),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "GlobalService status reconcile");
            }
        });
    let materialise = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<GlobalService>::all(client),
        watcher::Config::default(),
        |global| {
            let namespace = namespace_of(&global);
            Some(ObjectRef::<Service>::new(&global.name_any()).within(&namespace))
        },
    )
    .run(
        metrics.instrument("globalservice-materialise", reconcile_service),
        error_policy_service,
        ctx,
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "Service materialisation");
        }
    });
    tokio::join!(status, materialise);
}
