//! The life of pods, agents and whole sandboxes: what CNI DEL frees, what survives an agent
//! crash, and what `sandbox down` leaves behind (nothing).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use weft_e2e::sandbox::{
    answered_by, host_veths, http_get, in_netns, ipam_allocations, TestSandbox,
};
use weft_sandbox::{host, Sandbox};

fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

#[test]
fn cni_del_frees_the_address_and_removes_the_links() {
    let mut sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml]}\n",
        &[("pods.yaml", &pod("stays", "n1"))],
    );
    let node_ns = sandbox.node_netns("c1", "n1");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("late.yaml");
    std::fs::write(&file, pod("late", "n1")).expect("write");

    sandbox.sandbox.apply(None, &file).expect("apply");
    let late = sandbox.pod("late").clone();
    assert_eq!(host_veths(&node_ns).len(), 2);
    assert!(ipam_allocations(&sandbox, "c1", "n1").contains(&late.ip.to_string()));
    let pins = sandbox.sandbox.bpffs.join("c1-n1/weft/links");
    let pinned = |pins: &Path| std::fs::read_dir(pins).map(|d| d.count()).unwrap_or(0);
    let pins_with_late = pinned(&pins);

    sandbox.sandbox.delete(None, &file).expect("delete");
    assert_eq!(host_veths(&node_ns).len(), 1, "the pod's veth is gone");
    assert!(
        !ipam_allocations(&sandbox, "c1", "n1").contains(&late.ip.to_string()),
        "its address is free"
    );
    assert_eq!(
        pinned(&pins),
        pins_with_late - 2,
        "both of its link pins are gone"
    );
    assert!(
        !host::netns_path(&late.netns).exists(),
        "its namespace is gone"
    );
    let stays = sandbox.pod("stays");
    let body = http_get(&node_ns, stays.ip, 8080).expect("the other pod still answers");
    assert_eq!(answered_by(&body), "stays");
}

fn leftovers(name: &str, pids: &[u32]) -> Vec<String> {
    let prefix = weft_sandbox::plan::prefix_for(name);
    let mut found = Vec::new();
    found.extend(
        host::netns_with_prefix(&format!("{prefix}-"))
            .into_iter()
            .map(|n| format!("netns {n}")),
    );
    if let Some(root) = host::cgroup2_root() {
        if root.join(&prefix).exists() {
            found.push(format!("cgroup {prefix}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let run_dir = Path::new(weft_sandbox::RUN_ROOT).join(name);
    if mounts.contains(&run_dir.display().to_string()) {
        found.push("bpffs mount".into());
    }
    if run_dir.exists() {
        found.push(format!("{}", run_dir.display()));
    }
    for pid in pids {
        // SAFETY: signal 0 probes; reaping first so our own exited children do not count.
        let alive = unsafe {
            libc::waitpid(*pid as i32, std::ptr::null_mut(), libc::WNOHANG);
            libc::kill(*pid as i32, 0) == 0
        };
        if alive {
            found.push(format!("process {pid}"));
        }
    }
    found
}

#[test]
fn sandbox_down_leaves_nothing_even_after_a_crash() {
    for crash in [false, true] {
        let sandbox = TestSandbox::up(
            "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml]}\n",
            &[("pods.yaml", &[pod("a", "n1"), pod("b", "n2")].concat())],
        );
        let name = sandbox.name.clone();
        let pids: Vec<u32> = sandbox
            .sandbox
            .agents
            .iter()
            .map(|a| a.pid)
            .chain(sandbox.sandbox.pods.iter().map(|p| p.server_pid))
            .collect();
        if crash {
            // The CLI died mid-way and lost its state: `down` must find everything by name.
            std::fs::remove_file(sandbox.sandbox.run_dir.join("state.json")).expect("drop state");
        }
        Sandbox::down(&name);
        assert_eq!(
            leftovers(&name, &pids),
            Vec::<String>::new(),
            "crash: {crash}"
        );
        Sandbox::down(&name); // repeating is harmless
        drop(sandbox);
    }
}

#[test]
fn killing_an_agent_under_load_keeps_connections_and_new_pods_wait_for_it() {
    let mut sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml]}\n",
        &[(
            "pods.yaml",
            &[pod("client", "n1"), pod("server", "n2")].concat(),
        )],
    );
    let (client, server) = (sandbox.pod("client").clone(), sandbox.pod("server").clone());

    let mut iperf_server = host::in_namespaces(
        Command::new("iperf3")
            .args(["-s", "-1", "-p", "5201"])
            .stdout(Stdio::null()),
        Some(&server.netns),
        None,
    )
    .expect("prepare iperf3 server")
    .spawn()
    .expect("iperf3 -s (make deps installs iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let iperf_client = host::in_namespaces(
        Command::new("iperf3")
            .args([
                "-c",
                &server.ip.to_string(),
                "-p",
                "5201",
                "-t",
                "6",
                "-i",
                "1",
                "-J",
            ])
            .stdout(Stdio::piped()),
        Some(&client.netns),
        None,
    )
    .expect("prepare iperf3 client")
    .spawn()
    .expect("iperf3 -c");

    std::thread::sleep(Duration::from_secs(2));
    let agent = sandbox
        .sandbox
        .agents
        .iter()
        .find(|a| a.node == "n1")
        .expect("agent of n1")
        .clone();
    // SAFETY: SIGKILL to the agent this sandbox started.
    unsafe { libc::kill(agent.pid as i32, libc::SIGKILL) };

    // A pod created while the agent is gone waits for it, as with kubelet retrying.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("late.yaml");
    std::fs::write(&file, pod("late", "n1")).expect("write");
    let name = sandbox.name.clone();
    let (done, finished) = mpsc::channel();
    let applier = std::thread::spawn(move || {
        let result = Sandbox::load(Some(&name)).and_then(|mut s| s.apply(None, &file));
        let _ = done.send(result.map_err(|e| e.to_string()));
    });
    assert!(
        finished.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a pod must not be wired while its node's agent is down"
    );

    let iperf = iperf_client
        .wait_with_output()
        .expect("iperf3 client finishes");
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let report: serde_json::Value =
        serde_json::from_slice(&iperf.stdout).expect("iperf3 JSON report");
    assert!(
        iperf.status.success() && report.get("error").is_none(),
        "the connection broke: {report}"
    );
    let intervals = report["intervals"].as_array().expect("intervals");
    assert!(intervals.len() >= 6, "{} intervals", intervals.len());
    for interval in intervals {
        assert!(
            interval["sum"]["bytes"].as_f64().unwrap_or(0.0) > 0.0,
            "traffic stalled while the agent was down: {interval}"
        );
    }

    sandbox
        .sandbox
        .restart_agent("c1", "n1")
        .expect("restart the agent");
    let applied = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiting pod is wired once the agent is back");
    applier.join().expect("applier thread");
    assert_eq!(applied, Ok(vec!["pod/late created".to_owned()]));
    sandbox.reload();
    let late = sandbox.pod("late").clone();
    let body = in_netns(&server.netns, || http_get(&server.netns, late.ip, 8080))
        .expect("reach the late pod");
    assert_eq!(answered_by(&body), "late");
    assert_eq!(
        sandbox
            .sandbox
            .agents
            .iter()
            .filter(|a| a.node == "n1")
            .count(),
        1,
        "the restarted agent replaced the old one in the state"
    );
}
