//! Freezes, one test per behaviour (the property tests run random pools through
//! freezes too, one over Berlin's spring-forward night).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::{SignedDuration, Timestamp};
use rollout::{
    Action, Policy, Skip, decide, simulate::World, snapshot::LeaseView, window::WindowState,
};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn policy(json: serde_json::Value) -> Policy {
    Policy::from_spec("pool", &serde_json::from_value(json).unwrap()).unwrap()
}

fn year_end(extra: serde_json::Value) -> Policy {
    let mut spec = serde_json::json!({
        "freezes": [{"start": "2026-12-20T00:00", "end": "2027-01-06T00:00",
                     "timeZone": "Europe/Berlin", "reason": "year-end freeze"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    policy(spec)
}

#[test]
fn nothing_new_starts_inside_a_freeze_even_in_an_open_window() {
    let w = World::requesting(2, 1, "1", "2");
    let p = year_end(serde_json::json!({}));
    // 2026-12-24 12:00 Berlin: no windows (always open), but frozen.
    let plan = decide(&w.snapshot(), &p, at("2026-12-24T11:00:00Z"));
    assert_eq!(plan.grants().count(), 0);
    let Some(Action::Skip(skip)) = plan.node("node-01") else {
        panic!("{:?}", plan.node("node-01"))
    };
    assert_eq!(
        skip.to_string(),
        "frozen: year-end freeze (2026-12-20 00:00 to 2027-01-06 00:00 Europe/Berlin)"
    );
    // Before and after it, grants go.
    assert_eq!(
        decide(&w.snapshot(), &p, at("2026-12-19T22:59:00Z"))
            .grants()
            .count(),
        1
    );
    assert_eq!(
        decide(&w.snapshot(), &p, at("2027-01-05T23:00:00Z"))
            .grants()
            .count(),
        1
    );
    assert_eq!(
        decide(&w.snapshot(), &p, at("2027-01-05T22:59:59Z"))
            .grants()
            .count(),
        0
    );
}

#[test]
fn a_node_in_flight_when_a_freeze_starts_finishes() {
    let w0 = World::requesting(2, 1, "1", "2");
    let mut w = w0.clone();
    let n = &w0.nodes[0];
    w.leases.push(LeaseView {
        name: "baton-reboot-node-01".into(),
        uid: None,
        resource_version: None,
        node: "node-01".into(),
        policy: "pool".into(),
        acquired: at("2026-12-19T22:50:00Z"),
        granted_boot_id: n.agent.boot_id.clone(),
        target_version: crds::protocol::Version::new("2").ok(),
        drain_started: Some(at("2026-12-19T22:51:00Z")),
        drained: Some(at("2026-12-19T22:52:00Z")),
        done: None,
        failure: None,
    });
    let node = w.node_mut("node-01").unwrap();
    node.unschedulable = true;
    node.cordoned_by_baton = true;
    let p = year_end(serde_json::json!({}));
    // 00:05 Berlin, inside the freeze.
    let plan = decide(&w.snapshot(), &p, at("2026-12-19T23:05:00Z"));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::AllowReboot { .. })
    ));
    assert!(matches!(
        plan.node("node-02"),
        Some(Action::Skip(Skip::Frozen(_)))
    ));
}

#[test]
fn a_window_closes_early_at_a_freeze_and_fit_refuses_what_would_run_into_it() {
    let p = year_end(serde_json::json!({
        "maintenanceWindows": [{"weekdays": ["Sat"], "start": "22:00", "duration": "4h", "timeZone": "Europe/Berlin"}],
        "windowMode": "Fit",
        "health": {"rebootTimeout": "1h"},
        "drain": {"timeout": "10m"},
    }));
    // Sat 2026-12-19 22:00 Berlin: the window would run to 02:00, the freeze starts 00:00.
    let state = p.windows.state(at("2026-12-19T21:00:00Z"));
    assert_eq!(
        state,
        WindowState::Open {
            closes: at("2026-12-19T23:00:00Z")
        }
    );
    let w = World::requesting(1, 1, "1", "2");
    // 23:00 Berlin: 70 min of drain and reboot do not fit before the freeze.
    let plan = decide(&w.snapshot(), &p, at("2026-12-19T22:00:00Z"));
    assert!(matches!(
        plan.node("node-01"),
        Some(Action::Skip(Skip::WindowTooShort(_)))
    ));
    // 22:30: they fit.
    assert_eq!(
        decide(&w.snapshot(), &p, at("2026-12-19T21:30:00Z"))
            .grants()
            .count(),
        1
    );
}

/// The window state at `now`, and the next opening as shown (in its own zone).
fn opening(p: &Policy, now: Timestamp) -> (WindowState, String) {
    let shown = p
        .windows
        .next_opening(now)
        .unwrap()
        .strftime("%Y-%m-%d %H:%M %Q")
        .to_string();
    (p.windows.state(now), shown)
}

#[test]
fn the_next_window_skips_the_freeze() {
    let p = year_end(serde_json::json!({
        "maintenanceWindows": [{"weekdays": ["Sat"], "start": "22:00", "duration": "4h", "timeZone": "Europe/Berlin"}],
    }));
    let now = at("2026-12-21T12:00:00Z");
    // Saturdays 26 Dec and 2 Jan fall in the freeze: the next is 9 Jan.
    assert_eq!(
        opening(&p, now),
        (
            WindowState::Closed {
                opens: Some(at("2027-01-09T21:00:00Z"))
            },
            "2027-01-09 22:00 Europe/Berlin".to_string()
        )
    );
    // Without windows, it opens when the freeze ends, shown in the freeze's zone.
    let p = year_end(serde_json::json!({}));
    assert_eq!(
        opening(&p, now),
        (
            WindowState::Closed {
                opens: Some(at("2027-01-05T23:00:00Z"))
            },
            "2027-01-06 00:00 Europe/Berlin".to_string()
        )
    );
    // A window still open when the freeze ends opens then.
    let p = policy(serde_json::json!({
        "maintenanceWindows": [{"schedule": "0 0 * * *", "duration": "6h", "timeZone": "UTC"}],
        "freezes": [{"start": "2026-12-01T00:00", "end": "2026-12-01T02:00"}],
    }));
    assert_eq!(
        p.windows.state(at("2026-12-01T01:00:00Z")),
        WindowState::Closed {
            opens: Some(at("2026-12-01T02:00:00Z"))
        }
    );
}

#[test]
fn freezes_across_dst_changes_resolve_to_the_right_instants() {
    // Berlin springs forward 2027-03-28 02:00 -> 03:00: a 02:30 end does not exist and
    // moves forward to 03:30 CEST (01:30Z). It falls back 2026-10-25 03:00 -> 02:00: a
    // 02:30 start happens twice and takes the first (CEST, 00:30Z).
    let p = policy(serde_json::json!({"freezes": [
        {"start": "2027-03-27T12:00", "end": "2027-03-28T02:30", "timeZone": "Europe/Berlin"},
        {"start": "2026-10-25T02:30", "end": "2026-10-25T04:00", "timeZone": "Europe/Berlin"},
    ]}));
    let spring = p.windows.freeze_at(at("2027-03-28T01:29:59Z")).unwrap();
    assert_eq!(spring.end, at("2027-03-28T01:30:00Z"));
    assert!(p.windows.freeze_at(at("2027-03-28T01:30:00Z")).is_none());
    let autumn = p.windows.freeze_at(at("2026-10-25T00:30:00Z")).unwrap();
    assert_eq!(autumn.start, at("2026-10-25T00:30:00Z"));
    assert!(p.windows.freeze_at(at("2026-10-25T00:29:59Z")).is_none());
    // 04:00 CET is 03:00Z: a freeze of 2.5 h of real time across the fall-back hour.
    assert_eq!(
        autumn.end.duration_since(autumn.start),
        SignedDuration::from_mins(150)
    );
}

#[test]
fn a_freeze_that_cannot_be_used_is_an_invalid_spec_naming_its_field() {
    let spec: crds::UpdatePolicySpec = serde_json::from_value(serde_json::json!({"freezes": [
        {"start": "2026-12-20T00:00", "end": "2027-01-06T00:00", "timeZone": "Mars/Olympus"},
        {"start": "2026-12-20", "end": "2027-01-06T00:00"},
    ]}))
    .unwrap();
    let errors = Policy::from_spec("p", &spec).unwrap_err();
    let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.freezes[0].timeZone", "spec.freezes[1].start"]
    );
}

#[test]
fn the_plan_waits_out_a_freeze() {
    let mut w = World::requesting(2, 1, "1", "2");
    let p = year_end(serde_json::json!({}));
    let timeline = rollout::simulate::run(
        &mut w,
        &p,
        at("2026-12-19T23:00:00Z"),
        at("2027-01-10T00:00:00Z"),
        &|_| SignedDuration::from_mins(10),
    );
    let grants: Vec<Timestamp> = timeline
        .events
        .iter()
        .filter(|e| matches!(e.what, rollout::simulate::EventKind::Granted { .. }))
        .map(|e| e.at)
        .collect();
    assert_eq!(
        grants,
        [at("2027-01-05T23:00:00Z"), at("2027-01-05T23:10:00Z")]
    );
}
