//! The Rust mirrors of map types must match the C structs byte for byte, or the agent and the
//! datapath silently disagree about every entry. clang records the C layout in the object's
//! BTF; bpftool prints it as JSON.

use std::mem::{offset_of, size_of};
use std::process::Command;

use serde::Deserialize;
use weft_node_bpf::maps::{
    CtEntry, CtKey, EndpointCounterKey, EndpointInfo, EndpointKey, EndpointPolicy, FlowEvent,
    IpcacheEntry, IpcacheKey, NodeConfig, PeerSet, PolicyEntry, PolicyKey, PolicyKeyData,
    TrafficCounters,
};
use weft_node_bpf::maps::{
    LbAffinity, LbAffinityKey, LbBackend, LbFrontend, LbFrontendKey, LbNat, LbNatEntry,
    LbServiceAddr, LbSockKey, LbTuple,
};
use weft_node_bpf::{HOST_OBJECT, POD_OBJECT, SOCK_OBJECT};

#[derive(Deserialize)]
struct BtfDump {
    types: Vec<BtfType>,
}

#[derive(Deserialize)]
struct BtfType {
    kind: String,
    name: Option<String>,
    size: Option<usize>,
    #[serde(default)]
    members: Vec<BtfMember>,
}

#[derive(Deserialize)]
struct BtfMember {
    name: String,
    bits_offset: usize,
}

fn btf_of(object: &[u8]) -> BtfDump {
    // Tests run in parallel threads of one process: each call gets its own directory.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("weft-btf-layout-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join("object.bpf.o");
    std::fs::write(&path, object).expect("write object");
    let output = Command::new("bpftool")
        .args(["-j", "btf", "dump", "file"])
        .arg(&path)
        .output()
        .expect("bpftool runs (install it with `make deps`)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bpftool prints BTF as JSON")
}

/// Asserts the C struct `name` has exactly `size` bytes and these members at these offsets.
fn assert_layout(btf: &BtfDump, name: &str, size: usize, members: &[(&str, usize)]) {
    let found = btf
        .types
        .iter()
        .find(|ty| ty.kind == "STRUCT" && ty.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("struct {name} is not in the object's BTF"));
    assert_eq!(found.size, Some(size), "size of struct {name}");
    let c_members: Vec<(&str, usize)> = found
        .members
        .iter()
        .map(|member| (member.name.as_str(), member.bits_offset / 8))
        .collect();
    assert_eq!(
        c_members, members,
        "members (name, byte offset) of struct {name}"
    );
}

#[test]
fn map_types_match_the_c_structs() {
    let btf = btf_of(POD_OBJECT);
    assert_layout(
        &btf,
        "endpoint_counter_key",
        size_of::<EndpointCounterKey>(),
        &[
            ("ifindex", offset_of!(EndpointCounterKey, ifindex)),
            ("direction", offset_of!(EndpointCounterKey, direction)),
        ],
    );
    assert_layout(
        &btf,
        "traffic_counters",
        size_of::<TrafficCounters>(),
        &[
            ("packets", offset_of!(TrafficCounters, packets)),
            ("bytes", offset_of!(TrafficCounters, bytes)),
        ],
    );
    for object in [POD_OBJECT, HOST_OBJECT] {
        let btf = btf_of(object);
        assert_layout(
            &btf,
            "endpoint_key",
            size_of::<EndpointKey>(),
            &[("ip", offset_of!(EndpointKey, ip))],
        );
        assert_layout(
            &btf,
            "endpoint_info",
            size_of::<EndpointInfo>(),
            &[
                ("ifindex", offset_of!(EndpointInfo, ifindex)),
                ("identity", offset_of!(EndpointInfo, identity)),
                ("mac", offset_of!(EndpointInfo, mac)),
                ("node_mac", offset_of!(EndpointInfo, node_mac)),
            ],
        );
        assert_layout(
            &btf,
            "ipcache_key",
            size_of::<IpcacheKey>(),
            &[
                ("prefixlen", offset_of!(IpcacheKey, prefixlen)),
                ("ip", offset_of!(IpcacheKey, ip)),
            ],
        );
        assert_eq!(
            size_of::<IpcacheKey>(),
            size_of::<aya::maps::lpm_trie::Key<u32>>(),
            "aya's LPM key must have the C key's size"
        );
        assert_layout(
            &btf,
            "ipcache_entry",
            size_of::<IpcacheEntry>(),
            &[
                ("identity", offset_of!(IpcacheEntry, identity)),
                ("tunnel_endpoint", offset_of!(IpcacheEntry, tunnel_endpoint)),
            ],
        );
        assert_layout(
            &btf,
            "node_config",
            size_of::<NodeConfig>(),
            &[
                ("routing_mode", offset_of!(NodeConfig, routing_mode)),
                ("tunnel_ifindex", offset_of!(NodeConfig, tunnel_ifindex)),
                ("node_ip", offset_of!(NodeConfig, node_ip)),
                ("cluster_id", offset_of!(NodeConfig, cluster_id)),
                (
                    "maglev_table_size",
                    offset_of!(NodeConfig, maglev_table_size),
                ),
                ("lb_hash_seed", offset_of!(NodeConfig, lb_hash_seed)),
            ],
        );
        assert_layout(
            &btf,
            "flow_event",
            size_of::<FlowEvent>(),
            &[
                ("timestamp_ns", offset_of!(FlowEvent, timestamp_ns)),
                ("src_ip", offset_of!(FlowEvent, src_ip)),
                ("dst_ip", offset_of!(FlowEvent, dst_ip)),
                ("src_port", offset_of!(FlowEvent, src_port)),
                ("dst_port", offset_of!(FlowEvent, dst_port)),
                ("ifindex", offset_of!(FlowEvent, ifindex)),
                ("length", offset_of!(FlowEvent, length)),
                ("protocol", offset_of!(FlowEvent, protocol)),
                ("verdict", offset_of!(FlowEvent, verdict)),
                ("drop_reason", offset_of!(FlowEvent, drop_reason)),
                ("tcp_flags", offset_of!(FlowEvent, tcp_flags)),
                (
                    "observation_point",
                    offset_of!(FlowEvent, observation_point),
                ),
                ("pad", offset_of!(FlowEvent, pad)),
            ],
        );
        assert_layout(
            &btf,
            "peer_set",
            size_of::<PeerSet>(),
            &[("words", offset_of!(PeerSet, words))],
        );
        assert_layout(
            &btf,
            "policy_key",
            size_of::<PolicyKey>(),
            &[
                ("prefixlen", offset_of!(PolicyKey, prefixlen)),
                ("endpoint", offset_of!(PolicyKey, endpoint)),
                ("direction", offset_of!(PolicyKey, direction)),
                ("protocol", offset_of!(PolicyKey, protocol)),
                ("port", offset_of!(PolicyKey, port)),
            ],
        );
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<PolicyKeyData>>(),
            size_of::<PolicyKey>(),
            "aya's LPM key over PolicyKeyData must be the C key"
        );
        assert_eq!(
            offset_of!(PolicyKey, endpoint) - 4,
            offset_of!(PolicyKeyData, endpoint)
        );
        assert_layout(
            &btf,
            "policy_entry",
            size_of::<PolicyEntry>(),
            &[
                ("allow", offset_of!(PolicyEntry, allow)),
                ("deny", offset_of!(PolicyEntry, deny)),
            ],
        );
        assert_layout(
            &btf,
            "endpoint_policy",
            size_of::<EndpointPolicy>(),
            &[
                (
                    "isolated_ingress",
                    offset_of!(EndpointPolicy, isolated_ingress),
                ),
                (
                    "isolated_egress",
                    offset_of!(EndpointPolicy, isolated_egress),
                ),
                ("unselected", offset_of!(EndpointPolicy, unselected)),
                ("pad", offset_of!(EndpointPolicy, pad)),
            ],
        );
        assert_layout(
            &btf,
            "ct_key",
            size_of::<CtKey>(),
            &[
                ("src_ip", offset_of!(CtKey, src_ip)),
                ("dst_ip", offset_of!(CtKey, dst_ip)),
                ("src_port", offset_of!(CtKey, src_port)),
                ("dst_port", offset_of!(CtKey, dst_port)),
                ("protocol", offset_of!(CtKey, protocol)),
                ("pad", offset_of!(CtKey, pad)),
            ],
        );
        assert_layout(
            &btf,
            "ct_entry",
            size_of::<CtEntry>(),
            &[
                ("last_seen_ns", offset_of!(CtEntry, last_seen_ns)),
                ("state", offset_of!(CtEntry, state)),
                ("opener_is_src", offset_of!(CtEntry, opener_is_src)),
                ("pad", offset_of!(CtEntry, pad)),
            ],
        );
    }
}

#[test]
fn load_balancing_types_match_the_c_structs_in_every_object() {
    for object in [POD_OBJECT, HOST_OBJECT, SOCK_OBJECT] {
        let btf = btf_of(object);
        assert_layout(
            &btf,
            "lb_frontend_key",
            size_of::<LbFrontendKey>(),
            &[
                ("address", offset_of!(LbFrontendKey, address)),
                ("port", offset_of!(LbFrontendKey, port)),
                ("protocol", offset_of!(LbFrontendKey, protocol)),
                ("pad", offset_of!(LbFrontendKey, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_frontend",
            size_of::<LbFrontend>(),
            &[
                ("service_id", offset_of!(LbFrontend, service_id)),
                ("table_id", offset_of!(LbFrontend, table_id)),
                (
                    "affinity_timeout_s",
                    offset_of!(LbFrontend, affinity_timeout_s),
                ),
                ("active_backends", offset_of!(LbFrontend, active_backends)),
                ("kind", offset_of!(LbFrontend, kind)),
                ("pad", offset_of!(LbFrontend, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_backend",
            size_of::<LbBackend>(),
            &[
                ("address", offset_of!(LbBackend, address)),
                ("port", offset_of!(LbBackend, port)),
                ("cluster_id", offset_of!(LbBackend, cluster_id)),
                ("flags", offset_of!(LbBackend, flags)),
                ("pad", offset_of!(LbBackend, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_affinity_key",
            size_of::<LbAffinityKey>(),
            &[
                ("client", offset_of!(LbAffinityKey, client)),
                ("service_id", offset_of!(LbAffinityKey, service_id)),
                ("client_kind", offset_of!(LbAffinityKey, client_kind)),
            ],
        );
        assert_layout(
            &btf,
            "lb_affinity",
            size_of::<LbAffinity>(),
            &[
                ("last_used_ns", offset_of!(LbAffinity, last_used_ns)),
                ("backend_id", offset_of!(LbAffinity, backend_id)),
                ("pad", offset_of!(LbAffinity, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_sock_key",
            size_of::<LbSockKey>(),
            &[
                ("cookie", offset_of!(LbSockKey, cookie)),
                ("address", offset_of!(LbSockKey, address)),
                ("port", offset_of!(LbSockKey, port)),
                ("pad", offset_of!(LbSockKey, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_service_addr",
            size_of::<LbServiceAddr>(),
            &[
                ("address", offset_of!(LbServiceAddr, address)),
                ("port", offset_of!(LbServiceAddr, port)),
                ("pad", offset_of!(LbServiceAddr, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_tuple",
            size_of::<LbTuple>(),
            &[
                ("saddr", offset_of!(LbTuple, saddr)),
                ("daddr", offset_of!(LbTuple, daddr)),
                ("sport", offset_of!(LbTuple, sport)),
                ("dport", offset_of!(LbTuple, dport)),
                ("protocol", offset_of!(LbTuple, protocol)),
                ("pad", offset_of!(LbTuple, pad)),
            ],
        );
        assert_layout(
            &btf,
            "lb_nat",
            size_of::<LbNat>(),
            &[
                ("saddr", offset_of!(LbNat, saddr)),
                ("daddr", offset_of!(LbNat, daddr)),
                ("sport", offset_of!(LbNat, sport)),
                ("dport", offset_of!(LbNat, dport)),
            ],
        );
        assert_layout(
            &btf,
            "lb_nat_entry",
            size_of::<LbNatEntry>(),
            &[
                ("to", offset_of!(LbNatEntry, to)),
                ("progress", offset_of!(LbNatEntry, progress)),
                ("pad", offset_of!(LbNatEntry, pad)),
                ("last_seen_ns", offset_of!(LbNatEntry, last_seen_ns)),
            ],
        );
    }
}

/// The sizes `RESIZABLE_MAPS` states as defaults are the ones the objects declare.
#[test]
fn resizable_maps_state_the_sizes_the_programs_declare() {
    let path = std::env::temp_dir().join(format!("weft-btf-sizes-{}.bpf.o", std::process::id()));
    let mut declared = std::collections::BTreeMap::new();
    for object in [POD_OBJECT, HOST_OBJECT, SOCK_OBJECT] {
        std::fs::write(&path, object).expect("write object");
        let output = Command::new("bpftool")
            .args(["-j", "btf", "dump", "file"])
            .arg(&path)
            .output()
            .expect("bpftool runs");
        let dump: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let types: std::collections::HashMap<u64, &serde_json::Value> = dump["types"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ty| Some((ty["id"].as_u64()?, ty)))
            .collect();
        let type_of = |id: &serde_json::Value| id.as_u64().and_then(|id| types.get(&id).copied());
        let maps = dump["types"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ty| ty["kind"] == "DATASEC" && ty["name"] == ".maps")
            .expect("a .maps section");
        for var in maps["vars"].as_array().into_iter().flatten() {
            let var = type_of(&var["type_id"]).expect("var");
            let definition = type_of(&var["type_id"]).expect("definition");
            let entries = definition["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|member| member["name"] == "max_entries")
                .and_then(|member| type_of(&member["type_id"]))
                .and_then(|pointer| type_of(&pointer["type_id"]))
                .and_then(|array| array["nr_elems"].as_u64());
            declared.insert(var["name"].as_str().unwrap_or_default().to_owned(), entries);
        }
    }
    let _ = std::fs::remove_file(&path);
    for (name, size) in weft_node_bpf::maps::RESIZABLE_MAPS {
        assert_eq!(
            declared.get(*name).copied().flatten(),
            Some(u64::from(*size)),
            "{name}"
        );
    }
}
