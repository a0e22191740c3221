//! Offline estimate of the cost the API server assigns to a CRD's CEL rules.
//!
//! When a CustomResourceDefinition is created or updated, kube-apiserver estimates the worst-case
//! cost of every `x-kubernetes-validations` rule and refuses the CRD if one rule, multiplied by
//! the number of times it can run in one object, exceeds [`PER_RULE_LIMIT`], or if the sum over
//! the whole schema exceeds [`PER_CRD_LIMIT`]. Nothing offline notices this (the rules compile and
//! evaluate fine), so [`estimate`] repeats the server's arithmetic for a test to check.
//!
//! What is reproduced, from the Kubernetes v1.32 sources (cel-go v0.22):
//!
//! * Rule cost: cel-go `checker/cost.go` (`coster`), with the Kubernetes size estimator of
//!   `apiextensions-apiserver/pkg/apiserver/schema/cel/compilation.go` (`sizeEstimator`: the size
//!   of `self.a.b` is the `MaxElements` of that field's `DeclType`), the Kubernetes library
//!   estimator `apiserver/pkg/cel/library/cost.go` (which prices none of the functions modelled
//!   here), and `cel.CostEstimatorOptions(checker.PresenceTestHasCost(false))` from
//!   `apiserver/pkg/cel/environment/base.go` (so `has(self.x)` costs only its operand, 1).
//! * Sizes: `apiserver/pkg/cel/common/schemas.go` `SchemaDeclType`: a string with `maxLength` n
//!   has 4n elements (`estimateMaxElementsFromMaxLength`), one with an `enum` the length of its
//!   longest value, an unbounded one `MaxRequestSizeBytes - 2`; lists and maps take `maxItems` /
//!   `maxProperties`, or as many minimal items as fit in the 3 MiB request
//!   (`estimateMaxArrayItemsFromMinSize`, `estimateMaxAdditionalPropertiesFromMinSize`).
//! * Cardinality: `apiextensions/validation/cel_validation.go` `CELSchemaContext`: the product of
//!   the `maxItems`/`maxProperties` of every ancestor list/map; if one is unbounded,
//!   `compilation.go` `maxCardinality(MinSerializedSize)` is used instead.
//! * Budgets and wording: `apiextensions/validation/validation.go` (`getExpressionCost`,
//!   `multiplyWithOverflowGuard`, `getCostErrorMessage`, `TotalCost.ObserveExpressionCost`).
//!
//! Rules are parsed with the `cel` crate's parser. Only the constructs listed in
//! [`CelCostError::Unsupported`]'s documentation are priced; anything else (comprehension macros
//! such as `all`/`exists`, string conversions, optional syntax, …) is an error rather than a
//! guess, so a new rule cannot be silently under-estimated.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

/// `StaticEstimatedCostLimit`: the largest estimated cost of one rule times its cardinality.
pub const PER_RULE_LIMIT: u64 = 10_000_000;
/// `StaticEstimatedCRDCostLimit`: the largest sum of all estimated rule costs of one schema.
pub const PER_CRD_LIMIT: u64 = 100_000_000;
/// `apiserver/pkg/cel/limits.go` `MaxRequestSizeBytes`: unbounded sizes are derived from it.
pub const MAX_REQUEST_SIZE_BYTES: i64 = 3 * 1024 * 1024;

// cel-go `common/cost.go`.
const SELECT_AND_IDENT_COST: u64 = 1;
const CONST_COST: u64 = 0;
const LIST_CREATE_BASE_COST: u64 = 10;
const MAP_CREATE_BASE_COST: u64 = 30;
const STRING_TRAVERSAL_COST_FACTOR: f64 = 0.1;
const REGEX_STRING_LENGTH_COST_FACTOR: f64 = 0.25;
/// Kubernetes sets `PresenceTestHasCost(false)` (environment/base.go), so `has()` adds nothing.
const K8S_PRESENCE_TEST_COST: u64 = 0;

// apiserver/pkg/cel/limits.go.
const MAX_DURATION_SIZE_JSON: i64 = 32;
const MAX_DATETIME_SIZE_JSON: i64 = 32;
const MIN_DURATION_SIZE_JSON: i64 = 3;
const JSON_DATE_SIZE: i64 = 12;
const MIN_DATETIME_SIZE_JSON: i64 = 21;
const MIN_STRING_SIZE: i64 = 2;
const MIN_BOOL_SIZE: i64 = 4;
const MIN_NUMBER_SIZE: i64 = 1;

const FIX_HINT: &str = "(try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)";

/// Why a CRD could not be estimated.
#[derive(Debug, thiserror::Error)]
pub enum CelCostError {
    /// The `cel` parser rejected the expression.
    #[error("{path}: cannot parse {expression:?}: {message}")]
    Parse {
        path: String,
        expression: String,
        message: String,
    },
    /// The expression uses something the estimator does not price. Modelled are: literals,
    /// `self`/`oldSelf`, field selection, `has()`, list and map literals, `!`, `&&`, `||`,
    /// `?:`, `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `size()`, `_[_]` on lists and maps,
    /// arithmetic (`+` also on strings, bytes and lists), `int()`/`uint()`/`double()`, and
    /// the string methods `matches`, `contains`, `startsWith`, `endsWith`.
    #[error("{path}: {expression:?} uses {construct}, which the cost estimator does not model")]
    Unsupported {
        path: String,
        expression: String,
        construct: String,
    },
    /// The schema around a rule is outside what is modelled (or invalid for the API server).
    #[error("{path}: {message}")]
    Schema { path: String, message: String },
}

/// The estimated cost of one `x-kubernetes-validations` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCost {
    /// The API server's field path, e.g.
    /// `spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule`.
    pub path: String,
    /// The rule's expression.
    pub rule: String,
    /// cel-go's estimated worst-case cost of one evaluation (`CompilationResult.MaxCost`).
    pub expression_cost: u64,
    /// Product of the `maxItems`/`maxProperties` of the enclosing lists and maps; `None` if one
    /// of them is unbounded.
    pub cardinality: Option<u64>,
    /// The factor the server multiplied by: `cardinality`, or when that is unbounded the
    /// request-size estimate `MaxRequestSizeBytes / (MinSerializedSize + 1)`.
    pub multiplier: u64,
    /// `expression_cost * multiplier` (saturating): what is compared with [`PER_RULE_LIMIT`].
    pub total: u64,
    /// Estimated cost of the entry's `messageExpression`, if any. The server adds it to the
    /// schema total without multiplying by the cardinality.
    pub message_expression_cost: Option<u64>,
}

/// The estimated cost of all rules of one OpenAPI schema of a CRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdCost {
    /// `metadata.name` of the CRD.
    pub crd: String,
    /// The versions this schema belongs to. When every version has the same schema the server
    /// validates it once, at `spec.validation.openAPIV3Schema`, and this lists all of them.
    pub versions: Vec<String>,
    /// Path of the schema in the server's messages, e.g. `spec.validation.openAPIV3Schema`.
    pub schema_path: String,
    /// Every rule, in schema order (a node's rules, then its children's).
    pub rules: Vec<RuleCost>,
    /// Saturating sum of every rule's `total` and `message_expression_cost`: what is compared
    /// with [`PER_CRD_LIMIT`].
    pub total: u64,
}

impl CrdCost {
    /// The errors the API server would report for this schema, in its wording; empty if the
    /// schema is within budget.
    ///
    /// The "contributed to …" lines name the (up to four) costliest rules of at least 1% of
    /// the limit, costliest first; the server's order among equal costs is not deterministic.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            if rule.total > PER_RULE_LIMIT {
                out.push(format!(
                    "{}: Forbidden: {}",
                    rule.path,
                    cost_error_message("estimated rule cost", rule.total, PER_RULE_LIMIT)
                ));
            }
            if let Some(cost) = rule.message_expression_cost.filter(|c| *c > PER_RULE_LIMIT) {
                out.push(format!(
                    "{}: Forbidden: {}",
                    message_expression_path(&rule.path),
                    cost_error_message("estimated messageExpression cost", cost, PER_RULE_LIMIT)
                ));
            }
        }
        if self.total > PER_CRD_LIMIT {
            let mut expensive: Vec<(u64, String)> = Vec::new();
            for rule in &self.rules {
                expensive.push((rule.total, rule.path.clone()));
                if let Some(cost) = rule.message_expression_cost {
                    expensive.push((cost, message_expression_path(&rule.path)));
                }
            }
            expensive.retain(|(cost, _)| *cost >= PER_CRD_LIMIT / 100);
            expensive.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            for (_, path) in expensive.iter().take(4) {
                out.push(format!(
                    "{path}: Forbidden: contributed to estimated rule cost total exceeding cost limit for entire OpenAPIv3 schema"
                ));
            }
            out.push(format!(
                "{}: Forbidden: {}",
                self.schema_path,
                cost_error_message(
                    "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                    self.total,
                    PER_CRD_LIMIT
                )
            ));
        }
        out
    }
}

/// Estimates every rule of every schema of `crd`, as the API server does when the CRD is
/// created. Returns one [`CrdCost`] per distinct schema: one for all versions if they share
/// their schema (the server's `spec.validation`), otherwise one per version that has a schema.
pub fn estimate(crd: &CustomResourceDefinition) -> Result<Vec<CrdCost>, CelCostError> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let versions = &crd.spec.versions;
    let Some(first) = versions.first() else {
        return Ok(Vec::new());
    };
    // apiextensions/v1/conversion.go: identical per-version schemas move to spec.validation.
    // (The server compares with apiequality.Semantic.DeepEqual, which also equates nil and
    // empty lists; `PartialEq` does not, which only matters for hand-written CRDs.)
    let identical = versions.iter().all(|v| v.schema == first.schema);
    let mut groups: Vec<(Vec<String>, String, Option<&JSONSchemaProps>)> = Vec::new();
    if identical {
        let schema = first
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        let names = versions.iter().map(|v| v.name.clone()).collect();
        groups.push((names, "spec.validation.openAPIV3Schema".into(), schema));
    } else {
        for (i, v) in versions.iter().enumerate() {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
            groups.push((vec![v.name.clone()], path, schema));
        }
    }
    let mut out = Vec::new();
    for (names, schema_path, schema) in groups {
        let Some(schema) = schema else { continue };
        let mut rules = Vec::new();
        walk(schema, &schema_path, Some(1), true, &mut rules)?;
        let total = rules.iter().fold(0u64, |acc, r| {
            acc.saturating_add(r.total)
                .saturating_add(r.message_expression_cost.unwrap_or(0))
        });
        out.push(CrdCost {
            crd: name.clone(),
            versions: names,
            schema_path,
            rules,
            total,
        });
    }
    Ok(out)
}

/// `getCostErrorMessage` (validation.go).
fn cost_error_message(cost_name: &str, cost: u64, limit: u64) -> String {
    let exceed = cost as f64 / limit as f64;
    let factor = if exceed > 100.0 {
        "more than 100x".to_string()
    } else if exceed < 1.5 {
        format!("{exceed:.6}x")
    } else {
        format!("{exceed:.1}x")
    };
    format!("{cost_name} exceeds budget by factor of {factor} {FIX_HINT}")
}

fn message_expression_path(rule_path: &str) -> String {
    let base = rule_path.strip_suffix(".rule").unwrap_or(rule_path);
    format!("{base}.messageExpression")
}

/// `multiplyWithOverflowGuard` (validation.go).
fn multiply_with_overflow_guard(base: u64, cardinality: u64) -> u64 {
    if base == 0 {
        return 0;
    }
    base.saturating_mul(cardinality)
}

/// `maxCardinality` (schema/cel/compilation.go): how often data of this minimal serialized
/// size fits in one request.
fn max_cardinality(min_size: i64) -> u64 {
    (MAX_REQUEST_SIZE_BYTES / (min_size + 1)) as u64
}

fn is_true(b: Option<bool>) -> bool {
    b == Some(true)
}

fn has_rules_below(s: &JSONSchemaProps) -> bool {
    if s.x_kubernetes_validations
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        return true;
    }
    let mut children: Vec<&JSONSchemaProps> = Vec::new();
    if let Some(p) = &s.properties {
        children.extend(p.values());
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_properties {
        children.push(a);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_items {
        children.push(a);
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(i)) => children.push(i),
        Some(JSONSchemaPropsOrArray::Schemas(v)) => children.extend(v),
        None => {}
    }
    for list in [&s.all_of, &s.any_of, &s.one_of].into_iter().flatten() {
        children.extend(list);
    }
    if let Some(n) = &s.not {
        children.push(n);
    }
    for map in [&s.definitions, &s.pattern_properties]
        .into_iter()
        .flatten()
    {
        children.extend(map.values());
    }
    children.into_iter().any(has_rules_below)
}

/// `extractMaxElements` (cel_validation.go): by how much a schema multiplies the cardinality of
/// its children; `None` is unbounded.
fn extract_max_elements(s: &JSONSchemaProps) -> Option<u64> {
    match s.type_.as_deref() {
        Some("object") if s.additional_properties.is_some() => {
            s.max_properties.map(|m| m.max(0) as u64)
        }
        Some("array") => s.max_items.map(|m| m.max(0) as u64),
        _ => Some(1),
    }
}

/// `ValidateCustomResourceDefinitionOpenAPISchema` (validation.go), the CEL part only.
fn walk(
    s: &JSONSchemaProps,
    path: &str,
    cardinality: Option<u64>,
    is_root: bool,
    out: &mut Vec<RuleCost>,
) -> Result<(), CelCostError> {
    if let Some(rules) = s
        .x_kubernetes_validations
        .as_ref()
        .filter(|r| !r.is_empty())
    {
        let declared = decl_type(s, is_root || is_true(s.x_kubernetes_embedded_resource))
            .ok_or_else(|| CelCostError::Schema {
                path: format!("{path}.x-kubernetes-validations"),
                message: "rules are declared on a schema that has no CEL type".into(),
            })?;
        let env = Env::for_schema(&declared);
        let multiplier = cardinality.unwrap_or_else(|| max_cardinality(declared.min_size));
        for (i, rule) in rules.iter().enumerate() {
            let rule_path = format!("{path}.x-kubernetes-validations[{i}].rule");
            if is_true(rule.optional_old_self) {
                return Err(CelCostError::Unsupported {
                    path: rule_path,
                    expression: rule.rule.clone(),
                    construct: "optionalOldSelf (oldSelf as an optional value)".into(),
                });
            }
            if rule.rule.trim().is_empty() {
                return Err(CelCostError::Schema {
                    path: rule_path,
                    message: "rule is not specified".into(),
                });
            }
            let expression_cost = env.expression_cost(&rule_path, &rule.rule, ResultKind::Bool)?;
            let message_expression_cost = match rule.message_expression.as_deref() {
                Some(m) if !m.is_empty() => {
                    let p = message_expression_path(&rule_path);
                    Some(env.expression_cost(&p, m, ResultKind::String)?)
                }
                _ => None,
            };
            out.push(RuleCost {
                path: rule_path,
                rule: rule.rule.clone(),
                expression_cost,
                cardinality,
                multiplier,
                total: multiply_with_overflow_guard(expression_cost, multiplier),
                message_expression_cost,
            });
        }
    }

    // childContext: a child's cardinality is this node's times extractMaxElements(this node).
    let child_cardinality = match (cardinality, extract_max_elements(s)) {
        (Some(c), Some(m)) => Some(multiply_with_overflow_guard(c, m)),
        _ => None,
    };
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_properties {
        walk(
            a,
            &format!("{path}.additionalProperties"),
            child_cardinality,
            false,
            out,
        )?;
    }
    if let Some(props) = &s.properties {
        for (name, prop) in props {
            let p = format!("{path}.properties[{name}]");
            walk(prop, &p, child_cardinality, false, out)?;
        }
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => {
            walk(
                items,
                &format!("{path}.items"),
                child_cardinality,
                false,
                out,
            )?;
        }
        Some(JSONSchemaPropsOrArray::Schemas(list)) if list.iter().any(has_rules_below) => {
            return Err(CelCostError::Schema {
                path: format!("{path}.items"),
                message: "rules inside an items array are not modelled".into(),
            });
        }
        _ => {}
    }
    // The server compiles no rules below these (its CEL context is nil there) and structural
    // schemas forbid them; refuse rather than guess.
    let mut elsewhere: Vec<(&str, &JSONSchemaProps)> = Vec::new();
    for (key, list) in [
        ("allOf", &s.all_of),
        ("anyOf", &s.any_of),
        ("oneOf", &s.one_of),
    ] {
        if let Some(list) = list {
            elsewhere.extend(list.iter().map(|x| (key, x)));
        }
    }
    if let Some(n) = &s.not {
        elsewhere.push(("not", n));
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_items {
        elsewhere.push(("additionalItems", a));
    }
    for (key, map) in [
        ("definitions", &s.definitions),
        ("patternProperties", &s.pattern_properties),
    ] {
        if let Some(map) = map {
            elsewhere.extend(map.values().map(|x| (key, x)));
        }
    }
    if let Some((key, _)) = elsewhere.iter().find(|(_, x)| has_rules_below(x)) {
        return Err(CelCostError::Schema {
            path: format!("{path}.{key}"),
            message: "x-kubernetes-validations here are not modelled".into(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DeclType: apiserver/pkg/cel/types.go and common/schemas.go.

#[derive(Clone, Debug, PartialEq)]
struct Decl {
    kind: DeclKind,
    /// `DeclType.MaxElements`: what the size estimator returns for values of this type.
    max_elements: i64,
    /// `DeclType.MinSerializedSize`.
    min_size: i64,
}

#[derive(Clone, Debug, PartialEq)]
enum DeclKind {
    Bool,
    Int,
    Double,
    String,
    Bytes,
    Duration,
    Timestamp,
    Dyn,
    List(Box<Decl>),
    Map(Box<Decl>, Box<Decl>),
    /// Fields under their CEL (escaped) names.
    Object(BTreeMap<String, Decl>),
}

impl Decl {
    fn simple(kind: DeclKind, min_size: i64) -> Decl {
        Decl {
            kind,
            max_elements: 0,
            min_size,
        }
    }
}

/// `estimateMaxStringLengthPerRequest` (schemas.go).
fn max_string_length_per_request(s: &JSONSchemaProps) -> i64 {
    if is_true(s.x_kubernetes_int_or_string) {
        return MAX_REQUEST_SIZE_BYTES - 2;
    }
    match s.format.as_deref() {
        Some("duration") => MAX_DURATION_SIZE_JSON,
        Some("date") => JSON_DATE_SIZE,
        Some("date-time") => MAX_DATETIME_SIZE_JSON,
        _ => MAX_REQUEST_SIZE_BYTES - 2,
    }
}

/// `WithTypeAndObjectMeta` (schemas.go): `kind`, `apiVersion`, `metadata.name` and
/// `metadata.generateName` are always visible at the root of a resource.
fn with_type_and_object_meta(s: &JSONSchemaProps) -> JSONSchemaProps {
    let is =
        |p: Option<&JSONSchemaProps>, t: &str| p.is_some_and(|p| p.type_.as_deref() == Some(t));
    let props = s.properties.as_ref();
    let metadata = props.and_then(|p| p.get("metadata"));
    let meta_props = metadata.and_then(|m| m.properties.as_ref());
    let complete = is(props.and_then(|p| p.get("kind")), "string")
        && is(props.and_then(|p| p.get("apiVersion")), "string")
        && is(metadata, "object")
        && is(meta_props.and_then(|p| p.get("name")), "string")
        && is(meta_props.and_then(|p| p.get("generateName")), "string");
    let mut result = s.clone();
    if complete {
        return result;
    }
    let string = JSONSchemaProps {
        type_: Some("string".into()),
        ..Default::default()
    };
    let mut props = s.properties.clone().unwrap_or_default();
    props.insert("kind".into(), string.clone());
    props.insert("apiVersion".into(), string.clone());
    props.insert(
        "metadata".into(),
        JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some(BTreeMap::from([
                ("name".to_string(), string.clone()),
                ("generateName".to_string(), string),
            ])),
            ..Default::default()
        },
    );
    result.properties = Some(props);
    result
}

/// CEL reserved words (apiserver/pkg/cel/escaping.go `celReservedSymbols`).
const CEL_RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// `Escape` (apiserver/pkg/cel/escaping.go): a property's name in CEL, or `None` if it cannot
/// be accessed from CEL.
fn escape(ident: &str) -> Option<String> {
    let first = *ident.as_bytes().first()?;
    if first.is_ascii_digit() {
        return None;
    }
    if CEL_RESERVED.contains(&ident) {
        return Some(format!("__{ident}__"));
    }
    let mut out = String::new();
    let mut chars = ident.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '_' if chars.peek() == Some(&'_') => {
                chars.next();
                out.push_str("__underscores__");
            }
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            _ => return None,
        }
    }
    Some(out)
}

/// `SchemaDeclType` (schemas.go); `None` where the server exposes no CEL type.
fn decl_type(s: &JSONSchemaProps, is_resource_root: bool) -> Option<Decl> {
    if is_true(s.x_kubernetes_int_or_string) {
        let max_elements = match s.max_length {
            Some(n) => n.max(0) * 4,
            None => max_string_length_per_request(s),
        };
        return Some(Decl {
            kind: DeclKind::Dyn,
            max_elements,
            min_size: 1,
        });
    }
    let rooted;
    let s = if is_resource_root {
        rooted = with_type_and_object_meta(s);
        &rooted
    } else {
        s
    };
    match s.type_.as_deref()? {
        "array" => {
            let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items else {
                return None;
            };
            let item = decl_type(items, is_true(items.x_kubernetes_embedded_resource))?;
            // estimateMaxArrayItemsFromMinSize
            let max_items = match s.max_items {
                Some(n) => n.max(0),
                None => (MAX_REQUEST_SIZE_BYTES - 2) / (item.min_size + 1),
            };
            Some(Decl {
                kind: DeclKind::List(Box::new(item)),
                max_elements: max_items,
                min_size: 2,
            })
        }
        "object" => {
            if let Some(JSONSchemaPropsOrBool::Schema(props)) = &s.additional_properties {
                let value = decl_type(props, is_true(props.x_kubernetes_embedded_resource))?;
                // estimateMaxAdditionalPropertiesFromMinSize
                let max_properties = match s.max_properties {
                    Some(n) => n.max(0),
                    None => (MAX_REQUEST_SIZE_BYTES - 2) / (value.min_size + 6),
                };
                let key = Decl::simple(DeclKind::String, MIN_STRING_SIZE);
                return Some(Decl {
                    kind: DeclKind::Map(Box::new(key), Box::new(value)),
                    max_elements: max_properties,
                    min_size: 2,
                });
            }
            let required = s.required.clone().unwrap_or_default();
            let mut fields = BTreeMap::new();
            // An object is at least `{}`, plus every required property without a default.
            let mut min_size = 2;
            for (name, prop) in s.properties.iter().flatten() {
                let Some(field) = decl_type(prop, is_true(prop.x_kubernetes_embedded_resource))
                else {
                    continue;
                };
                if required.contains(name) && prop.default.is_none() {
                    min_size += name.len() as i64 + field.min_size + 4;
                }
                if let Some(cel_name) = escape(name) {
                    fields.insert(cel_name, field);
                }
            }
            Some(Decl {
                kind: DeclKind::Object(fields),
                max_elements: 0,
                min_size,
            })
        }
        "string" => {
            let (kind, min_size, max_elements) = match s.format.as_deref() {
                Some("byte") => (
                    DeclKind::Bytes,
                    MIN_STRING_SIZE,
                    match s.max_length {
                        Some(n) => n.max(0),
                        None => max_string_length_per_request(s),
                    },
                ),
                Some("duration") => (
                    DeclKind::Duration,
                    MIN_DURATION_SIZE_JSON,
                    max_string_length_per_request(s),
                ),
                Some("date") => (
                    DeclKind::Timestamp,
                    JSON_DATE_SIZE,
                    max_string_length_per_request(s),
                ),
                Some("date-time") => (
                    DeclKind::Timestamp,
                    MIN_DATETIME_SIZE_JSON,
                    max_string_length_per_request(s),
                ),
                _ => {
                    let max = if let Some(n) = s.max_length {
                        // estimateMaxElementsFromMaxLength: up to 4 bytes per code point.
                        n.max(0) * 4
                    } else if let Some(values) = s.enum_.as_ref().filter(|e| !e.is_empty()) {
                        // estimateMaxStringEnumLength (Go len: bytes)
                        values
                            .iter()
                            .filter_map(|v| v.0.as_str())
                            .map(|v| v.len() as i64)
                            .max()
                            .unwrap_or(0)
                    } else {
                        max_string_length_per_request(s)
                    };
                    (DeclKind::String, MIN_STRING_SIZE, max)
                }
            };
            Some(Decl {
                kind,
                max_elements,
                min_size,
            })
        }
        "boolean" => Some(Decl::simple(DeclKind::Bool, MIN_BOOL_SIZE)),
        "number" => Some(Decl::simple(DeclKind::Double, MIN_NUMBER_SIZE)),
        "integer" => Some(Decl::simple(DeclKind::Int, MIN_NUMBER_SIZE)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The cost estimator: cel-go v0.22 checker/cost.go, restricted to the modelled constructs.

/// A `[min, max]` range, used both for sizes and for costs (cel-go's `SizeEstimate` and
/// `CostEstimate`), with cel-go's saturating arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Est {
    min: u64,
    max: u64,
}

impl Est {
    const UNKNOWN: Est = Est {
        min: 0,
        max: u64::MAX,
    };

    fn fixed(v: u64) -> Est {
        Est { min: v, max: v }
    }

    fn add(self, o: Est) -> Est {
        Est {
            min: self.min.saturating_add(o.min),
            max: self.max.saturating_add(o.max),
        }
    }

    fn multiply(self, o: Est) -> Est {
        Est {
            min: self.min.saturating_mul(o.min),
            max: self.max.saturating_mul(o.max),
        }
    }

    fn union(self, o: Est) -> Est {
        Est {
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }

    /// `MultiplyByCostFactor`: each bound times `factor`, rounded up.
    fn times_factor(self, factor: f64) -> Est {
        Est {
            min: multiply_by_cost_factor(self.min, factor),
            max: multiply_by_cost_factor(self.max, factor),
        }
    }
}

/// cel-go `multiplyByCostFactor`.
fn multiply_by_cost_factor(x: u64, y: f64) -> u64 {
    let two_to_64 = 18_446_744_073_709_551_616.0_f64;
    let xf = x as f64;
    if xf > 0.0 && y > 0.0 && xf > two_to_64 / y {
        return u64::MAX;
    }
    let ceil = (xf * y).ceil();
    if ceil >= two_to_64 {
        return u64::MAX;
    }
    ceil as u64
}

/// The checker's type of an expression, as far as overload selection needs it.
#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    Duration,
    Timestamp,
    Dyn,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    Object(Rc<BTreeMap<String, Decl>>),
}

impl Ty {
    fn of(d: &Decl) -> Ty {
        match &d.kind {
            DeclKind::Bool => Ty::Bool,
            DeclKind::Int => Ty::Int,
            DeclKind::Double => Ty::Double,
            DeclKind::String => Ty::String,
            DeclKind::Bytes => Ty::Bytes,
            DeclKind::Duration => Ty::Duration,
            DeclKind::Timestamp => Ty::Timestamp,
            DeclKind::Dyn => Ty::Dyn,
            DeclKind::List(e) => Ty::List(Box::new(Ty::of(e))),
            DeclKind::Map(k, v) => Ty::Map(Box::new(Ty::of(k)), Box::new(Ty::of(v))),
            DeclKind::Object(f) => Ty::Object(Rc::new(f.clone())),
        }
    }

    /// cel-go `isScalar`: types whose size is known to be 1.
    fn is_scalar(&self) -> bool {
        matches!(
            self,
            Ty::Bool | Ty::Double | Ty::Duration | Ty::Int | Ty::Timestamp | Ty::Uint
        )
    }

    fn is_number(&self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    fn name(&self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Uint => "uint",
            Ty::Double => "double",
            Ty::String => "string",
            Ty::Bytes => "bytes",
            Ty::Null => "null",
            Ty::Duration => "duration",
            Ty::Timestamp => "timestamp",
            Ty::Dyn => "dyn",
            Ty::List(_) => "list",
            Ty::Map(..) => "map",
            Ty::Object(_) => "object",
        }
    }
}

/// What cel-go knows about an evaluated sub-expression (its `AstNode`).
#[derive(Clone, Debug)]
struct Node {
    ty: Ty,
    /// Field path from a variable (`self`, `a`, `@items`, …); empty if none.
    path: Vec<String>,
    /// `ComputedSize`: a call's result size, or a literal's exact size.
    computed: Option<Est>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ResultKind {
    Bool,
    String,
}

type SizeFn<'a> = Box<dyn Fn(&[String]) -> Option<Est> + 'a>;

/// A CEL environment: the variables and the size estimator (cel-go's `CostEstimator`).
struct Env<'a> {
    vars: BTreeMap<String, Ty>,
    estimate_size: SizeFn<'a>,
    presence_test_cost: u64,
}

impl<'a> Env<'a> {
    /// `self` and `oldSelf` of the schema node, sized by schema/cel/compilation.go
    /// `sizeEstimator.EstimateSize` (the path's first element names the variable and is dropped).
    fn for_schema(root: &'a Decl) -> Env<'a> {
        let ty = Ty::of(root);
        Env {
            vars: BTreeMap::from([
                ("self".to_string(), ty.clone()),
                ("oldSelf".to_string(), ty),
            ]),
            estimate_size: Box::new(move |path: &[String]| {
                let mut node = root;
                for name in &path[1..] {
                    node = match (name.as_str(), &node.kind) {
                        ("@items" | "@values", DeclKind::List(e) | DeclKind::Map(_, e)) => e,
                        ("@keys", DeclKind::Map(k, _)) => k,
                        (_, DeclKind::Object(fields)) => fields.get(name)?,
                        _ => return None,
                    };
                }
                Some(Est {
                    min: 0,
                    max: node.max_elements.max(0) as u64,
                })
            }),
            presence_test_cost: K8S_PRESENCE_TEST_COST,
        }
    }

    /// Parses and estimates one expression: cel-go's `CostEstimate.Max`.
    fn expression_cost(
        &self,
        path: &str,
        expression: &str,
        result: ResultKind,
    ) -> Result<u64, CelCostError> {
        let unsupported = |construct: String| CelCostError::Unsupported {
            path: path.to_string(),
            expression: expression.to_string(),
            construct,
        };
        reject_repeated_unary(expression).map_err(unsupported)?;
        let ast =
            cel::parser::Parser::new()
                .parse(expression)
                .map_err(|e| CelCostError::Parse {
                    path: path.to_string(),
                    expression: expression.to_string(),
                    message: e.to_string(),
                })?;
        let (cost, node) = self.cost(&ast).map_err(unsupported)?;
        let ok = match result {
            ResultKind::Bool => matches!(node.ty, Ty::Bool | Ty::Dyn),
            ResultKind::String => matches!(node.ty, Ty::String | Ty::Dyn),
        };
        if !ok {
            return Err(CelCostError::Schema {
                path: path.to_string(),
                message: format!("{expression:?} evaluates to {}", node.ty.name()),
            });
        }
        Ok(cost.max)
    }

    /// cel-go `sizeEstimate`.
    fn size(&self, n: &Node) -> Est {
        if let Some(s) = n.computed {
            return s;
        }
        if !n.path.is_empty() {
            if let Some(s) = (self.estimate_size)(&n.path) {
                return s;
            }
        }
        if n.ty.is_scalar() {
            return Est::fixed(1);
        }
        Est::UNKNOWN
    }

    /// cel-go `coster.cost`. Errors name the construct that is not modelled.
    fn cost(&self, e: &IdedExpr) -> Result<(Est, Node), String> {
        let node = |ty: Ty, path: Vec<String>, computed: Option<Est>| Node { ty, path, computed };
        match &e.expr {
            Expr::Literal(lit) => {
                let (ty, size) = match lit {
                    LiteralValue::Boolean(_) => (Ty::Bool, 1),
                    LiteralValue::Int(_) => (Ty::Int, 1),
                    LiteralValue::UInt(_) => (Ty::Uint, 1),
                    LiteralValue::Double(_) => (Ty::Double, 1),
                    LiteralValue::Null => (Ty::Null, 1),
                    // runes, as CEL's size() counts them
                    LiteralValue::String(s) => (Ty::String, s.inner().chars().count() as u64),
                    LiteralValue::Bytes(b) => (Ty::Bytes, b.inner().len() as u64),
                };
                Ok((
                    Est::fixed(CONST_COST),
                    node(ty, Vec::new(), Some(Est::fixed(size))),
                ))
            }
            Expr::Ident(name) => {
                let ty = self
                    .vars
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("the identifier `{name}`"))?;
                Ok((
                    Est::fixed(SELECT_AND_IDENT_COST),
                    node(ty, vec![name.clone()], None),
                ))
            }
            Expr::Select(sel) => {
                let (operand_cost, operand) = self.cost(&sel.operand)?;
                let field_ty = match &operand.ty {
                    Ty::Object(fields) => fields
                        .get(&sel.field)
                        .map(Ty::of)
                        .ok_or_else(|| format!("the undeclared field `{}`", sel.field))?,
                    Ty::Map(_, v) => (**v).clone(),
                    other => {
                        return Err(format!("selecting `{}` on a {}", sel.field, other.name()));
                    }
                };
                if sel.test {
                    // has(): presence-test cost (0 in Kubernetes) plus the operand.
                    let cost = Est::fixed(self.presence_test_cost).add(operand_cost);
                    return Ok((cost, node(Ty::Bool, Vec::new(), None)));
                }
                // Selecting on a map or object costs 1 more than the operand.
                let cost = operand_cost.add(Est::fixed(SELECT_AND_IDENT_COST));
                let mut path = operand.path;
                path.push(sel.field.clone());
                Ok((cost, node(field_ty, path, None)))
            }
            Expr::List(list) => {
                if !list.optional_indices.is_empty() {
                    return Err("optional list elements".into());
                }
                let mut cost = Est::fixed(0);
                let mut elem = None;
                for item in &list.elements {
                    let (c, n) = self.cost(item)?;
                    cost = cost.add(c);
                    elem.get_or_insert(n.ty);
                }
                let ty = Ty::List(Box::new(elem.unwrap_or(Ty::Dyn)));
                let size = Est::fixed(list.elements.len() as u64);
                Ok((
                    cost.add(Est::fixed(LIST_CREATE_BASE_COST)),
                    node(ty, Vec::new(), Some(size)),
                ))
            }
            Expr::Map(map) => {
                let mut cost = Est::fixed(0);
                let mut types = None;
                for entry in &map.entries {
                    let EntryExpr::MapEntry(entry) = &entry.expr else {
                        return Err("a struct field in a map literal".into());
                    };
                    if entry.optional {
                        return Err("optional map entries".into());
                    }
                    let (kc, k) = self.cost(&entry.key)?;
                    let (vc, v) = self.cost(&entry.value)?;
                    cost = cost.add(kc).add(vc);
                    types.get_or_insert((k.ty, v.ty));
                }
                let (k, v) = types.unwrap_or((Ty::Dyn, Ty::Dyn));
                let size = Est::fixed(map.entries.len() as u64);
                Ok((
                    cost.add(Est::fixed(MAP_CREATE_BASE_COST)),
                    node(Ty::Map(Box::new(k), Box::new(v)), Vec::new(), Some(size)),
                ))
            }
            Expr::Call(call) => self.cost_call(call),
            Expr::Comprehension(_) => {
                Err("a comprehension macro (all, exists, exists_one, map, filter)".into())
            }
            Expr::Struct(_) => Err("a message literal".into()),
            Expr::Unspecified => Err("an unparsed expression".into()),
        }
    }

    /// cel-go `costCall` and `functionCost`.
    fn cost_call(&self, call: &CallExpr) -> Result<(Est, Node), String> {
        let mut args = Vec::with_capacity(call.args.len());
        let mut arg_sum = Est::fixed(0);
        for a in &call.args {
            let (c, n) = self.cost(a)?;
            arg_sum = arg_sum.add(c);
            args.push((c, n));
        }
        let target = match &call.target {
            Some(t) => Some(self.cost(t)?),
            None => None,
        };
        let name = call.func_name.as_str();
        let o1 = Est::fixed(1).add(arg_sum); // an O(1) function
        let ty = |i: usize| &args[i].1.ty;
        let unsupported = || {
            let types: Vec<&str> = target
                .iter()
                .map(|t| t.1.ty.name())
                .chain(args.iter().map(|a| a.1.ty.name()))
                .collect();
            let form = if target.is_some() {
                "method"
            } else {
                "function"
            };
            format!("the {form} `{name}` on ({})", types.join(", "))
        };

        // (cost of the call without its target, result type, result size, result path)
        let (cost, result, size, path): (Est, Ty, Option<Est>, Vec<String>) =
            match (name, &target, args.len()) {
                (operators::LOGICAL_AND | operators::LOGICAL_OR, None, 2)
                    if matches!(ty(0), Ty::Bool) && matches!(ty(1), Ty::Bool) =>
                {
                    // The minimum is the left side alone (short circuit).
                    let (l, r) = (args[0].0, args[1].0);
                    let cost = Est {
                        min: l.min,
                        max: l.max.saturating_add(r.max),
                    };
                    (cost, Ty::Bool, None, Vec::new())
                }
                (operators::LOGICAL_NOT, None, 1) if matches!(ty(0), Ty::Bool) => {
                    (o1, Ty::Bool, None, Vec::new())
                }
                (operators::CONDITIONAL, None, 3)
                    if matches!(ty(0), Ty::Bool) && ty(1) == ty(2) && *ty(1) != Ty::Dyn =>
                {
                    let cost = args[0].0.add(args[1].0.union(args[2].0));
                    let size = self.size(&args[1].1).union(self.size(&args[2].1));
                    (cost, ty(1).clone(), Some(size), Vec::new())
                }
                (operators::EQUALS | operators::NOT_EQUALS, None, 2) => {
                    (self.comparison(&args, arg_sum), Ty::Bool, None, Vec::new())
                }
                (
                    operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS,
                    None,
                    2,
                ) => match (ty(0), ty(1)) {
                    // LessString, LessBytes, …: a traversal of the shorter operand.
                    (Ty::String, Ty::String) | (Ty::Bytes, Ty::Bytes) => {
                        (self.comparison(&args, arg_sum), Ty::Bool, None, Vec::new())
                    }
                    (a, b)
                        if (a.is_number() && b.is_number())
                            || (a == b && matches!(a, Ty::Bool | Ty::Timestamp | Ty::Duration)) =>
                    {
                        (o1, Ty::Bool, None, Vec::new())
                    }
                    _ => return Err(unsupported()),
                },
                (operators::IN, None, 2) => match ty(1) {
                    // InList: O(n) in the list's size, even for a literal list.
                    Ty::List(_) => {
                        let cost = self.size(&args[1].1).times_factor(1.0).add(arg_sum);
                        (cost, Ty::Bool, None, Vec::new())
                    }
                    Ty::Map(..) => (o1, Ty::Bool, None, Vec::new()),
                    _ => return Err(unsupported()),
                },
                ("size", None, 1) | ("size", Some(_), 0) => {
                    let arg_ty = match &target {
                        Some(t) => &t.1.ty,
                        None => ty(0),
                    };
                    match arg_ty {
                        Ty::String | Ty::Bytes | Ty::List(_) | Ty::Map(..) | Ty::Dyn => {
                            (o1, Ty::Int, None, Vec::new())
                        }
                        _ => return Err(unsupported()),
                    }
                }
                ("matches", Some(t), 1)
                    if matches!(t.1.ty, Ty::String) && matches!(ty(0), Ty::String) =>
                {
                    // MatchesString: (size + 1) * 0.1 times regex length * 0.25, each rounded up.
                    let str_cost = self
                        .size(&t.1)
                        .add(Est::fixed(1))
                        .times_factor(STRING_TRAVERSAL_COST_FACTOR);
                    let regex_cost = self
                        .size(&args[0].1)
                        .times_factor(REGEX_STRING_LENGTH_COST_FACTOR);
                    let cost = str_cost.multiply(regex_cost).add(arg_sum);
                    (cost, Ty::Bool, None, Vec::new())
                }
                ("contains", Some(t), 1)
                    if matches!(t.1.ty, Ty::String) && matches!(ty(0), Ty::String) =>
                {
                    let str_cost = self.size(&t.1).times_factor(STRING_TRAVERSAL_COST_FACTOR);
                    let sub_cost = self
                        .size(&args[0].1)
                        .times_factor(STRING_TRAVERSAL_COST_FACTOR);
                    let cost = str_cost.multiply(sub_cost).add(arg_sum);
                    (cost, Ty::Bool, None, Vec::new())
                }
                ("startsWith" | "endsWith", Some(t), 1)
                    if matches!(t.1.ty, Ty::String) && matches!(ty(0), Ty::String) =>
                {
                    let cost = self
                        .size(&args[0].1)
                        .times_factor(STRING_TRAVERSAL_COST_FACTOR)
                        .add(arg_sum);
                    (cost, Ty::Bool, None, Vec::new())
                }
                ("int" | "uint" | "double", None, 1)
                    if ty(0).is_number()
                        || matches!(ty(0), Ty::String | Ty::Timestamp | Ty::Dyn) =>
                {
                    let result = match name {
                        "int" => Ty::Int,
                        "uint" => Ty::Uint,
                        _ => Ty::Double,
                    };
                    (o1, result, None, Vec::new())
                }
                (operators::ADD, None, 2) => match (ty(0), ty(1)) {
                    // AddString, AddBytes: a traversal of the result; AddList: O(1).
                    (Ty::String, Ty::String) | (Ty::Bytes, Ty::Bytes) => {
                        let size = self.size(&args[0].1).add(self.size(&args[1].1));
                        let cost = size.times_factor(STRING_TRAVERSAL_COST_FACTOR).add(arg_sum);
                        (cost, ty(0).clone(), Some(size), Vec::new())
                    }
                    (Ty::List(_), Ty::List(_)) => {
                        let size = self.size(&args[0].1).add(self.size(&args[1].1));
                        (o1, ty(0).clone(), Some(size), Vec::new())
                    }
                    (a, b) => {
                        let result = arithmetic(a, b, true).ok_or_else(unsupported)?;
                        (o1, result, None, Vec::new())
                    }
                },
                (operators::SUBSTRACT, None, 2) => {
                    let result = arithmetic(ty(0), ty(1), false).ok_or_else(unsupported)?;
                    (o1, result, None, Vec::new())
                }
                (operators::MULTIPLY | operators::DIVIDE | operators::MODULO, None, 2)
                    if ty(0).is_number() && ty(0) == ty(1) =>
                {
                    (o1, ty(0).clone(), None, Vec::new())
                }
                (operators::NEGATE, None, 1)
                    if matches!(ty(0), Ty::Int | Ty::Double | Ty::Duration) =>
                {
                    (o1, ty(0).clone(), None, Vec::new())
                }
                (operators::INDEX, None, 2) => {
                    // IndexList / IndexMap: O(1); the result's path continues into the items.
                    let (elem, segment) = match (ty(0), ty(1)) {
                        (Ty::List(e), Ty::Int | Ty::Uint) => ((**e).clone(), "@items"),
                        (Ty::Map(_, v), _) => ((**v).clone(), "@values"),
                        _ => return Err(unsupported()),
                    };
                    let mut path = args[0].1.path.clone();
                    path.push(segment.to_string());
                    (o1, elem, None, path)
                }
                _ => return Err(unsupported()),
            };
        let target_cost = target.map(|t| t.0).unwrap_or(Est::fixed(0));
        Ok((
            target_cost.add(cost),
            Node {
                ty: result,
                path,
                computed: size,
            },
        ))
    }

    /// Equality and string/bytes ordering: a traversal (factor 0.1) of the smaller operand.
    fn comparison(&self, args: &[(Est, Node)], arg_sum: Est) -> Est {
        let smallest_max = self.size(&args[0].1).max.min(self.size(&args[1].1).max);
        let min = u64::from(smallest_max > 0);
        Est {
            min,
            max: smallest_max,
        }
        .times_factor(STRING_TRAVERSAL_COST_FACTOR)
        .add(arg_sum)
    }
}

/// The result type of an O(1) arithmetic overload, `None` if not modelled.
fn arithmetic(a: &Ty, b: &Ty, add: bool) -> Option<Ty> {
    match (a, b) {
        (a, b) if a.is_number() && a == b => Some(a.clone()),
        (Ty::Duration, Ty::Duration) => Some(Ty::Duration),
        (Ty::Timestamp, Ty::Duration) => Some(Ty::Timestamp),
        (Ty::Duration, Ty::Timestamp) if add => Some(Ty::Timestamp),
        (Ty::Timestamp, Ty::Timestamp) if !add => Some(Ty::Duration),
        _ => None,
    }
}

/// cel-go's parser folds `!!x` to `x` and `--x` to `x`; the `cel` crate's parser keeps one
/// operator, so its AST would cost differently. Refuse such expressions instead.
fn reject_repeated_unary(src: &str) -> Result<(), String> {
    let b = src.as_bytes();
    let mut i = 0;
    // The previous significant token, if it was `!` (unary) or `-`.
    let mut last: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'\'' || c == b'"' {
            // A string prefix (r, b, rb, …) was consumed as identifier characters just before.
            let mut j = i;
            while j > 0 && b[j - 1].is_ascii_alphabetic() {
                j -= 1;
            }
            let prefix = &src[j..i];
            let raw = prefix.len() <= 2
                && prefix.chars().all(|p| "rRbB".contains(p))
                && prefix.chars().any(|p| p == 'r' || p == 'R');
            let triple = b.get(i + 1) == Some(&c) && b.get(i + 2) == Some(&c);
            i += if triple { 3 } else { 1 };
            loop {
                if i >= b.len() {
                    return Ok(()); // unterminated: the parser reports it
                }
                if b[i] == b'\\' && !raw {
                    i += 2;
                    continue;
                }
                if b[i] == c && (!triple || (b.get(i + 1) == Some(&c) && b.get(i + 2) == Some(&c)))
                {
                    i += if triple { 3 } else { 1 };
                    break;
                }
                i += 1;
            }
            last = None;
            continue;
        }
        if c == b'!' && b.get(i + 1) != Some(&b'=') {
            if last == Some(b'!') {
                return Err("a repeated `!` (parsed differently from cel-go)".into());
            }
            last = Some(b'!');
        } else if c == b'-' {
            if last == Some(b'-') {
                return Err("a repeated `-` (parsed differently from cel-go)".into());
            }
            last = Some(b'-');
        } else {
            last = None;
            if c == b'!' {
                i += 1; // the `=` of `!=`
            }
        }
        i += 1;
    }
    Ok(())
}

/// A human-readable table of `costs`, for test failure messages and reports.
pub fn report(costs: &[CrdCost]) -> String {
    let mut out = String::new();
    for crd in costs {
        let _ = writeln!(
            out,
            "{} ({}) at {}: total {} (limit {})",
            crd.crd,
            crd.versions.join(", "),
            crd.schema_path,
            crd.total,
            PER_CRD_LIMIT
        );
        for r in &crd.rules {
            let card = match r.cardinality {
                Some(c) => c.to_string(),
                None => format!("unbounded (~{})", r.multiplier),
            };
            let _ = writeln!(
                out,
                "  {} x {} = {}  {}",
                r.expression_cost, card, r.total, r.path
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = include_str!("../tests/fixtures/weftnetworkpolicies-refused.yaml");

    fn refused() -> CustomResourceDefinition {
        serde_saphyr::from_str(REFUSED).expect("fixture parses as a CRD")
    }

    fn rule<'a>(cost: &'a CrdCost, path: &str) -> &'a RuleCost {
        cost.rules
            .iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("no rule at {path}\n{}", report(std::slice::from_ref(cost))))
    }

    const EGRESS: &str =
        "spec.validation.openAPIV3Schema.properties[spec].properties[egress].items";

    /// The exact errors a v1.32 kube-apiserver returned for this schema.
    #[test]
    fn reproduces_the_factors_the_api_server_printed() {
        let costs = estimate(&refused()).expect("estimate");
        assert_eq!(costs.len(), 1);
        let cost = &costs[0];
        assert_eq!(cost.schema_path, "spec.validation.openAPIV3Schema");
        let violations = cost.violations();
        let expressions = format!("{EGRESS}.properties[toEndpoints].items.properties[matchExpressions].items.x-kubernetes-validations");
        let ports = format!(
            "{EGRESS}.properties[toPorts].items.properties[ports].items.x-kubernetes-validations"
        );
        for (path, factor) in [
            (format!("{expressions}[0].rule"), "4.2x"),
            (format!("{expressions}[1].rule"), "4.4x"),
            (format!("{ports}[0].rule"), "1.9x"),
            (format!("{ports}[1].rule"), "2.6x"),
        ] {
            let expected = format!(
                "{path}: Forbidden: estimated rule cost exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
            );
            assert!(
                violations.contains(&expected),
                "missing {expected}\nviolations:\n{}\n{}",
                violations.join("\n"),
                report(&costs)
            );
        }

        // The arithmetic behind the factors: 256 * 256 * 32 and 256 * 64 * 64 evaluations.
        let r = rule(cost, &format!("{expressions}[0].rule"));
        assert_eq!((r.expression_cost, r.cardinality), (20, Some(2_097_152)));
        let r = rule(cost, &format!("{expressions}[1].rule"));
        assert_eq!((r.expression_cost, r.cardinality), (21, Some(2_097_152)));
        let r = rule(cost, &format!("{ports}[0].rule"));
        assert_eq!((r.expression_cost, r.cardinality), (18, Some(1_048_576)));
        let r = rule(cost, &format!("{ports}[1].rule"));
        assert_eq!(
            (r.expression_cost, r.cardinality, r.total),
            (25, Some(1_048_576), 26_214_400)
        );

        // Same rules in every rule list; the cheap ones stay within budget.
        let r = rule(
            cost,
            &format!("{EGRESS}.properties[toFQDNs].items.x-kubernetes-validations[0].rule"),
        );
        assert_eq!((r.expression_cost, r.cardinality), (3, Some(65_536)));
        let r = rule(
            cost,
            "spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule",
        );
        assert_eq!((r.expression_cost, r.cardinality, r.total), (5, Some(1), 5));
        for list in ["ingress", "egress", "ingressDeny", "egressDeny"] {
            let over: Vec<_> = cost
                .rules
                .iter()
                .filter(|r| {
                    r.path.contains(&format!("properties[{list}]")) && r.total > PER_RULE_LIMIT
                })
                .collect();
            assert_eq!(over.len(), 4, "{list}:\n{}", report(&costs));
        }
        assert!(cost.total > PER_CRD_LIMIT);
        assert!(violations.last().is_some_and(|v| v.starts_with(
            "spec.validation.openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of "
        )));
    }

    /// A test environment like cel-go's `testCostEstimator`: sizes from hints keyed by the
    /// dotted path, and has() costing 1 as in plain cel-go.
    fn test_env(vars: &[(&str, Ty)], hints: &[(&str, u64)]) -> Env<'static> {
        let hints: BTreeMap<String, u64> = hints.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            estimate_size: Box::new(move |path: &[String]| {
                hints
                    .get(&path.join("."))
                    .map(|max| Est { min: 0, max: *max })
            }),
            presence_test_cost: 1,
        }
    }

    fn range(env: &Env<'_>, expr: &str) -> (u64, u64) {
        let ast = cel::parser::Parser::new().parse(expr).expect("parses");
        let (cost, _) = env.cost(&ast).unwrap_or_else(|e| panic!("{expr}: {e}"));
        (cost.min, cost.max)
    }

    /// Cases and expected `[min, max]` from google/cel-go `checker/cost_test.go` (`TestCost`).
    #[test]
    fn matches_cel_go_cost_test_cases() {
        let object = Ty::Object(Rc::new(BTreeMap::from([(
            "single_int32".to_string(),
            Decl::simple(DeclKind::Int, 1),
        )])));
        let string_map = Ty::Map(Box::new(Ty::String), Box::new(Ty::String));
        // (expression, variables, size hints, expected [min, max])
        type Case = (
            &'static str,
            Vec<(&'static str, Ty)>,
            Vec<(&'static str, u64)>,
            (u64, u64),
        );
        let cases: Vec<Case> = vec![
            (r#""Hello World!""#, vec![], vec![], (0, 0)),
            (
                "input",
                vec![("input", Ty::List(Box::new(Ty::Int)))],
                vec![],
                (1, 1),
            ),
            ("input['key']", vec![("input", string_map)], vec![], (2, 2)),
            (
                "input.single_int32",
                vec![("input", object)],
                vec![],
                (2, 2),
            ),
            ("[1, 2, 3]", vec![], vec![], (10, 10)),
            (r#"{"a": 1, "b": 2, "c": 3}"#, vec![], vec![], (30, 30)),
            (
                "input.matches('[0-9]')",
                vec![("input", Ty::String)],
                vec![("input", 500)],
                (3, 103),
            ),
            ("'123'.matches('[0-9]')", vec![], vec![], (2, 2)),
            ("true || false", vec![], vec![], (0, 0)),
            ("true && false", vec![], vec![], (0, 0)),
            ("1 < 2", vec![], vec![], (1, 1)),
            ("1 <= 2", vec![], vec![], (1, 1)),
            ("1 == 2", vec![], vec![], (1, 1)),
            ("2 > 1", vec![], vec![], (1, 1)),
            ("2 >= 1", vec![], vec![], (1, 1)),
            ("2 in [1, 2, 3]", vec![], vec![], (13, 13)),
            ("1 + 1", vec![], vec![], (1, 1)),
            ("1 - 1", vec![], vec![], (1, 1)),
            ("1 / 1", vec![], vec![], (1, 1)),
            ("1 * 1", vec![], vec![], (1, 1)),
            ("1 % 1", vec![], vec![], (1, 1)),
            ("true ? 1 : 2", vec![], vec![], (0, 0)),
            (r#"size("123")"#, vec![], vec![], (1, 1)),
            (
                "input.contains(arg1)",
                vec![("input", Ty::String), ("arg1", Ty::String)],
                vec![("input", 500), ("arg1", 500)],
                (2, 2502),
            ),
            (
                r"input.matches('\\d+a\\d+b')",
                vec![("input", Ty::String)],
                vec![("input", 500)],
                (3, 103),
            ),
            (
                "input.startsWith(arg1)",
                vec![("input", Ty::String), ("arg1", Ty::String)],
                vec![("arg1", 500)],
                (2, 52),
            ),
            (
                "input.endsWith(arg1)",
                vec![("input", Ty::String), ("arg1", Ty::String)],
                vec![("arg1", 500)],
                (2, 52),
            ),
            ("input.size()", vec![("input", Ty::String)], vec![], (2, 2)),
            ("size(input)", vec![("input", Ty::String)], vec![], (2, 2)),
            (
                r#""abcdefg".contains(str1 + str2)"#,
                vec![("str1", Ty::String), ("str2", Ty::String)],
                vec![("str1", 10), ("str2", 10)],
                (2, 6),
            ),
        ];
        for (expr, vars, hints, want) in cases {
            let env = test_env(&vars, &hints);
            assert_eq!(range(&env, expr), want, "{expr}");
        }
    }

    fn schema(yaml: &str) -> JSONSchemaProps {
        serde_saphyr::from_str(yaml).expect("schema parses")
    }

    fn crd_with(schema_yaml: &str) -> CustomResourceDefinition {
        let crd = format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: things.example.com}}\nspec:\n  group: example.com\n  names: {{kind: Thing, plural: things}}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n{}",
            schema_yaml
                .lines()
                .map(|l| format!("        {l}\n"))
                .collect::<String>()
        );
        serde_saphyr::from_str(&crd).expect("CRD parses")
    }

    /// The Kubernetes environment prices `has()` at its operand only (PresenceTestHasCost(false),
    /// apiserver/pkg/cel/environment/base.go), sizes strings at 4 bytes per `maxLength`
    /// character and by their longest enum value, and ints at 0 (`IntType.MaxElements`).
    #[test]
    fn kubernetes_sizes_and_presence() {
        let s = schema(
            "type: object\nproperties:\n  name: {type: string, maxLength: 10}\n  mode: {type: string, enum: [a, abcdef]}\n  free: {type: string}\n  n: {type: integer}\n  tags: {type: array, maxItems: 7, items: {type: string}}\n",
        );
        let decl = decl_type(&s, false).expect("decl");
        let env = Env::for_schema(&decl);
        let cost = |e: &str| env.expression_cost("p", e, ResultKind::Bool).expect(e);
        assert_eq!(cost("has(self.name)"), 1);
        // size 40 -> ceil(41 * 0.1) = 5, regex 'a' -> ceil(0.25) = 1, plus self.name = 2
        assert_eq!(cost("self.name.matches('a')"), 7);
        // smaller side is 'x' (1): ceil(0.1) + 2
        assert_eq!(cost("self.name == 'x'"), 3);
        // both sides sized by the schema: min(40, 6) = 6 -> ceil(0.6) = 1, plus 2 + 2
        assert_eq!(cost("self.name == self.mode"), 5);
        // unbounded string: 3 MiB - 2 = 3145726 -> ceil(314572.6) + 2 + 2
        assert_eq!(cost("self.free == oldSelf.free"), 314_573 + 4);
        // ints have MaxElements 0: the comparison itself is free
        assert_eq!(cost("self.n == oldSelf.n"), 4);
        assert_eq!(cost("'a' in self.tags"), 7 + 2);
        // index: 1 + self.tags (2); items are unbounded strings but 'a' is 1 long: ceil(0.1)
        assert_eq!(cost("self.tags[0] == 'a'"), (1 + 2) + 1);
    }

    #[test]
    fn transition_rule_and_unbounded_cardinality() {
        let crd = crd_with(
            "type: object\nproperties:\n  spec:\n    type: object\n    required: [id, labels]\n    properties:\n      id: {type: integer}\n      labels: {type: object, maxProperties: 128, additionalProperties: {type: string}}\n    x-kubernetes-validations:\n    - rule: self.id == oldSelf.id && self.labels == oldSelf.labels\n  items:\n    type: array\n    items:\n      type: object\n      required: [key]\n      properties:\n        key: {type: string}\n      x-kubernetes-validations:\n      - rule: self.key != 'a'\n",
        );
        let costs = estimate(&crd).expect("estimate");
        let cost = &costs[0];
        // (0 + 2 + 2) && (ceil(12.8) + 2 + 2)
        let r = rule(
            cost,
            "spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule",
        );
        assert_eq!(
            (r.expression_cost, r.cardinality, r.total),
            (21, Some(1), 21)
        );
        // `items` has no maxItems: the item's min size is {"key":""} = 2 + 3 + 2 + 4 = 11, so
        // 3 MiB / 12 evaluations.
        let r = rule(cost, "spec.validation.openAPIV3Schema.properties[items].items.x-kubernetes-validations[0].rule");
        assert_eq!(r.cardinality, None);
        assert_eq!(r.multiplier, 3 * 1024 * 1024 / 12);
        assert_eq!(r.expression_cost, 3);
        assert_eq!(r.total, 3 * 262_144);
        assert_eq!(cost.total, 21 + 3 * 262_144);
        assert!(cost.violations().is_empty());
    }

    #[test]
    fn factor_wording_follows_get_cost_error_message() {
        assert!(
            cost_error_message("estimated rule cost", 10_485_760, PER_RULE_LIMIT)
                .starts_with("estimated rule cost exceeds budget by factor of 1.048576x (try")
        );
        assert!(
            cost_error_message("estimated rule cost", 26_214_400, PER_RULE_LIMIT)
                .contains("factor of 2.6x")
        );
        assert!(
            cost_error_message("estimated rule cost", u64::MAX, PER_RULE_LIMIT)
                .contains("factor of more than 100x")
        );
    }

    #[test]
    fn unmodelled_constructs_are_errors() {
        let s = schema(
            "type: object\nproperties:\n  port: {type: string, maxLength: 15}\n  values: {type: array, maxItems: 4, items: {type: string}}\n",
        );
        let decl = decl_type(&s, false).expect("decl");
        let env = Env::for_schema(&decl);
        for expr in [
            "self.values.all(v, v != '')",
            "matches(self.port, '^a$')",
            "string(self.port) == 'a'",
            "!!has(self.port)",
            "self.nope == 'a'",
            "self.port < 1",
        ] {
            let err = env
                .expression_cost("p", expr, ResultKind::Bool)
                .expect_err(expr);
            assert!(
                matches!(err, CelCostError::Unsupported { .. }),
                "{expr}: {err}"
            );
        }
        // `!=` and strings containing `!!` are fine
        assert_eq!(
            env.expression_cost(
                "p",
                "self.port != '!!' && !has(self.values)",
                ResultKind::Bool
            )
            .expect("cost"),
            (1 + 2) + (1 + 1)
        );
    }

    /// Every Weft CRD can be estimated: no rule uses a construct the estimator refuses.
    #[test]
    fn every_weft_crd_is_modelled() {
        for crd in crate::manifests::all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            estimate(&crd).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
