//! Offline validation of Weft objects against the generated CRD schemas, as the API server
//! (with `kubectl`'s default strict field validation) would judge them: the OpenAPI structure
//! (types, enums, patterns, ranges, required fields), unknown fields, and the CEL rules in
//! `x-kubernetes-validations`. Users run it as `weftctl validate` in CI before they apply.

use std::collections::BTreeMap;
use std::fmt;

use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::LocationSegment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{compile_schema, CompiledSchema, RootContext, Validator as CelValidator};
use serde_json::Value;

/// One problem with one field, phrased like the API server's field errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as `spec.ingress[0].toPorts[0].ports[0].endPort`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// What became of one object.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid(Vec<FieldError>),
    /// Not a kind this validator has a schema for (e.g. a Pod next to a policy).
    NotAWeftKind {
        api_version: String,
        kind: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("CRD {crd} has no openAPIV3Schema for version {version}")]
    MissingSchema { crd: String, version: String },
    #[error("CRD {crd} version {version} has a schema that is not valid JSON Schema: {message}")]
    BadSchema {
        crd: String,
        version: String,
        message: String,
    },
    #[error("CRD {crd} has a CEL rule that does not compile: {message}")]
    BadCelRule { crd: String, message: String },
}

struct KindSchema {
    schema: Value,
    structure: jsonschema::Validator,
    rules: CompiledSchema,
    root: RootContext,
}

/// Validates objects of the kinds whose CRDs it was built from.
pub struct ObjectValidator {
    kinds: BTreeMap<(String, String), KindSchema>,
    cel: CelValidator,
}

impl ObjectValidator {
    /// A validator for every Weft kind.
    pub fn for_weft_crds() -> Result<Self, SchemaError> {
        Self::from_crds(&crate::manifests::all())
    }

    pub fn from_crds(crds: &[CustomResourceDefinition]) -> Result<Self, SchemaError> {
        let mut kinds = BTreeMap::new();
        for crd in crds {
            let crd_name = crd.metadata.name.clone().unwrap_or_default();
            for version in &crd.spec.versions {
                let missing = || SchemaError::MissingSchema {
                    crd: crd_name.clone(),
                    version: version.name.clone(),
                };
                let schema = version
                    .schema
                    .as_ref()
                    .and_then(|validation| validation.open_api_v3_schema.as_ref())
                    .ok_or_else(missing)?;
                let schema =
                    serde_json::to_value(schema).map_err(|error| SchemaError::BadSchema {
                        crd: crd_name.clone(),
                        version: version.name.clone(),
                        message: error.to_string(),
                    })?;
                // OpenAPI v3.0 schema objects follow JSON Schema draft 4 (boolean
                // exclusiveMinimum, no `const`); the x-kubernetes-* keywords are ignored.
                // Patterns use the `regex` engine: RE2 semantics, as the API server's Go.
                let structure = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft4)
                    .with_pattern_options(jsonschema::PatternOptions::regex())
                    .should_validate_formats(false)
                    .build(&nullable_as_type_union(schema.clone()))
                    .map_err(|error| SchemaError::BadSchema {
                        crd: crd_name.clone(),
                        version: version.name.clone(),
                        message: error.to_string(),
                    })?;
                let rules = compile_schema(&schema);
                if let Some(error) = rules.compilation_errors().first() {
                    return Err(SchemaError::BadCelRule {
                        crd: crd_name,
                        message: error.to_string(),
                    });
                }
                let api_version = format!("{}/{}", crd.spec.group, version.name);
                let root = RootContext {
                    api_version: api_version.clone(),
                    api_group: crd.spec.group.clone(),
                    kind: crd.spec.names.kind.clone(),
                };
                kinds.insert(
                    (api_version, crd.spec.names.kind.clone()),
                    KindSchema {
                        schema,
                        structure,
                        rules,
                        root,
                    },
                );
            }
        }
        Ok(Self {
            kinds,
            cel: CelValidator::new(),
        })
    }

    /// Judges one object, given as JSON (YAML parsed into `serde_json::Value`).
    pub fn validate(&self, object: &Value) -> Verdict {
        let text = |key: &str| {
            object
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let Some(schema) = self.kinds.get(&(api_version.clone(), kind.clone())) else {
            return Verdict::NotAWeftKind { api_version, kind };
        };

        let mut errors: Vec<FieldError> = schema
            .structure
            .iter_errors(object)
            .map(|error| {
                let mut field = field_path(error.instance_path().segments());
                let message = match error.kind() {
                    ValidationErrorKind::Required { property } => {
                        let property = property.as_str().unwrap_or_default();
                        if !field.is_empty() {
                            field.push('.');
                        }
                        field.push_str(property);
                        "Required value".to_owned()
                    }
                    _ => format!("Invalid value: {error}"),
                };
                FieldError { field, message }
            })
            .collect();
        unknown_fields(&schema.schema, object, String::new(), &mut errors);
        metadata_name(object, &mut errors);

        // The API server only runs CEL on objects that passed the structural checks.
        if errors.is_empty() {
            if let Err(failures) = self.cel.validate_compiled_with_context(
                &schema.rules,
                object,
                None,
                Some(&schema.root),
            ) {
                errors.extend(failures.into_vec().into_iter().map(|failure| FieldError {
                    field: failure.field_path.clone(),
                    message: format!("Invalid value: {}", failure.message),
                }));
            }
        }

        if errors.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Invalid(errors)
        }
    }
}

/// OpenAPI's `nullable: true` as draft 4 says it: `null` added to the allowed types.
fn nullable_as_type_union(mut schema: Value) -> Value {
    fn walk(node: &mut Value) {
        match node {
            Value::Object(map) => {
                if map.get("nullable") == Some(&Value::Bool(true)) {
                    if let Some(Value::String(ty)) = map.get("type").cloned() {
                        map.insert("type".into(), serde_json::json!([ty, "null"]));
                    }
                }
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut schema);
    schema
}

/// `spec.ingress[0].toPorts` from the segments of `/spec/ingress/0/toPorts`.
fn field_path<'a>(segments: impl Iterator<Item = LocationSegment<'a>>) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            LocationSegment::Index(index) => path.push_str(&format!("[{index}]")),
            LocationSegment::Property(name) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&name);
            }
        }
    }
    path
}

/// Fields the API server accepts at the root of every object.
const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

/// Fields the schema does not declare, and duplicates in `x-kubernetes-list-type: set` lists;
/// the structural checks JSON Schema draft 4 cannot express. The API server prunes them silently unless the client
/// asks for strict field validation, which `kubectl` does by default; a typo such as
/// `fromEndpoint` must not turn into a policy that silently allows nothing.
fn unknown_fields(schema: &Value, value: &Value, path: String, errors: &mut Vec<FieldError>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(fields) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (name, child) in fields {
                // Every object has these; CRD schemas need not (and kube's do not) list them.
                if path.is_empty() && ROOT_FIELDS.contains(&name.as_str()) {
                    continue;
                }
                let child_path = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                if let Some(child_schema) = properties.and_then(|properties| properties.get(name)) {
                    unknown_fields(child_schema, child, child_path, errors);
                } else if let Some(child_schema) = additional.filter(|a| a.is_object()) {
                    unknown_fields(child_schema, child, child_path, errors);
                } else if properties.is_some() && additional.is_none() {
                    errors.push(FieldError {
                        field: child_path,
                        message: "Unknown field (the API server would drop it; check the spelling)"
                            .to_owned(),
                    });
                }
            }
        }
        Value::Array(items) => {
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (index, item) in items.iter().enumerate() {
                    if items[..index].contains(item) {
                        errors.push(FieldError {
                            field: format!("{path}[{index}]"),
                            message: format!("Duplicate value: {item}"),
                        });
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    unknown_fields(item_schema, item, format!("{path}[{index}]"), errors);
                }
            }
        }
        _ => {}
    }
}

/// `metadata.name` as the API server requires for custom resources: present, and a DNS
/// subdomain (lowercase alphanumerics, '-' and '.', at most 253 characters).
fn metadata_name(object: &Value, errors: &mut Vec<FieldError>) {
    let metadata = object.get("metadata");
    let name = metadata.and_then(|metadata| metadata.get("name"));
    let generate_name = metadata.and_then(|metadata| metadata.get("generateName"));
    let problem = match (name.and_then(Value::as_str), generate_name) {
        (None, Some(_)) => None,
        (None, None) => Some("Required value: name or generateName is required".to_owned()),
        (Some(name), _) if !is_dns_subdomain(name) => Some(format!(
            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric \
             character (at most 253 characters)"
        )),
        (Some(_), _) => None,
    };
    if let Some(message) = problem {
        errors.push(FieldError {
            field: "metadata.name".to_owned(),
            message,
        });
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|&b| alphanumeric(b) || b == b'-')
                && bytes.first().copied().is_some_and(alphanumeric)
                && bytes.last().copied().is_some_and(alphanumeric)
        })
}

/// Parses a YAML stream (one or more `---`-separated documents) into JSON values, skipping
/// empty documents.
pub fn parse_documents(yaml: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(yaml)?;
    Ok(documents.into_iter().filter(|doc| !doc.is_null()).collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn errors(object: Value) -> Vec<String> {
        let validator = ObjectValidator::for_weft_crds().expect("schemas compile");
        match validator.validate(&object) {
            Verdict::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn global_service(name: &str, failover: Value) -> Value {
        json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": "GlobalService",
            "metadata": {"name": name, "namespace": "inference"},
            "spec": {"serviceName": "llama", "failover": failover},
        })
    }

    #[test]
    fn duplicates_in_a_set_list_are_rejected() {
        let found = errors(global_service(
            "llama",
            json!(["gpu-east", "gpu-west", "gpu-east"]),
        ));
        assert_eq!(
            found,
            vec![r#"spec.failover[2]: Duplicate value: "gpu-east""#]
        );
    }

    #[test]
    fn object_names_must_be_dns_subdomains() {
        let found = errors(global_service("Llama_70b", json!([])));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("metadata.name: Invalid value"),
            "{found:?}"
        );
        assert!(matches!(
            ObjectValidator::for_weft_crds()
                .expect("schemas")
                .validate(&global_service("llama-70b.v2", json!([]))),
            Verdict::Valid
        ));
    }

    #[test]
    fn transition_rules_apply_to_updates_only() {
        // The identity's immutability rule uses oldSelf: a create must not trip it.
        let identity = json!({
            "apiVersion": "weft.io/v1alpha1",
            "kind": "WeftIdentity",
            "metadata": {"name": "65792"},
            "spec": {"id": 65792, "securityLabels": {"k8s:app": "trainer"}},
        });
        let validator = ObjectValidator::for_weft_crds().expect("schemas compile");
        assert_eq!(validator.validate(&identity), Verdict::Valid);
    }

    #[test]
    fn kinds_without_a_schema_are_reported_not_judged() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
        let validator = ObjectValidator::for_weft_crds().expect("schemas compile");
        assert_eq!(
            validator.validate(&pod),
            Verdict::NotAWeftKind {
                api_version: "v1".into(),
                kind: "Pod".into()
            }
        );
    }
}
