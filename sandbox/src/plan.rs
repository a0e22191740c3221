//! Names and addresses for everything a sandbox creates, computed from its config alone, so
//! `up`, `status` and `down` agree without asking the kernel.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{RoutingMode, SandboxConfig, DEFAULT_SERVICE_CIDR};

/// The network the nodes share inside the fabric namespace (a private one per sandbox, so
/// sandboxes never see each other's addresses).
pub const FABRIC_NETWORK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
pub const FABRIC_PREFIX: u8 = 16;
/// The bridge in the fabric namespace that every node's uplink joins.
pub const FABRIC_BRIDGE: &str = "fabric0";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// Starts every namespace, cgroup and run directory name of this sandbox.
    pub prefix: String,
    pub fabric_netns: String,
    pub nodes: Vec<NodePlan>,
    /// Each cluster's service CIDR (state written before services existed has none: those
    /// clusters use the default).
    #[serde(default)]
    pub service_cidrs: BTreeMap<String, Ipv4Net>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub cluster: String,
    pub cluster_id: u16,
    pub routing_mode: RoutingMode,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    /// The node's uplink's peer in the fabric namespace.
    pub fabric_veth: String,
    /// Extra `weft-agent` flags for this node's agent (the cluster's `agentArgs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
}

impl Plan {
    pub fn new(config: &SandboxConfig) -> Self {
        let prefix = prefix_for(&config.name);
        let mut nodes = Vec::new();
        let mut next_host = 1u32;
        for cluster in &config.clusters {
            for (index, node) in cluster.nodes.iter().enumerate() {
                // Node n of a cluster gets the (n+1)-th /24 of the cluster's pod CIDR.
                let base = u32::from(cluster.pod_cidr.network()) + ((index as u32 + 1) << 8);
                nodes.push(NodePlan {
                    cluster: cluster.name.clone(),
                    cluster_id: cluster.id,
                    routing_mode: cluster.routing_mode,
                    name: node.clone(),
                    netns: format!("{prefix}-{}-{node}", cluster.name),
                    ip: Ipv4Addr::from(u32::from(FABRIC_NETWORK) + next_host),
                    pod_cidr: Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap_or_default(),
                    fabric_veth: format!("f{}n{index}", cluster.id),
                    agent_args: cluster.agent_args.clone(),
                });
                next_host += 1;
            }
        }
        Self {
            name: config.name.clone(),
            prefix: prefix.clone(),
            fabric_netns: format!("{prefix}-fabric"),
            nodes,
            service_cidrs: config
                .clusters
                .iter()
                .map(|cluster| (cluster.name.clone(), cluster.service_cidr()))
                .collect(),
        }
    }

    /// The clusters, in config order.
    pub fn clusters(&self) -> Vec<&str> {
        let mut clusters: Vec<&str> = self.nodes.iter().map(|n| n.cluster.as_str()).collect();
        clusters.dedup();
        clusters
    }

    pub fn cluster_id(&self, cluster: &str) -> Option<u16> {
        self.nodes
            .iter()
            .find(|node| node.cluster == cluster)
            .map(|node| node.cluster_id)
    }

    pub fn service_cidr(&self, cluster: &str) -> Ipv4Net {
        self.service_cidrs
            .get(cluster)
            .copied()
            .unwrap_or(DEFAULT_SERVICE_CIDR)
    }

    pub fn node(&self, cluster: &str, node: &str) -> Option<&NodePlan> {
        self.nodes
            .iter()
            .find(|plan| plan.cluster == cluster && plan.name == node)
    }

    /// The network namespace of a pod.
    pub fn pod_netns(&self, cluster: &str, namespace: &str, pod: &str) -> String {
        format!("{}-{cluster}-{namespace}-{pod}", self.prefix)
    }
}

pub fn prefix_for(name: &str) -> String {
    format!("wsb-{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_addresses_and_pod_cidrs_inside_their_cluster() {
        let config: SandboxConfig = serde_saphyr::from_str(
            "name: demo\nclusters:\n- {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: [e1, e2]}\n- {name: west, id: 2, podCIDR: 10.2.0.0/16, nodes: [w1]}\n",
        )
        .expect("config");
        let plan = Plan::new(&config);
        let summary: Vec<(String, String, String, String)> = plan
            .nodes
            .iter()
            .map(|n| {
                (
                    n.netns.clone(),
                    n.ip.to_string(),
                    n.pod_cidr.to_string(),
                    n.fabric_veth.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "wsb-demo-east-e1".into(),
                    "172.30.0.1".into(),
                    "10.1.1.0/24".into(),
                    "f1n0".into()
                ),
                (
                    "wsb-demo-east-e2".into(),
                    "172.30.0.2".into(),
                    "10.1.2.0/24".into(),
                    "f1n1".into()
                ),
                (
                    "wsb-demo-west-w1".into(),
                    "172.30.0.3".into(),
                    "10.2.1.0/24".into(),
                    "f2n0".into()
                ),
            ]
        );
        assert_eq!(plan.fabric_netns, "wsb-demo-fabric");
        assert_eq!(
            plan.pod_netns("east", "default", "web"),
            "wsb-demo-east-default-web"
        );
    }
}
