//! Reconciling one policy, through [`Cluster`] alone: observe the caches, ask
//! `rollout::decide` what to do, perform each node's step, write the status and the
//! Events when they changed, and say when to look again. The controller
//! (`controller`) runs it on the API server; the simulation runs the same function on
//! its model.

use std::{collections::HashMap, time::Duration};

use kube::{Resource, ResourceExt, runtime::events::EventType};
use tracing::{Instrument, debug, info, info_span, warn};

use crds::{UpdatePolicy, policy::FINALIZER};
use rollout::{
    Policy, decide,
    expectations::ObjectKey,
    plan::{Action, NodePlan, TAKEOVER_WITHIN},
    policy::Ending,
};

use crate::{
    cluster::Cluster,
    error::{Error, Result},
    observe, readback, status, step,
};

/// How soon a reconcile that found its caches behind its own writes looks again (the
/// watch event that catches them up wakes it sooner).
pub const READBACK_RECHECK: Duration = Duration::from_secs(1);

/// How soon a step that failed on a write conflict is tried again.
const STEP_CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// How soon a step that failed otherwise is tried again.
const STEP_RETRY: Duration = Duration::from_secs(5);

/// The longest a policy goes without a reconcile.
pub const RESYNC: Duration = Duration::from_secs(60);

/// How often a node held back only by a blocking pod or a closed gate is looked at
/// again.
const GATE_RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

/// How often a node waiting on etcd (its quorum, a leader move, a member's rejoin) is
/// looked at again: etcd has no watch for its members' health.
const ETCD_RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// How soon a reconcile that failed with `error` is tried again.
pub fn retry_after(error: &Error) -> Duration {
    Duration::from_secs(if matches!(error, Error::Conflict(_)) {
        1
    } else {
        5
    })
}

/// Reconciles `policy`. Returns when to look at it again (`None`: only on a change).
pub async fn policy<C: Cluster>(c: &C, policy: &UpdatePolicy) -> Result<Option<Duration>> {
    // Never decide from a cache older than the operator's own last write.
    if !c.caches_ready() || !readback::caught_up(c).await {
        debug!("the caches do not show every write yet");
        return Ok(Some(READBACK_RECHECK));
    }
    let now = c.now();
    if policy.meta().deletion_timestamp.is_some() {
        return end_deleted(c, policy, now).await;
    }
    ensure_finalizer(c, policy).await?;
    match rules(c, policy) {
        Ok(rules) => roll_out(c, policy, &rules, now).await,
        Err(errors) => wind_down_invalid(c, policy, &errors, now).await,
    }
}

/// The rules of a policy's spec, or why they cannot be used: the spec's own errors,
/// what this operator's configuration refuses, and a promotion cycle.
fn rules<C: Cluster>(
    c: &C,
    policy: &UpdatePolicy,
) -> std::result::Result<Policy, Vec<rollout::policy::SpecError>> {
    let name = policy.name_any();
    let rules = Policy::from_spec(&name, &policy.spec)?;
    let mut refused = c.config().refuses(&rules);
    let policies = c.policies();
    if let Some(chain) = rollout::promotion::cycle(&name, policies.iter().map(|p| p.as_ref())) {
        refused.push(rollout::policy::SpecError {
            field: "spec.promotion.after".into(),
            message: format!("promotion cycle {chain}: one pool of the chain must go first"),
        });
    }
    if refused.is_empty() {
        Ok(rules)
    } else {
        Err(refused)
    }
}

/// What became of the step that follows a drain's end, taken by the drain's own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDrain {
    /// The decision allowed the reboot, and the allowance is written.
    Allowed,
    /// The caches do not show the drain's end, or a write of the operator's to the node
    /// or its Lease, yet: ask again shortly.
    NotYet,
    /// Left to the policy's next pass: the decision is another step (a failure, a
    /// deadline), the policy is being deleted, invalid or gone, or its pool has a
    /// control-plane node (the pass decides those on etcd's members, which it reads).
    Left,
}

/// The step that follows a drain's end, taken at once by the drain's task instead of by
/// the policy's next pass (which could be a pass or two away: each pass waits for the
/// one before it and for the caches to show its writes). It is the same decision
/// (`rollout::decide::held`, the step `decide` gives a held node, checked equal by the
/// property tests) on the caches, with the node and its Lease showing every write of the
/// operator's, and only an [`Action::AllowReboot`] is performed, guarded like every
/// step by the versions the decision saw; anything else is left to the pass. A pass
/// that decides the same at the same time conflicts on the node's version and decides
/// again. It never grants, so the budget is the pass's alone.
pub async fn after_drain<C: Cluster>(c: &C, node: &str) -> Result<AfterDrain> {
    if !c.caches_ready() {
        return Ok(AfterDrain::NotYet);
    }
    let lease_name = crate::lease::name(node);
    let Some(lease) = c.leases().into_iter().find(|l| l.name_any() == lease_name) else {
        return Ok(AfterDrain::NotYet);
    };
    let (Some(view), _) = rollout::snapshot::LeaseView::from_lease(&lease) else {
        return Ok(AfterDrain::Left);
    };
    if view.node != node {
        return Ok(AfterDrain::Left);
    }
    if view.drained.is_none() {
        return Ok(AfterDrain::NotYet);
    }
    let (node_key, lease_key) = (ObjectKey::node(node), ObjectKey::lease(&lease_name));
    let pending = c.expectations().settle(|key| c.cached(key));
    if pending.iter().any(|k| *k == node_key || *k == lease_key) {
        return Ok(AfterDrain::NotYet);
    }
    let Some(policy) = c
        .policies()
        .into_iter()
        .find(|p| p.name_any() == view.policy)
    else {
        return Ok(AfterDrain::Left);
    };
    if policy.meta().deletion_timestamp.is_some() {
        return Ok(AfterDrain::Left);
    }
    let Ok(rules) = rules(c, &policy) else {
        return Ok(AfterDrain::Left);
    };
    // A pool with a control-plane node is decided on etcd's members, which only a pass
    // reads (a member's node need not carry the control-plane label): left to it.
    let nodes = c.nodes();
    let control_plane = nodes.iter().any(|n| {
        rules.selector.matches(&n.view.labels) && rollout::etcd::is_control_plane(&n.view.labels)
    });
    if control_plane {
        return Ok(AfterDrain::Left);
    }
    // The node's own step, as `decide` gives it: the rest of the pool does not enter it.
    let Some(cached) = nodes.iter().find(|n| n.view.name == node) else {
        return Ok(AfterDrain::Left);
    };
    if rollout::etcd::is_control_plane(&cached.view.labels) {
        return Ok(AfterDrain::Left);
    }
    // What a pass decides on for a pool without a control-plane node.
    let etcd = rollout::etcd::Etcd::default();
    let action = rollout::decide::held(Some(&cached.view), &view, &rules, &etcd, c.now());
    // The allowance's own write, not `step::perform`: a drain's task starts no drain.
    let Action::AllowReboot { boot_id } = action else {
        return Ok(AfterDrain::Left);
    };
    let seen = rollout::plan::Seen::of(Some(&cached.view), Some(&view));
    let Some(seen) = seen.node else {
        return Ok(AfterDrain::Left);
    };
    step::allow_reboot(c, node, &seen, &boot_id).await?;
    debug!(node, "the reboot allowed at the drain's end");
    Ok(AfterDrain::Allowed)
}

/// At most this many `Waiting` Events per reconcile (the rest come with later ones).
pub const WAITING_EVENTS: usize = 10;

/// A valid policy: observe, decide, perform, report, and requeue when the plan can
/// next change.
async fn roll_out<C: Cluster>(
    c: &C,
    policy: &UpdatePolicy,
    rules: &Policy,
    now: jiff::Timestamp,
) -> Result<Option<Duration>> {
    let mut snapshot = observe::snapshot(c, rules, c.config().node_name.clone());
    let blocked = observe::mark_blocked(c, rules, &mut snapshot).await?;
    if let Some(gate) = &rules.alert_gate
        && snapshot.nodes.iter().any(|n| n.requests_reboot())
    {
        snapshot.gate = c.alert_gate(gate, now).await;
    }
    // etcd is read only while something could depend on it: the pool has a
    // control-plane node, and a node asks for a reboot or is in flight.
    let control_plane = snapshot
        .nodes
        .iter()
        .any(|n| rules.selector.matches(&n.labels) && rollout::etcd::is_control_plane(&n.labels));
    let active = snapshot.nodes.iter().any(|n| n.requests_reboot()) || !snapshot.leases.is_empty();
    if control_plane && active {
        snapshot.etcd = c.etcd().await;
    }
    let plan = decide(&snapshot, rules, now);
    debug!(
        limit = plan.budget.limit,
        unavailable = plan.budget.unavailable,
        granted = plan.budget.granted,
        taken_over = plan.budget.taken_over,
        asking = snapshot
            .nodes
            .iter()
            .filter(|n| n.requests_reboot())
            .count(),
        waiting = plan.counts.waiting,
        in_progress = plan.counts.in_progress,
        up_to_date = plan.counts.up_to_date,
        "decided"
    );
    c.metrics().observe(&plan);
    c.metrics()
        .observe_phases(&rules.name, &snapshot.nodes, &plan.holders);
    // Why each waiting node waits: an Event when its reason changes (a budget holder
    // changing is the same reason, so no storm while a pool drains through).
    for (node, _) in c.metrics().observe_waiting(&plan, WAITING_EVENTS) {
        if let Some(words) = rollout::why::action(&node, &plan, rules, now) {
            c.event(&node, EventType::Normal, "Waiting", &words).await;
        }
    }
    let mut status = status::from_plan(
        &plan,
        rules.paused,
        policy.meta().generation,
        policy.status.as_ref(),
        now,
    );
    status.next_window_local = status::next_window_local(&plan, &rules.windows, now);
    status.freeze = status::freeze(&rules.windows, now);
    status.completed = status::completed(
        &plan,
        rules.target_version.as_ref(),
        policy.status.as_ref(),
        now,
    );
    // The status is the plan's, so it is written while the steps run: a pass costs
    // the steps' round trips, not theirs and the status write's one after the other.
    let report = async {
        // Before the status write: if it fails, the next reconcile announces again (at
        // least once) rather than never.
        crate::notify::announce(c, policy, &status, &plan, now).await;
        if policy.status.as_ref() != Some(&status) {
            for (kind, message) in status::raised(policy.status.as_ref(), &status) {
                c.policy_event(policy, EventType::Warning, kind, message)
                    .await;
            }
            c.write_status(&rules.name, &status).await?;
        }
        Ok::<(), Error>(())
    };
    // A status that says the rollout completed is read by the pools promoted after
    // this one: it waits for the steps that finish the last nodes.
    let (retry, reported) = if status.completed.is_some() {
        let retry = perform(c, rules, &plan.nodes, now).await;
        (retry, report.await)
    } else {
        futures::future::join(perform(c, rules, &plan.nodes, now), report).await
    };
    crate::silence::sync(c, rules, &plan, now).await;
    reported?;
    // Pods and alerts are not watched (a cluster-wide pod cache would dwarf the
    // operator; Prometheus has no watch), so a node held back only by a blocking pod
    // or a closed gate is looked at again after GATE_RECHECK.
    let gated = blocked || snapshot.gate.is_some();
    let blocked_recheck = gated.then(|| now.checked_add(GATE_RECHECK).ok()).flatten();
    let etcd_recheck = plan
        .nodes
        .iter()
        .any(|n| rollout::why::waits_on_etcd(&n.action))
        .then(|| now.checked_add(ETCD_RECHECK).ok())
        .flatten();
    let next = [plan.next_change, blocked_recheck, etcd_recheck]
        .into_iter()
        .flatten()
        .min();
    Ok(Some(requeue(next, retry, now)))
}

/// A spec that cannot be used: report it, and still drive the nodes in flight (a grant
/// not yet rebooting ends, a reboot under way finishes; failures stay recorded).
async fn wind_down_invalid<C: Cluster>(
    c: &C,
    policy: &UpdatePolicy,
    errors: &[rollout::policy::SpecError],
    now: jiff::Timestamp,
) -> Result<Option<Duration>> {
    let name = policy.name_any();
    let rules = Policy::wind_down(&name, &policy.spec, Ending::InvalidSpec);
    let snapshot = observe::snapshot(c, &rules, c.config().node_name.clone());
    let plan = decide(&snapshot, &rules, now);
    let retry = perform(c, &rules, &plan.nodes, now).await;
    let status = status::invalid(
        errors,
        policy.meta().generation,
        policy.status.as_ref(),
        now,
    );
    if policy.status.as_ref() != Some(&status) {
        let note = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        c.policy_event(policy, EventType::Warning, "InvalidSpec", &note)
            .await;
        c.write_status(&name, &status).await?;
    }
    Ok(Some(requeue(plan.next_change, retry, now)))
}

/// A policy being deleted: end its grants (a reboot under way finishes first), then
/// let it go by removing the finalizer once it holds no Lease.
async fn end_deleted<C: Cluster>(
    c: &C,
    policy: &UpdatePolicy,
    now: jiff::Timestamp,
) -> Result<Option<Duration>> {
    let name = policy.name_any();
    let rules = Policy::wind_down(&name, &policy.spec, Ending::Deleted);
    let snapshot = observe::snapshot(c, &rules, c.config().node_name.clone());
    if !snapshot.leases.iter().any(|l| l.policy == name) {
        remove_finalizer(c, policy).await?;
        c.metrics().forget(&name);
        return Ok(None);
    }
    let plan = decide(&snapshot, &rules, now);
    let retry = perform(c, &rules, &plan.nodes, now).await;
    Ok(Some(requeue(plan.next_change, retry, now)))
}

/// How many nodes' steps run at once. Each step is a few API requests; one after
/// another, a plan that moves many nodes (a release published to 1,000 nodes, a 10%
/// budget filling, many nodes finishing together) waits for all of them in turn, and
/// so does every node behind them. Steps of one plan are independent of each other:
/// each node has one, and `decide` counts a node whose lease is being released as
/// disrupted until its release is seen. The one exception is a grant that takes a
/// released slot (`Action::after`): it runs in its release's future, after it.
const STEPS_AT_ONCE: usize = 32;

/// At most this many publishing steps per pass. A new release reaches a large pool over
/// many short passes instead of one long one: the steps of the nodes in flight (and the
/// grants of nodes that staged it) never wait behind a pool-wide publish. The share
/// fits in one round of [`STEPS_AT_ONCE`] beside as many in-flight steps, so a pass
/// that publishes lasts about one round trip, as one that does not (at 64, a
/// 1,000-node rollout's first passes took 2 to 5 s each and its first wave waited on
/// them).
const PUBLISHES_PER_PASS: usize = STEPS_AT_ONCE / 2;

/// The steps a pass performs, in order: every acting step but publishing first, then at
/// most [`PUBLISHES_PER_PASS`] publishing steps; and whether publishing was left over
/// for the next pass.
fn this_pass(plan: &[NodePlan]) -> (Vec<&NodePlan>, bool) {
    let acting = || plan.iter().filter(|step| step.action.acts());
    let publishing = |step: &&NodePlan| matches!(step.action, Action::Publish { .. });
    let mut steps: Vec<&NodePlan> = acting().filter(|s| !publishing(s)).collect();
    let mut publishes = acting().filter(publishing);
    steps.extend(publishes.by_ref().take(PUBLISHES_PER_PASS));
    (steps, publishes.next().is_some())
}

/// Performs every node's step this pass takes ([`STEPS_AT_ONCE`] at a time); returns
/// how soon to try again when a step failed or publishing was left over. A grant that
/// takes the slot of a node this plan releases runs right after that release, and only
/// once [`slot_freed`] says the slot is free.
pub(crate) async fn perform<C: Cluster>(
    c: &C,
    rules: &Policy,
    plan: &[NodePlan],
    now: jiff::Timestamp,
) -> Option<Duration> {
    use futures::StreamExt;
    let (this_pass, left_over) = this_pass(plan);
    let mut then: HashMap<&str, &NodePlan> = HashMap::new();
    let mut first = Vec::with_capacity(this_pass.len());
    for step in this_pass {
        match step.action.after() {
            Some(after) => {
                then.insert(after, step);
            }
            None => first.push(step),
        }
    }
    // The futures are made first, then run: a stream that maps borrowed steps to
    // futures lends itself to no `Send` proof the controller's runtime accepts.
    let steps: Vec<_> = first
        .into_iter()
        .map(|step| {
            let next = step
                .action
                .completes()
                .then(|| then.remove(step.node.as_str()))
                .flatten();
            async move {
                let result = perform_one(c, rules, step, now).await;
                let mut done = Vec::with_capacity(2);
                let released = result.is_ok();
                done.push((step, result));
                if let Some(next) = next {
                    if released && slot_freed(c, step, now).await {
                        done.push((next, perform_one(c, rules, next, now).await));
                    } else {
                        debug!(node = %next.node, after = %step.node, "the slot was not freed: the grant is left to the next pass");
                    }
                }
                done
            }
        })
        .collect();
    for step in then.values() {
        debug!(node = %step.node, "no release of this pass frees its slot: the grant is left to the next pass");
    }
    let results: Vec<_> = futures::stream::iter(steps)
        .buffer_unordered(STEPS_AT_ONCE)
        .flat_map(futures::stream::iter)
        .collect()
        .await;
    // Publishing left over goes on at once (the next pass waits for this one's writes
    // to show in the caches). A failed step is tried again soon: the change that made
    // it fail (a conflict with a heartbeat, say) may be one that wakes nothing.
    let mut retry: Option<Duration> = left_over.then_some(Duration::ZERO);
    for (step, result) in results {
        if result.is_ok() {
            debug!(node = %step.node, action = %step.action, "step done");
        }
        if let Err(e) = result {
            // A conflict is optimistic concurrency at work (a heartbeat wrote first),
            // retried at once: not worth a warning.
            if matches!(e, Error::Conflict(_)) {
                debug!(node = %step.node, action = %step.action, error = %e, "step conflicted; will retry");
            } else {
                warn!(node = %step.node, action = %step.action, error = %e, "step failed; will retry");
            }
            let after = if matches!(e, Error::Conflict(_)) {
                STEP_CONFLICT_RETRY
            } else {
                STEP_RETRY
            };
            retry = Some(retry.map_or(after, |r| r.min(after)));
        }
    }
    retry
}

/// Whether the slot of the node `released` gave back is free for another grant now:
/// its Lease gone as the API server reads it (a step may succeed without the Lease
/// going, such as one another finalizer holds), and the read answered within
/// [`TAKEOVER_WITHIN`] of the decision, whose window allowed that long.
async fn slot_freed<C: Cluster>(c: &C, released: &NodePlan, decided: jiff::Timestamp) -> bool {
    // Checked before the read and again after it: a slow read, or a clock stepped
    // back, must not carry the grant past the window the decision checked.
    let in_time = || {
        let now = c.now();
        decided <= now
            && decided
                .checked_add(TAKEOVER_WITHIN)
                .is_ok_and(|bound| now <= bound)
    };
    let Some(lease) = released.seen.lease.as_ref().filter(|_| in_time()) else {
        return false;
    };
    matches!(c.read(&ObjectKey::lease(&lease.name)).await, Ok(None)) && in_time()
}

/// Performs one node's step, in its node's span.
async fn perform_one<C: Cluster>(
    c: &C,
    rules: &Policy,
    step: &NodePlan,
    now: jiff::Timestamp,
) -> Result<()> {
    let span = info_span!("node", node = %step.node);
    step::perform(c, rules, step, now).instrument(span).await
}

/// When to look at the policy again: at `next` (a timer of the plan), soon after a
/// failed step, and at least every RESYNC.
fn requeue(
    next: Option<jiff::Timestamp>,
    retry: Option<Duration>,
    now: jiff::Timestamp,
) -> Duration {
    // Timers run on the monotonic clock while the rules run on the wall clock: a clock
    // step (NTP, a resumed VM) would leave a far-off requeue far off. Looking again at
    // least every RESYNC bounds that; it reads only the caches and writes nothing
    // unless something changed.
    let wait = next.map_or(RESYNC, |t| {
        t.duration_since(now)
            .unsigned_abs()
            .clamp(Duration::from_millis(100), RESYNC)
    });
    retry.map_or(wait, |r| wait.min(r))
}

/// Puts the operator's finalizer on the policy (once), so that deleting it ends its
/// grants first.
async fn ensure_finalizer<C: Cluster>(c: &C, policy: &UpdatePolicy) -> Result<()> {
    let mut finalizers = policy.finalizers().to_vec();
    if finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    finalizers.push(FINALIZER.to_string());
    c.set_finalizers(policy, finalizers).await
}

async fn remove_finalizer<C: Cluster>(c: &C, policy: &UpdatePolicy) -> Result<()> {
    let finalizers: Vec<String> = policy
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if finalizers.len() == policy.finalizers().len() {
        return Ok(());
    }
    info!("every grant ended: the policy may go");
    c.set_finalizers(policy, finalizers).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::protocol::{BootId, Version};
    use rollout::plan::Seen;

    fn step(node: &str, action: Action) -> NodePlan {
        NodePlan {
            node: node.into(),
            action,
            seen: Seen::default(),
        }
    }

    fn publish(node: usize) -> NodePlan {
        let version = Version::new("2.0.0").unwrap();
        step(
            &format!("p{node}"),
            Action::Publish {
                version,
                release: None,
            },
        )
    }

    #[test]
    fn a_pass_moves_every_node_in_flight_first_and_publishes_a_bounded_share() {
        let mut plan: Vec<NodePlan> = (0..PUBLISHES_PER_PASS + 10).map(publish).collect();
        let boot_id = BootId::new("b1").unwrap();
        plan.push(step("granted", Action::AllowReboot { boot_id }));
        plan.push(step("waiting", Action::Skip(rollout::Skip::UpToDate)));
        let (steps, left_over) = this_pass(&plan);
        assert_eq!(steps[0].node, "granted", "in flight first");
        assert!(
            steps.iter().all(|s| s.node != "waiting"),
            "a skip does nothing"
        );
        assert_eq!(steps.len(), 1 + PUBLISHES_PER_PASS);
        assert_eq!(steps[1].node, "p0", "publishing in the plan's order");
        assert!(left_over, "the rest is published by the next pass");

        let (steps, left_over) = this_pass(&plan[PUBLISHES_PER_PASS..]);
        assert_eq!(steps.len(), 10 + 1);
        assert!(!left_over);
    }
}
