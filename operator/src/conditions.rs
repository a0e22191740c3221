//! What every reconciler shares: the status write (server-side apply on the `/status`
//! subresource, field manager `weft-operator`, only when something changed), Warning Events and
//! the per-object error backoff. The conditions themselves (kstatus `Valid`, `Ready`,
//! `Reconciling`, `Stalled`, stamped with `observedGeneration`) are computed by
//! `weft_crds::status`, which the agent uses for the objects it writes too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
pub use weft_crds::status::{changed, conditions, Extra, Finding, Outcome, Status};

pub use crate::policy_controller::FIELD_MANAGER;

/// The reporter (`reportingController`) of the operator's Events.
pub const REPORTER: &str = "weft-operator";

/// Writes `status` (the operator's fields only) to `name`'s `/status` subresource by
/// server-side apply with field manager [`FIELD_MANAGER`], forcing ownership of those fields.
/// Never sends a spec.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    status: &impl serde::Serialize,
) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", weft_crds::GROUP, weft_crds::VERSION),
        "kind": kind,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// The status an object should carry, written when the operator's part of it changed: the
/// conditions `outcome` and `extra` call for (see [`conditions`]) against the object's
/// `current` `observedGeneration` and conditions. `status` builds the kind's status type from
/// the generation and conditions. Returns whether it wrote.
#[allow(clippy::too_many_arguments)]
pub async fn update_status<K, S>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    generation: Option<i64>,
    (current_generation, current): (Option<i64>, &[Condition]),
    outcome: &Outcome,
    extra: &[Extra],
    status: impl FnOnce(Option<i64>, Vec<Condition>) -> S,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let desired = conditions(
        generation,
        outcome,
        extra,
        current,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if !changed(current_generation, current, generation, &desired) {
        return Ok(false);
    }
    apply_status(api, name, kind, &status(generation, desired)).await?;
    Ok(true)
}

/// Logs an invalid spec and publishes a Warning Event for it (reason `Validate`); nothing for
/// any other outcome. Call it when the status changed, so a resync does not repeat it.
pub async fn warn_if_invalid(
    recorder: &Recorder,
    regarding: &ObjectReference,
    kind: &str,
    outcome: &Outcome,
) {
    if let Outcome::Invalid { invalid, .. } = outcome {
        tracing::warn!(
            kind,
            name = regarding.name.as_deref().unwrap_or_default(),
            reason = %invalid.reason,
            message = %invalid.message,
            "invalid spec"
        );
        warn(recorder, regarding, None, "Validate", invalid).await;
    }
}

/// Publishes a Warning Event about `regarding` (reason = the finding's reason, note = its
/// message; `related` names a second object involved). An Event that cannot be published is
/// logged, never a reconcile error: the status already says the same.
pub async fn warn(
    recorder: &Recorder,
    regarding: &ObjectReference,
    related: Option<ObjectReference>,
    action: &str,
    finding: &Finding,
) {
    // The Events API caps a note at 1 kB.
    let mut note = finding.message.clone();
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    let event = Event {
        type_: EventType::Warning,
        reason: finding.reason.clone(),
        note: Some(note),
        action: action.to_owned(),
        secondary: related,
    };
    if let Err(error) = recorder.publish(&event, regarding).await {
        tracing::warn!(
            %error,
            reason = %finding.reason,
            name = regarding.name.as_deref().unwrap_or_default(),
            "could not publish an Event"
        );
    }
}

/// Per-object exponential backoff for reconcile errors (kube-runtime's `error_policy` gets no
/// retry count): 5 s, 10 s, 20 s … up to 5 minutes; a successful reconcile resets it.
/// Invalid specs are not errors and never come here.
#[derive(Debug)]
pub struct ErrorBackoff {
    first: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for ErrorBackoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(300))
    }
}

impl ErrorBackoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failures: Mutex::default(),
        }
    }

    /// The key of an object: `namespace/name`, or `name` for cluster-scoped kinds.
    pub fn key<K: Resource>(object: &K) -> String {
        let meta = object.meta();
        match &meta.namespace {
            Some(namespace) => format!("{namespace}/{}", meta.name.as_deref().unwrap_or_default()),
            None => meta.name.clone().unwrap_or_default(),
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key.to_owned()).or_insert(0);
        let delay = self
            .first
            .checked_mul(1u32.checked_shl(*count).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        *count = count.saturating_add(1);
        delay
    }

    /// Forgets the failures of an object that reconciled.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_backoff_doubles_up_to_the_cap_and_resets() {
        let backoff = ErrorBackoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let delays: Vec<u64> = (0..6).map(|_| backoff.failed("a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff.failed("b").as_secs(), 5, "per object");
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a").as_secs(), 5);
        for _ in 0..40 {
            backoff.failed("c");
        }
        assert_eq!(backoff.failed("c").as_secs(), 60, "no overflow");
    }
}
