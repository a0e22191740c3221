//! Weft's eBPF programs, compiled from C by `build.rs` and embedded here, and the `#[repr(C)]`
//! Rust mirrors of their map keys and values (checked against the objects' BTF by a test).

pub mod maps;

/// The object with the programs for a pod's host-side veth: `from_container` (tcx ingress)
/// and `to_container` (tcx egress).
pub static POD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod.bpf.o"));

/// The object with the program for the node's own devices: `from_network` (tcx ingress on
/// the uplink and the VXLAN device). It shares [`POD_OBJECT`]'s maps through their pins.
pub static HOST_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host.bpf.o"));

/// The object with the socket-level load balancer: `sock_connect4`, `sock_sendmsg4`,
/// `sock_recvmsg4` and `sock_getpeername4`, attached to the node's cgroup. It shares the other
/// objects' maps through their pins.
pub static SOCK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.bpf.o"));

/// Program names in [`POD_OBJECT`] and [`HOST_OBJECT`].
pub mod programs {
    /// Runs on traffic the pod sends (ingress of its host-side veth).
    pub const FROM_CONTAINER: &str = "from_container";
    /// Runs on traffic delivered to the pod (egress of its host-side veth).
    pub const TO_CONTAINER: &str = "to_container";
    /// Delivers traffic arriving from the network to local pods (ingress of the node's
    /// devices).
    pub const FROM_NETWORK: &str = "from_network";
    /// Addresses what the kernel routes into the VXLAN device (egress of that device).
    pub const TO_TUNNEL: &str = "to_tunnel";
    /// Socket-level load balancing ([`super::SOCK_OBJECT`]), by cgroup attach point.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
}
