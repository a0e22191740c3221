//! The agent's control plane does work in proportion to the change: one pod that comes or goes
//! costs each agent the map entries that pod is, and nothing else is written again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use weft_e2e::bpffs::pinned_map_entries;
use weft_e2e::sandbox::{http_get_path, until, TestSandbox};
use weft_sandbox::Sandbox;

fn pod(name: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: echo, containerPort: 9000}}\n---\n"
    )
}

/// Policies that give every pod entries: ingress to `web` from `client` on the named port,
/// and egress from `client` to `web`.
const POLICIES: &str = "apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: web-ingress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: echo, protocol: TCP}]}]
---
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
---
";

/// `weft_agent_map_updates_total` and `weft_agent_map_deletes_total` of a node's agent, by
/// (kind, map).
fn map_writes(sandbox: &TestSandbox, node: &str) -> BTreeMap<(String, String), f64> {
    let netns = sandbox.node_netns("c1", node);
    let metrics = http_get_path(&netns, "127.0.0.1", 9962, "/metrics").unwrap_or_default();
    metrics
        .lines()
        .filter_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            let (kind, rest) = metric.split_once("{map=\"")?;
            let kind = kind
                .strip_prefix("weft_agent_map_")?
                .strip_suffix("_total")?;
            if kind != "updates" && kind != "deletes" {
                return None;
            }
            let map = rest.strip_suffix("\"}")?;
            Some((
                (kind.to_owned(), map.to_owned()),
                value.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// What changed between two readings of [`map_writes`] (zeros left out).
fn delta(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, change)| *change != 0.0)
        .collect()
}

fn key(kind: &str, map: &str) -> (String, String) {
    (kind.to_owned(), map.to_owned())
}

/// The entries of `n1`'s maps that hold a pod's wiring and policy.
fn local_maps(sandbox: &TestSandbox) -> BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>> {
    [
        "endpoints",
        "ipcache",
        "endpoint_policies",
        "policy_entries",
    ]
    .into_iter()
    .map(|map| {
        let pin = sandbox.sandbox.bpffs.join("c1-n1/weft").join(map);
        (map, pinned_map_entries(&pin).into_iter().collect())
    })
    .collect()
}

fn write(dir: &Path, name: &str, yaml: &str) -> std::path::PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, yaml).expect("write manifest");
    file
}

#[test]
fn one_pod_added_and_deleted_costs_each_node_only_its_own_entries() {
    let pods: String = (0..6)
        .map(|index| {
            let node = if index % 2 == 0 { "n1" } else { "n2" };
            let app = if index < 3 { "web" } else { "client" };
            pod(&format!("p{index}"), node, app)
        })
        .collect();
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml, policies.yaml]}\n",
        &[("pods.yaml", &pods), ("policies.yaml", POLICIES)],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Same labels as running pods: the identity exists, so its peer sets are in place.
    let new_pod = write(dir.path(), "new.yaml", &pod("extra", "n1", "web"));

    // The agents settle (every pass after the first finds nothing to write).
    let settled = |node: &str| {
        let mut last = map_writes(&sandbox, node);
        until(
            &format!("{node}'s agent writes nothing while nothing changes"),
            Duration::from_secs(20),
            || {
                std::thread::sleep(Duration::from_secs(2));
                let now = map_writes(&sandbox, node);
                let changed = delta(&last, &now);
                last = now;
                match changed.is_empty() {
                    true => Ok(()),
                    false => Err(format!("still writing {changed:?}")),
                }
            },
        );
        last
    };
    let before_local = settled("n1");
    let before_remote = settled("n2");
    let maps_before = local_maps(&sandbox);

    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &new_pod)
        .expect("add a pod");
    until(
        "the remote node learns the new pod's address",
        Duration::from_secs(20),
        || {
            let changed = delta(&before_remote, &map_writes(&sandbox, "n2"));
            match changed.contains_key(&key("updates", "ipcache")) {
                true => Ok(()),
                false => Err(format!("{changed:?}")),
            }
        },
    );
    assert_eq!(
        delta(&before_remote, &settled("n2")),
        [(key("updates", "ipcache"), 1.0)].into_iter().collect(),
        "the remote node writes the new pod's ipcache entry and nothing else"
    );
    let added_local = delta(&before_local, &settled("n1"));
    let maps_added = local_maps(&sandbox);
    // Each map gained the new pod's entries (its endpoint, address, policy state and port
    // entries), each written once, and no other entry was written again.
    for (map, before) in &maps_before {
        let after = &maps_added[map];
        let new_keys = after
            .keys()
            .filter(|key| !before.contains_key(*key))
            .count();
        assert!(new_keys > 0, "{map} has the new pod's entries");
        assert_eq!(
            added_local.get(&key("updates", map)).copied(),
            Some(new_keys as f64),
            "{map}: the pod's node writes the pod's own {new_keys} entries, each once, and nothing else ({added_local:?})"
        );
        for (entry, value) in before {
            assert_eq!(after.get(entry), Some(value), "{map}: other entries stay");
        }
    }
    assert!(
        added_local
            .keys()
            .all(|(_, map)| maps_before.contains_key(map.as_str())),
        "no other map is written: {added_local:?}"
    );

    let before_local = settled("n1");
    let before_remote = settled("n2");
    let maps_after = local_maps(&sandbox);
    Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .delete(None, &new_pod)
        .expect("delete the pod");
    until(
        "the remote node forgets the pod",
        Duration::from_secs(20),
        || {
            let changed = delta(&before_remote, &map_writes(&sandbox, "n2"));
            match changed.contains_key(&key("deletes", "ipcache")) {
                true => Ok(()),
                false => Err(format!("{changed:?}")),
            }
        },
    );
    assert_eq!(
        delta(&before_remote, &settled("n2")),
        [(key("deletes", "ipcache"), 1.0)].into_iter().collect(),
        "the remote node removes the pod's ipcache entry and nothing else"
    );
    let deleted_local = delta(&before_local, &settled("n1"));
    let maps_deleted = local_maps(&sandbox);
    for (map, before) in &maps_after {
        let after = &maps_deleted[map];
        let gone = before
            .keys()
            .filter(|key| !after.contains_key(*key))
            .count();
        assert_eq!(
            deleted_local.get(&key("deletes", map)).copied(),
            Some(gone as f64),
            "{map}: the pod's {gone} entries go, each once ({deleted_local:?})"
        );
        assert_eq!(after, &maps_before[map], "{map}: as before the pod came");
    }
    assert!(
        deleted_local.keys().all(|(kind, _)| kind == "deletes"),
        "deleting a pod rewrites nothing on its node: {deleted_local:?}"
    );
}

/// The ipcache key of `ip`/32 as the map holds it: prefix length, then the address in network
/// byte order.
fn ipcache_key(ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut key = 32u32.to_ne_bytes().to_vec();
    key.extend(ip.octets());
    key
}

#[test]
fn an_entry_changed_behind_the_agents_back_is_found_counted_and_written_again() {
    let pods = [pod("local", "n1", "web"), pod("remote", "n2", "client")].concat();
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml], agentArgs: [--drift-check-interval, 1s]}\n",
        &[("pods.yaml", &pods)],
    );
    let remote = sandbox.pod("remote").clone();
    let pin = sandbox.sandbox.bpffs.join("c1-n1/weft/ipcache");
    let key = ipcache_key(remote.ip);
    let entry = || {
        pinned_map_entries(&pin)
            .into_iter()
            .find(|(found, _)| *found == key)
            .map(|(_, value)| value)
    };
    let written = {
        let mut written = None;
        until(
            "n1 has the remote pod's entry",
            Duration::from_secs(20),
            || {
                written = entry();
                written
                    .as_ref()
                    .map(drop)
                    .ok_or_else(|| "none yet".to_owned())
            },
        );
        written.expect("entry")
    };
    let drift = || {
        weft_e2e::sandbox::agent_metric(
            &sandbox,
            "c1",
            "n1",
            "weft_agent_map_drift_total{map=\"ipcache\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(drift(), 0.0, "nothing differs while nobody else writes");

    // Someone else rewrites the entry: identity 2 (world), no tunnel endpoint.
    let hex =
        |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("0x{b:02x}")).collect() };
    let mut value = 2u32.to_ne_bytes().to_vec();
    value.extend([0u8; 4]);
    let status = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&pin)
        .arg("key")
        .args(hex(&key))
        .arg("value")
        .args(hex(&value))
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool map update");
    assert_eq!(entry(), Some(value), "changed behind the agent's back");

    until(
        "the agent finds the entry, counts it and writes it again",
        Duration::from_secs(30),
        || match (drift(), entry()) {
            (counted, Some(now)) if counted >= 1.0 && now == written => Ok(()),
            (counted, now) => Err(format!("drift {counted}, entry {now:?}")),
        },
    );
}
