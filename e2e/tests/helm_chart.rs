//! The Helm chart renders with Helm's own engine, lints clean, and every object it renders (and
//! every CRD it ships) is a valid Kubernetes object for 1.29 and 1.34. See
//! `e2e/helm/check_chart.py` for why rendering goes through Python.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_owned()
}

/// The Python with helm-python-sdk and kubernetes-validate that `make deps` installs.
fn python() -> PathBuf {
    std::env::var_os("WEFT_TOOLS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/venv/bin/python"))
}

fn check_chart(scenarios: Value) -> Value {
    let python = python();
    let output = Command::new(&python)
        .arg(repo().join("e2e/helm/check_chart.py"))
        .arg(repo())
        .arg(scenarios.to_string())
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run {} ({error}); run `make deps`", python.display())
        });
    assert!(
        output.status.success(),
        "check_chart.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("check_chart.py prints JSON")
}

fn objects(report: &Value, scenario: &str) -> Vec<Value> {
    let rendered = &report["scenarios"][scenario];
    assert!(
        rendered.get("error").is_none(),
        "scenario {scenario} failed to render: {}",
        rendered["error"]
    );
    rendered["objects"].as_array().cloned().unwrap_or_default()
}

fn names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|object| {
            format!(
                "{}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

const KNOWN_KINDS: &[(&str, &str)] = &[
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "DaemonSet"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
];

fn assert_all_valid(objects: &[Value]) {
    for object in objects {
        let pair = (
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default(),
        );
        assert!(
            KNOWN_KINDS.contains(&pair),
            "{} renders an unexpected {pair:?}",
            object["template"]
        );
        for (version, problem) in object["invalid"].as_object().expect("per-version verdicts") {
            assert!(
                problem.is_null(),
                "{} {} is not valid for Kubernetes {version}: {problem}",
                object["kind"],
                object["name"]
            );
        }
    }
}

#[test]
fn chart_renders_valid_objects_for_supported_kubernetes_versions() {
    let report = check_chart(json!({
        "default": {},
        "without-mesh": {"clustermesh": {"enabled": false}},
        "existing-tls": {"clustermesh": {"tls": {"auto": false, "existingSecret": "mesh-tls"}}},
        "missing-tls": {"clustermesh": {"tls": {"auto": false}}},
    }));

    for (version, problems) in report["lint"].as_object().expect("lint per version") {
        assert_eq!(problems, &json!([]), "helm lint --strict for {version}");
    }

    let default = objects(&report, "default");
    assert_all_valid(&default);
    let default_names = names(&default);
    for expected in [
        "DaemonSet/weft-agent",
        "Deployment/weft-operator",
        "Deployment/weft-clustermesh-apiserver",
        "Service/weft-clustermesh-apiserver",
        "Secret/weft-clustermesh-server-tls",
        "ConfigMap/weft-cni-config",
        "ClusterRole/weft-agent",
        "ClusterRole/weft-operator",
        "Role/weft-operator",
    ] {
        assert!(
            default_names.contains(expected),
            "{expected} missing from {default_names:?}"
        );
    }

    let without_mesh = objects(&report, "without-mesh");
    assert_all_valid(&without_mesh);
    assert!(
        names(&without_mesh)
            .iter()
            .all(|name| !name.contains("clustermesh")),
        "clustermesh.enabled=false still renders mesh objects: {:?}",
        names(&without_mesh)
    );

    let existing = objects(&report, "existing-tls");
    assert_all_valid(&existing);
    assert!(
        names(&existing)
            .iter()
            .all(|name| !name.starts_with("Secret/")),
        "an existing TLS Secret must not be overwritten"
    );

    let missing = &report["scenarios"]["missing-tls"]["error"];
    assert!(
        missing.as_str().is_some_and(|error| error.contains("clustermesh.tls")),
        "auto=false without certificates must fail with a message naming clustermesh.tls: {missing}"
    );
}

#[test]
fn agent_daemonset_is_privileged_on_the_host_network_with_bpffs_and_cni_mounts() {
    let report = check_chart(json!({"default": {}}));
    let default = objects(&report, "default");
    let agent = default
        .iter()
        .find(|object| object["kind"] == "DaemonSet")
        .expect("agent DaemonSet");
    let pod = &agent["object"]["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], json!(true));
    let agent_container = &pod["containers"][0];
    assert_eq!(
        agent_container["securityContext"]["privileged"],
        json!(true)
    );
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|volume| volume["hostPath"]["path"].as_str())
        .collect();
    for path in ["/sys/fs/bpf", "/etc/cni/net.d", "/opt/cni/bin"] {
        assert!(
            host_paths.contains(path),
            "hostPath {path} missing: {host_paths:?}"
        );
    }
    let init: Vec<&str> = pod["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|container| container["name"].as_str())
        .collect();
    assert!(init.contains(&"install-cni"), "init containers: {init:?}");
}

/// The agent settings the chart exposes reach the agent as flags it parses: the defaults, and
/// values a user sets.
#[test]
fn agent_settings_become_flags_the_agent_accepts() {
    let report = check_chart(json!({
        "default": {},
        "tuned": {"agent": {"allowFromNode": false, "endpointReadyTimeout": "45s",
                  "conntrack": {"maxEntries": 131072, "closingLifetime": "5s"},
                  "nat": {"snatPortRange": "20000-29999", "maxEntries": 65536},
                  "devices": ["eth1"], "mapEntries": {"endpoints": 8192}}},
    }));
    for (scenario, expected) in [
        ("default", ["--allow-from-node=true", "20s", "10s"]),
        ("tuned", ["--allow-from-node=false", "45s", "5s"]),
    ] {
        let objects = objects(&report, scenario);
        let agent = objects
            .iter()
            .find(|object| object["kind"] == "DaemonSet")
            .expect("agent DaemonSet");
        let args: Vec<String> = agent["object"]["spec"]["template"]["spec"]["containers"][0]
            ["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|arg| arg.as_str().map(str::to_owned))
            .collect();
        for value in expected {
            assert!(
                args.iter().any(|arg| arg == value),
                "{scenario}: {value} in {args:?}"
            );
        }
        for tuned_only in [
            "--ct-max-entries",
            "--snat-port-range",
            "--nat-max-entries",
            "--device",
            "--map-entries",
        ] {
            assert_eq!(
                args.iter().any(|arg| arg == tuned_only),
                scenario == "tuned",
                "{scenario}: {tuned_only} in {args:?}"
            );
        }
        // The agent parses them: clap checks every flag and value before it acts on `--help`.
        let parsed = Command::new(weft_sandbox::default_bin_dir().join("weft-agent"))
            .args(args.iter().map(|arg| arg.replace("$(NODE_NAME)", "node-a")))
            .arg("--help")
            .output()
            .expect("run weft-agent");
        assert!(
            parsed.status.success(),
            "{scenario}: weft-agent refused the chart's flags: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
}

#[test]
fn shipped_crds_are_valid_for_supported_kubernetes_versions() {
    let report = check_chart(json!({}));
    let crds = report["crds"].as_array().expect("crds");
    assert_eq!(crds.len(), 7, "one CRD per Weft kind: {crds:?}");
    for crd in crds {
        for (version, problem) in crd["invalid"].as_object().expect("verdicts") {
            assert!(
                problem.is_null(),
                "{} for {version}: {problem}",
                crd["file"]
            );
        }
    }
}
