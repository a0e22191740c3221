//! `weftctl sandbox …`: local mode. See the `weft-sandbox` crate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use weft_sandbox::echo::{self, Identity};
use weft_sandbox::manifests::PodPort;
use weft_sandbox::{default_bin_dir, Sandbox};

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Create the clusters, nodes and pods of a sandbox config and start their agents.
    Up {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show clusters, nodes and pods.
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
    /// Remove the Pods of a manifest file from a running sandbox.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        name: Option<String>,
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
        } => {
            let mut sandbox = Sandbox::load(name.as_deref())?;
            for line in sandbox.delete(cluster.as_deref(), &file)? {
                println!("{line}");
            }
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
                            "identity": p.identity,
                        })
                    })
                    .collect();
                let id = sandbox
                    .plan
                    .nodes
                    .iter()
                    .find(|n| n.cluster == cluster)
                    .map(|n| n.cluster_id);
                serde_json::json!({"name": cluster, "id": id, "nodes": nodes, "pods": pods})
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
            "{:<10} {:<12} {:<20} {:<12} {:<14} {:<8}",
            pod.cluster,
            pod.namespace,
            pod.name,
            pod.node,
            pod.ip.to_string(),
            pod.identity
        );
    }
}
