//! The sandbox configuration file: which clusters, nodes and manifests make up the sandbox.
//!
//! ```yaml
//! name: demo
//! clusters:
//!   - name: east
//!     id: 1
//!     podCIDR: 10.1.0.0/16     # each node gets a /24 of it
//!     serviceCIDR: 10.96.0.0/16 # cluster IPs; the default, may be shared by clusters
//!     routingMode: tunnel       # or native
//!     nodes: [east-1, east-2]
//!     manifests: [east/]        # files or directories of Kubernetes YAML, relative to this file
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_core::cluster::{ClusterId, ClusterName};

use crate::plan::{FABRIC_NETWORK, FABRIC_PREFIX};

/// The service CIDR of a cluster that names none (kubeadm's default).
pub const DEFAULT_SERVICE_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read sandbox config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error("sandbox config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    Native,
    #[default]
    Tunnel,
}

impl RoutingMode {
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Tunnel => "tunnel",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxConfig {
    /// Names everything the sandbox creates (namespaces, links, cgroups, pins), so several
    /// sandboxes can run side by side and `sandbox down` finds all of it.
    pub name: String,
    pub clusters: Vec<ClusterConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    pub id: u16,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
    /// Where Services' cluster IPs come from. Cluster IPs never leave a node, so clusters may
    /// share one; it must not overlap any cluster's pod CIDR or the fabric.
    #[serde(
        rename = "serviceCIDR",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub service_cidr: Option<Ipv4Net>,
    #[serde(default)]
    pub routing_mode: RoutingMode,
    pub nodes: Vec<String>,
    #[serde(default)]
    pub manifests: Vec<PathBuf>,
    /// Extra flags for every agent of the cluster, after the ones the sandbox sets (for
    /// example `[--ct-lifetime-closing, 2s]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
}

impl ClusterConfig {
    pub fn service_cidr(&self) -> Ipv4Net {
        self.service_cidr.unwrap_or(DEFAULT_SERVICE_CIDR)
    }
}

/// Longest sandbox name: it prefixes namespace and cgroup names.
pub const MAX_NAME_LEN: usize = 12;

impl SandboxConfig {
    /// Reads and checks a config; relative manifest paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self =
            serde_saphyr::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for cluster in &mut config.clusters {
            for manifest in &mut cluster.manifests {
                if manifest.is_relative() {
                    *manifest = base.join(&*manifest);
                }
            }
        }
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    pub fn check(&self) -> Result<(), String> {
        let short_label = |value: &str, max: usize| {
            !value.is_empty()
                && value.len() <= max
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !value.starts_with('-')
                && !value.ends_with('-')
        };
        if !short_label(&self.name, MAX_NAME_LEN) {
            return Err(format!(
                "name {:?} must be a lowercase DNS label of at most {MAX_NAME_LEN} characters",
                self.name
            ));
        }
        if self.clusters.is_empty() {
            return Err("at least one cluster is needed".into());
        }
        let mut cidrs: Vec<Ipv4Net> = Vec::new();
        let mut ids = Vec::new();
        for cluster in &self.clusters {
            ClusterName::new(cluster.name.clone()).map_err(|e| e.to_string())?;
            ClusterId::new(u64::from(cluster.id)).map_err(|e| e.to_string())?;
            if ids.contains(&cluster.id) {
                return Err(format!("cluster ID {} is used twice", cluster.id));
            }
            ids.push(cluster.id);
            if cluster.pod_cidr.prefix_len() > 22 {
                return Err(format!(
                    "cluster {}: podCIDR {} is too small; use a /22 or larger (each node takes a /24)",
                    cluster.name, cluster.pod_cidr
                ));
            }
            if let Some(other) = cidrs.iter().find(|other| {
                other.contains(&cluster.pod_cidr) || cluster.pod_cidr.contains(*other)
            }) {
                return Err(format!(
                    "cluster {}: podCIDR {} overlaps {other}; clusters sharing a fabric need distinct pod CIDRs",
                    cluster.name, cluster.pod_cidr
                ));
            }
            cidrs.push(cluster.pod_cidr);
            if cluster.nodes.is_empty() {
                return Err(format!("cluster {} has no nodes", cluster.name));
            }
            let slots = 1u32 << (24 - u32::from(cluster.pod_cidr.prefix_len()));
            if cluster.nodes.len() as u32 >= slots {
                return Err(format!(
                    "cluster {}: {} nodes do not fit {} (one /24 each)",
                    cluster.name,
                    cluster.nodes.len(),
                    cluster.pod_cidr
                ));
            }
            for node in &cluster.nodes {
                if !short_label(node, 40) {
                    return Err(format!("node name {node:?} must be a lowercase DNS label"));
                }
            }
        }
        self.check_service_cidrs()
    }

    /// Each cluster's service CIDR: a sane size (as the API server demands), and clear of every
    /// cluster's pod CIDR and of the fabric, whose addresses it would otherwise shadow.
    fn check_service_cidrs(&self) -> Result<(), String> {
        let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(b) || b.contains(a);
        let fabric = Ipv4Net::new(FABRIC_NETWORK, FABRIC_PREFIX).unwrap_or_default();
        for cluster in &self.clusters {
            let services = cluster.service_cidr();
            let named = if cluster.service_cidr.is_some() {
                "serviceCIDR"
            } else {
                "the default serviceCIDR"
            };
            if services.trunc() != services {
                return Err(format!(
                    "cluster {}: serviceCIDR {services} has host bits set; did you mean {}?",
                    cluster.name,
                    services.trunc()
                ));
            }
            if !(12..=30).contains(&services.prefix_len()) {
                return Err(format!(
                    "cluster {}: serviceCIDR {services} must be between a /12 and a /30",
                    cluster.name
                ));
            }
            if let Some(other) = self
                .clusters
                .iter()
                .find(|other| overlaps(&services, &other.pod_cidr))
            {
                return Err(format!(
                    "cluster {}: {named} {services} overlaps the podCIDR {} of cluster {}; set a serviceCIDR clear of every cluster's pod CIDR",
                    cluster.name, other.pod_cidr, other.name
                ));
            }
            if overlaps(&services, &fabric) {
                return Err(format!(
                    "cluster {}: {named} {services} overlaps the sandbox fabric {fabric}, where the nodes live",
                    cluster.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<SandboxConfig, String> {
        let config: SandboxConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        config.check().map(|()| config)
    }

    #[test]
    fn a_two_cluster_config_is_accepted() {
        let config = config(
            "name: demo\nclusters:\n- {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: [e1, e2]}\n- {name: west, id: 2, podCIDR: 10.2.0.0/16, routingMode: native, nodes: [w1]}\n",
        )
        .expect("valid");
        assert_eq!(config.clusters[1].routing_mode, RoutingMode::Native);
        assert_eq!(config.clusters[0].routing_mode, RoutingMode::Tunnel);
    }

    #[test]
    fn overlapping_cidrs_duplicate_ids_and_long_names_are_refused_with_reasons() {
        let overlap = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: [n]}\n- {name: b, id: 2, podCIDR: 10.1.4.0/22, nodes: [n]}\n");
        assert!(overlap.expect_err("overlap").contains("overlaps"));
        let twice = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: [n]}\n- {name: b, id: 1, podCIDR: 10.2.0.0/16, nodes: [n]}\n");
        assert!(twice.expect_err("duplicate id").contains("used twice"));
        let long = config("name: a-very-long-sandbox\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: [n]}\n");
        assert!(long.expect_err("long name").contains("at most 12"));
        let typo =
            config("name: demo\nclusters:\n- {name: a, id: 1, podCidr: 10.1.0.0/16, nodes: [n]}\n");
        assert!(typo.is_err(), "unknown fields are refused");
    }

    #[test]
    fn the_service_cidr_defaults_may_be_shared_and_must_clear_every_pod_cidr() {
        let shared = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: [n]}\n- {name: b, id: 2, podCIDR: 10.2.0.0/16, serviceCIDR: 10.96.0.0/16, nodes: [n]}\n")
            .expect("clusters may share a service CIDR");
        assert_eq!(shared.clusters[0].service_cidr(), DEFAULT_SERVICE_CIDR);
        assert_eq!(shared.clusters[1].service_cidr(), DEFAULT_SERVICE_CIDR);

        let own_pods = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.1.128.0/20, nodes: [n]}\n");
        let error = own_pods.expect_err("inside its pod CIDR");
        assert!(
            error.contains("overlaps the podCIDR 10.1.0.0/16 of cluster a"),
            "{error}"
        );

        // The default collides with a cluster whose pods live in 10.96.0.0/12.
        let default = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: [n]}\n- {name: b, id: 2, podCIDR: 10.96.0.0/12, serviceCIDR: 10.200.0.0/16, nodes: [n]}\n");
        let error = default.expect_err("the default overlaps b's pods");
        assert!(
            error.contains("cluster a: the default serviceCIDR 10.96.0.0/16 overlaps the podCIDR 10.96.0.0/12 of cluster b"),
            "{error}"
        );

        let fabric = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 172.30.8.0/24, nodes: [n]}\n");
        assert!(fabric.expect_err("fabric").contains("fabric"));
        let huge = config("name: demo\nclusters:\n- {name: a, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 100.0.0.0/8, nodes: [n]}\n");
        assert!(huge.expect_err("too large").contains("/12"));
    }
}
