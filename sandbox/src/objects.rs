//! `weftctl sandbox apply` and `delete`: Pods, Namespaces and other objects of manifest files, as
//! `kubectl` applies and deletes them.

use super::*;

impl Sandbox {
    /// Adds the Pods (and keeps the other objects) of a manifest file to a cluster. Services
    /// get their cluster IPs and node ports; a Service that cannot have the ones it asks for
    /// refuses the file before anything changes. As `kubectl apply`, a Namespace or Pod that
    /// exists is updated: new labels give its pods the identities they now stand for (which
    /// the agents and so the policies follow). A Pod's other fields cannot change (delete and
    /// apply it again).
    pub fn apply(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
    ) -> Result<Vec<String>, SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        let service_cidr = self.plan.service_cidr(&cluster);
        let mut read = Manifests::default();
        read.add_file(file)?;
        let mut trial = self.objects.get(&cluster).cloned().unwrap_or_default();
        record_all(&mut trial, &read.others, service_cidr).map_err(SandboxError::Invalid)?;
        let mut created = Vec::new();
        let exists = |sandbox: &Self, pod: &SandboxPod| {
            sandbox
                .pods
                .iter()
                .find(|p| {
                    p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name
                })
                .cloned()
        };
        // Pods that exist may change their labels only: refuse the file before anything else.
        for pod in &read.pods {
            if let Some(state) = exists(self, pod) {
                if state.node != pod.node || state.ports != pod.ports {
                    return Err(SandboxError::Invalid(format!(
                        "pod {}/{}: only labels of an existing pod can change (its node and ports cannot); delete it first",
                        pod.namespace, pod.name
                    )));
                }
            }
        }
        let updates: Vec<&SandboxPod> = read
            .pods
            .iter()
            .filter(|pod| exists(self, pod).is_some())
            .collect();
        if !read.namespaces.is_empty() || !updates.is_empty() {
            let namespaces = read.namespaces.clone();
            let target = cluster.clone();
            let relabelled: Vec<SandboxPod> = updates.iter().map(|pod| (*pod).clone()).collect();
            let changed = self.try_commit(|fresh| {
                let known = fresh.namespaces.entry(target.clone()).or_default();
                let mut lines = Vec::new();
                for (name, labels) in &namespaces {
                    lines.push(match known.insert(name.clone(), labels.clone()) {
                        None => format!("namespace/{name} created"),
                        Some(old) if old == *labels => format!("namespace/{name} unchanged"),
                        Some(_) => format!("namespace/{name} configured"),
                    });
                }
                for pod in &relabelled {
                    if let Some(state) = fresh.pods.iter_mut().find(|p| {
                        p.cluster == target && p.namespace == pod.namespace && p.name == pod.name
                    }) {
                        lines.push(if state.labels == pod.labels {
                            format!("pod/{} unchanged", pod.name)
                        } else {
                            state.labels = pod.labels.clone();
                            format!("pod/{} configured", pod.name)
                        });
                    }
                }
                let moved = fresh.reidentify(&target)?;
                lines.extend(
                    moved
                        .into_iter()
                        .map(|pod| format!("pod/{pod}: new identity")),
                );
                Ok(lines)
            })?;
            created.extend(changed);
        }
        for pod in &read.pods {
            if updates.iter().any(|updated| std::ptr::eq(*updated, pod)) {
                continue;
            }
            self.create_pod(&cluster, pod)?;
            if let Some(state) = self.pods.last().cloned() {
                self.commit(|fresh| fresh.pods.push(state))?;
            }
            created.push(format!("pod/{} created", pod.name));
        }
        // As `kubectl apply`: an object with the same kind, namespace and name is replaced.
        // Allocation is redone on the fresh state, under the lock.
        let recorded = self.try_commit(|fresh| {
            let objects = fresh.objects.entry(cluster.clone()).or_default();
            record_all(objects, &read.others, service_cidr).map_err(SandboxError::Invalid)
        })?;
        for object in &recorded {
            let (kind, _, name) = object_key(object);
            let kind = if kind.is_empty() {
                "object".to_owned()
            } else {
                kind.to_lowercase()
            };
            let allocated = match object.pointer("/spec/clusterIP").and_then(|ip| ip.as_str()) {
                Some(ip) if services::is_service(object) => format!(" (clusterIP {ip})"),
                _ => String::new(),
            };
            created.push(format!("{kind}/{name} recorded{allocated}"));
        }
        Ok(created)
    }

    /// Removes the objects and Pods of a manifest file: CNI DEL, then the pod's processes and
    /// namespace.
    pub fn delete(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
    ) -> Result<Vec<String>, SandboxError> {
        let mut lines = Vec::new();
        self.delete_with_grace(cluster, file, Duration::ZERO, |line| {
            lines.push(line.to_owned())
        })?;
        Ok(lines)
    }

    /// As `delete`, but the pods first terminate for `grace` (as `kubectl delete
    /// --grace-period`): their endpoints turn not-ready so Services send them no new
    /// connections, while the connections they have go on. `report` hears of each step as it
    /// happens.
    pub fn delete_with_grace(
        &mut self,
        cluster: Option<&str>,
        file: &Path,
        grace: Duration,
        mut report: impl FnMut(&str),
    ) -> Result<(), SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        let mut read = Manifests::default();
        read.add_file(file)?;
        let doomed: Vec<_> = read.others.iter().map(object_key).collect();
        if !doomed.is_empty() {
            let target = cluster.clone();
            self.commit(|fresh| {
                if let Some(objects) = fresh.objects.get_mut(&target) {
                    objects.retain(|object| !doomed.contains(&object_key(object)));
                }
            })?;
            for (kind, _, name) in &doomed {
                report(&format!("{}/{name} deleted", kind.to_lowercase()));
            }
        }
        let exists = |sandbox: &Self, pod: &SandboxPod| {
            sandbox
                .pods
                .iter()
                .any(|p| p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name)
        };
        if !grace.is_zero() {
            let mut draining = false;
            for pod in &read.pods {
                if exists(self, pod) {
                    self.set_terminating(Some(&cluster), &pod.namespace, &pod.name)?;
                    report(&format!(
                        "pod/{} terminating (grace period {} s)",
                        pod.name,
                        grace.as_secs_f64()
                    ));
                    draining = true;
                }
            }
            if draining {
                std::thread::sleep(grace);
                // Others may have changed the sandbox meanwhile.
                *self = Self::load(Some(&self.plan.name))?;
            }
        }
        for pod in &read.pods {
            let Some(index) = self.pods.iter().position(|p| {
                p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name
            }) else {
                report(&format!("pod/{} not found", pod.name));
                continue;
            };
            let state = self.pods.remove(index);
            self.remove_pod(&state)?;
            self.commit(|fresh| fresh.pods.retain(|p| p.container_id != state.container_id))?;
            report(&format!("pod/{} deleted", pod.name));
        }
        Ok(())
    }

    /// Marks a pod terminating: it keeps running, so established connections finish, but its
    /// endpoints become ready=false, serving=true, terminating=true.
    pub fn set_terminating(
        &mut self,
        cluster: Option<&str>,
        namespace: &str,
        pod: &str,
    ) -> Result<(), SandboxError> {
        let cluster = self.cluster_name(cluster)?;
        self.try_commit(|fresh| {
            let state = fresh
                .pods
                .iter_mut()
                .find(|p| p.cluster == cluster && p.namespace == namespace && p.name == pod)
                .ok_or_else(|| {
                    SandboxError::Invalid(format!("no pod {namespace}/{pod} in cluster {cluster}"))
                })?;
            state.terminating = true;
            Ok(())
        })
    }
}

/// What names an object: kind, namespace (`default` when it names none, as kubectl reads
/// it; cluster-scoped kinds name none on either side), name.
pub(crate) fn object_key(object: &serde_json::Value) -> (String, String, String) {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(|value| value.as_str())
            .map(str::to_owned)
    };
    (
        text("/kind").unwrap_or_default(),
        text("/metadata/namespace").unwrap_or_else(|| "default".into()),
        text("/metadata/name").unwrap_or_default(),
    )
}

/// Stores objects in a cluster's `objects` as `kubectl apply` would, in order: one of the same
/// kind, namespace and name is replaced. A Service first gets its cluster IP and node ports
/// (kept from the one it replaces). Returns the objects as stored.
pub(crate) fn record_all(
    objects: &mut Vec<serde_json::Value>,
    new: &[serde_json::Value],
    service_cidr: Ipv4Net,
) -> Result<Vec<serde_json::Value>, String> {
    let mut allocations = services::Allocations::of(objects, service_cidr);
    let mut index: std::collections::HashMap<(String, String, String), usize> = objects
        .iter()
        .enumerate()
        .map(|(position, object)| (object_key(object), position))
        .collect();
    let mut stored = Vec::with_capacity(new.len());
    for object in new {
        let mut object = object.clone();
        if services::is_service(&object) {
            allocations.allocate(&mut object)?;
        }
        match index.get(&object_key(&object)) {
            Some(&position) => objects[position] = object.clone(),
            None => {
                index.insert(object_key(&object), objects.len());
                objects.push(object.clone());
            }
        }
        stored.push(object);
    }
    Ok(stored)
}
