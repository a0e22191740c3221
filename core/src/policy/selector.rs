//! Label selectors with Kubernetes semantics. Keys may carry Cilium's source prefix (`k8s:app`),
//! which is ignored, so CiliumNetworkPolicy selectors work unchanged.

use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// Every requirement must hold; no requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// `k8s:app` and `app` name the same label.
pub fn strip_source(key: &str) -> &str {
    key.strip_prefix("k8s:").unwrap_or(key)
}

impl Selector {
    /// Selects everything.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn from_labels(match_labels: &Labels) -> Self {
        Self {
            requirements: match_labels
                .iter()
                .map(|(key, value)| Requirement {
                    key: strip_source(key).to_owned(),
                    operator: Operator::In,
                    values: vec![value.clone()],
                })
                .collect(),
        }
    }

    pub fn with(mut self, requirement: Requirement) -> Self {
        self.requirements.push(Requirement {
            key: strip_source(&requirement.key).to_owned(),
            ..requirement
        });
        self
    }

    pub fn selects_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether any requirement is about `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key == key)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|requirement| {
            let value = labels.get(&requirement.key);
            match requirement.operator {
                Operator::In => value.is_some_and(|v| requirement.values.contains(v)),
                Operator::NotIn => value.is_none_or(|v| !requirement.values.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions_follow_kubernetes_semantics() {
        let pod = labels(&[("app", "trainer"), ("tier", "gpu")]);
        assert!(Selector::all().matches(&pod));
        assert!(Selector::from_labels(&labels(&[("k8s:app", "trainer")])).matches(&pod));
        assert!(!Selector::from_labels(&labels(&[("app", "model")])).matches(&pod));
        let requirement = |key: &str, operator, values: &[&str]| Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let cases = [
            (requirement("tier", Operator::In, &["gpu", "cpu"]), true),
            (requirement("tier", Operator::NotIn, &["gpu"]), false),
            (requirement("zone", Operator::NotIn, &["a"]), true),
            (requirement("app", Operator::Exists, &[]), true),
            (requirement("zone", Operator::Exists, &[]), false),
            (requirement("zone", Operator::DoesNotExist, &[]), true),
        ];
        for (requirement, expected) in cases {
            assert_eq!(
                Selector::all().with(requirement.clone()).matches(&pod),
                expected,
                "{requirement:?}"
            );
        }
    }
}
