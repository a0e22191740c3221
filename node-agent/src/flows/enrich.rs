//! Turns a datapath event into a flow a person can read: wall-clock time, protocol and flag
//! names, and both ends named.

use std::net::Ipv4Addr;

use weft_api::observer::{Endpoint, Flow, ObservationPoint, Verdict};
use weft_core::policy::compile::Compiled;
use weft_core::policy::evaluate::Verdict as PolicyVerdict;
use weft_core::policy::model::{Direction, Protocol};
use weft_node_bpf::maps::{self, DropReason, FlowEvent, FlowVerdict};

use crate::flows::directory::{Directory, EndpointMeta};

/// Converts the datapath's CLOCK_MONOTONIC timestamps to Unix time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    realtime_minus_monotonic_ns: i64,
}

impl Clock {
    pub fn now() -> Self {
        let read = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime fills a valid timespec.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec * 1_000_000_000 + ts.tv_nsec
        };
        Self {
            realtime_minus_monotonic_ns: read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn unix_nanos(&self, monotonic_ns: u64) -> i64 {
        i64::try_from(monotonic_ns).unwrap_or(i64::MAX) + self.realtime_minus_monotonic_ns
    }
}

/// Where this agent runs, named in every flow it reports.
#[derive(Clone, Debug)]
pub struct Origin {
    pub node: String,
    pub cluster: String,
}

/// What the policy in force says about this flow: the rule that allowed it, or for a policy
/// drop the rule that denied it (or the policies isolating the endpoint when nothing allowed).
fn decided_by(
    event: &FlowEvent,
    compiled: &Compiled,
    peer_identity: u32,
) -> (Vec<String>, Vec<String>) {
    let direction = match maps::ObservationPoint::from_number(event.observation_point) {
        Some(maps::ObservationPoint::FromEndpoint) => Direction::Egress,
        Some(maps::ObservationPoint::ToEndpoint) => Direction::Ingress,
        _ => return (Vec::new(), Vec::new()),
    };
    let protocol = match event.protocol {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => Protocol::Other,
    };
    let (verdict, rule) = compiled.lookup(
        event.ifindex,
        direction,
        peer_identity,
        protocol,
        event.dst_port,
    );
    match (verdict, rule) {
        (PolicyVerdict::Allowed, Some(rule)) => (vec![rule.to_string()], Vec::new()),
        (PolicyVerdict::Denied, Some(rule)) => (Vec::new(), vec![rule.to_string()]),
        (PolicyVerdict::Denied, None) => (
            Vec::new(),
            compiled
                .endpoints
                .get(&event.ifindex)
                .and_then(|policy| policy.isolated_by.get(&direction))
                .map(|ids| ids.iter().map(|id| format!("default deny: {id}")).collect())
                .unwrap_or_default(),
        ),
        (PolicyVerdict::Allowed, None) => (Vec::new(), Vec::new()),
    }
}

pub fn enrich(
    event: &FlowEvent,
    directory: &mut Directory,
    origin: &Origin,
    clock: &Clock,
    compiled: Option<&Compiled>,
) -> Flow {
    let source_ip = Ipv4Addr::from(u32::from_be(event.src_ip));
    let destination_ip = Ipv4Addr::from(u32::from_be(event.dst_ip));
    let endpoint = |meta: Option<EndpointMeta>| {
        meta.map(|meta| Endpoint {
            identity: meta.identity,
            cluster_name: meta.cluster,
            namespace: meta.namespace,
            pod_name: meta.pod,
            labels: meta
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            node_name: meta.node,
        })
    };
    let drop_reason = DropReason::from_number(event.drop_reason);
    // A spoofed packet names the pod that really sent it, not the one whose address it used.
    let source = if drop_reason == Some(DropReason::SourceSpoofed) {
        directory.local_behind(event.ifindex)
    } else {
        directory.lookup(source_ip)
    };
    let destination = directory.lookup(destination_ip);
    let (allowed_by, denied_by) = match compiled {
        Some(compiled) => {
            let (peer, peer_ip) = match maps::ObservationPoint::from_number(event.observation_point)
            {
                Some(maps::ObservationPoint::FromEndpoint) => (&destination, destination_ip),
                _ => (&source, source_ip),
            };
            // No pod: the identity the datapath gives the address (a node, a policy's
            // prefix); an address nobody claims is the world.
            let peer_identity = peer
                .as_ref()
                .map(|m| m.identity)
                .or_else(|| compiled.address_identity(peer_ip))
                .unwrap_or(2);
            let (allowed, denied) = decided_by(event, compiled, peer_identity);
            // Only a policy drop is explained by policy.
            let denied = if drop_reason == Some(DropReason::PolicyDenied) {
                denied
            } else {
                Vec::new()
            };
            let allowed = if event.verdict == FlowVerdict::Forwarded as u8 {
                allowed
            } else {
                Vec::new()
            };
            (allowed, denied)
        }
        None => (Vec::new(), Vec::new()),
    };
    Flow {
        time_unix_nano: clock.unix_nanos(event.timestamp_ns),
        verdict: match FlowVerdict::from_number(event.verdict) {
            Some(FlowVerdict::Forwarded) => Verdict::Forwarded as i32,
            Some(FlowVerdict::Dropped) => Verdict::Dropped as i32,
            None => Verdict::Unknown as i32,
        },
        drop_reason: u32::from(event.drop_reason),
        drop_reason_desc: drop_reason
            .map(|reason| reason.description().to_owned())
            .unwrap_or_else(|| format!("unknown drop reason {}", event.drop_reason)),
        source_ip: source_ip.to_string(),
        destination_ip: destination_ip.to_string(),
        protocol: protocol_name(event.protocol),
        source_port: u32::from(event.src_port),
        destination_port: u32::from(event.dst_port),
        tcp_flags: if event.protocol == 6 {
            tcp_flag_names(event.tcp_flags)
        } else {
            Vec::new()
        },
        source: endpoint(source),
        destination: endpoint(destination),
        observation_point: match maps::ObservationPoint::from_number(event.observation_point) {
            Some(maps::ObservationPoint::FromEndpoint) => ObservationPoint::FromEndpoint as i32,
            Some(maps::ObservationPoint::ToEndpoint) => ObservationPoint::ToEndpoint as i32,
            Some(maps::ObservationPoint::ToOverlay) => ObservationPoint::ToOverlay as i32,
            Some(maps::ObservationPoint::FromNetwork) => ObservationPoint::FromNetwork as i32,
            None => ObservationPoint::Unknown as i32,
        },
        node_name: origin.node.clone(),
        length: event.length,
        denied_by,
        allowed_by,
    }
}

pub fn protocol_name(number: u8) -> String {
    match number {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        other => format!("IP-{other}"),
    }
}

pub fn tcp_flag_names(flags: u8) -> Vec<String> {
    [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_owned())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_becomes_a_flow_with_names_flags_and_time() {
        let mut directory = Directory::new(None);
        directory.set_local(
            31,
            EndpointMeta {
                ip: "10.1.1.2".parse().unwrap(),
                cluster: "east".into(),
                namespace: "training".into(),
                pod: "trainer-0".into(),
                node: "n1".into(),
                identity: 5,
                ..Default::default()
            },
        );
        let event = FlowEvent {
            timestamp_ns: 1_000,
            src_ip: u32::from(Ipv4Addr::new(10, 1, 1, 2)).to_be(),
            dst_ip: u32::from(Ipv4Addr::new(10, 1, 2, 1)).to_be(),
            src_port: 40000,
            dst_port: 8080,
            protocol: 6,
            verdict: 1,
            tcp_flags: 0x12,
            observation_point: 1,
            ..Default::default()
        };
        let origin = Origin {
            node: "n1".into(),
            cluster: "east".into(),
        };
        let clock = Clock {
            realtime_minus_monotonic_ns: 5_000,
        };
        let flow = enrich(&event, &mut directory, &origin, &clock, None);
        assert_eq!(flow.time_unix_nano, 6_000);
        assert_eq!(
            flow.source.as_ref().map(|s| s.pod_name.as_str()),
            Some("trainer-0")
        );
        assert_eq!(flow.destination, None, "an unknown address stays unnamed");
        assert_eq!(flow.tcp_flags, vec!["SYN", "ACK"]);
        assert_eq!(
            (flow.protocol.as_str(), flow.destination_port),
            ("TCP", 8080)
        );
        assert_eq!(flow.verdict, Verdict::Forwarded as i32);
        assert_eq!(
            flow.observation_point,
            ObservationPoint::FromEndpoint as i32
        );
    }

    #[test]
    fn a_spoofed_packet_names_the_pod_that_sent_it() {
        let mut directory = Directory::new(None);
        for (ifindex, ip, pod) in [(31, "10.1.1.2", "attacker"), (32, "10.1.1.3", "victim")] {
            directory.set_local(
                ifindex,
                EndpointMeta {
                    ip: ip.parse().unwrap(),
                    pod: pod.into(),
                    ..Default::default()
                },
            );
        }
        let event = FlowEvent {
            src_ip: u32::from(Ipv4Addr::new(10, 1, 1, 3)).to_be(),
            dst_ip: u32::from(Ipv4Addr::new(10, 1, 2, 1)).to_be(),
            ifindex: 31,
            protocol: 17,
            verdict: FlowVerdict::Dropped as u8,
            drop_reason: DropReason::SourceSpoofed as u8,
            observation_point: 1,
            ..Default::default()
        };
        let origin = Origin {
            node: "n1".into(),
            cluster: "east".into(),
        };
        let clock = Clock {
            realtime_minus_monotonic_ns: 0,
        };
        let flow = enrich(&event, &mut directory, &origin, &clock, None);
        assert_eq!(
            flow.source.as_ref().map(|s| s.pod_name.as_str()),
            Some("attacker")
        );
        assert_eq!(
            flow.source_ip, "10.1.1.3",
            "the address it used is still shown"
        );
        assert_eq!(
            flow.drop_reason_desc,
            "source address is not the endpoint's"
        );
    }
}
