//! The cluster state an agent works from: typed tables of rows that sources change by events.
//!
//! A *source* (the Kubernetes watches, the sandbox in local mode, and later each peer cluster
//! of the mesh) upserts and deletes rows; every row remembers its source, so a source's rows
//! can be replaced by a fresh listing or withdrawn as a unit without touching the others'.
//! Every change that alters a row takes the next revision of the whole state and stamps the
//! row and its table with it; an upsert of an identical row changes nothing (so an object
//! whose status alone changed costs its consumers nothing). Engines remember the revision of
//! each table they last worked from and do nothing while it stays the same.
//!
//! The rows are what the engines need, not whole objects: endpoints (address → identity,
//! node, cluster, labels, named ports), this node's pods by name, policy and service objects
//! (converted by `weft-crds` in the engines, which keep the last good version of each), and the
//! other nodes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::ReservedIdentity;

/// Who changed a row: `local` (the sandbox), `kubernetes`, or a peer cluster of the mesh.
pub type SourceId = String;

/// The tables, by name (the local transport names them so).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableName {
    Endpoints,
    LocalPods,
    Policies,
    Services,
    Nodes,
}

impl TableName {
    pub const ALL: [TableName; 5] = [
        TableName::Endpoints,
        TableName::LocalPods,
        TableName::Policies,
        TableName::Services,
        TableName::Nodes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TableName::Endpoints => "endpoints",
            TableName::LocalPods => "local_pods",
            TableName::Policies => "policies",
            TableName::Services => "services",
            TableName::Nodes => "nodes",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|table| table.as_str() == name)
    }
}

/// One endpoint of the cluster (or mesh): what policy and flows need to know about an address.
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

/// One pod scheduled to this node, found by name: what CNI ADD waits for (a new pod's address
/// is not known to the cluster before ADD returns, so its identity is found by name).
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

impl LocalPod {
    /// Whether the cluster has assigned the pod its identity.
    pub fn resolved(&self) -> bool {
        self.identity != ReservedIdentity::Init.id()
    }
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
    pub host_ip: Option<Ipv4Addr>,
}

/// Another node: where it is reached and where its pods live.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerNode {
    /// The node's name (for logs).
    #[serde(default)]
    pub name: String,
    /// Where the node is reached on the node network (route gateway, tunnel endpoint).
    #[serde(rename = "nodeIP")]
    pub node_ip: Ipv4Addr,
    /// Where the node's pods live.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// A policy object as the API server holds it (`WeftNetworkPolicy`,
/// `WeftClusterwideNetworkPolicy`, `NetworkPolicy`), without its status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PolicyObject(pub Value);

/// A Service, EndpointSlice or GlobalService as the API server holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceObject(pub Value);

/// `Kind/namespace/name` of a Kubernetes object (namespace empty when cluster-scoped).
pub fn object_key(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or_default(),
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// A table's row type: its key, and where its table is.
pub trait Row: Clone + PartialEq + Serialize + DeserializeOwned {
    type Key: Ord + Clone + std::fmt::Debug;
    const TABLE: TableName;
    fn key(&self) -> Self::Key;
    /// The key as the local transport writes it (see [`Self::parse_key`]).
    fn key_string(key: &Self::Key) -> String;
    fn parse_key(key: &str) -> Option<Self::Key>;
    fn table(tables: &Tables) -> &Table<Self>;
    fn table_mut(tables: &mut Tables) -> &mut Table<Self>;
}

impl Row for EndpointMeta {
    type Key = Ipv4Addr;
    const TABLE: TableName = TableName::Endpoints;
    fn key(&self) -> Ipv4Addr {
        self.ip
    }
    fn key_string(key: &Ipv4Addr) -> String {
        key.to_string()
    }
    fn parse_key(key: &str) -> Option<Ipv4Addr> {
        key.parse().ok()
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.endpoints
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.endpoints
    }
}

impl Row for LocalPod {
    type Key = (String, String);
    const TABLE: TableName = TableName::LocalPods;
    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.pod.clone())
    }
    fn key_string((namespace, pod): &(String, String)) -> String {
        format!("{namespace}/{pod}")
    }
    fn parse_key(key: &str) -> Option<(String, String)> {
        let (namespace, pod) = key.split_once('/')?;
        Some((namespace.to_owned(), pod.to_owned()))
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.local_pods
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.local_pods
    }
}

impl Row for PolicyObject {
    type Key = String;
    const TABLE: TableName = TableName::Policies;
    fn key(&self) -> String {
        object_key(&self.0)
    }
    fn key_string(key: &String) -> String {
        key.clone()
    }
    fn parse_key(key: &str) -> Option<String> {
        Some(key.to_owned())
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.policies
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.policies
    }
}

impl Row for ServiceObject {
    type Key = String;
    const TABLE: TableName = TableName::Services;
    fn key(&self) -> String {
        object_key(&self.0)
    }
    fn key_string(key: &String) -> String {
        key.clone()
    }
    fn parse_key(key: &str) -> Option<String> {
        Some(key.to_owned())
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.services
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.services
    }
}

impl Row for PeerNode {
    type Key = String;
    const TABLE: TableName = TableName::Nodes;
    fn key(&self) -> String {
        self.name.clone()
    }
    fn key_string(key: &String) -> String {
        key.clone()
    }
    fn parse_key(key: &str) -> Option<String> {
        Some(key.to_owned())
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.nodes
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.nodes
    }
}

/// A row and who wrote it when.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<R> {
    pub row: R,
    pub source: SourceId,
    pub revision: u64,
}

/// How many changes a table remembers by key: a reader further behind reads the whole table.
pub const CHANGE_LOG: usize = 65_536;

/// One table: rows by key, the revision of its last change, and a log of the keys changed
/// lately (upserted or deleted), so a reader can take only what changed since it last looked.
#[derive(Clone, Debug)]
pub struct Table<R: Row> {
    rows: BTreeMap<R::Key, Stored<R>>,
    revision: u64,
    log: VecDeque<(u64, R::Key)>,
    /// The revision of the newest change that fell out of the log.
    log_floor: u64,
}

impl<R: Row> Default for Table<R> {
    fn default() -> Self {
        Self {
            rows: BTreeMap::new(),
            revision: 0,
            log: VecDeque::new(),
            log_floor: 0,
        }
    }
}

impl<R: Row> Table<R> {
    pub fn get(&self, key: &R::Key) -> Option<&R> {
        self.rows.get(key).map(|stored| &stored.row)
    }

    pub fn stored(&self, key: &R::Key) -> Option<&Stored<R>> {
        self.rows.get(key)
    }

    pub fn rows(&self) -> impl Iterator<Item = &R> {
        self.rows.values().map(|stored| &stored.row)
    }

    /// Every row with its key, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&R::Key, &R)> {
        self.rows.iter().map(|(key, stored)| (key, &stored.row))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The revision of the table's last change (0: never changed).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The keys changed (upserted or deleted) after revision `since`, each once; `None` when
    /// the log no longer reaches back that far (the reader then reads the whole table).
    pub fn changed_since(&self, since: u64) -> Option<Vec<R::Key>> {
        if since < self.log_floor {
            return None;
        }
        let start = self.log.partition_point(|(revision, _)| *revision <= since);
        let mut seen = BTreeSet::new();
        Some(
            self.log
                .range(start..)
                .filter(|(_, key)| seen.insert(key.clone()))
                .map(|(_, key)| key.clone())
                .collect(),
        )
    }

    fn changed(&mut self, revision: u64, key: R::Key) {
        self.revision = revision;
        self.log.push_back((revision, key));
        if self.log.len() > CHANGE_LOG {
            if let Some((dropped, _)) = self.log.pop_front() {
                self.log_floor = dropped;
            }
        }
    }
}

/// A change as the local transport carries it: a table, a key, and the row's JSON (`None`
/// deletes the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChange {
    pub table: TableName,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl EncodedChange {
    pub fn upsert<R: Row>(row: &R) -> Self {
        Self {
            table: R::TABLE,
            key: R::key_string(&row.key()),
            value: Some(serde_json::to_vec(row).unwrap_or_default()),
        }
    }

    pub fn delete<R: Row>(key: &R::Key) -> Self {
        Self {
            table: R::TABLE,
            key: R::key_string(key),
            value: None,
        }
    }
}

/// A change to one row, typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<R: Row> {
    Upsert(R),
    Delete(R::Key),
}

/// A change to a row of any table.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Endpoint(Change<EndpointMeta>),
    LocalPod(Change<LocalPod>),
    Policy(Change<PolicyObject>),
    Service(Change<ServiceObject>),
    Node(Change<PeerNode>),
}

impl Decoded {
    /// Decodes a change the local transport carried. A row that does not decode, or whose
    /// own key is not the one given, is refused.
    pub fn decode(change: &EncodedChange) -> Result<Self, StateError> {
        Ok(match change.table {
            TableName::Endpoints => Self::Endpoint(decode_as(change)?),
            TableName::LocalPods => Self::LocalPod(decode_as(change)?),
            TableName::Policies => Self::Policy(decode_as(change)?),
            TableName::Services => Self::Service(decode_as(change)?),
            TableName::Nodes => Self::Node(decode_as(change)?),
        })
    }
}

fn decode_as<R: Row>(change: &EncodedChange) -> Result<Change<R>, StateError> {
    let key = R::parse_key(&change.key).ok_or_else(|| StateError::BadKey {
        table: R::TABLE,
        key: change.key.clone(),
    })?;
    let Some(value) = &change.value else {
        return Ok(Change::Delete(key));
    };
    let row: R = serde_json::from_slice(value).map_err(|error| StateError::BadRow {
        table: R::TABLE,
        key: change.key.clone(),
        reason: error.to_string(),
    })?;
    if row.key() != key {
        return Err(StateError::BadRow {
            table: R::TABLE,
            key: change.key.clone(),
            reason: format!("the row's own key is {:?}", R::key_string(&row.key())),
        });
    }
    Ok(Change::Upsert(row))
}

/// The keys a complete listing upserted, per table.
#[derive(Default)]
struct Listed {
    endpoints: BTreeSet<Ipv4Addr>,
    local_pods: BTreeSet<(String, String)>,
    policies: BTreeSet<String>,
    services: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{table:?} row {key:?} is not valid: {reason}")]
    BadRow {
        table: TableName,
        key: String,
        reason: String,
    },
    #[error("{table:?} key {key:?} is not valid")]
    BadKey { table: TableName, key: String },
}

/// Every table, and the revision of the last change to any.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    revision: u64,
    pub endpoints: Table<EndpointMeta>,
    pub local_pods: Table<LocalPod>,
    pub policies: Table<PolicyObject>,
    pub services: Table<ServiceObject>,
    pub nodes: Table<PeerNode>,
    synced: BTreeSet<SourceId>,
}

impl Tables {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn table<R: Row>(&self) -> &Table<R> {
        R::table(self)
    }

    /// Stores `row` for `source`; returns whether anything changed. A row another source
    /// wrote under the same key is replaced (the last writer wins).
    pub fn upsert<R: Row>(&mut self, source: &str, row: R) -> bool {
        let key = row.key();
        let table = R::table_mut(self);
        if let Some(stored) = table.rows.get(&key) {
            if stored.row == row && stored.source == source {
                return false;
            }
        }
        self.revision += 1;
        let revision = self.revision;
        let table = R::table_mut(self);
        table.changed(revision, key.clone());
        table.rows.insert(
            key,
            Stored {
                row,
                source: source.to_owned(),
                revision,
            },
        );
        true
    }

    /// Removes `key` if `source` wrote it; returns whether anything changed.
    pub fn delete<R: Row>(&mut self, source: &str, key: &R::Key) -> bool {
        let table = R::table_mut(self);
        if table
            .rows
            .get(key)
            .is_none_or(|stored| stored.source != source)
        {
            return false;
        }
        table.rows.remove(key);
        self.revision += 1;
        let revision = self.revision;
        R::table_mut(self).changed(revision, key.clone());
        true
    }

    /// Makes `source`'s rows of `R`'s table exactly `rows` (a fresh listing): new and changed
    /// rows are stored, and the source's rows not listed are deleted. Returns how many rows
    /// changed.
    pub fn replace<R: Row>(&mut self, source: &str, rows: impl IntoIterator<Item = R>) -> usize {
        let mut listed = BTreeSet::new();
        let mut changed = 0;
        for row in rows {
            listed.insert(row.key());
            changed += usize::from(self.upsert(source, row));
        }
        changed + self.delete_unlisted::<R>(source, &listed)
    }

    /// Deletes every row `source` wrote, in every table (a peer cluster withdrawn, say), and
    /// forgets that it was synced. Returns how many rows went.
    pub fn withdraw(&mut self, source: &str) -> usize {
        self.synced.remove(source);
        self.replace::<EndpointMeta>(source, [])
            + self.replace::<LocalPod>(source, [])
            + self.replace::<PolicyObject>(source, [])
            + self.replace::<ServiceObject>(source, [])
            + self.replace::<PeerNode>(source, [])
    }

    /// Applies decoded changes in order; with `complete` they are `source`'s whole listing,
    /// and its rows not upserted are deleted. Returns how many rows changed.
    pub fn apply(&mut self, source: &str, changes: Vec<Decoded>, complete: bool) -> usize {
        let mut listed = Listed::default();
        let mut changed = 0;
        for change in changes {
            changed += usize::from(match change {
                Decoded::Endpoint(change) => self.apply_one(source, change, &mut listed.endpoints),
                Decoded::LocalPod(change) => self.apply_one(source, change, &mut listed.local_pods),
                Decoded::Policy(change) => self.apply_one(source, change, &mut listed.policies),
                Decoded::Service(change) => self.apply_one(source, change, &mut listed.services),
                Decoded::Node(change) => self.apply_one(source, change, &mut listed.nodes),
            });
        }
        if complete {
            changed += self.delete_unlisted::<EndpointMeta>(source, &listed.endpoints)
                + self.delete_unlisted::<LocalPod>(source, &listed.local_pods)
                + self.delete_unlisted::<PolicyObject>(source, &listed.policies)
                + self.delete_unlisted::<ServiceObject>(source, &listed.services)
                + self.delete_unlisted::<PeerNode>(source, &listed.nodes);
        }
        changed
    }

    fn apply_one<R: Row>(
        &mut self,
        source: &str,
        change: Change<R>,
        listed: &mut BTreeSet<R::Key>,
    ) -> bool {
        match change {
            Change::Upsert(row) => {
                listed.insert(row.key());
                self.upsert(source, row)
            }
            Change::Delete(key) => self.delete::<R>(source, &key),
        }
    }

    fn delete_unlisted<R: Row>(&mut self, source: &str, listed: &BTreeSet<R::Key>) -> usize {
        let unlisted: Vec<R::Key> = R::table(self)
            .rows
            .iter()
            .filter(|(key, stored)| stored.source == source && !listed.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        unlisted
            .iter()
            .filter(|key| self.delete::<R>(source, key))
            .count()
    }

    /// `source` has listed everything it holds: engines may trust its rows to be complete.
    pub fn mark_synced(&mut self, source: &str) {
        self.synced.insert(source.to_owned());
    }

    pub fn is_synced(&self, source: &str) -> bool {
        self.synced.contains(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint(ip: &str, identity: u32) -> EndpointMeta {
        EndpointMeta {
            ip: ip.parse().expect("ip"),
            identity,
            ..EndpointMeta::default()
        }
    }

    #[test]
    fn only_a_real_change_takes_a_revision() {
        let mut tables = Tables::default();
        assert!(tables.upsert("local", endpoint("10.1.0.5", 300)));
        let revision = tables.revision();
        assert!(
            !tables.upsert("local", endpoint("10.1.0.5", 300)),
            "same row"
        );
        assert_eq!(tables.revision(), revision);
        assert_eq!(tables.table::<EndpointMeta>().revision(), revision);
        assert_eq!(tables.table::<PolicyObject>().revision(), 0, "untouched");
        assert!(tables.upsert("local", endpoint("10.1.0.5", 301)));
        assert_eq!(tables.revision(), revision + 1);
        assert!(!tables.delete::<EndpointMeta>("local", &"10.1.0.9".parse().unwrap()));
        assert!(tables.delete::<EndpointMeta>("local", &"10.1.0.5".parse().unwrap()));
        assert!(tables.table::<EndpointMeta>().is_empty());
    }

    #[test]
    fn a_reader_takes_the_keys_changed_since_it_looked_or_everything_when_too_far_behind() {
        let mut tables = Tables::default();
        tables.upsert("local", endpoint("10.1.0.5", 300));
        let seen = tables.endpoints.revision();
        tables.upsert("local", endpoint("10.1.0.6", 300));
        tables.upsert("local", endpoint("10.1.0.6", 301));
        tables.delete::<EndpointMeta>("local", &"10.1.0.5".parse().unwrap());
        let changed: Vec<String> = tables
            .endpoints
            .changed_since(seen)
            .expect("in the log")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(changed, ["10.1.0.6", "10.1.0.5"], "each key once");
        assert_eq!(
            tables.endpoints.changed_since(tables.endpoints.revision()),
            Some(Vec::new())
        );
        for index in 0..CHANGE_LOG as u32 {
            tables.upsert("local", endpoint("10.2.0.1", 1000 + index));
        }
        assert_eq!(tables.endpoints.changed_since(seen), None, "fell out");
        assert!(tables
            .endpoints
            .changed_since(tables.endpoints.revision() - 10)
            .is_some());
    }

    #[test]
    fn a_listing_replaces_its_source_only_and_a_source_withdraws_as_a_unit() {
        let mut tables = Tables::default();
        tables.upsert("kubernetes", endpoint("10.1.0.5", 300));
        tables.upsert("kubernetes", endpoint("10.1.0.6", 300));
        tables.upsert("mesh/east", endpoint("10.2.0.5", 400));
        tables.upsert(
            "mesh/east",
            PeerNode {
                name: "east-1".into(),
                node_ip: "192.168.1.1".parse().unwrap(),
                pod_cidr: "10.2.0.0/24".parse().unwrap(),
            },
        );
        let changed = tables.replace(
            "kubernetes",
            [endpoint("10.1.0.6", 300), endpoint("10.1.0.7", 300)],
        );
        assert_eq!(changed, 2, "10.1.0.7 added, 10.1.0.5 deleted");
        let ips: Vec<String> = tables
            .endpoints
            .rows()
            .map(|row| row.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.1.0.6", "10.1.0.7", "10.2.0.5"]);
        tables.mark_synced("mesh/east");
        assert_eq!(tables.withdraw("mesh/east"), 2);
        assert!(!tables.is_synced("mesh/east"));
        assert_eq!(tables.endpoints.len(), 2);
        assert!(tables.nodes.is_empty());
    }

    #[test]
    fn encoded_changes_decode_by_table_and_bad_ones_change_nothing() {
        let mut tables = Tables::default();
        let policy = PolicyObject(json!({
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "ml", "name": "deny"},
            "spec": {}
        }));
        let change = EncodedChange::upsert(&policy);
        assert_eq!(change.key, "NetworkPolicy/ml/deny");
        let decoded = Decoded::decode(&change).expect("decodes");
        assert_eq!(tables.apply("local", vec![decoded], false), 1);
        assert_eq!(
            tables.policies.get(&"NetworkPolicy/ml/deny".to_owned()),
            Some(&policy)
        );
        let wrong_key = EncodedChange {
            key: "NetworkPolicy/ml/other".into(),
            ..change.clone()
        };
        assert!(Decoded::decode(&wrong_key).is_err());
        let garbage = EncodedChange {
            table: TableName::Endpoints,
            key: "10.1.0.5".into(),
            value: Some(b"{\"ip\": 5}".to_vec()),
        };
        assert!(Decoded::decode(&garbage).is_err());
        let bad_key = EncodedChange {
            table: TableName::Endpoints,
            key: "not-an-address".into(),
            value: None,
        };
        assert!(Decoded::decode(&bad_key).is_err());
        let delete = EncodedChange::delete::<PolicyObject>(&"NetworkPolicy/ml/deny".to_owned());
        let decoded = Decoded::decode(&delete).expect("decodes");
        assert_eq!(tables.apply("local", vec![decoded], false), 1);
        assert!(tables.policies.is_empty());
        // A complete listing deletes what it does not name, of its own source only.
        tables.upsert("local", endpoint("10.1.0.5", 300));
        tables.upsert("local", endpoint("10.1.0.6", 300));
        tables.upsert("kubernetes", endpoint("10.1.0.7", 300));
        let listing = vec![Decoded::Endpoint(Change::Upsert(endpoint("10.1.0.6", 301)))];
        assert_eq!(tables.apply("local", listing, true), 2);
        let ips: Vec<String> = tables
            .endpoints
            .rows()
            .map(|row| format!("{} {}", row.ip, row.identity))
            .collect();
        assert_eq!(ips, ["10.1.0.6 301", "10.1.0.7 300"]);
        let pod_key = LocalPod::parse_key("ml/trainer-0").expect("key");
        assert_eq!(LocalPod::key_string(&pod_key), "ml/trainer-0");
    }
}
