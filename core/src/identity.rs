//! Security identities: numbers the datapath matches on instead of labels.

/// Identities with a fixed meaning, numbered as Cilium numbers them so flows read the same.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReservedIdentity {
    /// Nothing known about the address.
    Unknown = 0,
    /// The local node, and host-network pods.
    Host = 1,
    /// Outside the cluster.
    World = 2,
    /// Weft's health endpoints.
    Health = 4,
    /// An endpoint whose labels are not resolved to an identity yet.
    Init = 5,
    /// Another node of the cluster or mesh.
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
}

impl ReservedIdentity {
    pub const fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Host => "host",
            Self::World => "world",
            Self::Health => "health",
            Self::Init => "init",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
        }
    }
}
