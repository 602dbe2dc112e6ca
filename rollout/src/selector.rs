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
        let mut reqs = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            check_key(k)?;
            check_value(k, v)?;
            reqs.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for expr in selector.match_expressions.iter().flatten() {
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            check_key(&key)?;
            for v in &values {
                check_value(&key, v)?;
            }
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

    /// The selector in the API server's query syntax (`labelSelector=`), such as
    /// `app=db,tier notin (test)`. An empty selector is an empty string.
    pub fn to_query(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|req| match req {
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", vs[0]),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        parts.join(",")
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

/// A label key as the API server accepts it: an optional DNS-subdomain prefix and `/`,
/// then a name of 1 to 63 alphanumerics, `-`, `_` or `.`, alphanumeric at both ends.
fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = |why: &str| {
        Err(SelectorError(format!(
            "label key {key:?} is invalid: {why}"
        )))
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.is_empty() || p.len() > 253 || !p.split('.').all(label_ok) {
            return bad("the prefix must be a DNS subdomain such as example.com");
        }
    }
    if !name_ok(name) || name.is_empty() {
        return bad(
            "the name must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        );
    }
    Ok(())
}

/// A label value: empty, or what [`check_key`] accepts as a name.
fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || name_ok(value) {
        return Ok(());
    }
    Err(SelectorError(format!(
        "label value {value:?} of {key:?} is invalid: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    )))
}

fn name_ok(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    name.len() <= 63
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
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
    fn a_selector_renders_in_the_api_servers_query_syntax() {
        let sel = Selector::compile(&LabelSelector {
            match_labels: Some(labels(&[("app", "db")])),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("tier", "NotIn", &["test"]),
                expr("example.com/pool", "Exists", &[]),
                expr("gpu", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        assert_eq!(
            sel.to_query(),
            "app=db,zone in (a,b),tier notin (test),example.com/pool,!gpu"
        );
    }

    #[test]
    fn malformed_expressions_are_errors() {
        for bad in [
            expr("a", "In", &[]),
            expr("a", "Exists", &["x"]),
            expr("a", "Like", &["x"]),
            expr("app name", "Exists", &[]),
            expr("a", "In", &["x y"]),
            expr("Example.com/a", "Exists", &[]),
            expr("-a", "Exists", &[]),
        ] {
            let sel = LabelSelector {
                match_expressions: Some(vec![bad]),
                ..Default::default()
            };
            assert!(Selector::compile(&sel).is_err());
        }
    }
}
