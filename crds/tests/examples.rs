//! `docs/examples/valid` holds objects of every kind that the API server would accept;
//! `docs/examples/invalid` holds mistakes it would reject, each naming the field the error must
//! name on its first line (`# expect-error: spec.…`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use weft_crds::validate::{parse_documents, ObjectValidator, Verdict};

fn examples(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

fn documents(path: &Path) -> (String, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).expect("read example");
    let documents = parse_documents(&text)
        .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()));
    (text, documents)
}

#[test]
fn valid_examples_pass_and_cover_every_kind() {
    let validator = ObjectValidator::for_weft_crds().expect("schemas compile");
    let mut kinds = BTreeSet::new();
    for path in examples("valid") {
        let (_, documents) = documents(&path);
        for document in documents {
            let verdict = validator.validate(&document);
            assert_eq!(verdict, Verdict::Valid, "{}", path.display());
            kinds.insert(document["kind"].as_str().unwrap_or_default().to_owned());
        }
    }
    let expected: BTreeSet<String> = weft_crds::manifests::all()
        .iter()
        .map(|crd| crd.spec.names.kind.clone())
        .collect();
    assert_eq!(kinds, expected, "every kind needs a valid example");
}

#[test]
fn invalid_examples_are_rejected_naming_the_field() {
    let validator = ObjectValidator::for_weft_crds().expect("schemas compile");
    for path in examples("invalid") {
        let (text, documents) = documents(&path);
        let expected_field = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect-error:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{} has no `# expect-error:` line", path.display()));
        assert_eq!(
            documents.len(),
            1,
            "{}: one object per invalid example",
            path.display()
        );
        match validator.validate(&documents[0]) {
            Verdict::Invalid(errors) => assert!(
                errors
                    .iter()
                    .any(|error| error.to_string().starts_with(&format!("{expected_field}:"))),
                "{}: expected an error on {expected_field}, got {errors:?}",
                path.display()
            ),
            other => panic!("{} was not rejected: {other:?}", path.display()),
        }
    }
}
