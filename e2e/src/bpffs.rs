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

/// The entries of a pinned map as (key bytes, value bytes), from `bpftool map dump -j`; empty if
/// the map cannot be read.
pub fn pinned_map_entries(pin: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(output) = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pin)
        .arg("-j")
        .output()
    else {
        return Vec::new();
    };
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).unwrap_or_default();
    let bytes = |value: &serde_json::Value| -> Vec<u8> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect()
    };
    entries
        .iter()
        .map(|entry| (bytes(&entry["key"]), bytes(&entry["value"])))
        .collect()
}

/// How many entries each keyed map pinned in `dir` holds (hash maps, LRU and per-CPU hashes,
/// LPM tries, hashes of maps), by name; arrays and ring buffers have no size to change.
pub fn pinned_map_sizes(dir: &Path) -> std::collections::BTreeMap<String, usize> {
    const KEYED: [&str; 6] = [
        "hash",
        "lru_hash",
        "percpu_hash",
        "lru_percpu_hash",
        "lpm_trie",
        "hash_of_maps",
    ];
    let mut sizes = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(output) = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
        else {
            continue;
        };
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        if !KEYED.contains(&info["type"].as_str().unwrap_or_default()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        sizes.insert(name, pinned_map_entries(&path).len());
    }
    sizes
}
