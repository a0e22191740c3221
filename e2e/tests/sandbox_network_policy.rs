//! Kubernetes NetworkPolicy cases users rely on, on real packets: default-deny ingress, allow
//! from a namespace, allow from pods with a label, allow a port range, and egress denied to a
//! CIDR (to a host outside the cluster, on the fabric).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weft_e2e::sandbox::{echo_reachable, outside_host, TestSandbox};

/// An address on the fabric that belongs to no node and no pod: the world, to the cluster.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 255, 254);

fn pod(name: &str, namespace: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: weft/echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: alt, containerPort: 8443}}\n    - {{name: high, containerPort: 9100}}\n---\n"
    )
}

const MANIFESTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: db, labels: {tier: data}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {tier: frontend}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: batch, labels: {tier: jobs}}\n---\n";

const POLICIES: &str = "\
# Default-deny ingress for the whole db namespace...
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: db}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
# ...then the frontend namespace may reach the database on a port range.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-frontend, namespace: db}
spec:
  podSelector: {matchLabels: {app: postgres}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {tier: frontend}}}]
    ports: [{protocol: TCP, port: 8000, endPort: 8500}]
---
# ...and pods labelled app=backup in db itself, on any port.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-backup, namespace: db}
spec:
  podSelector: {matchLabels: {app: postgres}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: backup}}}]
---
# Batch jobs may go anywhere but the outside host: every pod, and every outside address
# except one (the ipBlock covers the pods too, as Kubernetes says; the namespaceSelector says it again).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-outside, namespace: batch}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {}
    - ipBlock: {cidr: 0.0.0.0/0, except: [172.30.255.254/32]}
";

fn connects(netns: &str, target: SocketAddr) -> bool {
    echo_reachable(netns, target, 3)
}

#[test]
fn network_policy_cases_users_rely_on() {
    let sandbox = TestSandbox::up(
        "- {name: c1, id: 1, podCIDR: 10.1.0.0/16, nodes: [n1, n2], manifests: [ns.yaml, pods.yaml]}\n",
        &[
            ("ns.yaml", MANIFESTS),
            (
                "pods.yaml",
                &[
                    pod("postgres", "db", "postgres", "n1"),
                    pod("backup", "db", "backup", "n2"),
                    pod("shop", "web", "shop", "n2"),
                    pod("report", "batch", "report", "n2"),
                ]
                .concat(),
            ),
        ],
    );
    let _outside = outside_host(&sandbox, &[OUTSIDE]);
    let p = |name: &str| sandbox.pod(name).clone();
    let (postgres, backup, shop, report) = (p("postgres"), p("backup"), p("shop"), p("report"));
    let at = |pod: &weft_sandbox::PodState, port: u16| SocketAddr::from((pod.ip, port));

    // Before any policy, everything is open, the outside host included.
    assert!(connects(&report.netns, at(&postgres, 9100)));
    assert!(
        connects(&report.netns, SocketAddr::from((OUTSIDE, 8080))),
        "the outside host answers"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, POLICIES).expect("write");
    weft_sandbox::Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &file)
        .expect("apply");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(&report.netns, at(&postgres, 9100)) {
        assert!(
            Instant::now() < deadline,
            "the policies never came into force"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // default-deny ingress: batch cannot reach db.
    assert!(
        !connects(&report.netns, at(&postgres, 8080)),
        "default deny"
    );
    // allow from a namespace, on a port range.
    assert!(
        connects(&shop.netns, at(&postgres, 8080)),
        "from tier=frontend, in range"
    );
    assert!(
        connects(&shop.netns, at(&postgres, 8443)),
        "from tier=frontend, in range"
    );
    assert!(
        !connects(&shop.netns, at(&postgres, 9100)),
        "from tier=frontend, outside the range"
    );
    // allow from pods with a label (same namespace), every port.
    assert!(
        connects(&backup.netns, at(&postgres, 9100)),
        "from app=backup"
    );
    // egress denied to a CIDR (the outside host), the rest of egress open.
    assert!(
        !connects(&report.netns, SocketAddr::from((OUTSIDE, 8080))),
        "egress to the excepted CIDR"
    );
    assert!(
        connects(&report.netns, at(&shop, 8080)),
        "other egress still allowed"
    );
    // Pods no policy selects stay open.
    assert!(connects(&postgres.netns, at(&report, 9100)));
}
