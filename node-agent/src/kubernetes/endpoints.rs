//! Publishes this node's endpoints as `WeftEndpoint` objects: one per pod the agent wired
//! (named and namespaced as the pod, owned by it so that Kubernetes garbage-collects it with the
//! pod), written by server-side apply with field manager `weft-agent`, and deleted when the pod
//! is released (CNI DEL). Other agents read them to name and place this node's pods; the
//! operator counts them to collect unused identities.
//!
//! The source of truth is the node's endpoint records, which the agent persists before it
//! answers a CNI request (`<state dir>/endpoints/<container>.json`): the publisher compares them
//! with what it applied every [`RESYNC`], so it needs no hook in the CNI path and catches up by
//! itself after a restart or an API server outage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use weft_core::identity::ReservedIdentity;
use weft_crds::endpoint::{EndpointState, Enforcement, WeftEndpointStatus};
use weft_crds::status::{conditions, Condition, Finding, Outcome};
use weft_crds::WeftEndpoint;

use super::FIELD_MANAGER;
use crate::node::EndpointRecord;
use crate::policy::EnforcementReport;

/// How often the records are compared with what was published.
pub const RESYNC: Duration = Duration::from_secs(1);

/// `namespace/name` of a pod and of its WeftEndpoint.
pub type PodKey = (String, String);

/// The node's endpoint records as persisted; unreadable files (a write in progress) are skipped
/// until the next pass.
pub fn read_records(records_dir: &Path) -> Vec<EndpointRecord> {
    let Ok(entries) = std::fs::read_dir(records_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .filter_map(|path| std::fs::read(path).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect()
}

/// The WeftEndpoint for `record`, owned by `pod` (which must be the record's pod).
pub fn desired_endpoint(record: &EndpointRecord, pod: &Pod, node: &str) -> Value {
    let named_ports: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "TCP",
                "UDP" => "UDP",
                // SCTP: policies cannot name it (the datapath does not enforce SCTP).
                _ => return None,
            };
            Some(json!({"name": port.name.as_ref()?, "port": port.container_port, "protocol": protocol}))
        })
        .collect();
    let mut spec = json!({
        "ips": [record.ip.to_string()],
        "identity": record.identity,
        "nodeName": node,
    });
    if !named_ports.is_empty() {
        spec["namedPorts"] = Value::from(named_ports);
    }
    json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "WeftEndpoint",
        "metadata": {
            "name": record.pod.name,
            "namespace": record.pod.namespace,
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.name_any(),
                "uid": pod.uid().unwrap_or_default(),
            }],
        },
        "spec": spec,
    })
}

use weft_crds::endpoint::{MAP_FULL, POLICY_NOT_ENFORCED};

/// What the agent says of an endpoint in its `WeftEndpoint` status: where it is in its life
/// (`state`), whether policy isolates it (`enforcement`, from the node's enforcement report), and
/// kstatus conditions — `Ready=True` (`Enforced`) when the pod has its identity and the node
/// enforces the cluster's policies as written; `Ready=False`, `Reconciling=True` while it waits
/// for its identity or the node's first policy computation; `Ready=False`, `Stalled=True`
/// (`PolicyNotEnforced`, with the node's problem) when the node keeps an older policy or
/// fails closed because the current one cannot be enforced, which needs a person.
/// `previous`: the conditions the object carries, whose transition times are kept.
pub fn desired_status(
    record: &EndpointRecord,
    node: &str,
    report: Option<&EnforcementReport>,
    previous: &[Condition],
    now: &Time,
) -> WeftEndpointStatus {
    let waiting_for_identity = record.identity == ReservedIdentity::Init.id();
    let isolation = report.and_then(|report| report.endpoints.get(&record.ip));
    let valid = format!("wired by the agent of node {node}");
    let full_maps: Vec<&str> = report
        .iter()
        .flat_map(|report| &report.full_maps)
        .filter(|full| crate::map_pressure::affects_endpoints(&full.map))
        .map(|full| full.message.as_str())
        .collect();
    let outcome = if waiting_for_identity {
        Outcome::Waiting {
            valid,
            waiting: Finding::new(
                "WaitingForIdentity",
                "the pod's security identity is not known yet (the operator allocates a WeftIdentity for its labels); until then it has the init identity",
            ),
        }
    } else if !full_maps.is_empty() {
        Outcome::Degraded {
            valid,
            problem: Finding::new(
                MAP_FULL,
                format!(
                    "{}; what does not fit is denied until it does",
                    full_maps.join("; ")
                ),
            ),
        }
    } else {
        match (report, isolation) {
            (
                Some(EnforcementReport {
                    problem: Some(problem),
                    ..
                }),
                _,
            ) => Outcome::Degraded {
                valid,
                // The agent's own words, as `weftctl policy status` shows them per node.
                problem: Finding::new(POLICY_NOT_ENFORCED, problem.clone()),
            },
            (Some(_), Some(isolation)) => Outcome::Ready {
                valid,
                ready: Finding::new(
                    "Enforced",
                    format!(
                        "identity {}; policy isolates {}",
                        record.identity,
                        match (isolation.ingress, isolation.egress) {
                            (true, true) => "ingress and egress",
                            (true, false) => "ingress",
                            (false, true) => "egress",
                            (false, false) => "neither direction: all traffic is allowed",
                        }
                    ),
                ),
            },
            _ => Outcome::Waiting {
                valid,
                waiting: Finding::new(
                    "PolicyPending",
                    "the node has not computed the endpoint's policy yet",
                ),
            },
        }
    };
    WeftEndpointStatus {
        observed_generation: None,
        conditions: conditions(None, &outcome, &[], previous, now),
        state: Some(if waiting_for_identity {
            EndpointState::WaitingForIdentity
        } else if matches!(outcome, Outcome::Ready { .. } | Outcome::Degraded { .. }) {
            EndpointState::Ready
        } else {
            EndpointState::Regenerating
        }),
        enforcement: isolation.map(|isolation| Enforcement {
            ingress: isolation.ingress,
            egress: isolation.egress,
            policy_revision: None,
        }),
    }
}

/// Server-side applies `status` to the endpoint's `/status` subresource.
pub async fn apply_status(
    client: &Client,
    (namespace, name): &PodKey,
    status: &WeftEndpointStatus,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "WeftEndpoint",
        "status": status,
    });
    Api::<WeftEndpoint>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
}

/// Server-side applies `endpoint` (from [`desired_endpoint`]).
pub async fn apply(client: &Client, endpoint: &Value) -> Result<(), kube::Error> {
    let namespace = endpoint["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    let name = endpoint["metadata"]["name"].as_str().unwrap_or_default();
    Api::<WeftEndpoint>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(endpoint),
        )
        .await
        .map(|_| ())
}

/// Deletes a pod's WeftEndpoint; with `uid`, only that object (not one another node's agent
/// wrote since for a new pod of the same name). Gone already is fine.
pub async fn delete(
    client: &Client,
    (namespace, name): &PodKey,
    uid: Option<String>,
) -> Result<(), kube::Error> {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match Api::<WeftEndpoint>::namespaced(client.clone(), namespace)
        .delete(name, &params)
        .await
    {
        Ok(_) => Ok(()),
        // 404: gone; 409: the precondition failed, so it is someone else's now.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

/// Keeps the cluster's WeftEndpoints for this node equal to the node's records.
pub struct Publisher {
    pub client: Client,
    pub node: String,
    pub records_dir: PathBuf,
    /// This node's pods.
    pub pods: Store<Pod>,
    /// The cluster's WeftEndpoints.
    pub endpoints: Store<WeftEndpoint>,
    /// The policy engine's enforcement report (`crate::policy::ENFORCEMENT_REPORT`).
    pub report: PathBuf,
}

/// What the publisher last wrote, so that it writes only what changed.
#[derive(Default)]
pub struct Published {
    specs: BTreeMap<PodKey, Value>,
    statuses: BTreeMap<PodKey, WeftEndpointStatus>,
}

impl Published {
    /// Whether nothing is recorded as published.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty() && self.statuses.is_empty()
    }
}

impl Publisher {
    /// Runs until the process stops.
    pub async fn run(self) {
        let _ = self.pods.wait_until_ready().await;
        let _ = self.endpoints.wait_until_ready().await;
        let mut applied = Published::default();
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.pass(&mut applied).await;
        }
    }

    /// One comparison: applies what changed, deletes what is no longer wired here.
    pub async fn pass(&self, applied: &mut Published) {
        let records = read_records(&self.records_dir);
        let report = EnforcementReport::read(&self.report);
        let wanted: BTreeSet<PodKey> = records
            .iter()
            .map(|record| (record.pod.namespace.clone(), record.pod.name.clone()))
            .collect();
        for record in &records {
            let key = (record.pod.namespace.clone(), record.pod.name.clone());
            let reference = ObjectRef::<Pod>::new(&key.1).within(&key.0);
            // Not seen yet (the pod watch lags the CNI request): the next pass will do.
            let Some(pod) = self.pods.get(&reference) else {
                continue;
            };
            let desired = desired_endpoint(record, &pod, &self.node);
            if applied.specs.get(&key) != Some(&desired) {
                match apply(&self.client, &desired).await {
                    Ok(()) => {
                        tracing::debug!(pod = %format!("{}/{}", key.0, key.1), identity = record.identity, "WeftEndpoint applied");
                        applied.specs.insert(key.clone(), desired);
                    }
                    Err(error) => {
                        tracing::warn!(
                            pod = %format!("{}/{}", key.0, key.1),
                            %error,
                            "cannot write the pod's WeftEndpoint; retrying"
                        );
                        continue;
                    }
                }
            }
            // What was written last, else what the object carries (after a restart).
            let current = applied.statuses.get(&key).cloned().or_else(|| {
                self.endpoints
                    .get(&ObjectRef::new(&key.1).within(&key.0))
                    .and_then(|endpoint| endpoint.status.clone())
            });
            let previous = current
                .as_ref()
                .map(|status| status.conditions.as_slice())
                .unwrap_or_default();
            let status = desired_status(
                record,
                &self.node,
                report.as_ref(),
                previous,
                &Time(Timestamp::now()),
            );
            if current.as_ref() == Some(&status) {
                continue;
            }
            match apply_status(&self.client, &key, &status).await {
                Ok(()) => {
                    applied.statuses.insert(key, status);
                }
                Err(error) => tracing::warn!(
                    pod = %format!("{}/{}", key.0, key.1),
                    %error,
                    "cannot write the status of the pod's WeftEndpoint; retrying"
                ),
            }
        }
        // Ours (applied by this run, or by an earlier one on this node) and not wired any more.
        let mut stale: BTreeMap<PodKey, Option<String>> = self
            .endpoints
            .state()
            .iter()
            .filter(|endpoint| endpoint.spec.node_name == self.node)
            .map(|endpoint| {
                (
                    (
                        endpoint.namespace().unwrap_or_default(),
                        endpoint.name_any(),
                    ),
                    endpoint.uid(),
                )
            })
            .collect();
        for key in applied.specs.keys() {
            stale.entry(key.clone()).or_insert(None);
        }
        stale.retain(|key, _| !wanted.contains(key));
        for (key, uid) in stale {
            match delete(&self.client, &key, uid).await {
                Ok(()) => {
                    tracing::debug!(pod = %format!("{}/{}", key.0, key.1), "WeftEndpoint deleted");
                    applied.specs.remove(&key);
                    applied.statuses.remove(&key);
                }
                Err(error) => tracing::warn!(
                    pod = %format!("{}/{}", key.0, key.1),
                    %error,
                    "cannot delete the pod's WeftEndpoint; retrying"
                ),
            }
        }
    }
}
