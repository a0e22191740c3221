//! The container runtime's part: a pod's namespace, `weft-cni` ADD/DEL as a runtime runs it
//! (retrying "try again later" as kubelet does), and its echo server.

use super::*;

impl Sandbox {
    pub(crate) fn create_pod(
        &mut self,
        cluster: &str,
        pod: &SandboxPod,
    ) -> Result<(), SandboxError> {
        let node = self.plan.node(cluster, &pod.node).cloned().ok_or_else(|| {
            SandboxError::Invalid(format!("pod {} names unknown node {}", pod.name, pod.node))
        })?;
        if self
            .pods
            .iter()
            .any(|p| p.cluster == cluster && p.namespace == pod.namespace && p.name == pod.name)
        {
            return Err(SandboxError::Invalid(format!(
                "pod {}/{} already exists in cluster {cluster}",
                pod.namespace, pod.name
            )));
        }
        let identity =
            self.acquire_identity(cluster, node.cluster_id, &pod.namespace, &pod.labels)?;
        // As the Pod watch and the operator would tell the node's agent: ADD waits for it.
        let security_labels = self.pod_security_labels(cluster, &pod.namespace, &pod.labels);
        let entry = local_pod(
            &pod.namespace,
            &pod.name,
            identity,
            security_labels,
            &pod.ports,
        );
        {
            let _lock = self.lock_state()?;
            self.publish(Some((cluster, &pod.node, PendingPod::Add(entry.clone()))))?;
        }
        let netns = self.plan.pod_netns(cluster, &pod.namespace, &pod.name);
        host::add_netns(&netns)?;
        let container_id = random_container_id();
        // As kubelet does: while the agent is away (CNI code 11, "try again later"), retry.
        let deadline = Instant::now() + CNI_RETRY_TIMEOUT;
        let (succeeded, result) = loop {
            let (succeeded, result) = self.run_cni(
                "ADD",
                &node,
                &container_id,
                &netns,
                Some((&pod.namespace, &pod.name)),
            )?;
            let try_again = result.get("code").and_then(|code| code.as_u64()) == Some(11);
            if succeeded || !try_again || Instant::now() > deadline {
                break (succeeded, result);
            }
            tracing::info!(
                pod = %pod.name,
                reason = result.get("details").and_then(|d| d.as_str()).unwrap_or("the node's agent is unavailable"),
                "the node's agent says try again later; retrying"
            );
            std::thread::sleep(CNI_RETRY_INTERVAL);
        };
        if !succeeded {
            host::del_netns(&netns);
            if let Ok(_lock) = self.lock_state() {
                let _ = self.publish(Some((cluster, &pod.node, PendingPod::Withdraw(entry))));
            }
            return Err(SandboxError::Cni {
                pod: format!("{}/{}", pod.namespace, pod.name),
                message: result
                    .get("details")
                    .or_else(|| result.get("msg"))
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| result.to_string()),
            });
        }
        let ip: Ipv4Addr = result
            .pointer("/ips/0/address")
            .and_then(|a| a.as_str())
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| SandboxError::Cni {
                pod: pod.name.clone(),
                message: format!("the result has no address: {result}"),
            })?;
        let cgroup = self.cgroup.as_ref().map(|root| {
            root.join(format!("{cluster}-{}", pod.node))
                .join(format!("{}-{}", pod.namespace, pod.name))
        });
        let log = self
            .run_dir
            .join("pods")
            .join(format!("{cluster}-{}-{}.log", pod.namespace, pod.name));
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let ready_file = log.with_extension("ready");
        let _ = std::fs::remove_file(&ready_file);
        let args = vec![
            "sandbox".into(),
            "serve".into(),
            "--pod".into(),
            pod.name.clone(),
            "--namespace".into(),
            pod.namespace.clone(),
            "--node".into(),
            pod.node.clone(),
            "--cluster".into(),
            cluster.to_owned(),
            "--ports".into(),
            serde_json::to_string(&pod.ports).unwrap_or_else(|_| "[]".into()),
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        let server_pid = host::spawn_daemon(
            &self.bin_dir.join("weftctl"),
            &args,
            Some(&netns),
            cgroup.as_deref(),
            &log,
        )?;
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while !ready_file.exists() {
            if Instant::now() > deadline || !process_alive(server_pid) {
                return Err(SandboxError::Invalid(format!(
                    "the echo server of pod {}/{} did not start; see {}",
                    pod.namespace,
                    pod.name,
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pods.push(PodState {
            cluster: cluster.to_owned(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: pod.node.clone(),
            netns,
            ip,
            container_id,
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            server_pid,
            cgroup,
            identity,
            terminating: false,
        });
        Ok(())
    }

    pub(crate) fn remove_pod(&self, pod: &PodState) -> Result<(), SandboxError> {
        host::stop_process(pod.server_pid);
        let has_agent = self
            .agents
            .iter()
            .any(|agent| agent.cluster == pod.cluster && agent.node == pod.node);
        if let (true, Some(node)) = (has_agent, self.plan.node(&pod.cluster, &pod.node)) {
            let (succeeded, result) =
                self.run_cni("DEL", node, &pod.container_id, &pod.netns, None)?;
            if !succeeded {
                return Err(SandboxError::Cni {
                    pod: pod.name.clone(),
                    message: result.to_string(),
                });
            }
        }
        if let Some(cgroup) = &pod.cgroup {
            host::remove_cgroup_tree(cgroup);
        }
        host::del_netns(&pod.netns);
        self.release_identity(pod);
        Ok(())
    }

    /// Runs `weft-cni` for a pod as a container runtime would: in the node's network
    /// namespace, with the `CNI_*` variables and the network configuration on stdin. Returns
    /// whether it succeeded and what it printed (the result, or the CNI error).
    pub(crate) fn run_cni(
        &self,
        command: &str,
        node: &NodePlan,
        container_id: &str,
        pod_netns: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<(bool, serde_json::Value), SandboxError> {
        let agent = self
            .agents
            .iter()
            .find(|agent| agent.cluster == node.cluster && agent.node == node.name)
            .ok_or_else(|| SandboxError::Invalid(format!("node {} has no agent", node.name)))?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "agentSocket": agent.cni_socket,
        })
        .to_string();
        let mut envs = vec![
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", container_id.to_owned()),
            (
                "CNI_NETNS",
                host::netns_path(pod_netns).display().to_string(),
            ),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", self.bin_dir.display().to_string()),
        ];
        if let Some((namespace, name)) = pod {
            envs.push((
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            ));
        }
        let output = host::run_in(
            &self.bin_dir.join("weft-cni"),
            &[],
            &envs,
            Some(&node.netns),
            &conf,
        )?;
        let result = serde_json::from_slice(&output.stdout).unwrap_or_default();
        Ok((output.status.success(), result))
    }

    /// Runs a command inside a pod, as `kubectl exec` would.
    pub fn exec(
        &self,
        pod: &PodState,
        argv: &[String],
    ) -> Result<std::process::ExitStatus, SandboxError> {
        Ok(host::exec_in(argv, &pod.netns, pod.cgroup.as_deref())?)
    }
}

/// A container ID as runtimes make them: 64 hex characters.
fn random_container_id() -> String {
    let mut bytes = [0u8; 32];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = random.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
