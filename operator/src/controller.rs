//! The operator's control loop: watches UpdatePolicies, Nodes and the operator's reboot
//! Leases; for each policy, builds a snapshot from the watch caches, asks
//! `rollout::decide` what to do, performs it, writes the status when it changed, and
//! requeues exactly when the plan says the decision can next change. It keeps no state
//! of its own beyond running drains: on restart everything is rebuilt from the API.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action as Requeue,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{Instrument, info, info_span, warn};

use crds::{OnTimeout, UpdatePolicy, protocol};
use rollout::{Action, Policy, Snapshot, decide, plan::NodePlan, selector::Selector};

use crate::{
    config::Config,
    drain::{self, DrainRules, Outcome},
    error::{Error, Result},
    lease,
    metrics::{ErrorLabels, Metrics},
    node::NodePatch,
    status,
};

/// What every reconcile shares.
pub struct Context {
    client: Client,
    config: Config,
    nodes: Store<Node>,
    leases: Store<Lease>,
    policies: Store<UpdatePolicy>,
    recorder: Recorder,
    drains: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

/// One operator replica: waits to lead, then runs the controller until leadership is
/// lost (or the future is dropped).
pub async fn run_replica(client: Client, config: Config) {
    run_replica_with(client, config, Arc::new(Metrics::default())).await;
}

/// [`run_replica`], recording into `metrics`.
pub async fn run_replica_with(client: Client, config: Config, metrics: Arc<Metrics>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let elector = crate::leader::Elector::new(
        leases,
        config.identity.clone(),
        config.leader_lease_duration,
    );
    elector.acquire(config.leader_renew_interval).await;
    metrics.leader.set(1);
    tokio::select! {
        () = run(client, config.clone(), Arc::clone(&metrics)) => {}
        () = elector.hold(config.leader_renew_interval) => warn!("stopping: no longer the leader"),
    }
    metrics.leader.set(0);
}

/// Runs the controller until the process is stopped.
pub async fn run(client: Client, config: Config, metrics: Arc<Metrics>) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let (nodes, node_writer) = reflector::store();
    let (leases, lease_writer) = reflector::store();
    // Nodes are cached without their image lists and managed fields: on big clusters
    // those dominate the operator's memory and baton never reads them.
    let node_stream = watcher(nodes_api, watcher::Config::default())
        .modify(|node: &mut Node| {
            node.managed_fields_mut().clear();
            if let Some(status) = node.status.as_mut() {
                status.images = None;
            }
        })
        .reflect(node_writer)
        .applied_objects()
        .default_backoff();
    let lease_selector = format!("{}={}", lease::MANAGED_BY.0, lease::MANAGED_BY.1);
    let lease_stream = watcher(
        leases_api,
        watcher::Config::default().labels(&lease_selector),
    )
    .reflect(lease_writer)
    .applied_objects()
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

/// Aborts every running drain when dropped.
struct AbortDrains(Arc<Context>);

impl Drop for AbortDrains {
    fn drop(&mut self) {
        for handle in drains(&self.0).values() {
            handle.abort();
        }
    }
}

/// The running drains. Never held across an await.
fn drains(
    ctx: &Context,
) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
    ctx.drains
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    async move {
        ctx.nodes.wait_until_ready().await.ok();
        ctx.leases.wait_until_ready().await.ok();
        let now = Timestamp::now();
        let rules = match Policy::from_spec(&name, &policy.spec) {
            Ok(rules) => rules,
            Err(errors) => {
                let status = status::invalid(&errors, policy.meta().generation, policy.status.as_ref(), now);
                if policy.status.as_ref() != Some(&status) {
                    let note = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                    publish(&ctx, &policy.object_ref(&()), EventType::Warning, "InvalidSpec", &note).await;
                    write_status(&ctx, &name, &status).await?;
                }
                return Ok(Requeue::await_change());
            }
        };
        let mut snapshot = observe(&ctx, &rules);
        let blocked = mark_blocked(&ctx, &policy, &mut snapshot).await?;
        let plan = decide(&snapshot, &rules, now);
        ctx.metrics.observe(&plan);
        for step in &plan.nodes {
            let span = info_span!("node", node = %step.node);
            if let Err(e) = perform(&ctx, &rules, &policy, step, now).instrument(span).await {
                warn!(node = %step.node, action = %step.action, error = %e, "step failed; will retry");
            }
        }
        let status = status::from_plan(&plan, rules.paused, policy.meta().generation, policy.status.as_ref(), now);
        if policy.status.as_ref() != Some(&status) {
            for (kind, message) in status::raised(policy.status.as_ref(), &status) {
                publish(&ctx, &policy.object_ref(&()), EventType::Warning, kind, message).await;
            }
            write_status(&ctx, &name, &status).await?;
        }
        // Pods are not watched (a cluster-wide pod cache would dwarf the operator), so a
        // node held back only by a blocking pod is looked at again after BLOCKED_RECHECK.
        let blocked_recheck = blocked.then(|| now.checked_add(BLOCKED_RECHECK).ok()).flatten();
        let next = [plan.next_change, blocked_recheck].into_iter().flatten().min();
        Ok(match next {
            Some(t) => Requeue::requeue(t.duration_since(now).unsigned_abs().max(Duration::from_millis(100))),
            None => Requeue::await_change(),
        })
    }
    .instrument(span)
    .await
}

/// How often a node held back only by a blocking pod is looked at again.
const BLOCKED_RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

/// Marks the nodes that run a pod matching `health.blockingPodSelectors`, for nodes
/// that ask for a reboot. Returns whether any such node is blocked. Pending pods do
/// not block.
async fn mark_blocked(
    ctx: &Context,
    policy: &UpdatePolicy,
    snapshot: &mut Snapshot,
) -> Result<bool> {
    let selectors = &policy.spec.health.blocking_pod_selectors;
    if selectors.is_empty() || !snapshot.nodes.iter().any(|n| n.requests_reboot()) {
        return Ok(false);
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(ctx.client.clone());
    let mut blocking: HashMap<String, String> = HashMap::new();
    for selector in selectors {
        let Ok(selector) = kube::core::Selector::try_from(selector.clone()) else {
            continue;
        };
        let params = kube::api::ListParams::default()
            .labels_from(&selector)
            .fields("status.phase=Running");
        for pod in pods.list(&params).await?.items {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                blocking.entry(node).or_insert_with(|| {
                    format!(
                        "pod {}/{}",
                        pod.namespace().unwrap_or_default(),
                        pod.name_any()
                    )
                });
            }
        }
    }
    let mut any = false;
    for node in snapshot.nodes.iter_mut().filter(|n| n.requests_reboot()) {
        node.blocked_by = blocking.get(&node.name).cloned();
        any |= node.blocked_by.is_some();
    }
    Ok(any)
}

/// The snapshot `decide` needs, from the watch caches alone.
fn observe(ctx: &Context, rules: &Policy) -> Snapshot {
    let nodes = ctx
        .nodes
        .state()
        .iter()
        .map(|n| rollout::NodeView::from_node(n))
        .collect();
    let mut leases = Vec::new();
    for lease in ctx.leases.state() {
        let (view, errors) = rollout::LeaseView::from_lease(&lease);
        for e in errors {
            warn!(lease = %lease.name_any(), error = %e, "malformed lease annotation");
        }
        leases.extend(view);
    }
    let other_policies = ctx
        .policies
        .state()
        .iter()
        .filter(|p| p.name_any() != rules.name)
        .filter_map(|p| Some((p.name_any(), Selector::compile(&p.spec.node_selector).ok()?)))
        .collect();
    Snapshot {
        nodes,
        leases,
        operator_node: ctx.config.node_name.clone(),
        other_policies,
        gate: None,
    }
}

fn node(ctx: &Context, name: &str) -> Option<Arc<Node>> {
    ctx.nodes.get(&ObjectRef::new(name))
}

fn lease_of(ctx: &Context, node: &str) -> Option<Arc<Lease>> {
    ctx.leases
        .get(&ObjectRef::new(&lease::name(node)).within(&ctx.config.namespace))
}

/// Performs one node's step.
async fn perform(
    ctx: &Arc<Context>,
    rules: &Policy,
    policy: &UpdatePolicy,
    step: &NodePlan,
    now: Timestamp,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let name = step.node.as_str();
    let current = node(ctx, name);
    let held = lease_of(ctx, name);
    match &step.action {
        Action::Grant { boot_id } => {
            let target = current.as_ref().and_then(|n| {
                protocol::TARGET_VERSION
                    .read(n.metadata.annotations.as_ref())
                    .ok()
                    .flatten()
            });
            let grant = lease::grant(
                name,
                &ctx.config.namespace,
                rules,
                boot_id,
                target.as_ref(),
                now,
            );
            if lease::create(&leases, &grant).await? {
                info!("granted");
                node_event(
                    ctx,
                    current.as_deref(),
                    EventType::Normal,
                    "Granted",
                    &format!("reboot lease granted by UpdatePolicy {}", rules.name),
                )
                .await;
            }
        }
        Action::Cordon => {
            if let Some(n) = &current {
                NodePatch::cordon(policy.spec.drain.exclude_from_load_balancers)
                    .apply(&nodes, n)
                    .await?;
                node_event(
                    ctx,
                    Some(n),
                    EventType::Normal,
                    "Cordoned",
                    "cordoned by baton for its update",
                )
                .await;
            }
        }
        Action::RunBeforeHooks { missing, .. } | Action::RunAfterHooks { missing, .. } => {
            let before = matches!(step.action, Action::RunBeforeHooks { .. });
            let key = if before {
                protocol::BEFORE_REBOOT.name
            } else {
                protocol::AFTER_REBOOT.name
            };
            if let Some(n) = current.as_ref().filter(|n| !n.labels().contains_key(key)) {
                NodePatch::hook_label(before).apply(&nodes, n).await?;
                node_event(
                    ctx,
                    Some(n),
                    EventType::Normal,
                    "HooksStarted",
                    &format!("waiting for {}", missing.join(", ")),
                )
                .await;
            }
        }
        Action::Drain { deadline } => match (deadline, &held) {
            (None, Some(l)) => {
                lease::annotate(
                    &leases,
                    l,
                    &[(
                        protocol::lease::DRAIN_STARTED_AT.name,
                        protocol::lease::DRAIN_STARTED_AT.format(&now),
                    )],
                )
                .await?
            }
            (Some(deadline), Some(_)) => start_drain(ctx, policy, name, *deadline).await,
            _ => {}
        },
        Action::DrainTimedOut(on) => {
            let Some(l) = &held else { return Ok(()) };
            match on {
                OnTimeout::Abort => {
                    let reason = "drain timed out (onTimeout: Abort)";
                    let uncordon = current
                        .as_ref()
                        .filter(|n| rollout::NodeView::from_node(n).cordoned_by_baton)
                        .map(|n| NodePatch::uncordon(n))
                        .unwrap_or_default();
                    fail(
                        ctx,
                        &nodes,
                        &leases,
                        current.as_deref(),
                        l,
                        reason,
                        uncordon,
                    )
                    .await?;
                }
                OnTimeout::Force => {
                    let deleted =
                        drain::force(&ctx.client, name, &drain_rules(ctx, policy)).await?;
                    node_event(
                        ctx,
                        current.as_deref(),
                        EventType::Warning,
                        "DrainForced",
                        &format!(
                            "drain timed out; deleted {deleted} remaining pod(s) (onTimeout: Force)"
                        ),
                    )
                    .await;
                    mark_drained(&leases, l).await?;
                }
                OnTimeout::Proceed => {
                    node_event(
                        ctx,
                        current.as_deref(),
                        EventType::Warning,
                        "DrainTimedOut",
                        "drain timed out; rebooting with the remaining pods (onTimeout: Proceed)",
                    )
                    .await;
                    mark_drained(&leases, l).await?;
                }
            }
        }
        Action::AllowReboot { boot_id } => {
            if let Some(n) = &current {
                NodePatch::allow_reboot(boot_id).apply(&nodes, n).await?;
                node_event(
                    ctx,
                    Some(n),
                    EventType::Normal,
                    "Rebooting",
                    "drained: the agent may reboot",
                )
                .await;
            }
        }
        Action::Uncordon => {
            if let Some(n) = &current {
                NodePatch::uncordon(n).apply(&nodes, n).await?;
                node_event(
                    ctx,
                    Some(n),
                    EventType::Normal,
                    "Uncordoned",
                    "back on the new version: uncordoned",
                )
                .await;
            }
        }
        Action::MarkDone => {
            if let (Some(n), Some(l)) = (&current, &held) {
                NodePatch::clear_rollout_marks().apply(&nodes, n).await?;
                lease::annotate(
                    &leases,
                    l,
                    &[(
                        protocol::lease::DONE_AT.name,
                        protocol::lease::DONE_AT.format(&now),
                    )],
                )
                .await?;
                node_event(
                    ctx,
                    Some(n),
                    EventType::Normal,
                    "Done",
                    "updated, verified and back in service",
                )
                .await;
            }
        }
        Action::Release(_) => {
            if let Some(n) = current
                .as_ref()
                .filter(|n| n.annotations().contains_key(protocol::REBOOT_OK.name))
            {
                NodePatch::clear_rollout_marks().apply(&nodes, n).await?;
            }
            if let Some(l) = &held {
                lease::release(&leases, l).await?;
                info!("released");
            }
        }
        Action::Fail { reason } => {
            if let Some(l) = &held {
                fail(
                    ctx,
                    &nodes,
                    &leases,
                    current.as_deref(),
                    l,
                    reason,
                    NodePatch::default(),
                )
                .await?;
            }
        }
        Action::WaitForReboot { .. } | Action::Settle { .. } | Action::Skip(_) => {}
    }
    Ok(())
}

/// Marks a node failed: on the node first (with `also`, in the same write), then on its
/// Lease. Either mark alone already counts as a failure, so a crash between the two
/// writes loses nothing.
async fn fail(
    ctx: &Arc<Context>,
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    node: Option<&Node>,
    held: &Lease,
    reason: &str,
    also: NodePatch,
) -> Result<()> {
    if let Some(n) = node {
        NodePatch::fail(reason).and(also).apply(nodes, n).await?;
    }
    let message =
        protocol::lease::FAILURE.format(&protocol::Message(reason.chars().take(1024).collect()));
    lease::annotate(leases, held, &[(protocol::lease::FAILURE.name, message)]).await?;
    node_event(ctx, node, EventType::Warning, "Failed", reason).await;
    Ok(())
}

async fn mark_drained(leases: &Api<Lease>, held: &Lease) -> Result<()> {
    let at = protocol::lease::DRAINED_AT.format(&Timestamp::now());
    lease::annotate(leases, held, &[(protocol::lease::DRAINED_AT.name, at)]).await
}

fn drain_rules(ctx: &Context, policy: &UpdatePolicy) -> DrainRules {
    let spec = &policy.spec.drain;
    DrainRules {
        leave_alone: spec
            .pod_selector
            .as_ref()
            .and_then(|s| Selector::compile(s).ok()),
        delete_empty_dir_data: spec.delete_empty_dir_data,
        grace_period_seconds: spec.grace_period_seconds,
        max_parallel: spec.max_parallel_evictions as usize,
        operator_pod: Some((ctx.config.namespace.clone(), ctx.config.identity.clone())),
    }
}

/// Starts the node's drain unless one is running. When it finishes, the Lease records
/// it, which wakes the controller.
async fn start_drain(ctx: &Arc<Context>, policy: &UpdatePolicy, node: &str, deadline: Timestamp) {
    if drains(ctx).get(node).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let rules = drain_rules(ctx, policy);
    let ctx2 = Arc::clone(ctx);
    let name = node.to_string();
    node_event(
        ctx,
        self::node(ctx, node).as_deref(),
        EventType::Normal,
        "DrainStarted",
        &format!("evicting pods until {deadline}"),
    )
    .await;
    let handle = tokio::spawn(
        async move {
            let ctx = ctx2;
            // Each blocked pod is reported once per drain, as an Event on the node.
            let (blocked_tx, mut blocked_rx) = tokio::sync::mpsc::unbounded_channel::<drain::Blocked>();
            let reporter = {
                let ctx = Arc::clone(&ctx);
                let name = name.clone();
                tokio::spawn(async move {
                    let mut seen = std::collections::HashSet::new();
                    while let Some(b) = blocked_rx.recv().await {
                        ctx.metrics.evictions_blocked.inc();
                        if seen.insert(b.clone()) {
                            warn!(pod = %b.pod, budget = %b.budget, "eviction blocked by a PodDisruptionBudget");
                            let note = format!("evicting {} is blocked by PodDisruptionBudget {}; retrying until the drain times out", b.pod, b.budget);
                            node_event(&ctx, self::node(&ctx, &name).as_deref(), EventType::Warning, "DrainBlocked", &note).await;
                        }
                    }
                })
            };
            ctx.metrics.drains.inc();
            let started = std::time::Instant::now();
            let outcome = drain::drain(&ctx.client, &name, &rules, deadline, &blocked_tx).await;
            ctx.metrics.drains.dec();
            ctx.metrics.drain_seconds.observe(started.elapsed().as_secs_f64());
            drop(blocked_tx);
            let _ = reporter.await;
            match outcome {
                Ok(Outcome::Drained) => {
                    if let Some(l) = lease_of(&ctx, &name) {
                        let leases: Api<Lease> =
                            Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
                        if let Err(e) = mark_drained(&leases, &l).await {
                            warn!(error = %e, "recording the drain failed; it will be redone");
                        }
                    }
                }
                Ok(Outcome::TimedOut(remaining)) => {
                    node_event(
                        &ctx,
                        self::node(&ctx, &name).as_deref(),
                        EventType::Warning,
                        "DrainTimedOut",
                        &format!("still on the node: {}", remaining.join(", ")),
                    )
                    .await;
                }
                Err(e) => warn!(error = %e, "drain failed; it will be retried"),
            }
        }
        .instrument(info_span!("drain", node = %node)),
    );
    drains(ctx).insert(node.to_string(), handle);
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1024).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}

async fn node_event(
    ctx: &Context,
    node: Option<&Node>,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    if let Some(n) = node {
        publish(ctx, &n.object_ref(&()), type_, reason, note).await;
    }
}

async fn write_status(ctx: &Context, name: &str, status: &crds::UpdatePolicyStatus) -> Result<()> {
    let api: Api<UpdatePolicy> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"status": status});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| Error::from_kube(&format!("status of {name}"), e))
}
