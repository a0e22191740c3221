//! Security identities of the sandbox's pods: allocated per cluster from their labels, released
//! when no pod uses them, recomputed when labels change.

use super::*;

impl Sandbox {
    pub(crate) fn identities_path(&self, cluster: &str) -> PathBuf {
        self.run_dir
            .join("identities")
            .join(format!("{cluster}.json"))
    }

    /// The pod's identity, counting it as a user, from the cluster's persisted allocator (the
    /// operator's job in a cluster; the sandbox's here).
    pub(crate) fn acquire_identity(
        &self,
        cluster: &str,
        cluster_id: u16,
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
    ) -> Result<u32, SandboxError> {
        let path = self.identities_path(cluster);
        let id = ClusterId::new(u64::from(cluster_id))
            .map_err(|e| SandboxError::Invalid(e.to_string()))?;
        let identity_error =
            |e: IdentityError| SandboxError::Invalid(format!("identity allocation failed: {e}"));
        // `save` creates the directory on the first allocation.
        let mut allocator = IdentityAllocator::load_or_new(&path, id).map_err(identity_error)?;
        let labels =
            SecurityLabels::from_map(self.pod_security_labels(cluster, namespace, pod_labels));
        let identity = allocator.acquire(&labels).map_err(identity_error)?;
        allocator.collect_garbage(std::time::SystemTime::now(), IDENTITY_GRACE);
        allocator.save(&path).map_err(identity_error)?;
        Ok(identity)
    }

    pub(crate) fn release_identity(&self, pod: &PodState) {
        let Some(cluster_id) = self
            .plan
            .nodes
            .iter()
            .find(|n| n.cluster == pod.cluster)
            .map(|n| n.cluster_id)
        else {
            return;
        };
        let path = self.identities_path(&pod.cluster);
        let released = ClusterId::new(u64::from(cluster_id))
            .map_err(|e| e.to_string())
            .and_then(|id| IdentityAllocator::load_or_new(&path, id).map_err(|e| e.to_string()))
            .and_then(|mut allocator| {
                allocator.release(pod.identity).map_err(|e| e.to_string())?;
                allocator.collect_garbage(std::time::SystemTime::now(), IDENTITY_GRACE);
                allocator.save(&path).map_err(|e| e.to_string())
            });
        if let Err(error) = released {
            tracing::warn!(%error, pod = %pod.name, "cannot release the pod's identity");
        }
    }

    /// Gives every pod of `cluster` the identity its labels and its namespace's labels stand
    /// for now (after a relabel), as the operator would: the new one is acquired before the
    /// old one is released. The agents follow through the endpoint directory. Returns the
    /// pods whose identity changed.
    pub(crate) fn reidentify(&mut self, cluster: &str) -> Result<Vec<String>, SandboxError> {
        let Some(cluster_id) = self.plan.cluster_id(cluster) else {
            return Ok(Vec::new());
        };
        let mut changed = Vec::new();
        for index in 0..self.pods.len() {
            let pod = self.pods[index].clone();
            if pod.cluster != cluster {
                continue;
            }
            let identity =
                self.acquire_identity(cluster, cluster_id, &pod.namespace, &pod.labels)?;
            if identity == pod.identity {
                // Acquired once more above: give that use back.
                self.release_identity(&pod);
                continue;
            }
            self.release_identity(&pod);
            self.pods[index].identity = identity;
            changed.push(format!("{}/{}", pod.namespace, pod.name));
        }
        Ok(changed)
    }

    /// The labels policies select a pod by: its labels (minus the ignore list), its namespace
    /// and its namespace's labels.
    pub fn security_labels(&self, pod: &PodState) -> BTreeMap<String, String> {
        self.pod_security_labels(&pod.cluster, &pod.namespace, &pod.labels)
    }

    pub(crate) fn pod_security_labels(
        &self,
        cluster: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let namespace_labels = self
            .namespaces
            .get(cluster)
            .and_then(|namespaces| namespaces.get(namespace))
            .cloned()
            .unwrap_or_default();
        SecurityLabels::for_pod(
            namespace,
            labels,
            &namespace_labels,
            &LabelFilter::default(),
        )
        .into_map()
    }
}
