//! `weft-agent`: wiring only; the work is in the library modules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;
use weft_agent::datapath::PodDatapath;
use weft_agent::kernel;
use weft_core::admin::Readiness;
use weft_core::cluster::ClusterArgs;
use weft_core::daemon::{shutdown_signal, start_admin};
use weft_core::telemetry::LogArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoutingMode {
    /// Pod CIDRs are routed by the underlying network.
    Native,
    /// Pod traffic between nodes is encapsulated in VXLAN.
    Tunnel,
}

/// Runs on every node: wires pods (CNI), programs the eBPF datapath, enforces policy, balances
/// services and reports flows.
#[derive(Debug, Parser)]
#[command(name = "weft-agent", version)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9962")]
    admin_addr: SocketAddr,
    /// The Kubernetes node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where bpffs is mounted; maps are pinned below it.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Where a cgroup v2 hierarchy is mounted, for socket-level hooks.
    #[arg(long, default_value = "/run/weft/cgroupv2")]
    cgroup_root: PathBuf,
    /// Directory the CNI network configuration is installed into.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Directory the CNI plugin binary is installed into.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// How pod traffic travels between nodes.
    #[arg(long, value_enum, default_value_t = RoutingMode::Tunnel)]
    routing_mode: RoutingMode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.log.init()?;
    tracing::info!(
        node = %args.node_name,
        cluster = %args.cluster.cluster_name,
        cluster_id = %args.cluster.cluster_id,
        routing_mode = ?args.routing_mode,
        cni_conf_dir = %args.cni_conf_dir.display(),
        cni_bin_dir = %args.cni_bin_dir.display(),
        "weft-agent starting"
    );
    let readiness = Readiness::default();
    let registry = Arc::new(Mutex::new(Registry::with_prefix("weft_agent")));
    let admin = start_admin(args.admin_addr, readiness.clone(), registry)
        .await
        .context("starting the admin endpoint")?;

    let report = kernel::probe(&args.bpffs, &args.cgroup_root);
    let mut degraded = false;
    for (what, consequence) in report.missing() {
        degraded = true;
        tracing::error!(missing = what, "{consequence}");
    }
    // Loading runs the programs through the verifier: proof this kernel accepts the datapath.
    let datapath = match PodDatapath::load() {
        Ok(datapath) => {
            tracing::info!("pod datapath programs loaded and verified");
            Some(datapath)
        }
        Err(error) => {
            tracing::error!(%error, "the datapath cannot run on this node");
            None
        }
    };
    // Not ready while anything is missing, so a rollout stops on a node that cannot work.
    readiness.set_ready(!degraded && datapath.is_some());
    tracing::warn!(
        "pod wiring (CNI), policy and services are not wired in this release; the agent \
         checks the kernel and serves health and metrics only"
    );

    shutdown_signal().await;
    tracing::info!("weft-agent stopping; attached programs stay until their links are released");
    admin.abort();
    Ok(())
}
