//! `weft-clustermesh-apiserver`: wiring only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use clap::Parser;
use prometheus_client::registry::Registry;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_core::admin::Readiness;
use weft_core::cluster::ClusterArgs;
use weft_core::daemon::{shutdown_signal, start_admin};
use weft_core::telemetry::LogArgs;

/// Shares this cluster's identities, endpoints and global-service backends with peer clusters
/// over gRPC with mutual TLS; peers can only read.
#[derive(Debug, Parser)]
#[command(name = "weft-clustermesh-apiserver", version)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9964")]
    admin_addr: SocketAddr,
    /// Address peers connect to.
    #[arg(long, default_value = "0.0.0.0:2379")]
    listen_addr: SocketAddr,
    /// PEM server certificate chain presented to peers.
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of the server certificate.
    #[arg(long)]
    tls_key: PathBuf,
    /// PEM CA bundle that peers' client certificates must chain to.
    #[arg(long)]
    tls_client_ca: PathBuf,
}

/// Reads the TLS material now, so a wrong mount fails start-up with the file's name.
fn check_tls(args: &Args) -> anyhow::Result<()> {
    let certs = |path: &Path| -> anyhow::Result<usize> {
        let count = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read certificates from {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not valid PEM", path.display()))?
            .len();
        if count == 0 {
            bail!("{} holds no PEM certificate", path.display());
        }
        Ok(count)
    };
    let chain = certs(&args.tls_cert)?;
    let cas = certs(&args.tls_client_ca)?;
    PrivateKeyDer::from_pem_file(&args.tls_key)
        .with_context(|| format!("{} holds no PEM private key", args.tls_key.display()))?;
    tracing::info!(chain, client_cas = cas, "TLS material loaded");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.log.init()?;
    tracing::info!(
        cluster = %args.cluster.cluster_name,
        cluster_id = %args.cluster.cluster_id,
        listen = %args.listen_addr,
        "weft-clustermesh-apiserver starting"
    );
    check_tls(&args)?;
    let readiness = Readiness::default();
    let registry = Arc::new(Mutex::new(Registry::with_prefix("weft_clustermesh")));
    let admin = start_admin(args.admin_addr, readiness.clone(), registry)
        .await
        .context("starting the admin endpoint")?;
    // The export service is not in this release (README, "Features"); stay unready so that no
    // peer is pointed at an endpoint that does not serve yet.
    tracing::warn!(
        "the mesh export service is not wired in this release; staying not-ready, serving \
         health and metrics only"
    );
    shutdown_signal().await;
    tracing::info!("weft-clustermesh-apiserver stopping");
    admin.abort();
    Ok(())
}
