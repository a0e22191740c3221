//! `GlobalService`: makes a Service's backends reachable from meshed clusters, declared apart
//! from the Service itself (the annotation `weft.io/global: "true"` does the same in place).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use weft_core::cluster::CLUSTER_NAME_PATTERN;

use crate::status::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "GlobalService",
    doc = "Shares a Service's backends with meshed clusters and merges theirs, with locality affinity and failover.",
    plural = "globalservices",
    namespaced,
    status = "GlobalServiceStatus",
    shortname = "gsvc",
    category = "weft",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.serviceName"}"#,
    printcolumn = r#"{"name":"Affinity","type":"string","jsonPath":".spec.affinity"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GlobalServiceSpec {
    /// The Service in this namespace whose backends are shared and merged across clusters.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub service_name: String,
    /// Which backends new connections prefer: `local` (this cluster's while any is healthy),
    /// `remote` (other clusters' while any is healthy) or `none` (all alike).
    #[serde(default)]
    pub affinity: Affinity,
    /// Whether this cluster's backends are offered to other clusters. `false` keeps them
    /// private while this cluster still uses remote backends.
    #[serde(default = "default_true")]
    pub shared: bool,
    /// Clusters to fail over to, most preferred first, when the preferred set has no healthy
    /// backend. Clusters not listed come after, in any order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub failover: Vec<ClusterNameRef>,
}

fn default_true() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    Local,
    Remote,
    #[default]
    None,
}

/// A cluster's name in the mesh: a DNS label of at most 32 characters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct ClusterNameRef(
    #[schemars(length(min = 1, max = 32), regex(pattern = CLUSTER_NAME_PATTERN))] pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Backends per cluster, as this cluster sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterBackends>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBackends {
    pub cluster: String,
    /// Backends known in that cluster.
    pub backends: i32,
    /// Backends ready to take new connections.
    pub ready_backends: i32,
    /// Whether the cluster is reachable and its data fresh (not past the stale TTL).
    pub healthy: bool,
}
