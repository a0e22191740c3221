//! What `weft-cni` and the agent say to each other over the agent's Unix socket: one JSON
//! request per line, one JSON response per line.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The link-local gateway every pod routes through; the host-side veth answers for it.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The pod an endpoint belongs to, from kubelet's `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Reserve an address for a container (idempotent per container).
    Allocate { container_id: String, pod: PodRef },
    /// The veth is wired: attach the datapath and make the pod reachable. Answered only when
    /// that is done.
    Register(Registration),
    /// The container is going away: detach, forget, free the address (idempotent).
    Release { container_id: String },
    /// Is the endpoint as the agent expects?
    Check { container_id: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub container_id: String,
    pub pod: PodRef,
    pub ip: Ipv4Addr,
    /// Host-side veth name and index in the node's namespace.
    pub host_veth: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// The pod's interface (`eth0`) and its MAC.
    pub ifname: String,
    pub pod_mac: [u8; 6],
    pub netns: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Allocated {
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        mtu: u32,
    },
    Registered,
    Released {
        ip: Option<Ipv4Addr>,
        host_veth: Option<String>,
    },
    Checked {
        ip: Ipv4Addr,
        host_veth: String,
    },
    Error {
        /// A CNI error code: 11 means "try again later".
        code: u32,
        message: String,
    },
}
