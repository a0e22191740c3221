//! The committed CRD manifests (and the chart's copy) are exactly what the Rust types generate:
//! edit the types, then run `make crds`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weft_crds::manifests;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds sits in the repository")
        .to_owned()
}

fn yaml_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .map(|path| {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).expect("read manifest");
            (name, text)
        })
        .collect()
}

fn generated() -> BTreeMap<String, String> {
    manifests::all()
        .iter()
        .map(|crd| {
            (
                manifests::file_name(crd),
                manifests::render(crd).expect("render"),
            )
        })
        .collect()
}

#[test]
fn committed_manifests_match_the_types() {
    let committed = yaml_files(&repo().join("crds/manifests"));
    let generated = generated();
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "crds/manifests has other files than the types generate; run `make crds`"
    );
    for (name, text) in &generated {
        assert!(
            committed.get(name) == Some(text),
            "crds/manifests/{name} is stale; run `make crds`"
        );
    }
}

#[test]
fn chart_crds_equal_the_manifests() {
    assert_eq!(
        yaml_files(&repo().join("charts/weft/crds")),
        generated(),
        "charts/weft/crds differs from the generated CRDs; run `make crds`"
    );
}

#[test]
fn every_kind_is_in_group_weft_io_with_status_short_name_and_category() {
    let crds = manifests::all();
    assert_eq!(crds.len(), 7);
    for crd in &crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        assert_eq!(crd.spec.group, "weft.io", "{name}");
        assert_eq!(crd.spec.versions.len(), 1, "{name}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1", "{name}");
        assert!(version.served && version.storage, "{name}");
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|sub| sub.status.is_some()),
            "{name} has no status subresource"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|columns| columns.len() >= 2),
            "{name} has too few printer columns"
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["weft".to_owned()][..]),
            "{name}"
        );
        assert_eq!(
            crd.spec.names.short_names.as_ref().map(Vec::len),
            Some(1),
            "{name}"
        );
    }
}
