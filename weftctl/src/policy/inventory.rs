//! What `policy explain` and `policy status` work from, whichever the source: a sandbox's state
//! or a cluster's API server. Each source fills an [`Inventory`]; everything after that — the
//! evaluation, the status table, the output — is one code path.

use std::net::Ipv4Addr;

use serde_json::Value;
use weft_core::policy::evaluate::NamedPorts;
use weft_core::policy::model::Policy;
use weft_core::policy::selector::Labels;
use weft_crds::policy_model::{self, InvalidReason, PolicyError};

/// The pods, nodes and policies of one source.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Where the objects come from, for messages: `this sandbox`, `the cluster`.
    pub source: String,
    pub pods: Vec<PodView>,
    /// Node addresses, so an address that is a node's is explained as `host` or `remote-node`.
    pub nodes: Vec<NodeView>,
    pub policies: Vec<PolicyEntry>,
}

/// A pod as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// The sandbox cluster it runs in (one name for every pod of a real cluster).
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// Its own address; `None` when it has none (not started, finished, on the host network).
    pub ip: Option<Ipv4Addr>,
    /// On the node's network: not a Weft endpoint, seen by others as its node.
    pub host_network: bool,
    /// Its labels, namespace and namespace labels: what its identity stands for.
    pub security_labels: Labels,
    pub named_ports: NamedPorts,
}

impl PodView {
    /// `namespace/name`, as the output names pods.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub cluster: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

/// One policy object: its model, or why it is invalid.
#[derive(Clone, Debug)]
pub struct PolicyEntry {
    pub cluster: String,
    /// `WeftNetworkPolicy`, `WeftClusterwideNetworkPolicy` or `NetworkPolicy`.
    pub kind: String,
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub name: String,
    /// What this build of Weft makes of the spec (the operator runs the same conversion).
    pub outcome: Result<Policy, PolicyError>,
    /// What the operator wrote in the object's status; `None` in a sandbox (no operator) and
    /// for kinds whose status is not Weft's (Kubernetes `NetworkPolicy`).
    pub reported: Option<ReportedStatus>,
}

/// The parts of a policy's status `policy status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportedStatus {
    /// The `Valid` condition, if it describes the object's current generation.
    pub valid: Option<ConditionView>,
    /// The `Ready` condition.
    pub ready: Option<ConditionView>,
    /// `status.selectedEndpoints`, if it describes the current generation.
    pub selected_endpoints: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionView {
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The policy kinds, as their objects' `kind` names them.
pub const POLICY_KINDS: [&str; 3] = [
    "WeftNetworkPolicy",
    "WeftClusterwideNetworkPolicy",
    "NetworkPolicy",
];

impl PolicyEntry {
    /// Converts a policy object (as JSON, as read from a manifest or the API server); `None`
    /// if `object` is not of a policy kind. An object that does not decode is invalid, like
    /// one the model refuses.
    pub fn check(cluster: &str, object: &Value) -> Option<Self> {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let outcome = match kind.as_str() {
            "WeftNetworkPolicy" => serde_json::from_value(object.clone())
                .map_err(|e| decode_error(&e))
                .and_then(|p| policy_model::weft_policy(&p)),
            "WeftClusterwideNetworkPolicy" => serde_json::from_value(object.clone())
                .map_err(|e| decode_error(&e))
                .and_then(|p| policy_model::clusterwide_policy(&p)),
            "NetworkPolicy" => serde_json::from_value(object.clone())
                .map_err(|e| decode_error(&e))
                .and_then(|p| policy_model::kubernetes_policy(&p)),
            _ => return None,
        };
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        let name = match object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
        {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.to_owned(),
        };
        Some(Self {
            cluster: cluster.to_owned(),
            kind,
            name,
            outcome,
            reported: None,
        })
    }
}

impl ReportedStatus {
    /// Reads a Weft policy object's status. A `Valid` condition or an endpoint count about an
    /// older generation is left out: it judges a spec that is no longer there.
    pub fn of(object: &Value) -> Self {
        let generation = object
            .pointer("/metadata/generation")
            .and_then(Value::as_i64);
        let status = &object["status"];
        let status_generation = status["observedGeneration"].as_i64();
        let condition = |type_: &str| {
            status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
        };
        let view = |condition: &Value| ConditionView {
            status: condition["status"].as_str().unwrap_or("Unknown").to_owned(),
            reason: condition["reason"].as_str().unwrap_or_default().to_owned(),
            message: condition["message"].as_str().unwrap_or_default().to_owned(),
        };
        let current = |observed: Option<i64>| {
            generation.is_none() || observed.is_none() || observed == generation
        };
        Self {
            valid: condition("Valid")
                .filter(|c| current(c["observedGeneration"].as_i64().or(status_generation)))
                .map(view),
            ready: condition("Ready").map(view),
            selected_endpoints: status["selectedEndpoints"]
                .as_i64()
                .filter(|_| current(status_generation)),
        }
    }
}

fn decode_error(error: &serde_json::Error) -> PolicyError {
    PolicyError {
        field: "spec".into(),
        reason: InvalidReason::BadSelector,
        message: format!("does not match the schema: {error} (run `weftctl validate`)"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_valid_condition_about_an_older_generation_is_not_reported() {
        let object = |observed: i64| {
            json!({
                "metadata": {"name": "p", "namespace": "ml", "generation": 3},
                "status": {
                    "observedGeneration": observed,
                    "conditions": [
                        {"type": "Valid", "status": "False", "reason": "BadCIDR", "message": "m", "observedGeneration": observed},
                        {"type": "Ready", "status": "False", "reason": "Invalid", "message": "m"},
                    ],
                    "selectedEndpoints": 2,
                },
            })
        };
        let current = ReportedStatus::of(&object(3));
        assert_eq!(
            current.valid.as_ref().map(|c| c.reason.as_str()),
            Some("BadCIDR")
        );
        assert_eq!(current.selected_endpoints, Some(2));
        let stale = ReportedStatus::of(&object(2));
        assert_eq!((stale.valid, stale.selected_endpoints), (None, None));
        assert_eq!(stale.ready.map(|c| c.status), Some("False".into()));
    }

    #[test]
    fn objects_of_other_kinds_are_not_policies_and_undecodable_ones_are_invalid() {
        assert!(PolicyEntry::check("c1", &json!({"kind": "Service"})).is_none());
        let broken = PolicyEntry::check(
            "c1",
            &json!({"kind": "WeftNetworkPolicy", "apiVersion": "weft.io/v1alpha1",
                    "metadata": {"name": "p", "namespace": "ml"}, "spec": {"ingress": 7}}),
        )
        .expect("a policy kind");
        assert_eq!(broken.name, "ml/p");
        assert!(broken
            .outcome
            .unwrap_err()
            .message
            .contains("does not match the schema"));
    }
}
