//! Flow observability: events from the datapath's ring buffer, enriched with who was talking,
//! kept in a bounded buffer, counted in metrics, and served over the Observe API.

pub mod directory;
pub mod enrich;
pub mod filter;
pub mod grpc;
pub mod metrics;
pub mod reader;
pub mod store;
