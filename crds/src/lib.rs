//! Weft's CustomResourceDefinitions (API group `weft.io`, version `v1alpha1`).
//!
//! The Rust types are the source of truth: `crds/manifests/` and the Helm chart's `crds/` are
//! generated from them (`weftctl crds --out-dir`), and [`validate`] checks instances offline
//! against the same schemas, including their CEL rules, the way the API server would.

pub mod bandwidth;
pub mod cel_cost;
pub mod endpoint;
pub mod global_service;
pub mod identity;
pub mod manifests;
pub mod peering;
pub mod policy;
pub mod policy_model;
pub mod selector;
pub mod service_model;
pub mod status;
pub mod validate;

pub use bandwidth::{BandwidthClass, BandwidthClassSpec};
pub use endpoint::{WeftEndpoint, WeftEndpointSpec};
pub use global_service::{GlobalService, GlobalServiceSpec};
pub use identity::{WeftIdentity, WeftIdentitySpec};
pub use peering::{ClusterPeering, ClusterPeeringSpec};
pub use policy::{
    WeftClusterwideNetworkPolicy, WeftClusterwideNetworkPolicySpec, WeftNetworkPolicy,
    WeftNetworkPolicySpec,
};

/// The API group of every Weft kind.
pub const GROUP: &str = "weft.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
