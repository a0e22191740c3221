//! This node's addressing from its Node object, and the other nodes as peers.
//!
//! The pod CIDR is `spec.podCIDRs` (first IPv4; `spec.podCIDR` on clusters that only set that),
//! which kube-controller-manager assigns with `--allocate-node-cidrs`. The node's address is the
//! first IPv4 `InternalIP` in `status.addresses`. Flags (`--pod-cidr`, `--node-ip`) win.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

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

/// The other nodes with a pod CIDR and an address, as (node IP, pod CIDR), sorted. Nodes
/// missing either are left out with a warning: their pods are unreachable until they have both
/// and the agent restarts.
pub fn peers_of<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    me: &str,
) -> Vec<(Ipv4Addr, Ipv4Net)> {
    let mut peers = BTreeSet::new();
    for node in nodes {
        let name = node.name_any();
        if name == me {
            continue;
        }
        match (internal_ip_of(node), pod_cidr_of(node)) {
            (Some(ip), Some(cidr)) => {
                peers.insert((ip, cidr));
            }
            _ => tracing::warn!(
                node = %name,
                "node has no IPv4 InternalIP or pod CIDR yet; its pods are unreachable from here until it has both and this agent restarts"
            ),
        }
    }
    peers.into_iter().collect()
}

/// The other nodes now (LIST).
pub async fn list_peers(client: &Client, me: &str) -> Result<Vec<(Ipv4Addr, Ipv4Net)>, NodeError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| NodeError::Api {
            node: "(all)".into(),
            source,
        })?;
    Ok(peers_of(&nodes.items, me))
}

/// Watches Nodes and warns when the peer set differs from the one the datapath was built with:
/// peers are wired at start (ipcache, routes), so new or changed nodes need a restart.
pub async fn warn_on_peer_changes(client: Client, me: String, known: Vec<(Ipv4Addr, Ipv4Net)>) {
    let (store, writer) = reflector::store::<Node>();
    let mut last_warned = known.clone();
    let mut events = std::pin::pin!(reflector(
        writer,
        watcher(Api::<Node>::all(client), watcher::Config::default())
            .default_backoff()
            .modify(|node| node.managed_fields_mut().clear()),
    ));
    while let Some(event) = events.next().await {
        match event {
            Err(error) => {
                tracing::warn!(%error, "watching Nodes failed; retrying with backoff");
                continue;
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
        }
        let now = peers_of(store.state().iter().map(AsRef::as_ref), &me);
        if now != last_warned {
            let added: Vec<String> = now
                .iter()
                .filter(|peer| !known.contains(peer))
                .map(|(ip, cidr)| format!("{ip}={cidr}"))
                .collect();
            let removed: Vec<String> = known
                .iter()
                .filter(|peer| !now.contains(peer))
                .map(|(ip, cidr)| format!("{ip}={cidr}"))
                .collect();
            if added.is_empty() && removed.is_empty() {
                tracing::info!("the cluster's nodes are back to those this agent started with");
            } else {
                tracing::warn!(
                    added = ?added,
                    removed = ?removed,
                    "the cluster's nodes changed; restart this agent to route to new nodes' pods and forget removed ones"
                );
            }
            last_warned = now;
        }
    }
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
            vec![(
                "192.168.1.2".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap()
            )]
        );
    }
}
