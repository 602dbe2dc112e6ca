//! Performing one node's step of a plan: one function per action, each the API writes
//! behind it (through [`Cluster`]) and the Event that says so. Everything a step needs
//! travels in the plan: the action's data, and the node and lease as the decision saw
//! them, whose versions guard every write. A step that fails is simply decided again on
//! the next reconcile.

use jiff::Timestamp;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use crds::{
    OnTimeout,
    node::NodePatch,
    protocol::{self, BootId, Message, ReleaseRef, Version},
};
use rollout::{
    Action, Policy,
    expectations::ObjectKey,
    plan::{LeaseFacts, NodeFacts, NodePlan},
};

use crate::{
    cluster::Cluster,
    drain::DrainRules,
    error::{Error, Result},
    lease,
};

/// Performs one node's step.
pub async fn perform<C: Cluster>(
    c: &C,
    rules: &Policy,
    step: &NodePlan,
    now: Timestamp,
) -> Result<()> {
    let node = step.node.as_str();
    let (seen, held) = (step.seen.node.as_ref(), step.seen.lease.as_ref());
    match &step.action {
        Action::Grant {
            boot_id,
            target_version,
            drain,
            ..
        } => {
            // A node this step granted is cordoned next, whatever else holds (it was
            // Ready and schedulable to be granted): at once, on the Node the grant was
            // decided on (the Lease's creation did not change it). A Lease that existed
            // already is left to the next decision. With no before-reboot hook the
            // drain comes next: the Lease is created with its start, and once the
            // cordon is written the drain starts on the deadline the next decision
            // reads back (a failed cordon leaves it to the next decision's Cordon and
            // Drain, on the same deadline).
            let drain_started = drain.then_some(now);
            let created = grant(
                c,
                rules,
                node,
                boot_id,
                target_version.as_ref(),
                drain_started,
                now,
            )
            .await?;
            let Some(n) = seen.filter(|_| created) else {
                return Ok(());
            };
            cordon(c, rules, node, n).await?;
            if let Some(deadline) = drain_started.and_then(|s| rules.drain_deadline(s)) {
                c.start_drain(node, DrainRules::from_policy(rules), deadline)
                    .await;
            }
            Ok(())
        }
        Action::Cordon => match seen {
            Some(n) => cordon(c, rules, node, n).await,
            None => Ok(()),
        },
        Action::RunBeforeHooks { missing, .. } => hooks(c, node, seen, true, missing).await,
        Action::RunAfterHooks { missing, .. } => hooks(c, node, seen, false, missing).await,
        Action::Drain { deadline } => match (deadline, held) {
            // The start is recorded first (the deadline counts from it), then the
            // drain starts at once, on the deadline the next decision will read back.
            (None, Some(l)) => {
                let at = protocol::lease::DRAIN_STARTED_AT.format(&now);
                c.annotate_lease(l, &[(protocol::lease::DRAIN_STARTED_AT.name, at)])
                    .await?;
                if let Some(deadline) = rules.drain_deadline(now) {
                    c.start_drain(node, DrainRules::from_policy(rules), deadline)
                        .await;
                }
                Ok(())
            }
            (Some(deadline), Some(_)) => {
                c.start_drain(node, DrainRules::from_policy(rules), *deadline)
                    .await;
                Ok(())
            }
            _ => Ok(()),
        },
        Action::DrainTimedOut(on) => match held {
            Some(l) => drain_timed_out(c, rules, node, seen, l, *on, now).await,
            None => Ok(()),
        },
        Action::Publish { version, release } => match seen {
            Some(n) => publish(c, node, n, version, release.as_ref()).await,
            None => Ok(()),
        },
        Action::AllowReboot { boot_id } => match seen {
            Some(n) => allow_reboot(c, node, n, boot_id).await,
            None => Ok(()),
        },
        Action::MoveLeader {
            from,
            leader_url,
            to,
            to_id,
        } => move_leader(c, node, from, leader_url, to, *to_id).await,
        Action::Finish { uncordon, release } => match (seen, held) {
            (Some(n), Some(l)) => finish(c, node, n, l, *uncordon, *release, now).await,
            _ => Ok(()),
        },
        Action::Release(_) => release(c, node, seen, held).await,
        Action::Fail { reason } => fail(c, node, seen, held, reason, NodePatch::default()).await,
        Action::Abort { reason } => abort(c, node, seen, held, reason).await,
        Action::ClearStaleGrant => match seen {
            Some(n) => clear_stale_grant(c, node, n).await,
            None => Ok(()),
        },
        Action::WaitForReboot { .. }
        | Action::WaitForEtcd { .. }
        | Action::Settle { .. }
        | Action::Skip(_) => Ok(()),
    }
}

/// Hands etcd leadership over before the node reboots, with an Event either way. A
/// failed transfer is an error: the node waits (its grant is not given) and the step is
/// tried again.
async fn move_leader<C: Cluster>(
    c: &C,
    node: &str,
    from: &str,
    leader_url: &str,
    to: &str,
    to_id: u64,
) -> Result<()> {
    match c.move_leader(leader_url, to_id).await {
        Ok(()) => {
            info!(%from, %to, "moved etcd leadership");
            let note =
                format!("moved etcd leadership from member {from} to {to} before the reboot");
            c.event(node, EventType::Normal, "EtcdLeaderMoved", &note)
                .await;
            Ok(())
        }
        Err(e) => {
            warn!(%from, %to, error = %e, "moving etcd leadership failed");
            let note = format!(
                "moving etcd leadership from member {from} to {to} failed: {e}; the node waits, it does not reboot as leader"
            );
            c.event(node, EventType::Warning, "EtcdLeaderMoveFailed", &note)
                .await;
            Err(e.into())
        }
    }
}

async fn grant<C: Cluster>(
    c: &C,
    rules: &Policy,
    node: &str,
    boot_id: &BootId,
    target: Option<&Version>,
    drain_started: Option<Timestamp>,
    now: Timestamp,
) -> Result<bool> {
    let lease = lease::grant(
        node,
        c.namespace(),
        rules,
        boot_id,
        target,
        drain_started,
        now,
    );
    let created = c.create_lease(&lease).await?;
    if created {
        info!("granted");
        let note = format!("reboot lease granted by UpdatePolicy {}", rules.name);
        c.event(node, EventType::Normal, "Granted", &note).await;
    }
    Ok(created)
}

async fn cordon<C: Cluster>(c: &C, rules: &Policy, node: &str, seen: &NodeFacts) -> Result<()> {
    let patch = NodePatch::cordon(rules.exclude_from_load_balancers);
    c.patch_node(node, seen, &patch).await?;
    c.event(
        node,
        EventType::Normal,
        "Cordoned",
        "cordoned by baton for its update",
    )
    .await;
    Ok(())
}

/// Labels the node for its hooks, once (the label already set: nothing to write).
async fn hooks<C: Cluster>(
    c: &C,
    node: &str,
    seen: Option<&NodeFacts>,
    before: bool,
    missing: &[String],
) -> Result<()> {
    let Some(n) = seen else { return Ok(()) };
    let labelled = if before {
        n.hook_labels.0
    } else {
        n.hook_labels.1
    };
    if labelled {
        return Ok(());
    }
    c.patch_node(node, n, &NodePatch::hook_label(before))
        .await?;
    let note = format!("waiting for {}", missing.join(", "));
    c.event(node, EventType::Normal, "HooksStarted", &note)
        .await;
    Ok(())
}

async fn drain_timed_out<C: Cluster>(
    c: &C,
    rules: &Policy,
    node: &str,
    seen: Option<&NodeFacts>,
    held: &LeaseFacts,
    on: OnTimeout,
    now: Timestamp,
) -> Result<()> {
    match on {
        OnTimeout::Abort => {
            c.stop_drain(node);
            let uncordon = seen
                .filter(|n| n.cordoned_by_baton)
                .map(|n| NodePatch::uncordon(n.lb_excluded))
                .unwrap_or_default();
            let reason = "drain timed out (onTimeout: Abort)";
            fail(c, node, seen, Some(held), reason, uncordon).await
        }
        OnTimeout::Force => {
            let deleted = c.force_drain(node, &DrainRules::from_policy(rules)).await?;
            let note =
                format!("drain timed out; deleted {deleted} remaining pod(s) (onTimeout: Force)");
            c.event(node, EventType::Warning, "DrainForced", &note)
                .await;
            mark_drained(c, held, now).await
        }
        OnTimeout::Proceed => {
            let note = "drain timed out; rebooting with the remaining pods (onTimeout: Proceed)";
            c.event(node, EventType::Warning, "DrainTimedOut", note)
                .await;
            mark_drained(c, held, now).await
        }
    }
}

async fn mark_drained<C: Cluster>(c: &C, held: &LeaseFacts, now: Timestamp) -> Result<()> {
    let at = protocol::lease::DRAINED_AT.format(&now);
    c.annotate_lease(held, &[(protocol::lease::DRAINED_AT.name, at)])
        .await
}

async fn publish<C: Cluster>(
    c: &C,
    node: &str,
    seen: &NodeFacts,
    version: &Version,
    release: Option<&ReleaseRef>,
) -> Result<()> {
    c.patch_node(node, seen, &NodePatch::desire(version, release))
        .await
}

/// Allows the reboot of the boot the grant was for, on the node as the decision saw it.
pub(crate) async fn allow_reboot<C: Cluster>(
    c: &C,
    node: &str,
    seen: &NodeFacts,
    boot: &BootId,
) -> Result<()> {
    c.patch_node(node, seen, &NodePatch::allow_reboot(boot))
        .await?;
    c.event(
        node,
        EventType::Normal,
        "Rebooting",
        "drained: the agent may reboot",
    )
    .await;
    Ok(())
}

/// Finishes a node that is back, verified: one write takes baton's marks off the node
/// (with baton's cordon when `uncordon`), then its lease is deleted (`release`: no
/// settle time) or marked done (the settle time starts).
async fn finish<C: Cluster>(
    c: &C,
    node: &str,
    seen: &NodeFacts,
    held: &LeaseFacts,
    uncordon: bool,
    release: bool,
    now: Timestamp,
) -> Result<()> {
    let marks = NodePatch::clear_rollout_marks();
    let patch = if uncordon {
        NodePatch::uncordon(seen.lb_excluded).and(marks)
    } else {
        marks
    };
    c.patch_node(node, seen, &patch).await?;
    if uncordon {
        c.event(
            node,
            EventType::Normal,
            "Uncordoned",
            "back on the new version: uncordoned",
        )
        .await;
    }
    if release {
        c.stop_drain(node);
        c.delete_lease(held).await?;
        info!("released");
    } else {
        let at = protocol::lease::DONE_AT.format(&now);
        c.annotate_lease(held, &[(protocol::lease::DONE_AT.name, at)])
            .await?;
    }
    c.event(
        node,
        EventType::Normal,
        "Done",
        "updated, verified and back in service",
    )
    .await;
    Ok(())
}

/// Releases the node's slot: the grant goes from the node before its Lease goes.
async fn release<C: Cluster>(
    c: &C,
    node: &str,
    seen: Option<&NodeFacts>,
    held: Option<&LeaseFacts>,
) -> Result<()> {
    c.stop_drain(node);
    if let Some(n) = seen.filter(|n| n.reboot_ok) {
        c.patch_node(node, n, &NodePatch::clear_rollout_marks())
            .await?;
    }
    if let Some(l) = held {
        c.delete_lease(l).await?;
        info!("released");
    }
    Ok(())
}

/// Marks a node failed: on the node first (ending its grant, with `also`, in the same
/// write), then on its Lease if it holds one. Either mark alone already counts as a
/// failure, so a crash between the two writes loses nothing.
async fn fail<C: Cluster>(
    c: &C,
    node: &str,
    seen: Option<&NodeFacts>,
    held: Option<&LeaseFacts>,
    reason: &str,
    also: NodePatch,
) -> Result<()> {
    if let Some(n) = seen {
        c.patch_node(node, n, &NodePatch::fail(reason).and(also))
            .await?;
    }
    if let Some(l) = held {
        let message = protocol::lease::FAILURE.format(&Message::line(reason));
        c.annotate_lease(l, &[(protocol::lease::FAILURE.name, message)])
            .await?;
    }
    c.event(node, EventType::Warning, "Failed", reason).await;
    Ok(())
}

/// Ends a grant before its reboot: the drain stops, what baton did to the node is
/// undone first, and only then does the Lease go.
async fn abort<C: Cluster>(
    c: &C,
    node: &str,
    seen: Option<&NodeFacts>,
    held: Option<&LeaseFacts>,
    reason: &str,
) -> Result<()> {
    c.stop_drain(node);
    if let Some(n) = seen {
        let end = NodePatch::end_grant(n.cordoned_by_baton, n.lb_excluded)
            .and(NodePatch::clear_failure());
        c.patch_node(node, n, &end).await?;
    }
    if let Some(l) = held {
        c.delete_lease(l).await?;
    }
    info!(%reason, "grant ended");
    c.event(node, EventType::Normal, "GrantEnded", reason).await;
    Ok(())
}

/// Undoes baton's cordon and `reboot-ok` on a node no Lease holds, once a fresh read
/// confirms that no Lease holds it (the cache may lag a grant).
async fn clear_stale_grant<C: Cluster>(c: &C, node: &str, seen: &NodeFacts) -> Result<()> {
    let key = ObjectKey::lease(&crds::grant::lease_name(node));
    match c.read(&key).await {
        Ok(None) => {}
        Ok(Some(_)) => return Ok(()),
        Err(e) => return Err(Error::api(&format!("lease of {node}"), e)),
    }
    let end = NodePatch::end_grant(seen.cordoned_by_baton, seen.lb_excluded);
    c.patch_node(node, seen, &end).await?;
    let why = "baton's cordon outlived its grant (no reboot Lease holds the node): undone";
    info!(why, "stale grant cleared");
    c.event(node, EventType::Normal, "StaleGrantCleared", why)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, MutexGuard};

    use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
    use kube::ResourceExt;
    use rollout::plan::Seen;

    use super::*;
    use crate::{
        cluster::{Refusal, Write},
        config::Config,
        metrics::Metrics,
    };
    use crds::UpdatePolicy;
    use rollout::{
        alert::AlertGate,
        expectations::{Expectations, ObjectKey, Seen as ExpectSeen},
    };

    /// The writes a step made, in order, as `(object, what)`.
    #[derive(Clone)]
    struct Recorded {
        writes: Arc<Mutex<Vec<(String, String)>>>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        expectations: Arc<Mutex<Expectations>>,
        lease_exists: bool,
        caches_ready: bool,
        nodes: Vec<Arc<crate::cache::CachedNode>>,
        leases: Vec<Arc<Lease>>,
        policies: Vec<Arc<UpdatePolicy>>,
        /// The object whose writes the API server refuses with a conflict.
        refuse: Option<&'static str>,
    }

    impl Default for Recorded {
        fn default() -> Self {
            use clap::Parser;
            Recorded {
                writes: Arc::default(),
                config: Arc::new(Config::parse_from(["baton-operator"])),
                metrics: Arc::default(),
                expectations: Arc::default(),
                lease_exists: false,
                caches_ready: true,
                nodes: Vec::new(),
                leases: Vec::new(),
                policies: Vec::new(),
                refuse: None,
            }
        }
    }

    impl Recorded {
        fn push(&self, object: &str, what: String) {
            self.writes.lock().unwrap().push((object.to_string(), what));
        }

        fn all(&self) -> Vec<(String, String)> {
            self.writes.lock().unwrap().clone()
        }
    }

    impl Cluster for Recorded {
        fn namespace(&self) -> &str {
            "baton-system"
        }
        fn now(&self) -> Timestamp {
            at()
        }
        fn config(&self) -> &Config {
            &self.config
        }
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }
        fn nodes(&self) -> Vec<Arc<crate::cache::CachedNode>> {
            self.nodes.clone()
        }
        fn leases(&self) -> Vec<Arc<Lease>> {
            self.leases.clone()
        }
        fn policies(&self) -> Vec<Arc<UpdatePolicy>> {
            self.policies.clone()
        }
        fn caches_ready(&self) -> bool {
            self.caches_ready
        }
        fn cached(&self, key: &ObjectKey) -> Option<ExpectSeen> {
            let node = self.nodes.iter().find(|n| n.view.name == key.name);
            match key.kind {
                "Node" => node.map(|n| ExpectSeen {
                    uid: n.uid.clone(),
                    resource_version: n.view.resource_version.clone(),
                }),
                _ => self
                    .leases
                    .iter()
                    .find(|l| l.name_any() == key.name)
                    .map(|l| ExpectSeen {
                        uid: l.uid(),
                        resource_version: l.resource_version(),
                    }),
            }
        }
        fn expectations(&self) -> MutexGuard<'_, Expectations> {
            self.expectations.lock().unwrap()
        }
        async fn read(&self, _key: &ObjectKey) -> Result<Option<ExpectSeen>, Refusal> {
            Ok(self.lease_exists.then(|| ExpectSeen {
                uid: Some("u1".into()),
                resource_version: Some("9".into()),
            }))
        }
        async fn running_pods(&self, _selector: &str) -> Result<Vec<Pod>> {
            Ok(Vec::new())
        }
        async fn send(&self, write: Write<'_>) -> Result<Option<String>, Refusal> {
            let object = match &write {
                Write::PatchNode { node, .. } => format!("node/{node}"),
                Write::CreateLease(lease) => format!("lease/{}", lease.name_any()),
                Write::PatchLease { name, .. } | Write::DeleteLease { name, .. } => {
                    format!("lease/{name}")
                }
                Write::PatchPolicy { name, .. } | Write::PatchPolicyStatus { name, .. } => {
                    format!("policy/{name}")
                }
            };
            if self.refuse == Some(object.as_str()) {
                return Err(Refusal {
                    code: Some(409),
                    message: format!("{object} changed"),
                });
            }
            match write {
                Write::PatchNode { node, patch } => {
                    self.push(&format!("node/{node}"), patch.to_string())
                }
                Write::CreateLease(lease) => {
                    let a = serde_json::to_string(&lease.annotations()).unwrap();
                    self.push(
                        &format!("lease/{}", lease.name_any()),
                        format!("create {a}"),
                    )
                }
                Write::PatchLease { name, patch } => {
                    self.push(&format!("lease/{name}"), patch.to_string())
                }
                Write::DeleteLease { name, .. } => {
                    self.push(&format!("lease/{name}"), "delete".into())
                }
                Write::PatchPolicy { name, patch } | Write::PatchPolicyStatus { name, patch } => {
                    self.push(&format!("policy/{name}"), patch.to_string())
                }
            }
            Ok(None)
        }
        async fn event(&self, node: &str, _type_: EventType, reason: &str, _note: &str) {
            self.push(&format!("event/{node}"), reason.into());
        }
        async fn policy_event(
            &self,
            policy: &UpdatePolicy,
            _type_: EventType,
            reason: &str,
            _note: &str,
        ) {
            self.push(&format!("event/{}", policy.name_any()), reason.into());
        }
        async fn alert_gate(&self, _gate: &AlertGate, _now: Timestamp) -> Option<String> {
            None
        }
        async fn start_drain(&self, node: &str, _rules: DrainRules, _deadline: Timestamp) {
            self.push(&format!("drain/{node}"), "start".into());
        }
        fn stop_drain(&self, node: &str) {
            self.push(&format!("drain/{node}"), "stop".into());
        }
        async fn force_drain(&self, node: &str, _rules: &DrainRules) -> Result<usize> {
            self.push(&format!("drain/{node}"), "force".into());
            Ok(0)
        }
    }

    fn policy() -> Policy {
        Policy::from_spec("pool", &serde_json::from_str("{}").unwrap()).unwrap()
    }

    fn at() -> Timestamp {
        "2026-11-30T10:00:00Z".parse().unwrap()
    }

    /// n1 as the decision saw it: cordoned by baton (with the LB label), granted.
    fn seen() -> Seen {
        Seen {
            node: Some(NodeFacts {
                resource_version: Some("7".into()),
                cordoned_by_baton: true,
                lb_excluded: true,
                reboot_ok: true,
                hook_labels: (false, false),
            }),
            lease: Some(LeaseFacts {
                name: "baton-reboot-n1".into(),
                uid: Some("u1".into()),
                resource_version: Some("9".into()),
            }),
        }
    }

    async fn run(action: Action) -> Vec<(String, String)> {
        let c = Recorded::default();
        let step = NodePlan {
            node: "n1".into(),
            action,
            seen: seen(),
        };
        perform(&c, &policy(), &step, at()).await.unwrap();
        c.all()
    }

    #[tokio::test]
    async fn a_grant_creates_the_lease_with_the_boot_and_version_the_decision_saw() {
        let w = run(Action::Grant {
            boot_id: BootId::new("aa").unwrap(),
            target_version: Version::new("2.0.0").ok(),
            drain: false,
            after: None,
        })
        .await;
        assert_eq!(w[0].0, "lease/baton-reboot-n1");
        assert!(
            w[0].1.contains(r#""baton.dev/granted-boot-id":"aa""#),
            "{w:?}"
        );
        assert!(
            w[0].1.contains(r#""baton.dev/target-version":"2.0.0""#),
            "{w:?}"
        );
        let started = protocol::lease::DRAIN_STARTED_AT.name;
        assert!(!w[0].1.contains(started), "{w:?}");
        assert_eq!(w[1], ("event/n1".into(), "Granted".into()));
        assert!(
            w[2].0 == "node/n1" && w[2].1.contains("unschedulable"),
            "{w:?}"
        );
        assert!(
            !w.iter().any(|(o, _)| o == "drain/n1"),
            "hooks first: {w:?}"
        );
    }

    /// A plan's two steps: n1 finishes and releases its slot, n2 is granted that slot.
    fn release_then_grant() -> Vec<NodePlan> {
        let finish = NodePlan {
            node: "n1".into(),
            action: Action::Finish {
                uncordon: true,
                release: true,
            },
            seen: seen(),
        };
        let grant = NodePlan {
            node: "n2".into(),
            action: Action::Grant {
                boot_id: BootId::new("bb").unwrap(),
                target_version: None,
                drain: false,
                after: Some("n1".into()),
            },
            seen: Seen {
                node: Some(NodeFacts {
                    resource_version: Some("3".into()),
                    ..NodeFacts::default()
                }),
                lease: None,
            },
        };
        // The grant comes first in the plan: the order of the steps must not matter.
        vec![grant, finish]
    }

    #[tokio::test]
    async fn a_grant_that_takes_a_released_slot_runs_after_the_release() {
        let c = Recorded::default();
        let retry = crate::reconcile::perform(&c, &policy(), &release_then_grant(), at()).await;
        assert_eq!(retry, None);
        let w = c.all();
        let released = w
            .iter()
            .position(|(o, what)| o == "lease/baton-reboot-n1" && what == "delete");
        let granted = w
            .iter()
            .position(|(o, what)| o == "lease/baton-reboot-n2" && what.starts_with("create"));
        assert!(
            released.is_some() && granted.is_some() && released < granted,
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|(o, p)| o == "node/n2" && p.contains("unschedulable")),
            "{w:?}"
        );
    }

    #[tokio::test]
    async fn a_grant_that_takes_a_released_slot_is_not_performed_when_the_release_fails() {
        let c = Recorded {
            refuse: Some("lease/baton-reboot-n1"),
            ..Recorded::default()
        };
        let retry = crate::reconcile::perform(&c, &policy(), &release_then_grant(), at()).await;
        assert!(retry.is_some(), "the failed release is tried again soon");
        let w = c.all();
        assert!(
            !w.iter().any(|(o, _)| o.ends_with("n2")),
            "the slot is not free: {w:?}"
        );
    }

    /// Performs [`release_then_grant`] as decided at `decided`: n1's Lease is deleted,
    /// and nothing is written for n2.
    async fn released_alone(c: &Recorded, decided: Timestamp) {
        crate::reconcile::perform(c, &policy(), &release_then_grant(), decided).await;
        let w = c.all();
        assert!(
            w.iter()
                .any(|(o, what)| o == "lease/baton-reboot-n1" && what == "delete")
        );
        assert!(!w.iter().any(|(o, _)| o.ends_with("n2")), "{w:?}");
    }

    #[tokio::test]
    async fn a_grant_that_takes_a_released_slot_is_not_performed_when_the_node_changed() {
        // The Node changed since the decision (cordoned, NotReady): the Finish's
        // version-guarded write conflicts, nothing is released, nothing granted.
        let c = Recorded {
            refuse: Some("node/n1"),
            ..Recorded::default()
        };
        let retry = crate::reconcile::perform(&c, &policy(), &release_then_grant(), at()).await;
        assert!(retry.is_some());
        let w = c.all();
        assert!(
            !w.iter()
                .any(|(o, _)| o.ends_with("n2") || o == "lease/baton-reboot-n1"),
            "{w:?}"
        );
    }

    #[tokio::test]
    async fn a_grant_waits_only_on_a_release_not_on_another_step_of_that_node() {
        let mut plan = release_then_grant();
        plan[1].action = Action::Publish {
            version: Version::new("2.0.0").unwrap(),
            release: None,
        };
        let c = Recorded::default();
        crate::reconcile::perform(&c, &policy(), &plan, at()).await;
        let w = c.all();
        assert!(w.iter().any(|(o, _)| o == "node/n1"), "published: {w:?}");
        assert!(!w.iter().any(|(o, _)| o.ends_with("n2")), "{w:?}");
    }

    #[tokio::test]
    async fn a_grant_that_takes_a_released_slot_waits_for_the_lease_to_be_gone() {
        // The delete succeeded, but the API server still has the Lease (another
        // finalizer holds it): the slot is not free.
        let c = Recorded {
            lease_exists: true,
            ..Recorded::default()
        };
        released_alone(&c, at()).await;
    }

    #[tokio::test]
    async fn a_grant_that_takes_a_released_slot_is_dropped_when_the_release_took_too_long() {
        // Decided more than TAKEOVER_WITHIN before the release was done: the window
        // the decision checked may have closed since.
        let c = Recorded::default();
        let decided = at()
            .checked_sub(rollout::plan::TAKEOVER_WITHIN)
            .and_then(|t| t.checked_sub(jiff::SignedDuration::from_secs(1)))
            .unwrap();
        released_alone(&c, decided).await;
    }

    #[tokio::test]
    async fn a_grant_without_before_reboot_hooks_records_the_drain_and_starts_it_after_the_cordon()
    {
        let w = run(Action::Grant {
            boot_id: BootId::new("aa").unwrap(),
            target_version: None,
            drain: true,
            after: None,
        })
        .await;
        let started = format!(
            r#""{}":"2026-11-30T10:00:00Z""#,
            protocol::lease::DRAIN_STARTED_AT.name
        );
        assert!(
            w[0].0 == "lease/baton-reboot-n1" && w[0].1.contains(&started),
            "{w:?}"
        );
        let cordon = w
            .iter()
            .position(|(o, p)| o == "node/n1" && p.contains("unschedulable"));
        let drain = w
            .iter()
            .position(|(o, what)| o == "drain/n1" && what == "start");
        assert!(
            cordon.is_some() && drain.is_some() && cordon < drain,
            "{w:?}"
        );
    }

    #[tokio::test]
    async fn failing_ends_the_grant_on_the_node_first_guarded_by_the_version_seen() {
        let w = run(Action::Fail {
            reason: "did not reboot".into(),
        })
        .await;
        assert_eq!(w[0].0, "node/n1");
        assert!(
            w[0].1.contains(r#""baton.dev/reboot-ok":null"#)
                && w[0].1.contains(r#""baton.dev/failure":"did not reboot""#)
                && w[0].1.contains(r#""resourceVersion":"7""#),
            "{w:?}"
        );
        assert_eq!(w[1].0, "lease/baton-reboot-n1");
        assert!(w[1].1.contains("baton.dev/failure") && w[1].1.contains("\"9\""));
    }

    #[tokio::test]
    async fn a_release_and_an_abort_take_the_grant_off_the_node_before_the_lease_goes() {
        for action in [
            Action::Release(rollout::plan::ReleaseReason::Done),
            Action::Abort {
                reason: "the policy is being deleted".into(),
            },
        ] {
            let w = run(action.clone()).await;
            let node = w.iter().position(|(o, _)| o == "node/n1").unwrap();
            let lease = w
                .iter()
                .position(|(o, what)| o == "lease/baton-reboot-n1" && what == "delete")
                .unwrap();
            assert!(node < lease, "{action:?}: {w:?}");
            assert!(w[node].1.contains(r#""baton.dev/reboot-ok":null"#));
            assert_eq!(w[0], ("drain/n1".into(), "stop".into()));
        }
        let w = run(Action::Abort { reason: "x".into() }).await;
        assert!(
            w[1].1.contains(r#""unschedulable":false"#)
                && w[1].1.contains("exclude-from-external-load-balancers"),
            "baton's cordon and LB label are undone: {w:?}"
        );
    }

    #[tokio::test]
    async fn a_drain_abort_stops_the_drain_and_uncordons_only_batons_cordon() {
        let w = run(Action::DrainTimedOut(OnTimeout::Abort)).await;
        assert_eq!(w[0], ("drain/n1".into(), "stop".into()));
        assert!(w[1].1.contains(r#""unschedulable":false"#), "{w:?}");
        let c = Recorded::default();
        let mut s = seen();
        if let Some(n) = s.node.as_mut() {
            n.cordoned_by_baton = false;
        }
        let step = NodePlan {
            node: "n1".into(),
            action: Action::DrainTimedOut(OnTimeout::Abort),
            seen: s,
        };
        perform(&c, &policy(), &step, at()).await.unwrap();
        assert!(
            !c.all()[1].1.contains("unschedulable"),
            "an admin's cordon stays"
        );
    }

    #[tokio::test]
    async fn a_stale_cordon_is_undone_only_once_a_fresh_read_finds_no_lease() {
        let w = run(Action::ClearStaleGrant).await;
        assert_eq!(w[0].0, "node/n1");
        assert!(
            w[0].1.contains(r#""unschedulable":false"#) && !w[0].1.contains("failure"),
            "{w:?}"
        );
        let c = Recorded {
            lease_exists: true,
            ..Recorded::default()
        };
        let step = NodePlan {
            node: "n1".into(),
            action: Action::ClearStaleGrant,
            seen: seen(),
        };
        perform(&c, &policy(), &step, at()).await.unwrap();
        assert!(c.all().is_empty(), "the Lease exists: the cache lagged");
    }

    #[tokio::test]
    async fn hook_labels_are_written_once() {
        let w = run(Action::RunBeforeHooks {
            missing: vec!["example.com/ready".into()],
            deadline: at(),
        })
        .await;
        assert!(w[0].1.contains("baton.dev/before-reboot"), "{w:?}");
        let c = Recorded::default();
        let mut s = seen();
        if let Some(n) = s.node.as_mut() {
            n.hook_labels = (true, false);
        }
        let step = NodePlan {
            node: "n1".into(),
            action: Action::RunBeforeHooks {
                missing: vec!["example.com/ready".into()],
                deadline: at(),
            },
            seen: s,
        };
        perform(&c, &policy(), &step, at()).await.unwrap();
        assert!(c.all().is_empty());
    }

    /// The caches of a drain's end: n1 granted for boot b1, cordoned by baton and
    /// drained, its agent asking to reboot, the policy `pool` valid.
    fn drained() -> Recorded {
        use crds::{AgentState, UpdatePolicy, protocol::lease as l};
        use k8s_openapi::api::core::v1::Node;
        let boot = BootId::new("b1").unwrap();
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "uid": "n-uid", "resourceVersion": "7"},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        node.annotations_mut().extend([
            (
                protocol::STATE.name.to_string(),
                protocol::STATE.format(&AgentState::RebootRequired),
            ),
            (
                protocol::BOOT_ID.name.to_string(),
                protocol::BOOT_ID.format(&boot),
            ),
            (
                protocol::CORDONED.name.to_string(),
                protocol::CORDONED.format(&true),
            ),
        ]);
        let mut lease = lease::grant(
            "n1",
            "baton-system",
            &policy(),
            &boot,
            None,
            Some(at()),
            at(),
        );
        lease.metadata.resource_version = Some("9".into());
        lease
            .annotations_mut()
            .insert(l::DRAINED_AT.name.into(), l::DRAINED_AT.format(&at()));
        let spec = serde_json::from_str("{}").unwrap();
        Recorded {
            nodes: vec![Arc::new(crate::cache::CachedNode::from_node(&node))],
            leases: vec![Arc::new(lease)],
            policies: vec![Arc::new(UpdatePolicy::new("pool", spec))],
            ..Recorded::default()
        }
    }

    #[tokio::test]
    async fn a_drains_end_allows_the_reboot_at_once_on_the_node_the_decision_saw() {
        use crate::reconcile::{AfterDrain, after_drain};
        let c = drained();
        assert_eq!(after_drain(&c, "n1").await.unwrap(), AfterDrain::Allowed);
        let w = c.all();
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0].0, "node/n1");
        let ok = format!(r#""{}":"b1""#, protocol::REBOOT_OK.name);
        assert!(w[0].1.contains(&ok), "{w:?}");
        assert_eq!(w[1], ("event/n1".into(), "Rebooting".into()));
    }

    #[tokio::test]
    async fn a_drains_end_leaves_everything_but_the_allowance_to_the_pass() {
        use crate::reconcile::{AfterDrain, after_drain};
        use crds::protocol::lease as l;
        type Change = fn(&mut Recorded);
        let cases: [(&str, AfterDrain, Change); 10] = [
            (
                "a pool with a control-plane node (etcd is the pass's)",
                AfterDrain::Left,
                |c| {
                    let cp: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "cp1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
                }))
                .unwrap();
                    c.nodes
                        .push(Arc::new(crate::cache::CachedNode::from_node(&cp)));
                },
            ),
            ("the caches not synced yet", AfterDrain::NotYet, |c| {
                c.caches_ready = false
            }),
            (
                "a write to the lease not cached yet",
                AfterDrain::NotYet,
                |c| {
                    let expected = rollout::expectations::Expected::Changed {
                        from: Some("9".into()),
                    };
                    let key = ObjectKey::lease("baton-reboot-n1");
                    c.expectations.lock().unwrap().expect(key, expected, at());
                },
            ),
            ("the reboot already allowed", AfterDrain::Left, |c| {
                let mut v = (*c.nodes[0].view).clone();
                v.agent.reboot_ok = Some(BootId::new("b1").unwrap());
                let mut cached = (*c.nodes[0]).clone();
                cached.view = Arc::new(v);
                c.nodes = vec![Arc::new(cached)];
            }),
            (
                "the drain's record not cached yet",
                AfterDrain::NotYet,
                |c| {
                    let mut lease = (*c.leases[0]).clone();
                    lease.annotations_mut().remove(l::DRAINED_AT.name);
                    c.leases = vec![Arc::new(lease)];
                },
            ),
            (
                "a write to the node not cached yet",
                AfterDrain::NotYet,
                |c| {
                    let expected = rollout::expectations::Expected::Changed {
                        from: Some("7".into()),
                    };
                    c.expectations
                        .lock()
                        .unwrap()
                        .expect(ObjectKey::node("n1"), expected, at());
                },
            ),
            ("no lease cached yet", AfterDrain::NotYet, |c| {
                c.leases.clear()
            }),
            ("the policy gone", AfterDrain::Left, |c| c.policies.clear()),
            ("the policy being deleted", AfterDrain::Left, |c| {
                let mut p = (*c.policies[0]).clone();
                p.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at()));
                c.policies = vec![Arc::new(p)];
            }),
            ("the grant failed", AfterDrain::Left, |c| {
                let mut lease = (*c.leases[0]).clone();
                let why = protocol::Message("drain timed out".into());
                lease
                    .annotations_mut()
                    .insert(l::FAILURE.name.into(), l::FAILURE.format(&why));
                c.leases = vec![Arc::new(lease)];
            }),
        ];
        for (case, expected, change) in cases {
            let mut c = drained();
            change(&mut c);
            assert_eq!(after_drain(&c, "n1").await.unwrap(), expected, "{case}");
            assert!(c.all().is_empty(), "{case}: {:?}", c.all());
        }
    }
}
