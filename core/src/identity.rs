//! Security identities: numbers the datapath matches on instead of labels.
//!
//! An identity stands for a set of security-relevant labels ([`SecurityLabels`]): pod labels
//! minus per-pod/per-rollout noise ([`LabelFilter`]), plus the namespace and its labels.
//! 1–255 are [`ReservedIdentity`] numbers. Allocated identities are
//! `(cluster_id << 16) | local` with `local` in 256..=0xFFFF, so the identities of clusters in a
//! mesh never collide ([`cluster_of`]). [`IdentityAllocator`] hands them out, counts their
//! users, frees them a grace period after the last user is gone, and persists them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;

/// Identities with a fixed meaning, numbered as Cilium numbers them so flows read the same.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReservedIdentity {
    /// Nothing known about the address.
    Unknown = 0,
    /// The local node, and host-network pods.
    Host = 1,
    /// Outside the cluster.
    World = 2,
    /// Weft's health endpoints.
    Health = 4,
    /// An endpoint whose labels are not resolved to an identity yet.
    Init = 5,
    /// Another node of the cluster or mesh.
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
}

impl ReservedIdentity {
    pub const fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Host => "host",
            Self::World => "world",
            Self::Health => "health",
            Self::Init => "init",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Allocated identities: numbers for security-relevant label sets.
// ---------------------------------------------------------------------------------------------

/// The label carrying a pod's namespace, as Cilium names it.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels copied from a pod's namespace (`<prefix><key>`), as Cilium names them,
/// so selectors can select by namespace labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The first number a cluster allocates: 1–255 are reserved (see [`ReservedIdentity`]).
pub const FIRST_LOCAL_IDENTITY: u32 = 256;
/// The last number a cluster allocates: local numbers fill the low 16 bits.
pub const MAX_LOCAL_IDENTITY: u32 = 0xFFFF;
/// Where the cluster ID starts in an identity. It occupies bits 16..=24 (9 bits, cluster IDs
/// 1–511), so the identities of different clusters in a mesh never collide, and a peer can
/// tell from the number alone which cluster allocated it.
pub const CLUSTER_ID_SHIFT: u32 = 16;
/// Mask of the local (per-cluster) number in an identity.
pub const LOCAL_IDENTITY_MASK: u32 = 0xFFFF;

/// How many identities one cluster can allocate (65280).
pub const LOCAL_IDENTITY_CAPACITY: u32 = MAX_LOCAL_IDENTITY - FIRST_LOCAL_IDENTITY + 1;

/// The cluster that allocated `identity`: its bits 16 and up. Reserved identities (1–255)
/// belong to no cluster and give 0.
pub fn cluster_of(identity: u32) -> u16 {
    // A u32 shifted right by 16 always fits in a u16.
    (identity >> CLUSTER_ID_SHIFT) as u16
}

/// The per-cluster number of `identity`: its low 16 bits.
pub fn local_of(identity: u32) -> u32 {
    identity & LOCAL_IDENTITY_MASK
}

/// The identity of local number `local` in cluster `cluster_id`.
pub fn make_identity(cluster_id: ClusterId, local: u32) -> u32 {
    (u32::from(cluster_id.get()) << CLUSTER_ID_SHIFT) | (local & LOCAL_IDENTITY_MASK)
}

/// Which label keys do not take part in an identity. A pattern ending in `*` matches every key
/// starting with what precedes it; any other pattern matches the key exactly.
///
/// The filter is applied to pod label keys and to the namespace label keys as they end up in
/// the identity (`io.cilium.k8s.namespace.labels.<key>`), so either can be ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelFilter {
    patterns: BTreeSet<String>,
}

impl LabelFilter {
    /// Labels Kubernetes controllers stamp on pods that differ per pod, per replica set or per
    /// rollout. Taking them into identities would give every rollout (or every pod) its own
    /// identity, explode the identity space and churn every node's policy maps, while saying
    /// nothing policy cares about.
    pub const DEFAULT_IGNORED: &'static [&'static str] = &[
        // Deployment: a hash of the pod template, new for every ReplicaSet (every rollout).
        "pod-template-hash",
        // DaemonSet/StatefulSet: the ControllerRevision of the pod, new for every rollout.
        "controller-revision-hash",
        // Job (legacy and current key): the UID of the Job object, new for every Job run,
        // hence for every run of a CronJob.
        "controller-uid",
        "batch.kubernetes.io/controller-uid",
        // StatefulSet: the pod's own name, different for every replica.
        "statefulset.kubernetes.io/pod-name",
        // StatefulSet: the pod's ordinal, different for every replica.
        "apps.kubernetes.io/pod-index",
        // DaemonSet (legacy): the template generation, new for every rollout.
        "pod-template-generation",
        // Job (legacy and current key): the Job's name, which for CronJobs carries a
        // timestamp suffix and so is new for every run.
        "job-name",
        "batch.kubernetes.io/job-name",
        // Indexed Job: the pod's completion index, different for every pod.
        "batch.kubernetes.io/job-completion-index",
    ];

    /// A filter ignoring nothing.
    pub fn empty() -> Self {
        Self {
            patterns: BTreeSet::new(),
        }
    }

    /// Ignores keys matching `pattern` too (exact, or a prefix if it ends with `*`).
    pub fn add(&mut self, pattern: impl Into<String>) -> &mut Self {
        self.patterns.insert(pattern.into());
        self
    }

    /// Stops ignoring `pattern` (given as it was added); returns whether it was there.
    pub fn remove(&mut self, pattern: &str) -> bool {
        self.patterns.remove(pattern)
    }

    /// Whether `key` is left out of identities.
    pub fn is_ignored(&self, key: &str) -> bool {
        self.patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == pattern,
            })
    }

    /// The patterns, in order.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(String::as_str)
    }
}

impl Default for LabelFilter {
    /// Ignores [`LabelFilter::DEFAULT_IGNORED`].
    fn default() -> Self {
        Self {
            patterns: Self::DEFAULT_IGNORED
                .iter()
                .map(|key| (*key).to_owned())
                .collect(),
        }
    }
}

/// The security-relevant labels of an endpoint: what an identity stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecurityLabels(BTreeMap<String, String>);

impl SecurityLabels {
    /// The labels of a pod in `namespace`: its labels not ignored by `ignore`, the namespace as
    /// [`NAMESPACE_LABEL`], and each namespace label as `NAMESPACE_LABELS_PREFIX<key>`.
    ///
    /// Pod labels using the keys Weft derives from the namespace are dropped: otherwise a pod
    /// could claim labels of another namespace and be selected by policies meant for it.
    pub fn for_pod(
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
        ignore: &LabelFilter,
    ) -> Self {
        let mut labels = BTreeMap::new();
        for (key, value) in pod_labels {
            if key == NAMESPACE_LABEL || key.starts_with(NAMESPACE_LABELS_PREFIX) {
                tracing::warn!(
                    namespace,
                    label = %key,
                    "pod label uses a key reserved for namespace information; it is left out of the pod's identity"
                );
                continue;
            }
            if !ignore.is_ignored(key) {
                labels.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in namespace_labels {
            let key = format!("{NAMESPACE_LABELS_PREFIX}{key}");
            if !ignore.is_ignored(&key) {
                labels.insert(key, value.clone());
            }
        }
        labels.insert(NAMESPACE_LABEL.to_owned(), namespace.to_owned());
        Self(labels)
    }

    /// Labels taken as they are, e.g. read back from a `WeftIdentity`.
    pub fn from_map(labels: BTreeMap<String, String>) -> Self {
        Self(labels)
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The pod namespace, if these are a pod's labels.
    pub fn namespace(&self) -> Option<&str> {
        self.get(NAMESPACE_LABEL)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for SecurityLabels {
    /// `key=value` pairs joined by commas, in key order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "all {capacity} identities of cluster {cluster_id} are in use: release endpoints that are gone, \
         collect garbage with a shorter grace period, or ignore labels that differ per pod"
    )]
    Exhausted {
        cluster_id: ClusterId,
        capacity: u32,
    },
    #[error("identity {0} is not allocated here: release only identities returned by acquire")]
    Unknown(u32),
    #[error("identity {0} has no references left: release it once per acquire, not more")]
    NotInUse(u32),
    #[error(
        "identity {id} belongs to cluster {found}, not to this cluster {cluster_id}: \
         the identity store is another cluster's, or --cluster-id changed; use that cluster's \
         ID or a store of this cluster (identities are never renumbered)"
    )]
    ForeignCluster {
        id: u32,
        found: u16,
        cluster_id: ClusterId,
    },
    #[error(
        "identity {id} has local number {local}, outside {FIRST_LOCAL_IDENTITY}..={MAX_LOCAL_IDENTITY}: \
         fix or remove that record (1-255 are reserved and never stored)"
    )]
    OutOfRange { id: u32, local: u32 },
    #[error("identity {0} appears twice: keep one of the two records")]
    DuplicateId(u32),
    #[error(
        "identities {first} and {second} stand for the same labels {{{labels}}}: \
         keep the record endpoints use and remove the other (identities are never renumbered)"
    )]
    DuplicateLabels {
        first: u32,
        second: u32,
        labels: SecurityLabels,
    },
    #[error(
        "identity {0} has references and yet an unusedSince time: set references to 0 or remove unusedSince"
    )]
    Inconsistent(u32),
    #[error("cannot {action} identity store {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity store {} is not valid JSON of identity records: {source}; fix or restore it \
         (deleting it renumbers every identity)",
        path.display()
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot encode identity records as JSON: {0}")]
    Encode(serde_json::Error),
}

/// One allocated identity as stored: in the local identity file, and (id, labels) as the
/// `spec.id` / `spec.securityLabels` of a `WeftIdentity` object in Kubernetes mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRecord {
    pub id: u32,
    #[serde(rename = "securityLabels")]
    pub labels: BTreeMap<String, String>,
    /// Users (endpoints) holding the identity.
    #[serde(default)]
    pub references: u32,
    /// When the last user released it (unix seconds); absent while in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_since: Option<u64>,
}

/// The local identity file. (Files of earlier releases also hold `lastAllocated`, which the
/// search order no longer needs; it is ignored.)
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityFile {
    identities: Vec<IdentityRecord>,
}

/// Fixed SipHash keys: the hash must be the same in every process and every release, since it
/// is stored in labels and decides where a label set's number is searched first.
const HASH_KEYS: (u64, u64) = (0x7765_6674_2d69_6431, 0x7365_632d_6c61_6273);

fn labels_hash128(labels: &SecurityLabels) -> u128 {
    // Length-prefixed keys and values in key order: no two label sets encode alike.
    let mut bytes = Vec::new();
    for (key, value) in labels.iter() {
        bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
        bytes.extend_from_slice(value.as_bytes());
    }
    siphasher::sip128::SipHasher13::new_with_keys(HASH_KEYS.0, HASH_KEYS.1)
        .hash(&bytes)
        .as_u128()
}

/// A stable 128-bit hash of a label set as 32 lowercase hex digits (a valid label value). Only an
/// index: equal hashes are always confirmed by comparing the labels themselves.
pub fn labels_hash(labels: &SecurityLabels) -> String {
    format!("{:032x}", labels_hash128(labels))
}

/// The local number (in `FIRST_LOCAL_IDENTITY..=MAX_LOCAL_IDENTITY`) where the search for a
/// free number for `labels` starts: the first of [`search_order`].
pub fn preferred_local(labels: &SecurityLabels) -> u32 {
    // The remainder is below the capacity (65280), so it fits in a u32.
    FIRST_LOCAL_IDENTITY + (labels_hash128(labels) % u128::from(LOCAL_IDENTITY_CAPACITY)) as u32
}

/// The local numbers to try for `labels`, in order: from a number derived from the labels'
/// hash upwards, wrapping around, over the first `capacity` local numbers (all of them,
/// [`LOCAL_IDENTITY_CAPACITY`], outside tests). Every allocator searches in this order — the
/// operator's replicas, which then meet on one object when they race for a label set, and the
/// sandbox — so a label set gets the same number wherever it is first allocated.
pub fn search_order(labels: &SecurityLabels, capacity: u32) -> impl Iterator<Item = u32> {
    let capacity = capacity.clamp(1, LOCAL_IDENTITY_CAPACITY);
    // The remainder is below the capacity, so it fits in a u32.
    let start = (labels_hash128(labels) % u128::from(capacity)) as u32;
    (0..capacity).map(move |step| FIRST_LOCAL_IDENTITY + (start + step) % capacity)
}

#[derive(Clone, Debug)]
struct Entry {
    labels: SecurityLabels,
    references: u32,
    /// `None` while referenced, or when allocated but never used yet (the next garbage
    /// collection starts its grace period).
    unused_since: Option<SystemTime>,
}

/// Hands out the identities of one cluster: one number per security label set, stable while
/// the label set is in use, and freed a grace period after its last user is gone.
///
/// A label set's number is the first free one of its [`search_order`], as the operator
/// allocates them; a number is reused only after its garbage-collection grace period.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    cluster_id: ClusterId,
    /// Highest local number this allocator may hand out (below [`MAX_LOCAL_IDENTITY`] in tests).
    max_local: u32,
    /// Keyed by local number.
    by_local: BTreeMap<u32, Entry>,
    by_labels: BTreeMap<SecurityLabels, u32>,
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IdentityAllocator {
    pub fn new(cluster_id: ClusterId) -> Self {
        Self::with_max_local(cluster_id, MAX_LOCAL_IDENTITY)
    }

    fn with_max_local(cluster_id: ClusterId, max_local: u32) -> Self {
        Self {
            cluster_id,
            max_local,
            by_local: BTreeMap::new(),
            by_labels: BTreeMap::new(),
        }
    }

    /// An allocator with room for only `capacity` identities, to test exhaustion.
    #[cfg(test)]
    fn with_capacity(cluster_id: ClusterId, capacity: u32) -> Self {
        let max_local = (FIRST_LOCAL_IDENTITY + capacity.max(1) - 1).min(MAX_LOCAL_IDENTITY);
        Self::with_max_local(cluster_id, max_local)
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    /// How many identities are allocated.
    pub fn len(&self) -> usize {
        self.by_local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_local.is_empty()
    }

    fn capacity(&self) -> u32 {
        self.max_local - FIRST_LOCAL_IDENTITY + 1
    }

    /// The identity of `labels`, allocating a number if they have none yet. The same labels
    /// always get the same number while it is allocated. Does not count a user: see
    /// [`Self::acquire`].
    pub fn allocate(&mut self, labels: &SecurityLabels) -> Result<u32, IdentityError> {
        if let Some(&id) = self.by_labels.get(labels) {
            return Ok(id);
        }
        let local = search_order(labels, self.capacity())
            .find(|local| !self.by_local.contains_key(local))
            .ok_or(IdentityError::Exhausted {
                cluster_id: self.cluster_id,
                capacity: self.capacity(),
            })?;
        let id = make_identity(self.cluster_id, local);
        self.by_local.insert(
            local,
            Entry {
                labels: labels.clone(),
                references: 0,
                unused_since: None,
            },
        );
        self.by_labels.insert(labels.clone(), id);
        tracing::debug!(identity = id, labels = %labels, "allocated identity");
        Ok(id)
    }

    /// The identity of `labels`, counting one more user (e.g. an endpoint). An identity whose
    /// users were all gone but which is not collected yet is revived with its number.
    pub fn acquire(&mut self, labels: &SecurityLabels) -> Result<u32, IdentityError> {
        let id = self.allocate(labels)?;
        if let Some(entry) = self.by_local.get_mut(&local_of(id)) {
            entry.references = entry.references.saturating_add(1);
            entry.unused_since = None;
        }
        Ok(id)
    }

    /// Counts one user fewer of `identity`, now. See [`Self::release_at`].
    pub fn release(&mut self, identity: u32) -> Result<(), IdentityError> {
        self.release_at(identity, SystemTime::now())
    }

    /// Counts one user fewer of `identity`; when none is left it becomes unused since `now`,
    /// and [`Self::collect_garbage`] frees it a grace period later.
    pub fn release_at(&mut self, identity: u32, now: SystemTime) -> Result<(), IdentityError> {
        let entry = self
            .entry_mut(identity)
            .ok_or(IdentityError::Unknown(identity))?;
        if entry.references == 0 {
            return Err(IdentityError::NotInUse(identity));
        }
        entry.references -= 1;
        if entry.references == 0 {
            entry.unused_since = Some(now);
        }
        Ok(())
    }

    /// Frees the identities unused for at least `grace` at `now`, and returns them (in
    /// increasing order). Identities allocated but never acquired start their grace period here.
    pub fn collect_garbage(&mut self, now: SystemTime, grace: Duration) -> Vec<u32> {
        let mut freed = Vec::new();
        for (&local, entry) in &mut self.by_local {
            if entry.references > 0 {
                continue;
            }
            match entry.unused_since {
                None => entry.unused_since = Some(now),
                Some(since) => {
                    // A time in the future (clock stepped back) counts as unused for zero.
                    let unused_for = now.duration_since(since).unwrap_or(Duration::ZERO);
                    if unused_for >= grace {
                        freed.push(local);
                    }
                }
            }
        }
        let freed: Vec<u32> = freed
            .into_iter()
            .filter_map(|local| {
                let entry = self.by_local.remove(&local)?;
                self.by_labels.remove(&entry.labels);
                let id = make_identity(self.cluster_id, local);
                tracing::debug!(identity = id, labels = %entry.labels, "freed unused identity");
                Some(id)
            })
            .collect();
        freed
    }

    fn entry(&self, identity: u32) -> Option<&Entry> {
        if cluster_of(identity) != self.cluster_id.get() {
            return None;
        }
        self.by_local.get(&local_of(identity))
    }

    fn entry_mut(&mut self, identity: u32) -> Option<&mut Entry> {
        if cluster_of(identity) != self.cluster_id.get() {
            return None;
        }
        self.by_local.get_mut(&local_of(identity))
    }

    /// The identity allocated to `labels`, if any.
    pub fn identity_of(&self, labels: &SecurityLabels) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The labels `identity` stands for, if it is allocated here.
    pub fn labels_of(&self, identity: u32) -> Option<&SecurityLabels> {
        self.entry(identity).map(|entry| &entry.labels)
    }

    /// How many users hold `identity`, if it is allocated here.
    pub fn references(&self, identity: u32) -> Option<u32> {
        self.entry(identity).map(|entry| entry.references)
    }

    /// The allocated identities and their labels, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &SecurityLabels)> + '_ {
        self.by_local
            .iter()
            .map(|(&local, entry)| (make_identity(self.cluster_id, local), &entry.labels))
    }

    /// Every allocated identity as a record, in increasing order.
    pub fn to_records(&self) -> Vec<IdentityRecord> {
        self.by_local
            .iter()
            .map(|(&local, entry)| IdentityRecord {
                id: make_identity(self.cluster_id, local),
                labels: entry.labels.as_map().clone(),
                references: entry.references,
                unused_since: entry.unused_since.map(unix_seconds),
            })
            .collect()
    }

    /// An allocator holding `records`, with their numbers. Refuses, rather than renumbers,
    /// records of another cluster, outside the local range, or repeating an id or a label set.
    pub fn from_records(
        cluster_id: ClusterId,
        records: impl IntoIterator<Item = IdentityRecord>,
    ) -> Result<Self, IdentityError> {
        let mut allocator = Self::new(cluster_id);
        for record in records {
            let local = allocator.check_own(record.id)?;
            if record.references > 0 && record.unused_since.is_some() {
                return Err(IdentityError::Inconsistent(record.id));
            }
            if allocator.by_local.contains_key(&local) {
                return Err(IdentityError::DuplicateId(record.id));
            }
            let labels = SecurityLabels::from_map(record.labels);
            if let Some(&first) = allocator.by_labels.get(&labels) {
                return Err(IdentityError::DuplicateLabels {
                    first,
                    second: record.id,
                    labels,
                });
            }
            allocator.by_labels.insert(labels.clone(), record.id);
            allocator.by_local.insert(
                local,
                Entry {
                    labels,
                    references: record.references,
                    unused_since: record
                        .unused_since
                        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
                },
            );
        }
        Ok(allocator)
    }

    /// The local number of `identity` if it is a number this allocator may hand out.
    fn check_own(&self, identity: u32) -> Result<u32, IdentityError> {
        let found = cluster_of(identity);
        if found != self.cluster_id.get() {
            return Err(IdentityError::ForeignCluster {
                id: identity,
                found,
                cluster_id: self.cluster_id,
            });
        }
        let local = local_of(identity);
        if !(FIRST_LOCAL_IDENTITY..=self.max_local).contains(&local) {
            return Err(IdentityError::OutOfRange {
                id: identity,
                local,
            });
        }
        Ok(local)
    }

    /// Writes the identities to `path` as JSON, atomically: a temporary file in the same
    /// directory is written, flushed to disk and renamed over `path`, so a crash leaves either
    /// the old or the new file, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let file = IdentityFile {
            identities: self.to_records(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(IdentityError::Encode)?;
        json.push(b'\n');
        let io_error = |action| {
            let path = path.to_owned();
            move |source| IdentityError::Io {
                action,
                path,
                source,
            }
        };
        crate::files::write_atomically(path, &json).map_err(io_error("replace"))?;
        Ok(())
    }

    /// Reads identities written by [`Self::save`], checked as [`Self::from_records`] does.
    pub fn load(path: &Path, cluster_id: ClusterId) -> Result<Self, IdentityError> {
        let bytes = std::fs::read(path).map_err(|source| IdentityError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        let file: IdentityFile =
            serde_json::from_slice(&bytes).map_err(|source| IdentityError::Parse {
                path: path.to_owned(),
                source,
            })?;
        Self::from_records(cluster_id, file.identities)
    }

    /// Like [`Self::load`], but an absent file gives an empty allocator (first start).
    pub fn load_or_new(path: &Path, cluster_id: ClusterId) -> Result<Self, IdentityError> {
        match Self::load(path, cluster_id) {
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Self::new(cluster_id))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> SecurityLabels {
        SecurityLabels::for_pod(
            namespace,
            &map(labels),
            &map(&[("team", "a")]),
            &LabelFilter::default(),
        )
    }

    fn cluster(id: u64) -> ClusterId {
        ClusterId::new(id).expect("valid cluster ID")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn pod_labels_include_namespace_and_namespace_labels() {
        let labels = pod("shop", &[("app", "web")]);
        assert_eq!(
            labels.as_map(),
            &map(&[
                ("app", "web"),
                ("io.cilium.k8s.namespace.labels.team", "a"),
                ("io.kubernetes.pod.namespace", "shop"),
            ])
        );
        assert_eq!(labels.namespace(), Some("shop"));
    }

    #[test]
    fn pod_labels_cannot_claim_another_namespace() {
        let labels = pod(
            "shop",
            &[
                ("app", "web"),
                ("io.kubernetes.pod.namespace", "kube-system"),
                ("io.cilium.k8s.namespace.labels.team", "admins"),
            ],
        );
        assert_eq!(labels, pod("shop", &[("app", "web")]));
    }

    #[test]
    fn label_filter_is_configurable_with_prefixes() {
        let mut filter = LabelFilter::default();
        assert!(filter.is_ignored("pod-template-hash"));
        assert!(!filter.is_ignored("app"));
        filter.add("example.com/*").add("version");
        assert!(filter.is_ignored("example.com/build"));
        assert!(filter.is_ignored("version"));
        assert!(!filter.is_ignored("example.org/build"));
        assert!(filter.remove("pod-template-hash"));
        assert!(!filter.is_ignored("pod-template-hash"));
        assert!(!filter.remove("pod-template-hash"));
        assert!(!LabelFilter::empty().is_ignored("job-name"));

        filter.add("io.cilium.k8s.namespace.labels.kubernetes.io/*");
        let labels = SecurityLabels::for_pod(
            "shop",
            &map(&[("app", "web"), ("version", "3")]),
            &map(&[("kubernetes.io/metadata.name", "shop"), ("team", "a")]),
            &filter,
        );
        assert_eq!(
            labels.as_map(),
            &map(&[
                ("app", "web"),
                ("io.cilium.k8s.namespace.labels.team", "a"),
                ("io.kubernetes.pod.namespace", "shop"),
            ])
        );
    }

    #[test]
    fn same_labels_get_the_same_identity() {
        let mut allocator = IdentityAllocator::new(cluster(1));
        let web = pod("shop", &[("app", "web")]);
        let first = allocator.allocate(&web).expect("allocate");
        assert_eq!(allocator.allocate(&web).expect("allocate"), first);
        assert_eq!(allocator.acquire(&web).expect("acquire"), first);
        assert_eq!(allocator.identity_of(&web), Some(first));
        assert_eq!(allocator.labels_of(first), Some(&web));
        assert_eq!(allocator.len(), 1);
        let db = pod("shop", &[("app", "db")]);
        assert_ne!(allocator.allocate(&db).expect("allocate"), first);
        assert_eq!(allocator.iter().count(), 2);
    }

    #[test]
    fn ignored_labels_do_not_create_identities() {
        let mut allocator = IdentityAllocator::new(cluster(1));
        let a = pod("shop", &[("app", "web"), ("pod-template-hash", "5d9f")]);
        let b = pod("shop", &[("app", "web"), ("pod-template-hash", "77c4")]);
        assert_eq!(a, b);
        assert_eq!(
            allocator.acquire(&a).expect("acquire"),
            allocator.acquire(&b).expect("acquire")
        );
        assert_eq!(allocator.len(), 1);
    }

    #[test]
    fn namespace_and_namespace_labels_are_part_of_identity() {
        let mut allocator = IdentityAllocator::new(cluster(1));
        let in_shop = pod("shop", &[("app", "web")]);
        let in_blog = pod("blog", &[("app", "web")]);
        let in_shop_other_team = SecurityLabels::for_pod(
            "shop",
            &map(&[("app", "web")]),
            &map(&[("team", "b")]),
            &LabelFilter::default(),
        );
        let ids: BTreeSet<u32> = [in_shop, in_blog, in_shop_other_team]
            .iter()
            .map(|labels| allocator.allocate(labels).expect("allocate"))
            .collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn identities_carry_the_cluster_id() {
        let mut allocator = IdentityAllocator::new(cluster(3));
        let web = pod("shop", &[("app", "web")]);
        let id = allocator.allocate(&web).expect("allocate");
        assert_eq!(id, (3 << 16) | preferred_local(&web));
        assert_eq!(cluster_of(id), 3);
        assert_eq!(local_of(id), preferred_local(&web));
        assert_eq!(cluster_of(ReservedIdentity::World.id()), 0);
        let highest = make_identity(cluster(511), MAX_LOCAL_IDENTITY);
        assert_eq!(highest, (1 << 25) - 1);
        assert_eq!(cluster_of(highest), 511);
        // Another cluster's number is not ours, even if its low bits match.
        assert_eq!(allocator.labels_of((4 << 16) | local_of(id)), None);
    }

    #[test]
    fn a_label_set_gets_the_first_free_number_of_its_search_order() {
        // As the operator allocates: from the hash's number up, wrapping around. With room for
        // three, two of four label sets must start at the same number.
        let mut allocator = IdentityAllocator::with_capacity(cluster(1), 3);
        let apps: Vec<SecurityLabels> = ["a", "b", "c", "d"]
            .iter()
            .map(|app| pod("shop", &[("app", app)]))
            .collect();
        let start = |labels: &SecurityLabels| search_order(labels, 3).next().expect("a number");
        let (first, second) = (0..apps.len())
            .flat_map(|i| (i + 1..apps.len()).map(move |j| (i, j)))
            .find(|(i, j)| start(&apps[*i]) == start(&apps[*j]))
            .expect("two label sets share a start");
        let taken = allocator.acquire(&apps[first]).expect("acquire");
        assert_eq!(local_of(taken), start(&apps[first]), "its own start");
        let moved = allocator.acquire(&apps[second]).expect("acquire");
        let next = FIRST_LOCAL_IDENTITY + (start(&apps[second]) - FIRST_LOCAL_IDENTITY + 1) % 3;
        assert_eq!(local_of(moved), next, "the next number up, wrapping");
        // The full search order is the operator's: every number once, the preferred first.
        let order: Vec<u32> = search_order(&apps[0], LOCAL_IDENTITY_CAPACITY).collect();
        assert_eq!(order[0], preferred_local(&apps[0]));
        assert_eq!(order.len(), LOCAL_IDENTITY_CAPACITY as usize);
        assert_eq!(
            order.iter().collect::<BTreeSet<_>>().len(),
            LOCAL_IDENTITY_CAPACITY as usize
        );
    }

    #[test]
    fn exhaustion_is_an_error_and_wraps_to_freed_numbers() {
        let mut allocator = IdentityAllocator::with_capacity(cluster(1), 3);
        let ids: Vec<u32> = ["a", "b", "c"]
            .iter()
            .map(|app| {
                allocator
                    .acquire(&pod("shop", &[("app", app)]))
                    .expect("acquire")
            })
            .collect();
        let err = allocator
            .acquire(&pod("shop", &[("app", "d")]))
            .expect_err("no room left");
        assert!(matches!(err, IdentityError::Exhausted { capacity: 3, .. }));
        assert!(err.to_string().contains("all 3 identities of cluster 1"));
        // Existing label sets still resolve when full.
        assert_eq!(
            allocator
                .acquire(&pod("shop", &[("app", "a")]))
                .expect("acquire"),
            ids[0]
        );

        allocator.release_at(ids[1], at(0)).expect("release");
        allocator.collect_garbage(at(10), Duration::ZERO);
        let d = allocator
            .acquire(&pod("shop", &[("app", "d")]))
            .expect("wraps to the freed number");
        assert_eq!(d, ids[1]);
        assert_eq!(LOCAL_IDENTITY_CAPACITY, 65280);
    }

    #[test]
    fn garbage_is_collected_only_after_the_grace_period() {
        let grace = Duration::from_secs(600);
        let mut allocator = IdentityAllocator::new(cluster(1));
        let web = pod("shop", &[("app", "web")]);
        let id = allocator.acquire(&web).expect("acquire");
        allocator.acquire(&web).expect("acquire");
        allocator.release_at(id, at(1000)).expect("release");
        assert!(
            allocator.collect_garbage(at(5000), grace).is_empty(),
            "still used"
        );
        allocator.release_at(id, at(1000)).expect("release");
        assert!(matches!(
            allocator.release_at(id, at(1000)),
            Err(IdentityError::NotInUse(_))
        ));
        assert!(allocator.collect_garbage(at(1599), grace).is_empty());
        assert_eq!(allocator.collect_garbage(at(1600), grace), vec![id]);
        assert_eq!(allocator.identity_of(&web), None);
        assert!(matches!(
            allocator.release_at(id, at(1700)),
            Err(IdentityError::Unknown(_))
        ));
    }

    #[test]
    fn acquiring_before_collection_revives_the_same_number() {
        let grace = Duration::from_secs(600);
        let mut allocator = IdentityAllocator::new(cluster(1));
        let web = pod("shop", &[("app", "web")]);
        let id = allocator.acquire(&web).expect("acquire");
        allocator.release_at(id, at(1000)).expect("release");
        assert_eq!(allocator.acquire(&web).expect("acquire"), id);
        assert!(allocator.collect_garbage(at(9000), grace).is_empty());
        assert_eq!(allocator.references(id), Some(1));
    }

    #[test]
    fn allocated_but_never_acquired_identities_get_a_grace_period() {
        let grace = Duration::from_secs(600);
        let mut allocator = IdentityAllocator::new(cluster(1));
        let id = allocator
            .allocate(&pod("shop", &[("app", "web")]))
            .expect("allocate");
        assert!(allocator.collect_garbage(at(1000), grace).is_empty());
        assert_eq!(allocator.collect_garbage(at(1600), grace), vec![id]);
    }

    #[test]
    fn save_and_load_keep_numbers_and_references() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("identities.json");
        let mut allocator = IdentityAllocator::new(cluster(2));
        let web = pod("shop", &[("app", "web")]);
        let db = pod("shop", &[("app", "db")]);
        let gone = pod("shop", &[("app", "gone")]);
        let web_id = allocator.acquire(&web).expect("acquire");
        allocator.acquire(&web).expect("acquire");
        let db_id = allocator.acquire(&db).expect("acquire");
        allocator.release_at(db_id, at(1234)).expect("release");
        let gone_id = allocator.acquire(&gone).expect("acquire");
        allocator.release_at(gone_id, at(0)).expect("release");
        allocator.collect_garbage(at(10), Duration::from_secs(1));
        allocator.save(&path).expect("save");

        let json = std::fs::read_to_string(&path).expect("read");
        assert!(json.contains("\"securityLabels\""), "{json}");
        assert!(json.contains("\"unusedSince\": 1234"), "{json}");

        let mut loaded = IdentityAllocator::load(&path, cluster(2)).expect("load");
        assert_eq!(loaded.to_records(), allocator.to_records());
        assert_eq!(loaded.identity_of(&web), Some(web_id));
        assert_eq!(loaded.references(web_id), Some(2));
        assert_eq!(loaded.references(db_id), Some(0));
        // After the restart a new label set gets the number the operator would give it.
        let new = pod("shop", &[("app", "new")]);
        let next = loaded.acquire(&new).expect("acquire");
        assert_eq!(local_of(next), preferred_local(&new));
        assert_eq!(
            loaded.labels_of(gone_id),
            None,
            "collected before the restart"
        );
        // The grace period of the unused identity carries over.
        assert_eq!(
            loaded.collect_garbage(at(1234 + 60), Duration::from_secs(60)),
            vec![db_id]
        );

        // Saving again replaces the file, leaving no temporary files behind.
        loaded.save(&path).expect("save again");
        let entries = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(entries, 1);
    }

    #[test]
    fn load_of_a_missing_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("absent.json");
        assert!(matches!(
            IdentityAllocator::load(&path, cluster(1)),
            Err(IdentityError::Io { .. })
        ));
        let allocator = IdentityAllocator::load_or_new(&path, cluster(1)).expect("empty");
        assert!(allocator.is_empty());
        std::fs::write(&path, "not json").expect("write");
        assert!(matches!(
            IdentityAllocator::load_or_new(&path, cluster(1)),
            Err(IdentityError::Parse { .. })
        ));
    }

    fn record(id: u32, app: &str) -> IdentityRecord {
        IdentityRecord {
            id,
            labels: map(&[("app", app), ("io.kubernetes.pod.namespace", "shop")]),
            references: 1,
            unused_since: None,
        }
    }

    #[test]
    fn load_refuses_identities_of_another_cluster() {
        let err = IdentityAllocator::from_records(cluster(1), [record((2 << 16) | 300, "web")])
            .expect_err("foreign");
        assert!(matches!(
            err,
            IdentityError::ForeignCluster { found: 2, .. }
        ));
        assert!(err.to_string().contains("belongs to cluster 2"));

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("identities.json");
        let mut allocator = IdentityAllocator::new(cluster(2));
        allocator
            .acquire(&pod("shop", &[("app", "web")]))
            .expect("acquire");
        allocator.save(&path).expect("save");
        assert!(matches!(
            IdentityAllocator::load(&path, cluster(1)),
            Err(IdentityError::ForeignCluster { .. })
        ));
    }

    #[test]
    fn load_refuses_repeated_label_sets_and_ids() {
        let err = IdentityAllocator::from_records(
            cluster(1),
            [
                record((1 << 16) | 300, "web"),
                record((1 << 16) | 301, "web"),
            ],
        )
        .expect_err("duplicate labels");
        assert!(matches!(
            err,
            IdentityError::DuplicateLabels { first, second, .. }
                if first == (1 << 16) | 300 && second == (1 << 16) | 301
        ));
        assert!(matches!(
            IdentityAllocator::from_records(
                cluster(1),
                [
                    record((1 << 16) | 300, "web"),
                    record((1 << 16) | 300, "db")
                ],
            ),
            Err(IdentityError::DuplicateId(_))
        ));
        assert!(matches!(
            IdentityAllocator::from_records(cluster(1), [record((1 << 16) | 7, "web")]),
            Err(IdentityError::OutOfRange { local: 7, .. })
        ));
        let mut inconsistent = record((1 << 16) | 300, "web");
        inconsistent.unused_since = Some(5);
        assert!(matches!(
            IdentityAllocator::from_records(cluster(1), [inconsistent]),
            Err(IdentityError::Inconsistent(_))
        ));
    }
}
