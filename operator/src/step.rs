//! Performing one node's step of a plan: the API writes behind each action, and the
//! drain tasks. Every write is guarded by the observed resourceVersion; a step that
//! fails is simply decided again on the next reconcile.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{Api, ResourceExt, runtime::events::EventType, runtime::reflector::ObjectRef};
use tracing::{Instrument, info, info_span, warn};

use crds::{
    OnTimeout, UpdatePolicy,
    protocol::{self, Version},
};
use rollout::{Action, Policy, plan::NodePlan, selector::Selector};

use crate::{
    controller::{Context, drains, node_event},
    drain::{self, DrainRules, Outcome},
    error::Result,
    lease,
    node::NodePatch,
};

pub(crate) fn node(ctx: &Context, name: &str) -> Option<Arc<Node>> {
    ctx.nodes.get(&ObjectRef::new(name))
}

fn lease_of(ctx: &Context, node: &str) -> Option<Arc<Lease>> {
    ctx.leases
        .get(&ObjectRef::new(&lease::name(node)).within(&ctx.config.namespace))
}

/// Publishes the policy's release version on `names`, for their agents to stage.
/// Failures are logged; the next reconcile sees the node unchanged and tries again.
pub(crate) async fn publish_release(
    ctx: &Arc<Context>,
    names: &[String],
    version: &Version,
    release: Option<&protocol::ReleaseRef>,
) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    for name in names {
        let Some(current) = node(ctx, name) else {
            continue;
        };
        if let Err(e) = NodePatch::desire(version, release)
            .apply(&nodes, &current)
            .await
        {
            warn!(node = %name, error = %e, "could not publish the release version; will retry");
        }
    }
}

/// Performs one node's step.
pub(crate) async fn perform(
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
                    mark_drained(&leases, l, ctx.clock.now()).await?;
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
                    mark_drained(&leases, l, ctx.clock.now()).await?;
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

async fn mark_drained(leases: &Api<Lease>, held: &Lease, now: Timestamp) -> Result<()> {
    let at = protocol::lease::DRAINED_AT.format(&now);
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
            let outcome = drain::drain(&ctx.client, &name, &rules, deadline, &blocked_tx, &ctx.clock).await;
            ctx.metrics.drains.dec();
            ctx.metrics.drain_seconds.observe(started.elapsed().as_secs_f64());
            drop(blocked_tx);
            let _ = reporter.await;
            match outcome {
                Ok(Outcome::Drained) => {
                    if let Some(l) = lease_of(&ctx, &name) {
                        let leases: Api<Lease> =
                            Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
                        if let Err(e) = mark_drained(&leases, &l, ctx.clock.now()).await {
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
