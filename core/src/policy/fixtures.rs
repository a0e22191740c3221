//! Builders shared by the policy tests.

use crate::policy::model::{Peer, PortMatch, Rule, Section};
use crate::policy::selector::{Labels, Selector};

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Selects `app=<name>`.
pub fn app(name: &str) -> Selector {
    Selector::from_labels(&labels(&[("app", name)]))
}

pub fn rule(section: Section, index: usize, peers: Vec<Peer>, ports: Vec<PortMatch>) -> Rule {
    Rule {
        section,
        index,
        peers,
        ports,
    }
}
