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
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
