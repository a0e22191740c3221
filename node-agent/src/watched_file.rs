//! A JSON file of Kubernetes objects that another party keeps current (the sandbox in local
//! mode, the Kubernetes adapter otherwise) by replacing it atomically: re-read only when it
//! changed, and never half-read.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;

pub struct WatchedFile {
    path: Option<PathBuf>,
    /// Inode and modification time of the version last read: a replaced file has a new inode.
    version: Option<(u64, SystemTime)>,
}

impl WatchedFile {
    /// `None`: nothing to watch (the objects are always none).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            version: None,
        }
    }

    /// The objects, when the file changed since the last call; `None` when it did not (or is
    /// unreadable: `what` names it in the warning, and the caller keeps what it has). A file
    /// that does not exist yet holds no objects.
    pub fn changed_objects(&mut self, what: &str) -> Option<Vec<Value>> {
        let path = self.path.as_ref()?;
        let version = std::fs::metadata(path)
            .and_then(|m| Ok((m.ino(), m.modified()?)))
            .ok();
        if version == self.version {
            return None;
        }
        let objects = match std::fs::read(path).map(|bytes| serde_json::from_slice(&bytes)) {
            Ok(Ok(objects)) => objects,
            Ok(Err(error)) => {
                tracing::warn!(%error, path = %path.display(), "{what} file unreadable; keeping what is in force");
                return None;
            }
            Err(_) => Vec::new(),
        };
        self.version = version;
        Some(objects)
    }

    /// The inode of the version read (changes whenever the file is replaced).
    pub fn inode(&self) -> Option<u64> {
        self.version.map(|(inode, _)| inode)
    }
}
