//! Property tests: random clusters, policies and fault sequences, driven through the
//! model cluster. After every decision the safety invariants are re-checked from the
//! model's own state, not from the plan's bookkeeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use rollout::{Action, Policy, decide, simulate::World, window::WindowState};

#[derive(Debug, Clone)]
enum Fault {
    RollsBackOnBoot(usize),
    GoesNotReady(usize),
    ComesBackReady(usize),
    AdminCordons(usize),
    ClockJumps(i64),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        (0usize..30).prop_map(Fault::RollsBackOnBoot),
        (0usize..30).prop_map(Fault::GoesNotReady),
        (0usize..30).prop_map(Fault::ComesBackReady),
        (0usize..30).prop_map(Fault::AdminCordons),
        (1i64..2000).prop_map(Fault::ClockJumps),
    ]
}

fn spec() -> impl Strategy<Value = serde_json::Value> {
    let budget = prop_oneof![
        (1i64..5).prop_map(serde_json::Value::from),
        (10u32..=100).prop_map(|p| serde_json::Value::from(format!("{p}%"))),
    ];
    let windows = prop_oneof![
        Just(serde_json::json!([])),
        (0u32..24, 1u32..8, proptest::sample::subsequence(vec!["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], 1..7))
            .prop_map(|(h, d, days)| serde_json::json!([{"weekdays": days, "start": format!("{h:02}:00"), "duration": format!("{d}h"), "timeZone": "Europe/Berlin"}])),
        (0u32..60, 1u32..4).prop_map(|(m, d)| serde_json::json!([{"schedule": format!("{m} */6 * * *"), "duration": format!("{d}h"), "timeZone": "America/New_York"}])),
    ];
    let per_zone = prop_oneof![
        Just(serde_json::Value::Null),
        (1i64..3).prop_map(serde_json::Value::from),
        (10u32..=100).prop_map(|p| serde_json::Value::from(format!("{p}%"))),
    ];
    // None, or a freeze over Berlin's spring-forward night (its end in the DST gap).
    let freezes = prop_oneof![
        Just(serde_json::json!([])),
        Just(
            serde_json::json!([{"start": "2026-03-27T06:00", "end": "2026-03-29T02:30", "timeZone": "Europe/Berlin"}])
        ),
        Just(
            serde_json::json!([{"start": "2026-03-27T01:00", "end": "2026-03-27T05:00", "timeZone": "UTC"},
                                {"start": "2026-03-28T20:00", "end": "2026-04-02T00:00", "timeZone": "America/New_York"}])
        ),
    ];
    (
        budget,
        windows,
        1u32..4,
        0u32..15,
        any::<bool>(),
        any::<bool>(),
        (per_zone, freezes),
    )
        .prop_map(
            |(budget, windows, max_failed, settle, fit, zones, (per_zone, freezes))| {
                serde_json::json!({
                    "maxUnavailable": budget,
                    "maxUnavailablePerZone": per_zone,
                    "freezes": freezes,
                    "maintenanceWindows": windows,
                    "windowMode": if fit { "Fit" } else { "Start" },
                    "health": {"rebootTimeout": "45m", "settleTime": format!("{settle}m")},
                    "failurePolicy": {"maxFailedNodes": max_failed},
                    "ordering": {"oneZoneAtATime": zones},
                })
            },
        )
}

fn start() -> Timestamp {
    "2026-03-27T00:00:00Z".parse().unwrap() // a Friday before Berlin's DST change
}

fn failed_count(world: &World) -> usize {
    world
        .nodes
        .iter()
        .filter(|n| n.failure.is_some() || n.agent.state.is_some_and(crds::AgentState::is_failure))
        .count()
}

/// The nodes the budget counts: leased, NotReady, cordoned or failed.
fn disrupted(world: &World) -> usize {
    world
        .nodes
        .iter()
        .filter(|n| {
            world.leases.iter().any(|l| l.node == n.name)
                || !n.ready
                || n.unschedulable
                || n.failure.is_some()
                || n.agent.state.is_some_and(crds::AgentState::is_failure)
        })
        .count()
}

/// Runs one scenario and checks every safety invariant at every step.
fn check_run(
    nodes: usize,
    zones: usize,
    spec: serde_json::Value,
    reboot_mins: i64,
    faults: Vec<(usize, Fault)>,
) -> Result<(), TestCaseError> {
    let policy = Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap();
    let mut world = World::requesting(nodes, zones, "1", "2");
    let limit = policy.budget.resolve(nodes);
    let mut admin_cordoned = BTreeSet::new();
    let mut now = start();
    let reboot = move |_: &str| SignedDuration::from_mins(reboot_mins);
    for step in 0..400 {
        for (_, f) in faults.iter().filter(|(s, _)| *s == step) {
            match f.clone() {
                Fault::RollsBackOnBoot(i) => world
                    .roll_back_on_boot
                    .push(format!("node-{:02}", i % nodes + 1)),
                Fault::GoesNotReady(i) => world.nodes[i % nodes].ready = false,
                Fault::ComesBackReady(i) => world.nodes[i % nodes].ready = true,
                Fault::AdminCordons(i) => {
                    let n = &mut world.nodes[i % nodes];
                    if !n.unschedulable {
                        n.unschedulable = true;
                        admin_cordoned.insert(n.name.clone());
                    }
                }
                Fault::ClockJumps(mins) => {
                    now = now.checked_add(SignedDuration::from_mins(mins)).unwrap()
                }
            }
        }
        world.advance(now);
        let snapshot = world.snapshot();
        let plan = decide(&snapshot, &policy, now);
        let grants = plan.grants().count();

        // A held node's step alone (the operator's drain task takes it) is the plan's.
        for lease in snapshot.leases.iter().filter(|l| l.policy == policy.name) {
            let node = snapshot.nodes.iter().find(|n| n.name == lease.node);
            let alone =
                rollout::decide::held(node.map(|n| &**n), lease, &policy, &snapshot.etcd, now);
            prop_assert_eq!(
                plan.node(&lease.node),
                Some(&alone),
                "step {}: {}",
                step,
                lease.node
            );
        }

        // Never more nodes disrupted than the budget.
        let unavailable = disrupted(&world);
        // A grant beyond the free room takes the slot of a node this plan releases,
        // each such node's slot once, and only a node available once released.
        let taken: Vec<&str> = plan.nodes.iter().filter_map(|n| n.action.after()).collect();
        let distinct: BTreeSet<&str> = taken.iter().copied().collect();
        prop_assert_eq!(distinct.len(), taken.len(), "a released slot taken twice");
        for after in &taken {
            prop_assert!(
                plan.node(after)
                    .is_some_and(|a| matches!(a, Action::Finish { release: true, .. })),
                "step {}: a grant waits on {}, which this plan does not release",
                step,
                after
            );
            let n = world.nodes.iter().find(|n| n.name == *after).unwrap();
            prop_assert!(n.ready && n.failure.is_none() && !admin_cordoned.contains(*after));
        }
        prop_assert_eq!(plan.budget.taken_over, taken.len());
        // ...and only while the window stays open as long as the operator may take to
        // write it.
        if !taken.is_empty() {
            let lasts = match policy.windows.state(now) {
                WindowState::Always => true,
                WindowState::Open { closes } => {
                    let fit = match policy.window_mode {
                        crds::WindowMode::Fit => policy.longest_disruption(),
                        crds::WindowMode::Start => SignedDuration::ZERO,
                    };
                    let margin = rollout::plan::TAKEOVER_WITHIN + fit;
                    now.checked_add(margin).unwrap() <= closes
                }
                WindowState::Closed { .. } => false,
            };
            prop_assert!(
                lasts,
                "step {}: a slot taken over as the window closes",
                step
            );
        }
        // Each grant after a release runs once that release is done, whatever the
        // others: at every moment in between, what was unavailable plus the grants
        // on free room stays within the budget.
        let fresh = grants - taken.len();
        if grants > 0 {
            prop_assert!(
                unavailable + fresh <= limit,
                "step {step}: {unavailable} unavailable + {fresh} grants > {limit}"
            );
        }
        prop_assert!(
            world.leases.len() + fresh <= limit.max(world.leases.len()),
            "leases beyond budget"
        );
        prop_assert!(
            world.leases.len() <= limit,
            "{} leases > budget {limit}",
            world.leases.len()
        );

        // No zone beyond maxUnavailablePerZone, counting its nodes as the budget does.
        if let Some(cap) = policy.zone_budget {
            let mut size: BTreeMap<&str, usize> = BTreeMap::new();
            let mut down: BTreeMap<&str, usize> = BTreeMap::new();
            for n in &world.nodes {
                let zone = n.zone(&policy.zone_label);
                *size.entry(zone).or_default() += 1;
                let disrupted = world.leases.iter().any(|l| l.node == n.name)
                    || plan.node(&n.name).is_some_and(Action::is_grant)
                    || !n.ready
                    || n.unschedulable
                    || n.failure.is_some()
                    || n.agent.state.is_some_and(crds::AgentState::is_failure);
                if disrupted {
                    *down.entry(zone).or_default() += 1;
                }
            }
            for (zone, down) in &down {
                let granted_here = plan
                    .grants()
                    .filter(|g| {
                        world
                            .nodes
                            .iter()
                            .any(|n| n.name == *g && n.zone(&policy.zone_label) == *zone)
                    })
                    .count();
                if granted_here > 0 {
                    let limit = cap.resolve(size[zone]);
                    prop_assert!(
                        *down <= limit,
                        "step {step}: zone {zone}: {down} disrupted after grants > cap {limit}"
                    );
                }
            }
        }

        // No grant outside a window (and, in Fit mode, only when the reboot fits).
        if grants > 0 {
            let state = policy.windows.state(now);
            prop_assert!(state.is_open(), "granted at {now} while {state:?}");
            if let (crds::WindowMode::Fit, WindowState::Open { closes }) =
                (policy.window_mode, state)
            {
                prop_assert!(now.checked_add(policy.reboot_timeout).unwrap() <= closes);
            }
        }

        // A halted pool grants nothing.
        if failed_count(&world) >= policy.max_failed as usize {
            prop_assert_eq!(grants, 0, "granted on a halted pool");
            prop_assert!(plan.halted.is_some());
        }

        // Baton never uncordons a node it did not cordon; admins' cordons stay.
        for step in &plan.nodes {
            if matches!(step.action, Action::Finish { uncordon: true, .. }) {
                let node = world.nodes.iter().find(|n| n.name == step.node).unwrap();
                prop_assert!(
                    node.cordoned_by_baton,
                    "uncordoning {} which baton did not cordon",
                    step.node
                );
                prop_assert!(!admin_cordoned.contains(&step.node));
            }
            // Every grant goes to a node that asked, on the boot it asked from.
            if let Action::Grant { boot_id, .. } = &step.action {
                let node = world.nodes.iter().find(|n| n.name == step.node).unwrap();
                prop_assert!(
                    node.requests_reboot() && node.agent.boot_id.as_ref() == Some(boot_id)
                );
                prop_assert!(!node.unschedulable && node.ready);
            }
        }

        let leases_before: BTreeSet<String> = world.leases.iter().map(|l| l.node.clone()).collect();
        let (_, changed) = world.apply(&plan, &policy, now, &reboot);
        // Nor does a plan whose own steps halt it: its grants would run beside them.
        if failed_count(&world) >= policy.max_failed as usize {
            prop_assert_eq!(
                grants,
                0,
                "step {}: granted beside the failure that halts",
                step
            );
        }
        // Once the plan is performed (each release before the grant that waits on it),
        // no more is disrupted than the budget.
        if grants > 0 {
            let after = disrupted(&world);
            prop_assert!(
                after <= limit,
                "step {step}: {after} disrupted after the plan > {limit}"
            );
        }
        for name in &admin_cordoned {
            prop_assert!(
                world
                    .nodes
                    .iter()
                    .find(|n| &n.name == name)
                    .unwrap()
                    .unschedulable,
                "{name}'s admin cordon was undone"
            );
        }
        // Never lose track of a lease: one goes away only through a release (a
        // Release, or a Finish with no settle time).
        for node in leases_before {
            if !world.leases.iter().any(|l| l.node == node) {
                prop_assert!(
                    plan.node(&node).is_some_and(Action::releases),
                    "lease of {node} vanished"
                );
            }
        }
        if !changed {
            let next = [plan.next_change, world.next_boot()]
                .into_iter()
                .flatten()
                .min();
            now = match next {
                Some(t) if t > now => t,
                _ => now.checked_add(SignedDuration::from_mins(30)).unwrap(),
            };
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn safety_invariants_hold_under_faults(
        nodes in 1usize..25,
        zones in 1usize..4,
        spec in spec(),
        reboot_mins in 1i64..40,
        faults in proptest::collection::vec((0usize..200, fault()), 0..30),
    ) {
        check_run(nodes, zones, spec, reboot_mins, faults)?;
    }

    #[test]
    fn with_no_faults_and_open_windows_every_node_is_eventually_updated(
        nodes in 1usize..30,
        zones in 1usize..4,
        spec in spec(),
        reboot_mins in 1i64..40,
    ) {
        let policy = Policy::from_spec("pool", &serde_json::from_value(spec).unwrap()).unwrap();
        let mut world = World::requesting(nodes, zones, "1", "2");
        // Worst case one node per window occurrence (Fit mode with a short window), and
        // every generated window opens at least weekly.
        let horizon = start().checked_add(SignedDuration::from_hours(24 * 7 * (nodes as i64 + 2))).unwrap();
        let timeline = rollout::simulate::run(&mut world, &policy, start(), horizon, &|_| SignedDuration::from_mins(reboot_mins));
        // Fit mode with a window shorter than rebootTimeout can never start: that is a
        // configuration the status reports, not a liveness failure.
        let starved = policy.window_mode == crds::WindowMode::Fit && timeline.events.is_empty();
        prop_assume!(!starved);
        prop_assert!(timeline.complete, "not complete by {}: {:?}", timeline.end, world.leases);
        for node in &world.nodes {
            prop_assert_eq!(node.agent.current_version.as_ref().map(|v| v.as_str()), Some("2"));
            prop_assert!(!node.unschedulable);
        }
    }
}
