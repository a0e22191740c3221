//! Converts `WeftNetworkPolicy`, `WeftClusterwideNetworkPolicy` and Kubernetes `NetworkPolicy`
//! into Weft's policy model, checking what the schema cannot: CIDRs that parse, `except`
//! inside its CIDR, and features the datapath does not enforce yet. A policy that fails here
//! gets `Valid=False` with the field and reason, and the last good enforcement stays.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_core::policy::model::{
    Entity as ModelEntity, Peer, Policy, PolicyId, PolicyKind, PortMatch, ProtocolMatch, Rule,
    Section,
};
use weft_core::policy::selector::{Operator, Requirement, Selector};
use weft_core::policy::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};

use crate::policy::{self as crd, Entity, PolicyRule, Protocol};
use crate::selector::{LabelSelector, LabelSelectorOperator};
use crate::{WeftClusterwideNetworkPolicy, WeftNetworkPolicy};

/// Why a policy is not valid, in the vocabulary of its `Valid` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    BadSelector,
    BadCidr,
    UnknownEntity,
    UnsupportedField,
}

impl InvalidReason {
    /// The condition's `reason` (CamelCase, as Kubernetes conditions spell reasons).
    pub fn as_condition_reason(self) -> &'static str {
        match self {
            Self::BadSelector => "BadSelector",
            Self::BadCidr => "BadCIDR",
            Self::UnknownEntity => "UnknownEntity",
            Self::UnsupportedField => "UnsupportedField",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub reason: InvalidReason,
    pub message: String,
}

fn error(
    field: impl Into<String>,
    reason: InvalidReason,
    message: impl Into<String>,
) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason,
        message: message.into(),
    }
}

fn namespace_requirement(namespace: &str) -> Requirement {
    Requirement {
        key: NAMESPACE_LABEL.into(),
        operator: Operator::In,
        values: vec![namespace.into()],
    }
}

fn selector(selector: &LabelSelector) -> Selector {
    let mut model = Selector::from_labels(&selector.match_labels);
    for expression in &selector.match_expressions {
        model = model.with(Requirement {
            key: expression.key.clone(),
            operator: match expression.operator {
                LabelSelectorOperator::In => Operator::In,
                LabelSelectorOperator::NotIn => Operator::NotIn,
                LabelSelectorOperator::Exists => Operator::Exists,
                LabelSelectorOperator::DoesNotExist => Operator::DoesNotExist,
            },
            values: expression.values.clone(),
        });
    }
    model
}

/// In a namespaced policy, endpoint selectors mean "in this namespace" unless they say which.
fn scoped(model: Selector, namespace: Option<&str>) -> Selector {
    match namespace {
        Some(namespace) if !model.mentions(NAMESPACE_LABEL) => {
            model.with(namespace_requirement(namespace))
        }
        _ => model,
    }
}

fn cidr(value: &str, field: &str) -> Result<IpNet, PolicyError> {
    let parsed = if value.contains('/') {
        value.parse::<IpNet>().ok()
    } else {
        value.parse::<std::net::IpAddr>().ok().map(IpNet::from)
    };
    parsed.map(|net| net.trunc()).ok_or_else(|| {
        error(
            field,
            InvalidReason::BadCidr,
            format!("{value:?} is not an IP address or CIDR"),
        )
    })
}

/// A CIDR peer. IPv6 ones are kept as peers the IPv4 datapath never meets (see
/// `Peer::Ipv6Cidr`), so dual-stack policies apply unchanged.
fn cidr_rule(cidr_value: &str, except: &[String], field: &str) -> Result<Peer, PolicyError> {
    let outer = cidr(cidr_value, &format!("{field}.cidr"))?;
    let mut excepts = Vec::new();
    for (index, value) in except.iter().enumerate() {
        let inner = cidr(value, &format!("{field}.except[{index}]"))?;
        if !outer.contains(&inner) {
            return Err(error(
                format!("{field}.except[{index}]"),
                InvalidReason::BadCidr,
                format!("{inner} is not inside {outer}; an exception must lie within its CIDR"),
            ));
        }
        excepts.push(inner);
    }
    Ok(match outer {
        IpNet::V4(cidr) => Peer::Cidr {
            cidr,
            except: excepts
                .into_iter()
                .filter_map(|net| match net {
                    IpNet::V4(net) => Some(net),
                    IpNet::V6(_) => None,
                })
                .collect(),
        },
        IpNet::V6(cidr) => Peer::Ipv6Cidr {
            cidr,
            except: excepts
                .into_iter()
                .filter_map(|net| match net {
                    IpNet::V6(net) => Some(net),
                    IpNet::V4(_) => None,
                })
                .collect(),
        },
    })
}

fn entity(entity: Entity) -> ModelEntity {
    match entity {
        Entity::World => ModelEntity::World,
        Entity::Host => ModelEntity::Host,
        Entity::RemoteNode => ModelEntity::RemoteNode,
        Entity::Cluster => ModelEntity::Cluster,
        Entity::KubeApiserver => ModelEntity::KubeApiserver,
        Entity::Health => ModelEntity::Health,
        Entity::Init => ModelEntity::Init,
        Entity::All => ModelEntity::All,
    }
}

fn protocol(protocol: Protocol) -> ProtocolMatch {
    match protocol {
        Protocol::Tcp => ProtocolMatch::Tcp,
        Protocol::Udp => ProtocolMatch::Udp,
        Protocol::Any => ProtocolMatch::Any,
    }
}

fn port(port: &crd::PortProtocol, field: &str) -> Result<PortMatch, PolicyError> {
    let protocol = protocol(port.protocol);
    match port.port.parse::<u16>() {
        Ok(0) => Ok(PortMatch::Range {
            protocol,
            first: 0,
            last: u16::MAX,
        }),
        Ok(first) => {
            let last = match port.end_port {
                None => first,
                Some(end) => u16::try_from(end)
                    .ok()
                    .filter(|end| *end >= first)
                    .ok_or_else(|| {
                        error(
                            format!("{field}.endPort"),
                            InvalidReason::BadSelector,
                            format!("endPort {end} must be between port {first} and 65535"),
                        )
                    })?,
            };
            Ok(PortMatch::Range {
                protocol,
                first,
                last,
            })
        }
        Err(_) => Ok(PortMatch::Named {
            protocol,
            name: port.port.clone(),
        }),
    }
}

struct Scope<'a> {
    namespace: Option<&'a str>,
}

impl Scope<'_> {
    fn peers(
        &self,
        endpoints: &[LabelSelector],
        cidrs: &[crd::Cidr],
        cidr_sets: &[crd::CidrRule],
        entities: &[Entity],
        field: &str,
        (cidr_name, cidr_set_name): (&str, &str),
    ) -> Result<Vec<Peer>, PolicyError> {
        let mut peers: Vec<Peer> = endpoints
            .iter()
            .map(|s| Peer::Endpoints(scoped(selector(s), self.namespace)))
            .collect();
        for (index, value) in cidrs.iter().enumerate() {
            peers.push(cidr_rule(
                &value.0,
                &[],
                &format!("{field}.{cidr_name}[{index}]"),
            )?);
        }
        for (index, set) in cidr_sets.iter().enumerate() {
            let except: Vec<String> = set.except.iter().map(|c| c.0.clone()).collect();
            peers.push(cidr_rule(
                &set.cidr.0,
                &except,
                &format!("{field}.{cidr_set_name}[{index}]"),
            )?);
        }
        peers.extend(entities.iter().map(|e| Peer::Entity(entity(*e))));
        Ok(peers)
    }

    fn rule_policy(
        &self,
        id: PolicyId,
        subject: &LabelSelector,
        rule: &PolicyRule,
    ) -> Result<Policy, PolicyError> {
        let mut rules = Vec::new();
        // What this version cannot enforce (L7 rules, FQDNs) is left out and allows nothing;
        // the rest, isolation first, applies. Refusing the whole policy instead would leave
        // its pods less isolated than it says.
        let mut unenforced = Vec::new();
        for (index, ingress) in rule.ingress.iter().flatten().enumerate() {
            let field = format!("spec.ingress[{index}]");
            let peers = self.peers(
                &ingress.from_endpoints,
                &ingress.from_cidr,
                &ingress.from_cidr_set,
                &ingress.from_entities,
                &field,
                ("fromCIDR", "fromCIDRSet"),
            )?;
            if let Some(ports) = ports_of(&ingress.to_ports, &field, &mut unenforced)? {
                rules.push(Rule {
                    section: Section::Ingress,
                    index,
                    peers,
                    ports,
                });
            }
        }
        for (index, egress) in rule.egress.iter().flatten().enumerate() {
            let field = format!("spec.egress[{index}]");
            let peers = self.peers(
                &egress.to_endpoints,
                &egress.to_cidr,
                &egress.to_cidr_set,
                &egress.to_entities,
                &field,
                ("toCIDR", "toCIDRSet"),
            )?;
            if !egress.to_fqdns.is_empty() {
                unenforced.push(format!(
                    "{field}.toFQDNs: FQDN policy is not enforced yet; these names are not allowed"
                ));
                // With no other peer, the rule allows nothing: it must not become "every peer".
                if peers.is_empty() {
                    continue;
                }
            }
            if let Some(ports) = ports_of(&egress.to_ports, &field, &mut unenforced)? {
                rules.push(Rule {
                    section: Section::Egress,
                    index,
                    peers,
                    ports,
                });
            }
        }
        for (index, deny) in rule.ingress_deny.iter().flatten().enumerate() {
            let field = format!("spec.ingressDeny[{index}]");
            let peers = self.peers(
                &deny.from_endpoints,
                &deny.from_cidr,
                &deny.from_cidr_set,
                &deny.from_entities,
                &field,
                ("fromCIDR", "fromCIDRSet"),
            )?;
            rules.push(Rule {
                section: Section::IngressDeny,
                index,
                peers,
                ports: deny_ports_of(&deny.to_ports, &field)?,
            });
        }
        for (index, deny) in rule.egress_deny.iter().flatten().enumerate() {
            let field = format!("spec.egressDeny[{index}]");
            let peers = self.peers(
                &deny.to_endpoints,
                &deny.to_cidr,
                &deny.to_cidr_set,
                &deny.to_entities,
                &field,
                ("toCIDR", "toCIDRSet"),
            )?;
            rules.push(Rule {
                section: Section::EgressDeny,
                index,
                peers,
                ports: deny_ports_of(&deny.to_ports, &field)?,
            });
        }
        // Written allow rules isolate, whether or not all of them could be enforced.
        let has_allow = |section: Section| match section {
            Section::Ingress => rule.ingress.as_ref().is_some_and(|rules| !rules.is_empty()),
            _ => rule.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
        };
        let default_deny = rule.enable_default_deny.clone().unwrap_or_default();
        Ok(Policy {
            id,
            // A namespaced policy governs only its own namespace's endpoints, even when its
            // selector names another (as Cilium): peers may be elsewhere, subjects may not.
            subject: match self.namespace {
                Some(namespace) => selector(subject).with(namespace_requirement(namespace)),
                None => selector(subject),
            },
            isolates_ingress: default_deny
                .ingress
                .unwrap_or_else(|| has_allow(Section::Ingress)),
            isolates_egress: default_deny
                .egress
                .unwrap_or_else(|| has_allow(Section::Egress)),
            rules,
            unenforced,
        })
    }
}

/// The ports an allow rule's `toPorts` open; `None` when every entry has L7 rules, which this
/// version cannot enforce: such entries open nothing (opening their ports would allow more
/// than the L7 rules say), and a rule left without ports allows nothing at all.
fn ports_of(
    rules: &[crd::PortRule],
    field: &str,
    unenforced: &mut Vec<String>,
) -> Result<Option<Vec<PortMatch>>, PolicyError> {
    let mut ports = Vec::new();
    let mut left_out = 0;
    for (index, rule) in rules.iter().enumerate() {
        let field = format!("{field}.toPorts[{index}]");
        if rule.rules.is_some() {
            unenforced.push(format!(
                "{field}.rules: L7 rules (http, dns) are not enforced yet; these ports are not allowed"
            ));
            left_out += 1;
            continue;
        }
        if rule.ports.is_empty() {
            ports.push(PortMatch::Range {
                protocol: ProtocolMatch::Any,
                first: 0,
                last: u16::MAX,
            });
        }
        for (port_index, value) in rule.ports.iter().enumerate() {
            ports.push(port(value, &format!("{field}.ports[{port_index}]"))?);
        }
    }
    if left_out > 0 && ports.is_empty() {
        return Ok(None);
    }
    Ok(Some(ports))
}

fn deny_ports_of(rules: &[crd::PortDenyRule], field: &str) -> Result<Vec<PortMatch>, PolicyError> {
    let mut ports = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if rule.ports.is_empty() {
            ports.push(PortMatch::Range {
                protocol: ProtocolMatch::Any,
                first: 0,
                last: u16::MAX,
            });
        }
        for (port_index, value) in rule.ports.iter().enumerate() {
            ports.push(port(
                value,
                &format!("{field}.toPorts[{index}].ports[{port_index}]"),
            )?);
        }
    }
    Ok(ports)
}

pub fn weft_policy(policy: &WeftNetworkPolicy) -> Result<Policy, PolicyError> {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let id = PolicyId {
        kind: PolicyKind::WeftNetworkPolicy,
        namespace: Some(namespace.clone()),
        name: policy.metadata.name.clone().unwrap_or_default(),
    };
    Scope {
        namespace: Some(&namespace),
    }
    .rule_policy(id, &policy.spec.endpoint_selector, &policy.spec)
}

pub fn clusterwide_policy(policy: &WeftClusterwideNetworkPolicy) -> Result<Policy, PolicyError> {
    let id = PolicyId {
        kind: PolicyKind::WeftClusterwideNetworkPolicy,
        namespace: None,
        name: policy.metadata.name.clone().unwrap_or_default(),
    };
    Scope { namespace: None }.rule_policy(id, &policy.spec.endpoint_selector, &policy.spec)
}

fn k8s_selector(
    selector: &meta::LabelSelector,
    field: &str,
    key_prefix: &str,
) -> Result<Selector, PolicyError> {
    let labels: BTreeMap<String, String> = selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (format!("{key_prefix}{k}"), v))
        .collect();
    let mut model = Selector::from_labels(&labels);
    for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let operator = match expression.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(error(
                    format!("{field}.matchExpressions[{index}].operator"),
                    InvalidReason::BadSelector,
                    format!("unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"),
                ))
            }
        };
        model = model.with(Requirement {
            key: format!("{key_prefix}{}", expression.key),
            operator,
            values: expression.values.clone().unwrap_or_default(),
        });
    }
    Ok(model)
}

fn k8s_peer(
    peer: &k8s::NetworkPolicyPeer,
    namespace: &str,
    field: &str,
) -> Result<Peer, PolicyError> {
    if let Some(block) = &peer.ip_block {
        // Kubernetes semantics: an ipBlock selects every address in it, pods included (Weft's
        // own kinds keep Cilium's: CIDRs select only addresses outside the cluster).
        return Ok(
            match cidr_rule(
                &block.cidr,
                block.except.as_deref().unwrap_or_default(),
                &format!("{field}.ipBlock"),
            )? {
                Peer::Cidr { cidr, except } => Peer::IpBlock { cidr, except },
                other => other,
            },
        );
    }
    let pods = match &peer.pod_selector {
        Some(pods) => k8s_selector(pods, &format!("{field}.podSelector"), "")?,
        None => Selector::all(),
    };
    let selector = match &peer.namespace_selector {
        // Pods in the namespaces whose labels match.
        Some(namespaces) => {
            let namespaces = k8s_selector(
                namespaces,
                &format!("{field}.namespaceSelector"),
                NAMESPACE_LABELS_PREFIX,
            )?;
            let mut combined = pods;
            combined.requirements.extend(namespaces.requirements);
            combined
        }
        None => pods.with(namespace_requirement(namespace)),
    };
    Ok(Peer::Endpoints(selector))
}

/// A rule's ports, and the fields of those left out because Weft does not carry their
/// protocol (SCTP). `None` when every port was left out: the rule then allows nothing (it must
/// not become a rule without ports, which would allow every port).
fn k8s_ports(
    ports: Option<&Vec<k8s::NetworkPolicyPort>>,
    field: &str,
    unenforced: &mut Vec<String>,
) -> Result<Option<Vec<PortMatch>>, PolicyError> {
    let mut matches = Vec::new();
    let mut left_out = 0;
    for (index, port) in ports.into_iter().flatten().enumerate() {
        let field = format!("{field}.ports[{index}]");
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => ProtocolMatch::Tcp,
            "UDP" => ProtocolMatch::Udp,
            "SCTP" => {
                // No SCTP packet passes a Weft node, so allowing it would change nothing: the
                // port is left out, the rest of the policy (its isolation first) applies.
                unenforced.push(format!(
                    "{field}.protocol: SCTP is not carried by Weft; this port allows nothing (the policy's isolation and its TCP and UDP ports are enforced)"
                ));
                left_out += 1;
                continue;
            }
            other => {
                return Err(error(
                    format!("{field}.protocol"),
                    InvalidReason::UnsupportedField,
                    format!("{other} is not supported; use TCP or UDP"),
                ))
            }
        };
        matches.push(match &port.port {
            None => PortMatch::Range {
                protocol,
                first: 0,
                last: u16::MAX,
            },
            Some(IntOrString::String(name)) => PortMatch::Named {
                protocol,
                name: name.clone(),
            },
            Some(IntOrString::Int(number)) => {
                let first = u16::try_from(*number)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        error(
                            format!("{field}.port"),
                            InvalidReason::BadSelector,
                            format!("port {number} is out of range"),
                        )
                    })?;
                let last = match port.end_port {
                    None => first,
                    Some(end) => u16::try_from(end)
                        .ok()
                        .filter(|end| *end >= first)
                        .ok_or_else(|| {
                            error(
                                format!("{field}.endPort"),
                                InvalidReason::BadSelector,
                                format!("endPort {end} must be between port {first} and 65535"),
                            )
                        })?,
                };
                PortMatch::Range {
                    protocol,
                    first,
                    last,
                }
            }
        });
    }
    if left_out > 0 && matches.is_empty() {
        return Ok(None);
    }
    Ok(Some(matches))
}

/// Kubernetes NetworkPolicy, with its semantics: an empty peer list allows every peer, a
/// missing `ingress` with `policyTypes: [Ingress]` denies all ingress, `policyTypes` defaults
/// to Ingress plus Egress when egress rules are present.
pub fn kubernetes_policy(policy: &k8s::NetworkPolicy) -> Result<Policy, PolicyError> {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = policy.spec.clone().unwrap_or_default();
    let mut rules = Vec::new();
    let mut unenforced = Vec::new();
    for (index, ingress) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{index}]");
        let peers = ingress
            .from
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, peer)| k8s_peer(peer, &namespace, &format!("{field}.from[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        // A rule whose only ports are SCTP allows nothing Weft carries: it is left out.
        if let Some(ports) = k8s_ports(ingress.ports.as_ref(), &field, &mut unenforced)? {
            rules.push(Rule {
                section: Section::Ingress,
                index,
                peers,
                ports,
            });
        }
    }
    for (index, egress) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{index}]");
        let peers = egress
            .to
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, peer)| k8s_peer(peer, &namespace, &format!("{field}.to[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(ports) = k8s_ports(egress.ports.as_ref(), &field, &mut unenforced)? {
            rules.push(Rule {
                section: Section::Egress,
                index,
                peers,
                ports,
            });
        }
    }
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut types = vec!["Ingress".to_owned()];
        if spec.egress.is_some() {
            types.push("Egress".to_owned());
        }
        types
    });
    Ok(Policy {
        id: PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some(namespace.clone()),
            name: policy.metadata.name.clone().unwrap_or_default(),
        },
        subject: k8s_selector(
            &spec.pod_selector.clone().unwrap_or_default(),
            "spec.podSelector",
            "",
        )?
        .with(namespace_requirement(&namespace)),
        isolates_ingress: types.iter().any(|t| t == "Ingress"),
        isolates_egress: types.iter().any(|t| t == "Egress"),
        rules,
        unenforced,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_core::policy::evaluate::{
        decide, Connection, NamedPorts, PeerKind, PeerView, SubjectView, Verdict,
    };
    use weft_core::policy::model::{Direction, EnforcementMode, Protocol};

    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_saphyr::from_str(text).expect("test YAML")
    }

    fn labels(
        namespace: &str,
        namespace_team: &str,
        pairs: &[(&str, &str)],
    ) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.insert(NAMESPACE_LABEL.into(), namespace.into());
        labels.insert(
            format!("{NAMESPACE_LABELS_PREFIX}team"),
            namespace_team.into(),
        );
        labels
    }

    fn subject(labels: BTreeMap<String, String>) -> SubjectView {
        SubjectView {
            labels,
            named_ports: NamedPorts::new(),
        }
    }

    fn peer(labels: BTreeMap<String, String>) -> PeerView {
        PeerView {
            kind: PeerKind::Endpoint(labels),
            ip: None,
            named_ports: NamedPorts::new(),
        }
    }

    fn world(ip: &str) -> PeerView {
        PeerView {
            kind: PeerKind::World,
            ip: Some(ip.parse().expect("ip")),
            named_ports: NamedPorts::new(),
        }
    }

    fn ingress(port: u16) -> Connection {
        Connection {
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn verdict(
        policy: &Policy,
        me: &SubjectView,
        them: &PeerView,
        connection: Connection,
    ) -> Verdict {
        decide(
            std::slice::from_ref(policy),
            EnforcementMode::Default,
            me,
            them,
            &connection,
        )
        .verdict
    }

    #[test]
    fn ipv6_cidrs_are_accepted_and_select_nothing_in_the_ipv4_datapath() {
        let policy = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: store, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: trainer}}\n  egress:\n  - toCIDRSet:\n    - {cidr: 10.200.0.0/16, except: [10.200.255.0/24]}\n    - {cidr: 'fd00:200::/48', except: ['fd00:200:0:ff::/64']}\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n  - toCIDR: ['fd00::/8']\n    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n",
        ))
        .expect("a dual-stack policy is valid");
        let only_v6 = &policy.rules[1].peers;
        assert!(
            matches!(only_v6.as_slice(), [Peer::Ipv6Cidr { .. }]),
            "an IPv6-only rule keeps its peer, so it never means every peer: {only_v6:?}"
        );
        let me = subject(labels("training", "ml", &[("app", "trainer")]));
        let egress = |port| Connection {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            port,
        };
        assert_eq!(
            verdict(&policy, &me, &world("10.200.1.1"), egress(443)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policy, &me, &world("10.200.255.1"), egress(443)),
            Verdict::Denied,
            "the IPv4 exception holds"
        );
        assert_eq!(
            verdict(&policy, &me, &world("192.0.2.1"), egress(22)),
            Verdict::Denied,
            "the IPv6-only rule allows no IPv4 peer"
        );
        let mixed = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: mixed, namespace: training}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: ['fd00::/8']}]\n",
        ))
        .expect_err("an exception of the other family");
        assert_eq!(mixed.field, "spec.egress[0].toCIDRSet[0].except[0]");
    }

    #[test]
    fn namespaced_selectors_mean_this_namespace_unless_they_name_one() {
        let policy = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: nccl, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {app: trainer}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: trainer}}]\n  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: monitoring, app: prometheus}}]\n",
        ))
        .expect("valid");
        let me = subject(labels("training", "ml", &[("app", "trainer")]));
        let same_ns = peer(labels("training", "ml", &[("app", "trainer")]));
        let other_ns = peer(labels("inference", "ml", &[("app", "trainer")]));
        let prometheus = peer(labels("monitoring", "ops", &[("app", "prometheus")]));
        assert_eq!(
            verdict(&policy, &me, &same_ns, ingress(29400)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policy, &me, &other_ns, ingress(29400)),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&policy, &me, &prometheus, ingress(9090)),
            Verdict::Allowed
        );
        // The policy does not select a trainer of another namespace at all.
        let foreign = subject(labels("inference", "ml", &[("app", "trainer")]));
        assert_eq!(
            verdict(&policy, &foreign, &other_ns, ingress(1)),
            Verdict::Allowed
        );
    }

    #[test]
    fn a_namespaced_policy_never_selects_endpoints_of_another_namespace() {
        let policy = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: reach, namespace: training}\nspec:\n  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: inference}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: nobody}}]\n",
        ))
        .expect("valid");
        let elsewhere = subject(labels("inference", "ml", &[("app", "server")]));
        let stranger = peer(labels("batch", "ops", &[("app", "job")]));
        assert_eq!(
            verdict(&policy, &elsewhere, &stranger, ingress(80)),
            Verdict::Allowed,
            "a policy of namespace training does not isolate a pod of inference"
        );
    }

    #[test]
    fn kubernetes_network_policy_cases_users_rely_on() {
        let np = |spec: &str| {
            kubernetes_policy(&yaml::<k8s::NetworkPolicy>(&format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: inference}}\nspec:\n{spec}"
            )))
            .expect("valid NetworkPolicy")
        };
        let me = subject(labels("inference", "ml", &[("app", "model")]));
        let gateway = peer(labels("inference", "ml", &[("app", "gateway")]));
        let from_ops = peer(labels("ops", "ops", &[("app", "debug")]));
        let from_ml_ns = peer(labels("training", "ml", &[("app", "trainer")]));

        let default_deny = np("  podSelector: {}\n  policyTypes: [Ingress]\n");
        assert_eq!(
            verdict(&default_deny, &me, &gateway, ingress(8000)),
            Verdict::Denied
        );
        let out = Connection {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            port: 443,
        };
        assert_eq!(
            verdict(&default_deny, &me, &world("1.1.1.1"), out),
            Verdict::Allowed,
            "egress is not isolated"
        );

        let from_namespace = np("  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: ml}}\n");
        assert_eq!(
            verdict(&from_namespace, &me, &from_ml_ns, ingress(8000)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&from_namespace, &me, &from_ops, ingress(8000)),
            Verdict::Denied
        );

        let from_pods = np("  podSelector: {matchLabels: {app: model}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: gateway}}\n");
        assert_eq!(
            verdict(&from_pods, &me, &gateway, ingress(8000)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&from_pods, &me, &from_ml_ns, ingress(8000)),
            Verdict::Denied,
            "podSelector alone means this namespace"
        );

        let port_range = np("  podSelector: {}\n  ingress:\n  - ports: [{protocol: TCP, port: 8000, endPort: 8010}]\n");
        assert_eq!(
            verdict(&port_range, &me, &from_ops, ingress(8010)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&port_range, &me, &from_ops, ingress(8011)),
            Verdict::Denied
        );

        let no_metadata = np("  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 0.0.0.0/0, except: [169.254.169.254/32]}\n");
        let egress = |port| Connection {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            port,
        };
        assert_eq!(
            verdict(&no_metadata, &me, &world("8.8.8.8"), egress(443)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&no_metadata, &me, &world("169.254.169.254"), egress(80)),
            Verdict::Denied
        );
    }

    #[test]
    fn what_the_schema_lets_through_is_refused_here_with_the_field() {
        let wnp = |spec: &str| {
            weft_policy(&yaml::<WeftNetworkPolicy>(&format!(
                "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: p, namespace: ml}}\nspec:\n  endpointSelector: {{}}\n{spec}"
            )))
        };
        let cases = [
            (
                "  egress: [{toCIDR: ['999.1.1.1/8']}]\n",
                "spec.egress[0].toCIDR[0].cidr",
                InvalidReason::BadCidr,
            ),
            (
                "  egress: [{toCIDRSet: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]}]\n",
                "spec.egress[0].toCIDRSet[0].except[0]",
                InvalidReason::BadCidr,
            ),
        ];
        for (spec, field, reason) in cases {
            let error = wnp(spec).expect_err(spec);
            assert_eq!(
                (error.field.as_str(), error.reason),
                (field, reason),
                "{error}"
            );
        }
    }

    /// L7 rules and FQDNs, which this version cannot enforce, allow nothing; the rest of the
    /// policy applies, isolation included, so its pods are never less isolated than it says.
    #[test]
    fn what_cannot_be_enforced_allows_nothing_and_the_rest_applies() {
        let policy = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: api, namespace: ml}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: gateway}}]\n    toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      rules: {http: [{method: GET}]}\n    - ports: [{port: '9100', protocol: TCP}]\n  egress:\n  - toFQDNs: [{matchName: api.example.com}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toFQDNs: [{matchName: db.example.com}]\n",
        ))
        .expect("applied, without what it cannot enforce");
        assert_eq!(
            policy.unenforced,
            vec![
                "spec.ingress[0].toPorts[0].rules: L7 rules (http, dns) are not enforced yet; these ports are not allowed".to_owned(),
                "spec.egress[0].toFQDNs: FQDN policy is not enforced yet; these names are not allowed".to_owned(),
                "spec.egress[1].toFQDNs: FQDN policy is not enforced yet; these names are not allowed".to_owned(),
            ]
        );
        assert!(policy.isolates_ingress && policy.isolates_egress);
        let me = subject(labels("ml", "x", &[]));
        let gateway = peer(labels("ml", "x", &[("app", "gateway")]));
        assert_eq!(
            verdict(&policy, &me, &gateway, ingress(80)),
            Verdict::Denied,
            "the L7-restricted port is not opened at L4"
        );
        assert_eq!(
            verdict(&policy, &me, &gateway, ingress(9100)),
            Verdict::Allowed,
            "the plain port of the same rule is"
        );
        let egress = |port| Connection {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            port,
        };
        assert_eq!(
            verdict(&policy, &me, &world("93.184.216.34"), egress(443)),
            Verdict::Denied,
            "a rule whose only peers are FQDNs allows nothing, never every peer"
        );
        let db = peer(labels("ml", "x", &[("app", "db")]));
        assert_eq!(
            verdict(&policy, &me, &db, egress(5432)),
            Verdict::Allowed,
            "the rule's other peers still are"
        );
    }

    fn k8s_np(spec: &str) -> Policy {
        kubernetes_policy(&yaml::<k8s::NetworkPolicy>(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: ml}}\nspec:\n{spec}"
        )))
        .expect("valid NetworkPolicy")
    }

    fn connection(direction: Direction, protocol: Protocol, port: u16) -> Connection {
        Connection {
            direction,
            protocol,
            port,
        }
    }

    #[test]
    fn an_sctp_port_allows_nothing_but_the_policy_still_isolates_and_says_so() {
        let me = subject(labels("ml", "ml", &[("pod", "a")]));
        let them = peer(labels("ml", "ml", &[("pod", "b")]));
        // Upstream: "should properly isolate pods that are selected by a policy allowing SCTP".
        let only_sctp =
            k8s_np("  podSelector: {}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]\n");
        assert!(only_sctp.isolates_ingress);
        assert!(
            only_sctp.rules.is_empty(),
            "a rule whose only port is SCTP must not become a rule for every port: {:?}",
            only_sctp.rules
        );
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for port in [80, 81] {
                assert_eq!(
                    verdict(
                        &only_sctp,
                        &me,
                        &them,
                        connection(Direction::Ingress, protocol, port)
                    ),
                    Verdict::Denied,
                    "{protocol:?}/{port}"
                );
            }
        }
        assert_eq!(only_sctp.unenforced.len(), 1);
        assert!(
            only_sctp.unenforced[0].starts_with("spec.ingress[0].ports[0].protocol: SCTP"),
            "{:?}",
            only_sctp.unenforced
        );

        // Mixed: the TCP port is enforced, the SCTP one left out.
        let mixed = k8s_np("  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{protocol: SCTP, port: 9}, {protocol: TCP, port: 443}]}]\n");
        assert!(mixed.isolates_egress);
        assert_eq!(
            verdict(
                &mixed,
                &me,
                &them,
                connection(Direction::Egress, Protocol::Tcp, 443)
            ),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(
                &mixed,
                &me,
                &them,
                connection(Direction::Egress, Protocol::Tcp, 9)
            ),
            Verdict::Denied
        );
        assert_eq!(mixed.unenforced.len(), 1);

        // Still refused: a protocol Kubernetes does not have.
        let bogus = kubernetes_policy(&yaml::<k8s::NetworkPolicy>(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ml}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP, port: 9}]}]\n",
        ))
        .expect_err("ICMP");
        assert_eq!(bogus.field, "spec.ingress[0].ports[0].protocol");
    }

    #[test]
    fn an_ip_block_selects_pods_in_it_but_weft_cidrs_only_outside_addresses() {
        let me = subject(labels("ml", "ml", &[("pod", "a")]));
        let pod_at = |ip: &str| PeerView {
            kind: PeerKind::Endpoint(labels("ml", "ml", &[("pod", "b")])),
            ip: Some(ip.parse().expect("ip")),
            named_ports: NamedPorts::new(),
        };
        let out = connection(Direction::Egress, Protocol::Tcp, 80);
        // Upstream: "should allow egress access to server in CIDR block" and "should enforce
        // except clause while egress access to server in CIDR block".
        let block = k8s_np("  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.7/32]}}]\n");
        assert!(matches!(block.rules[0].peers[0], Peer::IpBlock { .. }));
        assert_eq!(
            verdict(&block, &me, &pod_at("10.1.0.5"), out),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&block, &me, &pod_at("10.1.0.7"), out),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&block, &me, &world("10.9.9.9"), out),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&block, &me, &world("11.0.0.1"), out),
            Verdict::Denied
        );

        // WeftNetworkPolicy keeps Cilium's semantics: CIDRs select outside addresses only.
        let weft = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: p, namespace: ml}\nspec:\n  endpointSelector: {}\n  egress: [{toCIDR: [10.0.0.0/8]}]\n",
        ))
        .expect("valid");
        assert!(matches!(weft.rules[0].peers[0], Peer::Cidr { .. }));
        assert_eq!(
            verdict(&weft, &me, &pod_at("10.1.0.5"), out),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&weft, &me, &world("10.9.9.9"), out),
            Verdict::Allowed
        );
    }

    #[test]
    fn enable_default_deny_false_adds_allows_without_isolating() {
        let policy = weft_policy(&yaml::<WeftNetworkPolicy>(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: extra, namespace: ml}\nspec:\n  endpointSelector: {}\n  enableDefaultDeny: {ingress: false}\n  ingress: [{fromEntities: [world]}]\n",
        ))
        .expect("valid");
        let me = subject(labels("ml", "ml", &[]));
        assert_eq!(
            verdict(&policy, &me, &peer(labels("ml", "ml", &[])), ingress(80)),
            Verdict::Allowed
        );
    }
}
