use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use weft_crds::validate::{parse_documents, ObjectValidator, Verdict};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// YAML files, or directories whose *.yaml and *.yml files are read (not recursively).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
}

/// Exit code 0 when every Weft object is valid, 1 when any is not.
pub fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let validator = ObjectValidator::for_weft_crds()?;
    let mut invalid = 0usize;
    let mut checked = 0usize;
    for path in expand(&args.files)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let documents = parse_documents(&text)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        for document in documents {
            let name = document
                .pointer("/metadata/name")
                .and_then(|name| name.as_str())
                .unwrap_or("<unnamed>")
                .to_owned();
            match validator.validate(&document) {
                Verdict::Valid => {
                    checked += 1;
                    println!("{}: {} {name}: valid", path.display(), kind(&document));
                }
                Verdict::Invalid(errors) => {
                    checked += 1;
                    invalid += 1;
                    println!("{}: {} {name}: INVALID", path.display(), kind(&document));
                    for error in errors {
                        println!("  - {error}");
                    }
                }
                Verdict::NotAWeftKind { api_version, kind } => {
                    println!(
                        "{}: {api_version} {kind} {name}: skipped (not a Weft kind)",
                        path.display()
                    );
                }
            }
        }
    }
    println!("{checked} Weft objects checked, {invalid} invalid");
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn kind(document: &serde_json::Value) -> &str {
    document
        .get("kind")
        .and_then(|kind| kind.as_str())
        .unwrap_or("<no kind>")
}

fn expand(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| is_yaml(path))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|ext| ext.to_str()),
        Some("yaml" | "yml")
    )
}
