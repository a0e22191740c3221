//! Network policy, independent of where it came from: the model (`model`), label selectors
//! (`selector`), the reference semantics that decide a connection and name the deciding rule
//! (`evaluate`), and the compiler to what the datapath looks up (`compile`).
//!
//! `WeftNetworkPolicy`, `WeftClusterwideNetworkPolicy` and Kubernetes `NetworkPolicy` are all
//! converted to [`model::Policy`] (in `weft-crds`), so one set of semantics serves them all.

pub mod compile;
pub mod evaluate;
#[cfg(test)]
mod fixtures;
pub mod model;
pub mod selector;

/// Security labels carry the namespace and its labels under these keys (see `identity`).
pub use crate::identity::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
