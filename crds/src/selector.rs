//! Label selectors as Kubernetes defines them, with the operator spelled out as an enum so the
//! API server rejects a typo instead of the policy silently selecting nothing.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selects endpoints by their labels. An empty selector (`{}`) selects every endpoint in scope.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    // Bounded so the API server's CEL cost estimate for the rule below stays in budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One requirement on a label key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// One rule, written with `==` rather than `in [...]` (a list literal costs 10 more per run):
// the API server multiplies each rule's cost by how many requirements one policy can hold
// (see docs/crds.md, "CEL cost budget").
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)",
        "message": "values must be non-empty when operator is In or NotIn, and empty when it is Exists or DoesNotExist",
        "fieldPath": ".values",
    },
]))]
pub struct LabelSelectorRequirement {
    /// The label key, e.g. `app` or `k8s:io.kubernetes.pod.namespace`.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: LabelSelectorOperator,
    /// Values for `In` and `NotIn`; must be empty for `Exists` and `DoesNotExist`.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LabelSelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}
