//! The reference semantics of policy: given the policies, an endpoint and a connection, the
//! verdict and the rule that decided it. The datapath's compiled form must agree with this on
//! every connection; `weftctl policy explain` prints it.
//!
//! Order: a matching deny rule denies (deny always wins); else a matching allow rule allows;
//! else the endpoint is denied if a policy selecting it isolates that direction (or
//! enforcement is `Always`), and allowed otherwise.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::policy::model::{
    Action, Direction, EnforcementMode, Entity, Peer, Policy, PolicyId, PortMatch, Protocol,
    RuleRef,
};
use crate::policy::selector::Labels;

/// A container's named ports: name → (protocol, number).
pub type NamedPorts = BTreeMap<String, (Protocol, u16)>;

/// A pod's named ports from its container ports as `(name, protocol, number)`; unnamed ports
/// are skipped. A missing protocol is TCP, as Kubernetes defaults it. An SCTP port is left out:
/// Weft cannot allow SCTP, and a name resolved to a TCP or UDP port of the same number would
/// allow what the policy did not say (an unresolved name allows nothing).
pub fn named_ports<'a>(
    ports: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>, u16)>,
) -> NamedPorts {
    ports
        .into_iter()
        .filter_map(|(name, protocol, number)| {
            let protocol = match protocol {
                None => Protocol::Tcp,
                Some(protocol) if protocol.eq_ignore_ascii_case("TCP") => Protocol::Tcp,
                Some(protocol) if protocol.eq_ignore_ascii_case("UDP") => Protocol::Udp,
                Some(_) => return None,
            };
            Some((name?.to_owned(), (protocol, number)))
        })
        .collect()
}

/// The other end of a connection, as the node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A pod of this cluster or a meshed one, with its security labels.
    Endpoint(Labels),
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    Init,
    /// Anything outside the cluster.
    World,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub kind: PeerKind,
    pub ip: Option<Ipv4Addr>,
    /// The peer's named ports (they matter for egress rules naming a port).
    pub named_ports: NamedPorts,
}

/// The endpoint whose policy is evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectView {
    pub labels: Labels,
    pub named_ports: NamedPorts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    pub direction: Direction,
    pub protocol: Protocol,
    /// The destination port.
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// This rule decided.
    Rule(RuleRef),
    /// No rule allowed it, and these policies isolate the endpoint in this direction.
    DefaultDeny(Vec<PolicyId>),
    /// Enforcement `Always`, and no rule allowed it.
    AlwaysEnforced,
    /// No policy isolates the endpoint in this direction.
    NotIsolated,
    /// Enforcement `Never`.
    EnforcementDisabled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// Every rule that matches the connection, deny rules first, for explaining.
    pub matching: Vec<(Action, RuleRef)>,
}

pub fn entity_matches(entity: Entity, peer: &PeerKind) -> bool {
    match entity {
        Entity::All => true,
        Entity::World => *peer == PeerKind::World,
        Entity::Host => *peer == PeerKind::Host,
        Entity::RemoteNode => *peer == PeerKind::RemoteNode,
        Entity::KubeApiserver => *peer == PeerKind::KubeApiserver,
        Entity::Health => *peer == PeerKind::Health,
        Entity::Init => *peer == PeerKind::Init,
        Entity::Cluster => *peer != PeerKind::World,
    }
}

pub fn peer_matches(peer: &Peer, view: &PeerView) -> bool {
    match peer {
        Peer::Endpoints(selector) => {
            matches!(&view.kind, PeerKind::Endpoint(labels) if selector.matches(labels))
        }
        // CIDR rules are for addresses outside the cluster, as in Cilium.
        Peer::Cidr { cidr, except } => {
            view.kind == PeerKind::World
                && view
                    .ip
                    .is_some_and(|ip| cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
        }
        // A Kubernetes ipBlock: any address in the block, pods included.
        Peer::IpBlock { cidr, except } => {
            matches!(view.kind, PeerKind::World | PeerKind::Endpoint(_))
                && view
                    .ip
                    .is_some_and(|ip| cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
        }
        Peer::ServingPort {
            peers,
            name,
            protocol,
            port,
            ..
        } => {
            matches!(view.kind, PeerKind::Endpoint(_))
                && view.named_ports.get(name) == Some(&(*protocol, *port))
                && (peers.is_empty() || peers.iter().any(|p| peer_matches(p, view)))
        }
        Peer::Entity(entity) => entity_matches(*entity, &view.kind),
        // Peers are IPv4 (see `Peer::Ipv6Cidr`).
        Peer::Ipv6Cidr { .. } => false,
    }
}

fn port_matches(port: &PortMatch, connection: &Connection, destination_ports: &NamedPorts) -> bool {
    match port {
        PortMatch::Range {
            protocol,
            first,
            last,
        } => protocol.matches(connection.protocol) && (*first..=*last).contains(&connection.port),
        PortMatch::Named { protocol, name } => {
            destination_ports
                .get(name)
                .is_some_and(|(named_protocol, number)| {
                    protocol.matches(connection.protocol)
                        && *named_protocol == connection.protocol
                        && *number == connection.port
                })
        }
    }
}

/// Decides `connection` for `subject` (the endpoint at this end) and `peer` (the other end).
pub fn decide(
    policies: &[Policy],
    mode: EnforcementMode,
    subject: &SubjectView,
    peer: &PeerView,
    connection: &Connection,
) -> Decision {
    let selecting: Vec<&Policy> = policies
        .iter()
        .filter(|policy| policy.subject.matches(&subject.labels))
        .collect();
    let destination_ports = match connection.direction {
        Direction::Ingress => &subject.named_ports,
        Direction::Egress => &peer.named_ports,
    };
    let mut matching: Vec<(Action, RuleRef)> = selecting
        .iter()
        .flat_map(|policy| {
            policy
                .rules
                .iter()
                .filter(|rule| rule.section.direction() == connection.direction)
                .filter(|rule| {
                    rule.peers.is_empty() || rule.peers.iter().any(|p| peer_matches(p, peer))
                })
                .filter(|rule| {
                    rule.ports.is_empty()
                        || rule
                            .ports
                            .iter()
                            .any(|port| port_matches(port, connection, destination_ports))
                })
                .map(|rule| (rule.section.action(), policy.rule_ref(rule)))
        })
        .collect();
    // Deny rules first; within an action, a stable order (policy, section, index).
    matching.sort_by(|a, b| {
        let rank = |action: &Action| matches!(action, Action::Allow);
        (rank(&a.0), &a.1).cmp(&(rank(&b.0), &b.1))
    });

    let (verdict, reason) = if mode == EnforcementMode::Never {
        (Verdict::Allowed, Reason::EnforcementDisabled)
    } else if let Some((Action::Deny, rule)) = matching.first() {
        (Verdict::Denied, Reason::Rule(rule.clone()))
    } else if let Some((_, rule)) = matching.first() {
        (Verdict::Allowed, Reason::Rule(rule.clone()))
    } else if mode == EnforcementMode::Always {
        (Verdict::Denied, Reason::AlwaysEnforced)
    } else {
        let isolating: Vec<PolicyId> = selecting
            .iter()
            .filter(|policy| policy.isolates(connection.direction))
            .map(|policy| policy.id.clone())
            .collect();
        if isolating.is_empty() {
            (Verdict::Allowed, Reason::NotIsolated)
        } else {
            (Verdict::Denied, Reason::DefaultDeny(isolating))
        }
    };
    Decision {
        verdict,
        reason,
        matching,
    }
}

/// Both halves of a connection from one endpoint to another: the sender's egress and the
/// receiver's ingress. A half is `None` when that end is not a Weft endpoint (the world, a
/// node). The connection passes only if every present half allows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub egress: Option<Decision>,
    pub ingress: Option<Decision>,
}

impl Explanation {
    pub fn verdict(&self) -> Verdict {
        let denied = [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .any(|decision| decision.verdict == Verdict::Denied);
        if denied {
            Verdict::Denied
        } else {
            Verdict::Allowed
        }
    }
}

/// One end of a connection for [`explain`]: a Weft endpoint, or something else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Endpoint {
        labels: Labels,
        ip: Option<Ipv4Addr>,
        named_ports: NamedPorts,
    },
    Other(PeerView),
}

impl End {
    fn as_peer(&self) -> PeerView {
        match self {
            End::Endpoint {
                labels,
                ip,
                named_ports,
            } => PeerView {
                kind: PeerKind::Endpoint(labels.clone()),
                ip: *ip,
                named_ports: named_ports.clone(),
            },
            End::Other(peer) => peer.clone(),
        }
    }

    fn as_subject(&self) -> Option<SubjectView> {
        match self {
            End::Endpoint {
                labels,
                named_ports,
                ..
            } => Some(SubjectView {
                labels: labels.clone(),
                named_ports: named_ports.clone(),
            }),
            End::Other(_) => None,
        }
    }
}

/// Why a connection from `from` to `to` on `protocol`/`port` passes or not.
pub fn explain(
    policies: &[Policy],
    mode: EnforcementMode,
    from: &End,
    to: &End,
    protocol: Protocol,
    port: u16,
) -> Explanation {
    let egress = from.as_subject().map(|subject| {
        decide(
            policies,
            mode,
            &subject,
            &to.as_peer(),
            &Connection {
                direction: Direction::Egress,
                protocol,
                port,
            },
        )
    });
    let ingress = to.as_subject().map(|subject| {
        decide(
            policies,
            mode,
            &subject,
            &from.as_peer(),
            &Connection {
                direction: Direction::Ingress,
                protocol,
                port,
            },
        )
    });
    Explanation { egress, ingress }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::{app, labels, rule};
    use crate::policy::model::{PolicyKind, PortMatch, ProtocolMatch, Rule, Section};
    use crate::policy::selector::Selector;

    fn tcp(first: u16, last: u16) -> PortMatch {
        PortMatch::Range {
            protocol: ProtocolMatch::Tcp,
            first,
            last,
        }
    }

    fn policy(name: &str, subject: Selector, rules: Vec<Rule>) -> Policy {
        let allows = |direction| {
            rules
                .iter()
                .any(|r| r.section.direction() == direction && r.section.action() == Action::Allow)
        };
        Policy {
            id: PolicyId {
                kind: PolicyKind::WeftNetworkPolicy,
                namespace: Some("ml".into()),
                name: name.into(),
            },
            subject,
            isolates_ingress: allows(Direction::Ingress),
            unenforced: Vec::new(),
            isolates_egress: allows(Direction::Egress),
            rules,
        }
    }

    fn pod(app_name: &str) -> SubjectView {
        SubjectView {
            labels: labels(&[("app", app_name)]),
            named_ports: NamedPorts::from([("http".into(), (Protocol::Tcp, 8080))]),
        }
    }

    fn from_pod(app_name: &str) -> PeerView {
        PeerView {
            kind: PeerKind::Endpoint(labels(&[("app", app_name)])),
            ip: Some(Ipv4Addr::new(10, 1, 1, 9)),
            named_ports: NamedPorts::new(),
        }
    }

    fn world(ip: [u8; 4]) -> PeerView {
        PeerView {
            kind: PeerKind::World,
            ip: Some(Ipv4Addr::from(ip)),
            named_ports: NamedPorts::new(),
        }
    }

    fn ingress(protocol: Protocol, port: u16) -> Connection {
        Connection {
            direction: Direction::Ingress,
            protocol,
            port,
        }
    }

    fn verdict(
        policies: &[Policy],
        subject: &SubjectView,
        peer: &PeerView,
        c: Connection,
    ) -> Verdict {
        decide(policies, EnforcementMode::Default, subject, peer, &c).verdict
    }

    #[test]
    fn port_ranges_include_both_ends_and_only_their_protocol() {
        let policies = [policy(
            "nccl",
            app("trainer"),
            vec![rule(
                Section::Ingress,
                0,
                vec![Peer::Endpoints(app("trainer"))],
                vec![tcp(29400, 29500)],
            )],
        )];
        let (me, peer) = (pod("trainer"), from_pod("trainer"));
        assert_eq!(
            verdict(&policies, &me, &peer, ingress(Protocol::Tcp, 29400)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policies, &me, &peer, ingress(Protocol::Tcp, 29500)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policies, &me, &peer, ingress(Protocol::Tcp, 29501)),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&policies, &me, &peer, ingress(Protocol::Udp, 29400)),
            Verdict::Denied
        );
    }

    #[test]
    fn deny_wins_and_the_verdict_names_the_rule() {
        let policies = [
            policy(
                "allow-all-from-gateway",
                app("model"),
                vec![rule(
                    Section::Ingress,
                    0,
                    vec![Peer::Endpoints(app("gateway"))],
                    vec![],
                )],
            ),
            policy(
                "no-ssh",
                app("model"),
                vec![rule(
                    Section::IngressDeny,
                    0,
                    vec![Peer::Entity(Entity::All)],
                    vec![tcp(22, 22)],
                )],
            ),
        ];
        let (me, gateway) = (pod("model"), from_pod("gateway"));
        let ssh = decide(
            &policies,
            EnforcementMode::Default,
            &me,
            &gateway,
            &ingress(Protocol::Tcp, 22),
        );
        assert_eq!(ssh.verdict, Verdict::Denied);
        let Reason::Rule(rule) = &ssh.reason else {
            panic!("{:?}", ssh.reason)
        };
        assert_eq!(
            rule.to_string(),
            "WeftNetworkPolicy ml/no-ssh ingressDeny[0]"
        );
        assert_eq!(ssh.matching.len(), 2, "the allow that lost is listed too");
        let http = decide(
            &policies,
            EnforcementMode::Default,
            &me,
            &gateway,
            &ingress(Protocol::Tcp, 8080),
        );
        assert_eq!(http.verdict, Verdict::Allowed);
        assert!(
            matches!(&http.reason, Reason::Rule(r) if r.policy.name == "allow-all-from-gateway")
        );
    }

    #[test]
    fn cidr_except_carves_out_addresses_and_cidrs_never_select_pods() {
        let egress = |port| Connection {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            port,
        };
        let policies = [policy(
            "object-store",
            app("trainer"),
            vec![rule(
                Section::Egress,
                0,
                vec![Peer::Cidr {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                }],
                vec![tcp(443, 443)],
            )],
        )];
        let me = pod("trainer");
        assert_eq!(
            verdict(&policies, &me, &world([10, 2, 3, 4]), egress(443)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policies, &me, &world([10, 1, 3, 4]), egress(443)),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&policies, &me, &world([11, 0, 0, 1]), egress(443)),
            Verdict::Denied
        );
        assert_eq!(
            verdict(&policies, &me, &from_pod("model"), egress(443)),
            Verdict::Denied,
            "a pod at 10.1.1.9 is not selected by a CIDR"
        );
    }

    #[test]
    fn an_empty_selector_selects_every_endpoint_but_nothing_else() {
        let policies = [policy(
            "any-pod",
            app("model"),
            vec![rule(
                Section::Ingress,
                0,
                vec![Peer::Endpoints(Selector::all())],
                vec![],
            )],
        )];
        let me = pod("model");
        assert_eq!(
            verdict(
                &policies,
                &me,
                &from_pod("anything"),
                ingress(Protocol::Tcp, 1)
            ),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(
                &policies,
                &me,
                &world([1, 2, 3, 4]),
                ingress(Protocol::Tcp, 1)
            ),
            Verdict::Denied
        );
    }

    #[test]
    fn entities_select_the_peers_they_name() {
        let peer = |kind| PeerView {
            kind,
            ip: None,
            named_ports: NamedPorts::new(),
        };
        let endpoint = PeerKind::Endpoint(labels(&[("app", "x")]));
        let cases = [
            (Entity::World, PeerKind::World, true),
            (Entity::World, endpoint.clone(), false),
            (Entity::Host, PeerKind::Host, true),
            (Entity::Host, PeerKind::RemoteNode, false),
            (Entity::RemoteNode, PeerKind::RemoteNode, true),
            (Entity::Cluster, endpoint.clone(), true),
            (Entity::Cluster, PeerKind::Host, true),
            (Entity::Cluster, PeerKind::World, false),
            (Entity::KubeApiserver, PeerKind::KubeApiserver, true),
            (Entity::All, PeerKind::World, true),
        ];
        for (entity, kind, expected) in cases {
            let policies = [policy(
                "entity",
                app("model"),
                vec![rule(
                    Section::Ingress,
                    0,
                    vec![Peer::Entity(entity)],
                    vec![],
                )],
            )];
            assert_eq!(
                verdict(
                    &policies,
                    &pod("model"),
                    &peer(kind.clone()),
                    ingress(Protocol::Tcp, 80)
                ) == Verdict::Allowed,
                expected,
                "{entity:?} vs {kind:?}"
            );
        }
    }

    #[test]
    fn named_ports_take_tcp_by_default_and_leave_sctp_out() {
        let ports = named_ports([
            (Some("http"), None, 8080),
            (Some("dns"), Some("UDP"), 53),
            (Some("grpc"), Some("TCP"), 9090),
            (Some("signal"), Some("SCTP"), 3868),
            (None, Some("TCP"), 22),
        ]);
        assert_eq!(
            ports,
            NamedPorts::from([
                ("http".to_owned(), (Protocol::Tcp, 8080)),
                ("dns".to_owned(), (Protocol::Udp, 53)),
                ("grpc".to_owned(), (Protocol::Tcp, 9090)),
            ])
        );
    }

    #[test]
    fn named_ports_resolve_on_the_destination() {
        let named = PortMatch::Named {
            protocol: ProtocolMatch::Tcp,
            name: "http".into(),
        };
        let policies = [policy(
            "web",
            app("model"),
            vec![rule(Section::Ingress, 0, vec![], vec![named])],
        )];
        let me = pod("model");
        assert_eq!(
            verdict(&policies, &me, &from_pod("x"), ingress(Protocol::Tcp, 8080)),
            Verdict::Allowed
        );
        assert_eq!(
            verdict(&policies, &me, &from_pod("x"), ingress(Protocol::Tcp, 8081)),
            Verdict::Denied
        );
    }

    #[test]
    fn isolation_follows_the_selecting_policies_and_the_enforcement_mode() {
        let me = pod("model");
        let peer = from_pod("x");
        let c = ingress(Protocol::Tcp, 80);
        // Unselected: allowed, because nothing isolates it.
        let unrelated = [policy(
            "other",
            app("web"),
            vec![rule(Section::Ingress, 0, vec![], vec![])],
        )];
        let open = decide(&unrelated, EnforcementMode::Default, &me, &peer, &c);
        assert_eq!(
            (open.verdict, open.reason),
            (Verdict::Allowed, Reason::NotIsolated)
        );
        // Selected by a policy whose allow does not match: denied by default, naming it.
        let isolating = [policy(
            "only-gateway",
            app("model"),
            vec![rule(
                Section::Ingress,
                0,
                vec![Peer::Endpoints(app("gateway"))],
                vec![],
            )],
        )];
        let closed = decide(&isolating, EnforcementMode::Default, &me, &peer, &c);
        assert_eq!(closed.verdict, Verdict::Denied);
        assert!(
            matches!(&closed.reason, Reason::DefaultDeny(ids) if ids[0].name == "only-gateway")
        );
        // Egress stays open: the policy only isolates ingress.
        let out = Connection {
            direction: Direction::Egress,
            ..c
        };
        assert_eq!(
            decide(&isolating, EnforcementMode::Default, &me, &peer, &out).verdict,
            Verdict::Allowed
        );
        // A deny-only policy does not isolate.
        let deny_only = [policy(
            "deny-ssh",
            app("model"),
            vec![rule(Section::IngressDeny, 0, vec![], vec![tcp(22, 22)])],
        )];
        assert_eq!(
            decide(&deny_only, EnforcementMode::Default, &me, &peer, &c).verdict,
            Verdict::Allowed
        );
        // Always and Never.
        assert_eq!(
            decide(&[], EnforcementMode::Always, &me, &peer, &c).reason,
            Reason::AlwaysEnforced
        );
        assert_eq!(
            decide(&isolating, EnforcementMode::Never, &me, &peer, &c).verdict,
            Verdict::Allowed
        );
    }

    #[test]
    fn explain_combines_the_senders_egress_and_the_receivers_ingress() {
        let policies = [
            policy(
                "gateway-out",
                app("gateway"),
                vec![rule(
                    Section::Egress,
                    0,
                    vec![Peer::Endpoints(app("model"))],
                    vec![tcp(8000, 8000)],
                )],
            ),
            policy(
                "model-in",
                app("model"),
                vec![rule(
                    Section::Ingress,
                    0,
                    vec![Peer::Endpoints(app("gateway"))],
                    vec![tcp(8000, 8000)],
                )],
            ),
        ];
        let end = |name: &str| End::Endpoint {
            labels: labels(&[("app", name)]),
            ip: None,
            named_ports: NamedPorts::new(),
        };
        let allowed = explain(
            &policies,
            EnforcementMode::Default,
            &end("gateway"),
            &end("model"),
            Protocol::Tcp,
            8000,
        );
        assert_eq!(allowed.verdict(), Verdict::Allowed);
        assert!(
            matches!(&allowed.egress.as_ref().unwrap().reason, Reason::Rule(r) if r.policy.name == "gateway-out")
        );
        assert!(
            matches!(&allowed.ingress.as_ref().unwrap().reason, Reason::Rule(r) if r.policy.name == "model-in")
        );
        let wrong_port = explain(
            &policies,
            EnforcementMode::Default,
            &end("gateway"),
            &end("model"),
            Protocol::Tcp,
            9000,
        );
        assert_eq!(wrong_port.verdict(), Verdict::Denied);
        let from_world = explain(
            &policies,
            EnforcementMode::Default,
            &End::Other(world([8, 8, 8, 8])),
            &end("model"),
            Protocol::Tcp,
            8000,
        );
        assert_eq!(
            from_world.egress, None,
            "the world has no egress policy here"
        );
        assert_eq!(from_world.verdict(), Verdict::Denied);
    }
}
