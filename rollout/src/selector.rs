//! Label selectors, matched the way the API server matches them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use thiserror::Error;

/// A compiled label selector. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A `matchExpressions` entry that the API server would also refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("label selector: {0}")]
pub struct SelectorError(String);

impl Selector {
    /// Compiles a Kubernetes label selector.
    pub fn compile(selector: &LabelSelector) -> Result<Selector, SelectorError> {
        let mut reqs: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for expr in selector.match_expressions.iter().flatten() {
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            let req = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError(format!(
                        "{} {} needs at least one value",
                        key, expr.operator
                    )));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError(format!(
                        "{} {} takes no values",
                        key, expr.operator
                    )));
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(SelectorError(format!(
                        "unknown operator {other:?} on {key}"
                    )));
                }
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|req| match req {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn an_empty_selector_matches_every_node() {
        assert!(
            Selector::compile(&LabelSelector::default())
                .unwrap()
                .matches(&labels(&[]))
        );
    }

    #[test]
    fn match_labels_and_expressions_all_apply() {
        let sel = Selector::compile(&LabelSelector {
            match_labels: Some(labels(&[("role", "worker")])),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("gpu", "DoesNotExist", &[]),
                expr("tier", "NotIn", &["db"]),
                expr("pool", "Exists", &[]),
            ]),
        })
        .unwrap();
        assert!(sel.matches(&labels(&[("role", "worker"), ("zone", "a"), ("pool", "x")])));
        assert!(!sel.matches(&labels(&[("role", "worker"), ("zone", "c"), ("pool", "x")])));
        assert!(!sel.matches(&labels(&[
            ("role", "worker"),
            ("zone", "a"),
            ("pool", "x"),
            ("gpu", "1")
        ])));
        assert!(!sel.matches(&labels(&[
            ("role", "worker"),
            ("zone", "a"),
            ("pool", "x"),
            ("tier", "db")
        ])));
        assert!(!sel.matches(&labels(&[("role", "worker"), ("zone", "a")])));
    }

    #[test]
    fn malformed_expressions_are_errors() {
        for bad in [
            expr("a", "In", &[]),
            expr("a", "Exists", &["x"]),
            expr("a", "Like", &["x"]),
        ] {
            let sel = LabelSelector {
                match_expressions: Some(vec![bad]),
                ..Default::default()
            };
            assert!(Selector::compile(&sel).is_err());
        }
    }
}
