use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use weft_crds::{cel_cost, manifests};

#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Print every CEL rule's estimated cost, as the API server computes it, instead of the CRDs.
    #[arg(long, conflicts_with = "out_dir")]
    cost: bool,
}

pub fn run(args: &CrdsArgs) -> anyhow::Result<ExitCode> {
    // A CRD whose CEL rules exceed the API server's cost budget is refused at install time
    // (`helm install` fails), so it is never written.
    let mut costs = Vec::new();
    let mut violations = Vec::new();
    for crd in manifests::all() {
        for schema in cel_cost::estimate(&crd)? {
            violations.extend(schema.violations());
            costs.push(schema);
        }
    }
    if args.cost {
        print!("{}", cel_cost::report(&costs));
    }
    if !violations.is_empty() {
        bail!(
            "the API server would refuse these CRDs:\n{}",
            violations.join("\n")
        );
    }
    if args.cost {
        return Ok(ExitCode::SUCCESS);
    }
    match &args.out_dir {
        Some(dir) => {
            for path in manifests::write_all(dir)? {
                println!("wrote {}", path.display());
            }
        }
        None => print!("{}", manifests::render_all()?),
    }
    Ok(ExitCode::SUCCESS)
}
