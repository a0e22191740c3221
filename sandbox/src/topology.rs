//! The sandbox's network: the fabric every node joins and each node's namespace and directories.

use super::*;

impl Sandbox {
    pub(crate) fn create_fabric(&self) -> Result<(), SandboxError> {
        let fabric = &self.plan.fabric_netns;
        host::add_netns(fabric)?;
        host::ip(&["-n", fabric, "link", "add", FABRIC_BRIDGE, "type", "bridge"])?;
        host::ip(&["-n", fabric, "link", "set", FABRIC_BRIDGE, "up"])?;
        Ok(())
    }

    pub(crate) fn create_node(&self, node: &NodePlan) -> Result<(), SandboxError> {
        let fabric = &self.plan.fabric_netns;
        host::add_netns(&node.netns)?;
        host::ip(&[
            "-n",
            fabric,
            "link",
            "add",
            &node.fabric_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node.netns,
        ])?;
        host::ip(&[
            "-n",
            fabric,
            "link",
            "set",
            &node.fabric_veth,
            "master",
            FABRIC_BRIDGE,
            "up",
        ])?;
        let address = format!("{}/{FABRIC_PREFIX}", node.ip);
        host::ip(&["-n", &node.netns, "addr", "add", &address, "dev", "eth0"])?;
        host::ip(&["-n", &node.netns, "link", "set", "eth0", "up"])?;
        host::sysctl_in(&node.netns, "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// The state directory of a node's agent (`--state-dir`).
    pub fn node_state_dir(&self, cluster: &str, node: &str) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{cluster}-{node}"))
            .join("state")
    }

    pub(crate) fn node_dir(&self, node: &NodePlan) -> PathBuf {
        self.run_dir
            .join("nodes")
            .join(format!("{}-{}", node.cluster, node.name))
    }
}
