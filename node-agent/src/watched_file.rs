//! A JSON file of Kubernetes objects that another party keeps current (the sandbox in local
//! mode, the Kubernetes adapter otherwise) by replacing it atomically: re-read only when it
//! changed, and never half-read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

pub struct WatchedFile {
    path: Option<PathBuf>,
    /// Inode and modification time of the version last read: a replaced file has a new inode.
    version: Option<(u64, SystemTime)>,
    /// The version last read could not be used: it is read again on every call (a writer that
    /// rewrites the file in place may not have finished), but warned about only once.
    unreadable: bool,
}

impl WatchedFile {
    /// `None`: nothing to watch (the objects are always none).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            version: None,
            unreadable: false,
        }
    }

    /// The file watched, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The objects, when the file changed since the last call; `None` when it did not (or is
    /// unreadable: `what` names it in the warning, and the caller keeps what it has). A file
    /// that does not exist yet holds no objects.
    pub fn changed_objects(&mut self, what: &str) -> Option<Vec<Value>> {
        let path = self.path.as_ref()?;
        let version = std::fs::metadata(path)
            .and_then(|m| Ok((m.ino(), m.modified()?)))
            .ok();
        if version == self.version && !self.unreadable {
            return None;
        }
        let new_version = version != self.version;
        // Remember the version even when it cannot be used, so that the next one is compared
        // with the file that is there (whose inode the next replacement cannot reuse).
        self.version = version;
        let problem = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(objects) => {
                    self.unreadable = false;
                    return Some(objects);
                }
                Err(error) => error.to_string(),
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                self.unreadable = false;
                return Some(Vec::new());
            }
            Err(error) => error.to_string(),
        };
        if new_version || !self.unreadable {
            tracing::warn!(error = %problem, path = %path.display(), "{what} file unreadable; keeping what is in force");
        }
        self.unreadable = true;
        None
    }

    /// Whether the version last looked at could not be used (see [`Self::changed_objects`]).
    pub fn unreadable(&self) -> bool {
        self.unreadable
    }

    /// The inode of the version read (changes whenever the file is replaced).
    pub fn inode(&self) -> Option<u64> {
        self.version.map(|(inode, _)| inode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_read_once_and_a_broken_one_keeps_nothing_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("objects.json");
        let mut file = WatchedFile::new(Some(path.clone()));
        assert_eq!(
            file.changed_objects("test"),
            None,
            "no file yet, nothing new"
        );
        weft_core::files::write_atomically(&path, b"[1]").expect("write");
        assert_eq!(file.changed_objects("test"), Some(vec![Value::from(1)]));
        assert_eq!(file.changed_objects("test"), None, "read once");
        weft_core::files::write_atomically(&path, b"[2").expect("write");
        assert_eq!(file.changed_objects("test"), None, "broken");
        assert_eq!(file.changed_objects("test"), None, "still broken");
        weft_core::files::write_atomically(&path, b"[3]").expect("write");
        assert_eq!(file.changed_objects("test"), Some(vec![Value::from(3)]));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            file.changed_objects("test"),
            Some(vec![]),
            "gone: no objects"
        );
    }
}
