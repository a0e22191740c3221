//! The node's own IPv4 addresses in the datapath (`node_addresses` in `lib/config.h`), so
//! NodePorts answer on every address of the node — secondary addresses and other NICs of
//! multi-homed GPU nodes — not only on its node IP.
//!
//! The addresses are read from the kernel every `interval` and only the difference is written;
//! this runs on its own map handle and never takes the agent's lock.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};

use crate::netlink;

/// The addresses that make a NodePort: every IPv4 address but loopback (the datapath matches
/// 127/8 itself) and link-local ones (every pod's gateway is 169.254.1.1).
pub fn node_addresses(found: impl IntoIterator<Item = Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    found
        .into_iter()
        .filter(|address| !address.is_loopback() && !address.is_link_local())
        .collect()
}

type AddressMap = HashMap<MapData, u32, u8>;

fn open(pin: &Path) -> Result<AddressMap, String> {
    let map = MapData::from_pin(pin).map_err(|error| error.to_string())?;
    let map = Map::from_map_data(map).map_err(|error| error.to_string())?;
    HashMap::try_from(map).map_err(|error| error.to_string())
}

/// Makes the map hold exactly `wanted`; returns what it holds afterwards.
fn write(map: &mut AddressMap, wanted: &BTreeSet<Ipv4Addr>) -> Result<BTreeSet<Ipv4Addr>, String> {
    let held: BTreeSet<Ipv4Addr> = map
        .keys()
        .filter_map(Result::ok)
        .map(|key| Ipv4Addr::from(u32::from_be(key)))
        .collect();
    for address in wanted.difference(&held) {
        map.insert(u32::from(*address).to_be(), 1, 0)
            .map_err(|error| format!("adding {address}: {error}"))?;
    }
    for address in held.difference(wanted) {
        map.remove(&u32::from(*address).to_be())
            .map_err(|error| format!("removing {address}: {error}"))?;
    }
    Ok(wanted.clone())
}

/// Keeps the pinned map at `pin` equal to the node's addresses until the agent stops.
pub async fn run(pin: PathBuf, interval: Duration) {
    let handle = match netlink::handle_here() {
        Ok(handle) => handle,
        Err(error) => {
            tracing::error!(%error, "cannot read the node's addresses: NodePorts answer on the node IP only");
            return;
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<BTreeSet<Ipv4Addr>> = None;
    let mut failing = false;
    loop {
        tick.tick().await;
        let result = match netlink::ipv4_addresses(&handle).await {
            Ok(found) => {
                let wanted = node_addresses(found);
                if written.as_ref() == Some(&wanted) {
                    continue;
                }
                open(&pin).and_then(|mut map| write(&mut map, &wanted))
            }
            Err(error) => Err(error.to_string()),
        };
        match result {
            Ok(now) => {
                let addresses: Vec<String> = now.iter().map(ToString::to_string).collect();
                tracing::info!(addresses = %addresses.join(","), "NodePorts answer on these node addresses");
                written = Some(now);
                failing = false;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot update the node's addresses in the datapath; NodePorts answer on the addresses written before (always the node IP)");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_link_local_addresses_are_not_node_addresses() {
        let found = ["127.0.0.1", "169.254.1.1", "172.30.0.1", "192.168.10.5"]
            .map(|address| address.parse::<Ipv4Addr>().expect("address"));
        assert_eq!(
            node_addresses(found),
            BTreeSet::from([
                "172.30.0.1".parse().expect("a"),
                "192.168.10.5".parse().expect("b")
            ])
        );
    }
}
