//! Who owns an address, for naming both ends of a flow. Local endpoints come from the agent's
//! own records; everything else from the endpoints table of the agent's state (the cluster's
//! and the mesh's endpoints, as its sources list them).

use std::collections::HashMap;
use std::net::Ipv4Addr;

pub use weft_core::state::EndpointMeta;

use crate::state::ClusterState;

#[derive(Default)]
pub struct Directory {
    local: HashMap<Ipv4Addr, EndpointMeta>,
    /// Local endpoints by their host-side veth: who really sent a packet whose source lies.
    local_by_ifindex: HashMap<u32, Ipv4Addr>,
    state: Option<ClusterState>,
}

impl Directory {
    /// `state`: where the cluster's endpoints are; `None` names local endpoints only.
    pub fn new(state: Option<ClusterState>) -> Self {
        Self {
            state,
            ..Self::default()
        }
    }

    /// Records a local endpoint behind its host-side veth `ifindex`.
    pub fn set_local(&mut self, ifindex: u32, meta: EndpointMeta) {
        self.local_by_ifindex.insert(ifindex, meta.ip);
        self.local.insert(meta.ip, meta);
    }

    pub fn remove_local(&mut self, ip: Ipv4Addr) {
        self.local.remove(&ip);
        self.local_by_ifindex.retain(|_, local| *local != ip);
    }

    /// The local endpoint behind host-side veth `ifindex`, whatever address its packet carried.
    pub fn local_behind(&self, ifindex: u32) -> Option<EndpointMeta> {
        let ip = *self.local_by_ifindex.get(&ifindex)?;
        self.lookup(ip)
    }

    /// The cluster's entry (richer: it has labels) or the local record.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<EndpointMeta> {
        let known = self
            .state
            .as_ref()
            .and_then(|state| state.read().endpoints.get(&ip).cloned());
        known.or_else(|| self.local.get(&ip).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ip: &str, pod: &str) -> EndpointMeta {
        EndpointMeta {
            ip: ip.parse().expect("ip"),
            pod: pod.into(),
            ..Default::default()
        }
    }

    #[test]
    fn local_records_answer_and_the_cluster_wins_when_it_knows_more() {
        let state = ClusterState::new(Vec::new());
        let mut directory = Directory::new(Some(state.clone()));
        directory.set_local(7, meta("10.1.1.1", "local-name"));
        assert_eq!(
            directory.lookup("10.1.1.1".parse().unwrap()).map(|m| m.pod),
            Some("local-name".into())
        );
        assert_eq!(directory.lookup("10.1.2.1".parse().unwrap()), None);

        let mut remote = meta("10.1.2.1", "remote");
        remote.labels.insert("app".into(), "model".into());
        state.change(|tables| tables.upsert("kubernetes", remote.clone()));
        assert_eq!(directory.lookup("10.1.2.1".parse().unwrap()), Some(remote));
    }
}
