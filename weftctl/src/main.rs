//! `weftctl`: wiring only; each subcommand lives in its own module.

mod crds;
mod observe;
mod sandbox;
mod validate;

use clap::{Parser, Subcommand};
use weft_core::telemetry::LogArgs;
use weftctl::policy;

/// Weft's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print Weft's CustomResourceDefinitions as YAML, or write one file per CRD.
    Crds(crds::CrdsArgs),
    /// Check Weft objects in YAML files against the CRD schemas and their CEL rules, offline,
    /// as the API server would.
    Validate(validate::ValidateArgs),
    /// What policies say: validity, and why a connection would pass or not.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Show flows: what the datapath forwarded and dropped, between whom.
    Observe(observe::ObserveArgs),
    /// Local mode: clusters of network namespaces on this machine, with real agents and CNI.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
}

fn main() -> std::process::ExitCode {
    // Behave like other CLIs in a pipeline (`weftctl crds | head`): end quietly when the
    // reader goes away instead of panicking on a broken pipe.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Err(error) = cli.log.init() {
        eprintln!("weftctl: {error}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Crds(args) => crds::run(&args),
        Command::Validate(args) => validate::run(&args),
        Command::Sandbox(command) => sandbox::run(command),
        Command::Observe(args) => observe::run(&args),
        Command::Policy(command) => policy::run(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("weftctl: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
