//! The CNI side of the agent: the protocol the `weft-cni` plugin speaks to the agent, the
//! agent's server for it, and the plugin's own netlink work.

pub mod api;
pub mod client;
pub mod plugin;
pub mod server;
