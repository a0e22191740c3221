//! A running sandbox as an [`Inventory`]: its pods, its nodes, and the policies of its
//! manifests, per cluster.

use weft_sandbox::Sandbox;

use super::inventory::{Inventory, NodeView, PodView, PolicyEntry};
use super::status::NodeProblem;
use weft_core::policy::evaluate::named_ports;

pub fn inventory(sandbox: &Sandbox) -> Inventory {
    let pods = sandbox
        .pods
        .iter()
        .map(|pod| PodView {
            cluster: pod.cluster.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: pod.node.clone(),
            ip: Some(pod.ip),
            host_network: false,
            security_labels: sandbox.security_labels(pod),
            named_ports: named_ports(pod.ports.iter().map(|port| {
                (
                    port.name.as_deref(),
                    Some(port.protocol.as_str()),
                    port.port,
                )
            })),
        })
        .collect();
    let nodes = sandbox
        .plan
        .nodes
        .iter()
        .map(|node| NodeView {
            cluster: node.cluster.clone(),
            name: node.name.clone(),
            ip: node.ip,
        })
        .collect();
    let policies = sandbox
        .objects
        .iter()
        .flat_map(|(cluster, objects)| {
            objects
                .iter()
                .filter_map(move |object| PolicyEntry::check(cluster, object))
        })
        .collect();
    Inventory {
        source: "this sandbox".into(),
        pods,
        nodes,
        policies,
    }
}

/// What the sandbox's agents report about their enforcement (`policy-enforcement.json` in each
/// node's state directory): the nodes whose policy in force is not the policies as written.
pub fn node_problems(sandbox: &Sandbox) -> Vec<NodeProblem> {
    sandbox
        .plan
        .nodes
        .iter()
        .filter_map(|node| {
            let path = sandbox
                .node_state_dir(&node.cluster, &node.name)
                .join("policy-enforcement.json");
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
            // Its policy problem, then every map it found full that the problem does not
            // already name.
            let problem = report["problem"].as_str();
            let full_maps = report["full_maps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|full| full["message"].as_str())
                .filter(|message| !problem.is_some_and(|problem| problem.contains(message)));
            let problems: Vec<&str> = problem.into_iter().chain(full_maps).collect();
            if problems.is_empty() {
                return None;
            }
            let problem = problems.join("; ");
            Some(NodeProblem {
                cluster: node.cluster.clone(),
                node: node.name.clone(),
                problem,
            })
        })
        .collect()
}
