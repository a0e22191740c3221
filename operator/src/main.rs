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
use weft_operator::identity_controller::{self, IdentityConfig};
use weft_operator::leader::{self, LeaderElectionConfig, LeaderElector};
use weft_operator::metrics::Metrics;
use weft_operator::peering_controller::{self, PeeringSettings};
use weft_operator::{bandwidth_controller, global_service_controller, policy_controller};

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
    /// Weft's namespace: where the leader-election Lease lives and where ClusterPeering
    /// Secrets are read by default (the chart sets it from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// This replica's name in leader election (the chart sets the pod name).
    #[arg(long, env = "POD_NAME")]
    replica_name: Option<String>,
    /// How long a security identity no pod uses is kept before it is deleted.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    identity_gc_grace: std::time::Duration,
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
    let mut registry = Registry::with_prefix("weft_operator");
    let metrics = Metrics::register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
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

    let mut identities = IdentityConfig::new(args.cluster.cluster_id);
    identities.gc_grace = args.identity_gc_grace;
    let peering = PeeringSettings {
        cluster_name: args.cluster.cluster_name.clone(),
        namespace: args.namespace.clone(),
    };
    // Every controller, as one unit of work: run by the leader only when elected.
    let controllers = {
        let client = client.clone();
        let metrics = metrics.clone();
        move || {
            let (client, identities, peering, metrics) = (
                client.clone(),
                identities.clone(),
                peering.clone(),
                metrics.clone(),
            );
            async move {
                let reconciles = metrics.reconcile.clone();
                tokio::join!(
                    policy_controller::run(client.clone(), reconciles.clone()),
                    bandwidth_controller::run(client.clone(), reconciles.clone()),
                    global_service_controller::run(client.clone(), reconciles.clone()),
                    peering_controller::run(client.clone(), peering, reconciles),
                    identity_controller::run(client, identities, metrics),
                );
            }
        }
    };
    // Ready means serving: a standby replica is ready too (it takes over when elected).
    readiness.set_ready(true);
    if args.leader_elect {
        let replica = args
            .replica_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context(
                "--leader-elect needs this replica's name: set POD_NAME (or --replica-name)",
            )?;
        tracing::info!(lease = %format!("{}/{}", args.namespace, leader::LEASE_NAME), %replica, "taking part in leader election");
        LeaderElector::new(client, LeaderElectionConfig::new(&args.namespace, replica))
            .with_metrics(&metrics)
            .run_while_leader(controllers, shutdown_signal())
            .await;
    } else {
        tracing::warn!("leader election is off (--leader-elect): run one replica only");
        let running = tokio::spawn(controllers());
        shutdown_signal().await;
        running.abort();
    }
    tracing::info!("weft-operator stopping");
    admin.abort();
    Ok(())
}
