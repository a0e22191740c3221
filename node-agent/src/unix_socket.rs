//! Unix sockets the agent serves on (CNI, Observe).

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {path}: {source}")]
pub struct BindError {
    path: PathBuf,
    source: std::io::Error,
}

/// Binds `path`, replacing a socket a previous agent left behind.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let error = |source| BindError {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    UnixListener::bind(path).map_err(error)
}
