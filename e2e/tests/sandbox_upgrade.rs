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
