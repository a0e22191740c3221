//! `WeftNetworkPolicy` (namespaced) and `WeftClusterwideNetworkPolicy` (cluster-scoped).
//!
//! The rule shape follows CiliumNetworkPolicy field for field (`endpointSelector`,
//! `ingress`/`egress`, `ingressDeny`/`egressDeny`, `fromEndpoints`, `toCIDRSet`, `toPorts`,
//! `rules.http`, `toFQDNs`, …) so that a Cilium user migrates by renaming the kind.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;
use crate::status::Condition;

/// A namespaced network policy: the rule applies to endpoints of the policy's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftNetworkPolicy",
    doc = "Identity-based L3/L4/L7 network policy for the endpoints of one namespace, shaped after CiliumNetworkPolicy.",
    plural = "weftnetworkpolicies",
    namespaced,
    status = "PolicyStatus",
    shortname = "wnp",
    category = "weft",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","description":"Endpoints the policy selects","jsonPath":".status.selectedEndpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct WeftNetworkPolicySpec(pub PolicyRule);

/// Same rule as [`WeftNetworkPolicySpec`], applying in every namespace. Its `endpointSelector`
/// may name namespaces with the `k8s:io.kubernetes.pod.namespace` label.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftClusterwideNetworkPolicy",
    doc = "Identity-based L3/L4/L7 network policy for endpoints of every namespace, shaped after CiliumClusterwideNetworkPolicy.",
    plural = "weftclusterwidenetworkpolicies",
    status = "PolicyStatus",
    shortname = "wcnp",
    category = "weft",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","description":"Endpoints the policy selects","jsonPath":".status.selectedEndpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct WeftClusterwideNetworkPolicySpec(pub PolicyRule);

/// What a policy selects and which traffic it allows or denies for the selected endpoints.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.ingress) || has(self.egress) || has(self.ingressDeny) || has(self.egressDeny) || has(self.enableDefaultDeny)",
    "message": "a policy needs at least one of ingress, egress, ingressDeny, egressDeny or enableDefaultDeny",
}]))]
pub struct PolicyRule {
    /// Free text shown by `weftctl policy explain` next to the verdicts this policy decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The endpoints this policy applies to. `{}` selects every endpoint in scope.
    pub endpoint_selector: LabelSelector,
    /// Allowed incoming traffic. Selected endpoints deny all other ingress unless
    /// `enableDefaultDeny.ingress` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Allowed outgoing traffic. Selected endpoints deny all other egress unless
    /// `enableDefaultDeny.egress` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub egress: Option<Vec<EgressRule>>,
    /// Denied incoming traffic; a deny always wins over any allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub ingress_deny: Option<Vec<IngressDenyRule>>,
    /// Denied outgoing traffic; a deny always wins over any allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub egress_deny: Option<Vec<EgressDenyRule>>,
    /// Whether selecting an endpoint turns on default-deny in each direction (both default to
    /// true, as in Cilium). Set `ingress: false` to add allows without isolating the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDeny>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDeny {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// Traffic from these peers to these ports is allowed. Peers within a rule are alternatives
/// (any matching peer suffices); `toPorts` restricts what they may reach.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Endpoints, by labels, in the policy's namespace unless the selector names a namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from_endpoints: Vec<LabelSelector>,
    /// IPv4/IPv6 addresses or CIDRs outside the cluster.
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub from_cidr: Vec<Cidr>,
    /// CIDRs with exceptions carved out of them.
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub from_cidr_set: Vec<CidrRule>,
    /// Special groups of peers such as `world` or `host`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from_entities: Vec<Entity>,
    /// Ports (and L7 rules) the peers may reach; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_ports: Vec<PortRule>,
}

/// Traffic to these peers on these ports is allowed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub to_endpoints: Vec<LabelSelector>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub to_cidr: Vec<Cidr>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub to_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_entities: Vec<Entity>,
    /// DNS names the endpoint may reach, learned through the DNS proxy. Needs a `rules.dns`
    /// rule on port 53 in the same policy so the proxy sees the lookups.
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub to_fqdns: Vec<FqdnSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_ports: Vec<PortRule>,
}

/// Traffic from these peers to these ports is denied, whatever any allow says.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from_endpoints: Vec<LabelSelector>,
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub from_cidr: Vec<Cidr>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub from_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from_entities: Vec<Entity>,
    /// Ports to deny; L7 rules are not allowed in deny rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_ports: Vec<PortDenyRule>,
}

/// Traffic to these peers on these ports is denied, whatever any allow says.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub to_endpoints: Vec<LabelSelector>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub to_cidr: Vec<Cidr>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub to_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_entities: Vec<Entity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to_ports: Vec<PortDenyRule>,
}

/// An IPv4 or IPv6 address, or a CIDR such as `10.0.0.0/8`; a bare address means a host route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Cidr(
    #[schemars(regex(
        pattern = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}(/([0-9]|[12][0-9]|3[0-2]))?|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?)$"
    ))]
    pub String,
);

/// A CIDR minus the CIDRs in `except`, which must lie inside it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    pub cidr: Cidr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub except: Vec<Cidr>,
}

/// Peers that are not pods of this cluster, or groups of them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Everything outside the cluster (not a pod, node or API server of it).
    World,
    /// The local node, including host-network pods.
    Host,
    /// Other nodes of the cluster (and of meshed clusters).
    RemoteNode,
    /// Every endpoint, node and API server of this cluster and meshed clusters.
    Cluster,
    /// The Kubernetes API server, wherever it runs.
    KubeApiserver,
    /// Weft's health-check endpoints.
    Health,
    /// Endpoints whose identity is not resolved yet.
    Init,
    /// Everything.
    All,
}

/// A DNS name or pattern the endpoint may reach.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.matchName) != has(self.matchPattern)",
    "message": "set exactly one of matchName or matchPattern",
}]))]
pub struct FqdnSelector {
    /// An exact name such as `api.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 255),
        regex(pattern = r"^([-a-zA-Z0-9_]+\.)*[-a-zA-Z0-9_]+\.?$")
    )]
    pub match_name: Option<String>,
    /// A pattern where `*` matches within one label and a leading `**.` any subdomains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 255),
        regex(pattern = r"^([-a-zA-Z0-9_*]+\.)*[-a-zA-Z0-9_*]+\.?$")
    )]
    pub match_pattern: Option<String>,
}

/// Ports a rule applies to, optionally with L7 rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 40))]
    pub ports: Vec<PortProtocol>,
    /// L7 rules: the traffic goes through Weft's proxy and only matching requests pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// Ports a deny rule applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 40))]
    pub ports: Vec<PortProtocol>,
}

/// A port, or a range from `port` to `endPort`, with its protocol.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// One rule: the regex is the costly part, and the API server multiplies it by every port a
// policy can hold (docs/crds.md, "CEL cost budget").
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.endPort) || (self.port.matches('^[0-9]+$') && int(self.port) <= self.endPort)",
        "message": "endPort needs a numeric port that is less than or equal to it",
        "fieldPath": ".endPort",
    },
]))]
pub struct PortProtocol {
    /// A port number (`0` means every port) or a named port of the selected pods.
    #[schemars(
        length(min = 1, max = 15),
        regex(
            pattern = r"^([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]|[a-z0-9]*[a-z][-a-z0-9]*)$"
        )
    )]
    pub port: String,
    /// The last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    /// TCP and UDP.
    #[default]
    #[serde(rename = "ANY")]
    Any,
}

/// L7 rules for the ports of a rule: either HTTP or DNS, not both.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.http) && has(self.dns))",
    "message": "use either http or dns rules on a port, not both",
}]))]
pub struct L7Rules {
    /// Requests matching any of these pass; all others get 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub http: Option<Vec<HttpRule>>,
    /// Lookups matching any of these pass; they also teach `toFQDNs` the answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub dns: Option<Vec<DnsRule>>,
}

/// An HTTP request filter; every field set must match. Method, path and host are regular
/// expressions matched against the whole value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub host: Option<String>,
    /// Headers that must be present, as `Name` or `Name: value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<String>,
}

/// A DNS lookup filter for the DNS proxy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.matchName) != has(self.matchPattern)",
    "message": "set exactly one of matchName or matchPattern",
}]))]
pub struct DnsRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 255),
        regex(pattern = r"^([-a-zA-Z0-9_]+\.)*[-a-zA-Z0-9_]+\.?$")
    )]
    pub match_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 255),
        regex(pattern = r"^([-a-zA-Z0-9_*]+\.)*[-a-zA-Z0-9_*]+\.?$")
    )]
    pub match_pattern: Option<String>,
}

/// What the operator and agents report about a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid` (the spec compiles), `Ready`, `Reconciling` and `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many endpoints the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_endpoints: Option<i64>,
}

impl std::ops::Deref for WeftNetworkPolicySpec {
    type Target = PolicyRule;

    fn deref(&self) -> &PolicyRule {
        &self.0
    }
}

impl std::ops::Deref for WeftClusterwideNetworkPolicySpec {
    type Target = PolicyRule;

    fn deref(&self) -> &PolicyRule {
        &self.0
    }
}
