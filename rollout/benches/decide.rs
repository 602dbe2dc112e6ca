//! `decide` on 10,000 nodes, against a baseline measured in the same run: one pass
//! that only matches every node against the policy's selector (the least any
//! decision must do).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use rollout::{Policy, decide, simulate::World};

fn bench(c: &mut Criterion) {
    let spec = serde_json::json!({
        "maxUnavailable": "5%",
        "nodeSelector": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "Exists"}]},
        "maintenanceWindows": [
            {"weekdays": ["Sat", "Sun"], "start": "01:00", "duration": "5h", "timeZone": "Europe/Berlin"},
            {"schedule": "0 22 * * 1-5", "duration": "2h", "timeZone": "America/New_York"}
        ],
        "hooks": {"beforeReboot": {"annotations": ["example.com/ok"]}},
    });
    let policy = Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap();
    let mut world = World::requesting(10_000, 3, "1.0.0", "2.0.0");
    // A rollout in progress: 2% hold leases, some nodes are NotReady or cordoned.
    let now: Timestamp = "2026-11-28T02:00:00Z".parse().unwrap();
    let plan = decide(&world.snapshot(), &policy, now);
    world.apply(&plan, &policy, now, &|_| jiff::SignedDuration::from_mins(5));
    for (i, node) in world.nodes.iter_mut().enumerate() {
        if i % 97 == 0 {
            node.ready = false;
        }
    }
    let snapshot = world.snapshot();

    let mut group = c.benchmark_group("decide_10k_nodes");
    group.bench_function("baseline_select_pool", |b| {
        b.iter(|| {
            black_box(&snapshot)
                .nodes
                .iter()
                .filter(|n| policy.selector.matches(&n.labels))
                .count()
        })
    });
    group.bench_function("decide", |b| {
        b.iter(|| decide(black_box(&snapshot), &policy, now))
    });

    // The same pool with the fleet rules in force and room to grant (a 10% budget, 10%
    // per zone with zones in parallel, so that the zone caps are checked; its release
    // is published to every node): promoted after `stage` in a chain of
    // three pools (stage done and soaked), a freeze (next month) and an urgency
    // deadline (passed, so the closed window does not stop the pass).
    let mut fleet = spec_with_fleet_rules();
    let fleet_policy =
        Policy::from_spec("prod", &serde_json::from_value(fleet.take()).unwrap()).unwrap();
    let chain: Vec<crds::UpdatePolicy> = [
        ("dev", None),
        ("stage", Some("dev")),
        ("prod", Some("stage")),
    ]
    .into_iter()
    .map(|(name, after)| {
        let mut p = crds::UpdatePolicy::new(
            name,
            serde_json::from_value(serde_json::json!({
                "promotion": after.map(|a| serde_json::json!({"after": a, "soak": "24h"})),
                "release": spec_with_fleet_rules()["release"],
            }))
            .unwrap(),
        );
        p.status = Some(crds::UpdatePolicyStatus {
            completed: Some(crds::Completion {
                version: "2.0.0".into(),
                since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-11-20T00:00:00Z".parse().unwrap(),
                ),
            }),
            ..Default::default()
        });
        p
    })
    .collect();
    let mut fleet_snapshot = snapshot.clone();
    fleet_snapshot.upstream = rollout::promotion::upstream("prod", &chain);
    // The rules let this pass grant (promoted, urgent), within the zone caps.
    let fleet_plan = decide(&fleet_snapshot, &fleet_policy, now);
    assert!(
        fleet_plan.grants().count() > 0,
        "the fleet rules pass grants nothing: {:?}",
        fleet_plan
            .nodes
            .iter()
            .map(|n| n.action.to_string().chars().take(90).collect::<String>())
            .collect::<std::collections::BTreeSet<_>>()
    );
    group.bench_function("decide_with_fleet_rules", |b| {
        b.iter(|| decide(black_box(&fleet_snapshot), &fleet_policy, now))
    });
    group.finish();
}

/// The benchmark's spec plus a promotion, a per-zone cap, a freeze and an urgency.
fn spec_with_fleet_rules() -> serde_json::Value {
    serde_json::json!({
        "maxUnavailable": "10%",
        "maxUnavailablePerZone": "10%",
        "ordering": {"oneZoneAtATime": false},
        "nodeSelector": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "Exists"}]},
        "maintenanceWindows": [
            {"weekdays": ["Sat", "Sun"], "start": "01:00", "duration": "5h", "timeZone": "Europe/Berlin"},
            {"schedule": "0 22 * * 1-5", "duration": "2h", "timeZone": "America/New_York"}
        ],
        "freezes": [{"start": "2026-12-20T00:00", "end": "2027-01-06T00:00", "timeZone": "Europe/Berlin"}],
        "urgency": {"deadline": "2026-11-27T00:00:00Z"},
        "promotion": {"after": "stage", "soak": "24h"},
        "release": {"version": "2.0.0", "url": "https://images.example/2.img",
            "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86))},
        "hooks": {"beforeReboot": {"annotations": ["example.com/ok"]}},
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
