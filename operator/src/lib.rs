//! Weft's operator: reconcilers for the Weft CRDs. `main.rs` only wires them.

pub mod policy_controller;
pub mod policy_status;
