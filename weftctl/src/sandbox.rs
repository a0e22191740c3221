//! `weftctl sandbox …`: local mode. See the `weft-sandbox` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use weft_sandbox::echo::{self, Identity};
use weft_sandbox::manifests::PodPort;
use weft_sandbox::services::ServiceStatus;
use weft_sandbox::{default_bin_dir, Sandbox};

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Create the clusters, nodes and pods of a sandbox config and start their agents.
    Up {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show clusters, nodes, pods and Services (with their backends).
    Status {
        #[arg(long)]
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Run a command inside a pod's network namespace and cgroup, like `kubectl exec`.
    Exec {
        pod: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add the Pods (and other objects) of a manifest file to a running sandbox.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove the Pods (and other objects) of a manifest file from a running sandbox.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Seconds the pods terminate before they go: their endpoints stop taking new
        /// connections while the ones they have finish.
        #[arg(long, default_value_t = 0)]
        grace_period: u64,
    },
    /// Remove everything a sandbox made; safe to repeat, also after a crash.
    Down {
        /// The sandbox; the only one running when omitted.
        #[arg(long)]
        name: Option<String>,
    },
    /// The echo server each sandbox pod runs (started by `up`, not by hand).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        ports: String,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

pub fn run(command: SandboxCommand) -> anyhow::Result<ExitCode> {
    match command {
        SandboxCommand::Up { config } => {
            let sandbox = Sandbox::up(&config, &default_bin_dir())
                .with_context(|| format!("bringing up the sandbox from {}", config.display()))?;
            print_table(&sandbox);
            println!(
                "\nsandbox {} is up. Try:\n  weftctl sandbox exec {} -- curl -s http://{}:8080\n  weftctl sandbox down",
                sandbox.plan.name,
                sandbox.pods.first().map(|p| p.name.as_str()).unwrap_or("POD"),
                sandbox.pods.last().map(|p| p.ip.to_string()).unwrap_or_else(|| "IP".into()),
            );
        }
        SandboxCommand::Status { name, output } => {
            let sandbox = Sandbox::load(name.as_deref())?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&status_json(&sandbox))?);
            } else {
                print_table(&sandbox);
            }
        }
        SandboxCommand::Exec {
            pod,
            namespace,
            cluster,
            name,
            command,
        } => {
            let sandbox = Sandbox::load(name.as_deref())?;
            let pod = sandbox.pod(&pod, namespace.as_deref(), cluster.as_deref())?;
            let status = sandbox.exec(pod, &command)?;
            return Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ));
        }
        SandboxCommand::Apply {
            file,
            cluster,
            name,
        } => {
            let mut sandbox = Sandbox::load(name.as_deref())?;
            for line in sandbox.apply(cluster.as_deref(), &file)? {
                println!("{line}");
            }
        }
        SandboxCommand::Delete {
            file,
            cluster,
            name,
            grace_period,
        } => {
            let mut sandbox = Sandbox::load(name.as_deref())?;
            sandbox.delete_with_grace(
                cluster.as_deref(),
                &file,
                Duration::from_secs(grace_period),
                |line| println!("{line}"),
            )?;
        }
        SandboxCommand::Down { name } => {
            let names = match name {
                Some(name) => vec![name],
                None => weft_sandbox::running_sandboxes(),
            };
            if names.is_empty() {
                println!("no sandbox is up");
            }
            for name in names {
                for line in Sandbox::down(&name) {
                    println!("removed {line}");
                }
                println!("sandbox {name} is down");
            }
        }
        SandboxCommand::Serve {
            pod,
            namespace,
            node,
            cluster,
            ports,
            ready_file,
        } => {
            let ports: Vec<PodPort> =
                serde_json::from_str(&ports).context("--ports is not valid JSON")?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(echo::serve(
                Identity {
                    pod,
                    namespace,
                    node,
                    cluster,
                },
                ports,
                ready_file,
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(sandbox: &Sandbox) -> serde_json::Value {
    let services = sandbox.services();
    let clusters: Vec<serde_json::Value> = {
        let mut names: Vec<&str> = sandbox
            .plan
            .nodes
            .iter()
            .map(|n| n.cluster.as_str())
            .collect();
        names.dedup();
        names
            .into_iter()
            .map(|cluster| {
                let nodes: Vec<serde_json::Value> = sandbox
                    .plan
                    .nodes
                    .iter()
                    .filter(|n| n.cluster == cluster)
                    .map(|n| {
                        serde_json::json!({
                            "name": n.name, "ip": n.ip, "podCIDR": n.pod_cidr,
                            "routingMode": n.routing_mode,
                        })
                    })
                    .collect();
                let pods: Vec<serde_json::Value> = sandbox
                    .pods
                    .iter()
                    .filter(|p| p.cluster == cluster)
                    .map(|p| {
                        serde_json::json!({
                            "namespace": p.namespace, "name": p.name, "node": p.node,
                            "ip": p.ip, "labels": p.labels, "ports": p.ports,
                            "identity": p.identity, "terminating": p.terminating,
                        })
                    })
                    .collect();
                let id = sandbox
                    .plan
                    .nodes
                    .iter()
                    .find(|n| n.cluster == cluster)
                    .map(|n| n.cluster_id);
                let services: Vec<ServiceStatus> = services
                    .get(cluster)
                    .map(|computed| computed.status(cluster))
                    .unwrap_or_default();
                serde_json::json!({
                    "name": cluster, "id": id, "serviceCIDR": sandbox.plan.service_cidr(cluster),
                    "nodes": nodes, "pods": pods, "services": services,
                })
            })
            .collect()
    };
    serde_json::json!({"name": sandbox.plan.name, "clusters": clusters})
}

fn print_table(sandbox: &Sandbox) {
    println!(
        "{:<10} {:<12} {:<14} {:<16} {:<14}",
        "CLUSTER", "NODE", "NODE IP", "POD CIDR", "ROUTING"
    );
    for node in &sandbox.plan.nodes {
        println!(
            "{:<10} {:<12} {:<14} {:<16} {:<14}",
            node.cluster,
            node.name,
            node.ip.to_string(),
            node.pod_cidr.to_string(),
            node.routing_mode.as_flag()
        );
    }
    println!();
    println!(
        "{:<10} {:<12} {:<20} {:<12} {:<14} {:<8}",
        "CLUSTER", "NAMESPACE", "POD", "NODE", "IP", "IDENTITY"
    );
    for pod in &sandbox.pods {
        println!(
            "{:<10} {:<12} {:<20} {:<12} {:<14} {:<8}{}",
            pod.cluster,
            pod.namespace,
            pod.name,
            pod.node,
            pod.ip.to_string(),
            pod.identity,
            if pod.terminating { " terminating" } else { "" }
        );
    }
    let computed = sandbox.services();
    let services: Vec<(&str, ServiceStatus)> = sandbox
        .plan
        .clusters()
        .into_iter()
        .flat_map(|cluster| {
            computed
                .get(cluster)
                .map(|services| services.status(cluster))
                .unwrap_or_default()
                .into_iter()
                .map(move |service| (cluster, service))
        })
        .collect();
    if services.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:<12} {:<20} {:<22} {:<14} {:<24} BACKENDS",
        "CLUSTER", "NAMESPACE", "SERVICE", "TYPE", "CLUSTER-IP", "PORTS"
    );
    for (cluster, service) in &services {
        let kind = if service.global {
            format!("{} (global)", service.kind)
        } else {
            service.kind.clone()
        };
        println!(
            "{:<10} {:<12} {:<20} {:<22} {:<14} {:<24} {}",
            cluster,
            service.namespace,
            service.name,
            kind,
            service.cluster_ip.as_deref().unwrap_or("-"),
            ports_summary(service),
            backends_summary(service, cluster),
        );
    }
}

/// As kubectl shows them: `80/TCP`, `80:30000/TCP`.
fn ports_summary(service: &ServiceStatus) -> String {
    let ports: Vec<String> = service
        .ports
        .iter()
        .map(|port| match port.node_port {
            Some(node_port) => format!("{}:{node_port}/{}", port.port, port.protocol),
            None => format!("{}/{}", port.port, port.protocol),
        })
        .collect();
    if ports.is_empty() {
        "-".into()
    } else {
        ports.join(",")
    }
}

/// Distinct backend addresses: how many are ready, how many terminate, how many are remote.
fn backends_summary(service: &ServiceStatus, cluster: &str) -> String {
    let mut pods: Vec<(&str, &str, bool, bool)> = service
        .backends
        .iter()
        .map(|b| (b.cluster.as_str(), b.ip.as_str(), b.ready, b.terminating))
        .collect();
    pods.sort();
    pods.dedup();
    let ready = pods.iter().filter(|b| b.2).count();
    let mut summary = format!("{ready}/{} ready", pods.len());
    let terminating = pods.iter().filter(|b| b.3).count();
    if terminating > 0 {
        summary.push_str(&format!(", {terminating} terminating"));
    }
    let remote = pods.iter().filter(|b| b.0 != cluster).count();
    if remote > 0 {
        summary.push_str(&format!(", {remote} remote"));
    }
    summary
}
