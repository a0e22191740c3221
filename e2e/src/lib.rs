//! Test beds on real network namespaces, cleaned up when dropped (also when a test panics).

pub mod bpffs;
pub mod kube_proxy;
pub mod measure;
pub mod netns;
pub mod sandbox;
