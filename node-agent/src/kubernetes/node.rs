//! This node's addressing from its Node object, and the other nodes as peers.
//!
//! The pod CIDR is `spec.podCIDRs` (first IPv4; `spec.podCIDR` on clusters that only set that),
//! which kube-controller-manager assigns with `--allocate-node-cidrs`. The node's address is the
//! first IPv4 `InternalIP` in `status.addresses`. Flags (`--pod-cidr`, `--node-ip`) win.
//!
//! The other nodes become the nodes table of the agent's state (see [`crate::peers`]), kept
//! current by a Node watch ([`super::watch`]), so nodes that join, leave or change their address
//! or pod CIDR are wired without a restart.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use kube::{Api, Client, ResourceExt};

use crate::peers::PeerNode;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading Node {node}: {source}")]
    Api {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("Node {node} does not exist: is --node-name (NODE_NAME) this node's Kubernetes name?")]
    Missing { node: String },
    #[error("Node {node} has no IPv4 pod CIDR (spec.podCIDRs / spec.podCIDR): run kube-controller-manager with --allocate-node-cidrs=true and --cluster-cidr so that nodes get one, or pass --pod-cidr")]
    NoPodCidr { node: String },
    #[error("Node {node} reports no IPv4 InternalIP in status.addresses: pass --node-ip")]
    NoInternalIp { node: String },
}

/// Where this node's pods live and how other nodes reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAddressing {
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
}

/// The node's first IPv4 pod CIDR.
pub fn pod_cidr_of(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .find_map(|cidr| cidr.parse::<Ipv4Net>().ok())
        .map(|cidr| cidr.trunc())
}

/// The node's first IPv4 InternalIP.
pub fn internal_ip_of(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|address| address.type_ == "InternalIP")
        .find_map(|address| address.address.parse().ok())
}

/// This node's addressing: the flags where given, the Node object for the rest.
pub fn addressing(
    node: &Node,
    pod_cidr: Option<Ipv4Net>,
    node_ip: Option<Ipv4Addr>,
) -> Result<NodeAddressing, NodeError> {
    let name = node.name_any();
    Ok(NodeAddressing {
        pod_cidr: pod_cidr
            .or_else(|| pod_cidr_of(node))
            .ok_or_else(|| NodeError::NoPodCidr { node: name.clone() })?,
        node_ip: node_ip
            .or_else(|| internal_ip_of(node))
            .ok_or(NodeError::NoInternalIp { node: name })?,
    })
}

/// Reads this node's Node object once (GET).
pub async fn read(client: &Client, name: &str) -> Result<Node, NodeError> {
    Api::<Node>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(|source| NodeError::Api {
            node: name.to_owned(),
            source,
        })?
        .ok_or_else(|| NodeError::Missing {
            node: name.to_owned(),
        })
}

/// This node's addressing, waiting up to `attempts` × `interval` for the Node to have it: a new
/// node gets its pod CIDR from kube-controller-manager shortly after it registers, and the API
/// server may not answer yet while the node boots.
pub async fn wait_for_addressing(
    client: &Client,
    name: &str,
    pod_cidr: Option<Ipv4Net>,
    node_ip: Option<Ipv4Addr>,
    attempts: u32,
    interval: Duration,
) -> Result<NodeAddressing, NodeError> {
    let mut attempt = 1;
    loop {
        let result = read(client, name)
            .await
            .and_then(|node| addressing(&node, pod_cidr, node_ip));
        match result {
            Ok(addressing) => return Ok(addressing),
            Err(error) if attempt < attempts => {
                tracing::warn!(%error, attempt, "this node's addressing is not available yet; retrying");
            }
            Err(error) => return Err(error),
        }
        attempt += 1;
        tokio::time::sleep(interval).await;
    }
}

/// The other nodes with a pod CIDR and an address, sorted by name: the nodes table's rows.
/// Nodes missing either are left out (see [`incomplete_nodes`]).
pub fn peers_of<'a>(nodes: impl IntoIterator<Item = &'a Node>, me: &str) -> Vec<PeerNode> {
    let mut peers: Vec<PeerNode> = nodes
        .into_iter()
        .filter(|node| node.name_any() != me)
        .filter_map(|node| {
            Some(PeerNode {
                name: node.name_any(),
                node_ip: internal_ip_of(node)?,
                pod_cidr: pod_cidr_of(node)?,
            })
        })
        .collect();
    peers.sort();
    peers
}

/// The other nodes [`peers_of`] leaves out because they have no IPv4 InternalIP or pod CIDR
/// (yet: a joining node gets its pod CIDR shortly after it registers), sorted.
pub fn incomplete_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>, me: &str) -> Vec<String> {
    let mut names: Vec<String> = nodes
        .into_iter()
        .filter(|node| node.name_any() != me)
        .filter(|node| internal_ip_of(node).is_none() || pod_cidr_of(node).is_none())
        .map(|node| node.name_any())
        .collect();
    names.sort();
    names
}

/// Keeps of a watched Node only what [`peers_of`] reads (its name, pod CIDRs and addresses):
/// every agent watches every Node, and their images, conditions and annotations are most of
/// them.
pub fn trim(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.spec = node.spec.take().map(|spec| NodeSpec {
        pod_cidr: spec.pod_cidr,
        pod_cidrs: spec.pod_cidrs,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDRs": cidrs},
            "status": {"addresses": addresses.iter().map(|(kind, address)| serde_json::json!({"type": kind, "address": address})).collect::<Vec<_>>()},
        }))
        .expect("node")
    }

    #[test]
    fn the_first_ipv4_pod_cidr_and_internal_ip_are_used() {
        let dual = node(
            "a",
            &["fd00::/64", "10.244.1.0/24"],
            &[
                ("Hostname", "a"),
                ("ExternalIP", "203.0.113.9"),
                ("InternalIP", "fd00::1"),
                ("InternalIP", "192.168.1.10"),
            ],
        );
        assert_eq!(
            addressing(&dual, None, None).expect("addressing"),
            NodeAddressing {
                pod_cidr: "10.244.1.0/24".parse().unwrap(),
                node_ip: "192.168.1.10".parse().unwrap(),
            }
        );
    }

    #[test]
    fn flags_win_and_only_what_is_missing_is_an_error() {
        let bare = node("a", &[], &[]);
        let given = addressing(
            &bare,
            Some("10.9.0.0/24".parse().unwrap()),
            Some("192.0.2.1".parse().unwrap()),
        );
        assert!(given.is_ok());
        let error =
            addressing(&bare, None, Some("192.0.2.1".parse().unwrap())).expect_err("no pod CIDR");
        assert!(
            error.to_string().contains("--allocate-node-cidrs"),
            "{error}"
        );
        let error =
            addressing(&bare, Some("10.9.0.0/24".parse().unwrap()), None).expect_err("no address");
        assert!(error.to_string().contains("--node-ip"), "{error}");
    }

    #[test]
    fn peers_are_the_other_complete_nodes() {
        let nodes = [
            node("a", &["10.244.0.0/24"], &[("InternalIP", "192.168.1.1")]),
            node("b", &["10.244.1.0/24"], &[("InternalIP", "192.168.1.2")]),
            node("c", &[], &[("InternalIP", "192.168.1.3")]),
        ];
        assert_eq!(
            peers_of(&nodes, "a"),
            vec![PeerNode {
                name: "b".into(),
                node_ip: "192.168.1.2".parse().unwrap(),
                pod_cidr: "10.244.1.0/24".parse().unwrap()
            }]
        );
        assert_eq!(incomplete_nodes(&nodes, "a"), vec!["c".to_owned()]);
    }

    #[test]
    fn a_trimmed_node_keeps_what_makes_it_a_peer() {
        let mut full: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b", "annotations": {"big": "x"}, "labels": {"pool": "gpu"}},
            "spec": {"podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "gpu", "effect": "NoSchedule"}]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "192.168.1.2"}],
                "images": [{"names": ["registry/very-large-image:1"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))
        .expect("node");
        let before = peers_of([&full], "a");
        trim(&mut full);
        assert_eq!(peers_of([&full], "a"), before);
        assert_eq!(before.len(), 1);
        let status = full.status.as_ref().expect("status");
        assert!(status.images.is_none() && status.conditions.is_none());
        assert!(full.metadata.annotations.is_none());
    }
}
