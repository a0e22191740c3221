//! Status vocabulary shared by every kind: Kubernetes `metav1.Condition`s, with the condition
//! types kstatus-aware tools (`kubectl wait`, Argo CD, Flux) understand, and the one place
//! that turns where an object stands ([`Outcome`]) into them. Both the operator and the agent
//! (for the `WeftEndpoint`s it writes) use it, so every kind reads the same way. Pure, so it
//! is tested without an API server.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The spec was checked: `True`, or `False` with a reason naming the bad field.
pub const CONDITION_VALID: &str = "Valid";
/// The object's intent is in effect for the `observedGeneration`.
pub const CONDITION_READY: &str = "Ready";
/// Work towards the current generation is under way.
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// Progress stopped and needs a person (e.g. an invalid spec).
pub const CONDITION_STALLED: &str = "Stalled";

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
    /// The spec is valid, but something outside it keeps it from taking effect as written
    /// until a person acts (a node that cannot enforce the cluster's policies, say):
    /// `Valid=True`, `Ready=False`, `Stalled=True`, with the problem's reason.
    Degraded { valid: String, problem: Finding },
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
        Outcome::Degraded { valid, problem } => vec![
            c(CONDITION_VALID, Status::True, "Valid", valid.clone()),
            c(
                CONDITION_READY,
                Status::False,
                &problem.reason,
                problem.message.clone(),
            ),
            c(CONDITION_RECONCILING, Status::False, "Done", String::new()),
            c(
                CONDITION_STALLED,
                Status::True,
                &problem.reason,
                problem.message.clone(),
            ),
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
    fn degraded_is_valid_not_ready_and_stalled_with_the_problem() {
        let outcome = Outcome::Degraded {
            valid: "wired".into(),
            problem: Finding::new("PolicyNotEnforced", "a map is full"),
        };
        let conditions = conditions(None, &outcome, &[], &[], &at(1));
        assert_eq!(
            kinds(&conditions),
            [
                ("Valid", "True", "Valid"),
                ("Ready", "False", "PolicyNotEnforced"),
                ("Reconciling", "False", "Done"),
                ("Stalled", "True", "PolicyNotEnforced"),
            ]
        );
        assert_eq!(conditions[1].message, "a map is full");
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
}
