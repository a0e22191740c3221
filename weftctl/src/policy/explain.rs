//! `policy explain`: the verdict for a connection and the rules that decide it, in both
//! directions, from an [`Inventory`] — the same evaluation and output for every source.

use std::fmt;
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context as _};
use weft_core::policy::evaluate::{
    self, Decision, End, NamedPorts, PeerKind, PeerView, Reason, Verdict,
};
use weft_core::policy::model::{EnforcementMode, Policy, Protocol};

use super::inventory::{Inventory, PodView};

/// Why a connection passes or not: both halves, and the names the output uses for its ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The client, `namespace/name`.
    pub from: String,
    /// The server: `namespace/name`, or the address when it is not a pod.
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The sender's egress and the receiver's ingress decisions.
    pub halves: evaluate::Explanation,
}

impl Explanation {
    pub fn verdict(&self) -> Verdict {
        self.halves.verdict()
    }
}

impl fmt::Display for Explanation {
    /// What `weftctl policy explain` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Other => "other",
        };
        writeln!(f, "{} -> {}:{}/{protocol}", self.from, self.to, self.port)?;
        write_half(f, "egress ", &self.from, self.halves.egress.as_ref())?;
        write_half(f, "ingress", &self.to, self.halves.ingress.as_ref())?;
        writeln!(
            f,
            "verdict: {}",
            match self.verdict() {
                Verdict::Allowed => "ALLOWED",
                Verdict::Denied => "DENIED",
            }
        )
    }
}

fn write_half(
    f: &mut fmt::Formatter<'_>,
    direction: &str,
    end: &str,
    decision: Option<&Decision>,
) -> fmt::Result {
    let Some(decision) = decision else {
        return writeln!(
            f,
            "{direction} ({end}): not a Weft endpoint, no policy here"
        );
    };
    let verdict = match decision.verdict {
        Verdict::Allowed => "ALLOWED",
        Verdict::Denied => "DENIED ",
    };
    let why = match &decision.reason {
        Reason::Rule(rule) => format!("by {rule}"),
        Reason::DefaultDeny(policies) => format!(
            "by default: isolated by {}",
            policies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Reason::AlwaysEnforced => "by default: enforcement is always".into(),
        Reason::NotIsolated => "no policy isolates this direction".into(),
        Reason::EnforcementDisabled => "enforcement is disabled".into(),
    };
    writeln!(f, "{direction} ({end}): {verdict} {why}")?;
    for (action, rule) in decision.matching.iter().skip(1) {
        writeln!(f, "          also matches: {action:?} {rule}")?;
    }
    Ok(())
}

/// Explains a connection from the pod `from` (`name` or `namespace/name`) to `to` (a pod or an
/// IPv4 address, then `:PORT[/TCP|UDP]`), under the valid policies of the client's cluster.
/// Invalid policies take no part (`policy status` names them).
pub fn explain(inventory: &Inventory, from: &str, to: &str) -> anyhow::Result<Explanation> {
    let client = find_pod(inventory, from)?;
    let (target, port, protocol) = parse_target(to)?;
    let mut policies: Vec<Policy> = inventory
        .policies
        .iter()
        .filter(|p| p.cluster == client.cluster)
        .filter_map(|p| p.outcome.as_ref().ok().cloned())
        .collect();
    // As agents do by default: their node's traffic to a pod passes whatever isolates it.
    policies.push(weft_core::policy::model::allow_from_node());
    let (server, to_name) = match target.parse::<Ipv4Addr>() {
        Ok(ip) => match inventory
            .pods
            .iter()
            .find(|pod| !pod.host_network && pod.ip == Some(ip))
        {
            Some(pod) => (Server::Pod(pod), pod.reference()),
            None => (Server::Address(ip), ip.to_string()),
        },
        Err(_) => {
            let pod = find_pod(inventory, &target)?;
            (Server::Pod(pod), pod.reference())
        }
    };
    let from_end = match server {
        Server::Pod(pod) => pod_end(inventory, client, &pod.cluster, &pod.node),
        // Only the sender's egress is decided: how the address sees it does not matter.
        Server::Address(_) => pod_end(inventory, client, &client.cluster, &client.node),
    };
    let to_end = match server {
        Server::Pod(pod) => pod_end(inventory, pod, &client.cluster, &client.node),
        Server::Address(ip) => End::Other(PeerView {
            kind: address_kind(inventory, ip, &client.cluster, &client.node),
            ip: Some(ip),
            named_ports: NamedPorts::new(),
        }),
    };
    let halves = evaluate::explain(
        &policies,
        EnforcementMode::Default,
        &from_end,
        &to_end,
        protocol,
        port,
    );
    Ok(Explanation {
        from: client.reference(),
        to: to_name,
        port,
        protocol,
        halves,
    })
}

enum Server<'a> {
    Pod(&'a PodView),
    Address(Ipv4Addr),
}

/// A pod as one end of the connection; a pod on the host network is its node, as seen from
/// the other end's node.
fn pod_end(inventory: &Inventory, pod: &PodView, other_cluster: &str, other_node: &str) -> End {
    if pod.host_network {
        let ip = inventory
            .nodes
            .iter()
            .find(|node| node.cluster == pod.cluster && node.name == pod.node)
            .map(|node| node.ip);
        let kind = if pod.cluster == other_cluster && pod.node == other_node {
            PeerKind::Host
        } else {
            PeerKind::RemoteNode
        };
        return End::Other(PeerView {
            kind,
            ip,
            named_ports: NamedPorts::new(),
        });
    }
    End::Endpoint {
        labels: pod.security_labels.clone(),
        ip: pod.ip,
        named_ports: pod.named_ports.clone(),
    }
}

/// What an address that is no pod's is, seen from `node`: that node, another node, or the
/// world (where CIDR rules apply).
fn address_kind(inventory: &Inventory, ip: Ipv4Addr, cluster: &str, node: &str) -> PeerKind {
    match inventory.nodes.iter().find(|n| n.ip == ip) {
        Some(n) if n.name == node && n.cluster == cluster => PeerKind::Host,
        Some(_) => PeerKind::RemoteNode,
        None => PeerKind::World,
    }
}

/// `name` (in any namespace, if only one has it) or `namespace/name`.
pub fn find_pod<'a>(inventory: &'a Inventory, reference: &str) -> anyhow::Result<&'a PodView> {
    let (namespace, name) = match reference.split_once('/') {
        Some((namespace, name)) => (Some(namespace), name),
        None => (None, reference),
    };
    let matches: Vec<&PodView> = inventory
        .pods
        .iter()
        .filter(|pod| pod.name == name)
        .filter(|pod| namespace.is_none_or(|ns| pod.namespace == ns))
        .collect();
    match matches.as_slice() {
        [pod] => Ok(pod),
        [] => bail!("no pod {reference} in {}", inventory.source),
        many => bail!(
            "pod {name} exists in several namespaces or clusters ({}); write namespace/name",
            many.iter()
                .map(|pod| format!("{} in {}", pod.reference(), pod.cluster))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `name:8080`, `ns/name:53/UDP`, `10.1.2.3:443/TCP`.
pub fn parse_target(target: &str) -> anyhow::Result<(String, u16, Protocol)> {
    let (target, protocol) = match target.rsplit_once('/') {
        Some((rest, "TCP" | "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "UDP" | "udp")) => (rest, Protocol::Udp),
        _ => (target, Protocol::Tcp),
    };
    let (host, port) = target.rsplit_once(':').ok_or_else(|| {
        anyhow!("--to {target:?} needs a port: write POD:PORT[/TCP|UDP] or IP:PORT")
    })?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{port:?} is not a port number"))?;
    if host.is_empty() {
        bail!("--to needs a pod or an IP before the port");
    }
    Ok((host.to_owned(), port, protocol))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::super::inventory::{NodeView, PolicyEntry};
    use super::*;

    #[test]
    fn targets_name_a_port_and_optionally_a_protocol() {
        assert_eq!(
            parse_target("web:8080").unwrap(),
            ("web".into(), 8080, Protocol::Tcp)
        );
        assert_eq!(
            parse_target("ml/dns:53/UDP").unwrap(),
            ("ml/dns".into(), 53, Protocol::Udp)
        );
        assert_eq!(
            parse_target("10.1.2.3:443/TCP").unwrap(),
            ("10.1.2.3".into(), 443, Protocol::Tcp)
        );
        assert!(parse_target("web")
            .unwrap_err()
            .to_string()
            .contains("needs a port"));
    }

    fn pod(name: &str, node: &str, ip: [u8; 4], host_network: bool) -> PodView {
        PodView {
            cluster: "c1".into(),
            namespace: "ml".into(),
            name: name.into(),
            node: node.into(),
            ip: (!host_network).then(|| Ipv4Addr::from(ip)),
            host_network,
            security_labels: BTreeMap::from([
                ("app".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), "ml".into()),
            ]),
            named_ports: NamedPorts::new(),
        }
    }

    /// `model` admits only the host (its node's kubelet probes, say).
    fn inventory() -> Inventory {
        Inventory {
            source: "this test".into(),
            pods: vec![
                pod("model", "n1", [10, 1, 1, 10], false),
                pod("prober", "n1", [192, 168, 0, 1], true),
                pod("agent", "n2", [192, 168, 0, 2], true),
            ],
            nodes: vec![
                NodeView {
                    cluster: "c1".into(),
                    name: "n1".into(),
                    ip: Ipv4Addr::new(192, 168, 0, 1),
                },
                NodeView {
                    cluster: "c1".into(),
                    name: "n2".into(),
                    ip: Ipv4Addr::new(192, 168, 0, 2),
                },
            ],
            policies: vec![PolicyEntry::check(
                "c1",
                &json!({
                    "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
                    "metadata": {"name": "host-only", "namespace": "ml"},
                    "spec": {"endpointSelector": {"matchLabels": {"app": "model"}},
                             "ingress": [{"fromEntities": ["host"]}]},
                }),
            )
            .expect("a policy")],
        }
    }

    #[test]
    fn host_network_pods_and_node_addresses_are_their_node_seen_from_the_other_end() {
        let inventory = inventory();
        let same_node = explain(&inventory, "prober", "model:8080").unwrap();
        assert_eq!(same_node.verdict(), Verdict::Allowed, "{same_node}");
        assert!(same_node.halves.egress.is_none(), "the host is no endpoint");
        let other_node = explain(&inventory, "agent", "ml/model:8080").unwrap();
        assert_eq!(other_node.verdict(), Verdict::Denied, "{other_node}");

        let to_own_node = explain(&inventory, "model", "192.168.0.1:10250").unwrap();
        assert_eq!(to_own_node.to, "192.168.0.1");
        assert!(to_own_node.halves.ingress.is_none());
    }

    #[test]
    fn an_ambiguous_or_unknown_pod_is_an_error_naming_the_candidates() {
        let mut inventory = inventory();
        let mut twin = pod("model", "n2", [10, 1, 2, 10], false);
        twin.namespace = "web".into();
        inventory.pods.push(twin);
        let error = explain(&inventory, "model", "prober:80").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("ml/model in c1, web/model in c1"),
            "{error}"
        );
        assert!(explain(&inventory, "ml/model", "ghost:80")
            .unwrap_err()
            .to_string()
            .contains("no pod ghost in this test"));
    }
}
