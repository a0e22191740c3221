//! What a policy's status says, from whether it converts: kstatus-style conditions that
//! `kubectl wait`, Argo CD and Flux understand, with `observedGeneration`. Pure, so it is
//! tested without an API server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use weft_core::policy::model::Policy;
use weft_crds::policy::PolicyStatus;
use weft_crds::policy_model::PolicyError;

use crate::conditions::{self, Finding, Outcome};

/// What a policy's conversion means for its status.
fn outcome(outcome: &Result<Policy, PolicyError>) -> Outcome {
    match outcome {
        Ok(_) => Outcome::Ready {
            valid: "the policy is valid".into(),
            ready: Finding::new(
                "Accepted",
                "the policy is accepted for enforcement by the agents",
            ),
        },
        Err(error) => {
            let message = error.to_string();
            Outcome::Invalid {
                not_ready: format!("not applied; the last valid version stays in force: {message}"),
                invalid: Finding::new(error.reason.as_condition_reason(), message),
            }
        }
    }
}

/// The status a policy should have. A condition whose status did not change keeps its
/// `lastTransitionTime`, so an unchanged policy yields an unchanged status (and no write).
pub fn desired_status(
    generation: Option<i64>,
    result: &Result<Policy, PolicyError>,
    current: Option<&PolicyStatus>,
    now: Time,
) -> PolicyStatus {
    let previous = current
        .map(|status| status.conditions.as_slice())
        .unwrap_or_default();
    PolicyStatus {
        observed_generation: generation,
        conditions: conditions::conditions(generation, &outcome(result), &[], previous, &now),
        selected_endpoints: current.and_then(|status| status.selected_endpoints),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use k8s_openapi::jiff::Timestamp;
    use weft_crds::policy_model::InvalidReason;
    use weft_crds::status::{
        CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED, CONDITION_VALID,
    };

    use super::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    fn invalid() -> Result<Policy, PolicyError> {
        Err(PolicyError {
            field: "spec.egress[0].toCIDR[0].cidr".into(),
            reason: InvalidReason::BadCidr,
            message: "\"999.1.1.1/8\" is not an IPv4 address or CIDR".into(),
        })
    }

    fn find<'a>(status: &'a PolicyStatus, kind: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == kind)
            .expect(kind)
    }

    #[test]
    fn an_invalid_policy_is_not_valid_not_ready_and_stalled_naming_the_field() {
        let status = desired_status(Some(4), &invalid(), None, at(100));
        let valid = find(&status, CONDITION_VALID);
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", "BadCIDR")
        );
        assert!(
            valid.message.starts_with("spec.egress[0].toCIDR[0].cidr:"),
            "{}",
            valid.message
        );
        assert_eq!(find(&status, CONDITION_READY).status, "False");
        assert_eq!(find(&status, CONDITION_STALLED).status, "True");
        assert_eq!(status.observed_generation, Some(4));
        assert!(status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn an_unchanged_outcome_keeps_transition_times_and_a_change_moves_them() {
        let first = desired_status(Some(1), &invalid(), None, at(100));
        let again = desired_status(Some(1), &invalid(), Some(&first), at(200));
        assert_eq!(again, first, "nothing changed, so nothing is written");
        let fixed = desired_status(
            Some(2),
            &Ok(Policy {
                id: weft_core::policy::model::PolicyId {
                    kind: weft_core::policy::model::PolicyKind::WeftNetworkPolicy,
                    namespace: Some("ml".into()),
                    name: "p".into(),
                },
                subject: Default::default(),
                rules: vec![],
                isolates_ingress: false,
                isolates_egress: false,
            }),
            Some(&first),
            at(300),
        );
        assert_eq!(find(&fixed, CONDITION_VALID).status, "True");
        assert_eq!(find(&fixed, CONDITION_VALID).last_transition_time, at(300));
        assert_eq!(
            find(&fixed, CONDITION_RECONCILING).last_transition_time,
            at(100),
            "Reconciling stayed False"
        );
    }
}
