//! `weftctl policy …`: what the policies say — their validity, and the verdict and deciding
//! rules for a connection — in a sandbox or a cluster.
//!
//! Each source becomes an [`inventory::Inventory`] (`sandbox_source`, `cluster`); `explain` and
//! `status` work from that alone, so both sources give the same answers in the same words.

pub mod cluster;
pub mod explain;
pub mod inventory;
pub mod sandbox_source;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use weft_sandbox::Sandbox;

use self::cluster::ClusterTarget;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Every policy: valid or not (and why), and how many endpoints it selects. Exits 1 if one
    /// is invalid.
    Status {
        #[command(flatten)]
        source: SourceArgs,
        /// Only this cluster's policies (a sandbox's cluster, or the kubeconfig context).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// The verdict for a connection and the rules that decide it, both directions.
    Explain {
        /// The client pod: `name` or `namespace/name`.
        #[arg(long)]
        from: String,
        /// The server: a pod (`name`, `namespace/name`) or an IP, with `:PORT[/TCP|UDP]`.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        source: SourceArgs,
    },
}

/// Where the pods and policies come from. Without any of these: a running sandbox, else the
/// cluster of `~/.kube/config` (or the in-cluster configuration). `$KUBECONFIG` counts as
/// `--kubeconfig`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SourceArgs {
    /// Read this sandbox (default: the only one running).
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    pub sandbox: Option<String>,
    /// Read the cluster of this kubeconfig [default: $KUBECONFIG, then ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use [default: its current context].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// What is there to read, besides the flags.
#[derive(Clone, Debug, Default)]
pub struct Surroundings {
    pub running_sandboxes: Vec<String>,
    /// `$KUBECONFIG` is set.
    pub kubeconfig_env: bool,
    /// `~/.kube/config` exists, or this runs in a pod.
    pub default_cluster: bool,
}

impl Surroundings {
    pub fn here() -> Self {
        Self {
            running_sandboxes: weft_sandbox::running_sandboxes(),
            kubeconfig_env: std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()),
            default_cluster: cluster::default_kubeconfig_exists() || cluster::in_cluster(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A sandbox by name, or the only one running.
    Sandbox(Option<String>),
    Cluster(ClusterTarget),
}

/// The source for `args`: a named sandbox; else a kubeconfig named by flag or `$KUBECONFIG`;
/// else a running sandbox; else the default kubeconfig or in-cluster configuration.
pub fn choose_source(args: &SourceArgs, around: &Surroundings) -> anyhow::Result<Source> {
    let cluster = || {
        Source::Cluster(ClusterTarget {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
        })
    };
    if let Some(name) = &args.sandbox {
        return Ok(Source::Sandbox(Some(name.clone())));
    }
    if args.kubeconfig.is_some() || args.context.is_some() || around.kubeconfig_env {
        return Ok(cluster());
    }
    if !around.running_sandboxes.is_empty() {
        return Ok(Source::Sandbox(None));
    }
    if around.default_cluster {
        return Ok(cluster());
    }
    bail!(
        "no sandbox is up and no kubeconfig was found: pass --kubeconfig PATH (or set KUBECONFIG), or start a sandbox with `weftctl sandbox up --config FILE`"
    )
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let around = Surroundings::here();
    match command {
        PolicyCommand::Status { source, cluster } => {
            let report = match choose_source(&source, &around)? {
                Source::Sandbox(name) => {
                    let sandbox = Sandbox::load(name.as_deref())?;
                    let mut report = status::status(&sandbox_source::inventory(&sandbox), false);
                    report.node_problems = sandbox_source::node_problems(&sandbox);
                    report
                }
                Source::Cluster(target) => block_on(async {
                    let (client, name) = cluster::connect(&target).await?;
                    cluster::status_from_cluster(&client, &name).await
                })?,
            };
            print!("{}", report.render(cluster.as_deref()));
            Ok(report.exit_code())
        }
        PolicyCommand::Explain { from, to, source } => {
            let explanation = match choose_source(&source, &around)? {
                Source::Sandbox(name) => {
                    let sandbox = Sandbox::load(name.as_deref())?;
                    explain::explain(&sandbox_source::inventory(&sandbox), &from, &to)?
                }
                Source::Cluster(target) => block_on(async {
                    let (client, _) = cluster::connect(&target).await?;
                    cluster::explain_from_cluster(&client, &from, &to).await
                })?,
            };
            print!("{explanation}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(sandbox: Option<&str>, kubeconfig: Option<&str>, context: Option<&str>) -> SourceArgs {
        SourceArgs {
            sandbox: sandbox.map(str::to_owned),
            kubeconfig: kubeconfig.map(PathBuf::from),
            context: context.map(str::to_owned),
        }
    }

    #[test]
    fn a_named_source_wins_then_kubeconfig_env_then_a_running_sandbox_then_the_default_cluster() {
        let everything = Surroundings {
            running_sandboxes: vec!["dev".into()],
            kubeconfig_env: true,
            default_cluster: true,
        };
        assert_eq!(
            choose_source(&args(Some("e2e"), None, None), &everything).unwrap(),
            Source::Sandbox(Some("e2e".into()))
        );
        assert_eq!(
            choose_source(&args(None, None, Some("prod")), &everything).unwrap(),
            Source::Cluster(ClusterTarget {
                kubeconfig: None,
                context: Some("prod".into())
            })
        );
        assert!(matches!(
            choose_source(&args(None, None, None), &everything).unwrap(),
            Source::Cluster(_)
        ));
        let sandbox_and_home_config = Surroundings {
            kubeconfig_env: false,
            ..everything.clone()
        };
        assert_eq!(
            choose_source(&args(None, None, None), &sandbox_and_home_config).unwrap(),
            Source::Sandbox(None)
        );
        let home_config_only = Surroundings {
            running_sandboxes: vec![],
            ..sandbox_and_home_config
        };
        assert_eq!(
            choose_source(&args(None, None, None), &home_config_only).unwrap(),
            Source::Cluster(ClusterTarget::default())
        );
        let error = choose_source(&args(None, None, None), &Surroundings::default()).unwrap_err();
        assert!(error.to_string().contains("--kubeconfig"), "{error}");
    }
}
