//! `weft-operator`: wiring only. Reconcilers live in library modules as they land; see
//! `docs/architecture.md`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use weft_core::admin::Readiness;
use weft_core::cluster::ClusterArgs;
use weft_core::daemon::{shutdown_signal, start_admin};
use weft_core::telemetry::LogArgs;

/// Reconciles Weft's CRDs: validates policies and reports their status, allocates security
/// identities, materialises global services and checks cluster peerings.
#[derive(Debug, Parser)]
#[command(name = "weft-operator", version)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9963")]
    admin_addr: SocketAddr,
    /// Take part in leader election so that only one replica reconciles at a time.
    #[arg(long)]
    leader_elect: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.log.init()?;
    tracing::info!(
        cluster = %args.cluster.cluster_name,
        cluster_id = %args.cluster.cluster_id,
        leader_elect = args.leader_elect,
        "weft-operator starting"
    );
    let readiness = Readiness::default();
    let registry = Arc::new(Mutex::new(Registry::with_prefix("weft_operator")));
    let admin = start_admin(args.admin_addr, readiness.clone(), registry)
        .await
        .context("starting the admin endpoint")?;
    // No controllers are wired in this release (README, "Features"): the process serves its
    // admin endpoint so that the chart's probes and rollout behave as they will later.
    tracing::warn!("no reconcilers are wired in this release; serving health and metrics only");
    readiness.set_ready(true);
    shutdown_signal().await;
    tracing::info!("weft-operator stopping");
    admin.abort();
    Ok(())
}
