//! Every connection shows up in `weftctl observe`, named at both ends, at the node that sent it
//! and at the node that delivered it; and in the agents' metrics.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use weft_e2e::sandbox::{flow_ends, http_get, http_get_path, observe, run_in_pod, TestSandbox};
use weft_sandbox::default_bin_dir;

fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: dns, containerPort: 5353, protocol: UDP}}\n---\n"
    )
}

fn sandbox() -> TestSandbox {
    TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [pods.yaml]}\n",
        &[("pods.yaml", &[pod("web", "n1"), pod("api", "n2")].concat())],
    )
}

#[test]
fn a_connection_appears_at_both_nodes_named_at_both_ends() {
    let sandbox = sandbox();
    let (web, api) = (sandbox.pod("web").clone(), sandbox.pod("api").clone());
    http_get(&web.netns, api.ip, 8080).expect("web -> api");

    let flows = observe(&sandbox, &["--pod", "shop/api", "--protocol", "TCP"]);
    let syns: Vec<(String, String, String, String)> = flows
        .iter()
        .filter(|flow| flow["flow"]["l4"]["TCP"]["flags"] == serde_json::json!({"SYN": true}))
        .map(flow_ends)
        .collect();
    assert!(
        syns.contains(&(
            "web".into(),
            "api".into(),
            "FROM_ENDPOINT".into(),
            "n1".into()
        )),
        "the SYN leaving web on n1: {syns:?}"
    );
    assert!(
        syns.contains(&(
            "web".into(),
            "api".into(),
            "TO_ENDPOINT".into(),
            "n2".into()
        )),
        "the SYN delivered to api on n2: {syns:?}"
    );
    let syn = flows
        .iter()
        .find(|flow| flow_ends(flow).2 == "TO_ENDPOINT")
        .expect("a delivered flow");
    assert_eq!(syn["flow"]["verdict"], "FORWARDED");
    assert_eq!(syn["flow"]["source"]["namespace"], "shop");
    assert_eq!(syn["flow"]["IP"]["destination"], api.ip.to_string());
    assert!(syn["flow"]["destination"]["labels"]
        .as_array()
        .is_some_and(|labels| labels.contains(&Value::from("app=api"))));
}

#[test]
fn filters_narrow_what_observe_shows() {
    let sandbox = sandbox();
    let (web, api) = (sandbox.pod("web").clone(), sandbox.pod("api").clone());
    http_get(&web.netns, api.ip, 8080).expect("web -> api over TCP");
    let udp = run_in_pod(
        &web,
        "bash",
        &[
            "-c",
            &format!(
                "exec 3<>/dev/udp/{}/5353; echo x >&3; timeout 2 head -c 2 <&3",
                api.ip
            ),
        ],
    );
    assert!(udp.status.success());

    let udp_flows = observe(&sandbox, &["--protocol", "UDP"]);
    assert!(!udp_flows.is_empty(), "the UDP exchange is observed");
    assert!(udp_flows
        .iter()
        .all(|flow| flow["flow"]["l4"].get("UDP").is_some()));
    let to_port = observe(&sandbox, &["--port", "8080", "--namespace", "shop"]);
    assert!(!to_port.is_empty());
    assert!(to_port.iter().all(|flow| {
        let tcp = &flow["flow"]["l4"]["TCP"];
        tcp["destination_port"] == 8080 || tcp["source_port"] == 8080
    }));
    assert!(observe(&sandbox, &["--pod", "nobody"]).is_empty());
    assert!(
        observe(&sandbox, &["--verdict", "DROPPED"]).is_empty(),
        "nothing was dropped"
    );
}

#[test]
fn follow_streams_new_flows_and_metrics_count_them() {
    let sandbox = sandbox();
    let (web, api) = (sandbox.pod("web").clone(), sandbox.pod("api").clone());
    let mut follower = Command::new(default_bin_dir().join("weftctl"))
        .args([
            "observe",
            "--sandbox",
            &sandbox.name,
            "-o",
            "json",
            "--follow",
            "--last",
            "1",
            "--pod",
            "web",
            "--port",
            "8080",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("weftctl observe --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    http_get(&web.netns, api.ip, 8080).expect("web -> api");
    let line = received
        .recv_timeout(Duration::from_secs(5))
        .expect("a new flow arrives while following");
    let _ = follower.kill();
    let _ = follower.wait();
    let flow: Value = serde_json::from_str(&line).expect("JSON");
    let ends = (
        flow["flow"]["source"]["pod_name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        flow["flow"]["destination"]["pod_name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    assert!(
        ends == ("web".into(), "api".into()) || ends == ("api".into(), "web".into()),
        "{ends:?}"
    );

    let node = sandbox.node_netns("c1", "n1");
    let metrics = http_get_path(&node, "127.0.0.1", 9962, "/metrics").expect("the agent's metrics");
    let counted: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with(
                "weft_agent_flows_processed_total{verdict=\"FORWARDED\",protocol=\"TCP\"",
            )
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= 2.0, "TCP flows counted on n1: {metrics}");
}
