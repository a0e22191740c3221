//! The pod programs, attached with tcx to a pod's host-side veth, count exactly the packets and
//! bytes the pod sends and receives.

use std::time::{Duration, Instant};

use weft_agent::datapath::{attached_programs, PodDatapath};
use weft_e2e::netns::{unique_prefix, NetNs, VethPod};
use weft_node_bpf::maps::TrafficCounters;

const PINGS: u64 = 5;
const PAYLOAD: u64 = 100;
/// Ethernet (14) + IPv4 (20) + ICMP (8) + payload: what tc sees of one echo packet.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD;

/// A node namespace and a pod namespace joined by a veth pair, as the CNI will wire them.
fn node_with_one_pod(host_ip: &str, pod_ip: &str) -> (NetNs, NetNs, VethPod) {
    let prefix = unique_prefix();
    let node = NetNs::create(format!("{prefix}-node")).expect("node namespace");
    let pod = NetNs::create(format!("{prefix}-pod")).expect("pod namespace");
    let wired =
        VethPod::wire(&node, &pod, &format!("{prefix}h"), host_ip, pod_ip).expect("wire the pod");
    (node, pod, wired)
}

#[test]
fn pod_programs_count_what_a_pod_sends_and_receives() {
    let (node, pod, wired) = node_with_one_pod("10.240.0.1", "10.240.0.2");

    let (ping, traffic) = node
        .enter(|| {
            let mut datapath = PodDatapath::load().expect("load and verify the pod programs");
            datapath
                .attach(&wired.host_veth)
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
fn dropping_the_datapath_detaches_and_traffic_still_flows() {
    let (node, pod, wired) = node_with_one_pod("10.240.0.5", "10.240.0.6");
    let veth = wired.host_veth.as_str();

    let (while_attached, after_drop) = node
        .enter(|| {
            let mut datapath = PodDatapath::load().expect("load");
            datapath.attach(veth).expect("attach");
            let while_attached = (
                attached_programs(veth, true).expect("query ingress"),
                attached_programs(veth, false).expect("query egress"),
            );
            drop(datapath);
            // The kernel detaches when the last reference to a link closes. A child that
            // another test is spawning holds copies of this process's descriptors until its
            // exec closes them (CLOEXEC), so allow a moment.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let after_drop = (
                    attached_programs(veth, true).expect("query ingress"),
                    attached_programs(veth, false).expect("query egress"),
                );
                if after_drop == (vec![], vec![]) || Instant::now() > deadline {
                    break (while_attached, after_drop);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .expect("enter the node namespace");
    assert_eq!(
        while_attached,
        (
            vec!["from_container".to_owned()],
            vec!["to_container".to_owned()]
        )
    );
    assert_eq!(after_drop, (vec![], vec![]), "no program stays attached");

    // With the programs gone the pod still talks: a detached datapath must not black-hole.
    pod.exec(&["ping", "-c", "2", "-W", "2", &wired.host_ip])
        .expect("ping after detaching");
}
