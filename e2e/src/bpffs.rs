//! A private bpffs mount for a test, so pinned maps and links never touch the machine's own
//! `/sys/fs/bpf`; unmounted (dropping every pin) when the guard drops.

use std::path::{Path, PathBuf};

use crate::netns::run;

pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn mount(name: &str) -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("weft-bpffs-{name}"));
        std::fs::create_dir_all(&path)
            .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
        run("mount", &["-t", "bpf", "bpf", &path.display().to_string()])?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let path = self.path.display().to_string();
        if let Err(error) = run("umount", &[&path]) {
            eprintln!("cleanup: {error}");
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
