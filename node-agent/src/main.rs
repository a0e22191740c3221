//! `weft-agent`: wiring only; the work is in the library modules.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use prometheus_client::registry::Registry;
use weft_agent::cni::server;
use weft_agent::conntrack::{self, ConntrackMetrics, CtSettings};
use weft_agent::datapath::{Datapath, MapEntries};
use weft_agent::flows::directory::Directory;
use weft_agent::flows::enrich::{Clock, Origin};
use weft_agent::flows::grpc;
use weft_agent::flows::metrics::FlowMetrics;
use weft_agent::flows::reader::{self, FlowPipeline};
use weft_agent::flows::store::FlowStore;
use weft_agent::kubernetes::{self, cni_install, Mode, RequestedMode};
use weft_agent::nat::{self, NatMetrics, NatSettings, PortRange};
use weft_agent::node::{NodeAgent, NodeSettings};
use weft_agent::node_addresses;
use weft_agent::peers::{self, LocalNode, PeerNode, PeerRouting, PeerSync};
use weft_agent::services::ServiceEngine;
use weft_agent::state::{ClusterState, KUBERNETES_SOURCE, LOCAL_SOURCE};
use weft_agent::{kernel, netlink};
use weft_core::admin::Readiness;
use weft_core::cluster::ClusterArgs;
use weft_core::daemon::{shutdown_signal, start_admin};
use weft_core::policy::model::EnforcementMode;
use weft_core::service::maglev::TableSize;
use weft_core::telemetry::LogArgs;
use weft_node_bpf::maps::{NodeConfig, RoutingMode as MapRoutingMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RoutingMode {
    /// Pod CIDRs are routed by the underlying network (or by routes the agent adds).
    Native,
    /// Pod traffic between nodes is encapsulated in VXLAN.
    Tunnel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Enforcement {
    Default,
    Always,
    Never,
}

/// The name of the VXLAN device in tunnel mode.
const TUNNEL_DEVICE: &str = "weft_vxlan";
/// VXLAN's UDP port (Linux's default, as Cilium and Flannel use).
const TUNNEL_PORT: u16 = 8472;
/// How soon the engines try again after a pass that could not write everything.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often the engines pass when nothing changed: a safety net (every pass writes only what
/// differs, so a quiet pass writes nothing).
const SAFETY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the node's addresses are read for NodePorts: a new address serves within this.
const NODE_ADDRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// VXLAN adds 50 bytes of headers.
const TUNNEL_OVERHEAD: u32 = 50;

/// How many times (and how far apart) the Node is read before the agent gives up waiting for
/// its pod CIDR and address.
const NODE_READ_ATTEMPTS: u32 = 30;
const NODE_READ_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs on every node: wires pods (CNI), programs the eBPF datapath, enforces policy, balances
/// services and reports flows. In Kubernetes mode it learns the cluster from the API server;
/// in local mode from files the sandbox keeps current.
#[derive(Debug, Parser)]
#[command(name = "weft-agent", version)]
struct Args {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Where the cluster's state comes from: `kubernetes` (the API server), `local` (whoever
    /// sends it to --state-socket: the sandbox), or `auto`: Kubernetes when a kubeconfig is
    /// given or the agent runs in a pod and --state-socket is not given.
    #[arg(long, value_enum, default_value_t = RequestedMode::Auto)]
    mode: RequestedMode,
    /// A kubeconfig to run against a cluster from outside it; in a pod, the in-cluster
    /// configuration is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9962")]
    admin_addr: SocketAddr,
    /// The Kubernetes node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's pod CIDR; pods get addresses from it. Kubernetes mode reads it from the
    /// Node (spec.podCIDRs) unless given.
    #[arg(long)]
    pod_cidr: Option<Ipv4Net>,
    /// This node's address on the node network (tunnel endpoint, route target for peers).
    /// Kubernetes mode reads it from the Node (the InternalIP) unless given.
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// The node's uplink device; traffic arriving on it for local pods goes straight to them.
    /// Default: in Kubernetes mode the device holding the node's address, else `eth0`.
    #[arg(long)]
    uplink: Option<String>,
    /// Another network device of the node (repeatable): NodePorts are served and local pods
    /// reached on it as on the uplink (multi-NIC nodes). NodePorts answer on every address of
    /// the node either way.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Another node, as NODE_IP=POD_CIDR (repeatable): a static peer, wired for as long as the
    /// agent runs, in addition to the nodes the cluster lists (the sandbox, or the Node objects
    /// in Kubernetes mode). A pod CIDR claimed by a flag and by a listed node goes to the
    /// flag's node.
    #[arg(long = "peer", value_parser = peers::parse_peer_flag)]
    peers: Vec<PeerNode>,
    /// Local mode: the Unix socket on which the cluster's state is sent to this agent, as
    /// changes to its tables (`weft.state.v1.AgentState`; the sandbox sends them). The engines
    /// wait until the sender has listed everything once.
    #[arg(long)]
    state_socket: Option<PathBuf>,
    /// Where bpffs is mounted; maps and links are pinned below it in `weft/`.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Where a cgroup v2 hierarchy is mounted, for socket-level hooks.
    #[arg(long, default_value = "/run/weft/cgroupv2")]
    cgroup_root: PathBuf,
    /// Directory for the agent's persisted state (address allocations, endpoints).
    #[arg(long, default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// The Unix socket the CNI plugin talks to.
    #[arg(long, default_value = "/run/weft/cni.sock")]
    cni_socket: PathBuf,
    /// Directory the CNI network configuration is installed into (Kubernetes mode).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// File name of the CNI network configuration in --cni-conf-dir.
    #[arg(long, default_value = cni_install::DEFAULT_CONF_NAME)]
    cni_conf_name: String,
    /// Directory the CNI plugin binary is installed into (Kubernetes mode).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The weft-cni binary to install; by default the one next to this agent's executable.
    #[arg(long)]
    cni_binary: Option<PathBuf>,
    /// How pod traffic travels between nodes.
    #[arg(long, value_enum, default_value_t = RoutingMode::Tunnel)]
    routing_mode: RoutingMode,
    /// The Unix socket of the Observe API (flows).
    #[arg(long, default_value = "/run/weft/observe.sock")]
    observe_socket: PathBuf,
    /// How long CNI ADD waits for a new pod's identity and policy to be in place before it
    /// fails (the runtime then retries); until then the pod may only reach its node and DNS.
    /// Below 30 s, the plugin's wait for the agent's answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    endpoint_ready_timeout: std::time::Duration,
    /// How policy applies: `default` (an endpoint selected by a policy that isolates a
    /// direction is default-deny there), `always` (every endpoint is default-deny), `never`.
    #[arg(long, value_enum, default_value_t = Enforcement::Default)]
    enforcement: Enforcement,
    /// Slots of every Maglev table: a prime; more slots spread load more evenly and cost 4
    /// bytes each per distinct backend set. Must be the same on every node.
    #[arg(long, default_value_t = weft_core::service::maglev::DEFAULT_TABLE_SIZE)]
    maglev_table_size: u32,
    /// Seed of the backend-selection hash; must be the same on every node of the cluster so
    /// that every node picks the same backend for a flow.
    #[arg(long, default_value_t = 0x5745_4654)]
    maglev_seed: u64,
    /// Connections the tracking table holds; default: 0.1% of the node's memory at about 96
    /// bytes a connection, between 65,536 and 4,194,304. Applies when the table is created (a
    /// restarted agent keeps the pinned one).
    #[arg(long)]
    ct_max_entries: Option<u32>,
    /// How long a TCP connection whose SYN is unanswered is tracked.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    ct_lifetime_syn: std::time::Duration,
    /// How long an established TCP connection is tracked after its last packet.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "6h")]
    ct_lifetime_established: std::time::Duration,
    /// How long a TCP connection is tracked after a FIN or RST.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ct_lifetime_closing: std::time::Duration,
    /// How long a UDP (or other non-TCP) flow is tracked after its last packet.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    ct_lifetime_other: std::time::Duration,
    /// Source ports SNAT takes (NodePort to a backend on another node), FIRST-LAST. Default:
    /// the ports above the node's net.ipv4.ip_local_port_range (below it when fewer than 1,024
    /// are left above); a range overlapping it is refused.
    #[arg(long)]
    snat_port_range: Option<PortRange>,
    /// Translated connections each NAT table holds; default: as --ct-max-entries. Applies when
    /// the tables are created. When full, new translations are dropped and reported.
    #[arg(long)]
    nat_max_entries: Option<u32>,
    /// The size of a datapath map, NAME=ENTRIES (repeatable): endpoints, endpoint_counters and
    /// endpoint_policies (pods on the node, 4,096), ipcache (65,536), policy_peer_sets,
    /// policy_entries, lb_frontends, lb_backends, lb_maglev, lb_affinity, lb_sock_reverse,
    /// fragments, flow_last_reported, node_addresses. Applies when the map is created.
    #[arg(long = "map-entries")]
    map_entries: Vec<MapEntries>,
    /// How often the ipcache entries the agent remembers writing are compared with the map
    /// (a safety net: passes write only what differs from what the agent remembers); what
    /// differs counts in weft_agent_map_drift_total and is written again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    drift_check_interval: std::time::Duration,
    /// How often dead connections (and ended translations) are swept out of their tables.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ct_gc_interval: std::time::Duration,
    /// Let traffic from this node to its pods (kubelet's probes, host-network agents) pass
    /// whatever policy isolates them, as Kubernetes documents and Cilium does by default
    /// (`allow-localhost`). `false` leaves it to policies (`fromEntities: [host]`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allow_from_node: bool,
    /// An address of the Kubernetes API server, for the `kube-apiserver` entity of policies
    /// (repeatable). The endpoints of the `default/kubernetes` Service are added to these.
    #[arg(long = "kube-apiserver-address")]
    kube_apiserver_addresses: Vec<std::net::Ipv4Addr>,
    /// How many recent flows the agent keeps for Observe clients.
    #[arg(long, default_value_t = 4096)]
    flow_buffer: usize,
    /// MTU of the node network; pods get this less the tunnel overhead in tunnel mode.
    /// Default: in Kubernetes mode the uplink's MTU, else 1500.
    #[arg(long)]
    mtu: Option<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file_flags: Vec<&str> = [("--state-socket", args.state_socket.is_some())]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
    let mode = kubernetes::resolve_mode(
        args.mode,
        args.kubeconfig.is_some() || kubernetes::in_cluster(),
        &file_flags,
    )
    .map_err(anyhow::Error::msg)?;
    if mode == Mode::Kubernetes {
        // Two TLS providers are compiled in (through dependencies); choose before any client.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    args.log.init()?;
    tracing::info!(
        node = %args.node_name,
        cluster = %args.cluster.cluster_name,
        cluster_id = %args.cluster.cluster_id,
        routing_mode = ?args.routing_mode,
        mode = ?mode,
        "weft-agent starting"
    );
    let readiness = Readiness::default();
    let mut metrics_registry = Registry::with_prefix("weft_agent");
    let flow_metrics = FlowMetrics::default();
    flow_metrics.register(&mut metrics_registry);
    let conntrack_metrics = ConntrackMetrics::default();
    conntrack_metrics.register(&mut metrics_registry);
    let nat_metrics = NatMetrics::default();
    nat_metrics.register(&mut metrics_registry);
    let map_pressure_metrics = weft_agent::map_pressure::MapPressureMetrics::default();
    map_pressure_metrics.register(&mut metrics_registry);
    let registry = Arc::new(Mutex::new(metrics_registry));
    let admin = start_admin(args.admin_addr, readiness.clone(), registry)
        .await
        .context("starting the admin endpoint")?;

    let report = kernel::probe(&args.bpffs, &args.cgroup_root);
    for (what, consequence) in report.missing() {
        tracing::error!(missing = what, "{consequence}");
    }
    // The cluster as the sources list it; the engines wait for the sources expected here.
    let state = ClusterState::new(match mode {
        Mode::Kubernetes => vec![KUBERNETES_SOURCE.to_owned()],
        Mode::Local if args.state_socket.is_some() => vec![LOCAL_SOURCE.to_owned()],
        Mode::Local => {
            tracing::warn!("no --state-socket: this agent knows no policies, services, endpoints or nodes but its own and its --peer flags");
            Vec::new()
        }
    });
    let mut cluster = None;
    let (pod_cidr, node_ip, detected) = match mode {
        Mode::Local => {
            let (Some(pod_cidr), Some(node_ip)) = (args.pod_cidr, args.node_ip) else {
                bail!("--pod-cidr and --node-ip are required in local mode: the agent needs this node's pod CIDR and address (Kubernetes mode reads them from the Node: pass --kubeconfig, or run in a pod)");
            };
            (pod_cidr, node_ip, None)
        }
        Mode::Kubernetes => {
            let client = kubernetes::client(args.kubeconfig.as_deref()).await?;
            let addressing = kubernetes::node::wait_for_addressing(
                &client,
                &args.node_name,
                args.pod_cidr,
                args.node_ip,
                NODE_READ_ATTEMPTS,
                NODE_READ_INTERVAL,
            )
            .await?;
            tracing::info!(
                pod_cidr = %addressing.pod_cidr,
                node_ip = %addressing.node_ip,
                "read this node from the cluster"
            );
            // The watches publish the cluster into the state (see the kubernetes module).
            let watches = kubernetes::watch::start(
                client.clone(),
                kubernetes::watch::WatchSettings {
                    cluster: args.cluster.cluster_name.to_string(),
                    node: args.node_name.clone(),
                    state: state.clone(),
                },
            );
            match cni_install::plugin_binary(args.cni_binary.as_deref()) {
                Ok(binary) => {
                    let installed = cni_install::install_binary(&binary, &args.cni_bin_dir)?;
                    tracing::info!(path = %installed.display(), "CNI plugin installed");
                }
                // The image's init container may have installed it; pods fail visibly if not.
                Err(error) => tracing::warn!(%error, "CNI plugin not installed"),
            }
            cluster = Some((client, watches));
            let detected = if args.uplink.is_none() || args.mtu.is_none() {
                match kubernetes::uplink::device_with_address(addressing.node_ip).await {
                    Ok(Some(device)) => Some(device),
                    Ok(None) => {
                        tracing::warn!(node_ip = %addressing.node_ip, "no device holds the node's address; pass --uplink and --mtu");
                        None
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot find the uplink; pass --uplink and --mtu");
                        None
                    }
                }
            } else {
                None
            };
            (addressing.pod_cidr, addressing.node_ip, detected)
        }
    };
    let uplink = args
        .uplink
        .clone()
        .or_else(|| detected.as_ref().map(|device| device.name.clone()))
        .unwrap_or_else(|| "eth0".into());
    let mtu = args
        .mtu
        .or_else(|| detected.as_ref().and_then(|device| device.mtu))
        .unwrap_or(1500);
    if mode == Mode::Kubernetes {
        tracing::info!(%uplink, mtu, "node network");
    }

    let table_size = TableSize::new(args.maglev_table_size).context("--maglev-table-size")?;

    if args.endpoint_ready_timeout >= weft_agent::cni::plugin::AGENT_TIMEOUT {
        anyhow::bail!(
            "--endpoint-ready-timeout {} must be shorter than the {} the CNI plugin waits for the agent's answer",
            humantime::format_duration(args.endpoint_ready_timeout),
            humantime::format_duration(weft_agent::cni::plugin::AGENT_TIMEOUT)
        );
    }
    let ct_settings = CtSettings {
        max_entries: args.ct_max_entries.unwrap_or_else(|| {
            conntrack::node_memory_bytes()
                .map(conntrack::default_max_entries)
                .unwrap_or_else(|| conntrack::default_max_entries(0))
        }),
        syn: args.ct_lifetime_syn,
        established: args.ct_lifetime_established,
        closing: args.ct_lifetime_closing,
        other: args.ct_lifetime_other,
    };
    tracing::info!(
        max_entries = ct_settings.max_entries,
        syn = %humantime::format_duration(ct_settings.syn),
        established = %humantime::format_duration(ct_settings.established),
        closing = %humantime::format_duration(ct_settings.closing),
        other = %humantime::format_duration(ct_settings.other),
        "connection tracking"
    );
    let nat_settings = NatSettings {
        max_entries: args.nat_max_entries.unwrap_or(ct_settings.max_entries),
        snat_ports: nat::snat_port_range(args.snat_port_range, nat::local_port_range()?)?,
    };
    tracing::info!(
        max_entries = nat_settings.max_entries,
        snat_ports = %nat_settings.snat_ports,
        "service NAT"
    );
    let map_entries = conntrack::with_connection_scale_defaults(
        MapEntries::merged(args.map_entries.clone()),
        ct_settings.max_entries,
    );
    let mut datapath = Datapath::load(
        &args.bpffs.join("weft"),
        &ct_settings,
        &nat_settings,
        &map_entries,
        map_pressure_metrics,
    )
    .context("loading the datapath (is bpffs mounted at --bpffs?)")?;
    tokio::spawn(conntrack::run_collector(
        args.bpffs.join("weft"),
        ct_settings,
        nat_settings.max_entries,
        args.ct_gc_interval,
        conntrack_metrics,
        nat_metrics,
    ));
    match datapath.attach_sockets(&args.cgroup_root) {
        Ok(()) => {
            tracing::info!(cgroup = %args.cgroup_root.display(), "socket-level load balancing attached")
        }
        Err(error) => tracing::error!(
            %error,
            "socket-level load balancing is off: services are translated per packet at the pods' veths instead, and getpeername() shows backends"
        ),
    }
    enable_forwarding().context("enabling IPv4 forwarding")?;
    // Every node can receive tunnelled traffic, so nodes of a tunnel-mode cluster can reach
    // pods of a native-mode cluster sharing the network; only tunnel mode sends through it.
    // Encapsulated frames must fit the node network's MTU.
    let tunnel_ifindex = netlink::ensure_vxlan(TUNNEL_DEVICE, TUNNEL_PORT, mtu - TUNNEL_OVERHEAD)
        .await
        .context("creating the VXLAN device")?;
    datapath.attach_tunnel(TUNNEL_DEVICE)?;
    datapath.configure(NodeConfig {
        routing_mode: match args.routing_mode {
            RoutingMode::Native => MapRoutingMode::Native as u32,
            RoutingMode::Tunnel => MapRoutingMode::Tunnel as u32,
        },
        tunnel_ifindex,
        node_ip: u32::from(node_ip).to_be(),
        cluster_id: u32::from(args.cluster.cluster_id.get()),
        maglev_table_size: table_size.get(),
        // Folded, not truncated: every bit of the configured seed counts.
        lb_hash_seed: (args.maglev_seed ^ (args.maglev_seed >> 32)) as u32,
    })?;
    datapath
        .attach_network(&uplink)
        .with_context(|| format!("attaching to the uplink {uplink}"))?;
    for device in args.devices.iter().filter(|device| **device != uplink) {
        datapath
            .attach_network(device)
            .with_context(|| format!("attaching to the device {device} (--device)"))?;
    }
    tokio::spawn(node_addresses::run(
        args.bpffs
            .join("weft")
            .join(weft_node_bpf::maps::NODE_ADDRESSES),
        NODE_ADDRESS_INTERVAL,
    ));
    // Peers get an ipcache entry and a route (see the peers module): the kernel needs the way
    // too, for FIB lookups and the fallback path in native mode, and in tunnel mode for the
    // node's own traffic to remote pods (and replies to them), which to_tunnel addresses.
    let peer_sync = PeerSync::new(
        LocalNode { node_ip, pod_cidr },
        args.peers.clone(),
        Some(state.clone()),
    );
    let peer_routing = match args.routing_mode {
        RoutingMode::Native => PeerRouting::Native,
        RoutingMode::Tunnel => PeerRouting::Tunnel {
            ifindex: tunnel_ifindex,
            source: node_ip,
        },
    };

    let pod_mtu = match args.routing_mode {
        RoutingMode::Native => mtu,
        RoutingMode::Tunnel => mtu - TUNNEL_OVERHEAD,
    };
    let origin = Origin {
        node: args.node_name.clone(),
        cluster: args.cluster.cluster_name.to_string(),
    };
    let directory = Arc::new(Mutex::new(Directory::new(Some(state.clone()))));
    let flow_events = datapath.take_flow_events()?;
    let store = Arc::new(FlowStore::new(args.flow_buffer));
    let policy_in_force = Arc::new(Mutex::new(None));
    let pipeline = FlowPipeline {
        policy: Arc::clone(&policy_in_force),
        directory: Arc::clone(&directory),
        store: Arc::clone(&store),
        metrics: flow_metrics,
        origin: origin.clone(),
        clock: Clock::now(),
    };
    let reader = tokio::spawn(async move {
        if let Err(error) = reader::run(flow_events, pipeline).await {
            tracing::error!(%error, "reading flow events stopped; flows are no longer observed");
        }
    });
    let observe_listener = weft_agent::unix_socket::bind(&args.observe_socket)?;
    tracing::info!(socket = %args.observe_socket.display(), "serving the Observe API");
    let observer = tokio::spawn(async move {
        if let Err(error) = grpc::serve(observe_listener, store).await {
            tracing::error!(%error, "the Observe API stopped");
        }
    });
    let (health_checks, desired_health_checks) =
        tokio::sync::watch::channel(weft_agent::health_check::HealthChecks::new());
    let health_check_server = tokio::spawn(weft_agent::health_check::serve(desired_health_checks));
    let mut agent = NodeAgent::open(
        NodeSettings {
            state_dir: args.state_dir.clone(),
            pod_cidr,
            mtu: pod_mtu,
            origin,
            directory,
            state: state.clone(),
            policy_in_force,
            enforcement: match args.enforcement {
                Enforcement::Default => EnforcementMode::Default,
                Enforcement::Always => EnforcementMode::Always,
                Enforcement::Never => EnforcementMode::Never,
            },
            node_ip,
            services: ServiceEngine::new(
                state.clone(),
                args.cluster.cluster_id.get(),
                args.node_name.clone(),
                table_size,
                args.maglev_seed,
                health_checks,
            ),
            peers: peer_sync,
            peer_routing,
            allow_from_node: args.allow_from_node,
            kube_apiserver: args.kube_apiserver_addresses.clone(),
        },
        datapath,
    )
    .context("opening the node's state")?;
    // Peers are wired before the first pod is: a pod that starts now reaches every known node.
    agent.sync_peers().await;
    let agent = Arc::new(tokio::sync::Mutex::new(agent));
    if let Some(socket) = &args.state_socket {
        let listener = weft_agent::unix_socket::bind(socket)?;
        tracing::info!(socket = %socket.display(), "serving the local state source");
        tokio::spawn(weft_agent::local_source::serve(listener, state.clone()));
    }
    // The engines act when the state changes (and again soon after a pass that could not write
    // everything; a slow safety pass catches what changed beside the state, such as the room
    // in a full map).
    let engines = {
        let agent = Arc::clone(&agent);
        let drift_check_interval = args.drift_check_interval;
        let mut changes = state.subscribe();
        tokio::spawn(async move {
            let mut failed = false;
            let mut drift_checked = tokio::time::Instant::now();
            loop {
                let wait = if failed {
                    RETRY_INTERVAL
                } else {
                    SAFETY_INTERVAL
                }
                .min(drift_check_interval.saturating_sub(drift_checked.elapsed()));
                let _ = tokio::time::timeout(wait, changes.changed()).await;
                changes.mark_unchanged();
                failed = false;
                // The lock is taken per engine, not for the whole pass: a CNI request waits
                // behind one engine's work at most, never behind the sequence.
                if drift_checked.elapsed() >= drift_check_interval {
                    drift_checked = tokio::time::Instant::now();
                    let mut agent = agent.lock().await;
                    if let Err(error) = tokio::task::block_in_place(|| agent.check_drift()) {
                        tracing::warn!(%error, "cannot compare the ipcache with what was written");
                    }
                }
                // Peers first: the policy pass then sees the peer set they left.
                failed |= !agent.lock().await.sync_peers().await;
                // A full map is logged once where it is found, not on every retry.
                let mut check = |what: &str, result: Result<(), weft_agent::node::NodeError>| {
                    if let Err(error) = result {
                        failed = true;
                        if error.is_map_full() {
                            tracing::debug!(%error, "cannot apply {what}");
                        } else {
                            tracing::warn!(%error, "cannot apply {what}");
                        }
                    }
                };
                {
                    let mut agent = agent.lock().await;
                    check(
                        "endpoint identities",
                        tokio::task::block_in_place(|| agent.sync_identities().map(drop)),
                    );
                }
                {
                    let mut agent = agent.lock().await;
                    check(
                        "policy",
                        tokio::task::block_in_place(|| agent.sync_policy()),
                    );
                }
                {
                    let mut agent = agent.lock().await;
                    check(
                        "services",
                        tokio::task::block_in_place(|| agent.sync_services()),
                    );
                }
                let mut agent = agent.lock().await;
                tokio::task::block_in_place(|| agent.replace_outdated_programs());
                failed |= agent.has_outdated_programs();
                agent.report_map_pressure();
            }
        })
    };
    let listener = weft_agent::unix_socket::bind(&args.cni_socket)?;
    tracing::info!(socket = %args.cni_socket.display(), "serving CNI requests");
    let cni = tokio::spawn(server::serve(listener, agent, args.endpoint_ready_timeout));
    let kernel_ready = report.missing().next().is_none();
    let mut cluster_tasks = Vec::new();
    match cluster {
        None => readiness.set_ready(kernel_ready),
        Some((client, mut watches)) => {
            cluster_tasks.push(tokio::spawn(
                kubernetes::endpoints::Publisher {
                    client,
                    node: args.node_name.clone(),
                    records_dir: args.state_dir.join("endpoints"),
                    pods: watches.local_pods.clone(),
                    endpoints: watches.endpoints.clone(),
                    report: args.state_dir.join(weft_agent::policy::ENFORCEMENT_REPORT),
                }
                .run(),
            ));
            // The runtime sends pods here once the conflist exists: only when the agent
            // answers on its socket and knows the cluster's identities and policies.
            let synced = watches.synced();
            let (conf_dir, conf_name, socket) = (
                args.cni_conf_dir.clone(),
                args.cni_conf_name.clone(),
                args.cni_socket.clone(),
            );
            let readiness = readiness.clone();
            cluster_tasks.push(tokio::spawn(async move {
                synced.await;
                tracing::info!("the cluster is listed; the engines' inputs are current");
                match cni_install::install_conflist(&conf_dir, &conf_name, &socket) {
                    Ok(path) => {
                        tracing::info!(path = %path.display(), "CNI configuration installed");
                        readiness.set_ready(kernel_ready);
                    }
                    Err(error) => tracing::error!(
                        %error,
                        "cannot install the CNI configuration: the runtime will not send pods to Weft"
                    ),
                }
            }));
            cluster_tasks.extend(std::mem::take(&mut watches.tasks));
        }
    }

    shutdown_signal().await;
    // Maps and links are pinned: pods keep forwarding until an agent starts again.
    tracing::info!("weft-agent stopping; the datapath stays in place");
    cni.abort();
    for task in &cluster_tasks {
        task.abort();
    }
    engines.abort();
    observer.abort();
    reader.abort();
    admin.abort();
    health_check_server.abort();
    Ok(())
}

fn enable_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
}
