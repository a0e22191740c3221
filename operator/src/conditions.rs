//! The status every Weft kind reports, in one shape: kstatus conditions (`Valid`, `Ready`,
//! `Reconciling`, `Stalled`, plus kind-specific ones) stamped with `observedGeneration`, which
//! `kubectl wait`, Argo CD and Flux understand. Also what every reconciler shares: the status
//! write (server-side apply on the `/status` subresource, field manager `weft-operator`, only
//! when something changed) and the per-object error backoff.
//!
//! The condition logic is pure, so it is tested without an API server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use weft_crds::status::{
    CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED, CONDITION_VALID,
};

pub use crate::policy_controller::FIELD_MANAGER;

/// The reporter (`reportingController`) of the operator's Events.
pub const REPORTER: &str = "weft-operator";

/// A condition's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A machine-readable reason (`UpperCamelCase`) and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub reason: String,
    pub message: String,
}

impl Finding {
    pub fn new(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Where an object stands; the four kstatus conditions follow from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The spec is valid and in effect: `Valid=True`, `Ready=True`.
    Ready {
        /// The `Valid` condition's message.
        valid: String,
        /// The `Ready` condition's reason and message.
        ready: Finding,
    },
    /// The spec is valid, but the object waits for something that may still appear (another
    /// object it names): `Valid=True`, `Ready=False`, `Reconciling=True`, not stalled.
    Waiting { valid: String, waiting: Finding },
    /// The spec cannot work as written and a person must change something: `Valid=False`,
    /// `Ready=False`, `Stalled=True`, each with the finding's reason.
    Invalid {
        invalid: Finding,
        /// The `Ready` condition's message: what the invalid spec means for the cluster.
        not_ready: String,
    },
}

impl Outcome {
    pub fn is_invalid(&self) -> bool {
        matches!(self, Outcome::Invalid { .. })
    }
}

/// A condition beyond the four, e.g. `Connected` or `AnnotationConflict`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extra {
    pub type_: String,
    pub status: Status,
    pub finding: Finding,
}

fn condition(
    type_: &str,
    status: Status,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The conditions an object should have, in a fixed order (`Valid`, `Ready`, `Reconciling`,
/// `Stalled`, then `extra` in the order given). A condition whose status did not change keeps
/// its `lastTransitionTime` from `previous`, so an unchanged outcome yields unchanged
/// conditions, and no write.
pub fn conditions(
    generation: Option<i64>,
    outcome: &Outcome,
    extra: &[Extra],
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let c = |type_: &str, status: Status, reason: &str, message: String| {
        condition(type_, status, reason, message, generation, now)
    };
    let mut conditions = match outcome {
        Outcome::Ready { valid, ready } => vec![
            c(CONDITION_VALID, Status::True, "Valid", valid.clone()),
            c(
                CONDITION_READY,
                Status::True,
                &ready.reason,
                ready.message.clone(),
            ),
            c(CONDITION_RECONCILING, Status::False, "Done", String::new()),
            c(CONDITION_STALLED, Status::False, "Valid", String::new()),
        ],
        Outcome::Waiting { valid, waiting } => vec![
            c(CONDITION_VALID, Status::True, "Valid", valid.clone()),
            c(
                CONDITION_READY,
                Status::False,
                &waiting.reason,
                waiting.message.clone(),
            ),
            c(
                CONDITION_RECONCILING,
                Status::True,
                &waiting.reason,
                waiting.message.clone(),
            ),
            c(CONDITION_STALLED, Status::False, "Valid", String::new()),
        ],
        Outcome::Invalid { invalid, not_ready } => vec![
            c(
                CONDITION_VALID,
                Status::False,
                &invalid.reason,
                invalid.message.clone(),
            ),
            c(
                CONDITION_READY,
                Status::False,
                &invalid.reason,
                not_ready.clone(),
            ),
            c(CONDITION_RECONCILING, Status::False, "Done", String::new()),
            c(
                CONDITION_STALLED,
                Status::True,
                &invalid.reason,
                invalid.message.clone(),
            ),
        ],
    };
    conditions.extend(extra.iter().map(|extra| {
        c(
            &extra.type_,
            extra.status,
            &extra.finding.reason,
            extra.finding.message.clone(),
        )
    }));
    keep_transition_times(&mut conditions, previous);
    conditions
}

/// Carries `lastTransitionTime` over from `previous` for every condition whose status stayed.
pub fn keep_transition_times(conditions: &mut [Condition], previous: &[Condition]) {
    for condition in conditions {
        if let Some(before) = previous.iter().find(|c| c.type_ == condition.type_) {
            if before.status == condition.status {
                condition.last_transition_time = before.last_transition_time.clone();
            }
        }
    }
}

/// Whether the operator's part of a status (its `observedGeneration` and conditions) differs
/// from what the object carries now. Fields other writers own are not compared.
pub fn changed(
    current_generation: Option<i64>,
    current: &[Condition],
    desired_generation: Option<i64>,
    desired: &[Condition],
) -> bool {
    current_generation != desired_generation || current != desired
}

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
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    fn kinds(conditions: &[Condition]) -> Vec<(&str, &str, &str)> {
        conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect()
    }

    #[test]
    fn waiting_is_valid_not_ready_reconciling_and_not_stalled() {
        let outcome = Outcome::Waiting {
            valid: "ok".into(),
            waiting: Finding::new("ServiceNotFound", "no Service shop/web"),
        };
        let conditions = conditions(Some(2), &outcome, &[], &[], &at(1));
        assert_eq!(
            kinds(&conditions),
            [
                ("Valid", "True", "Valid"),
                ("Ready", "False", "ServiceNotFound"),
                ("Reconciling", "True", "ServiceNotFound"),
                ("Stalled", "False", "Valid"),
            ]
        );
        assert!(conditions.iter().all(|c| c.observed_generation == Some(2)));
    }

    #[test]
    fn invalid_is_stalled_with_the_reason_and_extras_follow() {
        let outcome = Outcome::Invalid {
            invalid: Finding::new("BadRate", "spec.egress.maxRate: \"x\" is not a rate"),
            not_ready: "not applied".into(),
        };
        let extra = [Extra {
            type_: "Connected".into(),
            status: Status::Unknown,
            finding: Finding::new("NotImplemented", "later"),
        }];
        let conditions = conditions(None, &outcome, &extra, &[], &at(1));
        assert_eq!(
            kinds(&conditions),
            [
                ("Valid", "False", "BadRate"),
                ("Ready", "False", "BadRate"),
                ("Reconciling", "False", "Done"),
                ("Stalled", "True", "BadRate"),
                ("Connected", "Unknown", "NotImplemented"),
            ]
        );
    }

    #[test]
    fn unchanged_statuses_keep_their_transition_time() {
        let ready = Outcome::Ready {
            valid: "ok".into(),
            ready: Finding::new("Accepted", "ok"),
        };
        let first = conditions(Some(1), &ready, &[], &[], &at(100));
        let again = conditions(Some(1), &ready, &[], &first, &at(200));
        assert_eq!(again, first);
        assert!(!changed(Some(1), &first, Some(1), &again));
        assert!(changed(Some(1), &first, Some(2), &again));
        let waiting = Outcome::Waiting {
            valid: "ok".into(),
            waiting: Finding::new("ServiceNotFound", "gone"),
        };
        let moved = conditions(Some(1), &waiting, &[], &first, &at(300));
        assert_eq!(moved[0].last_transition_time, at(100), "Valid stayed True");
        assert_eq!(moved[1].last_transition_time, at(300), "Ready went False");
    }

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
