//! Control-plane nodes and the etcd quorum guard, one test per behaviour, and a
//! property test over random pools: never two members down, never a leader rebooted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use rollout::{
    Action, Policy, Skip, decide,
    etcd::{Etcd, Hold, MAX_LAG, Member},
    simulate::{EventKind, World},
};

const NOW: &str = "2026-11-28T03:00:00Z";
const CP: &str = "node-role.kubernetes.io/control-plane";

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn policy(json: serde_json::Value) -> Policy {
    Policy::from_spec("pool", &serde_json::from_value(json).unwrap()).unwrap()
}

fn member(i: usize, node: &str) -> Member {
    Member {
        id: 100 + i as u64,
        name: node.to_string(),
        node: Some(node.to_string()),
        client_url: Some(format!("https://127.0.0.1:{}", 2379 + i)),
        healthy: true,
        problem: None,
        leader: i == 0,
        raft_index: Some(5_000),
        learner: false,
    }
}

/// `n` nodes asking to reboot; the first `cp` are control-plane nodes, each with a
/// healthy etcd member, the first of them leading.
fn world(n: usize, cp: usize) -> World {
    let mut w = World::requesting(n, 1, "1.0.0", "2.0.0");
    let mut members = Vec::new();
    for i in 0..cp {
        let node = &mut w.nodes[i];
        node.labels.insert(CP.into(), String::new());
        members.push(member(i, &node.name));
    }
    if cp > 0 {
        w.etcd = Etcd::Members(members);
    }
    w
}

fn members(w: &mut World) -> &mut Vec<Member> {
    match &mut w.etcd {
        Etcd::Members(m) => m,
        _ => panic!("no members"),
    }
}

fn grants(w: &World, p: &Policy) -> Vec<String> {
    decide(&w.snapshot(), p, at(NOW))
        .grants()
        .map(String::from)
        .collect()
}

fn skip_of(w: &World, p: &Policy, node: &str) -> Skip {
    match decide(&w.snapshot(), p, at(NOW)).node(node) {
        Some(Action::Skip(s)) => s.clone(),
        other => panic!("{node}: {other:?}"),
    }
}

#[test]
fn control_plane_nodes_go_one_at_a_time_whatever_the_budget() {
    let w = world(3, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    assert_eq!(grants(&w, &p), ["node-01"]);
}

#[test]
fn control_plane_nodes_wait_for_the_workers_by_default() {
    let w = world(6, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    let granted = grants(&w, &p);
    assert_eq!(granted, ["node-04", "node-05", "node-06"]);
    assert!(
        matches!(skip_of(&w, &p, "node-01"), Skip::ControlPlane(why) if why.contains("workers go first"))
    );
}

#[test]
fn workers_held_by_an_admin_do_not_hold_the_control_plane_nodes() {
    let mut w = world(5, 3);
    w.node_mut("node-04").unwrap().paused = true;
    let n5 = w.node_mut("node-05").unwrap();
    n5.unschedulable = true;
    // (node-05, cordoned, uses one of the two slots.)
    let p = policy(serde_json::json!({"maxUnavailable": 2}));
    assert_eq!(grants(&w, &p), ["node-01"]);
}

#[test]
fn control_plane_first_takes_them_before_the_workers() {
    let w = world(6, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 3, "ordering": {"controlPlane": "First"}}));
    assert_eq!(grants(&w, &p), ["node-01"]);
    assert!(
        matches!(skip_of(&w, &p, "node-04"), Skip::ControlPlane(why) if why.contains("go first"))
    );
}

#[test]
fn control_plane_any_mixes_them_in_but_still_one_at_a_time() {
    let w = world(6, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 3, "ordering": {"controlPlane": "Any"}}));
    assert_eq!(grants(&w, &p), ["node-01", "node-04", "node-05"]);
}

#[test]
fn a_control_plane_node_not_ready_holds_the_others() {
    let mut w = world(3, 3);
    w.node_mut("node-02").unwrap().ready = false;
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    assert_eq!(grants(&w, &p), Vec::<String>::new());
    assert!(
        matches!(skip_of(&w, &p, "node-01"), Skip::ControlPlane(why) if why.contains("node-02"))
    );
}

#[test]
fn an_unhealthy_member_blocks_every_control_plane_grant_with_its_reason() {
    let mut w = world(3, 3);
    members(&mut w)[2].healthy = false;
    members(&mut w)[2].problem = Some("connection refused".into());
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    assert_eq!(grants(&w, &p), Vec::<String>::new());
    let skip = skip_of(&w, &p, "node-01");
    assert_eq!(
        skip,
        Skip::Etcd(Hold::Unhealthy {
            member: "node-03".into(),
            problem: "connection refused".into()
        })
    );
    assert_eq!(
        skip.to_string(),
        "etcd quorum guard: etcd member node-03 is unhealthy: connection refused"
    );
    // Its own node too: an unhealthy member is for an admin to look at first.
    assert!(matches!(
        skip_of(&w, &p, "node-03"),
        Skip::Etcd(Hold::Unhealthy { .. })
    ));
}

#[test]
fn a_member_behind_its_leader_blocks_control_plane_grants() {
    let mut w = world(3, 3);
    members(&mut w)[1].raft_index = Some(5_000 - MAX_LAG - 1);
    let p = policy(serde_json::json!({"maxUnavailable": 1}));
    assert!(matches!(
        skip_of(&w, &p, "node-01"),
        Skip::Etcd(Hold::Behind { entries, .. }) if entries == MAX_LAG + 1
    ));
    members(&mut w)[1].raft_index = Some(5_000 - MAX_LAG);
    assert_eq!(grants(&w, &p), ["node-01"]);
}

#[test]
fn unreachable_etcd_blocks_control_plane_nodes_but_not_workers() {
    let mut w = world(4, 3);
    w.etcd = Etcd::Unreachable("timed out".into());
    let p = policy(serde_json::json!({"maxUnavailable": 1, "ordering": {"controlPlane": "Any"}}));
    assert!(matches!(
        skip_of(&w, &p, "node-01"),
        Skip::Etcd(Hold::Unreachable(_))
    ));
    assert_eq!(grants(&w, &p), ["node-04"]);
}

#[test]
fn external_etcd_and_etcd_not_observed_are_said_so_and_do_not_block() {
    let mut w = world(3, 3);
    for m in members(&mut w) {
        m.node = None;
        m.name = format!("etcd-{}", m.id);
    }
    assert!(w.etcd.external());
    assert!(w.etcd.summary().contains("external etcd"));
    let p = policy(serde_json::json!({"maxUnavailable": 3}));
    assert_eq!(grants(&w, &p), ["node-01"]);
    w.etcd = Etcd::NotObserved;
    assert!(w.etcd.summary().contains("not observed"));
    assert_eq!(grants(&w, &p), ["node-01"]);
}

/// Runs the leader's node to the step before its reboot: granted, cordoned, drained.
fn drained(w: &mut World, p: &Policy) -> Action {
    let mut now = at(NOW);
    for _ in 0..10 {
        let plan = decide(&w.snapshot(), p, now);
        let action = plan.node("node-01").cloned().unwrap();
        if matches!(
            action,
            Action::MoveLeader { .. } | Action::WaitForEtcd { .. } | Action::AllowReboot { .. }
        ) {
            return action;
        }
        w.apply(&plan, p, now, &|_| SignedDuration::from_mins(2));
        now = now.checked_add(SignedDuration::from_secs(1)).unwrap();
    }
    panic!("node-01 never got to its reboot");
}

#[test]
fn the_leaders_node_moves_leadership_to_the_member_furthest_ahead_before_it_reboots() {
    let mut w = world(3, 3);
    members(&mut w)[1].raft_index = Some(4_990);
    members(&mut w)[2].raft_index = Some(4_999);
    let p = policy(serde_json::json!({"maxUnavailable": 1}));
    let action = drained(&mut w, &p);
    assert_eq!(
        action,
        Action::MoveLeader {
            from: "node-01".into(),
            leader_url: "https://127.0.0.1:2379".into(),
            to: "node-03".into(),
            to_id: 102,
        }
    );
    // Once it no longer leads, the reboot is allowed.
    members(&mut w)[0].leader = false;
    members(&mut w)[2].leader = true;
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::AllowReboot { .. })
    ));
}

#[test]
fn a_leader_with_no_healthy_successor_waits_and_never_reboots_as_leader() {
    let mut w = world(3, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 1}));
    // Granted while etcd was healthy; then a follower behind by more than the bound.
    let plan = decide(&w.snapshot(), &p, at(NOW));
    w.apply(&plan, &p, at(NOW), &|_| SignedDuration::from_mins(2));
    members(&mut w)[1].raft_index = Some(1);
    members(&mut w)[2].raft_index = Some(1);
    let action = drained(&mut w, &p);
    assert!(
        matches!(
            action,
            Action::WaitForEtcd {
                hold: Hold::Behind { .. },
                ..
            }
        ),
        "{action:?}"
    );
}

#[test]
fn a_rebooted_member_not_yet_caught_up_holds_its_lease_and_the_next_control_plane_grant() {
    let mut w = world(3, 3);
    let p = policy(serde_json::json!({"maxUnavailable": 1, "health": {"settleTime": "0s"}}));
    let horizon = at(NOW).checked_add(SignedDuration::from_hours(1)).unwrap();
    // Run until node-01 has rebooted and come back.
    let mut now = at(NOW);
    loop {
        w.advance(now);
        // Back, and not yet looked at by the operator.
        if w.nodes[0].agent.state == Some(crds::AgentState::Done) {
            break;
        }
        let plan = decide(&w.snapshot(), &p, now);
        w.apply(&plan, &p, now, &|_| SignedDuration::from_mins(2));
        now = now.checked_add(SignedDuration::from_secs(30)).unwrap();
        assert!(now < horizon);
    }
    // Its member answers, but trails the leader.
    let leader_index = w.etcd.leader().unwrap().raft_index.unwrap();
    members(&mut w)[0].raft_index = Some(leader_index - MAX_LAG - 500);
    let plan = decide(&w.snapshot(), &p, now);
    assert!(
        matches!(
            plan.node("node-01"),
            Some(Action::WaitForEtcd {
                hold: Hold::Behind { .. },
                ..
            })
        ),
        "{:?}",
        plan.node("node-01")
    );
    assert!(matches!(
        plan.node("node-02"),
        Some(Action::Skip(Skip::ControlPlane(_)))
    ));
    // Past rebootTimeout it fails, naming etcd.
    let late = now.checked_add(SignedDuration::from_hours(1)).unwrap();
    let plan = decide(&w.snapshot(), &p, late);
    assert!(
        matches!(plan.node("node-01"), Some(Action::Fail { reason }) if reason.contains("etcd member did not rejoin"))
    );
    // Caught up: it is done, and the next one goes.
    members(&mut w)[0].raft_index = Some(leader_index);
    let plan = decide(&w.snapshot(), &p, now);
    assert!(matches!(plan.node("node-01"), Some(Action::Finish { .. })));
}

#[test]
fn a_single_control_plane_node_goes_last_and_alone() {
    let w = world(4, 1);
    let p = policy(serde_json::json!({"maxUnavailable": 4}));
    assert_eq!(grants(&w, &p), ["node-02", "node-03", "node-04"]);
    let mut w = world(4, 1);
    let timeline = rollout::simulate::run(
        &mut w,
        &p,
        at(NOW),
        at(NOW).checked_add(SignedDuration::from_hours(3)).unwrap(),
        &|_| SignedDuration::from_mins(5),
    );
    let cp_granted = timeline
        .events
        .iter()
        .position(|e| e.node == "node-01" && matches!(e.what, EventKind::Granted { .. }))
        .unwrap();
    let released_before = timeline.events[..cp_granted]
        .iter()
        .filter(|e| matches!(e.what, EventKind::Released))
        .count();
    assert_eq!(
        released_before, 3,
        "every worker was done before: {:?}",
        timeline.events
    );
    assert!(
        timeline.events[cp_granted..]
            .iter()
            .all(|e| e.node == "node-01"),
        "nothing else moved while it was down"
    );
}

#[test]
fn while_the_only_control_plane_node_updates_nothing_else_starts() {
    let mut w = world(3, 1);
    let p = policy(serde_json::json!({"maxUnavailable": 3, "ordering": {"controlPlane": "First"}}));
    let plan = decide(&w.snapshot(), &p, at(NOW));
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-01"]);
    w.apply(&plan, &p, at(NOW), &|_| SignedDuration::from_mins(2));
    assert!(
        matches!(skip_of(&w, &p, "node-02"), Skip::ControlPlane(why) if why.contains("only control-plane node"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn never_two_control_plane_nodes_down_and_never_a_leader_rebooted(
        workers in 0usize..8,
        cp in 1usize..6,
        budget in 1u32..6,
        order in prop_oneof![Just("Last"), Just("First"), Just("Any")],
        reboot_mins in 1i64..20,
    ) {
        let mut w = world(cp + workers, cp);
        let p = policy(serde_json::json!({
            "maxUnavailable": budget,
            "ordering": {"controlPlane": order},
        }));
        let timeline = rollout::simulate::run(
            &mut w,
            &p,
            at(NOW),
            at(NOW).checked_add(SignedDuration::from_hours(48)).unwrap(),
            &|_| SignedDuration::from_mins(reboot_mins),
        );
        let is_cp = |n: &str| n.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i <= cp);
        let mut down = std::collections::BTreeSet::new();
        for e in &timeline.events {
            match e.what {
                EventKind::Granted { .. } if is_cp(&e.node) => {
                    down.insert(e.node.clone());
                    prop_assert!(down.len() <= 1, "two control-plane nodes in flight: {down:?}");
                }
                EventKind::Released => { down.remove(&e.node); }
                _ => {}
            }
        }
        // A single-member etcd has no one to hand leadership to.
        prop_assert!(cp == 1 || w.leaders_rebooted.is_empty(), "leaders rebooted: {:?}", w.leaders_rebooted);
        let done = w.nodes.iter().filter(|n| n.agent.state == Some(crds::AgentState::Done)).count();
        // Two members cannot lose one and keep quorum: their nodes never go (and with
        // `First`, nor do the workers behind them).
        let expected = match (cp, order) {
            (2, "First") => 0,
            (2, _) => workers,
            _ => cp + workers,
        };
        prop_assert_eq!(done, expected, "every node that may go is updated");
    }
}
