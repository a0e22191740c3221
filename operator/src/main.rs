//! `weft-operator`: wiring only; the reconcilers are in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
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
    /// A kubeconfig to run against a cluster from outside it; in a pod, the in-cluster
    /// configuration is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Two TLS providers are compiled in (through dependencies); choose before any client.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("using the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given (--kubeconfig) and not running in a pod")?,
    };
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    if args.leader_elect {
        tracing::warn!("leader election is not implemented yet: every replica reconciles (status writes are idempotent server-side applies)");
    }
    let controllers = tokio::spawn(weft_operator::policy_controller::run(client));
    readiness.set_ready(true);
    tracing::info!("reconciling WeftNetworkPolicy and WeftClusterwideNetworkPolicy statuses");
    shutdown_signal().await;
    tracing::info!("weft-operator stopping");
    controllers.abort();
    admin.abort();
    Ok(())
}
