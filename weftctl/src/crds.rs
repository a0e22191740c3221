use std::path::PathBuf;
use std::process::ExitCode;

use weft_crds::manifests;

#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: &CrdsArgs) -> anyhow::Result<ExitCode> {
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
