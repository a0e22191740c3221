//! The node's uplink in Kubernetes mode: the device holding the Node's InternalIP, and its MTU.
//! Nodes name their NIC `eth0`, `ens5`, `enp1s0`…, and clouds differ in MTU (1460 on GCE, 9001
//! on AWS), so unless `--uplink` / `--mtu` say otherwise the agent asks the kernel.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;

use crate::netlink::{handle_here, NetlinkError};

/// A network device: its name and MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub mtu: Option<u32>,
}

/// The device in this namespace that has `ip` as an address, if any.
pub async fn device_with_address(ip: Ipv4Addr) -> Result<Option<Device>, NetlinkError> {
    let handle = handle_here()?;
    let mut addresses = handle
        .address()
        .get()
        .set_address_filter(IpAddr::V4(ip))
        .execute();
    let mut index = None;
    while let Some(message) =
        addresses
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("listing addresses to find {ip}"),
                source,
            })?
    {
        let holds = message.attributes.iter().any(|attribute| {
            matches!(attribute, AddressAttribute::Local(a) | AddressAttribute::Address(a) if *a == IpAddr::V4(ip))
        });
        if holds {
            index = Some(message.header.index);
            break;
        }
    }
    let Some(index) = index else {
        return Ok(None);
    };
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|source| NetlinkError::Request {
            what: format!("looking up link {index}"),
            source,
        })?;
    Ok(link.and_then(|link| {
        let name = link
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })?;
        let mtu = link
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            });
        Some(Device { name, mtu })
    }))
}
