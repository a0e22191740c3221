//! A restarted (or upgraded) agent brings running pods onto the programs it loaded, and never
//! hands its programs a pinned map of another layout: such a map is recreated and repopulated
//! before the pods' programs are replaced, and pods lose no packet meanwhile.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::TestSandbox;
use weft_sandbox::host;

fn pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

/// (key size, value size) of a pinned map, from `bpftool map show`.
fn layout(pin: &std::path::Path) -> Option<(u64, u64)> {
    let output = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .ok()?;
    let map: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    Some((map["bytes_key"].as_u64()?, map["bytes_value"].as_u64()?))
}

#[test]
fn a_map_of_another_layout_is_recreated_and_pods_move_to_the_new_programs_without_loss() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml]}\n",
        &[("pods.yaml", &[pod("a"), pod("b")].concat())],
    );
    let (a, b) = (sandbox.pod("a").clone(), sandbox.pod("b").clone());
    let pin = sandbox.sandbox.bpffs.join("c1-n1/weft/conntrack");
    let current = layout(&pin).expect("the agent pinned its connection tracking table");

    // 8 s of pings every 10 ms, through the whole restart.
    let mut ping = Command::new("ping");
    ping.args(["-q", "-i", "0.01", "-c", "800", "-W", "1"])
        .arg(b.ip.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ping = host::in_namespaces(&mut ping, Some(&a.netns), None)
        .expect("prepare ping")
        .spawn()
        .expect("start ping");

    // An earlier version left a table of another layout at the pin.
    sandbox.stop_agent("c1", "n1");
    std::fs::remove_file(&pin).expect("unpin the table");
    let injected = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "8",
            "entries",
            "1024",
            "name",
            "conntrack",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        injected.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&injected.stderr)
    );
    assert_eq!(layout(&pin), Some((16, 8)));

    let mut sandbox = sandbox;
    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart the agent");
    let log = sandbox
        .sandbox
        .agents
        .iter()
        .find(|agent| agent.node == "n1")
        .expect("agent")
        .log
        .clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("adopted endpoints now run this agent's programs") {
            assert!(
                text.contains("a pinned map has another layout than these programs"),
                "the recreation is logged"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pods never moved to the new programs; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        layout(&pin),
        Some(current),
        "the table was recreated with this version's layout"
    );

    let output = ping.wait_with_output().expect("ping finishes");
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "packets were lost through the restart: {summary}"
    );
}

/// A map's id, from `bpftool map show`: a new id is a new map.
fn map_id(pin: &std::path::Path) -> Option<u64> {
    let output = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .ok()?;
    let map: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    map["id"].as_u64()
}

/// Waits until the restarted agent has moved the pods to its programs; its log.
fn wait_for_adoption(sandbox: &TestSandbox) -> String {
    let log = sandbox
        .sandbox
        .agents
        .iter()
        .find(|agent| agent.node == "n1")
        .expect("agent")
        .log
        .clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("adopted endpoints now run this agent's programs") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the pods never moved to the new programs; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_map_whose_recorded_layout_differs_is_recreated_even_with_the_same_sizes() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml]}\n",
        &[("pods.yaml", &[pod("a"), pod("b")].concat())],
    );
    let (a, b) = (sandbox.pod("a").clone(), sandbox.pod("b").clone());
    let pins = sandbox.sandbox.bpffs.join("c1-n1/weft");
    let endpoints = pins.join("endpoints");
    let (endpoints_id, ipcache_id) = (
        map_id(&endpoints).expect("endpoints pinned"),
        map_id(&pins.join("ipcache")).expect("ipcache pinned"),
    );
    let sizes = layout(&endpoints).expect("endpoints layout");

    // An earlier version recorded another layout for the endpoint table, of the same sizes (a
    // field reordered, say).
    sandbox.stop_agent("c1", "n1");
    let mut key = vec!["key".to_string(), "hex".to_string()];
    let mut name = b"endpoints".to_vec();
    name.resize(64, 0);
    key.extend(name.iter().map(|byte| format!("{byte:02x}")));
    let updated = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(pins.join("map_layouts"))
        .args(&key)
        .args([
            "value", "hex", "01", "02", "03", "04", "05", "06", "07", "08",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        updated.status.success(),
        "bpftool map update: {}",
        String::from_utf8_lossy(&updated.stderr)
    );

    let mut sandbox = sandbox;
    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart the agent");
    let log = wait_for_adoption(&sandbox);
    assert!(
        log.contains("a pinned map has another layout than these programs"),
        "the recreation is logged"
    );
    assert_ne!(
        map_id(&endpoints),
        Some(endpoints_id),
        "the endpoint table is new"
    );
    assert_eq!(layout(&endpoints), Some(sizes));
    assert_eq!(
        map_id(&pins.join("ipcache")),
        Some(ipcache_id),
        "a map whose layout is unchanged is kept"
    );
    // Repopulated: the pods reach each other through the new table.
    let mut ping = Command::new("ping");
    ping.args(["-c", "3", "-W", "1"]).arg(b.ip.to_string());
    let pinged = host::in_namespaces(&mut ping, Some(&a.netns), None)
        .expect("prepare ping")
        .output()
        .expect("ping");
    assert!(
        pinged.status.success(),
        "a cannot reach b after the table was recreated: {}",
        String::from_utf8_lossy(&pinged.stdout)
    );
}

/// `bpftool map show`'s max_entries of a pinned map.
fn max_entries(pin: &std::path::Path) -> Option<u64> {
    let output = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .ok()?;
    let map: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    map["max_entries"].as_u64()
}

#[test]
fn map_sizes_are_set_by_the_agents_flags() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml], agentArgs: [--map-entries, endpoints=8192, --map-entries, endpoint_policies=8192, --map-entries, ipcache=131072, --ct-max-entries, '70000', --nat-max-entries, '90000']}\n",
        &[("pods.yaml", &pod("a"))],
    );
    let pins = sandbox.sandbox.bpffs.join("c1-n1/weft");
    for (map, entries) in [
        ("endpoints", 8192),
        ("endpoint_policies", 8192),
        ("ipcache", 131072),
        ("conntrack", 70000),
        ("lb_flows", 90000),
        ("lb_reverse", 90000),
        // Not named: as the programs declare it.
        ("endpoint_counters", 4096),
    ] {
        assert_eq!(max_entries(&pins.join(map)), Some(entries), "{map}");
    }
}
