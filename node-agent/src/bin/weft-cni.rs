//! `weft-cni`: the CNI plugin binary. See `weft_agent::cni::plugin`.

use std::io::Read;
use std::process::ExitCode;

use weft_agent::cni::plugin::{self, Invocation};

fn main() -> ExitCode {
    let invocation = Invocation::from_env(|name| std::env::var(name).ok());
    let mut stdin = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("weft-cni: cannot read the network configuration from stdin: {error}");
        return ExitCode::from(1);
    }
    match plugin::run(&invocation, &stdin) {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            // The runtime reads errors from stdout; stderr reaches its logs.
            eprintln!("weft-cni {}: {error}", invocation.command);
            println!("{}", serde_json::to_string(&error).unwrap_or_default());
            ExitCode::from(1)
        }
    }
}
