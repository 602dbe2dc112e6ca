//! `kubectl baton status`: per policy, a progress bar and one line per node with its
//! state, version, lease and cordon, from what the cluster holds. Pure: the caller
//! fetches (or watches) and prints.

use std::{collections::BTreeMap, fmt::Write};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::ResourceExt;

use crds::{UpdatePolicy, node::NodeMarks, policy::condition};
use rollout::selector::Selector;

/// The width of the progress bar.
const BAR: usize = 30;

/// One node's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    /// The node.
    pub name: String,
    /// `baton.dev/state`, or `-`.
    pub state: String,
    /// `baton.dev/current-version`, or `-`.
    pub version: String,
    /// `baton.dev/target-version` (or the desired one), or `-`.
    pub target: String,
    /// The lease's age, or `-`.
    pub lease: String,
    /// Cordoned, and by whom.
    pub cordoned: String,
    /// The agent's message or the operator's failure.
    pub message: String,
}

/// The lines for `nodes`, with `leases` (baton's reboot Leases) at `now`.
pub fn lines(nodes: &[&Node], leases: &[Lease], now: Timestamp) -> Vec<NodeLine> {
    let held: BTreeMap<String, Option<Timestamp>> = leases
        .iter()
        .filter_map(|l| {
            let spec = l.spec.as_ref()?;
            Some((
                spec.holder_identity.clone()?,
                spec.acquire_time.as_ref().map(|t| t.0),
            ))
        })
        .collect();
    let mut out: Vec<NodeLine> = nodes
        .iter()
        .map(|n| {
            let m = NodeMarks::read(n);
            let name = m.name.clone();
            let shown = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            NodeLine {
                state: shown(m.agent.state.map(|s| s.to_string())),
                version: shown(m.agent.current_version.map(|v| v.to_string())),
                target: shown(
                    m.agent
                        .target_version
                        .or(m.desired_version)
                        .map(|v| v.to_string()),
                ),
                lease: match held.get(&name) {
                    Some(Some(at)) => format!("held {}s", now.duration_since(*at).as_secs().max(0)),
                    Some(None) => "held".into(),
                    None => "-".into(),
                },
                cordoned: match (m.unschedulable, m.cordoned) {
                    (true, true) => "baton".into(),
                    (true, false) => "admin".into(),
                    (false, _) => "-".into(),
                },
                message: m
                    .failure
                    .map(|f| format!("failed: {f}"))
                    .or(m.agent.message)
                    .unwrap_or_default(),
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A progress bar of `done` out of `total`.
pub fn bar(done: u32, total: u32) -> String {
    let filled = (done as usize * BAR)
        .checked_div(total as usize)
        .unwrap_or(0)
        .min(BAR);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {percent:>3}%",
        "#".repeat(filled),
        "-".repeat(BAR - filled)
    )
}

/// Renders every policy (or only `only`), each with its nodes.
pub fn render(
    policies: &[UpdatePolicy],
    nodes: &[Node],
    leases: &[Lease],
    only: Option<&str>,
    now: Timestamp,
) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for policy in policies
        .iter()
        .filter(|p| only.is_none_or(|o| p.name_any() == o))
    {
        shown += 1;
        let name = policy.name_any();
        let status = policy.status.clone().unwrap_or_default();
        let true_conditions: Vec<String> = status
            .conditions
            .iter()
            .filter(|c| {
                c.status == "True"
                    && [
                        condition::HALTED,
                        condition::PAUSED,
                        condition::INVALID_SPEC,
                        condition::OVERLAPPING,
                        condition::GATE_CLOSED,
                    ]
                    .contains(&c.type_.as_str())
            })
            .map(|c| format!("{}: {}", c.type_, c.message))
            .collect();
        let _ = writeln!(
            out,
            "POLICY {name}  {} updated {}/{}  in progress {}  failed {}  window {}",
            bar(status.up_to_date, status.nodes),
            status.up_to_date,
            status.nodes,
            status.in_progress,
            status.failed,
            status.window.as_deref().unwrap_or("-"),
        );
        for c in &true_conditions {
            let _ = writeln!(out, "  ! {c}");
        }
        let selected: Vec<&Node> = match Selector::compile(&policy.spec.node_selector) {
            Ok(sel) => nodes.iter().filter(|n| sel.matches(n.labels())).collect(),
            Err(_) => Vec::new(),
        };
        let rows = lines(&selected, leases, now);
        let _ = writeln!(
            out,
            "  {:<24} {:<15} {:<12} {:<12} {:<10} {:<9} MESSAGE",
            "NODE", "STATE", "VERSION", "TARGET", "LEASE", "CORDONED"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "  {:<24} {:<15} {:<12} {:<12} {:<10} {:<9} {}",
                r.name,
                r.state,
                r.version,
                r.target,
                r.lease,
                r.cordoned,
                r.message.chars().take(80).collect::<String>()
            );
        }
        out.push('\n');
    }
    if shown == 0 {
        out.push_str(match only {
            Some(_) => "no such UpdatePolicy\n",
            None => "no UpdatePolicy yet: nothing is rolled out\n",
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, annotations: serde_json::Value, unschedulable: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"pool": "a"}, "annotations": annotations},
            "spec": {"unschedulable": unschedulable},
        }))
        .unwrap()
    }

    #[test]
    fn a_rollout_in_progress_reads_at_a_glance() {
        let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
            "spec": {"nodeSelector": {"matchLabels": {"pool": "a"}}},
            "status": {"nodes": 3, "upToDate": 1, "inProgress": 1, "failed": 0, "window": "Always",
                       "conditions": [{"type": "Halted", "status": "False", "reason": "x", "message": "m", "lastTransitionTime": "2026-11-26T10:00:00Z"}]},
        }))
        .unwrap();
        let nodes = vec![
            node(
                "n1",
                serde_json::json!({"baton.dev/state": "Done", "baton.dev/current-version": "2.0.0"}),
                false,
            ),
            node(
                "n2",
                serde_json::json!({"baton.dev/state": "Rebooting", "baton.dev/current-version": "1.0.0", "baton.dev/target-version": "2.0.0", "baton.dev/cordoned": "true"}),
                true,
            ),
            node(
                "n3",
                serde_json::json!({"baton.dev/state": "RebootRequired", "baton.dev/desired-version": "2.0.0"}),
                false,
            ),
        ];
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "baton-reboot-n2"}, "spec": {"holderIdentity": "n2", "acquireTime": "2026-11-26T10:00:00.000000Z"},
        }))
        .unwrap();
        let text = render(
            &[policy],
            &nodes,
            &[lease],
            None,
            "2026-11-26T10:00:42Z".parse().unwrap(),
        );
        assert!(text.starts_with("POLICY workers  [##########--------------------]  33% updated 1/3  in progress 1  failed 0  window Always"), "{text}");
        let n2 = text
            .lines()
            .find(|l| l.trim_start().starts_with("n2"))
            .unwrap();
        assert!(
            n2.contains("Rebooting") && n2.contains("held 42s") && n2.contains("baton"),
            "{n2}"
        );
        let n3 = text
            .lines()
            .find(|l| l.trim_start().starts_with("n3"))
            .unwrap();
        assert!(
            n3.contains("2.0.0"),
            "the desired version shows as the target: {n3}"
        );
        assert!(
            !text.contains("! Halted"),
            "only true conditions are flagged"
        );
    }

    #[test]
    fn bars_are_bounded() {
        assert_eq!(bar(0, 0), format!("[{}] 100%", "-".repeat(BAR)));
        assert_eq!(bar(5, 5), format!("[{}] 100%", "#".repeat(BAR)));
    }
}
