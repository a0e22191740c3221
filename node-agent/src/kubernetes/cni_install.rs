//! Installs what the container runtime needs to call Weft: the `weft-cni` binary into the CNI
//! binary directory and the network configuration list into the CNI configuration directory,
//! each atomically (a temporary file in the same directory, then a rename), so the runtime never
//! runs half a binary or reads half a conflist.
//!
//! The conflist is written once the agent serves its CNI socket and has listed the cluster:
//! the runtime starts wiring pods through Weft only when the agent can answer.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The plugin's binary name, in the agent's image and in the CNI binary directory.
pub const PLUGIN_NAME: &str = "weft-cni";
/// The conflist's file name unless configured: sorted early, so runtimes pick it first.
pub const DEFAULT_CONF_NAME: &str = "05-weft.conflist";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "cannot find the {PLUGIN_NAME} binary next to the agent ({searched}); pass --cni-binary"
    )]
    NoBinary { searched: String },
    #[error("installing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The network configuration list: one plugin, `weft-cni`, told where the agent listens.
pub fn conflist(agent_socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "plugins": [{
            "type": PLUGIN_NAME,
            "agentSocket": agent_socket,
        }],
    })
}

/// The plugin binary to install: `configured`, or `weft-cni` next to the running agent.
pub fn plugin_binary(configured: Option<&Path>) -> Result<PathBuf, InstallError> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().map_err(|error| InstallError::NoBinary {
        searched: error.to_string(),
    })?;
    let candidate = exe.with_file_name(PLUGIN_NAME);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(InstallError::NoBinary {
            searched: candidate.display().to_string(),
        })
    }
}

/// Writes `bytes` as `dir/name` with `mode` through a temporary file in `dir`.
fn install_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf, InstallError> {
    let path = dir.join(name);
    let failed = |source| InstallError::Write {
        path: path.clone(),
        source,
    };
    weft_core::files::write_atomically_with_mode(&path, bytes, Some(mode)).map_err(failed)?;
    Ok(path)
}

/// Copies the plugin binary into `bin_dir` (mode 0755), unless the same bytes are there.
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let bytes = std::fs::read(binary).map_err(|source| InstallError::Write {
        path: binary.to_owned(),
        source,
    })?;
    let target = bin_dir.join(PLUGIN_NAME);
    let same = std::fs::read(&target).is_ok_and(|installed| installed == bytes)
        && std::fs::metadata(&target).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o755);
    if same {
        return Ok(target);
    }
    install_file(bin_dir, PLUGIN_NAME, &bytes, 0o755)
}

/// Writes the conflist into `conf_dir` as `name` (mode 0644).
pub fn install_conflist(
    conf_dir: &Path,
    name: &str,
    agent_socket: &Path,
) -> Result<PathBuf, InstallError> {
    let mut bytes = serde_json::to_vec_pretty(&conflist(agent_socket)).unwrap_or_default();
    bytes.push(b'\n');
    install_file(conf_dir, name, &bytes, 0o644)
}
