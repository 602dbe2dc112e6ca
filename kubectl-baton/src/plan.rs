//! `kubectl baton plan`: a what-if planner. It runs the real decision core over a model
//! of the cluster in which every selected node asks for an update, and prints when
//! each node would start, in which window, and when the rollout would end.

use std::{collections::BTreeMap, fmt::Write as _};

use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde::Serialize;

use crds::UpdatePolicy;
use rollout::{
    NodeView, Policy,
    simulate::{self, EventKind, World},
};

use crate::Error;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// When the simulated rollout starts.
    pub start: Timestamp,
    /// How far ahead to simulate.
    pub horizon: SignedDuration,
    /// How long a node takes from its reboot grant to back-and-healthy.
    pub reboot_time: SignedDuration,
    /// Per-node overrides of `reboot_time`.
    pub node_reboot_times: BTreeMap<String, SignedDuration>,
    /// The zone times are printed in.
    pub time_zone: TimeZone,
    /// The node the operator runs on, which goes last.
    pub operator_node: Option<String>,
}

#[derive(Debug, Default)]
struct Row {
    start: Option<Timestamp>,
    window: Option<usize>,
    end: Option<Timestamp>,
    failed: Option<String>,
}

/// The `apiVersion` of `kubectl baton plan -o json|yaml`.
pub const REPORT_VERSION: &str = "kubectl.baton.dev/v1alpha1";

/// A simulated rollout: what `-o json|yaml` prints (schema: docs/kubectl-baton.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// [`REPORT_VERSION`].
    pub api_version: &'static str,
    /// `Plan`.
    pub kind: &'static str,
    /// The UpdatePolicy.
    pub policy: String,
    /// Nodes it selects.
    pub nodes: usize,
    /// `maxUnavailable` as written.
    pub max_unavailable: String,
    /// How many nodes that allows at once.
    pub at_once: usize,
    /// How many maintenance windows it has (0: always open).
    pub maintenance_windows: usize,
    /// The reboot time assumed, as a duration (`10m`).
    pub reboot_time: String,
    /// When the simulation starts.
    pub start: Timestamp,
    /// How far it looks.
    pub horizon: String,
    /// Per node, in the order they start.
    pub rows: Vec<PlanRow>,
    /// Nodes updated within the horizon.
    pub updated: usize,
    /// When the last node is done, if every node is within the horizon.
    pub expected_end: Option<Timestamp>,
    /// What an operator should know before this rollout (such as the API going down
    /// while a cluster's only control-plane node reboots).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// With `spec.urgency`: whether the windows alone would have updated every node
    /// by its deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DeadlineReport>,
    /// With `spec.promotion`: every pool of the chain, upstream first, when it starts
    /// and ends under its own windows (this policy last).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub promotion_chain: Vec<ChainLink>,
}

/// One pool of a promotion chain, as planned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainLink {
    /// The UpdatePolicy.
    pub policy: String,
    /// Its nodes.
    pub nodes: usize,
    /// The soak after its upstream (none for the first pool).
    pub soak: Option<String>,
    /// When its first node starts (none: not within the horizon).
    pub start: Option<Timestamp>,
    /// When its last node is done (none: not within the horizon).
    pub end: Option<Timestamp>,
}

/// An urgency deadline against the windows alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadlineReport {
    /// The deadline.
    pub deadline: Timestamp,
    /// Nodes the windows alone update by then.
    pub updated_by_then: usize,
    /// Whether that is every node.
    pub met: bool,
}

/// One node of a [`PlanReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanRow {
    /// The node.
    pub node: String,
    /// Its zone, if labelled.
    pub zone: Option<String>,
    /// When it is granted, if within the horizon.
    pub start: Option<Timestamp>,
    /// Which window (1-based, in order of use), if windows are configured.
    pub window: Option<usize>,
    /// When that window closes.
    pub window_closes: Option<Timestamp>,
    /// When it is done, if within the horizon.
    pub end: Option<Timestamp>,
    /// Why it would fail, if it would.
    pub failed: Option<String>,
}

/// Simulates `policy` over `nodes` and renders the timeline.
pub fn render(policy: &UpdatePolicy, nodes: &[Node], opts: &PlanOptions) -> Result<String, Error> {
    Ok(text(&simulate(policy, nodes, opts)?, opts))
}

/// Simulates `policy` over `nodes`.
pub fn simulate(
    policy: &UpdatePolicy,
    nodes: &[Node],
    opts: &PlanOptions,
) -> Result<PlanReport, Error> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let rules = Policy::from_spec(&name, &policy.spec).map_err(|errors| Error::InvalidPolicy {
        name: name.clone(),
        errors: errors.iter().map(ToString::to_string).collect(),
    })?;
    let views: Vec<NodeView> = nodes
        .iter()
        .map(NodeView::from_node)
        .filter(|n| rules.selector.matches(&n.labels))
        .collect();
    let total = views.len();
    // Promotion is planned by the chain's start times (`simulate_chain`), not gated
    // here: the model has no upstream pool.
    let rules = Policy {
        promotion: None,
        ..rules
    };
    let reboot = |node: &str| {
        opts.node_reboot_times
            .get(node)
            .copied()
            .unwrap_or(opts.reboot_time)
    };
    let deadline = rules.urgency.map(|u| {
        // The same rollout without the urgency: the windows alone.
        let mut alone = World::what_if(views.clone(), "what-if");
        alone.operator_node = opts.operator_node.clone();
        let windows_only = Policy {
            urgency: None,
            ..rules.clone()
        };
        let timeline = simulate::run(&mut alone, &windows_only, opts.start, u.deadline, &reboot);
        let updated_by_then = timeline
            .events
            .iter()
            .filter(|e| matches!(e.what, EventKind::Released) && e.at <= u.deadline)
            .count();
        DeadlineReport {
            deadline: u.deadline,
            updated_by_then,
            met: updated_by_then == total,
        }
    });
    let mut world = World::what_if(views, "what-if");
    world.operator_node = opts.operator_node.clone();
    let horizon = opts
        .start
        .checked_add(opts.horizon)
        .map_err(|e| Error::Usage(format!("horizon: {e}")))?;
    let timeline = simulate::run(&mut world, &rules, opts.start, horizon, &reboot);

    let mut rows: BTreeMap<String, Row> = world
        .nodes
        .iter()
        .map(|n| (n.name.clone(), Row::default()))
        .collect();
    let mut windows: Vec<Timestamp> = Vec::new();
    for event in &timeline.events {
        let Some(row) = rows.get_mut(&event.node) else {
            continue;
        };
        match &event.what {
            EventKind::Granted { window_closes } => {
                row.start = Some(event.at);
                row.window =
                    window_closes.map(|closes| match windows.iter().position(|w| *w == closes) {
                        Some(i) => i + 1,
                        None => {
                            windows.push(closes);
                            windows.len()
                        }
                    });
            }
            EventKind::Released => row.end = Some(event.at),
            EventKind::Failed(why) => row.failed = Some(why.clone()),
            EventKind::Rebooting | EventKind::Booted => {}
        }
    }
    let zone_of: BTreeMap<&str, &str> = world
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.zone(&rules.zone_label)))
        .collect();

    let mut ordered: Vec<(&String, &Row)> = rows.iter().collect();
    ordered.sort_by_key(|(name, row)| (row.start.is_none(), row.start, name.as_str()));
    let out_rows: Vec<PlanRow> = ordered
        .into_iter()
        .map(|(node, row)| PlanRow {
            node: node.clone(),
            zone: zone_of
                .get(node.as_str())
                .filter(|z| !z.is_empty())
                .map(|z| z.to_string()),
            start: row.start,
            window: row.window,
            window_closes: row.window.and_then(|i| windows.get(i - 1).copied()),
            end: row.end,
            failed: row.failed.clone(),
        })
        .collect();
    let updated = rows.values().filter(|r| r.end.is_some()).count();
    let last = rows.values().filter_map(|r| r.end).max();
    // The cluster's only control-plane node, when this pool takes it: the API server is
    // down while it reboots.
    let control_plane: Vec<&Node> = nodes
        .iter()
        .filter(|n| rollout::etcd::is_control_plane(n.labels()))
        .collect();
    let warnings = match control_plane.as_slice() {
        [only] if rows.contains_key(&only.name_any()) => vec![format!(
            "{} is the cluster's only control-plane node: it goes alone, {}, and the Kubernetes API is down while it reboots (about {} here); baton finishes it when the API is back",
            only.name_any(),
            match rules.control_plane {
                crds::ControlPlaneOrder::First => "first",
                crds::ControlPlaneOrder::Last => "last",
                crds::ControlPlaneOrder::Any => "in the usual order",
            },
            crds::duration::format(reboot(&only.name_any()).unsigned_abs()),
        )],
        _ => Vec::new(),
    };
    Ok(PlanReport {
        api_version: REPORT_VERSION,
        kind: "Plan",
        policy: name,
        nodes: total,
        max_unavailable: rules.budget.to_string(),
        at_once: rules.budget.resolve(total),
        maintenance_windows: policy.spec.maintenance_windows.len(),
        reboot_time: crds::duration::format(opts.reboot_time.unsigned_abs()),
        start: opts.start,
        horizon: crds::duration::format(opts.horizon.unsigned_abs()),
        rows: out_rows,
        updated,
        expected_end: last.filter(|_| updated == total),
        warnings,
        deadline,
        promotion_chain: Vec::new(),
    })
}

/// Simulates `policy` after the pools it is promoted after: each pool of the chain
/// starts once the one before it is done (or, if its status says it completed the
/// version already, from then) plus its soak, under its own windows.
pub fn simulate_chain(
    policies: &[UpdatePolicy],
    policy: &UpdatePolicy,
    nodes: &[Node],
    opts: &PlanOptions,
) -> Result<PlanReport, Error> {
    // The chain, upstream first; it stops at a missing policy or a cycle.
    let mut chain = vec![policy.clone()];
    while let Some(after) = chain
        .last()
        .and_then(|p| p.spec.promotion.as_ref())
        .map(|p| p.after.clone())
    {
        let Some(up) = policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(after.as_str()))
        else {
            break;
        };
        if chain.iter().any(|p| p.metadata.name == up.metadata.name) {
            break;
        }
        chain.push(up.clone());
    }
    chain.reverse();
    let mut links = Vec::new();
    let mut ready = Some(opts.start);
    let mut report = None;
    for (i, p) in chain.iter().enumerate() {
        let soak = p
            .spec
            .promotion
            .as_ref()
            .filter(|_| i > 0)
            .map(|pr| pr.soak.clone());
        let soak_for = soak
            .as_deref()
            .and_then(|s| crds::duration::parse(s).ok())
            .and_then(|d| SignedDuration::try_from(d).ok())
            .unwrap_or(SignedDuration::ZERO);
        let start = ready
            .and_then(|t| t.checked_add(soak_for).ok())
            .map(|t| t.max(opts.start));
        let this = match start {
            Some(start) => Some(simulate(
                p,
                nodes,
                &PlanOptions {
                    start,
                    ..opts.clone()
                },
            )?),
            None => None,
        };
        let first = this
            .as_ref()
            .and_then(|r| r.rows.iter().filter_map(|row| row.start).min());
        // Already done on its release (its status says so): the next pool counts from then.
        let done_since = p
            .status
            .as_ref()
            .and_then(|s| s.completed.as_ref())
            .filter(|c| {
                p.spec
                    .release
                    .as_ref()
                    .is_some_and(|r| r.version == c.version)
            })
            .map(|c| c.since.0);
        let end = done_since.or_else(|| this.as_ref().and_then(|r| r.expected_end));
        links.push(ChainLink {
            policy: p.metadata.name.clone().unwrap_or_default(),
            nodes: this.as_ref().map_or(0, |r| r.nodes),
            soak,
            start: if done_since.is_some() { None } else { first },
            end,
        });
        ready = end;
        report = this;
    }
    let mut report = match report {
        Some(r) => r,
        None => simulate(policy, nodes, opts)?,
    };
    report.promotion_chain = links;
    Ok(report)
}

/// The plan as text for humans, times in `opts.time_zone`.
pub fn text(plan: &PlanReport, opts: &PlanOptions) -> String {
    let fmt = |t: Timestamp| {
        t.to_zoned(opts.time_zone.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    };
    let mut out = String::new();
    let windows_desc = match plan.maintenance_windows {
        0 => "no maintenance windows (always open)".to_string(),
        1 => "1 maintenance window".to_string(),
        n => format!("{n} maintenance windows"),
    };
    let _ = writeln!(
        out,
        "Plan for UpdatePolicy {}: {} nodes, maxUnavailable {} ({} at once), {windows_desc}, reboot time {}",
        plan.policy, plan.nodes, plan.max_unavailable, plan.at_once, plan.reboot_time,
    );
    if !plan.promotion_chain.is_empty() {
        let names: Vec<&str> = plan
            .promotion_chain
            .iter()
            .map(|l| l.policy.as_str())
            .collect();
        let _ = writeln!(out, "Promotion chain: {}", names.join(" → "));
        for link in &plan.promotion_chain {
            let soak = link
                .soak
                .as_ref()
                .map_or(String::new(), |s| format!("after a {s} soak, "));
            let when = match (link.start, link.end) {
                (None, Some(end)) => format!("done on its release since {}", fmt(end)),
                (Some(start), Some(end)) => format!("{soak}{} → {}", fmt(start), fmt(end)),
                (Some(start), None) => {
                    format!("{soak}{} → not done within the horizon", fmt(start))
                }
                (None, None) => "not started within the horizon".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<16}  {:>3} nodes  {when}",
                link.policy, link.nodes
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<22}  {:<16}  {:<10}  {:<28}  END",
        "START", "NODE", "ZONE", "WINDOW"
    );
    for row in &plan.rows {
        let start = row.start.map_or("-".to_string(), fmt);
        let window = match (row.start, row.window, row.window_closes) {
            (None, _, _) => "-".to_string(),
            (Some(_), Some(i), Some(closes)) => format!(
                "#{i} (closes {})",
                fmt(closes).get(11..16).unwrap_or_default()
            ),
            (Some(_), _, _) => "always open".to_string(),
        };
        let end = match (&row.failed, row.end, row.start) {
            (Some(why), _, _) => format!("FAILED: {why}"),
            (None, Some(end), _) => fmt(end),
            (None, None, Some(_)) => "still in progress at the horizon".to_string(),
            (None, None, None) => "not started within the horizon".to_string(),
        };
        let zone = row.zone.as_deref().unwrap_or("-");
        let node = &row.node;
        let _ = writeln!(
            out,
            "{start:<22}  {node:<16}  {zone:<10}  {window:<28}  {end}"
        );
    }
    match plan.expected_end {
        Some(end) => {
            let _ = writeln!(
                out,
                "Expected end: {} ({} of {} nodes updated)",
                fmt(end),
                plan.updated,
                plan.nodes
            );
        }
        None => {
            let _ = writeln!(
                out,
                "Incomplete within {}: {} of {} nodes updated",
                plan.horizon, plan.updated, plan.nodes
            );
        }
    }
    if let Some(d) = &plan.deadline {
        let _ = if d.met {
            writeln!(
                out,
                "Urgency deadline {}: met under the windows alone",
                fmt(d.deadline)
            )
        } else {
            writeln!(
                out,
                "Urgency deadline {}: NOT met under the windows alone ({} of {} nodes by then); past it, windows stop gating (the timeline above)",
                fmt(d.deadline),
                d.updated_by_then,
                plan.nodes
            )
        };
    }
    for warning in &plan.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}
