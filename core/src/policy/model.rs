//! The policy model every source (Weft policies, Kubernetes NetworkPolicy) is converted to.

use std::fmt;

use ipnet::Ipv4Net;

use crate::policy::selector::Selector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// A connection's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Any other IP protocol (ICMP, …). Only rules without ports match it, as in Cilium.
    Other,
}

/// A rule's protocol: one, or both (`ANY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolMatch {
    Tcp,
    Udp,
    Any,
}

impl ProtocolMatch {
    pub fn matches(self, protocol: Protocol) -> bool {
        matches!(
            (self, protocol),
            (Self::Any, _) | (Self::Tcp, Protocol::Tcp) | (Self::Udp, Protocol::Udp)
        )
    }
}

/// Ports a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// `first..=last`; `0..=65535` is every port.
    Range {
        protocol: ProtocolMatch,
        first: u16,
        last: u16,
    },
    /// A named container port of the destination endpoint.
    Named {
        protocol: ProtocolMatch,
        name: String,
    },
}

/// Peers that are not pods of the cluster, or groups of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    World,
    Host,
    RemoteNode,
    Cluster,
    KubeApiserver,
    Health,
    Init,
    All,
}

/// Who is at the other end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Endpoints whose security labels match (already scoped to a namespace where the policy
    /// says so).
    Endpoints(Selector),
    /// Addresses outside the cluster in `cidr` but not in any of `except` (Cilium's CIDR
    /// semantics: Weft's own kinds).
    Cidr {
        cidr: Ipv4Net,
        except: Vec<Ipv4Net>,
    },
    /// Addresses in `cidr` but not in any of `except`, the cluster's pods included (a
    /// Kubernetes `NetworkPolicy` `ipBlock`). The datapath matches pods by identity, so a pod
    /// identity matches only when every pod carrying it has its address in the block: when
    /// pods sharing an identity lie on both sides, the rule allows none of them (it never
    /// allows a pod outside the block).
    IpBlock {
        cidr: Ipv4Net,
        except: Vec<Ipv4Net>,
    },
    /// Endpoints that match any of `peers` (every endpoint when empty) and serve the named
    /// container port `name` as `protocol`/`port`. Never written by users: the compiler turns
    /// an egress rule naming a port into one of these per number the name resolves to on the
    /// destinations (a named port is the destination's). The datapath matches pods by
    /// identity: with `every_pod` (allow rules) an identity matches when all its pods serve the
    /// port so, without it (deny rules) when any does — so that pods sharing an identity but
    /// not their ports are never allowed more, nor denied less, than the rule says.
    ServingPort {
        peers: Vec<Peer>,
        name: String,
        protocol: Protocol,
        port: u16,
        every_pod: bool,
    },
    /// Addresses in an IPv6 CIDR. Pods have IPv4 addresses only in this version, so no
    /// connection the datapath sees has such a peer: the rule selects nothing (neither allows
    /// nor denies), as an IPv6 rule does in an IPv4-only Cilium cluster. Kept, not dropped, so
    /// a rule whose peers are all IPv6 never turns into a rule without peers (which means all).
    Ipv6Cidr {
        cidr: ipnet::Ipv6Net,
        except: Vec<ipnet::Ipv6Net>,
    },
    Entity(Entity),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// Which list of the policy a rule stands in, as the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Ingress,
    Egress,
    IngressDeny,
    EgressDeny,
}

impl Section {
    pub fn direction(self) -> Direction {
        match self {
            Self::Ingress | Self::IngressDeny => Direction::Ingress,
            Self::Egress | Self::EgressDeny => Direction::Egress,
        }
    }

    pub fn action(self) -> Action {
        match self {
            Self::Ingress | Self::Egress => Action::Allow,
            Self::IngressDeny | Self::EgressDeny => Action::Deny,
        }
    }

    pub fn field(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::IngressDeny => "ingressDeny",
            Self::EgressDeny => "egressDeny",
        }
    }
}

/// One rule: any of `peers`, on any of `ports`. No peers means every peer; no ports means
/// every port (as in Kubernetes NetworkPolicy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub section: Section,
    /// Position in its section, as the user wrote it.
    pub index: usize,
    pub peers: Vec<Peer>,
    pub ports: Vec<PortMatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    WeftNetworkPolicy,
    WeftClusterwideNetworkPolicy,
    NetworkPolicy,
    /// A policy Weft applies on its own ([`allow_from_node`]).
    Builtin,
}

/// Names a policy in verdicts and statuses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    pub kind: PolicyKind,
    /// `None` for cluster-scoped policies.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PolicyKind::WeftNetworkPolicy => "WeftNetworkPolicy",
            PolicyKind::WeftClusterwideNetworkPolicy => "WeftClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::Builtin => "built-in",
        };
        match &self.namespace {
            Some(namespace) => write!(f, "{kind} {namespace}/{}", self.name),
            None => write!(f, "{kind} {}", self.name),
        }
    }
}

/// A rule as verdicts name it: `WeftNetworkPolicy training/allow-nccl ingress[0]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: PolicyId,
    pub section: Section,
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}[{}]",
            self.policy,
            self.section.field(),
            self.index
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyId,
    /// The endpoints the policy applies to (already scoped to its namespace if namespaced).
    pub subject: Selector,
    pub rules: Vec<Rule>,
    /// Whether selecting an endpoint isolates it in each direction.
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    /// Parts of the policy the datapath cannot enforce and that were left out without making
    /// the policy allow more (a port of a protocol Weft does not carry, as SCTP): `field:
    /// reason`, for statuses. The rest is enforced, isolation included.
    pub unenforced: Vec<String>,
}

impl Policy {
    pub fn isolates(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.isolates_ingress,
            Direction::Egress => self.isolates_egress,
        }
    }

    pub fn rule_ref(&self, rule: &Rule) -> RuleRef {
        RuleRef {
            policy: self.id.clone(),
            section: rule.section,
            index: rule.index,
        }
    }
}

/// How policy applies to endpoints (as Cilium's `--enable-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnforcementMode {
    /// An endpoint selected by a policy that isolates a direction is default-deny there.
    #[default]
    Default,
    /// Every endpoint is default-deny in both directions.
    Always,
    /// Nothing is enforced.
    Never,
}

/// Traffic from a pod's own node to the pod (kubelet's probes, host-network agents) is allowed
/// whatever isolates the pod, as Kubernetes documents ("traffic to and from the node where a
/// Pod is running is always allowed") and Cilium does by default (`allow-localhost`). Agents
/// apply it unless told not to (`--allow-from-node=false`); verdicts name it
/// `built-in allow-from-node ingress[0]`. It isolates nothing, and a deny rule naming the host
/// still wins over it.
pub fn allow_from_node() -> Policy {
    Policy {
        id: PolicyId {
            kind: PolicyKind::Builtin,
            namespace: None,
            name: "allow-from-node".to_owned(),
        },
        subject: Selector::all(),
        rules: vec![Rule {
            section: Section::Ingress,
            index: 0,
            peers: vec![Peer::Entity(Entity::Host)],
            ports: Vec::new(),
        }],
        isolates_ingress: false,
        isolates_egress: false,
        unenforced: Vec::new(),
    }
}
