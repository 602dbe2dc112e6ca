//! Alertmanager silences for disrupted nodes (`spec.health.alertmanager`), decided
//! here and carried out by the operator. Alertmanager holds the state: each silence
//! baton makes names its policy and node in its comment, so a new leader finds them.
//!
//! - A node in flight (granted, draining, rebooting, verifying) holds a silence that
//!   ends [`HOLD`] ahead; it is extended once less than half of that is left.
//! - A node that is done (uncordoned, settling, released) keeps it until `extra` from
//!   then: a longer silence is shortened once, never extended.
//! - A node that fails has its silence expired at once, so that its alerts page.

use jiff::{SignedDuration, Timestamp};

use crate::plan::{Action, Skip};

/// How far ahead a node in flight is silenced; it is extended at half of it.
pub const HOLD: SignedDuration = SignedDuration::from_mins(15);

/// Who baton's silences are created by.
pub const CREATED_BY: &str = "baton";

/// One matcher of a silence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// The label.
    pub name: String,
    /// The value or regular expression; in a template, `{{node}}` stands for the node.
    pub value: String,
    /// `=~` or `!~`.
    pub is_regex: bool,
    /// `=` or `=~` (not `!=` or `!~`).
    pub is_equal: bool,
}

impl Matcher {
    /// Parses `label=value`, `label!=value`, `label=~regex` or `label!~regex`; the value
    /// may be double-quoted.
    pub fn parse(text: &str) -> Result<Matcher, String> {
        let at = text.find(['=', '!']).ok_or_else(|| {
            format!("{text:?}: expected label=value, label!=value, label=~regex or label!~regex")
        })?;
        let (name, rest) = text.split_at(at);
        let (op, value) = ["=~", "!~", "!=", "="]
            .iter()
            .find_map(|op| rest.strip_prefix(op).map(|v| (*op, v)))
            .ok_or_else(|| format!("{text:?}: expected an operator =, !=, =~ or !~"))?;
        let valid_name = name
            .chars()
            .enumerate()
            .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
        if name.is_empty() || !valid_name {
            return Err(format!("{text:?}: {name:?} is not a label name"));
        }
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if value.is_empty() {
            return Err(format!("{text:?}: the value is empty"));
        }
        let m = Matcher {
            name: name.to_string(),
            value: value.to_string(),
            is_regex: op.ends_with('~'),
            is_equal: !op.starts_with('!'),
        };
        if m.is_regex {
            regex::Regex::new(&m.for_node("node-0").value)
                .map_err(|e| format!("{text:?}: not a regular expression: {e}"))?;
        }
        Ok(m)
    }

    /// This matcher for `node`: `{{node}}` replaced by its name, escaped in a regex.
    pub fn for_node(&self, node: &str) -> Matcher {
        let name = if self.is_regex {
            regex::escape(node)
        } else {
            node.to_string()
        };
        Matcher {
            value: self.value.replace("{{node}}", &name),
            ..self.clone()
        }
    }
}

/// What a policy's silences need, parsed from its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SilenceRules {
    /// The Alertmanager base URL.
    pub url: String,
    /// The matchers, as templates.
    pub matchers: Vec<Matcher>,
    /// How long a silence outlasts the node's update.
    pub extra: SignedDuration,
}

/// What a node's silence should be, from the action the plan has for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// In flight: silenced, [`HOLD`] ahead.
    Hold,
    /// Done: silenced until `extra` from now, at most.
    Ending,
    /// Failed: no silence.
    Expire,
}

/// The intent for a node the plan gives `action`; `None` leaves its silence alone.
pub fn intent(action: &Action) -> Option<Intent> {
    match action {
        Action::Grant { .. }
        | Action::Cordon
        | Action::RunBeforeHooks { .. }
        | Action::Drain { .. }
        | Action::DrainTimedOut(_)
        | Action::AllowReboot { .. }
        | Action::MoveLeader { .. }
        | Action::WaitForEtcd { .. }
        | Action::WaitForReboot { .. }
        | Action::RunAfterHooks { .. } => Some(Intent::Hold),
        Action::Finish { .. } | Action::Settle { .. } | Action::Release(_) => Some(Intent::Ending),
        Action::Fail { .. } | Action::Abort { .. } | Action::Skip(Skip::Failed(_)) => {
            Some(Intent::Expire)
        }
        // Publishing a release to a node disrupts nothing.
        Action::Publish { .. } | Action::ClearStaleGrant | Action::Skip(_) => None,
    }
}

/// Every node's intent from a plan's actions, once per node (a plan may hold several
/// actions for one node, such as publishing its release and granting it): a failure
/// wins over being in flight, which wins over being done.
pub fn intents<'a>(
    actions: impl IntoIterator<Item = (&'a str, &'a Action)>,
) -> Vec<(String, Intent)> {
    let rank = |i: Intent| match i {
        Intent::Expire => 2,
        Intent::Hold => 1,
        Intent::Ending => 0,
    };
    let mut by_node: std::collections::BTreeMap<String, Intent> = std::collections::BTreeMap::new();
    for (node, action) in actions {
        if let Some(new) = intent(action) {
            let slot = by_node.entry(node.to_string()).or_insert(new);
            if rank(new) > rank(*slot) {
                *slot = new;
            }
        }
    }
    by_node.into_iter().collect()
}

/// A silence baton made, as Alertmanager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Its id.
    pub id: String,
    /// The policy and node its comment names.
    pub policy: String,
    /// The node.
    pub node: String,
    /// When it started: an update keeps it, or Alertmanager replaces the silence
    /// with a new one.
    pub starts_at: Timestamp,
    /// When it ends.
    pub ends_at: Timestamp,
    /// Whether it is active or pending (not expired).
    pub live: bool,
}

/// One change to make in Alertmanager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a silence for `node` until `ends_at`.
    Create {
        /// The node.
        node: String,
        /// Its end.
        ends_at: Timestamp,
    },
    /// Move the end of silence `id` (of `node`, started at `starts_at`) to `ends_at`.
    Update {
        /// The silence.
        id: String,
        /// The node.
        node: String,
        /// Its start, unchanged.
        starts_at: Timestamp,
        /// Its new end.
        ends_at: Timestamp,
    },
    /// Expire silence `id` (of `node`) now.
    Expire {
        /// The silence.
        id: String,
        /// The node.
        node: String,
    },
}

/// The comment of a silence for `node` under `policy`; [`parse_comment`] reads it back.
pub fn comment(policy: &str, node: &str) -> String {
    format!("baton/{policy}/{node}: node {node} is being updated by UpdatePolicy {policy}")
}

/// The policy and node a comment made by [`comment`] names.
pub fn parse_comment(text: &str) -> Option<(String, String)> {
    let head = text.strip_prefix("baton/")?.split(':').next()?;
    let (policy, node) = head.split_once('/')?;
    Some((policy.to_string(), node.to_string()))
}

/// The changes that bring `policy`'s silences (`existing`, every silence baton made) to
/// `intents` at `now`.
pub fn ops(
    policy: &str,
    intents: &[(String, Intent)],
    existing: &[Existing],
    extra: SignedDuration,
    now: Timestamp,
) -> Vec<Op> {
    let later = |d: SignedDuration| now.checked_add(d).unwrap_or(now);
    let mut out = Vec::new();
    for (node, intent) in intents {
        let live = existing
            .iter()
            .filter(|e| e.live && e.policy == policy && e.node == *node)
            .max_by_key(|e| e.ends_at);
        match (intent, live) {
            (Intent::Hold, None) => out.push(Op::Create {
                node: node.clone(),
                ends_at: later(HOLD),
            }),
            (Intent::Hold, Some(e)) if e.ends_at.duration_since(now) < HOLD / 2 => {
                out.push(Op::Update {
                    id: e.id.clone(),
                    node: node.clone(),
                    starts_at: e.starts_at,
                    ends_at: later(HOLD),
                })
            }
            (Intent::Ending, Some(e)) if e.ends_at > later(extra) => out.push(Op::Update {
                id: e.id.clone(),
                node: node.clone(),
                starts_at: e.starts_at,
                ends_at: later(extra),
            }),
            (Intent::Expire, Some(e)) => out.push(Op::Expire {
                id: e.id.clone(),
                node: node.clone(),
            }),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn matchers_parse_and_take_the_node_escaped_in_a_regex() {
        let m = Matcher::parse(r#"instance=~"{{node}}:.*""#).unwrap();
        assert!(m.is_regex && m.is_equal);
        assert_eq!(m.for_node("node-1.example").value, r"node\-1\.example:.*");
        let m = Matcher::parse("node={{node}}").unwrap();
        assert_eq!(m.for_node("node-1.example").value, "node-1.example");
        assert!(!Matcher::parse("severity!=page").unwrap().is_equal);
        for bad in ["=x", "9x=y", "x", "x=", "x=~(", "x~y"] {
            assert!(Matcher::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_is_silenced_in_flight_extended_at_half_shortened_when_done_and_expired_on_failure() {
        let now = at("2026-12-01T10:00:00Z");
        let extra = SignedDuration::from_mins(10);
        let hold = |n: &str| (n.to_string(), Intent::Hold);
        assert_eq!(
            ops("p", &[hold("a")], &[], extra, now),
            [Op::Create {
                node: "a".into(),
                ends_at: at("2026-12-01T10:15:00Z")
            }]
        );
        let silence = |ends: &str| Existing {
            id: "s1".into(),
            policy: "p".into(),
            node: "a".into(),
            starts_at: at("2026-12-01T09:50:00Z"),
            ends_at: at(ends),
            live: true,
        };
        // More than half left: nothing; less: extended.
        assert!(
            ops(
                "p",
                &[hold("a")],
                &[silence("2026-12-01T10:10:00Z")],
                extra,
                now
            )
            .is_empty()
        );
        assert_eq!(
            ops(
                "p",
                &[hold("a")],
                &[silence("2026-12-01T10:05:00Z")],
                extra,
                now
            ),
            [Op::Update {
                id: "s1".into(),
                node: "a".into(),
                starts_at: at("2026-12-01T09:50:00Z"),
                ends_at: at("2026-12-01T10:15:00Z")
            }]
        );
        // Done: shortened to extra once, then left to run out.
        let ending = [("a".to_string(), Intent::Ending)];
        assert_eq!(
            ops("p", &ending, &[silence("2026-12-01T10:14:00Z")], extra, now),
            [Op::Update {
                id: "s1".into(),
                node: "a".into(),
                starts_at: at("2026-12-01T09:50:00Z"),
                ends_at: at("2026-12-01T10:10:00Z")
            }]
        );
        assert!(ops("p", &ending, &[silence("2026-12-01T10:09:00Z")], extra, now).is_empty());
        // Failed: expired; another policy's silence is not ours.
        let failed = [("a".to_string(), Intent::Expire)];
        assert_eq!(
            ops("p", &failed, &[silence("2026-12-01T10:14:00Z")], extra, now),
            [Op::Expire {
                id: "s1".into(),
                node: "a".into()
            }]
        );
        assert!(ops("q", &failed, &[silence("2026-12-01T10:14:00Z")], extra, now).is_empty());
    }

    #[test]
    fn one_intent_per_node_and_publishing_is_no_disruption() {
        let publish = Action::Publish {
            version: crds::protocol::Version::new("2").unwrap(),
            release: None,
        };
        let grant = Action::Grant {
            boot_id: crds::protocol::BootId::new("b1").unwrap(),
            target_version: None,
            drain: true,
            after: None,
        };
        let fail = Action::Fail { reason: "x".into() };
        assert_eq!(
            intents([
                ("a", &publish),
                ("a", &grant),
                ("b", &publish),
                (
                    "c",
                    &Action::Finish {
                        uncordon: false,
                        release: false
                    }
                ),
                ("c", &fail)
            ]),
            [
                ("a".to_string(), Intent::Hold),
                ("c".to_string(), Intent::Expire)
            ]
        );
    }

    #[test]
    fn comments_name_policy_and_node() {
        let c = comment("night", "node-7");
        assert_eq!(parse_comment(&c), Some(("night".into(), "node-7".into())));
        assert_eq!(parse_comment("maintenance by alice"), None);
    }
}
