//! The pod programs, attached with tcx to a pod's host-side veth, count exactly the packets and
//! bytes the pod sends and receives.

use std::time::{Duration, Instant};

use weft_agent::datapath::{attached_programs, Datapath};
use weft_e2e::bpffs::Bpffs;
use weft_e2e::netns::{unique_prefix, NetNs, VethPod};
use weft_node_bpf::maps::{EndpointInfo, EndpointPolicy, TrafficCounters};

const PINGS: u64 = 5;
const PAYLOAD: u64 = 100;
/// Ethernet (14) + IPv4 (20) + ICMP (8) + payload: what tc sees of one echo packet.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD;

/// Registers the pod as the agent does once CNI ADD has wired it: its addresses (the datapath
/// drops what a veth sends with any other source) and its policy state (none selects it).
fn register(datapath: &mut Datapath, pod: &NetNs, wired: &VethPod) {
    let mac = |text: &str| -> [u8; 6] {
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .filter_map(|byte| u8::from_str_radix(byte, 16).ok())
            .collect();
        bytes.try_into().expect("a MAC address")
    };
    let pod_mac = pod
        .exec(&["cat", "/sys/class/net/eth0/address"])
        .expect("the pod's MAC");
    datapath
        .upsert_endpoint(
            wired.pod_ip.parse().expect("pod address"),
            EndpointInfo {
                ifindex: wired.host_link.ifindex,
                identity: 256,
                mac: mac(&pod_mac),
                node_mac: mac(&wired.host_link.mac),
            },
        )
        .expect("register the endpoint");
    datapath
        .upsert_endpoint_policy(
            wired.host_link.ifindex,
            EndpointPolicy {
                unselected: 1,
                ..EndpointPolicy::default()
            },
        )
        .expect("its policy state");
}

/// A node namespace and a pod namespace joined by a veth pair, as the CNI will wire them.
fn node_with_one_pod(host_ip: &str, pod_ip: &str) -> (Bpffs, NetNs, NetNs, VethPod) {
    let prefix = unique_prefix();
    let bpffs = Bpffs::mount(&prefix).expect("private bpffs");
    let node = NetNs::create(format!("{prefix}-node")).expect("node namespace");
    let pod = NetNs::create(format!("{prefix}-pod")).expect("pod namespace");
    let wired =
        VethPod::wire(&node, &pod, &format!("{prefix}h"), host_ip, pod_ip).expect("wire the pod");
    (bpffs, node, pod, wired)
}

#[test]
fn pod_programs_count_what_a_pod_sends_and_receives() {
    let (bpffs, node, pod, wired) = node_with_one_pod("10.240.0.1", "10.240.0.2");

    let (ping, traffic) = node
        .enter(|| {
            let mut datapath = Datapath::load(
                bpffs.path(),
                &test_conntrack(),
                &test_nat(),
                &Default::default(),
                Default::default(),
            )
            .expect("load and verify the programs");
            register(&mut datapath, &pod, &wired);
            datapath
                .attach_endpoint(&wired.host_veth)
                .expect("attach with tcx to the host-side veth");
            let ping = pod.exec(&[
                "ping",
                "-c",
                &PINGS.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                &PAYLOAD.to_string(),
                &wired.host_ip,
            ]);
            let traffic = datapath
                .traffic(wired.host_link.ifindex)
                .expect("read the counters");
            (ping, traffic)
        })
        .expect("enter the node namespace");

    let ping = ping.expect("every ping is answered: the programs must pass traffic");
    assert!(
        ping.contains(&format!("{PINGS} received")),
        "ping output: {ping}"
    );
    let expected = TrafficCounters {
        packets: PINGS,
        bytes: PINGS * FRAME,
    };
    assert_eq!(traffic.sent, expected, "echo requests the pod sent");
    assert_eq!(
        traffic.received, expected,
        "echo replies delivered to the pod"
    );
}

#[test]
fn the_datapath_outlives_the_agent_until_detached() {
    let (bpffs, node, pod, wired) = node_with_one_pod("10.240.0.5", "10.240.0.6");
    let veth = wired.host_veth.as_str();
    let ifindex = wired.host_link.ifindex;
    let ping = |count: &str| {
        pod.exec(&["ping", "-c", count, "-i", "0.2", "-W", "2", &wired.host_ip])
            .expect("the pod reaches its node")
    };

    let (attached_after_agent_exit, counted_by_the_next_agent, after_detach) = node
        .enter(|| {
            let mut first_agent = Datapath::load(
                bpffs.path(),
                &test_conntrack(),
                &test_nat(),
                &Default::default(),
                Default::default(),
            )
            .expect("load");
            register(&mut first_agent, &pod, &wired);
            first_agent.attach_endpoint(veth).expect("attach");
            drop(first_agent); // the agent exits: pinned links and maps stay
            let attached = (
                attached_programs(veth, true).expect("query ingress"),
                attached_programs(veth, false).expect("query egress"),
            );
            ping("3");
            let mut next_agent = Datapath::load(
                bpffs.path(),
                &test_conntrack(),
                &test_nat(),
                &Default::default(),
                Default::default(),
            )
            .expect("load again");
            let counted = next_agent.traffic(ifindex).expect("counters");
            next_agent.detach(veth);
            // The kernel detaches when the last reference to a link closes. A child that
            // another test is spawning holds copies of this process's descriptors until its
            // exec closes them (CLOEXEC), so allow a moment.
            let deadline = Instant::now() + Duration::from_secs(3);
            let after_detach = loop {
                let now = (
                    attached_programs(veth, true).expect("query ingress"),
                    attached_programs(veth, false).expect("query egress"),
                );
                if now == (vec![], vec![]) || Instant::now() > deadline {
                    break now;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            (attached, counted, after_detach)
        })
        .expect("enter the node namespace");

    assert_eq!(
        attached_after_agent_exit,
        (
            vec!["from_container".to_owned()],
            vec!["to_container".to_owned()]
        ),
        "the programs stay attached when the agent's process lets go"
    );
    assert_eq!(
        counted_by_the_next_agent.sent.packets, 3,
        "a restarted agent reads what was counted while no agent ran"
    );
    assert_eq!(
        after_detach,
        (vec![], vec![]),
        "detach removes both programs"
    );
    ping("2"); // a detached endpoint is not black-holed
}

/// Connection tracking as a test node runs it: the agent's defaults, a small table.
fn test_nat() -> weft_agent::nat::NatSettings {
    weft_agent::nat::NatSettings {
        max_entries: 65_536,
        snat_ports: weft_agent::nat::PortRange::new(61_000, 65_535).expect("a valid range"),
    }
}

fn test_conntrack() -> weft_agent::conntrack::CtSettings {
    weft_agent::conntrack::CtSettings {
        max_entries: 65_536,
        syn: Duration::from_secs(60),
        established: Duration::from_secs(21_600),
        closing: Duration::from_secs(10),
        other: Duration::from_secs(60),
    }
}
