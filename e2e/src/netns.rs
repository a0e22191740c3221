//! Network namespaces for tests: created with iproute2, entered by a thread with setns(2), and
//! deleted on drop, so a failing test leaves nothing behind (deleting a namespace also deletes
//! the links in it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A prefix unique to this process and call, short enough that `<prefix>h` fits in an
/// interface name (15 bytes), so parallel tests and leftover runs never collide.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("wt{}x{n}", std::process::id() % 100_000)
}

/// Runs a command and returns its stdout; a failure carries the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        ))
    }
}

/// A named network namespace (`/run/netns/<name>`), deleted when dropped.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with loopback up and IPv6 off, so tests see only the traffic
    /// they make (no router solicitations or DAD probes).
    pub fn create(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        netns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        netns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, command: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Runs `work` on a thread that has entered this namespace, so code that resolves
    /// interfaces by name (tcx attach) sees this namespace's interfaces. Processes it spawns
    /// start in this namespace too.
    pub fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|error| format!("cannot open {path}: {error}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a valid namespace fd; setns only affects this new thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(format!(
                            "setns into {path} failed: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface's index and MAC address inside this namespace.
    pub fn link(&self, interface: &str) -> Result<Link, String> {
        let json = self.exec(&["ip", "-j", "link", "show", "dev", interface])?;
        let links: Vec<Link> = serde_json::from_str(&json)
            .map_err(|error| format!("cannot parse `ip -j link` output: {error}: {json}"))?;
        links
            .into_iter()
            .next()
            .ok_or_else(|| format!("no interface {interface} in {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {error}");
        }
    }
}

/// What `ip -j link show` says about an interface.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Link {
    pub ifindex: u32,
    #[serde(rename = "address")]
    pub mac: String,
}

/// A pod wired to a node the way Weft's CNI wires it: a veth pair whose host side stays in the
/// node namespace and whose other side is the pod's `eth0`, with static neighbours so that no
/// ARP traffic mixes with what a test sends.
pub struct VethPod {
    pub host_veth: String,
    pub host_ip: String,
    pub pod_ip: String,
    pub host_link: Link,
}

impl VethPod {
    pub fn wire(
        node: &NetNs,
        pod: &NetNs,
        host_veth: &str,
        host_ip: &str,
        pod_ip: &str,
    ) -> Result<Self, String> {
        node.exec(&[
            "ip",
            "link",
            "add",
            host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        node.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            host_veth,
        ])?;
        node.exec(&["ip", "link", "set", host_veth, "up"])?;
        pod.exec(&["ip", "addr", "add", &format!("{pod_ip}/30"), "dev", "eth0"])?;
        pod.exec(&["ip", "link", "set", "eth0", "up"])?;
        let host_link = node.link(host_veth)?;
        let pod_link = pod.link("eth0")?;
        node.exec(&[
            "ip",
            "neigh",
            "replace",
            pod_ip,
            "lladdr",
            &pod_link.mac,
            "dev",
            host_veth,
            "nud",
            "permanent",
        ])?;
        pod.exec(&[
            "ip",
            "neigh",
            "replace",
            host_ip,
            "lladdr",
            &host_link.mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(Self {
            host_veth: host_veth.to_owned(),
            host_ip: host_ip.to_owned(),
            pod_ip: pod_ip.to_owned(),
            host_link,
        })
    }
}
