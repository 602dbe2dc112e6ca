//! Running one scenario: the cluster is built, the machines boot, two operator
//! replicas start, the events are applied at their times, and at `quiet_at` the admin
//! cleans up (faults off, budgets and policies restored, windows dropped, failures
//! retried once a minute). From then on every node that can update must do so within
//! the liveness bound ([`bound`]). Every write is checked as it lands; a run stops at
//! the first broken property.

use std::{sync::Arc, time::Duration};

use jiff::SignedDuration;
use kube::ResourceExt;

use crds::UpdatePolicy;
use kubectl_baton::steer::{Selection, retry_targets};

use crate::{
    apiserver::{ApiError, Preconditions},
    check::{Violation, Writer},
    machine::{self, Machine},
    replica,
    runtime::{Runtime, Stepped, TaskId},
    scenario::{Event, REPLICAS, Scenario},
    trace::Entry,
    workload,
    world::{Sim, Timing, World},
};

/// The version every machine starts on.
pub const OLD: &str = "1.0.0";
/// The version every policy releases.
pub const NEW: &str = "2.0.0";

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Runtime steps (task polls and timer advances).
    pub steps: u64,
    /// Virtual time at the end.
    pub ended_at: Duration,
    /// The first broken property, if any.
    pub violation: Option<Violation>,
    /// The trace (in full when asked for, else its tail).
    pub trace: Vec<Entry>,
    /// Trace entries recorded in all.
    pub trace_len: u64,
}

/// How far the operator's caches may lag: the longest watch delay, or a dropped
/// watch's relist, plus the longest request.
pub fn staleness(t: &Timing) -> Duration {
    t.max_watch_delay.max(t.relist_after + t.max_latency) + t.max_latency + Duration::from_secs(1)
}

/// The liveness bound after `quiet_at`: a leader takeover (one term), the admin's
/// retry period, then per round of `maxUnavailable` nodes: staging, the drain timeout,
/// the before-reboot command, the reboot, the settle time, and the reaction of the
/// operator and the agent to each of the protocol's 8 changes (at most a watch delay
/// and a request each), all doubled for a round that a failure restarted.
pub fn bound(s: &Scenario) -> Duration {
    let t = Timing::default();
    let reaction = 8 * (t.max_watch_delay + t.max_latency);
    let drain = s
        .policies
        .iter()
        .filter_map(|p| p.drain_timeout.trim_end_matches('s').parse::<u64>().ok())
        .max()
        .unwrap_or(60);
    let per_round = s.stage_time
        + Duration::from_secs(drain + 2 + 5)
        + s.down_time
        + reaction
        + Duration::from_secs(60); // one resync of the operator
    let rounds = s.nodes as u32; // budget 1 in the worst case (an edited budget)
    // A grant's stamps (drained-at, done-at) are on the clock of the replica that wrote
    // them: one written by a clock an hour ahead holds its settle time an hour longer.
    let skew: u64 = s
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ClockJump(_, minutes, _) => Some(minutes.unsigned_abs() * 60),
            _ => None,
        })
        .sum();
    Duration::from_secs(15 + 60 + skew) + 2 * rounds * per_round
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn trace(sim: &Sim, actor: &str, action: String) {
    let at = sim.rt.now();
    sim.lock().trace.record(at, actor, action);
}

/// Runs `scenario`; `full` keeps the whole trace.
pub fn run(scenario: &Scenario, full: bool) -> Outcome {
    let timing = Timing::default();
    let rt = Runtime::default();
    let mut world = World::new(
        scenario.seed,
        scenario.start,
        timing.clone(),
        staleness(&timing),
    );
    world.trace.full = full;
    let sim = Sim {
        rt: rt.clone(),
        world: Arc::new(std::sync::Mutex::new(world)),
    };
    let s = Arc::new(scenario.clone());
    build(&sim, &s);
    for (i, id) in REPLICAS.iter().enumerate() {
        let t = replica::start(&sim, id);
        sim.lock().replicas.insert(i, t);
    }
    for (at, event) in &scenario.events {
        let (s2, sc, event, at) = (sim.clone(), Arc::clone(&s), event.clone(), *at);
        rt.spawn(async move {
            s2.rt.sleep_until(at).await;
            apply(&s2, &sc, &event);
        });
    }
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (s2, sc, finished) = (sim.clone(), Arc::clone(&s), Arc::clone(&finished));
        rt.spawn(async move {
            s2.rt.sleep_until(sc.quiet_at).await;
            cleanup(&s2, &sc);
            loop {
                if done(&s2, &sc) {
                    finished.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                retry_failed(&s2, &sc, s2.rt.now());
                s2.rt.sleep(Duration::from_secs(5)).await;
            }
        });
    }
    let end = scenario.quiet_at + bound(scenario);
    let mut steps = 0u64;
    let violation = loop {
        if let Some(v) = sim.lock().checker.violations.first().cloned() {
            break Some(v);
        }
        if finished.load(std::sync::atomic::Ordering::SeqCst) {
            break None;
        }
        if rt.now() > end {
            let pending = not_done(&sim, scenario);
            let message = format!(
                "{} node(s) that can update did not within {}s after the faults stopped: {pending:?}",
                pending.len(),
                bound(scenario).as_secs()
            );
            sim.lock().checker.not_live(rt.now(), message);
            continue;
        }
        steps += 1;
        if rt.step() == Stepped::Idle {
            sim.lock()
                .checker
                .not_live(rt.now(), "nothing left to run".into());
        }
    };
    let tasks: Vec<TaskId> = sim.lock().replicas.values().copied().collect();
    for t in tasks {
        rt.kill(t);
    }
    let outcome = {
        let w = sim.lock();
        Outcome {
            steps,
            ended_at: rt.now(),
            violation,
            trace: w.trace.entries().cloned().collect(),
            trace_len: w.trace.count,
        }
    };
    rt.shutdown();
    outcome
}

/// The cluster at the start: nodes, machines, policies, workloads.
fn build(sim: &Sim, s: &Scenario) {
    let zones = ["zone-a", "zone-b", "zone-c"];
    {
        let mut w = sim.lock();
        for i in 0..s.nodes {
            let name = node_name(i);
            let node = machine::node_object(&name, zones[i % 3], &s.pools[i]);
            let _ = w.api.create_node(node);
            let version =
                crds::protocol::Version::new(OLD).unwrap_or_else(|_| unreachable_version());
            w.machines
                .insert(name, Machine::new(i, version, s.stage_time, s.down_time));
        }
        for p in &s.policies {
            let _ = create_policy(&mut w, p, sim.rt.now());
        }
        for (app, replicas) in &s.apps {
            for k in 0..*replicas {
                let node = node_name((k * 2 + app.len()) % s.nodes);
                let _ = w
                    .api
                    .create_pod(workload::pod(app, &format!("{app}-init-{k}"), &node));
            }
            let _ = w
                .api
                .create_pdb(workload::budget(app, Some((*replicas as i32 - 1).max(1))));
        }
    }
    for i in 0..s.nodes {
        machine::boot(sim, &node_name(i));
    }
}

#[allow(clippy::panic)]
fn unreachable_version() -> crds::protocol::Version {
    panic!("1.0.0 is a valid version")
}

fn create_policy(
    w: &mut World,
    p: &crate::scenario::PolicySpec,
    at: Duration,
) -> Result<(), ApiError> {
    let spec =
        serde_json::from_value(p.to_spec(NEW)).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let created = w.api.create_policy(UpdatePolicy::new(&p.name, spec))?;
    w.checker.policy_changed(at, &p.name, Some(created));
    w.changed();
    Ok(())
}

/// Patches a policy as an admin would.
fn patch_policy(sim: &Sim, name: &str, patch: &serde_json::Value) {
    let at = sim.rt.now();
    let mut w = sim.lock();
    if w.api.patch_policy(name, patch).is_ok() {
        let now = w.api.policies.get(name).cloned();
        w.checker.policy_changed(at, name, now);
        w.changed();
    }
    w.trace
        .record(at, "admin", format!("patches UpdatePolicy {name}: {patch}"));
}

/// An admin's write to a Node (labels, cordon).
fn patch_node(sim: &Sim, node: &str, patch: &serde_json::Value) -> bool {
    let at = sim.rt.now();
    let mut w = sim.lock();
    let w = &mut *w;
    let before = w.api.nodes.get(node).cloned();
    let Ok(after) = w.api.patch_node(node, patch) else {
        return false;
    };
    w.checker.node_written(
        at,
        &Writer::Admin,
        node,
        patch,
        before.as_deref(),
        Some(&after),
    );
    w.changed();
    w.trace
        .record(at, "admin", format!("patches Node {node}: {patch}"));
    true
}

/// Runs `f` after `after`, as its own task.
fn later(sim: &Sim, after: Duration, f: impl FnOnce(&Sim) + Send + 'static) {
    let s = sim.clone();
    sim.rt.spawn(async move {
        s.rt.sleep(after).await;
        f(&s);
    });
}

fn apply(sim: &Sim, s: &Scenario, event: &Event) {
    trace(sim, "scenario", format!("{event:?}"));
    match event.clone() {
        Event::CrashReplica(i, after) => {
            let task = sim.lock().replicas.remove(&i);
            if let Some(t) = task {
                sim.rt.kill(t);
                // The replica's drains and caches die with it.
                replica::crashed(sim, REPLICAS[i]);
            }
            // A restarted pod.
            later(sim, after, move |s| restart_replica(s, i));
        }
        Event::Stall(i, renewals_only, dur) => {
            let id = REPLICAS[i].to_string();
            sim.lock().faults.hung.insert(id.clone(), renewals_only);
            later(sim, dur, move |s| {
                s.lock().faults.hung.remove(&id);
            });
        }
        Event::ApiErrors(per_mille, dur) => {
            sim.lock().faults.error_per_mille = per_mille;
            later(sim, dur, |s| s.lock().faults.error_per_mille = 0);
        }
        Event::WatchDrops(per_mille, dur) => {
            sim.lock().faults.drop_per_mille = per_mille;
            later(sim, dur, |s| s.lock().faults.drop_per_mille = 0);
        }
        Event::KillAgent(n, after) => {
            let node = node_name(n);
            let up = sim
                .lock()
                .machines
                .get(&node)
                .is_some_and(|m| m.up && !m.deleted);
            if up {
                machine::stop_agent(sim, &node);
                later(sim, after, move |s| machine::restart_agent(s, &node));
            }
        }
        Event::FailNextBoot(n) => {
            if let Some(m) = sim.lock().machines.get_mut(&node_name(n)) {
                m.fail_next_boot = true;
            }
        }
        Event::FailStaging(n, dur) => {
            let node = node_name(n);
            if let Some(m) = sim.lock().machines.get_mut(&node) {
                m.fail_staging = true;
            }
            later(sim, dur, move |s| {
                if let Some(m) = s.lock().machines.get_mut(&node) {
                    m.fail_staging = false;
                }
            });
        }
        Event::BeforeRebootFails(n, dur) => {
            let node = node_name(n);
            if let Some(m) = sim.lock().machines.get_mut(&node) {
                m.before_reboot_fails = true;
            }
            later(sim, dur, move |s| {
                if let Some(m) = s.lock().machines.get_mut(&node) {
                    m.before_reboot_fails = false;
                }
            });
        }
        Event::NotReady(n, dur) => {
            let node = node_name(n);
            machine::set_status(sim, &node, &machine::ready(false));
            later(sim, dur, move |s| {
                let up = s.lock().machines.get(&node).is_some_and(|m| m.up);
                if up {
                    machine::set_status(s, &node, &machine::ready(true));
                }
            });
        }
        Event::DeleteNode(n) => {
            let node = node_name(n);
            machine::stop_agent(sim, &node);
            let mut w = sim.lock();
            if let Some(m) = w.machines.get_mut(&node) {
                m.deleted = true;
                m.up = false;
            }
            let at = sim.rt.now();
            w.checker.node_deleted(at, &node);
            if w.api.delete_node(&node).is_ok() {
                w.changed();
            }
            let gone: Vec<_> = w.api.pods_on(&node);
            for p in gone {
                let _ = w.api.delete_pod(workload::NAMESPACE, &p.name_any());
                drop(w);
                workload::replace(sim, p);
                w = sim.lock();
            }
        }
        Event::ClockJump(i, minutes, dur) => {
            let id = REPLICAS[i].to_string();
            sim.lock()
                .clock_offsets
                .insert(id.clone(), SignedDuration::from_mins(minutes));
            later(sim, dur, move |s| {
                s.lock().clock_offsets.remove(&id);
            });
        }
        Event::Cordon(n, dur) => {
            let node = node_name(n);
            let free = sim.lock().api.nodes.get(&node).is_some_and(|x| {
                !x.spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
            });
            if free
                && patch_node(
                    sim,
                    &node,
                    &serde_json::json!({"spec": {"unschedulable": true}}),
                )
            {
                sim.lock().checker.admin_cordoned(&node);
                later(sim, dur, move |s| uncordon(s, &node));
            }
        }
        Event::Pause(p, dur) => {
            let name = s.policies[p].name.clone();
            patch_policy(sim, &name, &serde_json::json!({"spec": {"paused": true}}));
            later(sim, dur, move |s| {
                patch_policy(s, &name, &serde_json::json!({"spec": {"paused": false}}))
            });
        }
        Event::RetryPolicy(p) => retry(sim, Some(&s.policies[p].name), &[]),
        Event::RetryNode(n) => retry(sim, None, &[node_name(n)]),
        Event::Relabel(n) => {
            let node = node_name(n);
            let now = sim
                .lock()
                .api
                .nodes
                .get(&node)
                .and_then(|x| x.labels().get("pool").cloned());
            let to = if now.as_deref() == Some("a") {
                "b"
            } else {
                "a"
            };
            patch_node(
                sim,
                &node,
                &serde_json::json!({"metadata": {"labels": {"pool": to}}}),
            );
        }
        Event::EditBudget(p, budget) => {
            patch_policy(
                sim,
                &s.policies[p].name,
                &serde_json::json!({"spec": {"maxUnavailable": budget}}),
            );
        }
        Event::DeletePolicy(p, after) => {
            let spec = s.policies[p].clone();
            {
                let at = sim.rt.now();
                let mut w = sim.lock();
                if w.api.delete_policy(&spec.name).is_ok() {
                    let now = w.api.policies.get(&spec.name).cloned();
                    w.checker.policy_changed(at, &spec.name, now);
                    w.changed();
                }
            }
            let quiet_at = s.quiet_at;
            later(sim, after, move |s| {
                let cleaned = s.rt.now() >= quiet_at;
                recreate(s, &spec, cleaned)
            });
        }
        Event::Overlap(dur) => {
            let overlap = crate::scenario::PolicySpec {
                name: "overlap".into(),
                pool: "a".into(),
                ..s.policies[0].clone()
            };
            {
                let at = sim.rt.now();
                let mut w = sim.lock();
                let mut spec = overlap.to_spec(NEW);
                spec["nodeSelector"] =
                    serde_json::json!({"matchLabels": {"topology.kubernetes.io/zone": "zone-a"}});
                if let Ok(spec) = serde_json::from_value(spec)
                    && let Ok(created) = w.api.create_policy(UpdatePolicy::new("overlap", spec))
                {
                    w.checker.policy_changed(at, "overlap", Some(created));
                    w.changed();
                }
            }
            later(sim, dur, |s| {
                let at = s.rt.now();
                let mut w = s.lock();
                if w.api.delete_policy("overlap").is_ok() {
                    let now = w.api.policies.get("overlap").cloned();
                    w.checker.policy_changed(at, "overlap", now);
                    w.changed();
                }
            });
        }
        Event::PdbNever(a, dur) => {
            let Some((app, replicas)) = s.apps.get(a % s.apps.len()).cloned() else {
                return;
            };
            {
                let mut w = sim.lock();
                let _ = w.api.delete_pdb(workload::NAMESPACE, &app);
                let _ = w.api.create_pdb(workload::budget(&app, None));
            }
            later(sim, dur, move |s| restore_budget(s, &app, replicas));
        }
    }
}

fn restore_budget(sim: &Sim, app: &str, replicas: usize) {
    let mut w = sim.lock();
    let _ = w.api.delete_pdb(workload::NAMESPACE, app);
    let _ = w
        .api
        .create_pdb(workload::budget(app, Some((replicas as i32 - 1).max(1))));
}

/// Creates a deleted policy again; once the admin `cleaned` up, without its window.
/// While the old one is still being deleted (its grants winding down), the admin
/// tries again a little later.
fn recreate(sim: &Sim, spec: &crate::scenario::PolicySpec, cleaned: bool) {
    let at = sim.rt.now();
    let mut w = sim.lock();
    let deleting = w
        .api
        .policies
        .get(&spec.name)
        .is_some_and(|p| p.metadata.deletion_timestamp.is_some());
    if deleting {
        drop(w);
        let spec = spec.clone();
        later(sim, Duration::from_secs(5), move |s| {
            recreate(s, &spec, cleaned)
        });
        return;
    }
    if !w.api.policies.contains_key(&spec.name) {
        let mut spec = spec.clone();
        if cleaned {
            spec.window = None;
        }
        let _ = create_policy(&mut w, &spec, at);
        w.trace.record(
            at,
            "admin",
            format!("creates UpdatePolicy {} again", spec.name),
        );
    }
}

fn uncordon(sim: &Sim, node: &str) {
    let cordoned = sim.lock().checker.admin_cordon(node);
    if cordoned {
        patch_node(
            sim,
            node,
            &serde_json::json!({"spec": {"unschedulable": false}}),
        );
        sim.lock().checker.admin_uncordoned(node);
    }
}

/// `kubectl baton retry`, with the plugin's own target selection and writes: the
/// node's grant ended in one guarded write, then its Lease deleted.
fn retry(sim: &Sim, policy: Option<&str>, nodes: &[String]) {
    let at = sim.rt.now();
    let mut w = sim.lock();
    let w = &mut *w;
    let listed: Vec<_> = w.api.nodes.values().map(|n| (**n).clone()).collect();
    let leases: Vec<_> = w
        .api
        .leases
        .values()
        .filter(|l| {
            l.labels()
                .get(crds::grant::MANAGED_BY.0)
                .map(String::as_str)
                == Some(crds::grant::MANAGED_BY.1)
        })
        .map(|l| (**l).clone())
        .collect();
    let read_policy = policy.and_then(|p| w.api.policies.get(p).map(|x| (**x).clone()));
    let selection = match policy {
        Some(name) => Selection::Policy {
            name,
            policy: read_policy.as_ref(),
        },
        None => Selection::Nodes(nodes),
    };
    let targets = match retry_targets(selection, &listed, &leases) {
        Ok(t) => t,
        Err(e) => {
            w.trace.record(at, "admin", format!("retry refused: {e}"));
            return;
        }
    };
    for target in targets {
        if let Some(patch) = target.node_patch() {
            let before = w.api.nodes.get(&target.name).cloned();
            match w.api.patch_node(&target.name, &patch) {
                Ok(after) => w.checker.node_written(
                    at,
                    &Writer::Retry,
                    &target.name,
                    &patch,
                    before.as_deref(),
                    Some(&after),
                ),
                Err(_) => continue,
            }
        }
        if let Some(d) = target.lease_delete() {
            let _ = w.api.delete_lease(
                &d.name,
                &Preconditions {
                    uid: d.uid,
                    resource_version: d.resource_version,
                },
            );
        }
        w.trace
            .record(at, "admin", format!("kubectl baton retry: {}", target.name));
    }
    w.changed();
}

/// Faults off, everything an admin changed put back, windows dropped.
fn cleanup(sim: &Sim, s: &Scenario) {
    trace(sim, "scenario", "faults stop; the admin cleans up".into());
    {
        let mut w = sim.lock();
        w.faults = Default::default();
        w.clock_offsets.clear();
        for m in w.machines.values_mut() {
            m.fail_staging = false;
            m.before_reboot_fails = false;
        }
    }
    // Every replica runs (a crashed one is started now if it was not yet).
    for i in 0..REPLICAS.len() {
        restart_replica(sim, i);
    }
    for (app, replicas) in &s.apps {
        restore_budget(sim, app, *replicas);
    }
    let nodes: Vec<String> = sim.lock().api.nodes.keys().cloned().collect();
    for n in &nodes {
        uncordon(sim, n);
        let up = sim.lock().machines.get(n).is_some_and(|m| m.up);
        if up {
            machine::set_status(sim, n, &machine::ready(true));
        }
        let agent_gone = sim
            .lock()
            .machines
            .get(n)
            .is_some_and(|m| m.up && m.tasks.is_empty());
        if agent_gone {
            machine::restart_agent(sim, n);
        }
    }
    for p in &s.policies {
        recreate(sim, p, true);
        patch_policy(
            sim,
            &p.name,
            &serde_json::json!({"spec": {"paused": false, "maintenanceWindows": [], "maxUnavailable": p.max_unavailable}}),
        );
    }
    if sim.lock().api.policies.contains_key("overlap") {
        let mut w = sim.lock();
        let _ = w.api.delete_policy("overlap");
        w.changed();
    }
}

/// Starts replica `i` unless it runs.
fn restart_replica(sim: &Sim, i: usize) {
    let running = sim
        .lock()
        .replicas
        .get(&i)
        .is_some_and(|t| sim.rt.alive(*t));
    if !running {
        let t = replica::start(sim, REPLICAS[i]);
        sim.lock().replicas.insert(i, t);
    }
}

/// Retries every policy with failures, once a minute (an admin on call).
fn retry_failed(sim: &Sim, s: &Scenario, now: Duration) {
    if now.as_secs() % 60 >= 5 {
        return;
    }
    for p in &s.policies {
        retry(sim, Some(&p.name), &[]);
    }
}

/// The nodes that can update (existing, selected by exactly one policy) and have not.
fn not_done(sim: &Sim, s: &Scenario) -> Vec<String> {
    let w = sim.lock();
    w.api
        .nodes
        .values()
        .filter(|n| {
            let pool = n.labels().get("pool").cloned().unwrap_or_default();
            s.policies.iter().filter(|p| p.pool == pool).count() == 1
        })
        .filter(|n| {
            let a = n.annotations();
            let done = a.get(crds::protocol::STATE.name).map(String::as_str) == Some("Done")
                && a.get(crds::protocol::CURRENT_VERSION.name)
                    .map(String::as_str)
                    == Some(NEW);
            let leased = w
                .api
                .leases
                .contains_key(&crds::grant::lease_name(&n.name_any()));
            !done || leased
        })
        .map(|n| n.name_any())
        .collect()
}

fn done(sim: &Sim, s: &Scenario) -> bool {
    not_done(sim, s).is_empty()
}
