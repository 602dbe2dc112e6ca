//! `spec.urgency`: past its deadline, windows (and, if asked, freezes) stop gating a
//! release not yet done; everything else still holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::{SignedDuration, Timestamp};
use rollout::{Action, Policy, Skip, decide, simulate::World};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// Windows only on 1 January; a freeze over 10 December; urgent by 5 December.
fn urgent(override_freezes: bool, extra: serde_json::Value) -> Policy {
    let mut spec = serde_json::json!({
        "maintenanceWindows": [{"schedule": "0 0 1 1 *", "duration": "4h"}],
        "freezes": [{"start": "2026-12-10T00:00", "end": "2026-12-11T00:00"}],
        "urgency": {"deadline": "2026-12-05T00:00:00Z", "overrideFreezes": override_freezes},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap()
}

fn skip_of(w: &World, p: &Policy, now: &str, node: &str) -> Skip {
    match decide(&w.snapshot(), p, at(now)).node(node) {
        Some(Action::Skip(s)) => s.clone(),
        other => panic!("{node}: {other:?}"),
    }
}

#[test]
fn before_the_deadline_windows_gate_and_past_it_they_do_not() {
    let w = World::requesting(3, 1, "1", "2");
    let p = urgent(false, serde_json::json!({}));
    let before = decide(&w.snapshot(), &p, at("2026-12-04T23:59:00Z"));
    assert_eq!(before.grants().count(), 0);
    assert!(before.urgent.is_none());
    // It looks again at the deadline.
    assert_eq!(before.next_change, Some(at("2026-12-05T00:00:00Z")));
    let after = decide(&w.snapshot(), &p, at("2026-12-05T00:00:00Z"));
    assert_eq!(
        after.grants().collect::<Vec<_>>(),
        ["node-01"],
        "the budget still holds"
    );
    assert_eq!(
        after.urgent.as_deref(),
        Some(
            "the urgency deadline 2026-12-05T00:00:00Z passed with 3 node(s) not updated: windows no longer gate them"
        )
    );
}

#[test]
fn freezes_still_hold_unless_the_urgency_overrides_them() {
    let w = World::requesting(2, 1, "1", "2");
    let frozen = "2026-12-10T12:00:00Z";
    assert!(matches!(
        skip_of(&w, &urgent(false, serde_json::json!({})), frozen, "node-01"),
        Skip::Frozen(_)
    ));
    let p = urgent(true, serde_json::json!({}));
    let plan = decide(&w.snapshot(), &p, at(frozen));
    assert_eq!(plan.grants().count(), 1);
    assert!(
        plan.urgent
            .unwrap()
            .contains("windows and freezes no longer gate")
    );
}

#[test]
fn halts_pauses_and_the_alert_gate_still_hold_past_the_deadline() {
    let now = "2026-12-06T00:00:00Z";
    let w = World::requesting(2, 1, "1", "2");
    let paused = urgent(false, serde_json::json!({"paused": true}));
    assert_eq!(skip_of(&w, &paused, now, "node-01"), Skip::PolicyPaused);
    let mut halted = World::requesting(2, 1, "1", "2");
    halted.node_mut("node-02").unwrap().failure = Some("broke".into());
    assert_eq!(
        skip_of(
            &halted,
            &urgent(false, serde_json::json!({})),
            now,
            "node-01"
        ),
        Skip::Halted
    );
    let mut snapshot = w.snapshot();
    snapshot.gate = Some("alert NodeDown firing".into());
    let plan = decide(&snapshot, &urgent(false, serde_json::json!({})), at(now));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::Skip(Skip::Gate(_)))
    ));
}

#[test]
fn once_every_node_is_done_the_pool_is_no_longer_urgent() {
    let mut w = World::requesting(2, 1, "1", "2");
    let p = urgent(false, serde_json::json!({"health": {"settleTime": "0s"}}));
    let timeline = rollout::simulate::run(
        &mut w,
        &p,
        at("2026-12-01T00:00:00Z"),
        at("2026-12-08T00:00:00Z"),
        &|_| SignedDuration::from_mins(10),
    );
    let first = timeline.events.first().unwrap();
    assert_eq!(
        first.at,
        at("2026-12-05T00:00:00Z"),
        "nothing before the deadline"
    );
    let plan = decide(&w.snapshot(), &p, at("2026-12-07T00:00:00Z"));
    assert!(plan.urgent.is_none(), "{:?}", plan.urgent);
}

#[test]
fn a_deadline_that_is_not_rfc_3339_is_an_invalid_spec() {
    let spec: crds::UpdatePolicySpec =
        serde_json::from_value(serde_json::json!({"urgency": {"deadline": "next friday"}}))
            .unwrap();
    let errors = Policy::from_spec("p", &spec).unwrap_err();
    assert_eq!(errors[0].field, "spec.urgency.deadline");
}
