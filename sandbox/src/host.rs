//! The host side of a sandbox: network namespaces and links (through iproute2, the sandbox's
//! declared dependency), cgroups, a private bpffs, and processes started inside a namespace and
//! cgroup.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
    let what = what.into();
    move |source| HostError::Io { what, source }
}

/// Runs `ip ARGS…` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, HostError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(io("running ip (install iproute2: make deps)"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HostError::Command {
            command: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn add_netns(name: &str) -> Result<(), HostError> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace (and every link in it); a missing one is fine.
pub fn del_netns(name: &str) {
    if netns_path(name).exists() {
        if let Err(error) = ip(&["netns", "del", name]) {
            tracing::warn!(%error, "cannot delete network namespace {name}");
        }
    }
}

/// Names of namespaces starting with `prefix` (a crashed sandbox's leftovers included).
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Sets a sysctl inside a namespace (`/proc/sys/net` is per namespace).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<(), HostError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let status = in_namespaces(
        Command::new("sh").args(["-c", &format!("echo {value} > {path}")]),
        Some(netns),
        None,
    )?
    .status()
    .map_err(io(format!("setting {key} in {netns}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(HostError::Command {
            command: format!("sysctl {key}={value} in {netns}"),
            message: status.to_string(),
        })
    }
}

/// The cgroup v2 hierarchy to put sandbox processes in: the unified mount of a hybrid host, or
/// the root of a pure v2 host. `None` when there is none (processes then stay where they are,
/// and socket-level hooks will not see per-pod cgroups).
pub fn cgroup2_root() -> Option<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| filesystem_magic(path) == Some(CGROUP2_SUPER_MAGIC))
}

fn filesystem_magic(path: &Path) -> Option<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills a zeroed, properly sized struct; c_path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then_some(stat.f_type as i64)
}

/// Removes a cgroup subtree: its processes are killed, then directories go deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let mut dirs = vec![path.to_owned()];
    let mut index = 0;
    while index < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[index]) {
            dirs.extend(
                entries
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|child| child.is_dir()),
            );
        }
        index += 1;
    }
    for dir in dirs.iter().rev() {
        // cgroup.kill (Linux 5.14+) kills the subtree at once; fall back to the pid list.
        if std::fs::write(dir.join("cgroup.kill"), b"1").is_err() {
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) with a pid read from the cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for dir in dirs.iter().rev() {
        for _ in 0..50 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Mounts a private bpffs at `path` unless one is already there.
pub fn mount_bpffs(path: &Path) -> Result<(), HostError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    std::fs::create_dir_all(path).map_err(io(format!("creating {}", path.display())))?;
    if filesystem_magic(path) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(path)
        .status()
        .map_err(io("running mount"))?;
    if status.success() {
        Ok(())
    } else {
        Err(HostError::Command {
            command: format!("mount -t bpf bpf {}", path.display()),
            message: status.to_string(),
        })
    }
}

pub fn unmount(path: &Path) {
    // Lazy: a pinned object held open elsewhere must not keep the sandbox from going away.
    let _ = Command::new("umount").arg("-l").arg(path).status();
}

/// Prepares `command` to start inside network namespace `netns` and cgroup `cgroup`. Only the
/// network namespace changes (not the mount namespace, as `ip netns exec` would), so the
/// process sees the host's /sys and cgroup mounts.
pub fn in_namespaces<'a>(
    command: &'a mut Command,
    netns: Option<&str>,
    cgroup: Option<&Path>,
) -> Result<&'a mut Command, HostError> {
    let netns_file = match netns {
        Some(name) => Some(
            File::open(netns_path(name))
                .map_err(io(format!("opening network namespace {name}")))?,
        ),
        None => None,
    };
    let cgroup_file = match cgroup {
        Some(path) => {
            std::fs::create_dir_all(path)
                .map_err(io(format!("creating cgroup {}", path.display())))?;
            Some(
                OpenOptions::new()
                    .write(true)
                    .open(path.join("cgroup.procs"))
                    .map_err(io(format!("opening {}/cgroup.procs", path.display())))?,
            )
        }
        None => None,
    };
    let netns_fd = netns_file.as_ref().map(AsRawFd::as_raw_fd);
    let cgroup_fd = cgroup_file.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: between fork and exec the closure only makes raw syscalls on descriptors opened
    // above (kept alive by the closure owning the files); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let _keep = (&netns_file, &cgroup_file);
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = cgroup_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Starts a long-running process detached from the caller (own session, output to `log`).
pub fn spawn_daemon(
    program: &Path,
    args: &[String],
    netns: Option<&str>,
    cgroup: Option<&Path>,
    log: &Path,
) -> Result<u32, HostError> {
    let log_file = File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let log_err = log_file
        .try_clone()
        .map_err(io(format!("opening {}", log.display())))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: setsid(2) only, after fork; allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = in_namespaces(&mut command, netns, cgroup)?
        .spawn()
        .map_err(io(format!("starting {}", program.display())))?;
    Ok(child.id())
}

/// Runs a command to completion inside the namespace, feeding `stdin`.
pub fn run_in(
    program: &Path,
    args: &[&str],
    envs: &[(&str, String)],
    netns: Option<&str>,
    stdin: &str,
) -> Result<Output, HostError> {
    use std::io::Write;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(envs.iter().map(|(key, value)| (*key, value.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = in_namespaces(&mut command, netns, None)?
        .spawn()
        .map_err(io(format!("starting {}", program.display())))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(io(format!("writing to {}", program.display())))?;
    }
    child
        .wait_with_output()
        .map_err(io(format!("waiting for {}", program.display())))
}

/// Runs a user's command in a pod's namespace and cgroup with the caller's terminal.
pub fn exec_in(
    argv: &[String],
    netns: &str,
    cgroup: Option<&Path>,
) -> Result<ExitStatus, HostError> {
    let (program, args) = argv.split_first().ok_or_else(|| HostError::Command {
        command: "exec".into(),
        message: "no command given".into(),
    })?;
    let mut command = Command::new(program);
    command.args(args);
    in_namespaces(&mut command, Some(netns), cgroup)?
        .status()
        .map_err(io(format!("running {program}")))
}

/// Asks a process to stop, then makes it.
pub fn stop_process(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: signals to a pid the sandbox started.
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
    }
    for _ in 0..50 {
        // Reap it if it is our child (a test process that started the sandbox), so a zombie is
        // not mistaken for a live process; signal 0 probes for anything else.
        // SAFETY: waitpid with WNOHANG and a null status pointer; kill with signal 0.
        unsafe {
            if libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) == pid
                || libc::kill(pid, 0) != 0
            {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: as above; the blocking waitpid returns at once (ECHILD) for a non-child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}
