//! What every long-running Weft component does the same way: its admin endpoint, readiness and
//! orderly shutdown on SIGTERM (Kubernetes) or Ctrl-C (a terminal).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;

use crate::admin::{AdminError, AdminServer, Readiness};

/// Resolves when the process is asked to stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Binds the admin endpoint and serves it in the background; the returned handle stops it.
pub async fn start_admin(
    addr: SocketAddr,
    readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let server = AdminServer::bind(addr, readiness, registry).await?;
    if let Ok(bound) = server.local_addr() {
        tracing::info!(addr = %bound, "admin endpoint serving /healthz, /readyz and /metrics");
    }
    Ok(tokio::spawn(server.serve()))
}
