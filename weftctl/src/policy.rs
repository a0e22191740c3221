//! `weftctl policy …`: what the policies in a sandbox say — their validity, and the verdict and
//! deciding rules for a connection.

use std::net::Ipv4Addr;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use weft_core::policy::evaluate::{
    explain, Decision, End, NamedPorts, PeerKind, PeerView, Reason, Verdict,
};
use weft_core::policy::model::{EnforcementMode, Policy, Protocol};
use weft_crds::policy_model::{self, PolicyError};
use weft_sandbox::{PodState, Sandbox};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Every policy in the sandbox: valid or not (and why), and how many endpoints it selects.
    Status {
        #[arg(long)]
        sandbox: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// The verdict for a connection and the rules that decide it, both directions.
    Explain {
        /// The client pod: `name` or `namespace/name`.
        #[arg(long)]
        from: String,
        /// The server: a pod (`name`, `namespace/name`) or an IP, with `:PORT[/TCP|UDP]`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        sandbox: Option<String>,
    },
}

struct Checked {
    cluster: String,
    kind: String,
    name: String,
    outcome: Result<Policy, PolicyError>,
}

fn policies(sandbox: &Sandbox) -> Vec<Checked> {
    let mut checked = Vec::new();
    for (cluster, objects) in &sandbox.objects {
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let name = match object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
            {
                Some(ns) => format!(
                    "{ns}/{}",
                    object["metadata"]["name"].as_str().unwrap_or("?")
                ),
                None => object["metadata"]["name"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            };
            let outcome = match kind.as_str() {
                "WeftNetworkPolicy" => serde_json::from_value(object.clone())
                    .map_err(|e| decode_error(&e))
                    .and_then(|p| policy_model::weft_policy(&p)),
                "WeftClusterwideNetworkPolicy" => serde_json::from_value(object.clone())
                    .map_err(|e| decode_error(&e))
                    .and_then(|p| policy_model::clusterwide_policy(&p)),
                "NetworkPolicy" => serde_json::from_value(object.clone())
                    .map_err(|e| decode_error(&e))
                    .and_then(|p| policy_model::kubernetes_policy(&p)),
                _ => continue,
            };
            checked.push(Checked {
                cluster: cluster.clone(),
                kind,
                name,
                outcome,
            });
        }
    }
    checked
}

fn decode_error(error: &serde_json::Error) -> PolicyError {
    PolicyError {
        field: "spec".into(),
        reason: policy_model::InvalidReason::BadSelector,
        message: format!("does not match the schema: {error} (run `weftctl validate`)"),
    }
}

fn named_ports(pod: &PodState) -> NamedPorts {
    pod.ports
        .iter()
        .filter_map(|port| {
            let protocol = if port.protocol == "UDP" {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            Some((port.name.clone()?, (protocol, port.port)))
        })
        .collect()
}

fn find_pod<'a>(sandbox: &'a Sandbox, reference: &str) -> anyhow::Result<&'a PodState> {
    let (namespace, name) = match reference.split_once('/') {
        Some((namespace, name)) => (Some(namespace), name),
        None => (None, reference),
    };
    Ok(sandbox.pod(name, namespace, None)?)
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Status { sandbox, cluster } => {
            let sandbox = Sandbox::load(sandbox.as_deref())?;
            let checked = policies(&sandbox);
            let any_invalid = checked.iter().any(|p| p.outcome.is_err());
            println!(
                "{:<10} {:<30} {:<34} {:<6} {:<9} REASON",
                "CLUSTER", "KIND", "NAME", "VALID", "SELECTED"
            );
            for policy in checked
                .iter()
                .filter(|p| cluster.as_ref().is_none_or(|c| *c == p.cluster))
            {
                match &policy.outcome {
                    Ok(model) => {
                        let selected = sandbox
                            .pods
                            .iter()
                            .filter(|pod| pod.cluster == policy.cluster)
                            .filter(|pod| model.subject.matches(&sandbox.security_labels(pod)))
                            .count();
                        println!(
                            "{:<10} {:<30} {:<34} {:<6} {:<9} -",
                            policy.cluster, policy.kind, policy.name, "True", selected
                        );
                    }
                    Err(error) => println!(
                        "{:<10} {:<30} {:<34} {:<6} {:<9} {}: {error}",
                        policy.cluster,
                        policy.kind,
                        policy.name,
                        "False",
                        "-",
                        error.reason.as_condition_reason()
                    ),
                }
            }
            // Like `weftctl validate`: usable as a CI gate.
            Ok(if any_invalid {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCommand::Explain { from, to, sandbox } => {
            let sandbox = Sandbox::load(sandbox.as_deref())?;
            let client = find_pod(&sandbox, &from)?;
            let (target, port, protocol) = parse_target(&to)?;
            let policies: Vec<Policy> = policies(&sandbox)
                .into_iter()
                .filter(|p| p.cluster == client.cluster)
                .filter_map(|p| p.outcome.ok())
                .collect();
            let from_end = End::Endpoint {
                labels: sandbox.security_labels(client),
                ip: Some(client.ip),
                named_ports: named_ports(client),
            };
            let (to_end, to_name) = match target.parse::<Ipv4Addr>() {
                Ok(ip) => match sandbox.pods.iter().find(|pod| pod.ip == ip) {
                    Some(pod) => (
                        pod_end(&sandbox, pod),
                        format!("{}/{}", pod.namespace, pod.name),
                    ),
                    None => {
                        let node = sandbox.plan.nodes.iter().find(|node| node.ip == ip);
                        let kind = match node {
                            Some(node)
                                if node.name == client.node && node.cluster == client.cluster =>
                            {
                                PeerKind::Host
                            }
                            Some(_) => PeerKind::RemoteNode,
                            None => PeerKind::World,
                        };
                        (
                            End::Other(PeerView {
                                kind,
                                ip: Some(ip),
                                named_ports: NamedPorts::new(),
                            }),
                            ip.to_string(),
                        )
                    }
                },
                Err(_) => {
                    let pod = find_pod(&sandbox, &target)?;
                    (
                        pod_end(&sandbox, pod),
                        format!("{}/{}", pod.namespace, pod.name),
                    )
                }
            };
            let explanation = explain(
                &policies,
                EnforcementMode::Default,
                &from_end,
                &to_end,
                protocol,
                port,
            );
            let protocol_name = match protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
                Protocol::Other => "other",
            };
            println!(
                "{}/{} -> {to_name}:{port}/{protocol_name}",
                client.namespace, client.name
            );
            print_half(
                "egress ",
                &format!("{}/{}", client.namespace, client.name),
                explanation.egress.as_ref(),
            );
            print_half("ingress", &to_name, explanation.ingress.as_ref());
            println!(
                "verdict: {}",
                match explanation.verdict() {
                    Verdict::Allowed => "ALLOWED",
                    Verdict::Denied => "DENIED",
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pod_end(sandbox: &Sandbox, pod: &PodState) -> End {
    End::Endpoint {
        labels: sandbox.security_labels(pod),
        ip: Some(pod.ip),
        named_ports: named_ports(pod),
    }
}

/// `name:8080`, `ns/name:53/UDP`, `10.1.2.3:443/TCP`.
fn parse_target(target: &str) -> anyhow::Result<(String, u16, Protocol)> {
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

fn print_half(direction: &str, end: &str, decision: Option<&Decision>) {
    let Some(decision) = decision else {
        println!("{direction} ({end}): not a Weft endpoint, no policy here");
        return;
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
    println!("{direction} ({end}): {verdict} {why}");
    for (action, rule) in decision.matching.iter().skip(1) {
        println!("          also matches: {action:?} {rule}");
    }
}

#[cfg(test)]
mod tests {
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
}
