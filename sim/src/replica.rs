//! Operator replicas: the real election rules (`operator::leader`), the real fence
//! (`operator::fence`), and the real controller (`operator::reconcile`, the steps and
//! the drains) through [`operator::cluster::Cluster`], implemented here on the model
//! API server and this replica's own lagging caches.
//!
//! A replica that loses leadership (or whose renew deadline passes) stops: its
//! controller, drains and caches are dropped, and it starts again from nothing after a
//! second, as a restarted pod would.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Resource, ResourceExt};

use crds::UpdatePolicy;
use operator::{
    cache::CachedNode,
    cluster::{Cluster, Refusal, Write},
    config::Config,
    drain::{DrainRules, Pods},
    error::Result,
    fence::{Fence, Writable},
    leader::{self, LEASE_NAME, Take},
    metrics::Metrics,
    reconcile,
};
use rollout::expectations::{Expectations, ObjectKey, Seen};

use crate::{
    apiserver::{ApiError, Kind, Preconditions},
    check::Writer,
    runtime::TaskId,
    watch::{self, Scope},
    world::{Either, Signal, Sim, race},
};

/// The namespace of the operator's Leases.
pub const NAMESPACE: &str = "baton-system";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The configuration every replica runs with: a 15 s leader term renewed every 5 s
/// (a renew deadline of 10 s) and a 10 s request bound.
pub fn config(identity: &str) -> Config {
    <Config as clap::Parser>::try_parse_from([
        "baton-operator",
        "--namespace",
        NAMESPACE,
        "--identity",
        identity,
        "--leader-lease-duration",
        "15s",
        "--leader-renew-interval",
        "5s",
        "--request-timeout",
        "10s",
        "--allow-force-drain=true",
    ])
    .unwrap_or_else(|e| unreachable_config(&e.to_string()))
}

#[allow(clippy::panic)]
fn unreachable_config(e: &str) -> Config {
    panic!("the simulation's operator flags are valid: {e}")
}

/// Starts replica `identity`: it runs until killed, restarting after each loss of
/// leadership. Returns its task.
pub fn start(sim: &Sim, identity: &str) -> TaskId {
    let (s, id) = (sim.clone(), identity.to_string());
    sim.rt.spawn(async move {
        loop {
            incarnation(&s, &id).await;
            s.rt.sleep(Duration::from_secs(1)).await;
        }
    })
}

/// The replica's wall clock (the true one plus its offset).
fn clock(sim: &Sim, identity: &str) -> Timestamp {
    let offset = sim
        .lock()
        .clock_offsets
        .get(identity)
        .copied()
        .unwrap_or_default();
    sim.wall()
        .checked_add(offset)
        .unwrap_or_else(|_| sim.wall())
}

fn trace(sim: &Sim, identity: &str, action: String) {
    let at = sim.rt.now();
    sim.lock().trace.record(at, identity, action);
}

/// One life of a replica: elected, leads, loses.
async fn incarnation(sim: &Sim, identity: &str) {
    let config = config(identity);
    let fence = Fence::leading_never();
    let base = sim.lock().base_instant;
    let instant = |s: &Sim| base + s.rt.now();
    let held = acquire(sim, identity, &config, &fence, instant).await;
    trace(sim, identity, "leads".into());
    let replica = Replica(Arc::new(Inner {
        sim: sim.clone(),
        identity: identity.to_string(),
        config: config.clone(),
        cache: Arc::new(Mutex::new(watch::Cache::default())),
        expectations: Mutex::new(Expectations::default()),
        fence: Arc::clone(&fence),
        base,
        drains: Mutex::new(BTreeMap::new()),
        metrics: Metrics::default(),
        woken: Arc::new(Signal::default()),
    }));
    for kind in [Kind::Node, Kind::Lease, Kind::Policy] {
        let t = watch::start(
            sim,
            Arc::clone(&replica.0.cache),
            Scope {
                kind,
                only_node: None,
            },
            Arc::clone(&replica.0.woken),
        );
        own(sim, identity, t);
    }
    let controller = {
        let r = replica.clone();
        sim.rt.spawn(async move { control(r).await })
    };
    own(sim, identity, controller);
    hold(sim, identity, &config, &fence, held, instant).await;
    trace(sim, identity, "stops: no longer the leader".into());
    crashed(sim, identity);
}

/// Registers a task of this life of `identity`.
fn own(sim: &Sim, identity: &str, task: TaskId) {
    sim.lock()
        .replica_tasks
        .entry(identity.to_string())
        .or_default()
        .push(task);
}

/// Stops every task of the current life of `identity` (its caches, controller and
/// drains): it crashed or stopped leading.
pub fn crashed(sim: &Sim, identity: &str) {
    let tasks = sim
        .lock()
        .replica_tasks
        .remove(identity)
        .unwrap_or_default();
    for t in tasks {
        sim.rt.kill(t);
    }
}

/// Waits until this replica leads, with the real election rules; returns the Lease as
/// written.
async fn acquire(
    sim: &Sim,
    identity: &str,
    config: &Config,
    fence: &Fence,
    instant: impl Fn(&Sim) -> tokio::time::Instant,
) -> Lease {
    let mut watched: Option<(leader::RenewalId, Duration)> = None;
    loop {
        let sent = instant(sim);
        let now = clock(sim, identity);
        let current = sim
            .request(identity, false, |w| {
                Ok(w.api.leases.get(LEASE_NAME).cloned())
            })
            .await;
        let current = match current {
            Ok(c) => c,
            Err(_) => {
                sim.rt.sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (seen, unchanged_for) = watched
            .as_ref()
            .map_or((None, Duration::ZERO), |(id, d)| (Some(id), *d));
        let take = leader::take(
            current.as_deref(),
            identity,
            seen,
            unchanged_for,
            config.leader_lease_duration,
            now,
        );
        let written = match take {
            Take::Create(lease) => {
                sim.request(identity, true, |w| w.api.create_lease(lease))
                    .await
            }
            Take::Replace(lease) => {
                sim.request(identity, true, |w| w.api.replace_lease(lease))
                    .await
            }
            Take::Wait(seen) => {
                watched =
                    Some(follow(sim, identity, seen.as_ref(), config.leader_lease_duration).await);
                continue;
            }
        };
        match written {
            Ok(lease) => {
                fence.lead_until(sent + config.renew_deadline());
                return (*lease).clone();
            }
            Err(_) => sim.rt.sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Watches the leader Lease held by another replica until it goes unrenewed for its
/// term (on this replica's own count), or is released or deleted.
async fn follow(
    sim: &Sim,
    identity: &str,
    seen: Option<&Lease>,
    default_term: Duration,
) -> (leader::RenewalId, Duration) {
    let mut last = seen.map(leader::renewal);
    let term = seen
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_term, Duration::from_secs);
    let mut since = sim.rt.now();
    let grew = Arc::new(Signal::default());
    sim.lock().watchers.push(Arc::clone(&grew));
    loop {
        let deadline = since + term;
        match race(grew.wait(), sim.rt.sleep_until(deadline)).await {
            Either::Right(()) => return (last.unwrap_or_default(), sim.rt.now() - since),
            Either::Left(()) => {
                let delay = {
                    let mut w = sim.lock();
                    let max = w.timing.max_watch_delay;
                    w.jitter(max)
                };
                sim.rt.sleep(delay).await;
                let now = sim.lock().api.leases.get(LEASE_NAME).cloned();
                let Some(lease) = now else {
                    return (last.unwrap_or_default(), sim.rt.now() - since);
                };
                if leader::is_free(&lease) {
                    return (last.unwrap_or_default(), sim.rt.now() - since);
                }
                let id = Some(leader::renewal(&lease));
                if id != last {
                    last = id;
                    since = sim.rt.now();
                }
                let _ = identity;
            }
        }
    }
}

/// Renews every interval from the Lease as last written, with the real renewal rule;
/// returns as soon as leadership is lost or the renew deadline passes without a
/// successful renewal (whatever a hung request is doing), with the fence closed.
async fn hold(
    sim: &Sim,
    identity: &str,
    config: &Config,
    fence: &Fence,
    mut held: Lease,
    instant: impl Fn(&Sim) -> tokio::time::Instant,
) {
    let Writable::Until(mut deadline) = fence.writable_at(instant(sim)) else {
        fence.close();
        return;
    };
    let base = sim.lock().base_instant;
    let virt = |i: tokio::time::Instant| i.saturating_duration_since(base);
    let mut wait = config.leader_renew_interval;
    // `BATON_SIM_ELECTOR=unbounded` puts back the elector of before the safety issue:
    // nothing bounds its wait by the renew deadline (sim/bugs/, bug 5).
    let unbounded = std::env::var("BATON_SIM_ELECTOR").is_ok_and(|v| v == "unbounded");
    let slack = Duration::from_secs(if unbounded { 1 << 40 } else { 0 });
    loop {
        if let Either::Right(()) = race(
            sim.rt.sleep(wait),
            sim.rt.sleep_until(virt(deadline) + slack),
        )
        .await
        {
            break;
        }
        let sent = instant(sim);
        let next = leader::renewed(&held, clock(sim, identity), config.leader_lease_duration);
        let renewal = sim.request(identity, true, |w| w.api.replace_lease(next));
        let outcome = match race(renewal, sim.rt.sleep_until(virt(deadline) + slack)).await {
            Either::Left(r) => r,
            Either::Right(()) => break,
        };
        match outcome {
            Ok(lease) => {
                held = (*lease).clone();
                deadline = sent + config.renew_deadline();
                fence.lead_until(deadline);
                wait = config.leader_renew_interval;
            }
            Err(ApiError::Conflict | ApiError::NotFound) => {
                let current = sim.lock().api.leases.get(LEASE_NAME).cloned();
                match current {
                    Some(l)
                        if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                            == Some(identity) =>
                    {
                        held = (*l).clone();
                        wait = Duration::ZERO;
                    }
                    _ => break,
                }
            }
            Err(_) => wait = Duration::from_secs(1).min(config.leader_renew_interval),
        }
    }
    fence.close();
}

/// The controller loop: reconciles every policy when a cache changes and when its
/// requeue comes due, with the real reconcile.
async fn control(r: Replica) {
    let sim = r.0.sim.clone();
    let mut due: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        let next = due.values().min().copied();
        let woke = match next {
            Some(at) => matches!(
                race(r.0.woken.wait(), sim.rt.sleep_until(at)).await,
                Either::Left(())
            ),
            None => {
                r.0.woken.wait().await;
                true
            }
        };
        let now = sim.rt.now();
        let policies: Vec<Arc<UpdatePolicy>> =
            watch::lock(&r.0.cache).policies.values().cloned().collect();
        due.retain(|name, _| policies.iter().any(|p| p.name_any() == *name));
        for policy in policies {
            let name = policy.name_any();
            let ready = woke || due.get(&name).is_none_or(|at| *at <= now);
            if !ready {
                continue;
            }
            match reconcile::policy(&r, &policy).await {
                Ok(Some(after)) => {
                    due.insert(name, sim.rt.now() + after);
                }
                // Only on a change, as the controller's await_change.
                Ok(None) => {
                    due.remove(&name);
                }
                Err(e) => {
                    trace(
                        &sim,
                        &r.0.identity,
                        format!("reconcile of {name} failed: {e}"),
                    );
                    due.insert(name, sim.rt.now() + reconcile::retry_after(&e));
                }
            }
        }
    }
}

/// One leading replica's state.
struct Inner {
    sim: Sim,
    identity: String,
    config: Config,
    cache: watch::Shared,
    expectations: Mutex<Expectations>,
    fence: Arc<Fence>,
    base: tokio::time::Instant,
    drains: Mutex<BTreeMap<String, TaskId>>,
    metrics: Metrics,
    woken: Arc<Signal>,
}

/// A leading replica: the operator's [`Cluster`] on the model.
#[derive(Clone)]
pub struct Replica(Arc<Inner>);

impl Replica {
    fn writable(&self) -> bool {
        self.0.fence.writable_at(self.0.base + self.0.sim.rt.now()) != Writable::No
    }

    fn wall(&self) -> Timestamp {
        clock(&self.0.sim, &self.0.identity)
    }
}

fn refusal(e: ApiError) -> Refusal {
    Refusal {
        code: Some(e.code()).filter(|c| *c < 500),
        message: e.to_string(),
    }
}

fn seen_of<K: Resource>(o: Option<&Arc<K>>) -> Option<Seen> {
    o.map(|o| Seen {
        uid: o.uid(),
        resource_version: o.resource_version(),
    })
}

impl Cluster for Replica {
    fn namespace(&self) -> &str {
        NAMESPACE
    }

    fn now(&self) -> Timestamp {
        self.wall()
    }

    fn config(&self) -> &Config {
        &self.0.config
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn nodes(&self) -> Vec<Arc<CachedNode>> {
        watch::lock(&self.0.cache)
            .nodes
            .values()
            .map(|n| Arc::new(CachedNode::from_node(n)))
            .collect()
    }

    fn leases(&self) -> Vec<Arc<Lease>> {
        watch::lock(&self.0.cache)
            .leases
            .values()
            .cloned()
            .collect()
    }

    fn policies(&self) -> Vec<Arc<UpdatePolicy>> {
        watch::lock(&self.0.cache)
            .policies
            .values()
            .cloned()
            .collect()
    }

    fn caches_ready(&self) -> bool {
        watch::lock(&self.0.cache).listed.iter().all(|l| *l)
    }

    fn cached(&self, key: &ObjectKey) -> Option<Seen> {
        let c = watch::lock(&self.0.cache);
        match key.kind {
            "Node" => seen_of(c.nodes.get(&key.name)),
            _ => seen_of(c.leases.get(&key.name)),
        }
    }

    fn expectations(&self) -> MutexGuard<'_, Expectations> {
        lock(&self.0.expectations)
    }

    async fn read(&self, key: &ObjectKey) -> std::result::Result<Option<Seen>, Refusal> {
        let k = key.clone();
        self.0
            .sim
            .request(&self.0.identity, false, move |w| {
                Ok(match k.kind {
                    "Node" => seen_of(w.api.nodes.get(&k.name)),
                    _ => seen_of(w.api.leases.get(&k.name)),
                })
            })
            .await
            .map_err(refusal)
    }

    async fn running_pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let _ = selector;
        Ok(Vec::new())
    }

    async fn send(&self, write: Write<'_>) -> std::result::Result<Option<String>, Refusal> {
        if !self.writable() {
            return Err(Refusal {
                code: None,
                message: "not sending: this replica cannot be sure it still leads".into(),
            });
        }
        let sim = &self.0.sim;
        let id = self.0.identity.clone();
        let clock = self.wall();
        let at = sim.rt.now();
        let result = sim
            .request(&id, false, |w| {
                let w = &mut *w;
                let mut written = None;
                let done = match write {
                    Write::PatchNode { node, patch } => {
                        let before = w.api.nodes.get(node).cloned();
                        let after = w.api.patch_node(node, patch)?;
                        w.checker.node_written(
                            at,
                            &Writer::Operator(id.clone()),
                            node,
                            patch,
                            before.as_deref(),
                            Some(&after),
                        );
                        written = after.metadata.resource_version.clone();
                        format!("patches Node {node}: {}", brief(patch))
                    }
                    Write::CreateLease(lease) => {
                        let created = w.api.create_lease(lease.clone())?;
                        written = created.metadata.resource_version.clone();
                        w.checker.lease_written(at, &w.api, &created, true, clock);
                        format!(
                            "grants {} ({})",
                            created.name_any(),
                            brief(&serde_json::to_value(created.annotations()).unwrap_or_default())
                        )
                    }
                    Write::PatchLease { name, patch } => {
                        let after = w.api.patch_lease(name, patch)?;
                        w.checker.lease_written(at, &w.api, &after, false, clock);
                        written = after.metadata.resource_version.clone();
                        format!("patches Lease {name}: {}", brief(patch))
                    }
                    Write::DeleteLease {
                        name,
                        uid,
                        resource_version,
                    } => {
                        w.api.delete_lease(
                            name,
                            &Preconditions {
                                uid,
                                resource_version,
                            },
                        )?;
                        format!("releases {name}")
                    }
                    Write::PatchPolicy { name, patch } => {
                        w.api.patch_policy(name, patch)?;
                        let now = w.api.policies.get(name).cloned();
                        w.checker.policy_changed(at, name, now);
                        format!("patches UpdatePolicy {name}: {}", brief(patch))
                    }
                    Write::PatchPolicyStatus { name, patch } => {
                        w.api.patch_policy_status(name, patch)?;
                        let now = w.api.policies.get(name).cloned();
                        w.checker.policy_changed(at, name, now);
                        format!("writes the status of {name}: {patch}")
                    }
                };
                w.trace.record(at, &id, done);
                Ok(written)
            })
            .await;
        if let Err(e) = &result {
            trace(sim, &self.0.identity, format!("write refused: {e}"));
        }
        result.map_err(refusal)
    }

    async fn event(
        &self,
        node: &str,
        type_: kube::runtime::events::EventType,
        reason: &str,
        note: &str,
    ) {
        let _ = (node, type_, reason, note);
    }

    async fn policy_event(
        &self,
        policy: &UpdatePolicy,
        type_: kube::runtime::events::EventType,
        reason: &str,
        note: &str,
    ) {
        let _ = (policy, type_, reason, note);
    }

    async fn alert_gate(&self, gate: &rollout::alert::AlertGate, now: Timestamp) -> Option<String> {
        let _ = (gate, now);
        None
    }

    async fn start_drain(&self, node: &str, rules: DrainRules, deadline: Timestamp) {
        let running = lock(&self.0.drains)
            .get(node)
            .is_some_and(|t| self.0.sim.rt.alive(*t));
        if running {
            return;
        }
        let (me, name) = (self.clone(), node.to_string());
        let pods = SimPods(self.clone());
        let task = self.0.sim.rt.spawn(async move {
            operator::drain::run(&me, &pods, &name, rules, deadline).await;
        });
        lock(&self.0.drains).insert(node.to_string(), task);
        own(&self.0.sim, &self.0.identity, task);
    }

    fn stop_drain(&self, node: &str) {
        if let Some(t) = lock(&self.0.drains).remove(node) {
            self.0.sim.rt.kill(t);
        }
    }

    async fn force_drain(&self, node: &str, rules: &DrainRules) -> Result<usize> {
        operator::drain::force(&SimPods(self.clone()), node, rules).await
    }
}

/// A short form of a JSON write for the trace.
fn brief(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 160 {
        s.truncate(157);
        s.push_str("...");
    }
    s
}

/// The Eviction API and pod listing of the model, for the real drain.
struct SimPods(Replica);

impl Pods for SimPods {
    async fn pause(&self, d: Duration) {
        self.0.0.sim.rt.sleep(d).await;
    }

    async fn on_node(&self, node: &str) -> Result<Vec<Pod>> {
        let node = node.to_string();
        self.0
            .0
            .sim
            .request(&self.0.0.identity, false, move |w| Ok(w.api.pods_on(&node)))
            .await
            .map_err(|e| operator::error::Error::api("pods", refusal(e)))
    }

    async fn evict(&self, pod: &Pod, _grace: Option<i64>) -> std::result::Result<(), Refusal> {
        if !self.0.writable() {
            return Err(Refusal {
                code: None,
                message: "not leading".into(),
            });
        }
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let sim = self.0.0.sim.clone();
        let id = self.0.0.identity.clone();
        let at = sim.rt.now();
        let evicted = sim
            .request(&id, false, |w| {
                let p = w.api.evict(&ns, &name)?;
                w.trace.record(at, &id, format!("evicts pod {ns}/{name}"));
                Ok(p)
            })
            .await
            .map_err(refusal)?;
        crate::workload::replace(&sim, evicted);
        Ok(())
    }

    async fn delete(&self, pod: &Pod, _grace: Option<i64>) -> std::result::Result<(), Refusal> {
        if !self.0.writable() {
            return Err(Refusal {
                code: None,
                message: "not leading".into(),
            });
        }
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let sim = self.0.0.sim.clone();
        let id = self.0.0.identity.clone();
        let at = sim.rt.now();
        let deleted = sim
            .request(&id, false, |w| {
                let policy = w
                    .api
                    .leases
                    .get(&crds::grant::lease_name(&node))
                    .and_then(|l| {
                        l.annotations()
                            .get(crds::protocol::lease::POLICY.name)
                            .cloned()
                    });
                let p = w.api.delete_pod(&ns, &name)?;
                w.checker
                    .pod_deleted(at, &node, &format!("{ns}/{name}"), policy.as_deref());
                w.trace.record(
                    at,
                    &id,
                    format!("deletes pod {ns}/{name} (onTimeout: Force)"),
                );
                Ok(p)
            })
            .await
            .map_err(refusal)?;
        crate::workload::replace(&sim, deleted);
        Ok(())
    }

    async fn budget_of(&self, pod: &Pod) -> Option<String> {
        let w = self.0.0.sim.lock();
        w.api.budgets_of(pod).first().map(|b| b.name_any())
    }
}
