//! What this node's kernel and mounts offer the datapath, checked at start so that a missing
//! piece is a clear log line (and a not-ready agent), never a silent degradation.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `statfs(2)` magic numbers from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the kernel publishes its own BTF, needed for CO-RE relocations.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Present,
    Missing { what: String, consequence: String },
}

#[derive(Clone, Debug)]
pub struct KernelReport {
    pub btf: Check,
    pub bpffs: Check,
    pub cgroup2: Check,
}

impl KernelReport {
    /// The checks that failed, for logging and readiness.
    pub fn missing(&self) -> impl Iterator<Item = (&str, &str)> {
        [&self.btf, &self.bpffs, &self.cgroup2]
            .into_iter()
            .filter_map(|check| match check {
                Check::Present => None,
                Check::Missing { what, consequence } => Some((what.as_str(), consequence.as_str())),
            })
    }
}

pub fn probe(bpffs: &Path, cgroup_root: &Path) -> KernelReport {
    let btf = if Path::new(KERNEL_BTF).exists() {
        Check::Present
    } else {
        Check::Missing {
            what: format!("kernel BTF at {KERNEL_BTF}"),
            consequence:
                "CO-RE programs cannot be relocated; use a kernel built with CONFIG_DEBUG_INFO_BTF"
                    .into(),
        }
    };
    // The agent creates its directory below --bpffs: what counts is the filesystem of the
    // nearest directory that exists.
    let existing = bpffs.ancestors().find(|dir| dir.exists()).unwrap_or(bpffs);
    let bpffs = match filesystem_magic(existing) {
        Some(BPF_FS_MAGIC) => Check::Present,
        _ => Check::Missing {
            what: format!("bpffs mounted at {}", bpffs.display()),
            consequence: "maps cannot be pinned, so the datapath would not survive an agent restart; mount it with `mount -t bpf bpffs PATH`".into(),
        },
    };
    let cgroup2 = match filesystem_magic(cgroup_root) {
        Some(CGROUP2_SUPER_MAGIC) => Check::Present,
        _ => Check::Missing {
            what: format!("cgroup v2 mounted at {}", cgroup_root.display()),
            consequence: "socket-level load balancing cannot attach; mount it with `mount -t cgroup2 none PATH`".into(),
        },
    };
    KernelReport {
        btf,
        bpffs,
        cgroup2,
    }
}

fn filesystem_magic(path: &Path) -> Option<i64> {
    let path: PathBuf = path.to_owned();
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then_some(stat.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_neither_bpffs_nor_cgroup2() {
        let dir = std::env::temp_dir();
        let report = probe(&dir, &dir);
        let missing: Vec<_> = report.missing().map(|(what, _)| what.to_owned()).collect();
        assert!(
            missing.iter().any(|what| what.starts_with("bpffs")),
            "{missing:?}"
        );
        assert!(
            missing.iter().any(|what| what.starts_with("cgroup v2")),
            "{missing:?}"
        );
    }

    /// Mounts `fstype` on a fresh directory for the duration of `check` (needs root, as the
    /// agent does).
    fn with_mount(fstype: &str, check: impl FnOnce(&Path)) {
        let dir = std::env::temp_dir().join(format!("weft-probe-{fstype}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", fstype, "none"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting {fstype} needs root");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&dir)));
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = std::fs::remove_dir(&dir);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn mounted_bpffs_and_cgroup2_are_recognised() {
        with_mount("bpf", |dir| {
            assert_eq!(probe(dir, dir).bpffs, Check::Present);
            assert_ne!(probe(dir, dir).cgroup2, Check::Present);
        });
        with_mount("cgroup2", |dir| {
            assert_eq!(probe(dir, dir).cgroup2, Check::Present);
            assert_ne!(probe(dir, dir).bpffs, Check::Present);
        });
    }
}
