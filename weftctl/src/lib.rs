//! `weftctl`'s library: commands whose logic is tested without running the binary (the
//! binary, `main.rs`, only wires the subcommands).

pub mod policy;
