//! This node's pods by namespace and name, with the identity the cluster assigned each and the
//! labels policies select them by. It is what CNI ADD waits for: a pod's address is not known
//! to the cluster before ADD returns, so its identity cannot be found by address then, only by
//! name. Kept current by the Kubernetes adapter (the node-scoped Pod watch and the allocated
//! `WeftIdentity` objects) or, in local mode, by the sandbox before it runs ADD.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weft_core::identity::ReservedIdentity;

use crate::watched_file::WatchedFile;

/// One pod scheduled to this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocalPod {
    pub namespace: String,
    pub pod: String,
    /// `init` (5) until the cluster has allocated one for the pod's security labels.
    pub identity: u32,
    /// The labels policies select on: pod labels, namespace and namespace labels.
    #[serde(default)]
    pub security_labels: BTreeMap<String, String>,
    /// Named container ports: name → (protocol, port).
    #[serde(default)]
    pub named_ports: BTreeMap<String, (String, u16)>,
    /// Container ports the pod also takes on its node (`hostPort`).
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
}

/// A container port published on the pod's node (`ports[].hostPort`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostPort {
    /// `TCP` or `UDP` (SCTP is not balanced).
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
    /// `hostIP`: only this node address; `None` for every address of the node.
    #[serde(default)]
    pub host_ip: Option<std::net::Ipv4Addr>,
}

impl LocalPod {
    /// Whether the cluster has assigned the pod its identity.
    pub fn resolved(&self) -> bool {
        self.identity != ReservedIdentity::Init.id()
    }
}

/// The file of [`LocalPod`]s, re-read when it is replaced.
pub struct LocalPods {
    file: WatchedFile,
    pods: BTreeMap<(String, String), LocalPod>,
    /// Bumped whenever the contents changed.
    generation: u64,
}

impl LocalPods {
    /// `None`: no such source (identities then come from the endpoint directory alone).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            file: WatchedFile::new(path),
            pods: BTreeMap::new(),
            generation: 0,
        }
    }

    pub fn is_configured(&self) -> bool {
        self.file.path().is_some()
    }

    /// Re-reads the file if it was replaced; an entry that does not parse is skipped (and
    /// named in the log), the others still count.
    pub fn refresh(&mut self) {
        let Some(objects) = self.file.changed_objects("local pods") else {
            return;
        };
        let pods: BTreeMap<(String, String), LocalPod> = objects
            .into_iter()
            .filter_map(|object| match serde_json::from_value::<LocalPod>(object) {
                Ok(pod) => Some(((pod.namespace.clone(), pod.pod.clone()), pod)),
                Err(error) => {
                    tracing::warn!(%error, "a local pods entry is unreadable; skipped");
                    None
                }
            })
            .collect();
        if pods != self.pods {
            self.pods = pods;
            self.generation += 1;
        }
    }

    pub fn get(&self, namespace: &str, pod: &str) -> Option<&LocalPod> {
        self.pods.get(&(namespace.to_owned(), pod.to_owned()))
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_found_by_name_and_a_bad_entry_spoils_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("local-pods.json");
        let mut pods = LocalPods::new(Some(path.clone()));
        pods.refresh();
        assert_eq!(pods.get("ml", "trainer-0"), None);
        weft_core::files::write_atomically(
            &path,
            br#"[{"namespace":"ml","pod":"trainer-0","identity":5},
                 {"namespace":"ml","pod":"broken"},
                 {"namespace":"ml","pod":"trainer-1","identity":65792,
                  "security_labels":{"app":"trainer"},"named_ports":{"nccl":["TCP",29400]}}]"#,
        )
        .expect("write");
        pods.refresh();
        let generation = pods.generation();
        assert!(!pods.get("ml", "trainer-0").expect("listed").resolved());
        let resolved = pods.get("ml", "trainer-1").expect("listed");
        assert!(resolved.resolved());
        assert_eq!(resolved.named_ports["nccl"], ("TCP".into(), 29400));
        assert_eq!(pods.get("ml", "broken"), None);
        pods.refresh();
        assert_eq!(
            pods.generation(),
            generation,
            "unchanged file, same generation"
        );
    }
}
