//! The sandbox's persisted state: loading it, saving it (and sending the agents what changed for
//! them), and changing it under a lock so concurrent `weftctl` runs do not lose each other's
//! changes.

use super::*;

impl Sandbox {
    pub fn save(&self) -> Result<(), SandboxError> {
        self.publish(None)?;
        let path = Self::state_path(&self.run_dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| SandboxError::State {
            what: "write",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, &json)
    }

    /// Records a change made after `up`: under an exclusive lock, re-reads the state, applies
    /// `change` to it and writes it back, so two commands at once (an `apply` waiting for an
    /// agent while another restarts it) never undo each other's changes. `self` becomes the
    /// state written.
    pub fn commit(&mut self, change: impl FnOnce(&mut Self)) -> Result<(), SandboxError> {
        self.try_commit(|fresh| {
            change(fresh);
            Ok(())
        })
    }

    /// Serialises the processes that change this sandbox's files; held until the returned file
    /// is dropped. Not reentrant: never take it while holding it.
    pub(crate) fn lock_state(&self) -> Result<std::fs::File, SandboxError> {
        let lock_path = self.run_dir.join("state.lock");
        let lock_error = |reason: String| SandboxError::State {
            what: "lock",
            path: lock_path.clone(),
            reason,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| lock_error(e.to_string()))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(lock_error(std::io::Error::last_os_error().to_string()));
        }
        Ok(lock)
    }

    /// As `commit`, for a change that may refuse: then nothing is written and `self` stays.
    pub fn try_commit<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<T, SandboxError>,
    ) -> Result<T, SandboxError> {
        let _lock = self.lock_state()?;
        let mut fresh = Self::load(Some(&self.plan.name))?;
        let value = change(&mut fresh)?;
        fresh.save()?;
        *self = fresh;
        Ok(value)
    }

    /// The running sandbox called `name`, or the only one when `name` is `None`.
    pub fn load(name: Option<&str>) -> Result<Self, SandboxError> {
        let name = match name {
            Some(name) => name.to_owned(),
            None => {
                let running = running_sandboxes();
                match running.as_slice() {
                    [only] => only.clone(),
                    [] => return Err(SandboxError::NoneUp),
                    many => return Err(SandboxError::Ambiguous(many.join(", "))),
                }
            }
        };
        let path = Self::state_path(&Path::new(RUN_ROOT).join(&name));
        let bytes = std::fs::read(&path).map_err(|_| SandboxError::NotUp(name.clone()))?;
        serde_json::from_slice(&bytes).map_err(|e| SandboxError::State {
            what: "read",
            path,
            reason: e.to_string(),
        })
    }

    pub(crate) fn state_path(run_dir: &Path) -> PathBuf {
        run_dir.join("state.json")
    }
}

/// Writes a file others read so that they never see half of it: a temporary file, then a
/// rename over the old one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SandboxError> {
    let write_error = |reason: String| SandboxError::State {
        what: "write",
        path: path.to_owned(),
        reason,
    };
    weft_core::files::write_atomically(path, bytes).map_err(|e| write_error(e.to_string()))
}

/// Names of sandboxes with a state file.
pub fn running_sandboxes() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("state.json").exists())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
