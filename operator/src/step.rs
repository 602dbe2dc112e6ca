//! Performing one node's step of a plan: the API writes behind each action, and the
//! drain tasks. Every write is guarded by the observed resourceVersion; a step that
//! fails is simply decided again on the next reconcile.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{ResourceExt, runtime::events::EventType, runtime::reflector::ObjectRef};
use tracing::{Instrument, info, info_span, warn};

use crds::node::NodePatch;
use crds::{
    OnTimeout,
    protocol::{self, Version},
};
use rollout::{Action, Policy, plan::NodePlan};

use crate::{
    controller::{Context, drains, node_event},
    drain::{self, DrainRules, Outcome},
    error::Result,
    lease, writes,
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
    for name in names {
        let Some(current) = node(ctx, name) else {
            continue;
        };
        if let Err(e) =
            writes::patch_node(ctx, &current, &NodePatch::desire(version, release)).await
        {
            warn!(node = %name, error = %e, "could not publish the release version; will retry");
        }
    }
}

/// Performs one node's step.
pub(crate) async fn perform(
    ctx: &Arc<Context>,
    rules: &Policy,
    step: &NodePlan,
    now: Timestamp,
) -> Result<()> {
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
            if writes::create_lease(ctx, &grant).await? {
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
                writes::patch_node(
                    ctx,
                    n,
                    &NodePatch::cordon(rules.exclude_from_load_balancers),
                )
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
                writes::patch_node(ctx, n, &NodePatch::hook_label(before)).await?;
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
                writes::stamp_lease(ctx, l, &protocol::lease::DRAIN_STARTED_AT, now).await?
            }
            (Some(deadline), Some(_)) => start_drain(ctx, rules, name, *deadline).await,
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
                    stop_drain(ctx, name);
                    fail(ctx, current.as_deref(), Some(l), reason, uncordon).await?;
                }
                OnTimeout::Force => {
                    let deleted = drain::force(&ctx.client, name, &drain_rules(ctx, rules)).await?;
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
                    mark_drained(ctx, l).await?;
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
                    mark_drained(ctx, l).await?;
                }
            }
        }
        Action::AllowReboot { boot_id } => {
            if let Some(n) = &current {
                writes::patch_node(ctx, n, &NodePatch::allow_reboot(boot_id)).await?;
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
                writes::patch_node(ctx, n, &NodePatch::uncordon(n)).await?;
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
                writes::patch_node(ctx, n, &NodePatch::clear_rollout_marks()).await?;
                writes::stamp_lease(ctx, l, &protocol::lease::DONE_AT, now).await?;
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
            stop_drain(ctx, name);
            // The grant goes from the node before its Lease goes.
            if let Some(n) = current
                .as_ref()
                .filter(|n| n.annotations().contains_key(protocol::REBOOT_OK.name))
            {
                writes::patch_node(ctx, n, &NodePatch::clear_rollout_marks()).await?;
            }
            if let Some(l) = &held {
                writes::delete_lease(ctx, l).await?;
                info!("released");
            }
        }
        Action::Fail { reason } => {
            fail(
                ctx,
                current.as_deref(),
                held.as_deref(),
                reason,
                NodePatch::default(),
            )
            .await?;
        }
        Action::Abort { reason } => {
            stop_drain(ctx, name);
            // Undo what baton did to the node first; only then does the Lease go.
            if let Some(n) = &current {
                let end = NodePatch::end_grant(n).and(NodePatch::clear_failure());
                writes::patch_node(ctx, n, &end).await?;
            }
            if let Some(l) = &held {
                writes::delete_lease(ctx, l).await?;
            }
            info!(%reason, "grant ended");
            node_event(
                ctx,
                current.as_deref(),
                EventType::Normal,
                "GrantEnded",
                reason,
            )
            .await;
        }
        Action::WaitForReboot { .. } | Action::Settle { .. } | Action::Skip(_) => {}
    }
    Ok(())
}

/// Marks a node failed: on the node first (ending its grant, with `also`, in the same
/// write), then on its Lease if it holds one. Either mark alone already counts as a
/// failure, so a crash between the two writes loses nothing.
async fn fail(
    ctx: &Arc<Context>,
    node: Option<&Node>,
    held: Option<&Lease>,
    reason: &str,
    also: NodePatch,
) -> Result<()> {
    if let Some(n) = node {
        writes::patch_node(ctx, n, &NodePatch::fail(reason).and(also)).await?;
    }
    if let Some(l) = held {
        let message = protocol::lease::FAILURE
            .format(&protocol::Message(reason.chars().take(1024).collect()));
        writes::annotate_lease(ctx, l, &[(protocol::lease::FAILURE.name, message)]).await?;
    }
    node_event(ctx, node, EventType::Warning, "Failed", reason).await;
    Ok(())
}

async fn mark_drained(ctx: &Context, held: &Lease) -> Result<()> {
    writes::stamp_lease(ctx, held, &protocol::lease::DRAINED_AT, ctx.clock.now()).await
}

/// Stops the node's drain, if one runs.
fn stop_drain(ctx: &Context, node: &str) {
    if let Some(handle) = drains(ctx).remove(node) {
        handle.abort();
    }
}

fn drain_rules(ctx: &Context, rules: &Policy) -> DrainRules {
    DrainRules {
        leave_alone: rules.drain_pod_selector.clone(),
        delete_empty_dir_data: rules.delete_empty_dir_data,
        grace_period_seconds: rules.grace_period_seconds,
        max_parallel: rules.max_parallel_evictions as usize,
        operator_pod: Some((ctx.config.namespace.clone(), ctx.config.identity.clone())),
    }
}

/// Starts the node's drain unless one is running. When it finishes, the Lease records
/// it, which wakes the controller.
async fn start_drain(ctx: &Arc<Context>, rules: &Policy, node: &str, deadline: Timestamp) {
    if drains(ctx).get(node).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let rules = drain_rules(ctx, rules);
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
                    if let Some(l) = lease_of(&ctx, &name)
                        && let Err(e) = mark_drained(&ctx, &l).await
                    {
                        warn!(error = %e, "recording the drain failed; it will be redone");
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
