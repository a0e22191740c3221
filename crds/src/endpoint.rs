//! `WeftEndpoint`: what a node's agent knows about one of its pods — addresses, identity,
//! named ports — and whether policy is enforced on it. Agent-owned; read by the operator (for
//! identity garbage collection) and by the clustermesh-apiserver (exported to peers).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::Protocol;
use crate::status::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftEndpoint",
    doc = "A pod as its node's agent sees it: addresses, identity, named ports, enforcement (agent-owned).",
    plural = "weftendpoints",
    namespaced,
    status = "WeftEndpointStatus",
    shortname = "wep",
    category = "weft",
    printcolumn = r#"{"name":"Identity","type":"integer","jsonPath":".spec.identity"}"#,
    printcolumn = r#"{"name":"IPv4","type":"string","jsonPath":".spec.ips[0]"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WeftEndpointSpec {
    /// The pod's addresses, IPv4 first.
    #[schemars(length(min = 1, max = 2))]
    pub ips: Vec<String>,
    /// The pod's security identity.
    #[schemars(range(min = 1, max = 33554431))]
    pub identity: i64,
    /// The node whose agent manages the endpoint.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// The pod's named container ports, for policies that name ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub named_ports: Vec<NamedPort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeftEndpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
}

/// The reason of a `WeftEndpoint`'s `Ready=False` when its node does not enforce the cluster's
/// policies as written (they do not compile for its endpoints, a map is full); the condition's
/// message is the node's problem. `weftctl policy status` lists such nodes.
pub const POLICY_NOT_ENFORCED: &str = "PolicyNotEnforced";

/// The reason of a `WeftEndpoint`'s `Ready=False` when a datapath map on its node that its
/// wiring, identity or policy needs is full: what does not fit is denied and retried on every
/// pass; the message names the map and the flag that sizes it. `weftctl policy status` lists
/// such nodes too.
pub const MAP_FULL: &str = "MapFull";

/// Where the endpoint is in its life on the node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointState {
    /// Wired, waiting for its identity.
    WaitingForIdentity,
    /// Its datapath and policy are being written.
    Regenerating,
    /// Traffic flows under its current policy.
    Ready,
    /// Being removed.
    Disconnecting,
}

/// Whether policy isolates the endpoint in each direction, and at which policy revision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    pub ingress: bool,
    pub egress: bool,
    /// The policy revision the datapath enforces for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<i64>,
}
