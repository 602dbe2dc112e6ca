//! `kubectl baton plan`: a what-if planner. It runs the real decision core over a model
//! of the cluster in which every selected node asks for an update, and prints when
//! each node would start, in which window, and when the rollout would end.

use std::{collections::BTreeMap, fmt::Write as _};

use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::core::v1::Node;

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

/// Simulates `policy` over `nodes` and renders the timeline.
pub fn render(policy: &UpdatePolicy, nodes: &[Node], opts: &PlanOptions) -> Result<String, Error> {
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
    let mut world = World::what_if(views, "what-if");
    world.operator_node = opts.operator_node.clone();
    let horizon = opts
        .start
        .checked_add(opts.horizon)
        .map_err(|e| Error::Usage(format!("horizon: {e}")))?;
    let reboot = |node: &str| {
        opts.node_reboot_times
            .get(node)
            .copied()
            .unwrap_or(opts.reboot_time)
    };
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

    let fmt = |t: Timestamp| {
        t.to_zoned(opts.time_zone.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    };
    let mut out = String::new();
    let windows_desc = match policy.spec.maintenance_windows.len() {
        0 => "no maintenance windows (always open)".to_string(),
        1 => "1 maintenance window".to_string(),
        n => format!("{n} maintenance windows"),
    };
    let _ = writeln!(
        out,
        "Plan for UpdatePolicy {name}: {total} nodes, maxUnavailable {} ({} at once), {windows_desc}, reboot time {}",
        rules.budget,
        rules.budget.resolve(total),
        crds::duration::format(opts.reboot_time.unsigned_abs()),
    );
    let mut ordered: Vec<(&String, &Row)> = rows.iter().collect();
    ordered.sort_by_key(|(name, row)| (row.start.is_none(), row.start, name.as_str()));
    let _ = writeln!(
        out,
        "{:<22}  {:<16}  {:<10}  {:<28}  END",
        "START", "NODE", "ZONE", "WINDOW"
    );
    for (node, row) in ordered {
        let start = row.start.map_or("-".to_string(), fmt);
        let window = match (row.start, row.window) {
            (None, _) => "-".to_string(),
            (Some(_), None) => "always open".to_string(),
            (Some(_), Some(i)) => format!(
                "#{i} (closes {})",
                fmt(windows[i - 1]).get(11..16).unwrap_or_default()
            ),
        };
        let end = match (&row.failed, row.end, row.start) {
            (Some(why), _, _) => format!("FAILED: {why}"),
            (None, Some(end), _) => fmt(end),
            (None, None, Some(_)) => "still in progress at the horizon".to_string(),
            (None, None, None) => "not started within the horizon".to_string(),
        };
        let zone = zone_of
            .get(node.as_str())
            .copied()
            .filter(|z| !z.is_empty())
            .unwrap_or("-");
        let _ = writeln!(
            out,
            "{start:<22}  {node:<16}  {zone:<10}  {window:<28}  {end}"
        );
    }
    let done = rows.values().filter(|r| r.end.is_some()).count();
    let last = rows.values().filter_map(|r| r.end).max();
    match last {
        Some(end) if done == total => {
            let _ = writeln!(
                out,
                "Expected end: {} ({done} of {total} nodes updated)",
                fmt(end)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "Incomplete within {}: {done} of {total} nodes updated",
                crds::duration::format(opts.horizon.unsigned_abs())
            );
        }
    }
    Ok(out)
}
