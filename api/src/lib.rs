//! Weft's gRPC APIs, generated from `proto/`.

/// The flow API each agent serves (`weft.observer.v1`).
pub mod observer {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.observer.v1");
}

/// How local mode feeds an agent the cluster's state (`weft.state.v1`).
pub mod state {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.state.v1");
}
