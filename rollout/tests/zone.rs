//! `maxUnavailablePerZone`, one test per behaviour (the property test in
//! `properties.rs` checks the cap over random pools and faults).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::Timestamp;
use rollout::{Action, Policy, Skip, decide, simulate::World};

const NOW: &str = "2026-11-28T03:00:00Z";

fn policy(json: serde_json::Value) -> Policy {
    Policy::from_spec("pool", &serde_json::from_value(json).unwrap()).unwrap()
}

fn grants(w: &World, p: &Policy) -> Vec<String> {
    decide(&w.snapshot(), p, NOW.parse::<Timestamp>().unwrap())
        .grants()
        .map(String::from)
        .collect()
}

fn skip_of(w: &World, p: &Policy, node: &str) -> Skip {
    match decide(&w.snapshot(), p, NOW.parse().unwrap()).node(node) {
        Some(Action::Skip(s)) => s.clone(),
        other => panic!("{node}: {other:?}"),
    }
}

#[test]
fn a_count_caps_every_zone_under_a_larger_budget() {
    // 6 nodes round-robin over zones a, b, c: two per zone.
    let w = World::requesting(6, 3, "1", "2");
    let p = policy(serde_json::json!({
        "maxUnavailable": 6, "maxUnavailablePerZone": 1, "ordering": {"oneZoneAtATime": false}}));
    assert_eq!(grants(&w, &p), ["node-01", "node-02", "node-03"]);
    assert_eq!(
        skip_of(&w, &p, "node-04"),
        Skip::ZoneBudget("zone-a".into())
    );
}

#[test]
fn a_percentage_is_of_the_zones_nodes_rounded_down_minimum_one() {
    // 9 nodes in 2 zones: a has 5 (1,3,5,7,9), b has 4 (2,4,6,8).
    let w = World::requesting(9, 2, "1", "2");
    let p = policy(serde_json::json!({
        "maxUnavailable": "100%", "maxUnavailablePerZone": "50%",
        "ordering": {"oneZoneAtATime": false}}));
    let granted = grants(&w, &p);
    let in_a = granted
        .iter()
        .filter(|n| ["node-01", "node-03", "node-05", "node-07", "node-09"].contains(&n.as_str()))
        .count();
    assert_eq!((in_a, granted.len() - in_a), (2, 2), "{granted:?}");
    // 10% of 4 nodes rounds down to 0: the minimum is 1.
    let p = policy(serde_json::json!({
        "maxUnavailable": "100%", "maxUnavailablePerZone": "10%",
        "ordering": {"oneZoneAtATime": false}}));
    assert_eq!(grants(&w, &p).len(), 2);
}

#[test]
fn unavailable_nodes_count_against_their_zone() {
    let mut w = World::requesting(6, 3, "1", "2");
    w.node_mut("node-01").unwrap().ready = false; // zone-a
    let p = policy(serde_json::json!({
        "maxUnavailable": 6, "maxUnavailablePerZone": 1, "ordering": {"oneZoneAtATime": false}}));
    assert_eq!(grants(&w, &p), ["node-02", "node-03"]);
    assert_eq!(
        skip_of(&w, &p, "node-04"),
        Skip::ZoneBudget("zone-a".into())
    );
}

#[test]
fn nodes_without_a_zone_label_form_one_zone() {
    let mut w = World::requesting(4, 1, "1", "2");
    for n in &mut w.nodes {
        n.labels.clear();
    }
    let p = policy(serde_json::json!({"maxUnavailable": 4, "maxUnavailablePerZone": 2}));
    assert_eq!(grants(&w, &p), ["node-01", "node-02"]);
    let skip = skip_of(&w, &p, "node-03");
    assert_eq!(skip, Skip::ZoneBudget("(no zone)".into()));
    assert_eq!(
        skip.to_string(),
        "maxUnavailablePerZone reached in zone \"(no zone)\""
    );
}

#[test]
fn it_applies_together_with_one_zone_at_a_time() {
    let w = World::requesting(6, 2, "1", "2");
    let p = policy(serde_json::json!({"maxUnavailable": 6, "maxUnavailablePerZone": 2}));
    // One zone at a time (zone-a: 1, 3, 5), two of it at once.
    assert_eq!(grants(&w, &p), ["node-01", "node-03"]);
}

#[test]
fn an_invalid_cap_is_an_invalid_spec_naming_the_field() {
    let spec: crds::UpdatePolicySpec =
        serde_json::from_value(serde_json::json!({"maxUnavailablePerZone": "0%"})).unwrap();
    let errors = Policy::from_spec("p", &spec).unwrap_err();
    assert_eq!(errors[0].field, "spec.maxUnavailablePerZone");
}
