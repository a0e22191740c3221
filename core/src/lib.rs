//! Weft's core: the domain logic every component shares, free of Kubernetes client code.
//!
//! Kubernetes and the local sandbox are adapters around this crate (see
//! `docs/architecture.md`); nothing here talks to an API server.

pub mod admin;
pub mod cluster;
pub mod daemon;
pub mod files;
pub mod identity;
pub mod policy;
pub mod service;
pub mod state;
pub mod telemetry;
