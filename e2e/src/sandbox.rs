//! A sandbox for one test: brought up from a config the test writes, torn down when dropped
//! (also when the test fails), with helpers that talk from inside pods and nodes.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weft_sandbox::{default_bin_dir, host, PodState, Sandbox};

pub struct TestSandbox {
    pub sandbox: Sandbox,
    pub name: String,
    _dir: tempfile::TempDir,
}

/// A sandbox name unique to this process and call (sandbox names are at most 12 characters).
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "e{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestSandbox {
    /// `clusters` is the YAML list under `clusters:`; `files` are (relative path, content)
    /// pairs written next to the config, which the clusters' `manifests` can name.
    pub fn up(clusters: &str, files: &[(&str, &str)]) -> Self {
        let name = unique_name();
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, content).expect("write manifest");
        }
        let config = dir.path().join("sandbox.yaml");
        std::fs::write(&config, format!("name: {name}\nclusters:\n{clusters}"))
            .expect("write config");
        let guard = Self {
            // A failed `up` must still be torn down: build the guard around an empty state.
            sandbox: match Sandbox::up(&config, &default_bin_dir()) {
                Ok(sandbox) => sandbox,
                Err(error) => {
                    Sandbox::down(&name);
                    panic!("sandbox up failed: {error}");
                }
            },
            name,
            _dir: dir,
        };
        guard
    }

    pub fn pod(&self, name: &str) -> &PodState {
        self.sandbox.pod(name, None, None).expect("pod exists")
    }

    pub fn reload(&mut self) {
        self.sandbox = Sandbox::load(Some(&self.name)).expect("reload state");
    }

    /// Stops a node's agent (as a crash would; the sandbox still lists it, so
    /// `restart_agent` brings it back and teardown finds nothing to stop).
    pub fn stop_agent(&self, cluster: &str, node: &str) {
        let agent = self
            .sandbox
            .agents
            .iter()
            .find(|agent| agent.cluster == cluster && agent.node == node)
            .unwrap_or_else(|| panic!("no agent on {cluster}/{node}"))
            .pid;
        weft_sandbox::host::stop_process(agent);
    }

    pub fn node_netns(&self, cluster: &str, node: &str) -> String {
        self.sandbox
            .plan
            .node(cluster, node)
            .expect("node")
            .netns
            .clone()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        Sandbox::down(&self.name);
    }
}

/// Runs `work` on a thread inside the named network namespace.
pub fn in_netns<T: Send>(netns: &str, work: impl FnOnce() -> T + Send) -> T {
    let file = File::open(host::netns_path(netns)).expect("open netns");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a valid namespace fd; only this thread moves.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "setns"
                );
                work()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// An HTTP GET of `/` from inside `netns`; the response body, or the error.
pub fn http_get(netns: &str, ip: impl std::fmt::Display, port: u16) -> Result<String, String> {
    http_get_path(netns, ip, port, "/")
}

/// An HTTP GET of `path` from inside `netns`; the response body, or the error.
pub fn http_get_path(
    netns: &str,
    ip: impl std::fmt::Display,
    port: u16,
    path: &str,
) -> Result<String, String> {
    http_response(netns, ip, port, path).map(|(_, body)| body)
}

/// An HTTP GET of `path` from inside `netns`: the response's status and body, or the error.
pub fn http_response(
    netns: &str,
    ip: impl std::fmt::Display,
    port: u16,
    path: &str,
) -> Result<(u16, String), String> {
    let target: SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .map_err(|e| format!("connect to {target}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: sandbox\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| format!("read from {target}: {e}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response from {target}: {response:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no HTTP status from {target}: {head:?}"))?;
        Ok((status, body.to_owned()))
    })
}

/// The `pod` field of an echo server's HTTP answer: who answered.
pub fn answered_by(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|reply| reply["pod"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<unreadable answer {body:?}>"))
}

/// Runs a command inside a pod's namespace and returns its output.
pub fn run_in_pod(pod: &PodState, program: &str, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(program);
    command.args(args);
    host::in_namespaces(&mut command, Some(&pod.netns), pod.cgroup.as_deref())
        .expect("prepare command")
        .output()
        .expect("run command")
}

/// Flows from `weftctl observe -o json` for this sandbox, with extra filter arguments.
pub fn observe(sandbox: &TestSandbox, filters: &[&str]) -> Vec<serde_json::Value> {
    let output = std::process::Command::new(default_bin_dir().join("weftctl"))
        .args([
            "observe",
            "--sandbox",
            &sandbox.name,
            "-o",
            "json",
            "--last",
            "500",
        ])
        .args(filters)
        .output()
        .expect("run weftctl observe");
    assert!(
        output.status.success(),
        "weftctl observe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line per flow"))
        .collect()
}

/// (source pod, destination pod, observation point, node) of a flow from [`observe`].
pub fn flow_ends(flow: &serde_json::Value) -> (String, String, String, String) {
    let flow = &flow["flow"];
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
    (
        text(&flow["source"]["pod_name"]),
        text(&flow["destination"]["pod_name"]),
        text(&flow["trace_observation_point"]),
        text(&flow["node_name"]),
    )
}

/// Asserts the TCP connection from pod `from` to pod `to` was observed leaving `from`'s node
/// and arriving at `to`'s node, named at both ends.
pub fn assert_connection_observed(sandbox: &TestSandbox, from: &PodState, to: &PodState) {
    let flows = observe(
        sandbox,
        &[
            "--pod",
            &format!("{}/{}", to.namespace, to.name),
            "--protocol",
            "TCP",
        ],
    );
    let seen: Vec<_> = flows.iter().map(flow_ends).collect();
    for (point, node) in [("FROM_ENDPOINT", &from.node), ("TO_ENDPOINT", &to.node)] {
        let expected = (
            from.name.clone(),
            to.name.clone(),
            point.to_owned(),
            node.clone(),
        );
        assert!(
            seen.contains(&expected),
            "{} -> {} not observed at {point} on {node}: {seen:?}",
            from.name,
            to.name
        );
    }
}

/// Polls `check` until it holds, every 200 ms (a condition in another process, seen through
/// files, metrics or packets, has no event to wait on); panics with `what` and the last reason
/// after `timeout`.
pub fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `weftctl policy status` for the sandbox: whether it succeeded, and what it printed.
pub fn policy_status(sandbox: &TestSandbox) -> (bool, String) {
    let output = Command::new(default_bin_dir().join("weftctl"))
        .args(["policy", "status", "--sandbox", &sandbox.name])
        .output()
        .expect("run weftctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The container IDs holding an address on `cluster`/`node` (its agent's IPAM state).
pub fn ipam_allocations(sandbox: &TestSandbox, cluster: &str, node: &str) -> Vec<String> {
    let path = sandbox
        .sandbox
        .node_state_dir(cluster, node)
        .join("ipam.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("ipam state")).expect("json");
    state["allocations"]
        .as_object()
        .map(|allocations| allocations.keys().cloned().collect())
        .unwrap_or_default()
}

/// The pods' host-side veths in a node's namespace.
pub fn host_veths(netns: &str) -> Vec<String> {
    let json = host::ip(&["-n", netns, "-j", "link", "show"]).expect("ip link");
    let links: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
    links
        .iter()
        .filter_map(|link| link["ifname"].as_str())
        .filter(|name| name.starts_with("wc"))
        .map(str::to_owned)
        .collect()
}

/// A metric's value on the admin endpoint of `cluster`/`node`'s agent, if it is exported.
pub fn agent_metric(sandbox: &TestSandbox, cluster: &str, node: &str, name: &str) -> Option<f64> {
    let netns = sandbox.node_netns(cluster, node);
    let metrics = http_get_path(&netns, "127.0.0.1", 9962, "/metrics").ok()?;
    metrics.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// Whether an echo exchange with `target` completes from `netns`, trying up to `tries` times
/// (so a loaded machine's slow first packet is not taken for a drop; a drop fails every try).
pub fn echo_reachable(netns: &str, target: SocketAddr, tries: usize) -> bool {
    (0..tries).any(|_| {
        in_netns(netns, || {
            let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_millis(700))
            else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(700)));
            let mut reply = [0u8; 2];
            stream.write_all(b"hi").is_ok()
                && stream.read_exact(&mut reply).is_ok()
                && &reply == b"hi"
        })
    })
}

/// Gives the fabric namespace `address` (in the fabric's /16): a client outside every cluster,
/// gone with the sandbox.
pub fn address_on_fabric(sandbox: &TestSandbox, address: Ipv4Addr) {
    host::ip(&[
        "-n",
        &sandbox.sandbox.plan.fabric_netns,
        "addr",
        "add",
        &format!("{address}/16"),
        "dev",
        "fabric0",
    ])
    .expect("address the fabric");
}

/// A host on the fabric, outside every cluster, serving HTTP on port 8080 at each of its
/// addresses; stopped when dropped.
pub struct OutsideHost(Child);

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an [`OutsideHost`] at `addresses` (in the fabric's /16). The fabric routes each
/// node's pod CIDR to that node, as a routed network would. Returns once it answers.
pub fn outside_host(sandbox: &TestSandbox, addresses: &[Ipv4Addr]) -> OutsideHost {
    let fabric = &sandbox.sandbox.plan.fabric_netns;
    for address in addresses {
        address_on_fabric(sandbox, *address);
    }
    for node in &sandbox.sandbox.plan.nodes {
        let (cidr, via) = (node.pod_cidr.to_string(), node.ip.to_string());
        // Another outside host may have routed it already.
        let _ = host::ip(&["-n", fabric, "route", "replace", &cidr, "via", &via]);
    }
    let mut command = Command::new(default_bin_dir().join("weftctl"));
    command
        .args([
            "sandbox",
            "serve",
            "--pod",
            "outside",
            "--namespace",
            "-",
            "--node",
            "-",
            "--cluster",
            "-",
        ])
        .args([
            "--ports",
            r#"[{"port":8080,"protocol":"TCP","name":"http"}]"#,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = host::in_namespaces(&mut command, Some(fabric), None)
        .expect("prepare")
        .spawn()
        .expect("serve");
    let outside = OutsideHost(child);
    let first = SocketAddr::from((addresses[0], 8080));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_netns(fabric, || {
        TcpStream::connect_timeout(&first, Duration::from_millis(200)).is_ok()
    }) {
        assert!(Instant::now() < deadline, "the outside host never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    outside
}
