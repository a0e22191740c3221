//! Weft's operator: reconcilers for the Weft CRDs. `main.rs` only wires them.

pub mod bandwidth_controller;
pub mod conditions;
pub mod global_service_controller;
pub mod identity_controller;
pub mod identity_gc;
pub mod identity_index;
pub mod identity_status;
pub mod leader;
pub mod metrics;
pub mod peering_controller;
pub mod policy_controller;
pub mod policy_status;
