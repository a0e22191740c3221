//! Maps at capacity, and maps that return to their size.
//!
//! A full map never leaves an endpoint half-programmed or less isolated than its policy says:
//! CNI ADD is refused with the reason and succeeds once there is room (the runtime retries);
//! a policy that does not fit denies what is missing. Either is said once in the log, as
//! `weft_agent_map_full{map}`, and in `weftctl policy status`, and clears with room. Pods that
//! come and go leave nothing behind in any map.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft_e2e::bpffs::pinned_map_sizes;
use weft_e2e::sandbox::{
    agent_metric, echo_reachable, host_veths, http_get, in_netns, ipam_allocations, policy_status,
    until, TestSandbox,
};
use weft_sandbox::Sandbox;

fn pod(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: echo, containerPort: 9000}}\n---\n"
    )
}

fn write(dir: &Path, name: &str, yaml: &str) -> std::path::PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, yaml).expect("write manifest");
    file
}

fn map_full(sandbox: &TestSandbox, map: &str) -> Option<f64> {
    agent_metric(
        sandbox,
        "c1",
        "n1",
        &format!("weft_agent_map_full{{map=\"{map}\"}}"),
    )
}

fn agent_log(sandbox: &TestSandbox) -> String {
    let path = sandbox.sandbox.run_dir.join("nodes/c1-n1/agent.log");
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Link pins of the node's agent: two per wired pod.
fn link_pins(sandbox: &TestSandbox) -> usize {
    std::fs::read_dir(sandbox.sandbox.bpffs.join("c1-n1/weft/links"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[test]
fn a_full_endpoint_map_holds_add_until_a_pod_leaves_and_leaves_nothing_half_wired() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml], agentArgs: [--map-entries, endpoints=2]}\n",
        &[("pods.yaml", &[pod("first", "web"), pod("second", "web")].concat())],
    );
    let node_ns = sandbox.node_netns("c1", "n1");
    let pins_with_two = link_pins(&sandbox);
    let dir = tempfile::tempdir().expect("tempdir");
    let third = write(dir.path(), "third.yaml", &pod("third", "web"));
    let first = write(dir.path(), "first.yaml", &pod("first", "web"));

    // The third pod's ADD is refused while the map is full; the runtime (the sandbox, as
    // kubelet) retries it.
    let name = sandbox.name.clone();
    let adding = std::thread::spawn(move || {
        Sandbox::load(Some(&name))
            .expect("state")
            .apply(None, &third)
    });
    until(
        "the full endpoint map is reported",
        Duration::from_secs(30),
        || match (map_full(&sandbox, "endpoints"), policy_status(&sandbox)) {
            (Some(full), (false, status))
                if full == 1.0 && status.contains("map endpoints (2 entries) is full") =>
            {
                Ok(())
            }
            (full, status) => Err(format!("metric {full:?}, status {status:?}")),
        },
    );
    // Between the runtime's attempts nothing of the refused pod is wired: no address, veth
    // or link held for it (each attempt takes them and gives them back).
    until(
        "a refused ADD leaves nothing wired",
        Duration::from_secs(10),
        || {
            let wired = (
                ipam_allocations(&sandbox, "c1", "n1").len(),
                host_veths(&node_ns).len(),
                link_pins(&sandbox),
            );
            match wired == (2, 2, pins_with_two) {
                true => Ok(()),
                false => Err(format!("(addresses, veths, link pins) = {wired:?}")),
            }
        },
    );
    assert!(
        !adding.is_finished(),
        "ADD waits for room (retried), it does not fail for good"
    );
    let second = sandbox.pod("second").clone();
    assert!(
        echo_reachable(&node_ns, SocketAddr::from((second.ip, 9000)), 3),
        "the pods already wired keep working"
    );

    // A pod leaves: the retried ADD fits.
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .delete(None, &first)
        .expect("delete the first pod");
    adding
        .join()
        .expect("apply thread")
        .expect("the third pod is wired once there is room");
    let mut sandbox = sandbox;
    sandbox.reload();
    let third = sandbox.pod("third").clone();
    assert!(
        echo_reachable(&node_ns, SocketAddr::from((third.ip, 9000)), 3),
        "the third pod is reachable"
    );
    until(
        "the map is no longer reported full",
        Duration::from_secs(20),
        || match (map_full(&sandbox, "endpoints"), policy_status(&sandbox)) {
            (Some(0.0), (true, _)) => Ok(()),
            (full, status) => Err(format!("metric {full:?}, status {status:?}")),
        },
    );

    // However many times ADD was refused, nothing of those attempts stayed: two pods, two
    // veths, two addresses, their link pins, and one warning in the log.
    assert_eq!(host_veths(&node_ns).len(), 2, "{:?}", host_veths(&node_ns));
    assert_eq!(ipam_allocations(&sandbox, "c1", "n1").len(), 2);
    assert_eq!(link_pins(&sandbox), pins_with_two);
    let log = agent_log(&sandbox);
    let warnings = log
        .lines()
        .filter(|line| line.contains("a datapath map is full") && line.contains("endpoints"))
        .count();
    assert_eq!(warnings, 1, "said once, not on every retry");
    assert!(
        !log.lines()
            .any(|line| line.contains("\"ERROR\"") && line.contains("is full")),
        "no error line per refused ADD"
    );
}

/// Ingress to `model` from `gateway`, on `ports` ports 9000, 9002, ...: each a port entry of
/// its own in the policy map.
fn gateway_only(ports: u16) -> String {
    let ports: String = (0..ports)
        .map(|i| format!("      - {{port: \"{}\", protocol: TCP}}\n", 9000 + 2 * i))
        .collect();
    format!("apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: model, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: model}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: gateway}}}}]\n    toPorts:\n    - ports:\n{ports}")
}

#[test]
fn a_policy_the_policy_map_cannot_hold_denies_what_is_missing_and_says_so() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [pods.yaml, policy.yaml], agentArgs: [--map-entries, policy_entries=48]}\n",
        &[
            (
                "pods.yaml",
                &[
                    pod("model", "model"),
                    pod("gateway", "gateway"),
                    pod("intruder", "intruder"),
                ]
                .concat(),
            ),
            ("policy.yaml", &gateway_only(1)),
        ],
    );
    let model = SocketAddr::from((sandbox.pod("model").ip, 9000));
    let gateway = sandbox.pod("gateway").clone();
    let intruder = sandbox.pod("intruder").clone();
    // The agent takes the policy up on its next pass.
    until(
        "the policy is in force",
        Duration::from_secs(20),
        || match echo_reachable(&intruder.netns, model, 1) {
            false => Ok(()),
            true => Err("the intruder still reaches the model".into()),
        },
    );
    assert!(echo_reachable(&gateway.netns, model, 3));
    assert_eq!(
        map_full(&sandbox, "policy_entries"),
        Some(0.0),
        "not full yet"
    );

    // 40 ports need about 100 entries: they do not fit in 48.
    let dir = tempfile::tempdir().expect("tempdir");
    let big = write(dir.path(), "policy.yaml", &gateway_only(40));
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &big)
        .expect("apply");
    until(
        "the full policy map is reported",
        Duration::from_secs(20),
        || match (
            map_full(&sandbox, "policy_entries"),
            policy_status(&sandbox),
        ) {
            (Some(full), (false, status))
                if full == 1.0 && status.contains("map policy_entries (48 entries) is full") =>
            {
                Ok(())
            }
            (full, status) => Err(format!("metric {full:?}, status {status:?}")),
        },
    );
    // Never less isolated than the policy says: the intruder stays out, on every port the
    // policy names and on those it does not.
    for port in [9000, 9002, 9078, 8080] {
        assert!(
            !echo_reachable(&intruder.netns, SocketAddr::from((model.ip(), port)), 1),
            "the intruder reached the model on {port}"
        );
    }
    assert!(
        http_get(&intruder.netns, model.ip(), 8080).is_err(),
        "nor the pod's other ports"
    );

    // The policy shrinks to what fits: the map has room again, the gateway gets in.
    let small = write(dir.path(), "policy.yaml", &gateway_only(2));
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &small)
        .expect("apply");
    until(
        "the policy map is no longer reported full",
        Duration::from_secs(20),
        || match (
            map_full(&sandbox, "policy_entries"),
            policy_status(&sandbox),
        ) {
            (Some(0.0), (true, _)) => Ok(()),
            (full, status) => Err(format!("metric {full:?}, status {status:?}")),
        },
    );
    assert!(echo_reachable(&gateway.netns, model, 3));
    assert!(!echo_reachable(&intruder.netns, model, 1));
    let warnings = agent_log(&sandbox)
        .lines()
        .filter(|line| line.contains("a datapath map is full"))
        .count();
    assert_eq!(warnings, 1, "said once, not on every pass");
}

/// Runs `work` on each file at once, each with its own view of the sandbox's state.
fn in_parallel(
    name: &str,
    files: &[std::path::PathBuf],
    work: impl Fn(&mut Sandbox, &Path) -> Result<(), weft_sandbox::SandboxError> + Sync,
) {
    std::thread::scope(|scope| {
        let runs: Vec<_> = files
            .iter()
            .map(|file| {
                let work = &work;
                scope.spawn(move || {
                    let mut sandbox = Sandbox::load(Some(name)).expect("state");
                    work(&mut sandbox, file)
                        .unwrap_or_else(|error| panic!("{}: {error}", file.display()))
                })
            })
            .collect();
        for run in runs {
            run.join().expect("thread");
        }
    });
}

/// Pods of the churn test, by wave: `WAVE_PODS` at a time fit the node's /24.
const WAVES: usize = 20;
const WAVE_PODS: usize = 250;

#[test]
fn five_thousand_pods_come_and_go_and_every_map_returns_to_its_size() {
    // A policy selects every churned pod, so each has policy state and port entries.
    let policy = "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: churn, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: churn}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: churn}}]\n    toPorts:\n    - ports:\n      - {port: \"9000\", protocol: TCP}\n";
    let sandbox = TestSandbox::up(
        // Closed connections are kept five minutes, far beyond the test: each must go with
        // its endpoint, not by its lifetime.
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1], manifests: [policy.yaml], agentArgs: [--ct-lifetime-closing, 300s]}\n",
        &[("policy.yaml", policy)],
    );
    let node_ns = sandbox.node_netns("c1", "n1");
    let maps = sandbox.sandbox.bpffs.join("c1-n1/weft");
    let before = pinned_map_sizes(&maps);
    assert!(
        before.contains_key("endpoints") && before.contains_key("conntrack"),
        "{before:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wired_at_peak = 0;
    let mut held = Vec::new();
    for wave in 0..WAVES {
        // Two runtimes' worth of requests at once, as a node starting many pods sees them.
        let halves: Vec<std::path::PathBuf> = (0..2)
            .map(|half| {
                let pods: String = (half * WAVE_PODS / 2..(half + 1) * WAVE_PODS / 2)
                    .map(|i| pod(&format!("w{wave}-{i}"), "churn"))
                    .collect();
                write(dir.path(), &format!("wave-{half}.yaml"), &pods)
            })
            .collect();
        in_parallel(&sandbox.name, &halves, |sandbox, file| {
            sandbox.apply(None, file).map(drop)
        });
        let state = Sandbox::load(Some(&sandbox.name)).expect("state");
        let pod = |i: usize| {
            state
                .pod(&format!("w{wave}-{i}"), None, None)
                .expect("pod")
                .clone()
        };
        // Traffic leaves its marks (connections, counters): from the node to some pods, and
        // between pods the policy lets talk. Some connections are still open when their pods
        // go, as they are when a busy pod is deleted: tracked as established, they would
        // outlive it by hours were they not forgotten with it.
        held.extend((0..5).map(|i| open_connection(&node_ns, SocketAddr::from((pod(i).ip, 9000)))));
        for i in 0..5 {
            let (from, to) = (pod(i), pod(WAVE_PODS - 1 - i));
            assert!(echo_reachable(&node_ns, SocketAddr::from((to.ip, 9000)), 3));
            assert!(
                echo_reachable(&from.netns, SocketAddr::from((to.ip, 9000)), 3),
                "wave {wave}: {} cannot reach {}",
                from.name,
                to.name
            );
        }
        if wave == 0 {
            let during = pinned_map_sizes(&maps);
            wired_at_peak = during["endpoints"];
            assert!(during["conntrack"] > before["conntrack"], "{during:?}");
        }
        in_parallel(&sandbox.name, &halves, |sandbox, file| {
            sandbox.delete(None, file).map(drop)
        });
    }
    assert_eq!(wired_at_peak, before["endpoints"] + WAVE_PODS);
    // Removal from the policy maps follows on the agent's next pass, and the connections of
    // a removed endpoint are forgotten off the agent's lock: poll.
    let mut last = BTreeMap::new();
    until(
        "every map is back to its size",
        Duration::from_secs(30),
        || {
            last = pinned_map_sizes(&maps);
            match last == before {
                true => Ok(()),
                false => Err(format!("before {before:?}, now {last:?}")),
            }
        },
    );
    assert!(ipam_allocations(&sandbox, "c1", "n1").is_empty());
    assert!(host_veths(&node_ns).is_empty());
    drop(held);
}

/// An echo connection from `netns` to `target`, left open.
fn open_connection(netns: &str, target: SocketAddr) -> std::net::TcpStream {
    use std::io::{Read, Write};
    in_netns(netns, || {
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .unwrap_or_else(|error| panic!("connect to {target}: {error}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut reply = [0u8; 2];
        stream.write_all(b"hi").expect("send");
        stream.read_exact(&mut reply).expect("echo");
        stream
    })
}
