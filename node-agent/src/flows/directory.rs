//! Who owns an address, for naming both ends of a flow. Local endpoints come from the agent's
//! own records; everything else from a directory of the cluster's (and mesh's) endpoints — in
//! local mode a file the sandbox keeps current, in Kubernetes mode the endpoint watch.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// What flows say about one end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointMeta {
    pub ip: Ipv4Addr,
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub identity: u32,
    /// The labels policies select on: pod labels, namespace and namespace labels.
    #[serde(default)]
    pub security_labels: BTreeMap<String, String>,
    /// Named container ports: name → (protocol, port).
    #[serde(default)]
    pub named_ports: BTreeMap<String, (String, u16)>,
}

impl Default for EndpointMeta {
    fn default() -> Self {
        Self {
            ip: Ipv4Addr::UNSPECIFIED,
            cluster: String::new(),
            namespace: String::new(),
            pod: String::new(),
            node: String::new(),
            labels: BTreeMap::new(),
            identity: 0,
            security_labels: BTreeMap::new(),
            named_ports: BTreeMap::new(),
        }
    }
}

/// A known address re-checks the file this often (its owner may have changed). An unknown one
/// checks every time (a new pod's first flows must be named); misses are bounded by the rate at
/// which the datapath reports flows.
const RECHECK_KNOWN: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Directory {
    local: HashMap<Ipv4Addr, EndpointMeta>,
    /// Local endpoints by their host-side veth: who really sent a packet whose source lies.
    local_by_ifindex: HashMap<u32, Ipv4Addr>,
    file: Option<PathBuf>,
    /// (inode, modification time) of the version read: writers replace the file by rename, so
    /// the inode tells rewrites apart even within one timestamp tick.
    file_version: Option<(u64, SystemTime)>,
    last_checked: Option<Instant>,
    known: HashMap<Ipv4Addr, EndpointMeta>,
    /// Bumped whenever the directory's contents were re-read.
    generation: u64,
}

impl Directory {
    /// `file`: a JSON list of [`EndpointMeta`], re-read whenever it changes.
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            ..Self::default()
        }
    }

    /// Records a local endpoint behind its host-side veth `ifindex`.
    pub fn set_local(&mut self, ifindex: u32, meta: EndpointMeta) {
        self.local_by_ifindex.insert(ifindex, meta.ip);
        self.local.insert(meta.ip, meta);
    }

    pub fn remove_local(&mut self, ip: Ipv4Addr) {
        self.local.remove(&ip);
        self.local_by_ifindex.retain(|_, local| *local != ip);
    }

    /// The local endpoint behind host-side veth `ifindex`, whatever address its packet carried.
    pub fn local_behind(&mut self, ifindex: u32) -> Option<EndpointMeta> {
        let ip = *self.local_by_ifindex.get(&ifindex)?;
        self.lookup(ip)
    }

    /// The directory's entry (richer: it has labels) or the local record.
    pub fn lookup(&mut self, ip: Ipv4Addr) -> Option<EndpointMeta> {
        let fresh_enough = self.known.contains_key(&ip)
            && self
                .last_checked
                .is_some_and(|checked| checked.elapsed() < RECHECK_KNOWN);
        if !fresh_enough {
            self.last_checked = Some(Instant::now());
            self.refresh();
        }
        self.known.get(&ip).or_else(|| self.local.get(&ip)).cloned()
    }

    /// Every endpoint the directory knows (re-reading it if it changed), and its generation.
    pub fn all(&mut self) -> (u64, Vec<EndpointMeta>) {
        self.refresh();
        self.last_checked = Some(Instant::now());
        (self.generation, self.known.values().cloned().collect())
    }

    fn refresh(&mut self) {
        let Some(path) = &self.file else {
            return;
        };
        let version = std::fs::metadata(path)
            .and_then(|m| Ok((m.ino(), m.modified()?)))
            .ok();
        if version.is_none() || version == self.file_version {
            return;
        }
        match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<Vec<EndpointMeta>>(&bytes).map_err(|e| e.to_string())
            }) {
            Ok(entries) => {
                self.known = entries.into_iter().map(|meta| (meta.ip, meta)).collect();
                self.generation += 1;
                self.file_version = version;
            }
            // A half-written file is retried on the next lookup; the old view stays.
            Err(error) => {
                tracing::debug!(%error, path = %path.display(), "endpoint directory unreadable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ip: &str, pod: &str) -> EndpointMeta {
        EndpointMeta {
            ip: ip.parse().expect("ip"),
            pod: pod.into(),
            ..Default::default()
        }
    }

    #[test]
    fn local_records_answer_and_the_directory_file_wins_when_it_knows_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("endpoints.json");
        let mut directory = Directory::new(Some(file.clone()));
        directory.set_local(7, meta("10.1.1.1", "local-name"));
        assert_eq!(
            directory.lookup("10.1.1.1".parse().unwrap()).map(|m| m.pod),
            Some("local-name".into())
        );
        assert_eq!(directory.lookup("10.1.2.1".parse().unwrap()), None);

        let mut remote = meta("10.1.2.1", "remote");
        remote.labels.insert("app".into(), "model".into());
        std::fs::write(&file, serde_json::to_vec(&vec![remote.clone()]).unwrap()).expect("write");
        assert_eq!(directory.lookup("10.1.2.1".parse().unwrap()), Some(remote));
    }
}
