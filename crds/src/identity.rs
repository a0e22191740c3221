//! `WeftIdentity`: a numeric security identity and the label set it stands for. The operator
//! owns these (named after the number, as Cilium names its identities); datapaths match on the
//! number, so it must never change for a label set while endpoints use it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftIdentity",
    doc = "A numeric security identity and the label set it stands for (operator-owned).",
    plural = "weftidentities",
    status = "WeftIdentityStatus",
    shortname = "wid",
    category = "weft",
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.endpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.id == oldSelf.id && self.securityLabels == oldSelf.securityLabels",
    "message": "an identity's id and securityLabels are immutable: delete and recreate it instead",
}]))]
pub struct WeftIdentitySpec {
    /// The numeric identity: the cluster ID in bits 16–24, a per-cluster number below.
    /// 1–255 are reserved (host, world, remote-node, …) and never stored as objects.
    #[schemars(range(min = 256, max = 33554431))]
    pub id: i64,
    /// The security-relevant labels: pod labels and namespace labels (prefixed with their
    /// source), minus the ignore list (`pod-template-hash`, …).
    #[schemars(extend("maxProperties" = 128))]
    pub security_labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeftIdentityStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Endpoints using this identity when the operator last counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<i64>,
    /// When the identity was last seen in use; it is garbage-collected a grace period after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
