//! What still points UDP traffic at a backend that is gone. kube-proxy flushes the conntrack
//! entries of a removed UDP endpoint; Weft has two such places:
//! - connected sockets: the socket balancer points a UDP socket at a backend when it
//!   `connect()`s, and a connected socket never asks again (glibc's resolver would keep sending
//!   to a deleted DNS pod). They are destroyed with sock_diag's `SOCK_DESTROY`, as `ss -K`
//!   does: the application gets `ECONNABORTED`, opens a new socket, and the balancer gives it a
//!   live backend, as Cilium's socket LB does.
//! - per-packet translations (`lb_flows`, for traffic no socket hook saw): a UDP flow's
//!   translation to the backend is removed, so its next datagram chooses a live backend.
//!
//! TCP connections are left alone: they end on their own (a reset from the gone address).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use weft_node_bpf::maps::{self, LbNatEntry, LbTuple};

use aya::maps::{HashMap, Map, MapData};

#[derive(Debug, thiserror::Error)]
pub enum StaleSocketError {
    #[error("cannot enter network namespace {path}: {reason}")]
    Namespace { path: String, reason: String },
    #[error("sock_diag: {0}")]
    Netlink(String),
}

/// Backends by address and port.
pub type Backends = BTreeSet<(Ipv4Addr, u16)>;

fn netlink_error(error: impl std::fmt::Display) -> StaleSocketError {
    StaleSocketError::Netlink(error.to_string())
}

fn send<T: NetlinkSerializable + std::fmt::Debug>(
    socket: &Socket,
    flags: u16,
    payload: T,
) -> Result<(), StaleSocketError>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(netlink_error)?;
    Ok(())
}

/// Reads replies until the kernel says it is done (a dump's end, or the acknowledgement of a
/// request); `each` gets every socket reported. An error reply is returned as its errno.
fn receive(
    socket: &Socket,
    mut each: impl FnMut(&SocketId),
) -> Result<Option<i32>, StaleSocketError> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut buffer[..], 0)
            .map_err(netlink_error)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .map_err(netlink_error)?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response.header.socket_id)
                }
                NetlinkPayload::Done(_) => return Ok(None),
                NetlinkPayload::Error(error) => {
                    return Ok(error.code.map(|code| -code.get()));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Destroys, in the current thread's network namespace, every UDP socket connected to one of
/// `backends`; returns how many.
fn destroy_here(backends: &Backends) -> Result<usize, StaleSocketError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(netlink_error)?;
    socket.bind_auto().map_err(netlink_error)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(netlink_error)?;
    let request = |socket_id: SocketId| InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    };
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(request(SocketId::new_v4())),
    )?;
    let mut stale = Vec::new();
    receive(&socket, |id| {
        if let IpAddr::V4(address) = id.destination_address {
            if backends.contains(&(address, id.destination_port)) {
                stale.push(id.clone());
            }
        }
    })?;
    let mut destroyed = 0;
    for id in stale {
        send(
            &socket,
            NLM_F_REQUEST | NLM_F_ACK,
            SockDiagDestroy::new(SockDiagMessage::InetRequest(request(id))),
        )?;
        match receive(&socket, |_| {})? {
            None | Some(0) => destroyed += 1,
            // Closed since the dump.
            Some(errno) if errno == libc::ENOENT => {}
            Some(errno) => {
                return Err(StaleSocketError::Netlink(format!(
                    "SOCK_DESTROY failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                )))
            }
        }
    }
    Ok(destroyed)
}

/// Destroys the UDP sockets connected to `backends` in the network namespace at `netns` (the
/// agent's own when `None`), from a thread of its own that enters it.
pub fn destroy_connected_udp(
    netns: Option<&Path>,
    backends: &Backends,
) -> Result<usize, StaleSocketError> {
    let Some(path) = netns else {
        return destroy_here(backends);
    };
    let namespace = File::open(path).map_err(|error| StaleSocketError::Namespace {
        path: path.display().to_string(),
        reason: error.to_string(),
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a valid namespace fd; setns affects this new thread only.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(StaleSocketError::Namespace {
                        path: path.display().to_string(),
                        reason: std::io::Error::last_os_error().to_string(),
                    });
                }
                destroy_here(backends)
            })
            .join()
            .unwrap_or_else(|_| Err(StaleSocketError::Netlink("the thread panicked".into())))
    })
}

/// Removes the per-packet UDP translations (both directions) to one of `backends` from the
/// NAT tables pinned in `pin_dir`; returns how many connections.
pub fn forget_translations(pin_dir: &Path, backends: &Backends) -> Result<usize, String> {
    let open = |name: &str| -> Result<HashMap<MapData, LbTuple, LbNatEntry>, String> {
        let map = MapData::from_pin(pin_dir.join(name)).map_err(|error| error.to_string())?;
        let map = Map::from_map_data(map).map_err(|error| error.to_string())?;
        HashMap::try_from(map).map_err(|error| error.to_string())
    };
    let mut flows = open(maps::LB_FLOWS)?;
    let mut reverse = open(maps::LB_REVERSE)?;
    let stale: Vec<(LbTuple, LbNatEntry)> = flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, entry)| {
            let backend = (
                Ipv4Addr::from(u32::from_be(entry.to.daddr)),
                u16::from_be(entry.to.dport),
            );
            key.protocol == IPPROTO_UDP && backends.contains(&backend)
        })
        .collect();
    for (key, entry) in &stale {
        let _ = reverse.remove(&LbTuple::answering(&entry.to, key.protocol));
        let _ = flows.remove(key);
    }
    Ok(stale.len())
}

/// Tells everything that still points at `backends`: sockets connected to them in every
/// namespace of `namespaces` and the agent's own, and per-packet translations in the NAT
/// tables pinned in `pin_dir`. Logs what it did; meant for a blocking task of its own.
pub fn forget(pin_dir: PathBuf, namespaces: Vec<PathBuf>, backends: Backends) {
    let translations = forget_translations(&pin_dir, &backends).unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot remove UDP translations to removed backends; their flows keep them until they go quiet");
        0
    });
    let mut destroyed = 0;
    for netns in namespaces
        .iter()
        .map(|path| Some(path.as_path()))
        .chain([None])
    {
        match destroy_connected_udp(netns, &backends) {
            Ok(count) => destroyed += count,
            // A pod that went away meanwhile has no sockets left to worry about.
            Err(error) => tracing::debug!(%error, "cannot look for sockets of removed backends"),
        }
    }
    if destroyed + translations > 0 {
        let backends: Vec<String> = backends
            .iter()
            .map(|(address, port)| format!("{address}:{port}"))
            .collect();
        tracing::info!(
            sockets = destroyed,
            translations,
            backends = %backends.join(","),
            "UDP sockets connected to removed backends destroyed and their translations removed; new datagrams go to live backends"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_NET_ADMIN (the tests run as root, as the agent does).
    #[test]
    fn a_udp_socket_connected_to_a_removed_backend_is_destroyed() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.connect("127.0.0.77:9").expect("connect");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        other.connect("127.0.0.78:9").expect("connect");
        let destroyed =
            destroy_connected_udp(None, &BTreeSet::from([(Ipv4Addr::new(127, 0, 0, 77), 9)]));
        assert_eq!(
            destroyed.expect("sock_diag"),
            1,
            "only the socket of the gone backend"
        );
        let error = socket
            .send(b"x")
            .expect_err("destroyed: no longer connected");
        assert_eq!(error.raw_os_error(), Some(libc::EDESTADDRREQ), "{error}");
        other.send(b"x").expect("the other socket is untouched");
    }
}
