//! `policy status`: every policy, valid or not (and why), and how many endpoints it selects —
//! from an [`Inventory`], the same table for every source.

use std::fmt::Write as _;
use std::process::ExitCode;

use super::inventory::{Inventory, PolicyEntry};

/// One line of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRow {
    pub cluster: String,
    pub kind: String,
    pub name: String,
    /// `True`, `False` or `Unknown`.
    pub valid: String,
    /// The `Ready` condition's status, `-` without one.
    pub ready: String,
    /// Endpoints the policy selects; `None` when invalid or unknown.
    pub selected: Option<i64>,
    /// Why it is not valid (or not ready): `Reason: field: message`.
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    pub rows: Vec<StatusRow>,
    /// Show the `READY` column: the source has an operator writing conditions (a cluster).
    pub show_ready: bool,
    /// Nodes whose enforcement is not what the policies say (a map is full, the policies do
    /// not compile), as their agents report it.
    pub node_problems: Vec<NodeProblem>,
}

/// A node's agent reporting that its policy in force is not the policies as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeProblem {
    pub cluster: String,
    pub node: String,
    pub problem: String,
}

/// The status of every policy of `inventory`. A policy's own status (written by the operator)
/// is preferred; without one — in a sandbox, for Kubernetes `NetworkPolicy`, before the
/// operator reconciled it — validity is this build's own check and the selected endpoints are
/// counted from the inventory's pods.
pub fn status(inventory: &Inventory, show_ready: bool) -> StatusReport {
    let rows = inventory
        .policies
        .iter()
        .map(|policy| row(inventory, policy))
        .collect();
    StatusReport {
        rows,
        show_ready,
        node_problems: Vec::new(),
    }
}

fn row(inventory: &Inventory, policy: &PolicyEntry) -> StatusRow {
    let reported = policy.reported.as_ref();
    let (valid, invalid_reason) = match (reported.and_then(|r| r.valid.as_ref()), &policy.outcome) {
        (Some(condition), _) => (
            condition.status.clone(),
            (condition.status != "True")
                .then(|| format!("{}: {}", condition.reason, condition.message)),
        ),
        (None, Ok(_)) => ("True".to_owned(), None),
        (None, Err(error)) => (
            "False".to_owned(),
            Some(format!("{}: {error}", error.reason.as_condition_reason())),
        ),
    };
    let ready = reported.and_then(|r| r.ready.as_ref());
    let selected = if valid == "True" {
        reported
            .and_then(|r| r.selected_endpoints)
            .or_else(|| selected_here(inventory, policy))
    } else {
        None
    };
    let not_ready = ready
        .filter(|condition| condition.status != "True")
        .map(|condition| format!("{}: {}", condition.reason, condition.message));
    StatusRow {
        cluster: policy.cluster.clone(),
        kind: policy.kind.clone(),
        name: policy.name.clone(),
        valid,
        ready: ready.map_or_else(|| "-".to_owned(), |c| c.status.clone()),
        selected,
        reason: invalid_reason
            .or(not_ready)
            .or_else(|| partly_enforced(policy)),
    }
}

/// What of a valid policy is not enforced (an SCTP port: Weft does not carry SCTP), though
/// the rest is, its isolation first: `PartlyEnforced: field: reason; …`.
fn partly_enforced(policy: &PolicyEntry) -> Option<String> {
    let model = policy.outcome.as_ref().ok()?;
    (!model.unenforced.is_empty())
        .then(|| format!("PartlyEnforced: {}", model.unenforced.join("; ")))
}

/// The endpoints of the policy's cluster it selects, counted from the inventory.
fn selected_here(inventory: &Inventory, policy: &PolicyEntry) -> Option<i64> {
    let model = policy.outcome.as_ref().ok()?;
    let count = inventory
        .pods
        .iter()
        .filter(|pod| pod.cluster == policy.cluster && !pod.host_network)
        .filter(|pod| model.subject.matches(&pod.security_labels))
        .count();
    i64::try_from(count).ok()
}

impl StatusReport {
    /// Whether a policy is invalid: `policy status` then fails, like `weftctl validate`, so it
    /// serves as a CI gate.
    pub fn any_invalid(&self) -> bool {
        self.rows.iter().any(|row| row.valid == "False")
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.any_invalid() || !self.node_problems.is_empty() {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }

    /// The table, with the rows of `cluster` only if one is named.
    pub fn render(&self, cluster: Option<&str>) -> String {
        let mut out = String::new();
        let ready = |value: &str| {
            if self.show_ready {
                format!("{value:<6} ")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "{:<10} {:<30} {:<34} {:<6} {}{:<9} REASON",
            "CLUSTER",
            "KIND",
            "NAME",
            "VALID",
            ready("READY"),
            "SELECTED"
        );
        for row in self
            .rows
            .iter()
            .filter(|row| cluster.is_none_or(|c| c == row.cluster))
        {
            let selected = row
                .selected
                .map_or_else(|| "-".to_owned(), |n| n.to_string());
            let _ = writeln!(
                out,
                "{:<10} {:<30} {:<34} {:<6} {}{:<9} {}",
                row.cluster,
                row.kind,
                row.name,
                row.valid,
                ready(&row.ready),
                selected,
                row.reason.as_deref().unwrap_or("-")
            );
        }
        for problem in self
            .node_problems
            .iter()
            .filter(|problem| cluster.is_none_or(|c| c == problem.cluster))
        {
            let _ = writeln!(
                out,
                "node {}/{} does not enforce the policies as written: {}",
                problem.cluster, problem.node, problem.problem
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network_policy(name: &str, ports: &str) -> PolicyEntry {
        let object = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"ports": serde_json::from_str::<serde_json::Value>(ports).expect("ports")}],
                "policyTypes": ["Ingress"],
            },
        });
        PolicyEntry::check("c1", &object).expect("a policy kind")
    }

    #[test]
    fn a_policy_with_an_sctp_port_is_valid_and_says_what_is_not_enforced() {
        let inventory = Inventory {
            policies: vec![
                network_policy("sctp", r#"[{"port": 80, "protocol": "SCTP"}]"#),
                network_policy("tcp", r#"[{"port": 80, "protocol": "TCP"}]"#),
            ],
            ..Inventory::default()
        };
        let report = status(&inventory, false);
        let sctp = &report.rows[0];
        assert_eq!(sctp.valid, "True");
        let reason = sctp.reason.as_deref().expect("a reason");
        assert!(
            reason.starts_with("PartlyEnforced: spec.ingress[0].ports[0].protocol: SCTP"),
            "{reason}"
        );
        assert_eq!(report.rows[1].reason, None);
        assert!(
            !report.any_invalid(),
            "the policy is enforced, isolation included"
        );
        assert!(report.render(None).contains("PartlyEnforced"));
    }
}
