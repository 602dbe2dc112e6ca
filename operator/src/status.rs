//! `UpdatePolicy.status` from a plan: counts, lease holders, the window, and
//! conditions that keep their `lastTransitionTime` until they really change, so an
//! unchanged cluster produces an identical status and no API write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crds::{UpdatePolicyStatus, policy::condition};
use rollout::{
    Plan,
    policy::SpecError,
    window::{WindowState, Windows},
};

/// The status for a valid policy.
pub fn from_plan(
    plan: &Plan,
    paused: bool,
    generation: Option<i64>,
    old: Option<&UpdatePolicyStatus>,
    now: Timestamp,
) -> UpdatePolicyStatus {
    let mut conditions = Vec::new();
    let halted = plan.halted.as_deref();
    // Overlapping selectors are not an invalid spec (each spec may be fine on its own):
    // their own condition, on every policy involved, and none touches those nodes.
    let conflicts = (!plan.conflicts.is_empty()).then(|| {
        let pairs: Vec<String> =
            plan.conflicts.iter().map(|c| format!("{} (also {})", c.node, c.others.join(", "))).collect();
        format!(
            "nodes selected by more than one policy are left alone; make the nodeSelectors disjoint: {}",
            pairs.join(", ")
        )
    });
    set(
        &mut conditions,
        old,
        now,
        condition::INVALID_SPEC,
        false,
        "Valid",
        "the spec is valid",
    );
    set(
        &mut conditions,
        old,
        now,
        condition::OVERLAPPING,
        conflicts.is_some(),
        if conflicts.is_some() {
            "OverlappingSelectors"
        } else {
            "Disjoint"
        },
        conflicts
            .as_deref()
            .unwrap_or("no node is selected by another policy"),
    );
    set(
        &mut conditions,
        old,
        now,
        condition::HALTED,
        halted.is_some(),
        if halted.is_some() {
            "FailuresReachedLimit"
        } else {
            "NoFailureLimit"
        },
        halted.unwrap_or("failures are below failurePolicy.maxFailedNodes"),
    );
    set(
        &mut conditions,
        old,
        now,
        condition::PAUSED,
        paused,
        if paused { "SpecPaused" } else { "NotPaused" },
        if paused {
            "spec.paused is set: nothing new starts"
        } else {
            "not paused"
        },
    );
    set(
        &mut conditions,
        old,
        now,
        condition::GATE_CLOSED,
        plan.gate.is_some(),
        if plan.gate.is_some() {
            "HealthGate"
        } else {
            "GatesOpen"
        },
        plan.gate
            .as_deref()
            .unwrap_or("no health gate holds grants back"),
    );
    set(
        &mut conditions,
        old,
        now,
        condition::URGENT,
        plan.urgent.is_some(),
        if plan.urgent.is_some() {
            "DeadlinePassed"
        } else {
            "NotUrgent"
        },
        plan.urgent
            .as_deref()
            .unwrap_or("no urgency deadline has passed with nodes left to update"),
    );
    match &plan.etcd {
        Some(guard) => {
            let message = match &guard.hold {
                Some((node, hold)) => format!("{node}: {hold}"),
                None => guard.summary.clone(),
            };
            set(
                &mut conditions,
                old,
                now,
                condition::ETCD_HELD,
                guard.hold.is_some(),
                if guard.hold.is_some() {
                    "EtcdQuorumGuard"
                } else {
                    "NotHeld"
                },
                &message,
            );
        }
        None => conditions.retain(|c| c.type_ != condition::ETCD_HELD),
    }
    let progressing = plan.counts.in_progress > 0;
    set(
        &mut conditions,
        old,
        now,
        condition::PROGRESSING,
        progressing,
        if progressing {
            "NodesInProgress"
        } else {
            "Idle"
        },
        &format!(
            "{} in progress, {} waiting",
            plan.counts.in_progress, plan.counts.waiting
        ),
    );
    set(
        &mut conditions,
        old,
        now,
        condition::READY,
        halted.is_none() && conflicts.is_none(),
        match (halted, &conflicts) {
            (Some(_), _) => "Halted",
            (None, Some(_)) => "OverlappingSelectors",
            (None, None) => "Ready",
        },
        match (halted, &conflicts) {
            (Some(_), _) => "the pool is halted",
            (None, Some(_)) => "some nodes are selected by more than one policy",
            (None, None) => "the pool is managed",
        },
    );
    UpdatePolicyStatus {
        observed_generation: generation,
        conditions,
        nodes: plan.counts.nodes,
        up_to_date: plan.counts.up_to_date,
        waiting: plan.counts.waiting,
        in_progress: plan.counts.in_progress,
        failed: plan.counts.failed,
        lease_holders: plan.holders.clone(),
        window: Some(plan.window.label().to_string()),
        next_window: match plan.window {
            WindowState::Closed { opens: Some(t) } => Some(Time(t)),
            _ => None,
        },
        next_window_local: None,
        freeze: None,
        completed: None,
    }
}

/// `status.completed`: every node of the pool on the policy's release version, done,
/// none failed; since when it was first seen so (kept across reconciles).
pub fn completed(
    plan: &Plan,
    target: Option<&crds::protocol::Version>,
    old: Option<&UpdatePolicyStatus>,
    now: Timestamp,
) -> Option<crds::Completion> {
    let version = target?.to_string();
    let c = &plan.counts;
    let done = c.nodes > 0 && c.up_to_date == c.nodes && c.failed == 0 && plan.halted.is_none();
    if !done {
        return None;
    }
    let since = old
        .and_then(|o| o.completed.as_ref())
        .filter(|p| p.version == version)
        .map_or(Time(now), |p| p.since.clone());
    Some(crds::Completion { version, since })
}

/// `status.freeze`: the freeze in force (`active until …`) or the next one (`next …`).
pub fn freeze(windows: &Windows, now: Timestamp) -> Option<String> {
    let f = windows.current_or_next_freeze(now)?;
    Some(if f.contains(now) {
        format!("active: {}", f.describe())
    } else {
        format!("next: {}", f.describe())
    })
}

/// `status.nextWindowLocal`: while the windows are closed, when the next one opens, in
/// its own time zone (`2026-12-05 22:00 Europe/Berlin`).
pub fn next_window_local(plan: &Plan, windows: &Windows, now: Timestamp) -> Option<String> {
    match plan.window {
        WindowState::Closed { opens: Some(_) } => windows
            .next_opening(now)
            .map(|at| at.strftime("%Y-%m-%d %H:%M %Q").to_string()),
        _ => None,
    }
}

/// Conditions that became True between `old` and `new`, as (type, message): what
/// deserves a Warning Event.
pub fn raised<'a>(
    old: Option<&UpdatePolicyStatus>,
    new: &'a UpdatePolicyStatus,
) -> Vec<(&'a str, &'a str)> {
    new.conditions
        .iter()
        .filter(|c| {
            c.status == "True"
                && (c.type_ == condition::HALTED
                    || c.type_ == condition::INVALID_SPEC
                    || c.type_ == condition::OVERLAPPING
                    || c.type_ == condition::GATE_CLOSED
                    || c.type_ == condition::ETCD_HELD
                    || c.type_ == condition::URGENT)
        })
        .filter(|c| {
            !old.is_some_and(|o| {
                o.conditions
                    .iter()
                    .any(|p| p.type_ == c.type_ && p.status == "True")
            })
        })
        .map(|c| (c.type_.as_str(), c.message.as_str()))
        .collect()
}

/// The status for a policy whose spec cannot be used: `InvalidSpec=True`, `Ready=False`,
/// everything else kept as it was.
pub fn invalid(
    errors: &[SpecError],
    generation: Option<i64>,
    old: Option<&UpdatePolicyStatus>,
    now: Timestamp,
) -> UpdatePolicyStatus {
    let message: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let message = message.join("; ");
    let mut status = old.cloned().unwrap_or_default();
    let mut conditions: Vec<Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != condition::INVALID_SPEC && c.type_ != condition::READY)
        .cloned()
        .collect();
    set(
        &mut conditions,
        old,
        now,
        condition::INVALID_SPEC,
        true,
        "InvalidSpec",
        &message,
    );
    set(
        &mut conditions,
        old,
        now,
        condition::READY,
        false,
        "InvalidSpec",
        "the spec is invalid: see the InvalidSpec condition",
    );
    status.conditions = conditions;
    status.observed_generation = generation;
    status
}

/// Adds a condition, keeping the old `lastTransitionTime` when the status is unchanged.
fn set(
    conditions: &mut Vec<Condition>,
    old: Option<&UpdatePolicyStatus>,
    now: Timestamp,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" };
    let previous = old.and_then(|o| o.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    conditions.push(Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time,
        observed_generation: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout::{Policy, decide, simulate::World};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn plan(world: &World, json: serde_json::Value) -> Plan {
        let policy = Policy::from_spec("pool", &serde_json::from_value(json).unwrap()).unwrap();
        decide(&world.snapshot(), &policy, at("2026-11-28T03:00:00Z"))
    }

    #[test]
    fn the_next_window_is_shown_in_its_own_zone_while_closed() {
        let world = World::requesting(3, 1, "1", "2");
        let spec = serde_json::json!({"maintenanceWindows": [
            {"weekdays": ["Sat"], "start": "22:00", "duration": "4h", "timeZone": "Europe/Berlin"}]});
        let rules = Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap();
        // 2026-11-28 03:00Z is Saturday 04:00 in Berlin: closed until 22:00 local.
        let now = at("2026-11-28T03:00:00Z");
        let p = decide(&world.snapshot(), &rules, now);
        assert_eq!(
            next_window_local(&p, &rules.windows, now).as_deref(),
            Some("2026-11-28 22:00 Europe/Berlin")
        );
        let open = at("2026-11-28T22:00:00Z");
        let p = decide(&world.snapshot(), &rules, open);
        assert_eq!(next_window_local(&p, &rules.windows, open), None);
    }

    #[test]
    fn the_etcd_guard_is_a_condition_only_for_pools_with_control_plane_nodes() {
        let cond = |s: &UpdatePolicyStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == condition::ETCD_HELD)
                .map(|c| (c.status.clone(), c.message.clone()))
        };
        let mut world = World::requesting(3, 1, "1", "2");
        let now = at("2026-11-28T03:00:00Z");
        let workers = from_plan(&plan(&world, serde_json::json!({})), false, None, None, now);
        assert_eq!(cond(&workers), None);
        world.nodes[0].labels.insert(
            "node-role.kubernetes.io/control-plane".into(),
            String::new(),
        );
        let not_observed = from_plan(&plan(&world, serde_json::json!({})), false, None, None, now);
        assert_eq!(
            cond(&not_observed),
            Some((
                "False".into(),
                "etcd not observed: quorum not checked".into()
            ))
        );
        world.etcd =
            rollout::etcd::Etcd::Unreachable("https://10.0.0.1:2379: connection refused".into());
        let spec = serde_json::json!({"ordering": {"controlPlane": "Any"}});
        let held = from_plan(&plan(&world, spec), false, None, None, now);
        assert_eq!(
            cond(&held),
            Some((
                "True".into(),
                "node-01: etcd is unreachable: https://10.0.0.1:2379: connection refused".into()
            ))
        );
    }

    #[test]
    fn an_unchanged_cluster_gives_an_identical_status() {
        let world = World::requesting(3, 1, "1", "2");
        let p = plan(&world, serde_json::json!({}));
        let first = from_plan(&p, false, Some(1), None, at("2026-11-28T03:00:00Z"));
        let again = from_plan(&p, false, Some(1), Some(&first), at("2026-11-28T03:05:00Z"));
        assert_eq!(
            first, again,
            "no field may change when nothing changed: no write"
        );
    }

    #[test]
    fn counts_holders_and_conditions_follow_the_plan() {
        let world = World::requesting(3, 1, "1", "2");
        let p = plan(&world, serde_json::json!({}));
        let status = from_plan(&p, false, Some(4), None, at("2026-11-28T03:00:00Z"));
        assert_eq!(
            (status.nodes, status.in_progress, status.waiting),
            (3, 1, 2)
        );
        assert_eq!(status.lease_holders, ["node-01"]);
        assert_eq!(status.window.as_deref(), Some("Always"));
        assert_eq!(status.observed_generation, Some(4));
        let cond = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(cond("Progressing"), "True");
        assert_eq!(cond("Ready"), "True");
        assert_eq!(cond("Halted"), "False");
    }

    #[test]
    fn a_transition_moves_last_transition_time_and_nothing_else_does() {
        let mut world = World::requesting(2, 1, "1", "2");
        let before = from_plan(
            &plan(&world, serde_json::json!({})),
            false,
            Some(1),
            None,
            at("2026-11-28T03:00:00Z"),
        );
        world.nodes[1].failure = Some("drain timed out".into());
        let after = from_plan(
            &plan(&world, serde_json::json!({})),
            false,
            Some(1),
            Some(&before),
            at("2026-11-28T04:00:00Z"),
        );
        let halted = after
            .conditions
            .iter()
            .find(|c| c.type_ == "Halted")
            .unwrap();
        assert_eq!(
            (halted.status.as_str(), halted.last_transition_time.0),
            ("True", at("2026-11-28T04:00:00Z"))
        );
        assert!(halted.message.contains("node-02"));
        let paused = after
            .conditions
            .iter()
            .find(|c| c.type_ == "Paused")
            .unwrap();
        assert_eq!(paused.last_transition_time.0, at("2026-11-28T03:00:00Z"));
    }

    #[test]
    fn overlapping_selectors_are_their_own_condition_naming_the_nodes_and_policies() {
        let world = World::requesting(2, 1, "1", "2");
        let mut snapshot = world.snapshot();
        snapshot
            .other_policies
            .push(("other".into(), rollout::selector::Selector::default()));
        let policy = Policy::from_spec(
            "pool",
            &serde_json::from_value(serde_json::json!({})).unwrap(),
        )
        .unwrap();
        let p = decide(&snapshot, &policy, at("2026-11-28T03:00:00Z"));
        let status = from_plan(&p, false, Some(1), None, at("2026-11-28T03:00:00Z"));
        let find = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        let overlapping = find("Overlapping");
        assert_eq!(
            (overlapping.status.as_str(), overlapping.reason.as_str()),
            ("True", "OverlappingSelectors")
        );
        assert!(
            overlapping.message.contains("node-01 (also other)"),
            "{}",
            overlapping.message
        );
        assert_eq!(
            find("InvalidSpec").status,
            "False",
            "each spec is valid on its own"
        );
        assert_eq!(
            status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .status,
            "False"
        );
        assert_eq!(
            raised(None, &status),
            [("Overlapping", overlapping.message.as_str())]
        );
        // Made disjoint: Overlapping goes False, Ready comes back.
        let disjoint = from_plan(
            &decide(&world.snapshot(), &policy, at("2026-11-28T03:01:00Z")),
            false,
            Some(1),
            Some(&status),
            at("2026-11-28T03:01:00Z"),
        );
        let find = |type_: &str| {
            disjoint
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
        };
        assert_eq!(find("Overlapping").status, "False");
        assert_eq!(find("Ready").status, "True");
        assert!(
            raised(Some(&status), &status).is_empty(),
            "raised once, not on every reconcile"
        );
    }

    #[test]
    fn an_invalid_spec_sets_invalid_spec_and_not_ready_with_the_reasons() {
        let errors = vec![SpecError {
            field: "spec.maintenanceWindows[0]".into(),
            message: "timeZone \"Mars/Olympus\" is not a known IANA time zone".into(),
        }];
        let status = invalid(&errors, Some(2), None, at("2026-11-28T03:00:00Z"));
        let invalid = status
            .conditions
            .iter()
            .find(|c| c.type_ == "InvalidSpec")
            .unwrap();
        assert_eq!(invalid.status, "True");
        assert!(invalid.message.contains("Mars/Olympus"));
        assert_eq!(
            status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .status,
            "False"
        );
    }
}
