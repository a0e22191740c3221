//! `BandwidthClass`: named egress rate limits and shares that pods join with the annotation
//! `weft.io/bandwidth-class: NAME` (the standard `kubernetes.io/egress-bandwidth` annotation is
//! honoured too, as a class of its own with just a `maxRate`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// The pod annotation naming a pod's class.
pub const BANDWIDTH_CLASS_ANNOTATION: &str = "weft.io/bandwidth-class";
/// The Kubernetes annotation for a plain egress cap, honoured as well.
pub const KUBERNETES_EGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";

/// A rate in bits per second, written as a Kubernetes quantity: `500M`, `10G`, `25Gi`.
pub const RATE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(k|M|G|T|Ki|Mi|Gi|Ti)?$";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "BandwidthClass",
    doc = "Egress rate limits and fair shares that pods join with the weft.io/bandwidth-class annotation.",
    plural = "bandwidthclasses",
    status = "BandwidthClassStatus",
    shortname = "bwc",
    category = "weft",
    printcolumn = r#"{"name":"Max","type":"string","jsonPath":".spec.egress.maxRate"}"#,
    printcolumn = r#"{"name":"Guaranteed","type":"string","jsonPath":".spec.egress.guaranteedRate"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".spec.egress.weight"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthClassSpec {
    pub egress: EgressBandwidth,
}

/// Egress shaping for each pod of the class.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressBandwidth {
    /// The most a pod may send, in bits per second (`10G`).
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub max_rate: String,
    /// What a pod gets even when the node's uplink is contended; must not exceed `maxRate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub guaranteed_rate: Option<String>,
    /// Share of spare capacity relative to other classes on the node.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
    /// Strict priority when the uplink is contended: 0 is served first, 7 last.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 7))]
    pub priority: i32,
}

fn default_weight() -> i32 {
    100
}

fn default_priority() -> i32 {
    4
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthClassStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pods that joined the class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<i32>,
}
