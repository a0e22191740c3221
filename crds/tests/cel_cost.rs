//! The CRDs that `helm install` applies are judged as kube-apiserver judges them on create: every
//! CEL rule's estimated cost times the number of times it can run in one object must stay within
//! `StaticEstimatedCostLimit`, and their sum within `StaticEstimatedCRDCostLimit`. A CRD over
//! either is refused by the server, whatever offline validation says.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use weft_crds::cel_cost::{self, PER_CRD_LIMIT, PER_RULE_LIMIT};
use weft_crds::manifests;

fn chart_crds() -> Vec<(PathBuf, CustomResourceDefinition)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read CRD");
            let crd = serde_saphyr::from_str(&text)
                .unwrap_or_else(|error| panic!("{} is not a CRD: {error}", path.display()));
            (path, crd)
        })
        .collect()
}

fn assert_within_budget(what: &str, crd: &CustomResourceDefinition) -> u64 {
    let costs = cel_cost::estimate(crd)
        .unwrap_or_else(|error| panic!("{what}: cannot estimate its CEL rules: {error}"));
    let violations: Vec<String> = costs.iter().flat_map(|cost| cost.violations()).collect();
    assert!(
        violations.is_empty(),
        "{what} would be refused by the API server:\n{}\n\n{}",
        violations.join("\n"),
        cel_cost::report(&costs)
    );
    costs.iter().map(|cost| cost.total).max().unwrap_or(0)
}

#[test]
fn every_crd_the_chart_installs_is_within_the_api_servers_cel_budget() {
    let crds = chart_crds();
    assert_eq!(
        crds.len(),
        manifests::all().len(),
        "the chart ships every CRD"
    );
    for (path, crd) in &crds {
        assert_within_budget(&path.display().to_string(), crd);
    }
}

/// Room is left for the rules still to come (L7 and FQDN fields, more kinds): the policy CRDs,
/// the only ones with per-item rules under nested lists, use under half of each budget.
#[test]
fn the_policy_crds_leave_room_in_both_budgets() {
    for crd in manifests::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let total = assert_within_budget(&name, &crd);
        assert!(
            total <= PER_CRD_LIMIT / 2,
            "{name}: CEL cost total {total} uses more than half of {PER_CRD_LIMIT}"
        );
        for schema in cel_cost::estimate(&crd).expect("estimated above") {
            for rule in &schema.rules {
                assert!(
                    rule.total <= PER_RULE_LIMIT / 2,
                    "{}: {} costs {} (more than half of {PER_RULE_LIMIT})",
                    rule.path,
                    rule.rule,
                    rule.total
                );
            }
        }
    }
}

/// The check itself: the policy CRD as a v1.32 API server refused it (4.2x, 4.4x, 1.9x and
/// 2.6x over the per-rule budget) is refused here too.
#[test]
fn the_crd_a_real_api_server_refused_is_refused() {
    let refused: CustomResourceDefinition =
        serde_saphyr::from_str(include_str!("fixtures/weftnetworkpolicies-refused.yaml"))
            .expect("fixture parses");
    let violations: Vec<String> = cel_cost::estimate(&refused)
        .expect("estimate")
        .iter()
        .flat_map(|cost| cost.violations())
        .collect();
    let expected = "spec.validation.openAPIV3Schema.properties[spec].properties[egress].items.properties[toEndpoints].items.properties[matchExpressions].items.x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of 4.2x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)";
    assert!(
        violations.iter().any(|violation| violation == expected),
        "{violations:#?}"
    );
}
