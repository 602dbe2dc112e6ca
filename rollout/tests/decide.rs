//! The rules of a rollout, one test per behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::{SignedDuration, Timestamp};
use rollout::{
    Action, Policy, Skip, decide, plan::ReleaseReason, selector::Selector, simulate::World,
    snapshot::LeaseView,
};

use crds::{AgentState, OnTimeout, protocol::Version};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

const NOW: &str = "2026-11-28T03:00:00Z"; // a Saturday

fn policy(json: serde_json::Value) -> Policy {
    Policy::from_spec("pool", &serde_json::from_value(json).unwrap()).unwrap()
}

fn world(n: usize) -> World {
    World::requesting(n, 1, "1.0.0", "2.0.0")
}

fn lease(world: &World, node: &str, acquired: &str) -> LeaseView {
    let n = world.nodes.iter().find(|n| n.name == node).unwrap();
    LeaseView {
        name: format!("baton-reboot-{node}"),
        uid: None,
        resource_version: None,
        node: node.into(),
        policy: "pool".into(),
        acquired: at(acquired),
        granted_boot_id: n.agent.boot_id.clone(),
        target_version: Version::new("2.0.0").ok(),
        drain_started: None,
        drained: None,
        done: None,
        failure: None,
    }
}

/// `node` holds a drained lease, booted a new boot on 2.0.0, reports Done, and is still
/// cordoned by baton.
fn rebooted_into_the_new_version(w: &mut World, node: &str) {
    let mut l = lease(w, node, NOW);
    l.drained = Some(at(NOW));
    w.leases.push(l);
    let n = w.node_mut(node).unwrap();
    n.agent.boot_id = crds::protocol::BootId::new("ffff").ok();
    n.agent.state = Some(AgentState::Done);
    n.agent.current_version = Version::new("2.0.0").ok();
    n.unschedulable = true;
    n.cordoned_by_baton = true;
}

fn grants(world: &World, p: &Policy, now: &str) -> Vec<String> {
    decide(&world.snapshot(), p, at(now))
        .grants()
        .map(String::from)
        .collect()
}

#[test]
fn only_the_steps_that_write_act_so_waiting_nodes_cost_the_operator_nothing() {
    let mut w = world(5);
    rebooted_into_the_new_version(&mut w, "node-02");
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    let acting: Vec<(&str, String)> = plan
        .nodes
        .iter()
        .filter(|n| n.action.acts())
        .map(|n| (n.node.as_str(), n.action.to_string()))
        .collect();
    // node-02 is uncordoned and released; the slot it frees goes to node-01, right
    // after the release; the budget (1) is then used, so the other three wait.
    assert_eq!(acting.len(), 2, "{acting:?}");
    assert_eq!(acting[0].0, "node-02");
    assert_eq!(
        plan.node("node-01").and_then(Action::after),
        Some("node-02")
    );
    assert!(
        plan.nodes
            .iter()
            .filter(|n| !["node-01", "node-02"].contains(&n.node.as_str()))
            .all(|n| matches!(n.action, rollout::Action::Skip(_))),
        "{:?}",
        plan.nodes
    );
}

#[test]
fn grants_one_node_at_a_time_by_default() {
    let w = world(5);
    assert_eq!(grants(&w, &policy(serde_json::json!({})), NOW), ["node-01"]);
}

#[test]
fn never_grants_beyond_budget_when_a_node_is_already_not_ready() {
    let mut w = world(5);
    w.node_mut("node-03").unwrap().ready = false;
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"maxUnavailable": 2})),
        at(NOW),
    );
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-01"]);
    assert_eq!(plan.budget.unavailable, 1);
    assert_eq!(plan.node("node-02"), Some(&Action::Skip(Skip::Budget)));
}

#[test]
fn a_percent_budget_of_ten_nodes_allows_four() {
    let w = world(10);
    let p =
        policy(serde_json::json!({"maxUnavailable": "40%", "ordering": {"oneZoneAtATime": false}}));
    assert_eq!(grants(&w, &p, NOW).len(), 4);
}

#[test]
fn a_percent_budget_rounds_down_with_a_minimum_of_one() {
    let w = world(5);
    assert_eq!(
        grants(
            &w,
            &policy(serde_json::json!({"maxUnavailable": "10%"})),
            NOW
        )
        .len(),
        1
    );
}

#[test]
fn nodes_cordoned_by_others_count_against_the_budget_and_are_never_granted() {
    let mut w = world(3);
    w.node_mut("node-01").unwrap().unschedulable = true;
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"maxUnavailable": 2})),
        at(NOW),
    );
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::CordonedByOthers))
    );
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-02"]);
}

#[test]
fn never_grants_outside_a_window_and_requeues_at_its_opening() {
    let w = world(2);
    let p = policy(
        serde_json::json!({"maintenanceWindows": [{"weekdays": ["Sat"], "start": "04:00", "duration": "2h"}]}),
    );
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(plan.grants().count(), 0);
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::OutsideWindow(Some(at(
            "2026-11-28T04:00:00Z"
        )))))
    );
    assert_eq!(plan.next_change, Some(at("2026-11-28T04:00:00Z")));
    assert_eq!(grants(&w, &p, "2026-11-28T04:00:00Z"), ["node-01"]);
}

#[test]
fn a_reboot_in_flight_continues_after_the_window_closes() {
    let mut w = world(2);
    let mut l = lease(&w, "node-01", "2026-11-28T01:50:00Z");
    l.drained = Some(at("2026-11-28T01:55:00Z"));
    w.leases.push(l);
    w.node_mut("node-01").unwrap().unschedulable = true;
    let p = policy(
        serde_json::json!({"maintenanceWindows": [{"schedule": "0 1 * * 6", "duration": "1h"}]}),
    );
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T02:10:00Z"));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::AllowReboot { .. })
    ));
    assert_eq!(plan.grants().count(), 0);
}

/// `windowMode: Fit` counts the whole disruption from the grant: the before-reboot
/// hooks, the drain and the reboot, each at its bound (the reboot deadline starts when
/// the drain ends). Settle time is not counted: the node is back in service by then.
#[test]
fn fit_mode_refuses_to_start_when_the_drain_and_reboot_would_outlive_the_window() {
    let w = world(1);
    let window = serde_json::json!([{"schedule": "0 2 * * 6", "duration": "80m"}]); // 02:00-03:20
    let closes = Some(&Action::Skip(Skip::WindowTooShort(at(
        "2026-11-28T03:20:00Z",
    ))));
    // (spec, the last minute a grant fits, the first that it does not)
    let rows = [
        (
            serde_json::json!({"health": {"rebootTimeout": "30m", "settleTime": "1h"}, "drain": {"timeout": "10m"}}),
            "2026-11-28T02:40:00Z",
            "2026-11-28T02:41:00Z",
        ),
        (
            serde_json::json!({"health": {"rebootTimeout": "30m"}, "drain": {"timeout": "10m"},
                               "hooks": {"beforeReboot": {"annotations": ["x.io/ok"], "timeout": "5m"}}}),
            "2026-11-28T02:35:00Z",
            "2026-11-28T02:36:00Z",
        ),
    ];
    for (spec, fits, too_late) in rows {
        let mut spec = spec;
        spec["windowMode"] = "Fit".into();
        spec["maintenanceWindows"] = window.clone();
        let p = policy(spec.clone());
        assert_eq!(grants(&w, &p, fits), ["node-01"], "{spec}");
        let plan = decide(&w.snapshot(), &p, at(too_late));
        assert_eq!(plan.node("node-01"), closes, "{spec}");
    }
    // Checking rebootTimeout alone would have granted at 02:45, leaving the reboot to
    // start after the window closed.
    let p = policy(
        serde_json::json!({"windowMode": "Fit", "maintenanceWindows": window,
        "health": {"rebootTimeout": "30m"}, "drain": {"timeout": "10m"}}),
    );
    assert_eq!(grants(&w, &p, "2026-11-28T02:45:00Z"), Vec::<String>::new());
}

#[test]
fn a_paused_policy_grants_nothing_but_in_flight_nodes_continue() {
    let mut w = world(3);
    w.leases.push(lease(&w, "node-01", NOW));
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"paused": true, "maxUnavailable": 3})),
        at(NOW),
    );
    assert_eq!(plan.node("node-01"), Some(&Action::Cordon));
    assert_eq!(
        plan.node("node-02"),
        Some(&Action::Skip(Skip::PolicyPaused))
    );
}

#[test]
fn a_paused_node_is_skipped() {
    let mut w = world(2);
    w.node_mut("node-01").unwrap().paused = true;
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(plan.node("node-01"), Some(&Action::Skip(Skip::NodePaused)));
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-02"]);
}

#[test]
fn a_rolled_back_node_fails_and_halts_the_pool() {
    let mut w = world(3);
    let mut l = lease(&w, "node-01", NOW);
    l.drained = Some(at(NOW));
    w.leases.push(l);
    let n = w.node_mut("node-01").unwrap();
    n.agent.state = Some(AgentState::RolledBack);
    n.agent.message = Some("booted USR-A, expected USR-B".into());
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"maxUnavailable": 3})),
        at(NOW),
    );
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Fail {
            reason: "agent reported RolledBack: booted USR-A, expected USR-B".into()
        })
    );
    assert!(plan.halted.is_some());
    assert_eq!(plan.grants().count(), 0);
    assert_eq!(plan.node("node-02"), Some(&Action::Skip(Skip::Halted)));
}

#[test]
fn failures_below_max_failed_nodes_do_not_halt() {
    let mut w = world(3);
    w.node_mut("node-01").unwrap().failure = Some("drain timed out".into());
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"maxUnavailable": 2, "failurePolicy": {"maxFailedNodes": 2}})),
        at(NOW),
    );
    assert!(plan.halted.is_none());
    // The failed node still uses one unit of the budget.
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-02"]);
    assert_eq!(plan.counts.failed, 1);
}

#[test]
fn a_node_that_never_comes_back_fails_at_reboot_timeout() {
    let mut w = world(1);
    let mut l = lease(&w, "node-01", "2026-11-28T02:00:00Z");
    l.drained = Some(at("2026-11-28T02:05:00Z"));
    let boot = l.granted_boot_id.clone();
    w.leases.push(l);
    let n = w.node_mut("node-01").unwrap();
    n.agent.reboot_ok = boot;
    n.ready = false;
    let p = policy(serde_json::json!({"health": {"rebootTimeout": "30m"}}));
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T02:20:00Z"));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::WaitForReboot {
            deadline: at("2026-11-28T02:35:00Z")
        })
    );
    assert_eq!(plan.next_change, Some(at("2026-11-28T02:35:00Z")));
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T02:35:00Z"));
    assert!(
        matches!(plan.node("node-01"), Some(Action::Fail { reason }) if reason.contains("rebootTimeout"))
    );
}

#[test]
fn an_agent_restart_without_a_reboot_is_not_a_reboot() {
    let mut w = world(1);
    let mut l = lease(&w, "node-01", NOW);
    l.drained = Some(at(NOW));
    let boot = l.granted_boot_id.clone();
    w.leases.push(l);
    let n = w.node_mut("node-01").unwrap();
    n.agent.reboot_ok = boot;
    // The agent restarted and says Done, but the boot id is the granted one.
    n.agent.state = Some(AgentState::Done);
    n.agent.current_version = Version::new("2.0.0").ok();
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::WaitForReboot { .. })
    ));
}

#[test]
fn booting_the_wrong_version_fails_the_node() {
    let mut w = world(1);
    let mut l = lease(&w, "node-01", NOW);
    l.drained = Some(at(NOW));
    w.leases.push(l);
    let n = w.node_mut("node-01").unwrap();
    n.agent.boot_id = crds::protocol::BootId::new("ffff").ok();
    n.agent.state = Some(AgentState::Done);
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Fail {
            reason: "booted version 1.0.0, expected 2.0.0".into()
        })
    );
}

#[test]
fn a_deleted_node_releases_its_lease() {
    let mut w = world(2);
    w.leases.push(lease(&w, "node-01", NOW));
    w.nodes.retain(|n| n.name != "node-01");
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Release(ReleaseReason::NodeDeleted))
    );
}

#[test]
fn uncordons_only_nodes_baton_cordoned() {
    let mut w = world(1);
    rebooted_into_the_new_version(&mut w, "node-01");
    assert_eq!(
        decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW)).node("node-01"),
        Some(&Action::Finish {
            uncordon: true,
            release: true
        })
    );
    w.node_mut("node-01").unwrap().cordoned_by_baton = false;
    assert_eq!(
        decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW)).node("node-01"),
        Some(&Action::Finish {
            uncordon: false,
            release: true
        })
    );
}

#[test]
fn a_finished_node_is_released_in_the_same_step_unless_it_must_settle() {
    let mut w = world(2);
    rebooted_into_the_new_version(&mut w, "node-01");
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    // Released in this plan: its slot is not a holder any more, and it counts as
    // updated. It still counts against the budget: the slot it frees is taken only by
    // a grant performed after the release.
    assert_eq!(plan.holders, ["node-02"]);
    assert_eq!(plan.counts.up_to_date, 1);
    assert_eq!(plan.budget.unavailable, 1);
    assert_eq!(plan.budget.taken_over, 1);
    assert_eq!(plan.budget.used(), 1);
    assert_eq!(
        plan.node("node-02").and_then(Action::after),
        Some("node-01")
    );
    let settling = policy(serde_json::json!({"health": {"settleTime": "5m"}}));
    let plan = decide(&w.snapshot(), &settling, at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Finish {
            uncordon: true,
            release: false
        })
    );
    assert_eq!(plan.holders, ["node-01"]);
}

#[test]
fn settle_time_delays_the_release() {
    let mut w = world(2);
    let mut l = lease(&w, "node-01", NOW);
    l.done = Some(at(NOW));
    w.leases.push(l);
    let p = policy(serde_json::json!({"health": {"settleTime": "5m"}}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Settle {
            until: at("2026-11-28T03:05:00Z")
        })
    );
    assert_eq!(
        plan.grants().count(),
        0,
        "the settling node still holds the slot"
    );
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T03:05:00Z"));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Release(ReleaseReason::Done))
    );
    assert!(
        taking_over(&plan).is_empty(),
        "a settled node's release writes nothing guarded by what the decision saw: \
         its slot goes to the next pass"
    );
}

#[test]
fn a_released_slot_is_taken_only_while_the_window_stays_open_long_enough() {
    // A window 03:00 to 04:00 on Saturdays (NOW is 03:00).
    let windowed = |mode: &str| {
        policy(serde_json::json!({
            "maintenanceWindows": [{"schedule": "0 3 * * 6", "duration": "1h", "timeZone": "UTC"}],
            "windowMode": mode,
            "drain": {"timeout": "10m"},
            "health": {"rebootTimeout": "20m"}
        }))
    };
    let mut w = world(3);
    rebooted_into_the_new_version(&mut w, "node-03");
    let start = windowed("Start");
    assert_eq!(
        taking_over(&decide(&w.snapshot(), &start, at(NOW))).len(),
        1
    );
    // 20 s before the close: a grant on free room could still start, but a takeover
    // written up to TAKEOVER_WITHIN later might not.
    let late = at("2026-11-28T03:59:40Z");
    assert!(taking_over(&decide(&w.snapshot(), &start, late)).is_empty());
    // Fit: the disruption must still fit after TAKEOVER_WITHIN.
    let fit = windowed("Fit");
    let tight = at("2026-11-28T03:29:50Z");
    let plan = decide(&w.snapshot(), &fit, tight);
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);
    assert_eq!(taking_over(&decide(&w.snapshot(), &fit, at(NOW))).len(), 1);
}

/// The grants that take a released slot: (node, the node whose release it waits on).
fn taking_over(plan: &rollout::Plan) -> Vec<(&str, &str)> {
    plan.nodes
        .iter()
        .filter_map(|n| n.action.after().map(|after| (n.node.as_str(), after)))
        .collect()
}

#[test]
fn each_released_slot_is_taken_by_at_most_one_grant_on_top_of_the_free_room() {
    let mut w = world(8);
    rebooted_into_the_new_version(&mut w, "node-07");
    rebooted_into_the_new_version(&mut w, "node-08");
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    // One slot is free, two are being released: three grants, two of them after a
    // release each, and nothing more is disrupted once the plan is performed.
    assert_eq!(
        plan.grants().collect::<Vec<_>>(),
        ["node-01", "node-02", "node-03"]
    );
    assert_eq!(plan.node("node-01").and_then(Action::after), None);
    let mut taken = taking_over(&plan);
    taken.sort_by_key(|(_, after)| *after);
    assert_eq!(taken, [("node-02", "node-07"), ("node-03", "node-08")]);
    assert_eq!(plan.budget.used(), 3);
    assert_eq!(plan.node("node-04"), Some(&Action::Skip(Skip::Budget)));
}

#[test]
fn a_node_still_unavailable_once_released_frees_no_slot() {
    // Cordoned by someone else as well: the release leaves it cordoned.
    let mut w = world(3);
    rebooted_into_the_new_version(&mut w, "node-03");
    w.node_mut("node-03").unwrap().cordoned_by_baton = false;
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert!(plan.node("node-03").is_some_and(Action::releases));
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);
    assert_eq!(plan.node("node-01"), Some(&Action::Skip(Skip::Budget)));

    // Over the budget (an admin cordoned a node meanwhile): no slot is taken over, as
    // the two releases run side by side.
    let mut w = world(5);
    rebooted_into_the_new_version(&mut w, "node-04");
    rebooted_into_the_new_version(&mut w, "node-05");
    w.node_mut("node-03").unwrap().unschedulable = true;
    let plan = decide(
        &w.snapshot(),
        &policy(serde_json::json!({"maxUnavailable": 2})),
        at(NOW),
    );
    assert_eq!(plan.budget.unavailable, 3);
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);

    // NotReady again after its verification.
    let mut w = world(3);
    rebooted_into_the_new_version(&mut w, "node-03");
    w.node_mut("node-03").unwrap().ready = false;
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);
}

#[test]
fn a_released_slot_is_taken_only_by_a_node_every_other_rule_lets_start() {
    let mut w = world(3);
    rebooted_into_the_new_version(&mut w, "node-03");
    w.node_mut("node-01").unwrap().paused = true;
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(plan.node("node-01"), Some(&Action::Skip(Skip::NodePaused)));
    assert_eq!(taking_over(&plan), [("node-02", "node-03")]);

    let paused = policy(serde_json::json!({"paused": true}));
    let plan = decide(&w.snapshot(), &paused, at(NOW));
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);
}

#[test]
fn the_operators_own_node_goes_last() {
    let mut w = world(3);
    w.operator_node = Some("node-01".into());
    assert_eq!(grants(&w, &policy(serde_json::json!({})), NOW), ["node-02"]);
}

#[test]
fn nodes_go_oldest_first() {
    let mut w = world(3);
    w.nodes[0].created = Some(at("2026-01-03T00:00:00Z"));
    w.nodes[1].created = Some(at("2026-01-01T00:00:00Z"));
    w.nodes[2].created = Some(at("2026-01-02T00:00:00Z"));
    assert_eq!(grants(&w, &policy(serde_json::json!({})), NOW), ["node-02"]);
}

#[test]
fn takes_one_zone_at_a_time() {
    let w = World::requesting(6, 3, "1", "2");
    let p = policy(serde_json::json!({"maxUnavailable": 4}));
    let g = grants(&w, &p, NOW);
    assert_eq!(
        g,
        ["node-01", "node-04"],
        "both zone-a nodes, nothing from other zones"
    );
    let p = policy(serde_json::json!({"maxUnavailable": 4, "ordering": {"oneZoneAtATime": false}}));
    assert_eq!(grants(&w, &p, NOW).len(), 4);
}

#[test]
fn a_node_selected_by_two_policies_is_reported_and_left_alone() {
    let w = world(2);
    let mut snap = w.snapshot();
    let sel = Selector::compile(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some(
                [(
                    "topology.kubernetes.io/zone".to_string(),
                    "zone-a".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
    )
    .unwrap();
    snap.other_policies.push(("other".into(), sel));
    let plan = decide(&snap, &policy(serde_json::json!({})), at(NOW));
    assert_eq!(plan.conflicts.len(), 2);
    assert_eq!(plan.conflicts[0].others, ["other"]);
    assert_eq!(plan.grants().count(), 0);
    assert_eq!(plan.counts.nodes, 0);
}

#[test]
fn malformed_annotations_are_reported_not_trusted() {
    let mut w = world(2);
    let err = crds::protocol::STATE.parse("Rebooted").unwrap_err();
    w.node_mut("node-01").unwrap().malformed.push(err);
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert!(
        matches!(plan.node("node-01"), Some(Action::Skip(Skip::Malformed(e))) if e[0].contains("baton.dev/state"))
    );
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-02"]);
}

#[test]
fn blocking_pods_and_closed_gates_block_grants() {
    let mut w = world(2);
    w.node_mut("node-01").unwrap().blocked_by = Some("pod default/backup-1".into());
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::Blocked("pod default/backup-1".into())))
    );
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-02"]);
    let mut snap = w.snapshot();
    snap.gate = Some("alert NodeDown firing".into());
    assert_eq!(
        decide(&snap, &policy(serde_json::json!({})), at(NOW))
            .grants()
            .count(),
        0
    );
}

#[test]
fn before_reboot_hooks_wait_then_time_out() {
    let mut w = world(1);
    w.leases.push(lease(&w, "node-01", NOW));
    w.node_mut("node-01").unwrap().unschedulable = true;
    let p = policy(
        serde_json::json!({"hooks": {"beforeReboot": {"annotations": ["example.com/ok"], "timeout": "10m"}}}),
    );
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::RunBeforeHooks {
            missing: vec!["example.com/ok".into()],
            deadline: at("2026-11-28T03:10:00Z")
        })
    );
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T03:10:00Z"));
    assert!(
        matches!(plan.node("node-01"), Some(Action::Fail { reason }) if reason.contains("before-reboot hook"))
    );
    w.node_mut("node-01")
        .unwrap()
        .true_annotations
        .insert("example.com/ok".into());
    assert_eq!(
        decide(&w.snapshot(), &p, at(NOW)).node("node-01"),
        Some(&Action::Drain { deadline: None })
    );
}

#[test]
fn after_reboot_hooks_run_before_the_uncordon() {
    let mut w = world(1);
    rebooted_into_the_new_version(&mut w, "node-01");
    let p = policy(
        serde_json::json!({"hooks": {"afterReboot": {"annotations": ["example.com/smoke"]}}}),
    );
    assert!(matches!(
        decide(&w.snapshot(), &p, at(NOW)).node("node-01"),
        Some(Action::RunAfterHooks { .. })
    ));
}

#[test]
fn a_drain_past_its_timeout_applies_on_timeout() {
    let mut w = world(1);
    let mut l = lease(&w, "node-01", NOW);
    l.drain_started = Some(at(NOW));
    w.leases.push(l);
    w.node_mut("node-01").unwrap().unschedulable = true;
    for (on, expected) in [
        ("Abort", OnTimeout::Abort),
        ("Force", OnTimeout::Force),
        ("Proceed", OnTimeout::Proceed),
    ] {
        let p = policy(serde_json::json!({"drain": {"timeout": "10m", "onTimeout": on}}));
        assert_eq!(
            decide(&w.snapshot(), &p, at("2026-11-28T03:05:00Z")).node("node-01"),
            Some(&Action::Drain {
                deadline: Some(at("2026-11-28T03:10:00Z"))
            })
        );
        assert_eq!(
            decide(&w.snapshot(), &p, at("2026-11-28T03:10:00Z")).node("node-01"),
            Some(&Action::DrainTimedOut(expected))
        );
    }
}

#[test]
fn a_drain_timing_out_under_abort_halts_the_pool_in_the_same_plan() {
    // node-02's drain times out under Abort while node-03 is released: with
    // maxFailedNodes 1, neither the released slot nor free room is granted beside it.
    let mut w = world(4);
    draining(&mut w, "node-02");
    rebooted_into_the_new_version(&mut w, "node-03");
    let p = policy(serde_json::json!({
        "maxUnavailable": 3,
        "drain": {"timeout": "10m", "onTimeout": "Abort"},
        "failurePolicy": {"maxFailedNodes": 1}
    }));
    let plan = decide(&w.snapshot(), &p, at("2026-11-28T03:10:00Z"));
    assert_eq!(
        plan.node("node-02"),
        Some(&Action::DrainTimedOut(OnTimeout::Abort))
    );
    assert!(plan.halted.is_some());
    assert_eq!(plan.grants().count(), 0, "{:?}", plan.nodes);
}

#[test]
fn a_whole_rollout_of_five_nodes_runs_one_at_a_time() {
    let mut w = world(5);
    let p = policy(serde_json::json!({}));
    let t = rollout::simulate::run(&mut w, &p, at(NOW), at("2026-11-29T00:00:00Z"), &|_| {
        SignedDuration::from_mins(5)
    });
    assert!(t.complete);
    assert_eq!(t.end, at("2026-11-28T03:25:00Z"));
    assert!(
        w.nodes
            .iter()
            .all(|n| n.agent.current_version == Version::new("2.0.0").ok() && !n.unschedulable)
    );
}

#[test]
fn a_leased_node_marked_failed_on_the_node_alone_stays_failed() {
    let mut w = world(2);
    w.leases.push(lease(&w, "node-01", NOW));
    w.node_mut("node-01").unwrap().failure = Some("drain timed out (onTimeout: Abort)".into());
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::Failed(
            "drain timed out (onTimeout: Abort)".into()
        )))
    );
    assert!(plan.halted.is_some());
    assert_eq!(plan.grants().count(), 0);
}

#[test]
fn a_node_released_after_its_update_counts_as_up_to_date() {
    let mut w = world(1);
    let mut l = lease(&w, "node-01", NOW);
    l.done = Some(at(NOW));
    w.leases.push(l);
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Release(ReleaseReason::Done))
    );
    assert_eq!((plan.counts.up_to_date, plan.counts.in_progress), (1, 0));
}

#[test]
fn a_node_whose_agent_never_reported_is_waiting_not_up_to_date() {
    let mut w = world(1);
    w.nodes[0].agent = Default::default();
    let plan = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::NotRequested(
            "agent has not reported".into()
        )))
    );
    assert_eq!((plan.counts.up_to_date, plan.counts.waiting), (0, 1));
}

#[test]
fn a_release_version_is_published_on_pool_nodes_that_lack_it_and_only_those() {
    let mut w = world(3);
    let release = serde_json::json!({"release": {
        "version": "2.0.0", "url": "https://example.invalid/os.img",
        "sha256": "0".repeat(64), "signature": format!("{}==", "A".repeat(86)),
    }});
    let p = policy(release);
    // node-02 has the version and the image; node-03 only the version (an older image).
    let n2 = w.node_mut("node-02").unwrap();
    n2.desired_version = Version::new("2.0.0").ok();
    n2.desired_release = p.release.clone();
    w.node_mut("node-03").unwrap().desired_version = Version::new("2.0.0").ok();
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(plan.publishes().collect::<Vec<_>>(), ["node-01", "node-03"]);
    let without = decide(&w.snapshot(), &policy(serde_json::json!({})), at(NOW));
    assert!(
        without.publishes().next().is_none(),
        "no release, nothing to publish"
    );
}

#[test]
fn a_release_is_published_in_the_order_the_rollout_takes_the_nodes() {
    // The snapshot lists nodes as the caches hold them (no order); the nodes granted
    // first must stage first.
    let mut w = world(6);
    w.nodes.reverse();
    w.nodes.swap(1, 4);
    let p = policy(serde_json::json!({"release": {
        "version": "2.0.0", "url": "https://example.invalid/os.img",
        "sha256": "0".repeat(64), "signature": format!("{}==", "A".repeat(86)),
    }}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(
        plan.publishes().collect::<Vec<_>>(),
        [
            "node-01", "node-02", "node-03", "node-04", "node-05", "node-06"
        ]
    );
}

// === Safety: the budget, sticky failures and winding down ===

fn pool_a(n: usize) -> World {
    let mut w = world(n);
    for node in &mut w.nodes {
        node.labels.insert("pool".into(), "a".into());
    }
    w
}

fn policy_a(extra: serde_json::Value) -> Policy {
    let mut spec = serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "a"}}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    policy(spec)
}

/// A node being drained (cordoned by baton, holding the lease) under `pool`.
fn draining(w: &mut World, node: &str) {
    let mut l = lease(w, node, NOW);
    l.drain_started = Some(at(NOW));
    w.leases.push(l);
    let n = w.node_mut(node).unwrap();
    n.unschedulable = true;
    n.cordoned_by_baton = true;
}

#[test]
fn a_node_in_flight_relabelled_out_of_the_pool_keeps_using_its_slot() {
    let mut w = pool_a(4);
    draining(&mut w, "node-01");
    w.node_mut("node-01")
        .unwrap()
        .labels
        .insert("pool".into(), "b".into());
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.grants().count(),
        0,
        "two disrupted under a budget of 1"
    );
    assert_eq!(plan.budget.unavailable, 1);
    assert!(
        matches!(plan.node("node-01"), Some(Action::Drain { .. })),
        "it finishes"
    );
    assert_eq!(plan.node("node-02"), Some(&Action::Skip(Skip::Budget)));
}

/// Found by the simulation (seed 7295): `kubectl baton retry` deleted node-01's Lease
/// while a reconcile that still saw it cordoned the node. No Lease holds it now: the
/// cordon is baton's to undo, and it counts against the budget until it is undone.
#[test]
fn baton_s_cordon_without_a_lease_is_undone_and_counts_until_then() {
    let mut w = pool_a(4);
    {
        let n = w.node_mut("node-01").unwrap();
        n.unschedulable = true;
        n.cordoned_by_baton = true;
    }
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(plan.node("node-01"), Some(&Action::ClearStaleGrant));
    assert_eq!(plan.grants().count(), 0, "node-01 is still down");
    // An admin's cordon is never baton's to undo.
    let mut w = pool_a(4);
    w.node_mut("node-01").unwrap().unschedulable = true;
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.node("node-01"),
        Some(&Action::Skip(Skip::CordonedByOthers))
    );
}

/// Found by the simulation (seed 45081): node-01 failed under policy `other`, whose
/// Lease still holds it, and an admin relabelled it into this pool. Its failure halts
/// this pool too, until an admin retries it.
#[test]
fn a_failed_node_relabelled_in_under_another_policys_lease_halts_this_pool() {
    let mut w = pool_a(4);
    let mut l = lease(&w, "node-01", NOW);
    l.policy = "other".into();
    l.failure = Some("agent reported RolledBack".into());
    w.leases.push(l);
    w.node_mut("node-01").unwrap().failure = Some("agent reported RolledBack".into());
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert!(plan.halted.is_some(), "{plan:?}");
    assert_eq!(plan.grants().count(), 0);
}

/// Found by the simulation (seed 37499): node-01's staging failed while a second
/// policy claimed it. Its failure halts this pool and is recorded on the node, so the
/// halt holds after the agent retries its staging on its own.
#[test]
fn a_contested_nodes_agent_failure_is_recorded_and_halts_the_pool() {
    let mut w = pool_a(4);
    {
        let n = w.node_mut("node-01").unwrap();
        n.agent.state = Some(AgentState::Failed);
        n.labels.insert("claimed".into(), "yes".into());
    }
    let mut snap = w.snapshot();
    snap.other_policies.push(("other".into(), claimed()));
    let plan = decide(&snap, &policy_a(serde_json::json!({})), at(NOW));
    assert!(plan.halted.is_some(), "{plan:?}");
    assert!(
        matches!(plan.node("node-01"), Some(Action::Fail { .. })),
        "{plan:?}"
    );
    assert_eq!(plan.grants().count(), 0);
}

/// Selects the nodes labelled `claimed=yes`.
fn claimed() -> Selector {
    Selector::compile(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("claimed".into(), "yes".into())].into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Found by the simulation (seed 83): policy `other` granted node-01 while this policy
/// was deleted; this policy, created again, selects node-01 too. node-01 is contested,
/// so it is left alone, but it is down: another grant here would make two.
#[test]
fn a_contested_node_down_under_another_policy_uses_this_pools_budget_too() {
    let mut w = pool_a(4);
    draining(&mut w, "node-01");
    w.leases[0].policy = "other".into();
    w.node_mut("node-01")
        .unwrap()
        .labels
        .insert("claimed".into(), "yes".into());
    let mut snap = w.snapshot();
    snap.other_policies.push(("other".into(), claimed()));
    let plan = decide(&snap, &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(plan.conflicts.len(), 1);
    assert_eq!(plan.budget.unavailable, 1);
    assert_eq!(
        plan.grants().count(),
        0,
        "two disrupted under a budget of 1"
    );
}

/// Found by the simulation (seed 394): node-01 failed staging and is marked failed;
/// then a second policy claims it. The claim is no retry: the pool stays halted.
#[test]
fn a_failed_node_claimed_by_a_second_policy_still_halts_its_pool() {
    let mut w = pool_a(4);
    {
        let n = w.node_mut("node-01").unwrap();
        n.failure = Some("agent reported Failed: staging failed".into());
        n.labels.insert("claimed".into(), "yes".into());
    }
    let mut snap = w.snapshot();
    snap.other_policies.push(("other".into(), claimed()));
    let plan = decide(&snap, &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(plan.conflicts.len(), 1);
    assert!(plan.halted.is_some(), "{plan:?}");
    assert_eq!(plan.grants().count(), 0);
}

#[test]
fn a_node_in_flight_claimed_by_a_second_policy_keeps_using_its_slot() {
    let mut w = pool_a(4);
    draining(&mut w, "node-01");
    let mut snap = w.snapshot();
    let claims_node_01 = Selector::compile(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("topology.kubernetes.io/zone".into(), "zone-a".into())].into()),
            ..Default::default()
        },
    )
    .unwrap();
    snap.other_policies.push(("other".into(), claims_node_01));
    let plan = decide(&snap, &policy_a(serde_json::json!({})), at(NOW));
    assert_eq!(
        plan.conflicts.len(),
        4,
        "every zone-a node is claimed twice"
    );
    assert_eq!(plan.grants().count(), 0);
    assert_eq!(plan.budget.unavailable, 1);
}

#[test]
fn an_agents_failure_report_without_a_lease_is_recorded_and_stays_until_retried() {
    let mut w = pool_a(3);
    let n = w.node_mut("node-02").unwrap();
    n.agent.state = Some(AgentState::Failed);
    n.agent.message = Some("staging failed: sha256 mismatch".into());
    let p = policy_a(serde_json::json!({}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(
        plan.node("node-02"),
        Some(&Action::Fail {
            reason: "agent reported Failed: staging failed: sha256 mismatch".into()
        })
    );
    assert!(plan.halted.is_some());
    assert_eq!(plan.grants().count(), 0);
    // The agent retries its staging and stops reporting the failure: the operator's
    // record still halts the pool.
    let n = w.node_mut("node-02").unwrap();
    n.failure = Some("agent reported Failed: staging failed: sha256 mismatch".into());
    n.agent.state = Some(AgentState::RebootRequired);
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert!(matches!(
        plan.node("node-02"),
        Some(Action::Skip(Skip::Failed(_)))
    ));
    assert!(plan.halted.is_some(), "a halt never lifts by itself");
    assert_eq!(plan.grants().count(), 0);
}

#[test]
fn a_failure_an_admin_retries_does_not_count_while_the_agent_drops_it() {
    let mut w = pool_a(2);
    let n = w.node_mut("node-02").unwrap();
    n.agent.state = Some(AgentState::RolledBack);
    n.retry = n.agent.boot_id.clone();
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert!(plan.halted.is_none());
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-01"]);
    // A retry mark naming another boot changes nothing.
    w.node_mut("node-02").unwrap().retry = crds::protocol::BootId::new("dead").ok();
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    assert!(plan.halted.is_some());
}

#[test]
fn a_failed_node_deleted_by_an_admin_keeps_the_pool_halted_until_a_retry() {
    let mut w = pool_a(3);
    let mut l = lease(&w, "node-01", NOW);
    l.failure = Some("drain timed out (onTimeout: Abort)".into());
    w.leases.push(l);
    w.nodes.retain(|n| n.name != "node-01");
    let plan = decide(&w.snapshot(), &policy_a(serde_json::json!({})), at(NOW));
    let Some(Action::Skip(Skip::Failed(why))) = plan.node("node-01") else {
        panic!("{plan:?}")
    };
    assert!(
        why.contains("node deleted") && why.contains("kubectl baton retry"),
        "{why}"
    );
    assert!(plan.halted.is_some());
    assert_eq!(plan.grants().count(), 0);
}

fn ending(extra: serde_json::Value, why: rollout::policy::Ending) -> Policy {
    let mut spec = serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "a"}}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    Policy::wind_down("pool", &serde_json::from_value(spec).unwrap(), why)
}

#[test]
fn a_deleted_policy_ends_grants_not_yet_rebooting_and_lets_a_reboot_under_way_finish() {
    use rollout::policy::Ending;
    let mut w = pool_a(4);
    draining(&mut w, "node-01");
    // node-02 was drained and given the grant: it may be rebooting right now.
    draining(&mut w, "node-02");
    let l = w.leases.iter_mut().find(|l| l.node == "node-02").unwrap();
    l.drained = Some(at(NOW));
    let granted = l.granted_boot_id.clone();
    w.node_mut("node-02").unwrap().agent.reboot_ok = granted;
    // node-03 failed earlier.
    draining(&mut w, "node-03");
    w.leases
        .iter_mut()
        .find(|l| l.node == "node-03")
        .unwrap()
        .failure = Some("x".into());
    let p = ending(serde_json::json!({}), Ending::Deleted);
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert!(matches!(plan.node("node-01"), Some(Action::Abort { .. })));
    assert!(matches!(
        plan.node("node-02"),
        Some(Action::WaitForReboot { .. })
    ));
    assert!(matches!(plan.node("node-03"), Some(Action::Abort { .. })));
    assert_eq!(plan.node("node-04"), None, "nothing new starts");
    assert_eq!(plan.holders, ["node-02"]);
    // node-02 comes back done: released at once, without the settle time.
    let n = w.node_mut("node-02").unwrap();
    n.agent.boot_id = crds::protocol::BootId::new("ffff").ok();
    n.agent.state = Some(AgentState::Done);
    n.agent.current_version = Version::new("2.0.0").ok();
    let p = ending(
        serde_json::json!({"health": {"settleTime": "1h"}}),
        Ending::Deleted,
    );
    assert_eq!(
        decide(&w.snapshot(), &p, at(NOW)).node("node-02"),
        Some(&Action::Finish {
            uncordon: true,
            release: true
        })
    );
    w.node_mut("node-02").unwrap().unschedulable = false;
    assert_eq!(
        decide(&w.snapshot(), &p, at(NOW)).node("node-02"),
        Some(&Action::Finish {
            uncordon: false,
            release: true
        })
    );
    w.leases
        .iter_mut()
        .find(|l| l.node == "node-02")
        .unwrap()
        .done = Some(at(NOW));
    assert_eq!(
        decide(&w.snapshot(), &p, at(NOW)).node("node-02"),
        Some(&Action::Release(ReleaseReason::Done))
    );
}

#[test]
fn an_invalid_spec_still_drives_nodes_in_flight_and_keeps_failures() {
    use rollout::policy::Ending;
    let mut w = pool_a(3);
    draining(&mut w, "node-01");
    draining(&mut w, "node-02");
    w.leases
        .iter_mut()
        .find(|l| l.node == "node-02")
        .unwrap()
        .failure = Some("x".into());
    let bad = serde_json::json!({"drain": {"podSelector": {"matchLabels": {"bad key": "x"}}}});
    assert!(Policy::from_spec("pool", &serde_json::from_value(bad.clone()).unwrap()).is_err());
    let plan = decide(&w.snapshot(), &ending(bad, Ending::InvalidSpec), at(NOW));
    assert!(
        matches!(plan.node("node-01"), Some(Action::Abort { reason }) if reason.contains("invalid")),
        "its cordon is undone, not frozen: {plan:?}"
    );
    assert!(matches!(
        plan.node("node-02"),
        Some(Action::Skip(Skip::Failed(_)))
    ));
    assert_eq!(plan.grants().count(), 0);
}

#[test]
fn a_released_slot_still_counts_in_its_zone_until_the_release_is_seen() {
    // node-01 and node-04 are zone a, node-02 and node-05 zone b.
    let mut w = World::requesting(6, 3, "1", "2");
    rebooted_into_the_new_version(&mut w, "node-01");
    let p = policy(serde_json::json!({
        "maxUnavailable": 1,
        "maxUnavailablePerZone": 1,
        "ordering": {"oneZoneAtATime": false}
    }));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    // Zone a's cap still counts node-01: its slot goes to the next zone's node. A node
    // that cannot take a released slot waits on the budget, as it did before the release:
    // its reason does not flicker to the zone for one pass.
    assert_eq!(plan.node("node-04"), Some(&Action::Skip(Skip::Budget)));
    assert_eq!(taking_over(&plan), [("node-02", "node-01")]);

    // One zone at a time: zone a stays the zone in progress until the release is seen.
    w.node_mut("node-04").unwrap().agent.state = None;
    let p = policy(serde_json::json!({}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert!(taking_over(&plan).is_empty(), "{:?}", plan.nodes);
    assert_eq!(plan.node("node-02"), Some(&Action::Skip(Skip::Budget)));
    assert_eq!(
        rollout::why::action("node-02", &plan, &p, at(NOW)).as_deref(),
        Some("budget 1/1 in use by node-01 (releasing)")
    );

    // With room of its own, the zone is the reason.
    let p = policy(serde_json::json!({"maxUnavailable": 2}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(
        plan.node("node-02"),
        Some(&Action::Skip(Skip::OtherZone("zone-a".into())))
    );
    assert_eq!(
        rollout::why::action("node-02", &plan, &p, at(NOW)).as_deref(),
        Some("zone zone-a is in progress (one zone at a time)")
    );
}
