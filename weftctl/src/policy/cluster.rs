//! A cluster's API server as an [`Inventory`]: Pods, Namespaces, and the three policy kinds,
//! read with LIST requests. What follows (the evaluation, the table, the output) is the code
//! the sandbox uses.
//!
//! `explain` reads only the pods it needs (by name, or by address with the `status.podIP`
//! field selector), never every pod of the cluster; namespaces and policies are read whole.
//! Addresses that are nodes' are learnt from the pods read (`status.hostIP`, and host-network
//! pods, whose address is their node's); any other address that is no pod's is outside the
//! cluster: the world, where CIDR rules apply.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;
use weft_core::identity::{LabelFilter, SecurityLabels};
use weft_crds::endpoint::{MAP_FULL, POLICY_NOT_ENFORCED};
use weft_crds::status::CONDITION_READY;
use weft_crds::{WeftClusterwideNetworkPolicy, WeftEndpoint, WeftNetworkPolicy};

use super::explain::{explain, parse_target, Explanation};
use super::inventory::{Inventory, NodeView, PodView, PolicyEntry, ReportedStatus};
use super::status::{status, NodeProblem, StatusReport};
use weft_core::policy::evaluate::named_ports;

/// Page size of LIST requests, as kubectl uses.
const PAGE: u32 = 500;

/// How pods and policies of a real cluster are labelled in an [`Inventory`] (a sandbox has
/// several clusters; here there is one).
const THIS_CLUSTER: &str = "cluster";

/// Where to find the cluster: a kubeconfig file (or the default ones) and a context in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterTarget {
    /// `--kubeconfig`; otherwise `$KUBECONFIG`, then `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`; otherwise the kubeconfig's current context.
    pub context: Option<String>,
}

/// Whether a default kubeconfig is there to be used: `$KUBECONFIG`, `~/.kube/config`.
pub fn default_kubeconfig_exists() -> bool {
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) || home_kubeconfig().is_file()
}

/// Whether this runs in a pod with a service account (in-cluster configuration).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

fn home_kubeconfig() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".kube/config")
}

/// A client for `target`, and the name the output gives the cluster (the context's).
pub async fn connect(target: &ClusterTarget) -> anyhow::Result<(Client, String)> {
    // Two TLS providers are compiled in (through dependencies); choose before any client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = match &target.kubeconfig {
        Some(path) => Some(
            Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?,
        ),
        None if default_kubeconfig_exists() => Some(
            Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
        ),
        None => None,
    };
    let (config, name) = match kubeconfig {
        Some(kubeconfig) => {
            let name = target
                .context
                .clone()
                .or_else(|| kubeconfig.current_context.clone())
                .unwrap_or_else(|| THIS_CLUSTER.to_owned());
            let options = KubeConfigOptions {
                context: target.context.clone(),
                ..KubeConfigOptions::default()
            };
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .context("using the kubeconfig")?;
            (config, name)
        }
        None if target.context.is_some() => {
            bail!("--context names a kubeconfig context, but there is no kubeconfig: pass --kubeconfig PATH")
        }
        None => (
            kube::Config::incluster()
                .context("no kubeconfig found ($KUBECONFIG, ~/.kube/config) and not in a pod")?,
            "in-cluster".to_owned(),
        ),
    };
    let client = Client::try_from(config).context("creating the Kubernetes client")?;
    Ok((client, name))
}

/// `policy explain` against a cluster: the two ends (`from` a pod, `to` a pod or an address,
/// with `:PORT[/TCP|UDP]`), their namespaces and every policy, then the sandbox's evaluation.
pub async fn explain_from_cluster(
    client: &Client,
    from: &str,
    to: &str,
) -> anyhow::Result<Explanation> {
    let (target, _, _) = parse_target(to)?;
    let to_pods = async {
        match target.parse::<Ipv4Addr>() {
            Ok(ip) => pods_with_ip(client, ip).await,
            Err(_) => pods_named(client, &target).await,
        }
    };
    let (from_pods, to_pods, namespaces, policies) = tokio::try_join!(
        pods_named(client, from),
        to_pods,
        list_namespaces(client),
        list_policies(client, THIS_CLUSTER),
    )?;
    let mut pods = from_pods;
    for pod in to_pods {
        if !pods.iter().any(|p| {
            p.metadata.namespace == pod.metadata.namespace && p.name_any() == pod.name_any()
        }) {
            pods.push(pod);
        }
    }
    let inventory = inventory(THIS_CLUSTER, &pods, &namespaces, policies);
    explain(&inventory, from, to)
}

/// `policy status` against a cluster: every policy, with `Valid`/`Ready` from the conditions
/// the operator wrote and `status.selectedEndpoints`. Pods are read only for policies without
/// that count (Kubernetes `NetworkPolicy`, which has no Weft status), to count them here.
pub async fn status_from_cluster(client: &Client, cluster: &str) -> anyhow::Result<StatusReport> {
    let policies = list_policies(client, cluster).await?;
    let count_here = policies.iter().any(|policy| {
        policy.outcome.is_ok()
            && policy
                .reported
                .as_ref()
                .and_then(|r| r.selected_endpoints)
                .is_none()
    });
    let (pods, namespaces) = if count_here {
        let (pods, namespaces) = tokio::try_join!(
            list(
                Api::<Pod>::all(client.clone()),
                ListParams::default(),
                "pods"
            ),
            list_namespaces(client),
        )?;
        // Finished pods have no endpoint any more.
        let pods: Vec<Pod> = pods.into_iter().filter(|pod| !finished(pod)).collect();
        (pods, namespaces)
    } else {
        (Vec::new(), Vec::new())
    };
    let inventory = inventory(cluster, &pods, &namespaces, policies);
    let mut report = status(&inventory, true);
    // Optional: without it the policies' statuses still show (say, RBAC without weftendpoints).
    match list(
        Api::<WeftEndpoint>::all(client.clone()),
        ListParams::default(),
        "weftendpoints.weft.io",
    )
    .await
    {
        Ok(endpoints) => report.node_problems = node_problems(cluster, &endpoints),
        Err(error) => eprintln!(
            "warning: {error:#}; nodes that do not enforce the policies as written are not shown"
        ),
    }
    Ok(report)
}

/// The nodes whose agents report, in their endpoints' `Ready` condition, that they do not
/// enforce the policies as written: one line per node, with its problem.
pub fn node_problems(cluster: &str, endpoints: &[WeftEndpoint]) -> Vec<NodeProblem> {
    let mut by_node: BTreeMap<&str, &str> = BTreeMap::new();
    for endpoint in endpoints {
        let not_enforced = endpoint
            .status
            .iter()
            .flat_map(|status| status.conditions.iter())
            .find(|c| {
                c.type_ == CONDITION_READY
                    && (c.reason == POLICY_NOT_ENFORCED || c.reason == MAP_FULL)
            });
        if let Some(condition) = not_enforced {
            by_node
                .entry(endpoint.spec.node_name.as_str())
                .or_insert(condition.message.as_str());
        }
    }
    by_node
        .into_iter()
        .map(|(node, problem)| NodeProblem {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            problem: problem.to_owned(),
        })
        .collect()
}

/// The inventory of a cluster from what was read, its pods and nodes labelled `cluster`.
fn inventory(
    cluster: &str,
    pods: &[Pod],
    namespaces: &[Namespace],
    policies: Vec<PolicyEntry>,
) -> Inventory {
    let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .iter()
        .map(|namespace| (namespace.name_any(), namespace.labels().clone()))
        .collect();
    let mut nodes: Vec<NodeView> = Vec::new();
    for pod in pods {
        let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
        let host_ip = pod
            .status
            .as_ref()
            .and_then(|status| status.host_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        if let (Some(name), Some(ip)) = (node, host_ip) {
            if !nodes.iter().any(|n| n.name == name) {
                nodes.push(NodeView {
                    cluster: cluster.to_owned(),
                    name,
                    ip,
                });
            }
        }
    }
    Inventory {
        source: "the cluster".into(),
        pods: pods
            .iter()
            .map(|pod| pod_view(cluster, pod, &namespace_labels))
            .collect(),
        nodes,
        policies,
    }
}

fn pod_view(
    cluster: &str,
    pod: &Pod,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> PodView {
    let namespace = pod.namespace().unwrap_or_default();
    let empty = BTreeMap::new();
    let security_labels = SecurityLabels::for_pod(
        &namespace,
        pod.labels(),
        namespace_labels.get(&namespace).unwrap_or(&empty),
        &LabelFilter::default(),
    )
    .into_map();
    let spec = pod.spec.as_ref();
    let ports = spec
        .into_iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            Some((
                port.name.as_deref(),
                port.protocol.as_deref(),
                u16::try_from(port.container_port).ok()?,
            ))
        });
    PodView {
        cluster: cluster.to_owned(),
        name: pod.name_any(),
        node: spec
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default(),
        ip: pod_ipv4(pod),
        host_network: spec.and_then(|spec| spec.host_network) == Some(true),
        security_labels,
        named_ports: named_ports(ports),
        namespace,
    }
}

/// The pod's own IPv4 address: none on the host network (it is the node's), none once finished
/// (it was freed and may be another pod's now).
fn pod_ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    if pod.spec.as_ref().and_then(|spec| spec.host_network) == Some(true) || finished(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|pod_ip| pod_ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find_map(|ip| ip.parse().ok())
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Pods called `name` (`namespace/name`: in that namespace; `name`: in any).
async fn pods_named(client: &Client, reference: &str) -> anyhow::Result<Vec<Pod>> {
    let (api, name) = match reference.split_once('/') {
        Some((namespace, name)) => (Api::<Pod>::namespaced(client.clone(), namespace), name),
        None => (Api::<Pod>::all(client.clone()), reference),
    };
    let params = ListParams::default().fields(&format!("metadata.name={name}"));
    list(api, params, "pods").await
}

/// Pods whose address is `ip`: the pod owning it, or host-network pods of the node that has it.
async fn pods_with_ip(client: &Client, ip: Ipv4Addr) -> anyhow::Result<Vec<Pod>> {
    let params = ListParams::default().fields(&format!("status.podIP={ip}"));
    list(Api::<Pod>::all(client.clone()), params, "pods").await
}

async fn list_namespaces(client: &Client) -> anyhow::Result<Vec<Namespace>> {
    list(
        Api::<Namespace>::all(client.clone()),
        ListParams::default(),
        "namespaces",
    )
    .await
}

/// Every policy of the three kinds, converted as the operator converts them. Each object is
/// decoded on its own, so one that does not decode is reported invalid and hides no other.
async fn list_policies(client: &Client, cluster: &str) -> anyhow::Result<Vec<PolicyEntry>> {
    let (weft, clusterwide, kubernetes) = tokio::try_join!(
        list_objects::<WeftNetworkPolicy>(client),
        list_objects::<WeftClusterwideNetworkPolicy>(client),
        list_objects::<NetworkPolicy>(client),
    )?;
    let weft_kinds = weft.into_iter().chain(clusterwide).filter_map(|object| {
        let mut entry = PolicyEntry::check(cluster, &object)?;
        entry.reported = Some(ReportedStatus::of(&object));
        Some(entry)
    });
    let kubernetes_kind = kubernetes
        .iter()
        .filter_map(|object| PolicyEntry::check(cluster, object));
    Ok(weft_kinds.chain(kubernetes_kind).collect())
}

/// Every object of `K` in every namespace, as JSON with its `apiVersion` and `kind` (which
/// list items may omit).
async fn list_objects<K: Resource<DynamicType = ()>>(
    client: &Client,
) -> anyhow::Result<Vec<Value>> {
    let resource = ApiResource::erase::<K>(&());
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let what = if resource.group.is_empty() {
        resource.plural.clone()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    };
    let objects = list(api, ListParams::default(), &what).await?;
    objects
        .into_iter()
        .map(|object| {
            let mut value = serde_json::to_value(&object)?;
            value["apiVersion"] = Value::from(resource.api_version.clone());
            value["kind"] = Value::from(resource.kind.clone());
            Ok(value)
        })
        .collect()
}

/// A LIST, page by page.
async fn list<K>(api: Api<K>, params: ListParams, what: &str) -> anyhow::Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = params.limit(PAGE);
    let mut items = Vec::new();
    loop {
        let page = api.list(&params).await.map_err(|e| list_error(what, e))?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}

fn list_error(what: &str, error: kube::Error) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 404 && what.ends_with(weft_crds::GROUP) => anyhow!(
            "the API server does not serve {what}: are Weft's CRDs installed? (`weftctl crds | kubectl apply -f -`)"
        ),
        kube::Error::Api(status) if status.code == 403 => anyhow!(
            "not allowed to list {what}: {} (`policy explain` and `policy status` need get/list on pods, namespaces and the policy kinds)",
            status.message
        ),
        _ => anyhow::Error::new(error).context(format!("listing {what}")),
    }
}
