//! Pods get security identities from their labels (the sandbox allocates them, as the operator
//! will in a cluster), and each node's datapath carries them in its endpoint map.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::sandbox::{flow_ends, http_get, observe, TestSandbox};

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ml\n  labels: {{app: {app}, pod-template-hash: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n---\n"
    )
}

/// IP → identity in a node's pinned endpoint map (`struct endpoint_info`: ifindex, identity…).
fn datapath_identities(bpffs: &std::path::Path) -> BTreeMap<String, u32> {
    pinned_map_entries(&bpffs.join("weft/endpoints"))
        .into_iter()
        .filter_map(|(key, value)| {
            let ip = format!(
                "{}.{}.{}.{}",
                key.first()?,
                key.get(1)?,
                key.get(2)?,
                key.get(3)?
            );
            let identity = u32::from_le_bytes(value.get(4..8)?.try_into().ok()?);
            Some((ip, identity))
        })
        .collect()
}

#[test]
fn identities_follow_labels_and_reach_the_datapath() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 3, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml]}\n",
        &[(
            "pods.yaml",
            &[
                pod("trainer-a", "trainer", "n1"),
                pod("trainer-b", "trainer", "n2"),
                pod("model", "model", "n1"),
            ]
            .concat(),
        )],
    );
    let (a, b, model) = (
        sandbox.pod("trainer-a").clone(),
        sandbox.pod("trainer-b").clone(),
        sandbox.pod("model").clone(),
    );
    assert_eq!(
        a.identity, b.identity,
        "same labels (pod-template-hash ignored), same identity"
    );
    assert_ne!(a.identity, model.identity);
    for identity in [a.identity, model.identity] {
        assert_eq!(
            identity >> 16,
            3,
            "the cluster ID is in the high bits: {identity}"
        );
        assert!(
            identity & 0xffff >= 256,
            "not a reserved number: {identity}"
        );
    }

    // Each node's agent applies the identities of its endpoints to its datapath.
    let expected_n1 = BTreeMap::from([
        (a.ip.to_string(), a.identity),
        (model.ip.to_string(), model.identity),
    ]);
    let n1_bpffs = sandbox.sandbox.bpffs.join("c1-n1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = datapath_identities(&n1_bpffs);
    while seen != expected_n1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = datapath_identities(&n1_bpffs);
    }
    assert_eq!(seen, expected_n1, "node n1's endpoint map");

    // Flows name the identities.
    http_get(&a.netns, b.ip, 8080).expect("trainer-a -> trainer-b");
    let flows = observe(&sandbox, &["--pod", "ml/trainer-b", "--protocol", "TCP"]);
    let delivered = flows
        .iter()
        .find(|flow| flow_ends(flow).2 == "TO_ENDPOINT")
        .expect("a delivered flow");
    assert_eq!(delivered["flow"]["source"]["identity"], a.identity);
    assert_eq!(delivered["flow"]["destination"]["identity"], b.identity);
}
