//! Part of `make bench`: the agent's control plane at cluster scale. One agent (a sandbox node
//! with one pod) is preloaded through its real source path — the local state socket, as the
//! sandbox feeds it — with 100,000 endpoints on 1,000 other nodes (20,000 identities), 10,000
//! Services with 5 backends each and 200 policies selecting its pod. Then 1,000 single changes
//! (a pod added, a pod deleted, a pod's labels changed, a backend added or removed, a policy
//! edited), each timed from the change entering the socket to its BPF map entry being in
//! place (read from the pinned map). Alongside: the agent's CPU time and map writes per
//! change, its RSS, and pods started on its node while the changes run (the runtime's whole
//! ADD as the sandbox runs it: namespace, `weft-cni` ADD, the wait for the pod's policy).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, Map, MapData};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::transport::{Endpoint, Uri};
use weft_api::state::agent_state_client::AgentStateClient;
use weft_api::state::{ApplyRequest, Change};
use weft_core::state::{EncodedChange, EndpointMeta, PeerNode, PolicyObject, ServiceObject};
use weft_e2e::measure::percentile;
use weft_e2e::sandbox::{http_get_path, TestSandbox};
use weft_node_bpf::maps::{
    EndpointInfo, EndpointKey, IpcacheEntry, LbFrontend, LbFrontendKey, PolicyEntry, PolicyKeyData,
    POLICY_KEY_FIXED_BITS,
};

const PODS_PER_NODE: u32 = 100;
const BACKENDS: u32 = 5;
const CHANGES: usize = 1_000;
const BATCH: usize = 2_000;
/// The kinds of change, in the order the measurement cycles through them.
const KINDS: [&str; 5] = [
    "remote pod added",
    "remote pod deleted",
    "remote pod relabelled",
    "service backend added or removed",
    "policy edited",
];
const IDENTITY_BASE: u32 = 100_000;
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// `WEFT_BENCH_DIVISOR=N` shrinks the cluster to 1/N (nodes, identities, services, policies)
/// for a quick look while developing; `make bench` measures the full size.
fn divisor() -> u32 {
    static DIVISOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *DIVISOR.get_or_init(|| {
        std::env::var("WEFT_BENCH_DIVISOR")
            .ok()
            .and_then(|value| value.parse().ok())
            .filter(|divisor| (1..=100).contains(divisor))
            .unwrap_or(1)
    })
}

fn nodes() -> u32 {
    1_000 / divisor()
}

fn identities() -> u32 {
    20_000 / divisor()
}

fn services() -> u32 {
    10_000 / divisor()
}

fn policies() -> u32 {
    200 / divisor()
}

fn pod_ip(node: u32, pod: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        64 + (node / 256) as u8,
        (node % 256) as u8,
        (pod + 1) as u8,
    )
}

fn identity_labels(identity: u32) -> std::collections::BTreeMap<String, String> {
    [
        (
            "app".to_owned(),
            format!("app-{}", identity - IDENTITY_BASE),
        ),
        ("io.kubernetes.pod.namespace".to_owned(), "bench".to_owned()),
    ]
    .into_iter()
    .collect()
}

fn endpoint(node: u32, pod: u32, identity: u32) -> EndpointMeta {
    EndpointMeta {
        ip: pod_ip(node, pod),
        cluster: "bench".into(),
        namespace: "bench".into(),
        pod: format!("pod-{node}-{pod}"),
        node: format!("bench-node-{node}"),
        identity,
        security_labels: identity_labels(identity),
        ..Default::default()
    }
}

fn service_ip(service: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        200 + (service / 65_536) as u8,
        (service / 256 % 256) as u8,
        (service % 256) as u8,
    )
}

fn service(service: u32) -> ServiceObject {
    ServiceObject(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{service}"), "namespace": "bench"},
        "spec": {"clusterIP": service_ip(service).to_string(), "ports": [{"port": 80, "targetPort": 8080}]},
    }))
}

fn slice(service: u32, backends: u32) -> ServiceObject {
    let endpoints: Vec<serde_json::Value> = (0..backends)
        .map(|backend| {
            let index = service * BACKENDS + backend;
            let ip = pod_ip(index % nodes(), index / nodes() % PODS_PER_NODE);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    ServiceObject(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{service}-a"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{service}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
}

fn policy(index: u32, port: u16) -> PolicyObject {
    PolicyObject(json!({
        "apiVersion": "weft.io/v1alpha1", "kind": "WeftNetworkPolicy",
        "metadata": {"name": format!("policy-{index}"), "namespace": "bench"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": format!("app-{}", index * 97 % identities())}}],
                "toPorts": [{"ports": [{"port": port.to_string(), "protocol": "TCP"}]}],
            }],
        },
    }))
}

fn policy_port(index: u32, edit: u32) -> u16 {
    (10_000 + index * 10 + edit % 10) as u16
}

/// One connection to the agent's state socket, reused for every change.
struct Source {
    runtime: tokio::runtime::Runtime,
    client: AgentStateClient<tonic::transport::Channel>,
}

impl Source {
    fn connect(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let socket = socket.to_owned();
        let client = runtime.block_on(async move {
            let channel = Endpoint::try_from("http://agent.invalid")
                .expect("endpoint")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
                .expect("connect to the agent's state socket");
            AgentStateClient::new(channel).max_encoding_message_size(64 << 20)
        });
        Self { runtime, client }
    }

    fn send(&mut self, changes: Vec<EncodedChange>) {
        let request = ApplyRequest {
            changes: changes
                .into_iter()
                .map(|change| Change {
                    table: change.table.as_str().to_owned(),
                    key: change.key,
                    row: change.value,
                })
                .collect(),
            complete: false,
            synced: false,
        };
        let client = &mut self.client;
        self.runtime
            .block_on(client.apply(request))
            .expect("the agent takes the change");
    }
}

/// The agent's pinned maps, read as the datapath does.
struct Maps {
    ipcache: LpmTrie<MapData, u32, IpcacheEntry>,
    frontends: HashMap<MapData, LbFrontendKey, LbFrontend>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyEntry>,
}

fn pinned(dir: &Path, name: &str) -> Map {
    let data = MapData::from_pin(dir.join(name)).expect("pinned map");
    Map::from_map_data(data).expect("map")
}

impl Maps {
    fn open(dir: &Path) -> Self {
        Self {
            ipcache: LpmTrie::try_from(pinned(dir, "ipcache")).expect("ipcache"),
            frontends: HashMap::try_from(pinned(dir, "lb_frontends")).expect("frontends"),
            policy: LpmTrie::try_from(pinned(dir, "policy_entries")).expect("policy"),
        }
    }

    fn identity_of(&self, ip: Ipv4Addr) -> Option<u32> {
        let key = LpmKey::new(32, u32::from(ip).to_be());
        self.ipcache.get(&key, 0).ok().map(|entry| entry.identity)
    }

    fn active_backends(&self, service: u32) -> Option<u16> {
        let key = LbFrontendKey {
            address: u32::from(service_ip(service)).to_be(),
            port: 80u16.to_be(),
            protocol: 6,
            pad: 0,
        };
        self.frontends
            .get(&key, 0)
            .ok()
            .map(|frontend| frontend.active_backends)
    }

    fn allows_port(&self, endpoint: u32, port: u16) -> bool {
        let key = LpmKey::new(
            POLICY_KEY_FIXED_BITS + 16,
            PolicyKeyData {
                endpoint,
                direction: 0,
                protocol: 6,
                port: port.to_be(),
            },
        );
        self.policy.get(&key, 0).is_ok()
    }
}

/// Polls `done` until it holds; returns how long it took (`None`: it never did).
fn until(start: Instant, mut done: impl FnMut() -> bool) -> Option<Duration> {
    while start.elapsed() < CHANGE_TIMEOUT {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

/// (user + system CPU seconds, RSS MiB) of process `pid`.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = fields
        .get(11..13)
        .map(|times| {
            times
                .iter()
                .filter_map(|t| t.parse::<f64>().ok())
                .sum::<f64>()
                / ticks
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

/// Map entries the agent wrote or removed so far, by map
/// (`weft_agent_map_{updates,deletes}_total{map=…}`).
fn map_writes(sandbox: &TestSandbox) -> BTreeMap<String, f64> {
    let netns = sandbox.node_netns("bench", "n1");
    let metrics = http_get_path(&netns, "127.0.0.1", 9962, "/metrics").unwrap_or_default();
    let mut writes: BTreeMap<String, f64> = BTreeMap::new();
    for line in metrics.lines().filter(|line| {
        line.starts_with("weft_agent_map_updates_total{")
            || line.starts_with("weft_agent_map_deletes_total{")
    }) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let map = series
            .split_once("map=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("?", |(map, _)| map);
        *writes.entry(map.to_owned()).or_default() += value;
    }
    writes
}

fn pod_manifest(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: worker}}}}\nspec:\n  nodeName: n1\n  containers: [{{name: c, image: x}}]\n"),
    )
    .expect("manifest");
    path
}

fn main() {
    let server = "apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: x, ports: [{containerPort: 9000}]}]\n";
    let sandbox = TestSandbox::up(
        "- {name: bench, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml], agentArgs: [--maglev-table-size, '251', --map-entries, ipcache=262144, --map-entries, policy_peer_sets=65536, --map-entries, lb_frontends=65536, --map-entries, lb_backends=131072, --map-entries, lb_maglev=65536]}\n",
        &[("pods.yaml", server)],
    );
    let node = sandbox
        .sandbox
        .plan
        .node("bench", "n1")
        .expect("n1")
        .clone();
    let pin_dir = sandbox.sandbox.bpffs.join("bench-n1/weft");
    let pid = sandbox
        .sandbox
        .agents
        .iter()
        .find(|agent| agent.node == "n1")
        .expect("agent")
        .pid;
    let mut source = Source::connect(&sandbox.sandbox.state_socket(&node));
    let maps = Maps::open(&pin_dir);
    let server_ip = sandbox.pod("server").ip;
    let endpoints: HashMap<MapData, EndpointKey, EndpointInfo> =
        HashMap::try_from(pinned(&pin_dir, "endpoints")).expect("endpoints");
    let server_ifindex = endpoints
        .get(&EndpointKey::new(server_ip), 0)
        .expect("the server is wired")
        .ifindex;

    // Preload: nodes, endpoints, services, policies, in batches as a source would send them.
    let preload = Instant::now();
    let mut rows: Vec<EncodedChange> = (0..nodes())
        .map(|node| {
            EncodedChange::upsert(&PeerNode {
                name: format!("bench-node-{node}"),
                node_ip: Ipv4Addr::new(172, 31, (node / 250) as u8, (node % 250 + 1) as u8),
                pod_cidr: format!("10.{}.{}.0/24", 64 + node / 256, node % 256)
                    .parse()
                    .expect("cidr"),
            })
        })
        .collect();
    for node in 0..nodes() {
        for pod in 0..PODS_PER_NODE {
            let identity = IDENTITY_BASE + (node * PODS_PER_NODE + pod) % identities();
            rows.push(EncodedChange::upsert(&endpoint(node, pod, identity)));
        }
    }
    for index in 0..services() {
        rows.push(EncodedChange::upsert(&service(index)));
        rows.push(EncodedChange::upsert(&slice(index, BACKENDS)));
    }
    for index in 0..policies() {
        rows.push(EncodedChange::upsert(&policy(index, policy_port(index, 0))));
    }
    for batch in rows.chunks(BATCH) {
        source.send(batch.to_vec());
    }
    let last_service = services() - 1;
    let last_pod = pod_ip(nodes() - 1, PODS_PER_NODE - 1);
    let sent_s = preload.elapsed().as_secs_f64();
    let loaded = |maps: &Maps| {
        (
            maps.active_backends(last_service) == Some(BACKENDS as u16),
            maps.identity_of(last_pod).is_some(),
            maps.allows_port(server_ifindex, policy_port(policies() - 1, 0)),
        )
    };
    while loaded(&maps) != (true, true, true) {
        if preload.elapsed() > PRELOAD_TIMEOUT {
            let log = sandbox.sandbox.run_dir.join("nodes/bench-n1/agent.log");
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "the agent never took the preload in: (service, endpoint, policy) in the maps = {:?}; its log ends with {tail:#?}",
                loaded(&maps)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let preload_s = preload.elapsed().as_secs_f64();
    // Let the passes the preload queued finish before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let (_, rss_loaded) = usage(pid);

    // Pods started on the node while the changes run.
    let adding = Arc::new(AtomicBool::new(true));
    let starts = {
        let adding = Arc::clone(&adding);
        let name = sandbox.name.clone();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut times = Vec::new();
            let mut index = 0;
            while adding.load(Ordering::Relaxed) {
                let manifest = pod_manifest(dir.path(), &format!("worker-{index}"));
                index += 1;
                let started = Instant::now();
                weft_sandbox::Sandbox::load(Some(&name))
                    .expect("state")
                    .apply(None, &manifest)
                    .expect("a pod starts");
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                // Its address back for the next one: the node's CIDR is a /24.
                weft_sandbox::Sandbox::load(Some(&name))
                    .expect("state")
                    .delete(None, &manifest)
                    .expect("a pod goes");
            }
            times
        })
    };

    // The baseline: the same source path carrying a change that alters nothing (a row sent
    // again as it is), so the ratio shows what the agent adds to the transport.
    let unchanged = EncodedChange::upsert(&endpoint(0, 0, IDENTITY_BASE));
    let noop: Vec<f64> = (0..100)
        .map(|_| {
            let start = Instant::now();
            source.send(vec![unchanged.clone()]);
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let noop_p50 = percentile(&noop, 50.0);

    let (cpu_before, _) = usage(pid);
    let writes_before = map_writes(&sandbox);
    let mut latencies = Vec::with_capacity(CHANGES);
    let mut timeouts = 0;
    // Per kind of change (the order of the match below): latencies and timeouts.
    let mut by_kind: [(Vec<f64>, usize); 5] = Default::default();
    let mut added: Option<(Ipv4Addr, u32)> = None;
    let mut backends_added = std::collections::BTreeSet::new();
    for change in 0..CHANGES {
        let round = change as u32 / 5;
        let start = Instant::now();
        let took = match change % 5 {
            // A pod added on another node (an identity that exists).
            0 => {
                let node = round % nodes();
                let ip = Ipv4Addr::new(10, 64 + (node / 256) as u8, (node % 256) as u8, 200);
                let identity = IDENTITY_BASE + round % identities();
                let mut row = endpoint(node, 0, identity);
                row.ip = ip;
                row.pod = format!("new-{round}");
                source.send(vec![EncodedChange::upsert(&row)]);
                added = Some((ip, identity));
                until(start, || maps.identity_of(ip) == Some(identity))
            }
            // That pod deleted.
            1 => {
                let (ip, identity) = added.take().expect("a pod was added");
                source.send(vec![EncodedChange::delete::<EndpointMeta>(&ip)]);
                // The lookup is the datapath's (longest prefix): without the pod's own entry
                // the address falls to its node's pod CIDR.
                until(start, || maps.identity_of(ip) != Some(identity))
            }
            // A pod's labels changed: another (existing) identity.
            2 => {
                let (node, pod) = (round * 7 % nodes(), round % PODS_PER_NODE);
                let identity = IDENTITY_BASE + (round * 13 + 1) % identities();
                source.send(vec![EncodedChange::upsert(&endpoint(node, pod, identity))]);
                until(start, || {
                    maps.identity_of(pod_ip(node, pod)) == Some(identity)
                })
            }
            // A backend added to a service, or the one added before removed.
            3 => {
                let service = round * 31 % services();
                let backends = if backends_added.remove(&service) {
                    BACKENDS
                } else {
                    backends_added.insert(service);
                    BACKENDS + 1
                };
                source.send(vec![EncodedChange::upsert(&slice(service, backends))]);
                until(start, || {
                    maps.active_backends(service) == Some(backends as u16)
                })
            }
            // A policy edited: its port moves.
            _ => {
                let index = round % policies();
                let port = policy_port(index, round / policies() + 1);
                source.send(vec![EncodedChange::upsert(&policy(index, port))]);
                until(start, || maps.allows_port(server_ifindex, port))
            }
        };
        let kind = &mut by_kind[change % 5];
        match took {
            Some(took) => {
                latencies.push(took.as_secs_f64() * 1000.0);
                kind.0.push(took.as_secs_f64() * 1000.0);
            }
            None => {
                timeouts += 1;
                kind.1 += 1;
                eprintln!(
                    "  change {change} ({}) not in the map within {} s",
                    KINDS[change % 5],
                    CHANGE_TIMEOUT.as_secs()
                );
            }
        }
        if (change + 1) % 100 == 0 {
            eprintln!(
                "  {} changes: p50 {:.1} ms, p99 {:.1} ms so far",
                change + 1,
                percentile(&latencies, 50.0),
                percentile(&latencies, 99.0)
            );
        }
    }
    let (cpu_after, rss_after) = usage(pid);
    let writes_after = map_writes(&sandbox);
    adding.store(false, Ordering::Relaxed);
    let pod_starts = starts.join().expect("pod starts");

    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let cpu_per_change = (cpu_after - cpu_before) * 1000.0 / CHANGES as f64;
    let writes_by_map: BTreeMap<&String, f64> = writes_after
        .iter()
        .map(|(map, after)| {
            let before = writes_before.get(map).copied().unwrap_or(0.0);
            (map, (after - before) / CHANGES as f64)
        })
        .filter(|(_, per_change)| *per_change > 0.0)
        .collect();
    let writes_per_change: f64 = writes_by_map.values().sum();
    let rss = rss_after.max(rss_loaded);
    let add_p99 = percentile(&pod_starts, 99.0);
    println!(
        "\ncontrol plane: {} endpoints on {} nodes, {} identities, {} services x {BACKENDS} backends, {} policies (sent through the state socket in {sent_s:.1} s, in the maps after {preload_s:.1} s)",
        nodes() * PODS_PER_NODE,
        nodes(),
        identities(),
        services(),
        policies()
    );
    println!(
        "  {CHANGES} single changes: change to map p50 {p50:.1} ms, p99 {p99:.1} ms (target <= 50), {timeouts} not in the map within {} s",
        CHANGE_TIMEOUT.as_secs()
    );
    println!("  agent CPU per change {cpu_per_change:.2} ms (target <= 1), map entries written per change {writes_per_change:.1}, RSS {rss:.0} MiB (target <= 150)");
    println!(
        "  map entries written per change, by map (pods the starter adds and deletes included): {}",
        writes_by_map
            .iter()
            .map(|(map, per_change)| format!("{map} {per_change:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  {} pods started on the node meanwhile: p99 {add_p99:.0} ms (whole runtime ADD as the sandbox runs it)",
        pod_starts.len()
    );
    for (name, (times, timeouts)) in KINDS.iter().zip(&by_kind) {
        println!(
            "    {name}: p50 {:.1} ms, p99 {:.1} ms, {timeouts} timeouts",
            percentile(times, 50.0),
            percentile(times, 99.0)
        );
    }
    println!("  baseline: an unchanged row through the same socket p50 {noop_p50:.2} ms");
    println!(
        "RESULT control-plane change_to_map_p50_ms={p50:.2} change_to_map_p99_ms={p99:.2} cpu_per_change_ms={cpu_per_change:.3} entries_written_per_change={writes_per_change:.2} rss_mib={rss:.0} cni_add_p99_ms={add_p99:.0} timeouts={timeouts} preload_s={preload_s:.1} noop_apply_p50_ms={noop_p50:.2} p50_vs_noop={:.1}",
        p50 / noop_p50.max(0.001)
    );
}
