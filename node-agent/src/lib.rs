//! Weft's node agent: everything that runs on each node. The binary (`main.rs`) only wires
//! these modules together.

pub mod datapath;
pub mod kernel;
