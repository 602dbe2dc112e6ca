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
fn a_single_control_plane_node_goes_last_alone_and_plan_warns_that_the_api_is_down() {
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    policy.spec.maintenance_windows.clear();
    let mut nodes: Vec<Node> = (1..=4).map(node).collect();
    nodes[0].metadata.labels.as_mut().unwrap().insert(
        "node-role.kubernetes.io/control-plane".into(),
        String::new(),
    );
    let out = render(&policy, &nodes, &opts()).unwrap();
    println!("{out}");
    let start = |n: &str| {
        let line = out.lines().find(|l| l.contains(n)).unwrap();
        line.get(..16).unwrap().to_string()
    };
    // Three workers two at a time (12:00, 12:00, 12:30), then node-01 alone (13:00).
    assert_eq!(start("node-02"), "2026-11-27 12:00");
    assert_eq!(start("node-04"), "2026-11-27 12:30");
    assert_eq!(start("node-01"), "2026-11-27 13:00");
    let last = out.lines().rfind(|l| l.starts_with("2026-")).unwrap();
    assert!(last.contains("node-01"), "it goes last:\n{out}");
    assert!(
        out.contains("warning: node-01 is the cluster's only control-plane node: it goes alone, last, and the Kubernetes API is down while it reboots (about 30m here)"),
        "{out}"
    );
    // With two control-plane nodes there is no such warning.
    nodes[1].metadata.labels.as_mut().unwrap().insert(
        "node-role.kubernetes.io/control-plane".into(),
        String::new(),
    );
    let out = render(&policy, &nodes, &opts()).unwrap();
    assert!(!out.contains("warning:"), "{out}");
}

#[test]
fn a_per_zone_cap_shows_in_the_timeline() {
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    policy.spec.maintenance_windows.clear();
    policy.spec.max_unavailable = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4);
    policy.spec.max_unavailable_per_zone =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1));
    policy.spec.ordering.one_zone_at_a_time = false;
    let nodes: Vec<Node> = (1..=20).map(node).collect();
    let out = render(&policy, &nodes, &opts()).unwrap();
    println!("{out}");
    // Two zones of ten, one node of each at a time: 10 rounds of 30 min, 2 per round.
    let starts: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("2026-"))
        .map(|l| l.get(..16).unwrap())
        .collect();
    let first = starts.iter().filter(|s| **s == "2026-11-27 12:00").count();
    assert_eq!(first, 2, "{out}");
    assert!(out.contains("Expected end: 2026-11-27 17:00"), "{out}");
}

#[test]
fn plan_says_whether_an_urgency_deadline_is_met_under_the_windows_alone() {
    // Two windows (Sat and Sun 02:00-06:00, 2 at once, 30 min each): 20 nodes need both.
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    let nodes: Vec<Node> = (1..=20).map(node).collect();
    policy.spec.urgency = Some(crds::Urgency {
        deadline: "2026-11-28T04:00:00Z".into(),
        override_freezes: false,
    });
    let out = render(&policy, &nodes, &opts()).unwrap();
    println!("{out}");
    assert!(
        out.contains("Urgency deadline 2026-11-28 04:00 UTC: NOT met under the windows alone (8 of 20 nodes by then); past it, windows stop gating"),
        "{out}"
    );
    // Past the deadline the rest go at once, window or not: done Saturday, not Sunday.
    assert!(out.contains("Expected end: 2026-11-28 "), "{out}");
    policy.spec.urgency = Some(crds::Urgency {
        deadline: "2026-11-30T00:00:00Z".into(),
        override_freezes: false,
    });
    let out = render(&policy, &nodes, &opts()).unwrap();
    assert!(
        out.contains("Urgency deadline 2026-11-30 00:00 UTC: met under the windows alone"),
        "{out}"
    );
}

#[test]
fn a_promotion_chain_plans_each_pool_after_the_one_before_under_its_own_windows() {
    // dev (nodes 1-2) always open; stage (3-4) 1h soak, always open; prod (5-8) 1h soak,
    // only on Saturdays 02:00-06:00. 30 min reboots, one at a time.
    let policy = |name: &str, pool: &str, extra: serde_json::Value| {
        let mut spec = serde_json::json!({
            "nodeSelector": {"matchLabels": {"tier": pool}},
            "release": {"version": "2.0.0", "url": "https://images.example/2.img",
                "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86))},
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        UpdatePolicy::new(name, serde_json::from_value(spec).unwrap())
    };
    let dev = policy("dev", "dev", serde_json::json!({}));
    let stage = policy(
        "stage",
        "stage",
        serde_json::json!({"promotion": {"after": "dev", "soak": "1h"}}),
    );
    let prod = policy(
        "prod",
        "prod",
        serde_json::json!({
            "promotion": {"after": "stage", "soak": "1h"},
            "maintenanceWindows": [{"weekdays": ["Sat"], "start": "02:00", "duration": "4h", "timeZone": "UTC"}],
        }),
    );
    let mut nodes: Vec<Node> = (1..=8).map(node).collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        let tier = match i {
            0 | 1 => "dev",
            2 | 3 => "stage",
            _ => "prod",
        };
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tier".into(), tier.into());
    }
    let all = [dev, stage, prod.clone()];
    let report = kubectl_baton::plan::simulate_chain(&all, &prod, &nodes, &opts()).unwrap();
    let out = kubectl_baton::plan::text(&report, &opts());
    println!("{out}");
    // dev: Fri 12:00 to 13:00; stage after 1 h: 14:00 to 15:00; prod after 1 h soak would
    // be 16:00, but its window opens Saturday 02:00: 02:00 to 04:00.
    assert!(out.contains("Promotion chain: dev → stage → prod"), "{out}");
    let line = |p: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(p))
            .unwrap()
            .to_string()
    };
    assert!(
        line("dev").ends_with("2026-11-27 12:00 UTC → 2026-11-27 13:00 UTC"),
        "{}",
        line("dev")
    );
    assert!(
        line("stage").ends_with("after a 1h soak, 2026-11-27 14:00 UTC → 2026-11-27 15:00 UTC"),
        "{}",
        line("stage")
    );
    assert!(
        line("prod ").ends_with("after a 1h soak, 2026-11-28 02:00 UTC → 2026-11-28 04:00 UTC"),
        "{}",
        line("prod ")
    );
    assert!(
        out.contains("Expected end: 2026-11-28 04:00 UTC (4 of 4 nodes updated)"),
        "{out}"
    );
}

#[test]
fn plan_waits_out_a_freeze_that_covers_a_window() {
    // The Saturday window falls inside a freeze: the rollout starts on Sunday's.
    let mut policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    policy.spec.freezes = vec![
        serde_json::from_value(serde_json::json!(
            {"start": "2026-11-28T00:00", "end": "2026-11-29T00:00", "reason": "migration"}
        ))
        .unwrap(),
    ];
    let nodes: Vec<Node> = (1..=2).map(node).collect();
    let out = render(&policy, &nodes, &opts()).unwrap();
    println!("{out}");
    let first = out.lines().find(|l| l.starts_with("2026-")).unwrap();
    assert!(first.starts_with("2026-11-29 02:00"), "{out}");
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

/// `data-NAME="VALUE"` of every element of class `class` in `svg`, as maps.
fn elements(svg: &str, class: &str) -> Vec<BTreeMap<String, String>> {
    svg.split('<')
        .filter(|e| e.contains(&format!("class=\"{class}\"")))
        .map(|e| {
            e.split(" data-")
                .skip(1)
                .filter_map(|kv| {
                    let (k, rest) = kv.split_once("=\"")?;
                    Some((k.to_string(), rest.split('"').next()?.to_string()))
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_svg_shows_the_text_plans_nodes_and_times_and_renders_in_chromium() {
    use kubectl_baton::{gantt, plan::simulate};
    let policy: UpdatePolicy = serde_yaml_ng::from_str(POLICY).unwrap();
    let nodes: Vec<Node> = (1..=20).map(node).collect();
    let o = opts();
    let text = render(&policy, &nodes, &o).unwrap();
    let report = simulate(&policy, &nodes, &o).unwrap();
    let rules = rollout::Policy::from_spec("workers", &policy.spec).unwrap();
    let open = rules
        .windows
        .open_spans(o.start, o.start.checked_add(o.horizon).unwrap());
    let svg = gantt::svg(&report, &open, &TimeZone::UTC);

    // The same nodes and times as the text plan.
    let bars = elements(&svg, "node");
    assert_eq!(bars.len(), 20);
    for bar in &bars {
        let node = &bar["node"];
        let line = text.lines().find(|l| l.contains(node.as_str())).unwrap();
        let minute = |rfc: &str| {
            let t: jiff::Timestamp = rfc.parse().unwrap();
            t.strftime("%Y-%m-%d %H:%M UTC").to_string()
        };
        assert!(
            line.starts_with(&minute(&bar["start"])),
            "{bar:?} vs {line}"
        );
        assert!(line.ends_with(&minute(&bar["end"])), "{bar:?} vs {line}");
    }
    // The two windows shaded, the expected end marked, zones grouped, nothing external.
    let windows = elements(&svg, "window");
    assert_eq!(
        windows
            .iter()
            .map(|w| (w["start"].as_str(), w["end"].as_str()))
            .collect::<Vec<_>>(),
        [
            ("2026-11-28T02:00:00Z", "2026-11-28T06:00:00Z"),
            ("2026-11-29T02:00:00Z", "2026-11-29T06:00:00Z"),
            ("2026-12-05T02:00:00Z", "2026-12-05T06:00:00Z"),
            ("2026-12-06T02:00:00Z", "2026-12-06T06:00:00Z"),
        ][..windows.len()]
    );
    assert_eq!(elements(&svg, "end")[0]["end"], "2026-11-29T03:00:00Z");
    assert!(svg.contains(">zone zone-a</text>") && svg.contains(">zone zone-b</text>"));
    for external in ["<script", "href", "@font-face", "url("] {
        assert!(!svg.contains(external), "{external}");
    }

    // Headless Chromium draws it at its size, not blank: bars and windows in colour.
    harness::packages::ensure().unwrap();
    let chromium = harness::packages::find("chromium").expect("chromium is installed");
    let dir = tempfile::tempdir().unwrap();
    let (svg_path, png_path) = (dir.path().join("plan.svg"), dir.path().join("plan.png"));
    std::fs::write(&svg_path, &svg).unwrap();
    let (w, h) = gantt::size(&report);
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--screenshot={}", png_path.display()),
            &format!("--window-size={w},{h}"),
            &format!("file://{}", svg_path.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    let channels = info.line_size / info.width as usize;
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let count = |rgb: [u8; 3]| {
        pixels
            .iter()
            .filter(|p| p[..3].iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 8))
            .count()
    };
    let (bar, window, white) = (
        count([0x33, 0x7a, 0xb7]),
        count([0xd9, 0xf2, 0xd9]),
        count([0xff, 0xff, 0xff]),
    );
    eprintln!(
        "[svg] {w}x{h}: {bar} bar pixels, {window} window pixels, {white} white of {}",
        pixels.len()
    );
    assert!(bar > 20 * 100, "the 20 bars are drawn: {bar}");
    assert!(window > 1000, "the windows are shaded: {window}");
    assert!(white < pixels.len(), "not blank");
}
