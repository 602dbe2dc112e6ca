//! `kubectl baton status`: per policy its progress and one row per node with its
//! combined state (operator and agent), version, lease and cordon, from what the
//! cluster holds. Pure: the caller fetches (or watches) and prints.
//!
//! [`report`] builds the [`Report`] (`-o json|yaml` prints it as is; its schema is in
//! docs/kubectl-baton.md); [`table`] draws it for humans.

use std::{collections::BTreeMap, fmt::Write};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::ResourceExt;
use serde::Serialize;

use crds::{UpdatePolicy, node::NodeMarks, policy::condition};
use rollout::{Action, NodeView, Policy, Snapshot, phase::Phase, why};

/// The width of the progress bar.
const BAR: usize = 30;

/// The `apiVersion` of `-o json|yaml` output; it changes only when a field's meaning
/// does (fields may be added).
pub const REPORT_VERSION: &str = "kubectl.baton.dev/v1alpha1";

/// What `kubectl baton status` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub api_version: &'static str,
    /// `Status`.
    pub kind: &'static str,
    /// When it was taken.
    pub time: Timestamp,
    /// One per policy, by name.
    pub policies: Vec<PolicyReport>,
}

/// One policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// The UpdatePolicy.
    pub name: String,
    /// Nodes it selects.
    pub nodes: u32,
    /// Nodes on the target version with nothing left to do.
    pub up_to_date: u32,
    /// Nodes between grant and release.
    pub in_progress: u32,
    /// Nodes that need an update and have not started.
    pub waiting: u32,
    /// Nodes marked failed.
    pub failed: u32,
    /// `Open`, `Closed` or `Always`; absent before the operator's first status.
    pub window: Option<String>,
    /// When the next window opens, in its own time zone, while closed.
    pub next_window: Option<String>,
    /// `spec.paused`.
    pub paused: bool,
    /// Its true conditions that call for attention (Halted, Paused, InvalidSpec,
    /// Overlapping, GateClosed), as `Type: message`.
    pub problems: Vec<String>,
    /// Its nodes, by name.
    pub node_rows: Vec<NodeLine>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLine {
    /// The node.
    pub name: String,
    /// The combined phase ([`Phase`]).
    pub phase: String,
    /// Why a waiting node waits (`window closed`, `budget 1/1 in use`, …), if it does.
    pub waiting_for: Option<String>,
    /// `baton.dev/state`, the agent's own state.
    pub agent_state: Option<String>,
    /// `baton.dev/current-version`.
    pub version: Option<String>,
    /// `baton.dev/target-version`, or the desired one.
    pub target: Option<String>,
    /// When its reboot Lease was acquired, if it holds one (`held` without a time).
    pub lease_since: Option<Timestamp>,
    /// Whether it holds a reboot Lease.
    pub lease_held: bool,
    /// `baton`, `admin` (someone else cordoned it) or absent.
    pub cordoned_by: Option<String>,
    /// The operator's failure, or the agent's message.
    pub message: String,
}

impl NodeLine {
    /// `Phase`, or `Waiting: reason`.
    pub fn state(&self) -> String {
        match &self.waiting_for {
            Some(why) => format!("{}: {why}", self.phase),
            None => self.phase.clone(),
        }
    }

    /// The lease column at `now`: `held 42s`, `held 3m`, `held` or `-`.
    pub fn lease(&self, now: Timestamp) -> String {
        match (self.lease_held, self.lease_since) {
            (false, _) => "-".into(),
            (true, None) => "held".into(),
            (true, Some(at)) => {
                let secs = now.duration_since(at).as_secs().max(0);
                match secs {
                    0..60 => format!("held {secs}s"),
                    60..3600 => format!("held {}m", secs / 60),
                    _ => format!("held {}h{}m", secs / 3600, secs % 3600 / 60),
                }
            }
        }
    }
}

/// Why each waiting node of `policy` waits, from the real decision core: `decide` over
/// the same objects the operator reads (`blocking`: node to the pod that blocks it),
/// at `now`. Node name to (short reason, the reason in words).
pub fn reasons(
    policy: &UpdatePolicy,
    policies: &[UpdatePolicy],
    nodes: &[Node],
    leases: &[Lease],
    blocking: &BTreeMap<String, String>,
    now: Timestamp,
) -> BTreeMap<String, (String, String)> {
    let Ok(rules) = Policy::from_spec(&policy.name_any(), &policy.spec) else {
        return BTreeMap::new();
    };
    let (mut snapshot, _) = Snapshot::from_objects(nodes, leases, policies, &rules.name, None);
    reported(policy, &mut snapshot);
    snapshot.mark_blocked(blocking);
    let plan = rollout::decide(&snapshot, &rules, now);
    plan.nodes
        .iter()
        .filter_map(|n| {
            let short = match &n.action {
                Action::Skip(skip) if why::is_waiting(skip) => why::label(skip).replace('_', " "),
                a if a.is_grant() => "next in line".to_string(),
                _ => return None,
            };
            let words = why::action(&n.node, &plan, &rules, now).unwrap_or_default();
            Some((n.node.clone(), (short, words)))
        })
        .collect()
}

/// The rows for `nodes`, with `leases` (baton's reboot Leases); waiting nodes wait for
/// `waiting_for`.
pub fn lines(
    nodes: &[&Node],
    leases: &[Lease],
    reasons: &BTreeMap<String, (String, String)>,
) -> Vec<NodeLine> {
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
            let lease = held.get(&m.name).copied();
            let phase = Phase::of(&NodeView::from_marks(m.clone()), lease.is_some());
            let reason = reasons
                .get(&m.name)
                .filter(|_| matches!(phase, Phase::Waiting | Phase::Paused));
            NodeLine {
                phase: phase.to_string(),
                waiting_for: reason
                    .filter(|_| phase == Phase::Waiting)
                    .map(|(short, _)| short.clone()),
                agent_state: m.agent.state.map(|s| s.to_string()),
                version: m.agent.current_version.map(|v| v.to_string()),
                target: m
                    .agent
                    .target_version
                    .or(m.desired_version)
                    .map(|v| v.to_string()),
                lease_since: lease.flatten(),
                lease_held: lease.is_some(),
                cordoned_by: match (m.unschedulable, m.cordoned) {
                    (true, true) => Some("baton".into()),
                    (true, false) => Some("admin".into()),
                    (false, _) => None,
                },
                message: m
                    .failure
                    .map(|f| format!("failed: {f}"))
                    .or_else(|| reason.map(|(_, words)| words.clone()))
                    .or(m.agent.message)
                    .unwrap_or_default(),
                name: m.name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A progress bar of `done` out of `total` (`total` > 0).
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

/// The report on every policy (or only `only`), each with its nodes.
/// `blocking` maps a node to the pod that blocks it (`health.blockingPodSelectors`),
/// when the caller listed them.
pub fn report(
    policies: &[UpdatePolicy],
    nodes: &[Node],
    leases: &[Lease],
    blocking: &BTreeMap<String, String>,
    only: Option<&str>,
    now: Timestamp,
) -> Report {
    let mut out: Vec<PolicyReport> = policies
        .iter()
        .filter(|p| only.is_none_or(|o| p.name_any() == o))
        .map(|policy| {
            let status = policy.status.clone().unwrap_or_default();
            let problems = status
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
            let selected: Vec<&Node> =
                match rollout::selector::Selector::compile(&policy.spec.node_selector) {
                    Ok(sel) => nodes.iter().filter(|n| sel.matches(n.labels())).collect(),
                    Err(_) => Vec::new(),
                };
            PolicyReport {
                name: policy.name_any(),
                nodes: status.nodes,
                up_to_date: status.up_to_date,
                in_progress: status.in_progress,
                waiting: status.waiting,
                failed: status.failed,
                window: status.window.clone(),
                next_window: status.next_window_local.clone(),
                paused: policy.spec.paused,
                problems,
                node_rows: lines(
                    &selected,
                    leases,
                    &reasons(policy, policies, nodes, leases, blocking, now),
                ),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Report {
        api_version: REPORT_VERSION,
        kind: "Status",
        time: now,
        policies: out,
    }
}

/// A policy's heading line.
pub fn heading(p: &PolicyReport) -> String {
    let window = match (&p.window, &p.next_window) {
        (Some(w), Some(next)) => format!("{w} (opens {next})"),
        (Some(w), None) => w.clone(),
        (None, _) => "-".into(),
    };
    if p.node_rows.is_empty() && p.nodes == 0 {
        return format!(
            "POLICY {}  no node matches its nodeSelector  window {window}",
            p.name
        );
    }
    format!(
        "POLICY {}  {} updated {}/{}  in progress {}  failed {}  window {window}",
        p.name,
        bar(p.up_to_date, p.nodes),
        p.up_to_date,
        p.nodes,
        p.in_progress,
        p.failed,
    )
}

/// The STATE column's width: its longest state, at least as wide as `Releasing`.
pub fn state_width(rows: &[NodeLine]) -> usize {
    rows.iter()
        .map(|r| r.state().chars().count())
        .max()
        .unwrap_or(0)
        .max(10)
}

/// The header of the node rows, for a STATE column `state_width` wide.
pub fn header(state_width: usize) -> String {
    format!(
        "  {:<24} {:<state_width$} {:<12} {:<12} {:<10} {:<9} MESSAGE",
        "NODE", "STATE", "VERSION", "TARGET", "LEASE", "CORDONED"
    )
}

/// One node's row at `now` with a STATE column `state_width` wide, its message
/// wrapped to `width` columns when given (the continuation lines start under MESSAGE).
pub fn row(r: &NodeLine, now: Timestamp, width: Option<usize>, state_width: usize) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let head = format!(
        "  {:<24} {:<state_width$} {:<12} {:<12} {:<10} {:<9} ",
        r.name,
        r.state(),
        dash(&r.version),
        dash(&r.target),
        r.lease(now),
        dash(&r.cordoned_by),
    );
    let indent = head.chars().count();
    let room = width
        .map(|w| w.saturating_sub(indent))
        .filter(|room| *room >= 20);
    let Some(room) = room else {
        return format!("{head}{}", r.message).trim_end().to_string();
    };
    let mut out = String::new();
    for (i, line) in textwrap::wrap(&r.message, room).iter().enumerate() {
        if i == 0 {
            out.push_str(&head);
        } else {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(line);
    }
    if out.is_empty() {
        out = head.trim_end().to_string();
    }
    out
}

/// The report as tables for humans, messages wrapped to `width` when given.
pub fn table(report: &Report, width: Option<usize>) -> String {
    let mut out = String::new();
    for p in &report.policies {
        let _ = writeln!(out, "{}", heading(p));
        for problem in &p.problems {
            let _ = writeln!(out, "  ! {problem}");
        }
        let state_width = state_width(&p.node_rows);
        if !p.node_rows.is_empty() {
            let _ = writeln!(out, "{}", header(state_width));
        }
        for r in &p.node_rows {
            let _ = writeln!(out, "{}", row(r, report.time, width, state_width));
        }
        out.push('\n');
    }
    if report.policies.is_empty() {
        out.push_str("no UpdatePolicy yet: nothing is rolled out\n");
    }
    out
}

/// [`report`] then [`table`], unwrapped: the one-shot text.
pub fn render(
    policies: &[UpdatePolicy],
    nodes: &[Node],
    leases: &[Lease],
    only: Option<&str>,
    now: Timestamp,
) -> String {
    table(
        &report(policies, nodes, leases, &BTreeMap::new(), only, now),
        None,
    )
}

/// What only the operator can see, as it reports it in `policy`'s conditions: the
/// alert gate (`GateClosed`) and the etcd quorum guard (`EtcdHeld`).
pub fn reported(policy: &UpdatePolicy, snapshot: &mut Snapshot) {
    let held = |type_: &str| {
        policy.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == "True")
                .map(|c| c.message.clone())
        })
    };
    snapshot.gate = held(condition::GATE_CLOSED);
    if let Some(why) = held(condition::ETCD_HELD) {
        snapshot.etcd = rollout::etcd::Etcd::Reported(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::protocol::{self as p, lease};

    /// An annotations object from protocol keys.
    fn marks(pairs: &[(&str, &str)]) -> serde_json::Value {
        serde_json::Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect(),
        )
    }

    fn node(name: &str, annotations: serde_json::Value, unschedulable: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"pool": "a"}, "annotations": annotations},
            "spec": {"unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    }

    fn policy(spec: serde_json::Value, status: serde_json::Value) -> UpdatePolicy {
        let mut spec = spec;
        spec["nodeSelector"] = serde_json::json!({"matchLabels": {"pool": "a"}});
        serde_json::from_value(serde_json::json!({
            "kind": "UpdatePolicy", "metadata": {"name": "workers"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    /// n1 done, n2 granted and draining, n3 waiting for a reboot.
    fn cluster() -> (Vec<Node>, Lease) {
        let nodes = vec![
            node(
                "n1",
                marks(&[
                    (p::STATE.name, "Done"),
                    (p::CURRENT_VERSION.name, "2.0.0"),
                    (p::BOOT_ID.name, "a1"),
                ]),
                false,
            ),
            node(
                "n2",
                marks(&[
                    (p::STATE.name, "RebootRequired"),
                    (p::REBOOT_REQUIRED.name, "true"),
                    (p::BOOT_ID.name, "b2"),
                    (p::CURRENT_VERSION.name, "1.0.0"),
                    (p::TARGET_VERSION.name, "2.0.0"),
                    (p::CORDONED.name, "true"),
                    (
                        p::MESSAGE.name,
                        "staged 2.0.0 into USR-B; the reboot waits for a grant from the operator, which decides by window and budget",
                    ),
                ]),
                true,
            ),
            node(
                "n3",
                marks(&[
                    (p::STATE.name, "RebootRequired"),
                    (p::REBOOT_REQUIRED.name, "true"),
                    (p::BOOT_ID.name, "c3"),
                    (p::CURRENT_VERSION.name, "1.0.0"),
                    (p::DESIRED_VERSION.name, "2.0.0"),
                ]),
                false,
            ),
        ];
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "baton-reboot-n2", "annotations": marks(&[(lease::POLICY.name, "workers"), (lease::GRANTED_BOOT_ID.name, "b2")])},
            "spec": {"holderIdentity": "n2", "acquireTime": "2026-11-26T10:00:00.000000Z"},
        }))
        .unwrap();
        (nodes, lease)
    }

    fn row_of<'a>(text: &'a str, node: &str) -> &'a str {
        text.lines()
            .find(|l| l.trim_start().starts_with(node))
            .unwrap()
    }

    #[test]
    fn a_rollout_in_progress_reads_at_a_glance_with_the_deciding_reasons() {
        let p = policy(
            serde_json::json!({}),
            serde_json::json!({"nodes": 3, "upToDate": 1, "inProgress": 1, "failed": 0, "window": "Always",
                       "conditions": [{"type": "Halted", "status": "False", "reason": "x", "message": "m", "lastTransitionTime": "2026-11-26T10:00:00Z"}]}),
        );
        let (nodes, lease) = cluster();
        let text = render(
            &[p],
            &nodes,
            &[lease],
            None,
            "2026-11-26T10:00:42Z".parse().unwrap(),
        );
        assert!(text.starts_with("POLICY workers  [##########--------------------]  33% updated 1/3  in progress 1  failed 0  window Always"), "{text}");
        let n2 = row_of(&text, "n2");
        assert!(
            n2.contains("Draining") && n2.contains("held 42s") && n2.contains("baton"),
            "a node holding a Lease and cordoned by baton drains, whatever its agent says: {n2}"
        );
        assert!(
            n2.contains("decides by window and budget"),
            "messages are not cut when unwrapped: {n2}"
        );
        let n3 = row_of(&text, "n3");
        assert!(
            n3.contains("Waiting: budget") && n3.contains("budget 1/1 in use by n2"),
            "the reason from decide, naming the holder: {n3}"
        );
        assert!(
            !text.contains("! Halted"),
            "only true conditions are flagged"
        );
    }

    #[test]
    fn a_closed_window_and_a_halt_are_the_reasons_decide_gives() {
        let (mut nodes, _) = cluster();
        let windows = serde_json::json!({"maintenanceWindows": [
            {"weekdays": ["Sat"], "start": "02:00", "duration": "4h", "timeZone": "Europe/Berlin"}]});
        let closed = policy(
            windows,
            serde_json::json!({"nodes": 3, "window": "Closed", "nextWindowLocal": "2026-12-05 02:00 Europe/Berlin"}),
        );
        let now: Timestamp = "2026-12-01T09:00:00Z".parse().unwrap();
        let r = report(&[closed], &nodes, &[], &BTreeMap::new(), None, now);
        let n3 = &r.policies[0].node_rows[2];
        assert_eq!(n3.state(), "Waiting: outside window");
        assert_eq!(
            n3.message,
            "outside the window; next opens Sat 2026-12-05 02:00 Europe/Berlin (in 3d 16h)"
        );
        assert!(
            heading(&r.policies[0])
                .ends_with("window Closed (opens 2026-12-05 02:00 Europe/Berlin)")
        );

        nodes.push(node(
            "n4",
            marks(&[
                (p::STATE.name, "RolledBack"),
                (p::BOOT_ID.name, "d4"),
                (p::FAILURE.name, "booted the old slot"),
            ]),
            true,
        ));
        let halted = policy(
            serde_json::json!({}),
            serde_json::json!({"nodes": 4, "window": "Always",
            "conditions": [{"type": "Halted", "status": "True", "reason": "NodeFailed", "message": "n4 failed", "lastTransitionTime": "2026-11-26T10:00:00Z"}]}),
        );
        let r = report(&[halted], &nodes, &[], &BTreeMap::new(), None, now);
        let n3 = &r.policies[0].node_rows[2];
        assert_eq!(n3.state(), "Waiting: halted");
        assert!(
            n3.message.starts_with("pool halted: ")
                && n3.message.ends_with("(kubectl baton retry)"),
            "{}",
            n3.message
        );
        assert_eq!(r.policies[0].problems, ["Halted: n4 failed"]);
        assert_eq!(r.policies[0].node_rows[3].phase, "Failed");
    }

    #[test]
    fn a_blocking_pod_is_named() {
        let (nodes, _) = cluster();
        let p = policy(
            serde_json::json!({"health": {"blockingPodSelectors": [{"matchLabels": {"app": "db"}}]}}),
            serde_json::json!({"nodes": 3}),
        );
        let blocking = BTreeMap::from([("n3".to_string(), "pod backup/db-0".to_string())]);
        let r = report(&[p], &nodes, &[], &blocking, None, Timestamp::UNIX_EPOCH);
        let n3 = &r.policies[0].node_rows[2];
        assert_eq!(n3.state(), "Waiting: blocked");
        assert_eq!(n3.message, "blocked by pod backup/db-0");
    }

    #[test]
    fn long_messages_wrap_under_their_column() {
        let (nodes, lease) = cluster();
        let p = policy(
            serde_json::json!({}),
            serde_json::json!({"nodes": 3, "window": "Always"}),
        );
        let r = report(
            &[p],
            &nodes,
            &[lease],
            &BTreeMap::new(),
            None,
            Timestamp::UNIX_EPOCH,
        );
        let text = row(&r.policies[0].node_rows[1], r.time, Some(140), 26);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 1, "{text}");
        for l in &lines {
            assert!(l.chars().count() <= 140, "{l:?}");
        }
        let column = lines[0].find("staged").unwrap();
        assert!(lines[1].starts_with(&" ".repeat(column)), "{text}");
        assert!(!lines[1][column..].starts_with(' '), "{text}");
        assert_eq!(
            lines
                .iter()
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
                .split_once("staged")
                .map(|(_, m)| m.to_string()),
            Some(" 2.0.0 into USR-B; the reboot waits for a grant from the operator, which decides by window and budget".to_string())
        );
    }

    #[test]
    fn an_empty_pool_says_so_instead_of_a_full_bar() {
        let p = policy(
            serde_json::json!({}),
            serde_json::json!({"nodes": 0, "window": "Always"}),
        );
        let text = render(&[p], &[], &[], None, Timestamp::UNIX_EPOCH);
        assert!(
            text.starts_with("POLICY workers  no node matches its nodeSelector  window Always"),
            "{text}"
        );
        assert!(!text.contains("100%"), "{text}");
    }

    #[test]
    fn the_report_is_json_with_a_version() {
        let (nodes, lease) = cluster();
        let p = policy(
            serde_json::json!({}),
            serde_json::json!({"nodes": 3, "window": "Always"}),
        );
        let r = report(
            &[p],
            &nodes,
            &[lease],
            &BTreeMap::new(),
            None,
            Timestamp::UNIX_EPOCH,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["apiVersion"], REPORT_VERSION);
        assert_eq!(v["policies"][0]["nodeRows"][1]["phase"], "Draining");
        assert_eq!(v["policies"][0]["nodeRows"][1]["leaseHeld"], true);
        assert_eq!(v["policies"][0]["nodeRows"][1]["cordonedBy"], "baton");
        assert_eq!(v["policies"][0]["nodeRows"][2]["waitingFor"], "budget");
    }

    #[test]
    fn why_walks_the_gates_and_stops_at_decides_reason() {
        let (nodes, lease) = cluster();
        let p = policy(serde_json::json!({}), serde_json::json!({"nodes": 3}));
        let leases = [lease];
        let seen = crate::why::Observed {
            policies: std::slice::from_ref(&p),
            nodes: &nodes,
            leases: &leases,
            blocking: &BTreeMap::new(),
            now: "2026-11-26T10:00:42Z".parse().unwrap(),
        };
        let text =
            crate::why::render("n3", &seen, Some("2026-11-26T10:10:42Z".parse().unwrap())).unwrap();
        assert!(text.starts_with("node/n3  UpdatePolicy workers\n  phase     Waiting (agent: RebootRequired, 1.0.0 -> 2.0.0)\n  decision  budget 1/1 in use by n2\n"), "{text}");
        let stop: Vec<&str> = text.lines().filter(|l| l.contains("STOP")).collect();
        assert_eq!(stop.len(), 1, "{text}");
        assert!(
            stop[0].contains("budget") && stop[0].ends_with("<- the reason"),
            "{text}"
        );
        assert!(
            text.contains("Goes when: a node in flight finishing"),
            "{text}"
        );
        assert!(
            text.contains("Predicted start: 2026-11-26 10:10 UTC (in 10m;"),
            "{text}"
        );
        let text = crate::why::render("n2", &seen, None).unwrap();
        assert!(text.contains("phase     Draining"), "{text}");
        assert!(matches!(
            crate::why::render("nosuch", &seen, None),
            Err(crate::Error::NotFound { kind: "node", .. })
        ));
    }

    #[test]
    fn bars_are_bounded() {
        assert_eq!(bar(0, 0), format!("[{}] 100%", "-".repeat(BAR)));
        assert_eq!(bar(5, 5), format!("[{}] 100%", "#".repeat(BAR)));
    }
}
