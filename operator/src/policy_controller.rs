//! Reconciles `WeftNetworkPolicy` and `WeftClusterwideNetworkPolicy`: checks each against what
//! the datapath can honour and writes its status (server-side apply on the status subresource,
//! field manager `weft-operator`) only when it changed. Never writes a spec.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use weft_core::policy::model::Policy;
use weft_crds::policy::PolicyStatus;
use weft_crds::policy_model::{self, PolicyError};
use weft_crds::{WeftClusterwideNetworkPolicy, WeftNetworkPolicy};

use crate::policy_status::desired_status;

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
    if let Err(error) = &outcome {
        tracing::warn!(kind = P::KIND, name = %policy.name_any(), %error, "invalid policy");
    }
    let status = desired_status(
        policy.meta().generation,
        &outcome,
        policy.status(),
        Time(Timestamp::now()),
    );
    if policy.status() != Some(&status) {
        let patch = json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": P::KIND,
            "status": status,
        });
        let api = P::api(ctx.client.clone(), policy.meta().namespace.as_deref());
        api.patch_status(
            &policy.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            kind: P::KIND,
            name: policy.name_any(),
            source,
        })?;
    }
    Ok(Action::requeue(RESYNC))
}

pub fn error_policy<P: PolicyObject>(_policy: Arc<P>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the policy controllers until the process stops.
pub async fn run(client: Client) {
    let ctx = Arc::new(Context {
        client: client.clone(),
    });
    let namespaced = Controller::new(
        Api::<WeftNetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(
        reconcile::<WeftNetworkPolicy>,
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
    .run(
        reconcile::<WeftClusterwideNetworkPolicy>,
        error_policy::<WeftClusterwideNetworkPolicy>,
        ctx,
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "WeftClusterwideNetworkPolicy reconcile");
        }
    });
    tokio::join!(namespaced, clusterwide);
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::Value;

    use super::*;

    type Verifier = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<Context>, Verifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            Arc::new(Context {
                client: Client::new(service, "default"),
            }),
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
        let status = desired_status(Some(3), &first.convert(), None, Time(Timestamp::now()));
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
}
