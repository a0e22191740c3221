//! Process supervision: each node's `weft-agent`, started, waited for and restarted.

use super::*;

impl Sandbox {
    pub(crate) fn start_agent(&mut self, node: &NodePlan) -> Result<(), SandboxError> {
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).map_err(|e| HostError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })?;
        let socket = dir.join("cni.sock");
        let log = dir.join("agent.log");
        let cgroup = self
            .cgroup
            .as_ref()
            .map(|root| root.join(format!("{}-{}", node.cluster, node.name)));
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "json".into(),
            "--node-name".into(),
            node.name.clone(),
            "--cluster-name".into(),
            node.cluster.clone(),
            "--cluster-id".into(),
            node.cluster_id.to_string(),
            "--pod-cidr".into(),
            node.pod_cidr.to_string(),
            "--node-ip".into(),
            node.ip.to_string(),
            "--uplink".into(),
            "eth0".into(),
            "--routing-mode".into(),
            node.routing_mode.as_flag().into(),
            "--bpffs".into(),
            self.bpffs
                .join(format!("{}-{}", node.cluster, node.name))
                .display()
                .to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--cni-socket".into(),
            socket.display().to_string(),
            "--admin-addr".into(),
            "127.0.0.1:9962".into(),
            "--observe-socket".into(),
            dir.join("observe.sock").display().to_string(),
            "--state-socket".into(),
            self.state_socket(node).display().to_string(),
        ];
        if let Some(cgroup) = &cgroup {
            args.extend(["--cgroup-root".into(), cgroup.display().to_string()]);
        }
        // A new agent knows nothing: the next save sends it everything (see `agent_state`).
        self.forget_sent(node);
        let _ = std::fs::remove_file(self.state_socket(node));
        args.extend(node.agent_args.iter().cloned());
        let pid = host::spawn_daemon(
            &self.bin_dir.join("weft-agent"),
            &args,
            Some(&node.netns),
            cgroup.as_deref(),
            &log,
        )?;
        self.agents.push(AgentState {
            cluster: node.cluster.clone(),
            node: node.name.clone(),
            pid,
            cni_socket: socket.clone(),
            log: log.clone(),
        });
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        while !socket.exists() || !self.state_socket(node).exists() {
            if Instant::now() > deadline || !process_alive(pid) {
                return Err(SandboxError::AgentDidNotStart {
                    node: node.name.clone(),
                    seconds: AGENT_START_TIMEOUT.as_secs(),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Restarts a node's agent (after it was killed, say), with the same arguments.
    pub fn restart_agent(&mut self, cluster: &str, node: &str) -> Result<(), SandboxError> {
        let plan =
            self.plan.node(cluster, node).cloned().ok_or_else(|| {
                SandboxError::Invalid(format!("no node {node} in cluster {cluster}"))
            })?;
        if let Some(index) = self
            .agents
            .iter()
            .position(|agent| agent.cluster == cluster && agent.node == node)
        {
            let old = self.agents.remove(index);
            host::stop_process(old.pid);
            let _ = std::fs::remove_file(&old.cni_socket);
        }
        self.start_agent(&plan)?;
        let restarted = self
            .agents
            .iter()
            .find(|agent| agent.cluster == cluster && agent.node == node)
            .cloned();
        self.commit(|fresh| {
            fresh
                .agents
                .retain(|agent| !(agent.cluster == plan.cluster && agent.node == plan.name));
            fresh.agents.extend(restarted);
        })
    }

    /// The Observe API socket of each node's agent.
    pub fn observe_sockets(&self) -> Vec<(String, PathBuf)> {
        self.plan
            .nodes
            .iter()
            .map(|node| (node.name.clone(), self.node_dir(node).join("observe.sock")))
            .collect()
    }
}

pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: reap if it is our child and has exited; signal 0 probes.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) != pid && libc::kill(pid, 0) == 0
    }
}
