//! What the operator knows about the cluster's `WeftIdentity` objects, indexed both ways: by
//! number (the object's name) and by security label set. Fed by watcher events (`apply`), plus
//! the objects this replica has just written or read (`insert`, `remove`), so an allocation is
//! visible at once rather than when its watch event arrives. No API calls here but [`feed`].
//!
//! Also the naming rules every writer and reader of `WeftIdentity` objects shares: the object's
//! name is its number in decimal, and the label [`LABELS_HASH_LABEL`] carries [`labels_hash`]
//! of its label set, so `kubectl get wid -l weft.io/security-labels-hash=…` (and an agent) finds
//! the identity of a label set without reading them all. [`preferred_local`] is where the
//! search for a free number starts for a label set (see `identity_controller`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use weft_core::cluster::ClusterId;
use weft_core::identity::{cluster_of, SecurityLabels, FIRST_LOCAL_IDENTITY, LOCAL_IDENTITY_MASK};
pub use weft_core::identity::{labels_hash, preferred_local};
use weft_crds::identity::WeftIdentityStatus;
use weft_crds::WeftIdentity;

/// Label on every `WeftIdentity` holding [`labels_hash`] of its `spec.securityLabels`.
pub const LABELS_HASH_LABEL: &str = "weft.io/security-labels-hash";
/// Label saying who created the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "weft-operator";

/// One `WeftIdentity` as the index keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownIdentity {
    /// The number: the object's name.
    pub id: u32,
    pub labels: SecurityLabels,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub status: Option<WeftIdentityStatus>,
    /// `spec.id` agrees with the name and is not a reserved number. An object that does not
    /// still occupies its name (a create with that name fails) but stands for no label set here.
    pub consistent: bool,
    /// `spec.id` as written (differs from `id` in an inconsistent object).
    pub spec_id: i64,
    pub generation: Option<i64>,
}

impl KnownIdentity {
    /// Reads an object; `None` if its name is not a number (not one of ours).
    pub fn from_object(object: &WeftIdentity) -> Option<Self> {
        let name = object.name_any();
        let id: u32 = name.parse().ok()?;
        if id.to_string() != name {
            // "0256" and the like: not a name this operator gives.
            return None;
        }
        let consistent =
            object.spec.id == i64::from(id) && id & LOCAL_IDENTITY_MASK >= FIRST_LOCAL_IDENTITY;
        if !consistent {
            tracing::warn!(
                name,
                spec_id = object.spec.id,
                "WeftIdentity whose spec.id is not its name or is a reserved number; ignored for allocation"
            );
        }
        Some(Self {
            id,
            labels: SecurityLabels::from_map(object.spec.security_labels.clone()),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone(),
            status: object.status.clone(),
            consistent,
            spec_id: object.spec.id,
            generation: object.metadata.generation,
        })
    }

    /// Whether the last count of the garbage collector found no user: its clock is running.
    pub fn marked_unused(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.last_used_time.is_some() || s.endpoints == Some(0))
    }
}

#[derive(Default)]
struct Inner {
    by_id: BTreeMap<u32, Arc<KnownIdentity>>,
    by_labels: HashMap<SecurityLabels, BTreeSet<u32>>,
    /// Objects of a (re)list in progress, swapped in at its end.
    relist: Option<Vec<Arc<KnownIdentity>>>,
}

impl Inner {
    fn insert(&mut self, known: Arc<KnownIdentity>) {
        self.remove(known.id);
        if known.consistent {
            self.by_labels
                .entry(known.labels.clone())
                .or_default()
                .insert(known.id);
        }
        self.by_id.insert(known.id, known);
    }

    fn remove(&mut self, id: u32) -> Option<Arc<KnownIdentity>> {
        let old = self.by_id.remove(&id)?;
        if let Some(ids) = self.by_labels.get_mut(&old.labels) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_labels.remove(&old.labels);
            }
        }
        Some(old)
    }
}

/// The `WeftIdentity` objects, by number and by label set.
pub struct IdentityIndex {
    inner: RwLock<Inner>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for IdentityIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityIndex {
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one watcher event. A (re)list (`Init`, `InitApply`…, `InitDone`) replaces the
    /// whole content at its end, so objects deleted while the watch was down disappear; the
    /// first completed list makes the index ready.
    pub fn apply(&self, event: &watcher::Event<WeftIdentity>) {
        let mut inner = self.write();
        match event {
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(object) => {
                if let Some(known) = KnownIdentity::from_object(object) {
                    inner
                        .relist
                        .get_or_insert_with(Vec::new)
                        .push(Arc::new(known));
                }
            }
            watcher::Event::InitDone => {
                let listed = inner.relist.take().unwrap_or_default();
                inner.by_id.clear();
                inner.by_labels.clear();
                for known in listed {
                    inner.insert(known);
                }
                drop(inner);
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(object) => {
                if let Some(known) = KnownIdentity::from_object(object) {
                    inner.insert(Arc::new(known));
                }
            }
            watcher::Event::Delete(object) => {
                if let Ok(id) = object.name_any().parse::<u32>() {
                    // Only the object that was deleted: not one re-created under the number since.
                    let same = inner.by_id.get(&id).is_some_and(|known| {
                        known.uid.is_none() || known.uid == object.metadata.uid
                    });
                    if same {
                        inner.remove(id);
                    }
                }
            }
        }
    }

    /// Records an object this replica has just created, read or written (the API's answer).
    pub fn insert(&self, object: &WeftIdentity) -> Option<Arc<KnownIdentity>> {
        let known = Arc::new(KnownIdentity::from_object(object)?);
        self.write().insert(Arc::clone(&known));
        Some(known)
    }

    /// Forgets a number this replica has seen deleted.
    pub fn remove(&self, id: u32) {
        self.write().remove(id);
    }

    /// Whether a first complete list has been applied.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for the first complete list.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    pub fn get(&self, id: u32) -> Option<Arc<KnownIdentity>> {
        self.read().by_id.get(&id).cloned()
    }

    /// The identity of `cluster` standing for `labels`: the lowest number if (after a race
    /// between replicas) there are several, so every reader picks the same one.
    pub fn identity_for(
        &self,
        labels: &SecurityLabels,
        cluster: ClusterId,
    ) -> Option<Arc<KnownIdentity>> {
        let inner = self.read();
        let ids = inner.by_labels.get(labels)?;
        ids.iter()
            .find(|&&id| cluster_of(id) == cluster.get())
            .and_then(|id| inner.by_id.get(id))
            .cloned()
    }

    /// Every identity, in increasing order.
    pub fn all(&self) -> Vec<Arc<KnownIdentity>> {
        self.read().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().by_id.is_empty()
    }
}

/// Keeps `index` current from a watch on `api` until the future is dropped. kube-runtime's
/// watcher lists, then watches from the list's resourceVersion; when the watch reports 410 Gone
/// (the version was compacted) it lists again, and the relist replaces the index. Errors are
/// retried with kube-runtime's default backoff (0.8 s doubling up to 30 s).
pub async fn feed(api: Api<WeftIdentity>, index: Arc<IdentityIndex>) {
    watcher(api, watcher::Config::default())
        .default_backoff()
        .for_each(|event| {
            match event {
                Ok(event) => index.apply(&event),
                Err(error) => tracing::warn!(%error, "watching WeftIdentity objects; retrying"),
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::identity::{LabelFilter, MAX_LOCAL_IDENTITY};

    fn labels(app: &str) -> SecurityLabels {
        SecurityLabels::for_pod(
            "shop",
            &[("app".to_owned(), app.to_owned())].into(),
            &BTreeMap::new(),
            &LabelFilter::default(),
        )
    }

    fn object(id: u32, app: &str, uid: &str) -> WeftIdentity {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": "WeftIdentity",
            "metadata": {"name": id.to_string(), "uid": uid, "resourceVersion": "1"},
            "spec": {"id": id, "securityLabels": labels(app).as_map()},
        }))
        .expect("identity")
    }

    fn cluster(id: u64) -> ClusterId {
        ClusterId::new(id).expect("cluster")
    }

    #[test]
    fn the_hash_is_stable_and_a_valid_label_value() {
        let hash = labels_hash(&labels("web"));
        assert_eq!(hash.len(), 32);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash, labels_hash(&labels("web")));
        assert_ne!(hash, labels_hash(&labels("db")));
        // Pinned: changing the encoding or the keys would move every label set's numbers.
        let pinned = SecurityLabels::from_map([("app".into(), "web".into())].into());
        assert_eq!(labels_hash(&pinned), "1db3835f3fc13653c8fe874616b3e7cf");
        assert_eq!(preferred_local(&pinned), 34511);
        let local = preferred_local(&labels("web"));
        assert!((FIRST_LOCAL_IDENTITY..=MAX_LOCAL_IDENTITY).contains(&local));
    }

    #[test]
    fn relists_replace_and_lookups_prefer_the_lowest_number() {
        let index = IdentityIndex::new();
        assert!(!index.is_ready());
        let a = (1 << 16) | 300;
        let b = (1 << 16) | 400;
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(object(b, "web", "u-b")));
        index.apply(&watcher::Event::InitApply(object(a, "web", "u-a")));
        index.apply(&watcher::Event::InitDone);
        assert!(index.is_ready());
        assert_eq!(
            index.identity_for(&labels("web"), cluster(1)).map(|k| k.id),
            Some(a)
        );
        assert_eq!(index.identity_for(&labels("web"), cluster(2)), None);
        // A delete of an older object with the same name leaves the new one.
        let mut stale = object(a, "web", "u-old");
        stale.metadata.uid = Some("u-old".into());
        index.apply(&watcher::Event::Delete(stale));
        assert!(index.get(a).is_some());
        index.apply(&watcher::Event::Delete(object(a, "web", "u-a")));
        assert_eq!(
            index.identity_for(&labels("web"), cluster(1)).map(|k| k.id),
            Some(b)
        );
        // A relist without b empties the index.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(object(a, "db", "u-a2")));
        assert!(index.get(b).is_some(), "kept until the relist is complete");
        index.apply(&watcher::Event::InitDone);
        assert_eq!(index.len(), 1);
        assert_eq!(index.identity_for(&labels("web"), cluster(1)), None);
        assert_eq!(
            index.identity_for(&labels("db"), cluster(1)).map(|k| k.id),
            Some(a)
        );
    }

    #[test]
    fn objects_not_named_by_their_number_are_not_identities_of_a_label_set() {
        let index = IdentityIndex::new();
        let mut odd = object(300, "web", "u");
        odd.spec.id = 301;
        assert!(index.insert(&odd).is_some());
        assert!(index.get(300).is_some(), "the name is taken");
        assert_eq!(index.identity_for(&labels("web"), cluster(1)), None);
        let mut named = object(300, "web", "u");
        named.metadata.name = Some("web".into());
        assert!(index.insert(&named).is_none());
    }
}
