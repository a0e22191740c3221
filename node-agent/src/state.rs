//! The agent's one view of the cluster: [`weft_core::state::Tables`] behind a lock, changed by
//! its sources (the Kubernetes watches, or the sandbox over [`crate::local_source`]; later the
//! mesh), with a watch channel that wakes the engines when a change altered a row. Engines
//! read through a [`TableView`], which hands them a table only when it changed since they last
//! looked.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::watch;
use weft_core::state::{Row, SourceId, Table, Tables};

/// The local transport's source (the sandbox).
pub const LOCAL_SOURCE: &str = "local";
/// The Kubernetes watches' source.
pub const KUBERNETES_SOURCE: &str = "kubernetes";

#[derive(Clone)]
pub struct ClusterState {
    inner: Arc<Inner>,
}

struct Inner {
    tables: RwLock<Tables>,
    /// The revision after the last change; engines wait on it.
    changed: watch::Sender<u64>,
    /// The sources whose first complete listing the engines wait for.
    expected: Vec<SourceId>,
}

impl ClusterState {
    /// `expected`: the sources that must have listed everything before the engines act on the
    /// state (an engine working from a half-listed cluster would remove what is in force).
    pub fn new(expected: Vec<SourceId>) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                tables: RwLock::new(Tables::default()),
                changed,
                expected,
            }),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.inner
            .tables
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Changes the tables with `change`; the engines are woken if a row changed or a source
    /// became synced.
    pub fn change<T>(&self, change: impl FnOnce(&mut Tables) -> T) -> T {
        let mut tables = self
            .inner
            .tables
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        let before = (tables.revision(), self.synced_in(&tables));
        let result = change(&mut tables);
        let after = (tables.revision(), self.synced_in(&tables));
        drop(tables);
        if after != before {
            self.inner.changed.send_replace(after.0);
        }
        result
    }

    /// Resolves when the state changes after this is called (or was changed since `seen`).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Whether every expected source has listed everything.
    pub fn synced(&self) -> bool {
        self.synced_in(&self.read())
    }

    fn synced_in(&self, tables: &Tables) -> bool {
        self.inner
            .expected
            .iter()
            .all(|source| tables.is_synced(source))
    }

    /// The sources the engines wait for, not yet synced (for messages).
    pub fn waiting_for(&self) -> Vec<SourceId> {
        let tables = self.read();
        self.inner
            .expected
            .iter()
            .filter(|source| !tables.is_synced(source))
            .cloned()
            .collect()
    }
}

/// What changed in a table since a reader last looked.
#[derive(Debug, PartialEq)]
pub enum Changed<K> {
    /// Read it whole.
    Everything,
    /// These keys were upserted or deleted (each once).
    Keys(Vec<K>),
}

/// One engine's view of one table: the rows, when the table changed since the last call.
pub struct TableView<R: Row> {
    state: ClusterState,
    seen: Option<u64>,
    _row: std::marker::PhantomData<R>,
}

impl<R: Row> TableView<R> {
    pub fn new(state: ClusterState) -> Self {
        Self {
            state,
            seen: None,
            _row: std::marker::PhantomData,
        }
    }

    /// Every row, when the table changed since the last call (always on the first call once
    /// the state is synced); `None` otherwise, and while the sources have not listed
    /// everything.
    pub fn changed_rows(&mut self) -> Option<Vec<R>> {
        self.if_changed(|table, _| table.rows().cloned().collect())
    }

    /// What changed in the table since the last call: the keys, or everything when this is
    /// the first call or the table's log no longer reaches back to it; `None` when nothing
    /// changed, and while the sources have not listed everything.
    pub fn changed_keys(&mut self) -> Option<Changed<R::Key>> {
        self.if_changed(|table, seen| {
            seen.and_then(|seen| table.changed_since(seen))
                .map_or(Changed::Everything, Changed::Keys)
        })
    }

    /// `read(table, revision last seen)` when the synced table changed since the last look,
    /// which it then marks seen.
    fn if_changed<T>(&mut self, read: impl FnOnce(&Table<R>, Option<u64>) -> T) -> Option<T> {
        if !self.state.synced() {
            return None;
        }
        let tables = self.state.read();
        let table = tables.table::<R>();
        if self.seen == Some(table.revision()) {
            return None;
        }
        let result = read(table, self.seen);
        self.seen = Some(table.revision());
        Some(result)
    }

    /// The revision of the table as last handed out.
    pub fn seen(&self) -> Option<u64> {
        self.seen
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::state::{EndpointMeta, PolicyObject};

    #[test]
    fn a_view_hands_out_the_keys_changed_since_it_last_looked() {
        let state = ClusterState::new(vec![LOCAL_SOURCE.into()]);
        let mut view = TableView::<EndpointMeta>::new(state.clone());
        let endpoint = |ip: &str| EndpointMeta {
            ip: ip.parse().unwrap(),
            ..EndpointMeta::default()
        };
        state.change(|tables| tables.upsert(LOCAL_SOURCE, endpoint("10.1.0.5")));
        assert_eq!(view.changed_keys(), None, "not synced yet");
        state.change(|tables| tables.mark_synced(LOCAL_SOURCE));
        assert_eq!(view.changed_keys(), Some(Changed::Everything), "first look");
        assert_eq!(view.changed_keys(), None, "seen");
        state.change(|tables| {
            tables.upsert(LOCAL_SOURCE, endpoint("10.1.0.6"));
            tables.upsert(LOCAL_SOURCE, endpoint("10.1.0.7"));
            tables.delete::<EndpointMeta>(LOCAL_SOURCE, &"10.1.0.6".parse().unwrap());
        });
        assert_eq!(
            view.changed_keys(),
            Some(Changed::Keys(vec![
                "10.1.0.6".parse().unwrap(),
                "10.1.0.7".parse().unwrap()
            ]))
        );
    }

    #[test]
    fn a_view_sees_its_table_once_per_change_and_only_once_synced() {
        let state = ClusterState::new(vec![LOCAL_SOURCE.into()]);
        let mut changes = state.subscribe();
        let mut endpoints = TableView::<EndpointMeta>::new(state.clone());
        let mut policies = TableView::<PolicyObject>::new(state.clone());
        state.change(|tables| {
            tables.upsert(
                LOCAL_SOURCE,
                EndpointMeta {
                    ip: "10.1.0.5".parse().unwrap(),
                    ..EndpointMeta::default()
                },
            )
        });
        assert!(changes.has_changed().expect("open"));
        changes.mark_unchanged();
        assert_eq!(endpoints.changed_rows(), None, "not synced yet");
        state.change(|tables| tables.mark_synced(LOCAL_SOURCE));
        assert!(changes.has_changed().expect("open"), "synced wakes too");
        assert_eq!(endpoints.changed_rows().map(|rows| rows.len()), Some(1));
        assert_eq!(endpoints.changed_rows(), None, "seen");
        assert_eq!(
            policies.changed_rows(),
            Some(Vec::new()),
            "empty, but listed"
        );
        changes.mark_unchanged();
        state.change(|tables| tables.mark_synced(LOCAL_SOURCE));
        assert!(!changes.has_changed().expect("open"), "nothing changed");
    }
}
