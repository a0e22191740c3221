//! kube-proxy's iptables mode, built by hand: the baseline Weft's services are measured against.
//!
//! Two network namespaces joined by a veth pair: a client, whose nat table holds the rules
//! kube-proxy would write for N ClusterIP services (`KUBE-SERVICES` → `KUBE-SVC-*` →
//! `KUBE-SEP-*`, loaded in one `iptables-restore`), and a server running the sandbox pods' echo
//! server, the endpoint of every service. Everything goes away on drop (the rules live in the
//! client's namespace).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{run, unique_prefix, NetNs, VethPod};
use crate::sandbox::echo_reachable;

/// The "pod network": the client is inside it, so (as for a pod) its service traffic is not
/// masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The services' port, and their endpoints' (the echo server's) port.
pub const SERVICE_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 9000;
/// The namespace and port name the generated services have.
pub const NAMESPACE: &str = "bench";
const PORT_NAME: &str = "http";

/// The cluster IP of the `index`th service: 10.96.0.1, …, 10.96.0.250, 10.96.1.1, ….
pub fn service_vip(index: usize) -> Ipv4Addr {
    assert!(index < 250 * 256, "more services than 10.96.0.0/16 holds");
    Ipv4Addr::new(10, 96, (index / 250) as u8, (index % 250 + 1) as u8)
}

/// The name of the `index`th service.
pub fn service_name(index: usize) -> String {
    format!("svc-{index}")
}

/// One port of a ClusterIP service and its ready endpoints, as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// `namespace/name:port`, the name kube-proxy's comments and chain hashes use.
    fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// The services `0..count`, all with the one endpoint `server:ECHO_PORT`.
pub fn services(count: usize, server: Ipv4Addr) -> Vec<ServicePort> {
    (0..count)
        .map(|index| ServicePort {
            namespace: NAMESPACE.into(),
            name: service_name(index),
            port_name: PORT_NAME.into(),
            cluster_ip: service_vip(index),
            port: SERVICE_PORT,
            endpoints: vec![SocketAddrV4::new(server, ECHO_PORT)],
        })
        .collect()
}

/// kube-proxy's 16-character chain suffix. kube-proxy takes the base32 of a SHA-256; any hash
/// does here, as long as the names are unique and look the same (80 bits of FNV-1a/128).
fn chain_hash(text: &str) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = text.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u128::from(byte)).wrapping_mul(PRIME)
    });
    (0..16)
        .map(|i| char::from(BASE32[((hash >> (123 - 5 * i)) & 31) as usize]))
        .collect()
}

/// The nat table kube-proxy (iptables mode, v1.28+) writes for `services`, in
/// `iptables-restore` format with the built-in chains' jumps: a full table, one transaction.
/// Pod traffic (source in `cluster_cidr`) is not masqueraded; an endpoint reaching itself
/// through its service is (hairpin).
pub fn nat_table(services: &[ServicePort], cluster_cidr: &str) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    ));
    let mut portals = String::new();
    for service in services {
        let name = service.port_name();
        let (vip, port) = (service.cluster_ip, service.port);
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{name}tcp")));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(portals, "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc_chain}");
        let _ = writeln!(rules, "-A {svc_chain} ! -s {cluster_cidr} -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ");
        let count = service.endpoints.len();
        for (position, endpoint) in service.endpoints.iter().enumerate() {
            let sep_chain = format!("KUBE-SEP-{}", chain_hash(&format!("{name}tcp{endpoint}")));
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            // The ladder: 1/n, then 1/(n-1) of the rest, …, the last endpoint unconditionally.
            let remaining = count - position;
            let statistic = if remaining > 1 {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / remaining as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {endpoint}\"{statistic} -j {sep_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                endpoint.ip()
            );
            let _ = writeln!(rules, "-A {sep_chain} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {endpoint}");
        }
    }
    chains + &rules + &portals
        + "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The baseline: a client namespace with kube-proxy's rules for N services, all leading to the
/// echo server in the server namespace.
pub struct KubeProxyBaseline {
    // Fields drop in order: the server stops before its namespace goes.
    _echo: Process,
    client: NetNs,
    _server: NetNs,
    services: usize,
    /// How long `iptables-restore` took to load the rules.
    pub load_time: Duration,
}

impl KubeProxyBaseline {
    /// Builds the namespaces, starts the echo server (`weftctl sandbox serve` from
    /// `bin_dir`, the server the sandbox's pods run), and loads the rules for `services`
    /// services with `restore` (`iptables-restore`, `iptables-legacy-restore` or
    /// `iptables-nft-restore`). Checks the first and the last service answer.
    pub fn build(services: usize, restore: &str, bin_dir: &Path) -> Result<Self, String> {
        assert!(services > 0, "at least one service");
        let prefix = unique_prefix();
        let client = NetNs::create(format!("{prefix}-kpc"))?;
        let server = NetNs::create(format!("{prefix}-kps"))?;
        VethPod::wire(
            &client,
            &server,
            "kp0",
            &CLIENT_IP.to_string(),
            &SERVER_IP.to_string(),
        )?;
        client.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &SERVER_IP.to_string(),
        ])?;

        let echo = start_echo_server(server.name(), bin_dir)?;

        let rules = nat_table(&self::services(services, SERVER_IP), CLUSTER_CIDR);
        let file = tempfile::NamedTempFile::new().map_err(|e| format!("rules file: {e}"))?;
        std::fs::write(file.path(), rules).map_err(|e| format!("rules file: {e}"))?;
        let path = file.path().to_str().ok_or("rules file path")?;
        let started = Instant::now();
        client.exec(&[restore, path])?;
        let load_time = started.elapsed();

        let baseline = Self {
            _echo: echo,
            client,
            _server: server,
            services,
            load_time,
        };
        for index in [0, services - 1] {
            let target = SocketAddr::from((service_vip(index), SERVICE_PORT));
            if !echo_reachable(baseline.client_netns(), target, 3) {
                return Err(format!(
                    "{target} ({} of {services}) does not answer through the iptables rules",
                    service_name(index)
                ));
            }
        }
        Ok(baseline)
    }

    pub fn client_netns(&self) -> &str {
        self.client.name()
    }

    /// The last service: the end of `KUBE-SERVICES`, the worst case.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::from((service_vip(self.services - 1), SERVICE_PORT))
    }
}

/// `weftctl sandbox serve` on the echo port inside `netns`, once it is listening.
fn start_echo_server(netns: &str, bin_dir: &Path) -> Result<Process, String> {
    let weftctl = bin_dir.join("weftctl");
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let ready = dir.path().join("ready");
    let mut command = Command::new(&weftctl);
    command
        .args([
            "sandbox",
            "serve",
            "--pod",
            "server",
            "--namespace",
            NAMESPACE,
        ])
        .args(["--node", "baseline", "--cluster", "baseline", "--ports"])
        .arg(format!(
            r#"[{{"port":{ECHO_PORT},"protocol":"TCP","name":"echo"}}]"#
        ))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null());
    let child = weft_sandbox::host::in_namespaces(&mut command, Some(netns), None)
        .map_err(|e| e.to_string())?
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} (build the binaries first: cargo build --workspace --bins): {e}",
                weftctl.display()
            )
        })?;
    let mut server = Process(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if let Ok(Some(status)) = server.0.try_wait() {
            return Err(format!("the echo server exited: {status}"));
        }
        if Instant::now() > deadline {
            return Err("the echo server did not start within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// `iptables-restore -V`, to say which backend the baseline ran on.
pub fn restore_version(restore: &str) -> String {
    run(restore, &["-V"])
        .map(|out| out.trim().to_owned())
        .unwrap_or_else(|error| error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_service_is_the_last_portal_before_the_nodeports_jump() {
        let table = nat_table(&services(3, SERVER_IP), CLUSTER_CIDR);
        let portals: Vec<&str> = table
            .lines()
            .filter(|line| line.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(portals.len(), 4);
        assert!(portals[2].starts_with("-A KUBE-SERVICES -d 10.96.0.3/32 -p tcp -m comment --comment \"bench/svc-2:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(portals[3].ends_with("-j KUBE-NODEPORTS"));
        assert!(table.ends_with("COMMIT\n"));
    }

    #[test]
    fn two_endpoints_make_a_probability_ladder_of_separation_chains() {
        let mut service = services(1, SERVER_IP).remove(0);
        service
            .endpoints
            .push(SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 3), ECHO_PORT));
        let table = nat_table(&[service], CLUSTER_CIDR);
        let ladder: Vec<&str> = table
            .lines()
            .filter(|line| line.starts_with("-A KUBE-SVC-") && line.contains("-j KUBE-SEP-"))
            .collect();
        assert_eq!(ladder.len(), 2);
        assert!(ladder[0].contains("-m statistic --mode random --probability 0.50000000000"));
        assert!(!ladder[1].contains("statistic"));
        assert!(table.contains("-j DNAT --to-destination 10.244.0.3:9000\n"));
        let separations = table
            .lines()
            .filter(|l| l.starts_with(":KUBE-SEP-"))
            .count();
        assert_eq!(separations, 2);
    }

    #[test]
    fn chain_names_are_unique_and_kube_proxy_shaped() {
        let table = nat_table(&services(10_000, SERVER_IP), CLUSTER_CIDR);
        let declared: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with(":KUBE-SVC-") || l.starts_with(":KUBE-SEP-"))
            .collect();
        let unique: std::collections::BTreeSet<&str> = declared.iter().copied().collect();
        assert_eq!(declared.len(), 20_000);
        assert_eq!(unique.len(), 20_000);
        assert!(declared
            .iter()
            .all(|line| line.len() == ":KUBE-SVC-0123456789ABCDEF - [0:0]".len()));
        assert_eq!(service_vip(9_999), Ipv4Addr::new(10, 96, 39, 250));
    }
}
