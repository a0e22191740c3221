//! Part of `make bench`: compiling 10,000 rules against 10,000 identities for one node's
//! endpoints — compile time, and map entries compared with what a map keyed by
//! (identity, port, protocol) per endpoint (Cilium's policy map) needs for the same policy.

use std::collections::BTreeMap;
use std::time::Instant;

use weft_core::policy::compile::{compile, EndpointInput, IdentityKind};
use weft_core::policy::evaluate::NamedPorts;
use weft_core::policy::model::{
    EnforcementMode, Peer, Policy, PolicyId, PolicyKind, PortMatch, ProtocolMatch, Rule, Section,
};
use weft_core::policy::selector::{Labels, Selector};

const IDENTITIES: u32 = 10_000;
const POLICIES: usize = 100;
const RULES_PER_POLICY: usize = 100;
/// Distinct client applications rules name (well under the 1,024-selector bound).
const CLIENT_APPS: usize = 200;
const ENDPOINTS_ON_NODE: u32 = 110;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn main() {
    // Identities: pods of CLIENT_APPS applications in many replicas-with-distinct-labels.
    let identities: BTreeMap<u32, IdentityKind> = (0..IDENTITIES)
        .map(|i| {
            let app = format!("app-{}", i as usize % CLIENT_APPS);
            let shard = format!("shard-{}", i / CLIENT_APPS as u32);
            (
                1000 + i,
                IdentityKind::Endpoint(labels(&[("app", app), ("shard", shard)])),
            )
        })
        .collect();
    // Policies: each selects one server application and lets 100 client apps in on a port
    // range each: 10,000 rules.
    let policies: Vec<Policy> = (0..POLICIES)
        .map(|p| Policy {
            id: PolicyId {
                kind: PolicyKind::WeftNetworkPolicy,
                namespace: Some("bench".into()),
                name: format!("server-{p}"),
            },
            subject: Selector::from_labels(&labels(&[("app", format!("app-{p}"))])),
            rules: (0..RULES_PER_POLICY)
                .map(|r| Rule {
                    section: Section::Ingress,
                    index: r,
                    peers: vec![Peer::Endpoints(Selector::from_labels(&labels(&[(
                        "app",
                        format!("app-{}", (p + r) % CLIENT_APPS),
                    )])))],
                    ports: vec![PortMatch::Range {
                        protocol: ProtocolMatch::Tcp,
                        first: 8000 + r as u16 * 10,
                        last: 8000 + r as u16 * 10 + 4,
                    }],
                })
                .collect(),
            isolates_ingress: true,
            isolates_egress: false,
            unenforced: Vec::new(),
        })
        .collect();
    let endpoints: Vec<EndpointInput> = (0..ENDPOINTS_ON_NODE)
        .map(|e| EndpointInput {
            id: e,
            labels: labels(&[
                ("app", format!("app-{}", e as usize % POLICIES)),
                ("shard", "node".into()),
            ]),
            named_ports: NamedPorts::new(),
        })
        .collect();

    let started = Instant::now();
    let compiled =
        compile(&policies, EnforcementMode::Default, &endpoints, &identities).expect("compiles");
    let elapsed = started.elapsed();
    let (port_entries, peer_sets) = compiled.map_entries();

    // The same policy as (identity, port, protocol) entries per endpoint: every identity a
    // rule's peer selects, times every port the rule opens.
    let mut keyed_by_identity: u64 = 0;
    for endpoint in &endpoints {
        for policy in policies
            .iter()
            .filter(|p| p.subject.matches(&endpoint.labels))
        {
            for rule in &policy.rules {
                let peers = identities
                    .values()
                    .filter(|kind| match (kind, &rule.peers[0]) {
                        (IdentityKind::Endpoint(labels), Peer::Endpoints(selector)) => {
                            selector.matches(labels)
                        }
                        _ => false,
                    })
                    .count() as u64;
                let ports: u64 = rule
                    .ports
                    .iter()
                    .map(|p| match p {
                        PortMatch::Range { first, last, .. } => u64::from(last - first) + 1,
                        PortMatch::Named { .. } => 1,
                    })
                    .sum();
                keyed_by_identity += peers * ports;
            }
        }
    }
    let weft_entries = (port_entries + peer_sets) as u64;
    println!(
        "\npolicy compile: {} rules x {IDENTITIES} identities for {ENDPOINTS_ON_NODE} endpoints on a node",
        POLICIES * RULES_PER_POLICY
    );
    println!(
        "  compile time           {:>10.1} ms",
        elapsed.as_secs_f64() * 1000.0
    );
    println!(
        "  distinct peer selectors{:>10} (bound 1024)",
        compiled.selectors.len()
    );
    println!("  Weft map entries       {weft_entries:>10} ({port_entries} port entries + {peer_sets} peer sets)");
    println!("  (identity,port) keyed  {keyed_by_identity:>10}");
    println!(
        "  ratio                  {:>10.4} (Weft / identity-keyed; lower is better)",
        weft_entries as f64 / keyed_by_identity.max(1) as f64
    );
}
