//! IPv4 address management for the node's pod CIDR. The agent owns it (the CNI plugin only
//! asks), and every change is written to disk before it is acknowledged, so an agent restart
//! never hands out an address that a running pod still holds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {cidr} is exhausted: all {capacity} addresses are in use; free pods or give the node a larger CIDR")]
    Exhausted { cidr: Ipv4Net, capacity: u32 },
    #[error("pod CIDR {0} is too small: it needs at least two host addresses (/30 or larger)")]
    TooSmall(Ipv4Net),
    #[error("the allocations in {path} are for pod CIDR {stored}, but this node's pod CIDR is {configured}; move the file away only after every pod on the node is gone")]
    CidrChanged {
        path: PathBuf,
        stored: Ipv4Net,
        configured: Ipv4Net,
    },
    #[error("cannot read IPAM state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("IPAM state {path} is corrupt ({source}); it must not be discarded while pods run, restore it or recreate the node")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot persist IPAM state to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    cidr: Ipv4Net,
    /// Where the next search starts: just after the last address handed out, so a freed
    /// address is reused last.
    cursor: u32,
    /// Address → owner (the container ID).
    allocations: BTreeMap<Ipv4Addr, String>,
}

/// The node's pod address pool, persisted in one JSON file.
pub struct Ipam {
    path: PathBuf,
    state: State,
}

impl Ipam {
    /// Opens the pool stored at `path`, or starts an empty one for `cidr`.
    pub fn open(path: impl Into<PathBuf>, cidr: Ipv4Net) -> Result<Self, IpamError> {
        let path = path.into();
        if cidr.prefix_len() > 30 {
            return Err(IpamError::TooSmall(cidr));
        }
        let cidr = cidr.trunc();
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if state.cidr != cidr {
                    return Err(IpamError::CidrChanged {
                        path,
                        stored: state.cidr,
                        configured: cidr,
                    });
                }
                state
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => State {
                cidr,
                cursor: 0,
                allocations: BTreeMap::new(),
            },
            Err(source) => return Err(IpamError::Read { path, source }),
        };
        Ok(Self { path, state })
    }

    /// The address held by `owner`, allocating one if it holds none (so a retried CNI ADD
    /// gets the same address).
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some(address) = self.address_of(owner) {
            return Ok(address);
        }
        let cidr = self.state.cidr;
        let first = u32::from(cidr.network()) + 1;
        let capacity = u32::from(cidr.broadcast()) - first;
        for step in 0..capacity {
            let offset = (self.state.cursor + step) % capacity;
            let candidate = Ipv4Addr::from(first + offset);
            if !self.state.allocations.contains_key(&candidate) {
                let mut next = self.state.clone();
                next.allocations.insert(candidate, owner.to_owned());
                next.cursor = (offset + 1) % capacity;
                self.persist(next)?;
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted { cidr, capacity })
    }

    /// Frees what `owner` holds; freeing nothing is not an error (CNI DEL is idempotent).
    pub fn release(&mut self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(address) = self.address_of(owner) else {
            return Ok(None);
        };
        let mut next = self.state.clone();
        next.allocations.remove(&address);
        self.persist(next)?;
        Ok(Some(address))
    }

    pub fn address_of(&self, owner: &str) -> Option<Ipv4Addr> {
        self.state
            .allocations
            .iter()
            .find_map(|(address, holder)| (holder == owner).then_some(*address))
    }

    /// Writes the new state durably (temp file, fsync, rename), then adopts it; on failure
    /// the in-memory state stays as it was on disk.
    fn persist(&mut self, next: State) -> Result<(), IpamError> {
        let write_error = |source| IpamError::Write {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|error| write_error(std::io::Error::other(error)))?;
        weft_core::files::write_atomically(&self.path, &json).map_err(write_error)?;
        self.state = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &tempfile::TempDir, cidr: &str) -> Ipam {
        Ipam::open(dir.path().join("ipam.json"), cidr.parse().expect("cidr")).expect("open")
    }

    #[test]
    fn addresses_skip_network_and_broadcast_and_are_stable_per_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = pool(&dir, "10.1.1.0/30");
        let a = ipam.allocate("pod-a").expect("first");
        let b = ipam.allocate("pod-b").expect("second");
        assert_eq!(
            (a, b),
            ("10.1.1.1".parse().unwrap(), "10.1.1.2".parse().unwrap())
        );
        assert_eq!(
            ipam.allocate("pod-a").expect("retry"),
            a,
            "a retried ADD keeps its address"
        );
        let error = ipam.allocate("pod-c").expect_err("a /30 holds two pods");
        assert!(error.to_string().contains("exhausted"), "{error}");
    }

    #[test]
    fn a_restarted_agent_never_hands_out_a_held_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = pool(&dir, "10.1.2.0/24")
            .allocate("running-pod")
            .expect("allocate");
        let mut restarted = pool(&dir, "10.1.2.0/24");
        assert_eq!(restarted.address_of("running-pod"), Some(held));
        let fresh = restarted.allocate("new-pod").expect("allocate");
        assert_ne!(fresh, held);
    }

    #[test]
    fn freed_addresses_are_reused_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = pool(&dir, "10.1.3.0/29");
        let first = ipam.allocate("a").expect("a");
        assert_eq!(ipam.release("a").expect("release"), Some(first));
        assert_eq!(
            ipam.release("a").expect("second release"),
            None,
            "DEL is idempotent"
        );
        let next = ipam.allocate("b").expect("b");
        assert_ne!(
            next, first,
            "the address just freed is not handed out again at once"
        );
    }

    #[test]
    fn a_changed_pod_cidr_or_corrupt_state_is_refused_not_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        pool(&dir, "10.1.4.0/24").allocate("a").expect("allocate");
        let changed = Ipam::open(dir.path().join("ipam.json"), "10.9.0.0/24".parse().unwrap());
        assert!(matches!(changed, Err(IpamError::CidrChanged { .. })));
        std::fs::write(dir.path().join("ipam.json"), b"{not json").expect("write");
        let corrupt = Ipam::open(dir.path().join("ipam.json"), "10.1.4.0/24".parse().unwrap());
        assert!(matches!(corrupt, Err(IpamError::Corrupt { .. })));
    }
}
