//! `kubectl baton plan` on 20 nodes in two zones with two weekend windows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use jiff::{SignedDuration, tz::TimeZone};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use kube::api::ObjectMeta;

use crds::UpdatePolicy;
use kubectl_baton::plan::{PlanOptions, render};

fn node(i: usize) -> Node {
    let zone = if i <= 10 { "zone-a" } else { "zone-b" };
    Node {
        metadata: ObjectMeta {
            name: Some(format!("node-{i:02}")),
            labels: Some(BTreeMap::from([
                ("topology.kubernetes.io/zone".to_string(), zone.to_string()),
                ("pool".to_string(), "workers".to_string()),
            ])),
            ..Default::default()
        },
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const POLICY: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: UpdatePolicy
metadata: {name: workers}
spec:
  nodeSelector: {matchLabels: {pool: workers}}
  maxUnavailable: 2
  maintenanceWindows:
    - {weekdays: [Sat], start: "02:00", duration: 4h, timeZone: UTC}
    - {schedule: "0 2 * * 0", duration: 4h, timeZone: UTC}
"#;

fn opts() -> PlanOptions {
    PlanOptions {
        start: "2026-11-27T12:00:00Z".parse().unwrap(), // Friday noon
        horizon: SignedDuration::from_hours(24 * 14),
        reboot_time: SignedDuration::from_mins(30),
        node_reboot_times: BTreeMap::new(),
        time_zone: TimeZone::UTC,
        operator_node: None,
    }
}

#[test]
fn prints_a_correct_timeline_for_twenty_nodes_and_two_windows() {
    let policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    let nodes: Vec<Node> = (1..=20).map(node).collect();
    let out = render(&policy, &nodes, &opts()).unwrap();
    println!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("Plan for UpdatePolicy workers: 20 nodes, maxUnavailable 2 (2 at once), 2 maintenance windows, reboot time 30m"));
    assert_eq!(lines.len(), 1 + 1 + 20 + 1);
    let row = |node: &str| -> Vec<String> {
        let line = lines.iter().find(|l| l.contains(node)).unwrap();
        line.split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    // Zone a first, two at a time, from the Saturday window's opening.
    assert_eq!(
        row("node-01"),
        [
            "2026-11-28 02:00 UTC",
            "node-01",
            "zone-a",
            "#1 (closes 06:00)",
            "2026-11-28 02:30 UTC"
        ]
    );
    assert_eq!(
        row("node-02"),
        [
            "2026-11-28 02:00 UTC",
            "node-02",
            "zone-a",
            "#1 (closes 06:00)",
            "2026-11-28 02:30 UTC"
        ]
    );
    assert_eq!(row("node-10")[0], "2026-11-28 04:00 UTC");
    // Then zone b; the last Saturday start is 05:30, ending as the window closes.
    assert_eq!(row("node-11")[0], "2026-11-28 04:30 UTC");
    assert_eq!(
        row("node-16"),
        [
            "2026-11-28 05:30 UTC",
            "node-16",
            "zone-b",
            "#1 (closes 06:00)",
            "2026-11-28 06:00 UTC"
        ]
    );
    // The remaining four wait for Sunday's window.
    assert_eq!(
        row("node-17"),
        [
            "2026-11-29 02:00 UTC",
            "node-17",
            "zone-b",
            "#2 (closes 06:00)",
            "2026-11-29 02:30 UTC"
        ]
    );
    assert_eq!(row("node-20")[0], "2026-11-29 02:30 UTC");
    assert_eq!(
        *lines.last().unwrap(),
        "Expected end: 2026-11-29 03:00 UTC (20 of 20 nodes updated)"
    );
}

#[test]
fn a_slow_node_and_the_operator_node_change_the_timeline() {
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    policy.spec.health.reboot_timeout = "2h".into();
    let nodes: Vec<Node> = (1..=4).map(node).collect();
    let mut o = opts();
    o.operator_node = Some("node-01".into());
    o.node_reboot_times
        .insert("node-02".into(), SignedDuration::from_mins(90));
    let out = render(&policy, &nodes, &o).unwrap();
    println!("{out}");
    let line = |n: &str| out.lines().find(|l| l.contains(n)).unwrap().to_string();
    assert!(
        line("node-02").starts_with("2026-11-28 02:00")
            && line("node-02").ends_with("2026-11-28 03:30 UTC")
    );
    assert!(line("node-03").starts_with("2026-11-28 02:00"));
    assert!(line("node-04").starts_with("2026-11-28 02:30"));
    // The operator's node goes last, after node-04 frees a slot.
    assert!(
        line("node-01").starts_with("2026-11-28 03:00"),
        "{}",
        line("node-01")
    );
}

#[test]
fn an_invalid_policy_is_refused_with_every_problem() {
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    policy.spec.maintenance_windows[0].time_zone = "Nowhere/Land".into();
    policy.spec.health.reboot_timeout = "later".into();
    let err = render(&policy, &[], &opts()).unwrap_err().to_string();
    assert!(
        err.contains("Nowhere/Land") && err.contains("rebootTimeout"),
        "{err}"
    );
}

#[test]
fn a_reboot_slower_than_the_reboot_timeout_shows_as_a_failure_that_halts() {
    let policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    let nodes: Vec<Node> = (1..=4).map(node).collect();
    let mut o = opts();
    o.reboot_time = SignedDuration::from_mins(45);
    let out = render(&policy, &nodes, &o).unwrap();
    println!("{out}");
    assert!(
        out.contains("FAILED: did not reboot within rebootTimeout (30m)"),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("Incomplete within 336h: 0 of 4 nodes updated")
    );
}

#[test]
fn a_window_that_never_opens_is_named_by_plan() {
    let policy: UpdatePolicy =
        serde_yaml_ng::from_str(&POLICY.replace("0 2 * * 0", "0 2 30 2 *")).unwrap();
    let nodes: Vec<Node> = (1..=3).map(node).collect();
    let err = render(&policy, &nodes, &opts()).unwrap_err().to_string();
    assert!(
        err.contains("spec.maintenanceWindows[1].schedule") && err.contains("never opens"),
        "{err}"
    );
}
