//! Why a node is not moving, for people: the reason `decide` gave (a [`Skip`]) in
//! words, with who holds the budget and when the next window opens in its own zone;
//! every gate a waiting node passes through, in `decide`'s order, with what it saw;
//! and a bounded label for `baton_nodes_waiting{policy,reason}`.
//!
//! Nothing here decides: the deciding reason is the one `decide` returned, and the
//! gates show the facts of the same snapshot and plan.

use jiff::Timestamp;

use crate::{
    NodeView, Policy, Snapshot,
    plan::{Action, Plan, Skip},
    window::WindowState,
};

/// Every label [`label`] returns, for metrics that start at 0.
pub const LABELS: [&str; 21] = [
    "up_to_date",
    "not_requested",
    "policy_paused",
    "node_paused",
    "halted",
    "outside_window",
    "window_too_short",
    "budget",
    "other_zone",
    "cordoned_by_others",
    "not_ready",
    "blocked",
    "gate",
    "malformed",
    "conflict",
    "failed",
    "control_plane",
    "etcd",
    "zone_budget",
    "frozen",
    "promotion",
];

/// The metric label of a reason (one of [`LABELS`]).
pub fn label(skip: &Skip) -> &'static str {
    match skip {
        Skip::UpToDate => "up_to_date",
        Skip::NotRequested(_) => "not_requested",
        Skip::PolicyPaused => "policy_paused",
        Skip::NodePaused => "node_paused",
        Skip::Halted => "halted",
        Skip::Frozen(_) => "frozen",
        Skip::OutsideWindow(_) => "outside_window",
        Skip::WindowTooShort(_) => "window_too_short",
        Skip::Budget => "budget",
        Skip::OtherZone(_) => "other_zone",
        Skip::ZoneBudget(_) => "zone_budget",
        Skip::CordonedByOthers => "cordoned_by_others",
        Skip::NotReady => "not_ready",
        Skip::Blocked(_) => "blocked",
        Skip::Gate(_) => "gate",
        Skip::Malformed(_) => "malformed",
        Skip::Conflict(_) => "conflict",
        Skip::Failed(_) => "failed",
        Skip::ControlPlane(_) => "control_plane",
        Skip::Etcd(_) => "etcd",
        Skip::Promotion(_) => "promotion",
    }
}

/// Whether a node skipped for `skip` waits for a reboot it asked for (rather than
/// having nothing to do or having failed).
pub fn is_waiting(skip: &Skip) -> bool {
    !matches!(
        skip,
        Skip::UpToDate | Skip::NotRequested(_) | Skip::Failed(_)
    )
}

/// Whether a node given `action` waits on etcd itself (its members' health, a leader
/// move, a rejoin), which nothing watches: the operator looks again soon.
pub fn waits_on_etcd(action: &Action) -> bool {
    matches!(
        action,
        Action::MoveLeader { .. } | Action::WaitForEtcd { .. } | Action::Skip(Skip::Etcd(_))
    )
}

/// `3d 4h`, `2h 5m`, `12m`, `40s`: how long from `now` to `at` (`now` if past).
pub fn until(now: Timestamp, at: Timestamp) -> String {
    let secs = at.duration_since(now).as_secs().max(0);
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// The labels of the reasons a node can wait for (those for which [`is_waiting`] holds).
pub fn waiting_labels() -> impl Iterator<Item = &'static str> {
    LABELS
        .into_iter()
        .filter(|l| !matches!(*l, "up_to_date" | "not_requested" | "failed"))
}

/// Every node of `plan` that waits for a reboot it asked for, with its reason's label.
pub fn waiting(plan: &Plan) -> std::collections::BTreeMap<String, &'static str> {
    plan.nodes
        .iter()
        .filter_map(|n| match &n.action {
            Action::Skip(skip) if is_waiting(skip) => Some((n.node.clone(), label(skip))),
            _ => None,
        })
        .collect()
}

/// What would let a node skipped for `skip` go.
pub fn remedy(skip: &Skip) -> &'static str {
    match skip {
        Skip::UpToDate => "nothing: it is on the target version",
        Skip::NotRequested(_) => "its agent staging the release and asking for a reboot",
        Skip::PolicyPaused => "kubectl baton resume <policy>",
        Skip::NodePaused => "kubectl baton resume --node <node>",
        Skip::Halted => "fixing the failed node, then kubectl baton retry <policy>",
        Skip::Frozen(_) => "the freeze ending (or spec.freezes edited)",
        Skip::OutsideWindow(_) => "the next window opening",
        Skip::WindowTooShort(_) => {
            "a window long enough for hooks, drain and reboot (or windowMode: Start)"
        }
        Skip::Budget => "a node in flight finishing (or a larger maxUnavailable)",
        Skip::OtherZone(_) => "the zone in progress finishing",
        Skip::ZoneBudget(_) => "a node of its zone finishing (or a larger maxUnavailablePerZone)",
        Skip::CordonedByOthers => "whoever cordoned it uncordoning it (baton never does)",
        Skip::NotReady => "the node becoming Ready",
        Skip::Blocked(_) => "the blocking pod finishing or moving",
        Skip::Gate(_) => "the alert resolving",
        Skip::Malformed(_) => "fixing its baton.dev/* annotations",
        Skip::Conflict(_) => "making the policies' nodeSelectors disjoint",
        Skip::Failed(_) => "fixing it, then kubectl baton retry --node <node>",
        Skip::ControlPlane(_) => "the control-plane node or workers ahead of it finishing",
        Skip::Etcd(_) => "every other etcd member healthy and caught up with its leader",
        Skip::Promotion(_) => "the upstream pool completing the version and its soak passing",
    }
}

/// When the next window opens, in its own zone and from `now`:
/// `Sat 02:00 Europe/Berlin (in 3d 4h)`.
pub fn next_window(rules: &Policy, now: Timestamp) -> Option<String> {
    let at = rules.windows.next_opening(now)?;
    Some(format!(
        "{} (in {})",
        at.strftime("%a %Y-%m-%d %H:%M %Q"),
        until(now, at.timestamp())
    ))
}

/// Who uses the budget: `1/1 in use by node-4` (or by unavailable nodes).
fn budget(plan: &Plan) -> String {
    let used = plan.budget.used();
    let limit = plan.budget.limit;
    match (used, plan.holders.is_empty()) {
        (0, _) => format!("0/{limit} in use"),
        (_, true) => {
            let releasing: Vec<&str> = plan
                .nodes
                .iter()
                .filter(|n| n.action.releases())
                .map(|n| n.node.as_str())
                .collect();
            if releasing.is_empty() {
                format!("{used}/{limit} in use by unavailable nodes (NotReady, cordoned or failed)")
            } else {
                format!(
                    "{used}/{limit} in use by {} (releasing)",
                    releasing.join(", ")
                )
            }
        }
        (_, false) => format!("{used}/{limit} in use by {}", plan.holders.join(", ")),
    }
}

/// The reason in words, with the budget's holders and the next window.
pub fn explain(skip: &Skip, plan: &Plan, rules: &Policy, now: Timestamp) -> String {
    match skip {
        Skip::Budget => format!("budget {}", budget(plan)),
        Skip::OutsideWindow(Some(_)) => match next_window(rules, now) {
            Some(next) => format!("outside the window; next opens {next}"),
            None => skip.to_string(),
        },
        Skip::OtherZone(zone) if plan.holders.is_empty() => {
            format!("zone {zone} is in progress (one zone at a time)")
        }
        Skip::OtherZone(zone) => format!(
            "zone {zone} is in progress ({}: one zone at a time)",
            plan.holders.join(", ")
        ),
        Skip::Halted => format!(
            "pool halted: {} (kubectl baton retry)",
            plan.halted.as_deref().unwrap_or("a node failed")
        ),
        other => other.to_string(),
    }
}

/// What a node's plan does, in words: its action, or why it waits.
pub fn action(node: &str, plan: &Plan, rules: &Policy, now: Timestamp) -> Option<String> {
    let np = plan.nodes.iter().find(|n| n.node == node)?;
    Some(match &np.action {
        Action::Skip(skip) => explain(skip, plan, rules, now),
        action => action.to_string(),
    })
}

/// One gate on a waiting node's way to a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// The gate.
    pub name: &'static str,
    /// What it saw.
    pub saw: String,
    /// Whether it lets the node through.
    pub passes: bool,
}

/// The gates a node asking for a reboot passes, in `decide`'s order (halt, pause,
/// node pause, cordon, Ready, agent, blocking pods, alert gate, window, budget, zone),
/// each with what the same snapshot and plan hold. The first that does not pass is
/// the reason `decide` gave.
pub fn gates(
    node: &NodeView,
    snapshot: &Snapshot,
    plan: &Plan,
    rules: &Policy,
    now: Timestamp,
) -> Vec<Gate> {
    let gate = |name, passes: bool, saw: String| Gate { name, saw, passes };
    let window = match plan.window {
        WindowState::Always => gate("window", true, "no windows: always open".into()),
        WindowState::Open { closes } => gate(
            "window",
            true,
            format!("open until {closes} (for {})", until(now, closes)),
        ),
        WindowState::Closed { .. } => gate(
            "window",
            false,
            match next_window(rules, now) {
                Some(next) => format!("closed; next opens {next}"),
                None => "closed; none opens within 5 years".into(),
            },
        ),
    };
    let free = plan.budget.limit.saturating_sub(plan.budget.used());
    let zone = node.zone(&rules.zone_label);
    let busy: std::collections::BTreeSet<&str> = snapshot
        .nodes
        .iter()
        .filter(|n| plan.holders.contains(&n.name))
        .map(|n| n.zone(&rules.zone_label))
        .collect();
    let zone_passes = !rules.one_zone_at_a_time || busy.is_empty() || busy.contains(zone);
    let control_plane = crate::control_plane::is_control_plane(node, &snapshot.etcd).then(|| {
        let (passes, saw) = match plan.node(&node.name) {
            Some(Action::Skip(skip @ (Skip::ControlPlane(_) | Skip::Etcd(_)))) => {
                (false, skip.to_string())
            }
            _ => (
                true,
                format!(
                    "one control-plane node at a time; {}",
                    plan.etcd
                        .as_ref()
                        .map_or_else(|| snapshot.etcd.summary(), |g| g.summary.clone())
                ),
            ),
        };
        gate("control plane", passes, saw)
    });
    let mut gates = vec![
        gate(
            "halt",
            plan.halted.is_none(),
            plan.halted.clone().unwrap_or_else(|| "not halted".into()),
        ),
        gate(
            "policy pause",
            !rules.paused,
            if rules.paused {
                "spec.paused"
            } else {
                "not paused"
            }
            .into(),
        ),
        gate(
            "node pause",
            !node.paused,
            if node.paused {
                crds::protocol::PAUSED.name
            } else {
                "not paused"
            }
            .into(),
        ),
        gate(
            "cordon",
            !node.unschedulable,
            if node.unschedulable {
                "cordoned by someone else: baton leaves it alone"
            } else {
                "schedulable"
            }
            .into(),
        ),
        gate(
            "ready",
            node.ready,
            if node.ready { "Ready" } else { "not Ready" }.into(),
        ),
        gate(
            "agent",
            node.agent.boot_id.is_some(),
            match &node.agent.boot_id {
                Some(b) => format!("reports boot {b}"),
                None => "no boot id reported".into(),
            },
        ),
        gate(
            "blocking pods",
            node.blocked_by.is_none(),
            node.blocked_by
                .clone()
                .map_or_else(|| "none".into(), |p| format!("{p} runs here")),
        ),
        gate(
            "alert gate",
            plan.gate.is_none(),
            plan.gate.clone().unwrap_or_else(|| "open".into()),
        ),
        window,
    ];
    gates.extend(control_plane);
    let zone_cap = rules.zone_budget.map(|cap| {
        let shown = crate::zone::display(zone);
        match plan.node(&node.name) {
            Some(Action::Skip(skip @ Skip::ZoneBudget(_))) => {
                gate("zone cap", false, skip.to_string())
            }
            _ => gate(
                "zone cap",
                true,
                format!("maxUnavailablePerZone {cap} not reached in zone {shown:?}"),
            ),
        }
    });
    gates.extend([gate("budget", free > 0, budget(plan))]);
    gates.extend(zone_cap);
    gates.extend([gate(
        "zone",
        zone_passes,
        if rules.one_zone_at_a_time {
            format!("one zone at a time; this node is in {zone:?}, in progress: {busy:?}")
        } else {
            "zones may overlap".into()
        },
    )]);
    gates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decide, simulate::World};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn rules(spec: serde_json::Value) -> Policy {
        Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap()
    }

    #[test]
    fn a_node_waiting_for_the_budget_names_who_holds_it() {
        let world = World::requesting(3, 1, "1", "2");
        let rules = rules(serde_json::json!({}));
        let now = at("2026-11-28T03:00:00Z");
        let plan = decide(&world.snapshot(), &rules, now);
        let waiting: Vec<String> = plan
            .nodes
            .iter()
            .filter_map(|n| match &n.action {
                Action::Skip(s) => Some(explain(s, &plan, &rules, now)),
                _ => None,
            })
            .collect();
        assert_eq!(
            waiting,
            [
                "budget 1/1 in use by node-01",
                "budget 1/1 in use by node-01"
            ]
        );
        let gates = gates(&world.nodes[1], &world.snapshot(), &plan, &rules, now);
        let first_closed = gates.iter().find(|g| !g.passes).unwrap();
        assert_eq!(first_closed.name, "budget");
        assert_eq!(first_closed.saw, "1/1 in use by node-01");
    }

    #[test]
    fn a_closed_window_says_when_it_opens_in_its_zone_and_how_soon() {
        let world = World::requesting(2, 1, "1", "2");
        let rules = rules(serde_json::json!({"maintenanceWindows": [
            {"weekdays": ["Sat"], "start": "02:00", "duration": "4h", "timeZone": "Europe/Berlin"}]}));
        // Tuesday 2026-12-01 09:00Z; Saturday 02:00 Berlin is 2026-12-05T01:00Z.
        let now = at("2026-12-01T09:00:00Z");
        let plan = decide(&world.snapshot(), &rules, now);
        let Action::Skip(skip) = &plan.nodes[0].action else {
            panic!("{:?}", plan.nodes[0].action)
        };
        assert_eq!(label(skip), "outside_window");
        assert!(is_waiting(skip));
        assert_eq!(
            explain(skip, &plan, &rules, now),
            "outside the window; next opens Sat 2026-12-05 02:00 Europe/Berlin (in 3d 16h)"
        );
        let gates = gates(&world.nodes[0], &world.snapshot(), &plan, &rules, now);
        assert_eq!(gates.iter().find(|g| !g.passes).unwrap().name, "window");
    }

    #[test]
    fn durations_read_naturally() {
        let now = at("2026-12-01T00:00:00Z");
        assert_eq!(until(now, at("2026-12-01T00:00:40Z")), "40s");
        assert_eq!(until(now, at("2026-12-01T00:12:00Z")), "12m");
        assert_eq!(until(now, at("2026-12-01T02:05:00Z")), "2h 5m");
        assert_eq!(until(now, at("2026-12-04T04:00:00Z")), "3d 4h");
        assert_eq!(until(now, at("2026-11-30T00:00:00Z")), "0s");
    }

    #[test]
    fn every_reason_has_a_listed_label() {
        let skips = [
            Skip::UpToDate,
            Skip::NotRequested("x".into()),
            Skip::PolicyPaused,
            Skip::NodePaused,
            Skip::Halted,
            Skip::OutsideWindow(None),
            Skip::WindowTooShort(Timestamp::UNIX_EPOCH),
            Skip::Budget,
            Skip::OtherZone("a".into()),
            Skip::CordonedByOthers,
            Skip::NotReady,
            Skip::Blocked("p".into()),
            Skip::Gate("g".into()),
            Skip::Malformed(vec![]),
            Skip::Conflict(vec![]),
            Skip::Failed("f".into()),
        ];
        for s in &skips {
            assert!(LABELS.contains(&label(s)), "{s:?}");
        }
    }
}
