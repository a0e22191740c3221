//! Weft's node agent: everything that runs on each node. The binaries (`main.rs` for the
//! agent, `bin/weft-cni.rs` for the CNI plugin) only wire these modules together.

pub mod cni;
pub mod conntrack;
pub mod datapath;
pub mod flows;
pub mod health_check;
pub mod ipam;
pub mod kernel;
pub mod kubernetes;
pub mod local_source;
pub mod map_pressure;
pub mod nat;
pub mod netlink;
pub mod node;
pub mod node_addresses;
pub mod peers;
pub mod policy;
pub mod services;
pub mod stale_backends;
pub mod state;
pub mod unix_socket;
