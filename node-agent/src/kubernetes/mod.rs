//! Kubernetes mode: the agent's edge to the API server. Everything Kubernetes-specific stays in
//! this module; the engines (policy, services, the flow directory, the node's endpoints) are
//! the same as in local mode and never see a Kubernetes client.
//!
//! - [`node`]: this node's pod CIDR and InternalIP from its Node object, and the other nodes as
//!   peers (the state's nodes).
//! - [`watch`]: kube-runtime reflectors over this node's Pods (field selector
//!   `spec.nodeName=<node>`), and cluster-wide Namespaces, WeftIdentities, WeftEndpoints, the
//!   three policy kinds, Services, EndpointSlices, GlobalServices and Nodes.
//! - [`rows`]: what the engines read, built from those objects (pure functions).
//! - [`endpoints`]: publishes a WeftEndpoint (server-side apply, field manager `weft-agent`) for
//!   every pod this agent wired, and deletes it when the pod is released.
//! - [`cni_install`]: the plugin binary and conflist the container runtime runs.
//! - [`uplink`]: the device holding the node's address, and its MTU.
//!
//! ## The watches are one source of the agent's state
//!
//! The watches publish rows into the agent's typed state ([`crate::state`]) under the source
//! `kubernetes`, as the sandbox does over its socket in local mode ([`crate::local_source`]):
//! both modes feed the engines exactly the same tables, and the engines are tested once. The
//! state keeps only rows that changed, and the engines wait until every watch has listed its
//! kind: a restarted agent leaves what its pinned maps hold in force until then.

pub mod cni_install;
pub mod endpoints;
pub mod node;
pub mod rows;
pub mod uplink;
pub mod watch;

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Who writes to the API server, for server-side apply.
pub const FIELD_MANAGER: &str = "weft-agent";

/// How the agent learns about the cluster, as asked on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestedMode {
    /// Kubernetes when a configuration is available (`--kubeconfig`, `KUBECONFIG`, or running
    /// in a pod) and no local-mode flag (`--state-socket`) is given; local otherwise.
    Auto,
    /// The cluster's state comes from the local source (the sandbox); no Kubernetes.
    Local,
    /// Watches the API server.
    Kubernetes,
}

/// How the agent runs, once decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Local,
    Kubernetes,
}

/// Decides the mode. `config_available`: a kubeconfig was given or the agent runs in a pod
/// (`KUBERNETES_SERVICE_HOST` is set); `file_flags`: the local-mode flags given.
pub fn resolve_mode(
    requested: RequestedMode,
    config_available: bool,
    file_flags: &[&str],
) -> Result<Mode, String> {
    match requested {
        RequestedMode::Local => Ok(Mode::Local),
        RequestedMode::Kubernetes if !file_flags.is_empty() => Err(format!(
            "--mode kubernetes reads the cluster from the API server and takes no local-mode flags ({}): drop them or use --mode local",
            file_flags.join(", ")
        )),
        RequestedMode::Kubernetes => Ok(Mode::Kubernetes),
        RequestedMode::Auto if config_available && file_flags.is_empty() => Ok(Mode::Kubernetes),
        RequestedMode::Auto => Ok(Mode::Local),
    }
}

/// Whether the environment names a cluster without a kubeconfig: kubelet sets
/// `KUBERNETES_SERVICE_HOST` in every pod.
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|host| !host.is_empty())
}

/// A client from `kubeconfig`, or else from the pod's service account (or the user's default
/// kubeconfig, as kubectl would).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("using the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given (--kubeconfig, KUBECONFIG) and not running in a pod")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_kubernetes_only_with_a_config_and_no_local_files() {
        assert_eq!(
            resolve_mode(RequestedMode::Auto, true, &[]),
            Ok(Mode::Kubernetes)
        );
        assert_eq!(
            resolve_mode(RequestedMode::Auto, false, &[]),
            Ok(Mode::Local)
        );
        // The sandbox passes its socket: local mode even when KUBECONFIG happens to be set.
        assert_eq!(
            resolve_mode(RequestedMode::Auto, true, &["--state-socket"]),
            Ok(Mode::Local)
        );
        assert_eq!(
            resolve_mode(RequestedMode::Local, true, &[]),
            Ok(Mode::Local)
        );
        assert_eq!(
            resolve_mode(RequestedMode::Kubernetes, false, &[]),
            Ok(Mode::Kubernetes)
        );
        let error = resolve_mode(RequestedMode::Kubernetes, true, &["--state-socket"])
            .expect_err("the local source and kubernetes mode conflict");
        assert!(error.contains("--state-socket"), "{error}");
    }
}
