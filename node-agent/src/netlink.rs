//! Netlink work on links, addresses, routes and neighbours, in the node's namespace or in a
//! pod's. A netlink socket belongs to the namespace of the thread that opened it, so a handle
//! for another namespace is opened on a short-lived thread that entered it first.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{new_connection, Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot enter network namespace {path}: {reason}")]
    Namespace { path: String, reason: String },
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// The negative errno a netlink request failed with, as a positive number.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

fn is_no_device(error: &rtnetlink::Error) -> bool {
    errno(error) == Some(nix::errno::Errno::ENODEV as i32)
}

fn is_no_such_route(error: &rtnetlink::Error) -> bool {
    errno(error) == Some(nix::errno::Errno::ESRCH as i32)
}

/// A handle in the calling thread's namespace; needs a Tokio runtime with IO enabled.
pub fn handle_here() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) = new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Every IPv4 address on the node's interfaces, as `ip -4 addr` lists them.
pub async fn ipv4_addresses(handle: &Handle) -> Result<Vec<Ipv4Addr>, NetlinkError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut found = Vec::new();
    let mut messages = handle.address().get().execute();
    while let Some(message) = messages
        .try_next()
        .await
        .map_err(request("listing the node's addresses"))?
    {
        for attribute in &message.attributes {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); either names one of ours on a broadcast link.
            if let AddressAttribute::Local(IpAddr::V4(address))
            | AddressAttribute::Address(IpAddr::V4(address)) = attribute
            {
                found.push(*address);
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// A handle whose socket lives in the namespace at `netns`.
pub async fn handle_in(netns: &Path) -> Result<Handle, NetlinkError> {
    let file = File::open(netns).map_err(|error| NetlinkError::Namespace {
        path: netns.display().to_string(),
        reason: error.to_string(),
    })?;
    let runtime = tokio::runtime::Handle::current();
    let path = netns.display().to_string();
    let opened = std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetlinkError::Namespace {
            path,
            reason: errno.to_string(),
        })?;
        let _runtime = runtime.enter();
        new_connection().map_err(NetlinkError::Socket)
    })
    .join()
    .map_err(|_| NetlinkError::Unexpected("the namespace thread panicked".into()))??;
    let (connection, handle, _) = opened;
    tokio::spawn(connection);
    Ok(handle)
}

pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, NetlinkError> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(error) if is_no_device(&error) => Ok(None),
        Err(source) => Err(NetlinkError::Request {
            what: format!("looking up link {name}"),
            source,
        }),
    }
}

pub fn mac_of(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => bytes.as_slice().try_into().ok(),
            _ => None,
        })
}

/// What wiring a pod produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WiredPod {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// How a pod is wired: names, addresses and the gateway it routes through.
pub struct PodWiring<'a> {
    pub host_veth: &'a str,
    /// Unique per container: plugins for different containers run concurrently.
    pub temporary_peer: &'a str,
    pub ifname: &'a str,
    pub netns: &'a Path,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Creates the veth pair, moves the peer into the pod as `ifname` with the pod's /32 address,
/// a link-scope route to the gateway, a default route through it and a permanent neighbour
/// entry for it (the host-side veth's MAC, so the pod never ARPs), and routes the pod's /32 to
/// the host-side veth in the node's namespace.
pub async fn wire_pod(wiring: &PodWiring<'_>) -> Result<WiredPod, NetlinkError> {
    let node = handle_here()?;
    let pod = handle_in(wiring.netns).await?;
    if link_by_name(&pod, wiring.ifname).await?.is_some() {
        return Err(NetlinkError::Unexpected(format!(
            "{} already exists in {}; the runtime must call DEL before adding again",
            wiring.ifname,
            wiring.netns.display()
        )));
    }
    // A leftover from an ADD that failed half-way for the same container.
    if let Some(stale) = link_by_name(&node, wiring.host_veth).await? {
        node.link()
            .del(stale.header.index)
            .execute()
            .await
            .map_err(request(format!("removing stale {}", wiring.host_veth)))?;
    }
    node.link()
        .add(
            LinkVeth::new(wiring.host_veth, wiring.temporary_peer)
                .mtu(wiring.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(request(format!("creating veth {}", wiring.host_veth)))?;
    let host = link_by_name(&node, wiring.host_veth)
        .await?
        .ok_or_else(|| NetlinkError::Unexpected(format!("{} vanished", wiring.host_veth)))?;
    let host_ifindex = host.header.index;
    let host_mac = mac_of(&host)
        .ok_or_else(|| NetlinkError::Unexpected(format!("{} has no MAC", wiring.host_veth)))?;
    let peer = link_by_name(&node, wiring.temporary_peer)
        .await?
        .ok_or_else(|| NetlinkError::Unexpected(format!("{} vanished", wiring.temporary_peer)))?;
    let netns = File::open(wiring.netns).map_err(|error| NetlinkError::Namespace {
        path: wiring.netns.display().to_string(),
        reason: error.to_string(),
    })?;
    node.link()
        .set(
            LinkUnspec::new_with_index(peer.header.index)
                .setns_by_fd(netns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(request("moving the veth peer into the pod"))?;
    drop(netns);
    node.link()
        .set(LinkUnspec::new_with_index(host_ifindex).up().build())
        .execute()
        .await
        .map_err(request(format!("bringing up {}", wiring.host_veth)))?;

    let moved = link_by_name(&pod, wiring.temporary_peer)
        .await?
        .ok_or_else(|| {
            NetlinkError::Unexpected("the veth peer did not arrive in the pod".into())
        })?;
    let index = moved.header.index;
    let pod_mac = mac_of(&moved)
        .ok_or_else(|| NetlinkError::Unexpected("the pod interface has no MAC".into()))?;
    pod.link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(wiring.ifname.to_owned())
                // The MTU given at creation reaches only the host side of the pair.
                .mtu(wiring.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(request(format!(
            "renaming the pod interface to {}",
            wiring.ifname
        )))?;
    pod.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(request("bringing up the pod interface"))?;
    if let Some(lo) = link_by_name(&pod, "lo").await? {
        pod.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(request("bringing up lo in the pod"))?;
    }
    pod.address()
        .add(index, IpAddr::V4(wiring.ip), 32)
        .execute()
        .await
        .map_err(request(format!("adding {}/32 to the pod", wiring.ip)))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(wiring.gateway, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(request("adding the gateway route in the pod"))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(wiring.gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .map_err(request("adding the default route in the pod"))?;
    pod.neighbours()
        .add(index, IpAddr::V4(wiring.gateway))
        .link_layer_address(&host_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(request("adding the gateway neighbour in the pod"))?;
    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(wiring.ip, 32)
                .output_interface(host_ifindex)
                .scope(RouteScope::Link)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(request(format!(
            "routing {}/32 to {}",
            wiring.ip, wiring.host_veth
        )))?;
    Ok(WiredPod {
        host_ifindex,
        host_mac,
        pod_mac,
    })
}

/// Deletes the host-side veth (and with it the pair and the pod's /32 route); nothing to do
/// when it is already gone.
pub async fn unwire_pod(host_veth: &str) -> Result<(), NetlinkError> {
    let node = handle_here()?;
    let Some(link) = link_by_name(&node, host_veth).await? else {
        return Ok(());
    };
    match node.link().del(link.header.index).execute().await {
        Err(error) if is_no_device(&error) => Ok(()),
        result => result.map_err(request(format!("deleting {host_veth}"))),
    }
}

/// Routes `destination` through `gateway` (another node) in the calling thread's namespace.
pub async fn route_via(destination: Ipv4Net, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
    let node = handle_here()?;
    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(destination.network(), destination.prefix_len())
                .gateway(gateway)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(request(format!("routing {destination} via {gateway}")))
}

/// Where a route sends its traffic: what [`route_del`] matches besides the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteNextHop {
    /// Through this gateway ([`route_via`]).
    Gateway(Ipv4Addr),
    /// Out of the device with this index ([`route_dev`]).
    Device(u32),
}

/// Removes the main table's route to `destination` through `next_hop` in the calling thread's
/// namespace; a route to the same destination elsewhere is left alone. Returns whether there
/// was one (removing a route that is gone is not an error).
pub async fn route_del(destination: Ipv4Net, next_hop: RouteNextHop) -> Result<bool, NetlinkError> {
    let node = handle_here()?;
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination.network(), destination.prefix_len())
        // Any scope and protocol: as `ip route del`, match on destination and next hop.
        .scope(RouteScope::NoWhere)
        .protocol(RouteProtocol::Unspec);
    route = match next_hop {
        RouteNextHop::Gateway(gateway) => route.gateway(gateway),
        RouteNextHop::Device(ifindex) => route.output_interface(ifindex),
    };
    match node.route().del(route.build()).execute().await {
        Ok(()) => Ok(true),
        Err(error) if is_no_such_route(&error) => Ok(false),
        Err(source) => Err(NetlinkError::Request {
            what: format!("removing the route to {destination} ({next_hop:?})"),
            source,
        }),
    }
}

/// The VXLAN device tunnel mode sends through: external (collect-metadata) mode, so the
/// datapath chooses the remote node per packet with a tunnel key. Returns its index.
pub async fn ensure_vxlan(name: &str, port: u16, mtu: u32) -> Result<u32, NetlinkError> {
    let node = handle_here()?;
    if link_by_name(&node, name).await?.is_none() {
        node.link()
            .add(
                rtnetlink::LinkVxlan::new(name, 0)
                    .port(port)
                    .collect_metadata(true)
                    .learning(false)
                    .mtu(mtu)
                    // No ARP on the tunnel: to_tunnel addresses every packet.
                    .arp(false)
                    .build(),
            )
            .execute()
            .await
            .map_err(request(format!("creating VXLAN device {name}")))?;
    }
    let link = link_by_name(&node, name)
        .await?
        .ok_or_else(|| NetlinkError::Unexpected(format!("{name} vanished")))?;
    node.link()
        .set(
            LinkUnspec::new_with_index(link.header.index)
                .up()
                .arp(false)
                .build(),
        )
        .execute()
        .await
        .map_err(request(format!("bringing up {name}")))?;
    Ok(link.header.index)
}

/// Routes `destination` out of device `ifindex` (no gateway), with `source` as the preferred
/// source address, in the calling thread's namespace.
pub async fn route_dev(
    destination: Ipv4Net,
    ifindex: u32,
    source: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let node = handle_here()?;
    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(destination.network(), destination.prefix_len())
                .output_interface(ifindex)
                .scope(RouteScope::Link)
                .pref_source(source)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(request(format!("routing {destination} into the tunnel")))
}
