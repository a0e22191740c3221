//! The watches: one kube-runtime reflector per kind, and one publisher per table of the agent's
//! state that rebuilds the table's rows ~200 ms after the last change to any kind they are built
//! from (see [`super::rows`]) and hands them to the state, which keeps only the rows that
//! changed (an object whose status alone changed alters no row, and wakes no engine).
//!
//! Watchers relist by themselves after `410 Gone`; errors are logged and retried with
//! kube-runtime's default backoff. A table is first published once every store it is built
//! from has listed its kind, and the source is marked synced once every table was: the
//! engines never act on a half-listed cluster.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use weft_crds::{
    GlobalService, WeftClusterwideNetworkPolicy, WeftEndpoint, WeftIdentity, WeftNetworkPolicy,
};

use super::node;
use super::rows::{self, DirectoryInputs};
use crate::state::{ClusterState, KUBERNETES_SOURCE};
use weft_core::state::{PolicyObject, Row, ServiceObject};

/// How long a table waits after a change for more changes before it is rebuilt.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A kind's store and the task that keeps it current.
pub struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub store: Store<K>,
    pub task: BoxFuture<'static, ()>,
}

/// Watches `api` into a store; every change (after the initial list, and every relist) wakes
/// `changed`.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    changed: Arc<Notify>,
) -> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Only the fields the files use are worth their memory.
    reflect_trimmed(api, config, kind, changed, |object: &mut K| {
        object.managed_fields_mut().clear()
    })
}

/// As [`reflect`], with `trim` applied to every object before it is stored.
pub fn reflect_trimmed<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    changed: Arc<Notify>,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let events = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
    let task = events
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(error) => {
                    tracing::warn!(kind, %error, "watch failed; retrying with backoff")
                }
            }
            futures::future::ready(())
        })
        .boxed();
    Reflected { store, task }
}

/// The watch over this node's pods: `spec.nodeName=<node>`, so an agent never lists the
/// cluster's pods (the rest of the cluster comes from WeftEndpoints).
pub fn local_pods_config(node: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node}"))
}

/// This node's pods.
pub fn local_pods(client: Client, node: &str, changed: Arc<Notify>) -> Reflected<Pod> {
    reflect(Api::all(client), local_pods_config(node), "Pod", changed)
}

/// What the watches need to know.
pub struct WatchSettings {
    pub cluster: String,
    pub node: String,
    /// Where the rows go.
    pub state: ClusterState,
}

/// The running watches.
pub struct Watches {
    /// This node's pods (for WeftEndpoint owner references and named ports).
    pub local_pods: Store<Pod>,
    /// Every WeftEndpoint of the cluster.
    pub endpoints: Store<WeftEndpoint>,
    synced: Vec<oneshot::Receiver<()>>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Watches {
    /// Resolves once every table was published from a complete listing (and the source is
    /// marked synced in the state).
    pub fn synced(&mut self) -> BoxFuture<'static, ()> {
        futures::future::join_all(std::mem::take(&mut self.synced))
            .map(|_| ())
            .boxed()
    }
}

/// Resolves once `store` has listed its kind.
fn ready<K>(store: &Store<K>) -> BoxFuture<'static, ()>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = store.clone();
    async move {
        let _ = store.wait_until_ready().await;
    }
    .boxed()
}

/// Starts every watch and the five table publishers.
pub fn start(client: Client, settings: WatchSettings) -> Watches {
    // What the endpoints and the local pods are built from changed; `fan_out` wakes each
    // publisher (one Notify wakes one waiter).
    let directory_sources_changed = Arc::new(Notify::new());
    let directory_changed = Arc::new(Notify::new());
    let policies_changed = Arc::new(Notify::new());
    let services_changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut synced = Vec::new();

    let pods = local_pods(
        client.clone(),
        &settings.node,
        Arc::clone(&directory_sources_changed),
    );
    let namespaces = reflect::<Namespace>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "Namespace",
        Arc::clone(&directory_sources_changed),
    );
    let identities = reflect::<WeftIdentity>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "WeftIdentity",
        Arc::clone(&directory_sources_changed),
    );
    let endpoints = reflect::<WeftEndpoint>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "WeftEndpoint",
        Arc::clone(&directory_sources_changed),
    );
    let weft_policies = reflect::<WeftNetworkPolicy>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "WeftNetworkPolicy",
        Arc::clone(&policies_changed),
    );
    let clusterwide_policies = reflect::<WeftClusterwideNetworkPolicy>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "WeftClusterwideNetworkPolicy",
        Arc::clone(&policies_changed),
    );
    let kubernetes_policies = reflect::<NetworkPolicy>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "NetworkPolicy",
        Arc::clone(&policies_changed),
    );
    let services = reflect::<Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "Service",
        Arc::clone(&services_changed),
    );
    let slices = reflect::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "EndpointSlice",
        Arc::clone(&services_changed),
    );
    let globals = reflect::<GlobalService>(
        Api::all(client.clone()),
        watcher::Config::default(),
        "GlobalService",
        Arc::clone(&services_changed),
    );

    // The endpoint directory.
    {
        let (pods, namespaces, identities, endpoints) = (
            pods.store.clone(),
            namespaces.store.clone(),
            identities.store.clone(),
            endpoints.store.clone(),
        );
        let all_ready = futures::future::join_all([
            ready(&pods),
            ready(&namespaces),
            ready(&identities),
            ready(&endpoints),
        ])
        .map(|_| ())
        .boxed();
        let WatchSettings { cluster, node, .. } = &settings;
        let (cluster, node) = (cluster.clone(), node.clone());
        let build = move || {
            rows::endpoint_directory(&DirectoryInputs {
                cluster: &cluster,
                node: &node,
                local_pods: &pods.state(),
                namespaces: &namespaces.state(),
                identities: &identities.state(),
                endpoints: &endpoints.state(),
            })
        };
        let (task, written) = spawn_publisher(
            settings.state.clone(),
            Arc::clone(&directory_changed),
            all_ready,
            build,
        );
        tasks.push(task);
        synced.push(written);
    }
    // This node's pods by name: what CNI ADD waits for. Its publisher is woken by the same
    // changes as the directory's (pods, namespaces, identities), through its own notifier.
    {
        let local_pods_changed = Arc::new(Notify::new());
        tasks.push(fan_out(
            Arc::clone(&directory_sources_changed),
            vec![
                Arc::clone(&directory_changed),
                Arc::clone(&local_pods_changed),
            ],
        ));
        let (pods, namespaces, identities) = (
            pods.store.clone(),
            namespaces.store.clone(),
            identities.store.clone(),
        );
        let all_ready =
            futures::future::join_all([ready(&pods), ready(&namespaces), ready(&identities)])
                .map(|_| ())
                .boxed();
        let node = settings.node.clone();
        let build = move || {
            rows::local_pods(
                &node,
                &pods.state(),
                &namespaces.state(),
                &identities.state(),
            )
        };
        let (task, written) =
            spawn_publisher(settings.state.clone(), local_pods_changed, all_ready, build);
        tasks.push(task);
        synced.push(written);
    }
    // The policies.
    {
        let (weft, clusterwide, kubernetes) = (
            weft_policies.store.clone(),
            clusterwide_policies.store.clone(),
            kubernetes_policies.store.clone(),
        );
        let all_ready =
            futures::future::join_all([ready(&weft), ready(&clusterwide), ready(&kubernetes)])
                .map(|_| ())
                .boxed();
        let build = move || {
            rows::policy_objects(&weft.state(), &clusterwide.state(), &kubernetes.state())
                .into_iter()
                .map(PolicyObject)
                .collect()
        };
        let (task, written) = spawn_publisher(
            settings.state.clone(),
            Arc::clone(&policies_changed),
            all_ready,
            build,
        );
        tasks.push(task);
        synced.push(written);
    }
    // The services.
    {
        let (services, slices, globals) = (
            services.store.clone(),
            slices.store.clone(),
            globals.store.clone(),
        );
        let all_ready =
            futures::future::join_all([ready(&services), ready(&slices), ready(&globals)])
                .map(|_| ())
                .boxed();
        let build = move || {
            rows::service_objects(&services.state(), &slices.state(), &globals.state())
                .into_iter()
                .map(ServiceObject)
                .collect()
        };
        let (task, written) = spawn_publisher(
            settings.state.clone(),
            Arc::clone(&services_changed),
            all_ready,
            build,
        );
        tasks.push(task);
        synced.push(written);
    }

    // The other nodes.
    {
        let (peer_tasks, peers_synced) = peer_nodes(client, &settings.node, settings.state.clone());
        tasks.extend(peer_tasks);
        synced.push(peers_synced);
    }
    // Once every table is listed, the engines may act.
    let all_published = futures::future::join_all(std::mem::take(&mut synced));
    let (source_synced, synced_now) = oneshot::channel();
    let state = settings.state.clone();
    tasks.push(tokio::spawn(async move {
        all_published.await;
        state.change(|tables| tables.mark_synced(KUBERNETES_SOURCE));
        let _ = source_synced.send(());
    }));
    synced.push(synced_now);

    let local_pods = pods.store.clone();
    let endpoint_store = endpoints.store.clone();
    for task in [
        pods.task,
        namespaces.task,
        identities.task,
        endpoints.task,
        weft_policies.task,
        clusterwide_policies.task,
        kubernetes_policies.task,
        services.task,
        slices.task,
        globals.task,
    ] {
        tasks.push(tokio::spawn(task));
    }
    Watches {
        local_pods,
        endpoints: endpoint_store,
        synced,
        tasks,
    }
}

/// Watches Nodes (trimmed to what makes a peer) and keeps the state's nodes equal to every
/// other node with an address and a pod CIDR (see [`crate::peers`]): nodes that join, leave
/// or change reach the agent's peer pass within a debounce. Returns the tasks, and a receiver
/// that resolves once the nodes were published from a complete listing.
pub fn peer_nodes(
    client: Client,
    me: &str,
    state: ClusterState,
) -> (Vec<JoinHandle<()>>, oneshot::Receiver<()>) {
    let changed = Arc::new(Notify::new());
    let nodes = reflect_trimmed::<Node>(
        Api::all(client),
        watcher::Config::default(),
        "Node",
        Arc::clone(&changed),
        node::trim,
    );
    let store = nodes.store.clone();
    let all_ready = ready(&store);
    let me = me.to_owned();
    // Nodes left out for lack of an address or pod CIDR are warned about when that set
    // changes, not on every rewrite.
    let incomplete = std::sync::Mutex::new(Vec::<String>::new());
    let build = move || {
        let nodes = store.state();
        let now = node::incomplete_nodes(nodes.iter().map(AsRef::as_ref), &me);
        let mut warned = incomplete.lock().unwrap_or_else(|p| p.into_inner());
        if *warned != now {
            for name in now.iter().filter(|name| !warned.contains(name)) {
                tracing::warn!(node = %name, "node has no IPv4 InternalIP or pod CIDR yet; its pods are unreachable from here until it has both");
            }
            *warned = now;
        }
        node::peers_of(nodes.iter().map(AsRef::as_ref), &me)
    };
    let (publisher, published) = spawn_publisher(state, changed, all_ready, build);
    (vec![tokio::spawn(nodes.task), publisher], published)
}

/// Spawns [`keep_written`] for `path`; the receiver resolves once the file was first written.
/// Wakes every target whenever `source` is notified: one change, several writers.
fn fan_out(source: Arc<Notify>, targets: Vec<Arc<Notify>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            source.notified().await;
            for target in &targets {
                target.notify_one();
            }
        }
    })
}

/// Spawns [`keep_published`]; the receiver resolves once the rows were first published.
fn spawn_publisher<R: Row + Send + Sync + 'static>(
    state: ClusterState,
    changed: Arc<Notify>,
    ready: BoxFuture<'static, ()>,
    build: impl Fn() -> Vec<R> + Send + 'static,
) -> (JoinHandle<()>, oneshot::Receiver<()>)
where
    R::Key: Send + Sync,
{
    let (done, published) = oneshot::channel();
    let task = tokio::spawn(keep_published(state, changed, ready, build, done));
    (task, published)
}

/// Keeps the source's rows of `R`'s table equal to `build()`: first once `ready`, then
/// `DEBOUNCE` after each change. The state stores only the rows that changed.
async fn keep_published<R: Row + Send + Sync + 'static>(
    state: ClusterState,
    changed: Arc<Notify>,
    ready: BoxFuture<'static, ()>,
    build: impl Fn() -> Vec<R> + Send + 'static,
    done: oneshot::Sender<()>,
) where
    R::Key: Send + Sync,
{
    ready.await;
    let mut done = Some(done);
    loop {
        let rows = build();
        let count = rows.len();
        let changed_rows = state.change(|tables| tables.replace(KUBERNETES_SOURCE, rows));
        if changed_rows > 0 {
            tracing::debug!(
                table = R::TABLE.as_str(),
                rows = count,
                changed = changed_rows,
                "published from the cluster"
            );
        }
        if let Some(done) = done.take() {
            let _ = done.send(());
        }
        changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}
