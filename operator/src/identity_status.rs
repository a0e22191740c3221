//! What a `WeftIdentity`'s status says: the user count and the unused clock that garbage
//! collection keeps (`crate::identity_gc`), and the kstatus conditions every Weft kind carries.
//!
//! The operator owns the whole status under one field manager, and a server-side apply removes
//! the fields its manager owned but left out. So every status write is built here, whole:
//! conditions, `observedGeneration` and usage together.
//!
//! - `Valid=True`, `Ready=True` (`Allocated`): the object is one of this cluster's identities;
//!   the message says how many endpoints use it, or since when none has.
//! - `Valid=False`, `Stalled=True`: its name is not its `spec.id` (`NameMismatch`), the number
//!   is a reserved one (`ReservedNumber`), or it lies in another cluster's range
//!   (`OtherCluster`: each cluster's operator allocates its own). The allocator ignores it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use weft_core::cluster::ClusterId;
use weft_core::identity::{cluster_of, FIRST_LOCAL_IDENTITY, LOCAL_IDENTITY_MASK};
use weft_crds::identity::WeftIdentityStatus;

use crate::conditions::{self, Finding, Outcome};
use crate::identity_index::KnownIdentity;

/// Who uses an identity, as the garbage collector last counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Pods and endpoints with this identity; `None` when not counted yet.
    pub endpoints: Option<i64>,
    /// Since when nothing has used it (the garbage collector's clock).
    pub last_used_time: Option<Time>,
}

impl Usage {
    /// The usage the object's status records now.
    pub fn recorded(known: &KnownIdentity) -> Self {
        known
            .status
            .as_ref()
            .map(|status| Self {
                endpoints: status.endpoints,
                last_used_time: status.last_used_time.clone(),
            })
            .unwrap_or_default()
    }

    /// In use by `endpoints` (the unused clock, if any, stops).
    pub fn in_use(endpoints: i64) -> Self {
        Self {
            endpoints: Some(endpoints),
            last_used_time: None,
        }
    }
}

/// Whether the object is an identity this cluster's operator stands behind.
pub fn outcome(known: &KnownIdentity, cluster: ClusterId, usage: &Usage) -> Outcome {
    let id = known.id;
    let not_ready = "the operator ignores this object and gives no pod this identity".to_owned();
    let invalid = |reason: &str, message: String| Outcome::Invalid {
        invalid: Finding::new(reason, message),
        not_ready: not_ready.clone(),
    };
    if known.spec_id != i64::from(id) {
        return invalid(
            "NameMismatch",
            format!(
                "spec.id: {} is not the object's name {id}: an identity is named after its number; delete this object (the operator allocates identities itself)",
                known.spec_id
            ),
        );
    }
    let local = id & LOCAL_IDENTITY_MASK;
    if local < FIRST_LOCAL_IDENTITY {
        return invalid(
            "ReservedNumber",
            format!(
                "spec.id: {id} has the local number {local}; 1-{} are reserved in every cluster: delete this object",
                FIRST_LOCAL_IDENTITY - 1
            ),
        );
    }
    if cluster_of(id) != cluster.get() {
        return invalid(
            "OtherCluster",
            format!(
                "spec.id: {id} is in cluster {}'s range (bits 16-24) but this is cluster {cluster}: each cluster's operator allocates its own identities",
                cluster_of(id)
            ),
        );
    }
    let ready = match (usage.endpoints, &usage.last_used_time) {
        (_, Some(since)) => format!(
            "identity {id} stands for {{{}}}; no endpoint has used it since {}, and it is deleted after the garbage-collection grace period",
            known.labels,
            since.0
        ),
        (Some(count), None) => format!(
            "identity {id} stands for {{{}}}; {count} endpoint(s) use it",
            known.labels
        ),
        (None, None) => format!(
            "identity {id} stands for {{{}}}; its users are counted at the next garbage-collection pass",
            known.labels
        ),
    };
    Outcome::Ready {
        valid: format!("identity {id} of cluster {cluster}"),
        ready: Finding::new("Allocated", ready),
    }
}

/// The whole status `known` should carry with `usage`; conditions whose status did not change
/// keep their transition time, so an unchanged identity yields its current status.
pub fn desired(
    known: &KnownIdentity,
    cluster: ClusterId,
    usage: Usage,
    now: &Time,
) -> WeftIdentityStatus {
    let current = known.status.clone().unwrap_or_default();
    let outcome = outcome(known, cluster, &usage);
    WeftIdentityStatus {
        observed_generation: known.generation,
        conditions: conditions::conditions(
            known.generation,
            &outcome,
            &[],
            &current.conditions,
            now,
        ),
        endpoints: usage.endpoints,
        last_used_time: usage.last_used_time,
    }
}

/// Whether the object's status differs from `desired`.
pub fn differs(known: &KnownIdentity, desired: &WeftIdentityStatus) -> bool {
    known.status.as_ref() != Some(desired)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use weft_core::identity::{make_identity, SecurityLabels};

    use super::*;

    fn cluster(id: u64) -> ClusterId {
        ClusterId::new(id).expect("cluster id")
    }

    fn known(id: u32, spec_id: i64, status: Option<WeftIdentityStatus>) -> KnownIdentity {
        KnownIdentity {
            id,
            labels: SecurityLabels::from_map([("k8s:app".to_owned(), "trainer".to_owned())].into()),
            uid: None,
            resource_version: None,
            status,
            consistent: true,
            spec_id,
            generation: Some(1),
        }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    fn reason(status: &WeftIdentityStatus, type_: &str) -> (String, String) {
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (condition.status.clone(), condition.reason.clone())
    }

    #[test]
    fn an_identity_of_this_cluster_is_valid_and_ready_with_its_usage() {
        let id = make_identity(cluster(1), 300);
        let status = desired(
            &known(id, id.into(), None),
            cluster(1),
            Usage::in_use(3),
            &at(10),
        );
        assert_eq!(reason(&status, "Valid"), ("True".into(), "Valid".into()));
        assert_eq!(
            reason(&status, "Ready"),
            ("True".into(), "Allocated".into())
        );
        assert_eq!(status.endpoints, Some(3));
        assert_eq!(status.observed_generation, Some(1));
        let ready = &status.conditions[1].message;
        assert!(ready.contains("3 endpoint(s)"), "{ready}");
    }

    #[test]
    fn the_same_usage_again_is_no_change_and_a_new_count_is() {
        let id = make_identity(cluster(1), 300);
        let first = desired(
            &known(id, id.into(), None),
            cluster(1),
            Usage::in_use(2),
            &at(10),
        );
        let written = known(id, id.into(), Some(first.clone()));
        let again = desired(&written, cluster(1), Usage::recorded(&written), &at(99));
        assert!(!differs(&written, &again), "nothing to write on a resync");
        let unused = Usage {
            endpoints: Some(0),
            last_used_time: Some(at(50)),
        };
        let later = desired(&written, cluster(1), unused, &at(50));
        assert!(differs(&written, &later));
        assert_eq!(
            later.conditions[1].last_transition_time,
            at(10),
            "still Ready: the transition time stays"
        );
        assert!(later.conditions[1]
            .message
            .contains("no endpoint has used it since"));
    }

    #[test]
    fn mismatched_reserved_and_foreign_numbers_are_invalid_with_the_field() {
        let id = make_identity(cluster(1), 300);
        let cases = [
            (known(id, i64::from(id) + 1, None), "NameMismatch"),
            (
                known(
                    make_identity(cluster(1), 12),
                    make_identity(cluster(1), 12).into(),
                    None,
                ),
                "ReservedNumber",
            ),
            (
                known(
                    make_identity(cluster(2), 300),
                    make_identity(cluster(2), 300).into(),
                    None,
                ),
                "OtherCluster",
            ),
        ];
        for (object, expected) in cases {
            let status = desired(&object, cluster(1), Usage::default(), &at(1));
            assert_eq!(reason(&status, "Valid"), ("False".into(), expected.into()));
            assert_eq!(reason(&status, "Stalled"), ("True".into(), expected.into()));
            assert!(status.conditions[0].message.starts_with("spec.id: "));
        }
    }
}
