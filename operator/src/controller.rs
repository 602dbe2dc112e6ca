//! The operator's controller: watches UpdatePolicies, Nodes and the operator's reboot
//! Leases; for each policy, observes the caches (`observe`), asks `rollout::decide`
//! what to do, performs each node's step (`step`, through `cluster::Kube`), writes the
//! status when it changed, and requeues exactly when the plan says the decision can
//! next change. It keeps no state of its own beyond running drains and the writes not
//! yet seen in its caches: on restart everything is rebuilt from the API.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action as Requeue,
        events::{EventType, Recorder, Reporter},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tracing::{Instrument, info, info_span, warn};

use crds::{UpdatePolicy, policy::FINALIZER};
use rollout::{Policy, decide, policy::Ending};

use crate::{
    cluster::{Kube, publish},
    config::Config,
    context::{AbortDrains, Context},
    error::{Error, Result},
    lease,
    metrics::{ErrorLabels, Metrics},
    observe, readback, status, step,
};

/// Runs the controller until the process is stopped.
pub async fn run(client: Client, config: Config, metrics: Arc<Metrics>) {
    run_with_clock(
        client,
        config,
        metrics,
        Arc::new(crate::clock::Clock::system()),
    )
    .await;
}

/// [`run`], judging every rule at `clock`'s time.
pub async fn run_with_clock(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<crate::clock::Clock>,
) {
    let alerts = match crate::alert::Alerts::new() {
        Ok(alerts) => alerts,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the Prometheus client");
            return;
        }
    };
    let nodes_api: Api<Node> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let (nodes, node_writer) = reflector::store();
    let (leases, lease_writer) = reflector::store();
    // Nodes are cached slimmed (`cache::slim`): on big clusters their images, addresses
    // and conditions dominate the operator's memory and baton never reads them. Deletions
    // count as changes (touched, not only applied): a deleted node frees its lease at once.
    // Heartbeats and other changes baton does not read update the cache but wake
    // nothing (`cache::Changes`).
    let mut changes = crate::cache::Changes::default();
    let counted = Arc::clone(&metrics);
    let node_stream = watcher(nodes_api, watcher::Config::default())
        .modify(crate::cache::slim)
        .reflect(node_writer)
        .filter(move |event| {
            let admitted = event.as_ref().map_or(true, |e| changes.admit(e));
            counted.node_event(admitted);
            std::future::ready(admitted)
        })
        .touched_objects()
        .default_backoff();
    let lease_selector = format!("{}={}", lease::MANAGED_BY.0, lease::MANAGED_BY.1);
    let lease_stream = watcher(
        leases_api,
        watcher::Config::default().labels(&lease_selector),
    )
    .reflect(lease_writer)
    .touched_objects()
    .default_backoff();

    let controller = Controller::new(
        Api::<UpdatePolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let policies = controller.store();
    let every_policy = {
        let policies = policies.clone();
        move || {
            policies
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        }
    };
    let for_node = every_policy.clone();
    let reporter = Reporter {
        controller: "baton-operator".into(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        config,
        nodes,
        leases,
        policies,
        drains: std::sync::Mutex::new(HashMap::new()),
        metrics,
        alerts,
        clock,
        expectations: std::sync::Mutex::default(),
    });
    // Drains run as their own tasks; they must not outlive this controller (a replica
    // that stops leading must stop evicting at once).
    let _drains = AbortDrains(Arc::clone(&ctx));
    controller
        .watches_stream(node_stream, move |_| for_node())
        .watches_stream(lease_stream, move |_| every_policy())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn error_policy(policy: Arc<UpdatePolicy>, error: &Error, ctx: Arc<Context>) -> Requeue {
    warn!(policy = %policy.name_any(), error = %error, kind = error.metric_label(), "reconcile error; retrying");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: error.metric_label().into(),
        })
        .inc();
    Requeue::requeue(Duration::from_secs(
        if matches!(error, Error::Conflict(_)) {
            1
        } else {
            5
        },
    ))
}

async fn reconcile(policy: Arc<UpdatePolicy>, ctx: Arc<Context>) -> Result<Requeue> {
    let name = policy.name_any();
    let span = info_span!("policy", policy = %name);
    let started = std::time::Instant::now();
    let metrics = Arc::clone(&ctx.metrics);
    let result = async move {
        ctx.nodes.wait_until_ready().await.ok();
        ctx.leases.wait_until_ready().await.ok();
        // Never decide from a cache older than the operator's own last write.
        if !readback::caught_up(&ctx).await {
            return Ok(Requeue::requeue(READBACK_RECHECK));
        }
        let now = ctx.clock.now();
        if policy.meta().deletion_timestamp.is_some() {
            return end_deleted(&ctx, &policy, now).await;
        }
        ensure_finalizer(&ctx, &policy).await?;
        let rules = Policy::from_spec(&name, &policy.spec).and_then(|rules| {
            let refused = ctx.config.refuses(&rules);
            if refused.is_empty() {
                Ok(rules)
            } else {
                Err(refused)
            }
        });
        match rules {
            Ok(rules) => roll_out(&ctx, &policy, &rules, now).await,
            Err(errors) => wind_down_invalid(&ctx, &policy, &errors, now).await,
        }
    }
    .instrument(span)
    .await;
    metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// A valid policy: observe, decide, perform, report, and requeue when the plan can
/// next change.
async fn roll_out(
    ctx: &Arc<Context>,
    policy: &UpdatePolicy,
    rules: &Policy,
    now: jiff::Timestamp,
) -> Result<Requeue> {
    let cluster = Kube(Arc::clone(ctx));
    let mut snapshot = observe::snapshot(&cluster, rules, ctx.config.node_name.clone());
    let blocked = observe::mark_blocked(&cluster, rules, &mut snapshot).await?;
    if let Some(gate) = &rules.alert_gate
        && snapshot.nodes.iter().any(|n| n.requests_reboot())
    {
        snapshot.gate = ctx.alerts.verdict(gate, now).await;
    }
    let plan = decide(&snapshot, rules, now);
    ctx.metrics.observe(&plan);
    let retry = perform(ctx, rules, &plan, now).await;
    let status = status::from_plan(
        &plan,
        rules.paused,
        policy.meta().generation,
        policy.status.as_ref(),
        now,
    );
    if policy.status.as_ref() != Some(&status) {
        for (kind, message) in status::raised(policy.status.as_ref(), &status) {
            publish(
                ctx,
                &policy.object_ref(&()),
                EventType::Warning,
                kind,
                message,
            )
            .await;
        }
        write_status(ctx, &rules.name, &status).await?;
    }
    // Pods and alerts are not watched (a cluster-wide pod cache would dwarf the
    // operator; Prometheus has no watch), so a node held back only by a blocking pod
    // or a closed gate is looked at again after GATE_RECHECK.
    let gated = blocked || snapshot.gate.is_some();
    let blocked_recheck = gated.then(|| now.checked_add(GATE_RECHECK).ok()).flatten();
    let next = [plan.next_change, blocked_recheck]
        .into_iter()
        .flatten()
        .min();
    Ok(requeue(next, retry, now))
}

/// A spec that cannot be used: report it, and still drive the nodes in flight (a grant
/// not yet rebooting ends, a reboot under way finishes; failures stay recorded).
async fn wind_down_invalid(
    ctx: &Arc<Context>,
    policy: &UpdatePolicy,
    errors: &[rollout::policy::SpecError],
    now: jiff::Timestamp,
) -> Result<Requeue> {
    let name = policy.name_any();
    let rules = Policy::wind_down(&name, &policy.spec, Ending::InvalidSpec);
    let cluster = Kube(Arc::clone(ctx));
    let snapshot = observe::snapshot(&cluster, &rules, ctx.config.node_name.clone());
    let plan = decide(&snapshot, &rules, now);
    let retry = perform(ctx, &rules, &plan, now).await;
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
        publish(
            ctx,
            &policy.object_ref(&()),
            EventType::Warning,
            "InvalidSpec",
            &note,
        )
        .await;
        write_status(ctx, &name, &status).await?;
    }
    Ok(requeue(plan.next_change, retry, now))
}

/// A policy being deleted: end its grants (a reboot under way finishes first), then
/// let it go by removing the finalizer once it holds no Lease.
async fn end_deleted(
    ctx: &Arc<Context>,
    policy: &UpdatePolicy,
    now: jiff::Timestamp,
) -> Result<Requeue> {
    let name = policy.name_any();
    let rules = Policy::wind_down(&name, &policy.spec, Ending::Deleted);
    let cluster = Kube(Arc::clone(ctx));
    let snapshot = observe::snapshot(&cluster, &rules, ctx.config.node_name.clone());
    if !snapshot.leases.iter().any(|l| l.policy == name) {
        remove_finalizer(ctx, policy).await?;
        return Ok(Requeue::await_change());
    }
    let plan = decide(&snapshot, &rules, now);
    let retry = perform(ctx, &rules, &plan, now).await;
    Ok(requeue(plan.next_change, retry, now))
}

/// Performs every node's step; returns how soon to try again when a step failed.
async fn perform(
    ctx: &Arc<Context>,
    rules: &Policy,
    plan: &rollout::Plan,
    now: jiff::Timestamp,
) -> Option<Duration> {
    // A failed step is tried again soon: the change that made it fail (a conflict with
    // a heartbeat, say) may be one that wakes nothing.
    let cluster = Kube(Arc::clone(ctx));
    let mut retry: Option<Duration> = None;
    for step in &plan.nodes {
        let span = info_span!("node", node = %step.node);
        if let Err(e) = step::perform(&cluster, rules, step, now)
            .instrument(span)
            .await
        {
            warn!(node = %step.node, action = %step.action, error = %e, "step failed; will retry");
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

/// When to look at the policy again: at `next` (a timer of the plan), soon after a
/// failed step, and at least every RESYNC.
fn requeue(
    next: Option<jiff::Timestamp>,
    retry: Option<Duration>,
    now: jiff::Timestamp,
) -> Requeue {
    // Timers run on the monotonic clock while the rules run on the wall clock: a clock
    // step (NTP, a resumed VM) would leave a far-off requeue far off. Looking again at
    // least every RESYNC bounds that; it reads only the caches and writes nothing
    // unless something changed.
    let wait = next.map_or(RESYNC, |t| {
        t.duration_since(now)
            .unsigned_abs()
            .clamp(Duration::from_millis(100), RESYNC)
    });
    Requeue::requeue(retry.map_or(wait, |r| wait.min(r)))
}

/// Puts the operator's finalizer on the policy (once), so that deleting it ends its
/// grants first.
async fn ensure_finalizer(ctx: &Context, policy: &UpdatePolicy) -> Result<()> {
    let mut finalizers = policy.finalizers().to_vec();
    if finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    finalizers.push(FINALIZER.to_string());
    set_finalizers(ctx, policy, finalizers).await
}

async fn remove_finalizer(ctx: &Context, policy: &UpdatePolicy) -> Result<()> {
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
    set_finalizers(ctx, policy, finalizers).await
}

/// Replaces the policy's finalizers, guarded by its resourceVersion.
async fn set_finalizers(
    ctx: &Context,
    policy: &UpdatePolicy,
    finalizers: Vec<String>,
) -> Result<()> {
    let name = policy.name_any();
    let patch = serde_json::json!({"metadata": {"resourceVersion": policy.resource_version(), "finalizers": finalizers}});
    Api::<UpdatePolicy>::all(ctx.client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| Error::from_kube(&format!("finalizers of {name}"), e))
}

/// How soon a reconcile that found its caches behind its own writes looks again (the
/// watch event that catches them up wakes it sooner).
const READBACK_RECHECK: Duration = Duration::from_secs(1);

/// How soon a step that failed on a write conflict is tried again.
const STEP_CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// How soon a step that failed otherwise is tried again.
const STEP_RETRY: Duration = Duration::from_secs(5);

/// The longest a policy goes without a reconcile (see the requeue in `reconcile`).
const RESYNC: Duration = Duration::from_secs(60);

/// How often a node held back only by a blocking pod or a closed gate is looked at
/// again.
const GATE_RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

async fn write_status(ctx: &Context, name: &str, status: &crds::UpdatePolicyStatus) -> Result<()> {
    let api: Api<UpdatePolicy> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"status": status});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| Error::from_kube(&format!("status of {name}"), e))
}
