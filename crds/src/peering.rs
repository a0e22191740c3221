//! `ClusterPeering`: connects this cluster to another cluster's clustermesh-apiserver and says
//! what to import from it. Peers only ever read each other's exports.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::global_service::ClusterNameRef;
use crate::status::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "ClusterPeering",
    doc = "A connection to another cluster's clustermesh-apiserver and what to import from it.",
    plural = "clusterpeerings",
    status = "ClusterPeeringStatus",
    shortname = "cpeer",
    category = "weft",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterName"}"#,
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".spec.clusterID"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.lastSyncedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPeeringSpec {
    /// The remote cluster's name, as its certificate names it.
    pub cluster_name: ClusterNameRef,
    /// The remote cluster's ID (1–511), unique within the mesh; it is the high bits of the
    /// remote cluster's security identities.
    #[serde(rename = "clusterID")]
    #[schemars(range(min = 1, max = 511))]
    pub cluster_id: i32,
    /// Addresses of the remote clustermesh-apiserver as `host:port`; tried in order.
    #[schemars(length(min = 1, max = 8))]
    pub endpoints: Vec<MeshEndpoint>,
    /// The Secret holding `ca.crt` (the remote cluster's CA bundle), and `tls.crt` / `tls.key`
    /// (this cluster's client certificate, issued for `remote-<this cluster's name>`).
    pub tls_secret_ref: SecretReference,
    /// What to import from the peer; everything by default.
    #[serde(default)]
    pub import: ImportSelection,
}

/// `host:port` of a clustermesh-apiserver.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct MeshEndpoint(
    #[schemars(
        length(min = 3, max = 261),
        regex(
            pattern = r"^(\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?):[0-9]{1,5}$"
        )
    )]
    pub String,
);

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the namespace Weft runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportSelection {
    /// Remote endpoints' identities, so policies can select remote pods by label.
    #[serde(default = "default_true")]
    pub identities: bool,
    /// Remote endpoints (IP → identity), for policy enforcement on cross-cluster traffic.
    #[serde(default = "default_true")]
    pub endpoints: bool,
    /// Remote backends of global services.
    #[serde(default = "default_true")]
    pub global_services: bool,
    /// Only these namespaces; empty imports all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub namespaces: Vec<String>,
}

impl Default for ImportSelection {
    fn default() -> Self {
        Self {
            identities: true,
            endpoints: true,
            global_services: true,
            namespaces: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPeeringStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid`, `Connected`, `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The peer's export revision this cluster has applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportedCounts>,
    /// The last connection or sync error, kept until a sync succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportedCounts {
    pub identities: i64,
    pub endpoints: i64,
    pub global_services: i64,
}
