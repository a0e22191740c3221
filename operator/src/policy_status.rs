//! What a policy's status says: kstatus-style conditions that `kubectl wait`, Argo CD and Flux
//! understand, with `observedGeneration`, from whether the policy converts; and
//! `selectedEndpoints`, how many endpoints its endpoint selector selects. Pure (the caches are
//! read, never fetched), so it is tested without an API server.
//!
//! # Counting selected endpoints
//!
//! - An **endpoint** is a pod with an identity of its own — not on the host network, not
//!   finished (`identity_controller::needs_identity`, what identity allocation counts) — that
//!   has an address, i.e. the CNI has wired it.
//! - It is **selected** when the converted policy's subject (`weft_core` `Selector`) matches its
//!   security labels (`SecurityLabels::for_pod`: pod labels minus the ignore list, plus the
//!   namespace and the namespace's labels). The conversion has already scoped a
//!   `WeftNetworkPolicy`'s subject to its namespace (unless the selector names a namespace
//!   itself); a clusterwide one is not scoped, and may name namespaces through
//!   `io.kubernetes.pod.namespace` or their labels through `io.cilium.k8s.namespace.labels.<key>`.
//!   So the count is what the agents enforce, and what `weftctl policy status` shows in the
//!   sandbox.
//! - A pod whose namespace is not in the cache yet is not counted; the namespace's arrival
//!   triggers a recount.
//! - An **invalid** policy keeps the `selectedEndpoints` its status carries: the count of its
//!   last good version when it was last counted, as the agents keep enforcing that version. It
//!   is not recounted while invalid (the operator keeps no old specs, and the invalid spec's
//!   selector describes a version nobody enforces), so pods that come and go meanwhile show
//!   once the policy is valid again. A policy that was never valid has no count.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use weft_core::identity::{LabelFilter, SecurityLabels, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use weft_core::policy::model::Policy;
use weft_core::policy::selector::{Operator, Selector};
use weft_crds::policy::PolicyStatus;
use weft_crds::policy_model::PolicyError;

use crate::conditions::{self, Finding, Outcome};
use crate::identity_controller::needs_identity;

/// What a policy's conversion means for its status.
pub fn outcome(outcome: &Result<Policy, PolicyError>) -> Outcome {
    match outcome {
        // Valid and applied, except what this version cannot enforce, which allows nothing:
        // not Ready, so GitOps tools and `kubectl wait` see that it is not all in force.
        Ok(policy) if !policy.unenforced.is_empty() => Outcome::Degraded {
            valid: "the policy is valid".into(),
            problem: Finding::new(
                "PartlyEnforced",
                format!(
                    "enforced, isolation included, without what this version cannot enforce, which allows nothing: {}",
                    policy.unenforced.join("; ")
                ),
            ),
        },
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
///
/// `counted` is what [`selected_endpoints`] found for the policy as it is now, `None` when
/// the caches are not complete yet. A valid policy reports it (or, without it, keeps what it
/// carries); an invalid one keeps what it carries (see the module comment).
pub fn desired_status(
    generation: Option<i64>,
    result: &Result<Policy, PolicyError>,
    current: Option<&PolicyStatus>,
    counted: Option<i64>,
    now: Time,
) -> PolicyStatus {
    let previous = current
        .map(|status| status.conditions.as_slice())
        .unwrap_or_default();
    let carried = current.and_then(|status| status.selected_endpoints);
    PolicyStatus {
        observed_generation: generation,
        conditions: conditions::conditions(generation, &outcome(result), &[], previous, &now),
        selected_endpoints: match result {
            Ok(_) => counted.or(carried),
            Err(_) => carried,
        },
    }
}

/// Whether `pod` is an endpoint policies select: it has an identity of its own (not on the
/// host network, not finished) and an address.
pub fn is_endpoint(pod: &Pod) -> bool {
    let addressed = pod.status.as_ref().is_some_and(|status| {
        status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || status
                .pod_ips
                .iter()
                .flatten()
                .any(|pod_ip| !pod_ip.ip.is_empty())
    });
    addressed && needs_identity(pod)
}

/// The namespaces `subject` confines itself to, if it does (an `In` requirement on the
/// namespace label). Only a shortcut: pods elsewhere would not match anyway.
fn namespaces_of(subject: &Selector) -> Option<&[String]> {
    subject
        .requirements
        .iter()
        .find(|r| r.key == NAMESPACE_LABEL && r.operator == Operator::In)
        .map(|r| r.values.as_slice())
}

/// How many endpoints among `pods` the converted `policy` selects, with their namespaces'
/// labels from `namespaces`. Costs one label-set construction and match per pod in the
/// policy's namespaces (every pod for a clusterwide policy not naming namespaces).
pub fn selected_endpoints(
    policy: &Policy,
    pods: &Store<Pod>,
    namespaces: &Store<Namespace>,
    ignore: &LabelFilter,
) -> i64 {
    let scope = namespaces_of(&policy.subject);
    let empty = BTreeMap::new();
    let count = pods
        .state()
        .iter()
        .filter(|pod| is_endpoint(pod))
        .filter(|pod| {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            if scope.is_some_and(|scope| !scope.iter().any(|n| n == namespace)) {
                return false;
            }
            let Some(ns) = namespaces.get(&ObjectRef::new(namespace)) else {
                return false;
            };
            // Keys only the namespace may set are left out here already: `for_pod` drops them
            // too, but warns each time, and this runs for every policy on every recount.
            let reserved =
                |key: &str| key == NAMESPACE_LABEL || key.starts_with(NAMESPACE_LABELS_PREFIX);
            let own = pod.labels();
            let allowed: BTreeMap<String, String>;
            let pod_labels = if own.keys().any(|key| reserved(key)) {
                allowed = own
                    .iter()
                    .filter(|(key, _)| !reserved(key))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                &allowed
            } else {
                own
            };
            let labels = SecurityLabels::for_pod(
                namespace,
                pod_labels,
                ns.metadata.labels.as_ref().unwrap_or(&empty),
                ignore,
            );
            policy.subject.matches(labels.as_map())
        })
        .count();
    i64::try_from(count).unwrap_or(i64::MAX)
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
        let status = desired_status(Some(4), &invalid(), None, None, at(100));
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
        let first = desired_status(Some(1), &invalid(), None, None, at(100));
        let again = desired_status(Some(1), &invalid(), Some(&first), None, at(200));
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
                unenforced: Vec::new(),
            }),
            Some(&first),
            Some(0),
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

    fn valid(subject: Selector) -> Result<Policy, PolicyError> {
        Ok(Policy {
            id: weft_core::policy::model::PolicyId {
                kind: weft_core::policy::model::PolicyKind::WeftClusterwideNetworkPolicy,
                namespace: None,
                name: "p".into(),
            },
            subject,
            rules: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            unenforced: Vec::new(),
        })
    }

    fn with_count(count: i64) -> PolicyStatus {
        PolicyStatus {
            selected_endpoints: Some(count),
            ..PolicyStatus::default()
        }
    }

    #[test]
    fn a_valid_policy_reports_its_count_and_an_invalid_one_keeps_the_last() {
        let all = valid(Selector::all());
        assert_eq!(
            desired_status(Some(1), &all, None, Some(4), at(1)).selected_endpoints,
            Some(4)
        );
        assert_eq!(
            desired_status(Some(1), &all, Some(&with_count(2)), Some(4), at(1)).selected_endpoints,
            Some(4),
            "recounted"
        );
        assert_eq!(
            desired_status(Some(1), &all, Some(&with_count(2)), None, at(1)).selected_endpoints,
            Some(2),
            "caches not complete: what it carries stays"
        );
        assert_eq!(
            desired_status(Some(2), &invalid(), Some(&with_count(2)), Some(7), at(1))
                .selected_endpoints,
            Some(2),
            "invalid: the last good version's count stays"
        );
        assert_eq!(
            desired_status(Some(1), &invalid(), None, Some(7), at(1)).selected_endpoints,
            None,
            "never valid: no count"
        );
    }

    fn pod(
        namespace: &str,
        name: &str,
        labels: serde_json::Value,
        extra: serde_json::Value,
    ) -> Pod {
        let mut object = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]},
        });
        json_merge(&mut object, extra);
        serde_json::from_value(object).expect("pod")
    }

    fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(&key);
                    } else {
                        json_merge(target.entry(key).or_insert(serde_json::Value::Null), value);
                    }
                }
            }
            (target, patch) => *target = patch,
        }
    }

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<K>();
        writer.apply_watcher_event(&Event::Init);
        for object in objects {
            writer.apply_watcher_event(&Event::InitApply(object));
        }
        writer.apply_watcher_event(&Event::InitDone);
        store
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .expect("namespace")
    }

    fn subject(pairs: &[(&str, &str)]) -> Selector {
        Selector::from_labels(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn only_addressed_pods_with_an_identity_of_their_own_are_endpoints() {
        let web = serde_json::json!({"app": "web"});
        let none = serde_json::json!({});
        assert!(is_endpoint(&pod("shop", "a", web.clone(), none.clone())));
        assert!(!is_endpoint(&pod(
            "shop",
            "no-ip",
            web.clone(),
            serde_json::json!({"status": {"phase": "Pending", "podIP": null, "podIPs": null}})
        )));
        assert!(!is_endpoint(&pod(
            "shop",
            "host",
            web.clone(),
            serde_json::json!({"spec": {"hostNetwork": true}})
        )));
        for phase in ["Succeeded", "Failed"] {
            assert!(!is_endpoint(&pod(
                "shop",
                "done",
                web.clone(),
                serde_json::json!({"status": {"phase": phase}})
            )));
        }
        // Only the list form of the address is set (dual-stack writers): still addressed.
        assert!(is_endpoint(&pod(
            "shop",
            "ips",
            web,
            serde_json::json!({"status": {"podIP": null}})
        )));
    }

    #[test]
    fn counts_match_security_labels_with_namespaces_and_their_labels() {
        let none = serde_json::json!({});
        let pods = store(vec![
            pod(
                "shop",
                "web-1",
                serde_json::json!({"app": "web"}),
                none.clone(),
            ),
            pod(
                "shop",
                "web-2",
                serde_json::json!({"app": "web", "pod-template-hash": "1"}),
                none.clone(),
            ),
            pod(
                "shop",
                "db-1",
                serde_json::json!({"app": "db"}),
                none.clone(),
            ),
            pod(
                "blog",
                "web-1",
                serde_json::json!({"app": "web"}),
                none.clone(),
            ),
            // A pod claiming another namespace's labels is not selected by them.
            pod(
                "blog",
                "sneaky",
                serde_json::json!({"app": "db", "io.cilium.k8s.namespace.labels.team": "a"}),
                none.clone(),
            ),
            // Its namespace is not known (yet): not counted.
            pod("lost", "web-1", serde_json::json!({"app": "web"}), none),
        ]);
        let namespaces = store(vec![
            namespace("shop", serde_json::json!({"team": "a"})),
            namespace("blog", serde_json::json!({"team": "b"})),
        ]);
        let ignore = LabelFilter::default();
        let count = |subject: Selector| {
            let policy = valid(subject).expect("valid");
            selected_endpoints(&policy, &pods, &namespaces, &ignore)
        };
        assert_eq!(count(Selector::all()), 5);
        assert_eq!(count(subject(&[("app", "web")])), 3);
        assert_eq!(
            count(subject(&[("app", "web"), (NAMESPACE_LABEL, "shop")])),
            2
        );
        assert_eq!(
            count(subject(&[("k8s:io.cilium.k8s.namespace.labels.team", "a")])),
            3
        );
        assert_eq!(
            count(subject(&[("pod-template-hash", "1")])),
            0,
            "ignored labels are not in identities"
        );
        assert_eq!(count(subject(&[(NAMESPACE_LABEL, "lost")])), 0);
    }
}
