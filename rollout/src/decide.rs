//! `decide`: every rule of a rollout in one place.
//!
//! Given what the cluster looks like and the time, it says what to do next for each
//! node of one policy. It must never grant beyond the budget, outside a window, on a
//! halted or paused pool, or on a node someone else cordoned; it never uncordons a node
//! baton did not cordon; and every wait it returns has a deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use jiff::Timestamp;

use crds::{AgentState, OnTimeout, WindowMode};

use crate::{
    control_plane::{self, Guard},
    etcd::Etcd,
    plan::{
        Action, BudgetUse, Conflict, Counts, EtcdGuard, NodePlan, Plan, ReleaseReason, Seen, Skip,
        TAKEOVER_WITHIN,
    },
    policy::{Ending, HookRule, Policy},
    snapshot::{LeaseView, NodeView, Snapshot},
    window::WindowState,
    zone::ZoneCaps,
};

/// Decides the next step for every node of `policy` at `now`.
pub fn decide(snapshot: &Snapshot, policy: &Policy, now: Timestamp) -> Plan {
    if let Some(ending) = policy.ending {
        return wind_down(snapshot, policy, ending, now);
    }
    let window = policy.windows.state(now);
    let nodes_by_name: HashMap<&str, &NodeView> = snapshot
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), &**n))
        .collect();
    let leases_by_node: HashMap<&str, &LeaseView> = snapshot
        .leases
        .iter()
        .map(|l| (l.node.as_str(), l))
        .collect();

    // The pool: selected nodes that no other policy also selects.
    let mut pool: Vec<&NodeView> = Vec::new();
    let mut contested: Vec<&NodeView> = Vec::new();
    let mut conflicts = Vec::new();
    for node in snapshot.nodes.iter().map(|n| &**n) {
        if !policy.selector.matches(&node.labels) {
            continue;
        }
        let others: Vec<String> = snapshot
            .other_policies
            .iter()
            .filter(|(name, sel)| *name != policy.name && sel.matches(&node.labels))
            .map(|(name, _)| name.clone())
            .collect();
        if others.is_empty() {
            pool.push(node);
        } else {
            contested.push(node);
            conflicts.push(Conflict {
                node: node.name.clone(),
                others,
            });
        }
    }

    // Publishing the release is never a disruption: the agents only stage it. It goes
    // in rollout order, so that the nodes granted first are the first to stage (a large
    // pool is published over several passes).
    let publishes: Vec<NodePlan> = match &policy.target_version {
        Some(target) => {
            let mut stale: Vec<&NodeView> = pool
                .iter()
                .copied()
                .filter(|n| {
                    n.desired_version.as_ref() != Some(target)
                        || n.desired_release != policy.release
                })
                .collect();
            stale.sort_by_cached_key(|n| order_key(n, snapshot, policy));
            stale
                .into_iter()
                .map(|n| NodePlan {
                    node: n.name.clone(),
                    action: Action::Publish {
                        version: target.clone(),
                        release: policy.release.clone(),
                    },
                    seen: Seen::of(Some(n), None),
                })
                .collect()
        }
        None => Vec::new(),
    };

    let mut plans = Vec::new();
    let mut timers = Vec::new();
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    let mut in_progress = 0u32;
    let mut released_done = 0u32;
    // Every node holding one of this policy's leases uses this policy's budget,
    // wherever its labels point now, until its lease is released.
    let mut own_held = 0usize;
    // Nodes this plan releases that are available once released: each frees a slot a
    // grant of this plan may take, performed only after that release succeeded.
    let mut freeing: Vec<&str> = Vec::new();

    // In-flight nodes first: they run to completion whatever the window or gates say.
    let own_leases = snapshot.leases.iter().filter(|l| l.policy == policy.name);
    for lease in own_leases {
        let node = nodes_by_name.get(lease.node.as_str()).copied();
        let action = held(node, lease, policy, &snapshot.etcd, now);
        if let Some(t) = action.timer() {
            timers.push(t);
        }
        match &action {
            // A drain that timed out under `Abort` fails its node in this plan's step:
            // it counts as failed now, so that no grant of this plan runs beside it on
            // a pool it halts.
            Action::Fail { .. }
            | Action::Skip(Skip::Failed(_))
            | Action::DrainTimedOut(OnTimeout::Abort) => {
                failed.insert(lease.node.as_str());
                own_held += 1;
            }
            action if action.completes() => {
                released_done += 1;
                own_held += 1;
                // Only a release that writes the Node, on the version the decision
                // saw: a node changed since (cordoned, NotReady) fails the write, and
                // its slot is then not taken.
                let writes_node = matches!(action, Action::Finish { release: true, .. });
                if writes_node && node.is_some_and(|n| available_once_released(n, action)) {
                    freeing.push(lease.node.as_str());
                }
            }
            Action::Release(ReleaseReason::NodeDeleted) => {}
            _ => {
                in_progress += 1;
                own_held += 1;
            }
        }
        plans.push(NodePlan {
            node: lease.node.clone(),
            action,
            seen: Seen::of(node, Some(lease)),
        });
    }

    // Failed nodes without a lease: the operator's mark, or the agent's own report,
    // which the operator then records so that it counts until an admin retries it
    // (the agent itself may stop reporting it, such as a staging failure it retries).
    let mut newly_failed: BTreeMap<&str, String> = BTreeMap::new();
    // A node marked failed that another policy's Lease still holds (it failed there,
    // then was relabelled into this pool) is a failure here too.
    for node in pool.iter().filter(|n| {
        n.failure.is_some()
            && leases_by_node
                .get(n.name.as_str())
                .is_some_and(|l| l.policy != policy.name)
    }) {
        failed.insert(node.name.as_str());
    }
    // A node another policy also claims is left alone, but not its failure: the claim
    // is no retry, so the failure counts here too and is recorded on the node (a mark
    // is no disruption, and every claimant would write the same one).
    for node in pool
        .iter()
        .chain(&contested)
        .filter(|n| !leases_by_node.contains_key(n.name.as_str()))
    {
        if node.failure.is_some() {
            failed.insert(node.name.as_str());
        } else if let Some(state) = node.agent_failure() {
            failed.insert(node.name.as_str());
            let detail = node.agent.message.clone().unwrap_or_default();
            newly_failed.insert(
                node.name.as_str(),
                format!("agent reported {state}: {detail}")
                    .trim_end_matches(": ")
                    .to_string(),
            );
        }
    }
    for node in contested.iter().filter(|n| n.failure.is_some()) {
        failed.insert(node.name.as_str());
    }
    let halted = (failed.len() as u32 >= policy.max_failed).then(|| {
        format!(
            "{} failed node(s) reached maxFailedNodes={}: {}",
            failed.len(),
            policy.max_failed,
            failed.iter().copied().collect::<Vec<_>>().join(", ")
        )
    });

    // The budget: this policy's leases, and everything else it selects that is not
    // plainly available. A node another policy also selects is left alone, but when
    // it is down it is down in this pool too.
    let others_down: Vec<&NodeView> = pool
        .iter()
        .chain(&contested)
        .copied()
        .filter(|n| {
            leases_by_node
                .get(n.name.as_str())
                .is_none_or(|l| l.policy != policy.name)
        })
        .filter(|n| {
            leases_by_node.contains_key(n.name.as_str())
                || !n.ready
                || n.unschedulable
                || failed.contains(n.name.as_str())
        })
        .collect();
    let unavailable = own_held + others_down.len();
    // The same count per zone, for maxUnavailablePerZone.
    let held_here = snapshot
        .leases
        .iter()
        .filter(|l| l.policy == policy.name)
        .filter_map(|l| nodes_by_name.get(l.node.as_str()).copied());
    let mut zones = ZoneCaps::new(policy, &pool, held_here.chain(others_down.iter().copied()));
    let limit = policy.budget.resolve(pool.len());
    let mut free = limit.saturating_sub(unavailable);

    // Zones in progress, for one zone at a time: those of every leased node in the
    // pool and of every node holding this policy's lease.
    let in_pool: HashSet<&str> = pool.iter().map(|n| n.name.as_str()).collect();
    let mut active_zones: BTreeSet<&str> = snapshot
        .nodes
        .iter()
        .filter(|n| !failed.contains(n.name.as_str()))
        .filter(|n| match leases_by_node.get(n.name.as_str()) {
            Some(l) => l.policy == policy.name || in_pool.contains(n.name.as_str()),
            None => false,
        })
        .map(|n| n.zone(&policy.zone_label))
        .collect();

    let mut counts = Counts {
        nodes: pool.len() as u32,
        failed: failed.len() as u32,
        in_progress,
        up_to_date: released_done,
        ..Counts::default()
    };

    // Everyone else, in rollout order.
    let mut rest: Vec<&NodeView> = pool
        .iter()
        .copied()
        .filter(|n| !leases_by_node.contains_key(n.name.as_str()))
        .collect();
    rest.sort_by_cached_key(|n| order_key(n, snapshot, policy));
    // Past an urgent release's deadline, windows (and, if asked, freezes) stop gating.
    let urgency = policy.urgency.filter(|u| now >= u.deadline);
    let window_gate = match (policy.windows.freeze_at(now), urgency) {
        (Some(_), Some(u)) if u.override_freezes => Ok(()),
        (Some(freeze), _) => Err(Skip::Frozen(freeze.describe())),
        (None, Some(_)) => Ok(()),
        (None, None) => window_gate(window, policy, now),
    };
    let mut guard = Guard::new(snapshot, policy, &pool, &leases_by_node);
    // A control-plane pool's grants wait on etcd's members as the snapshot saw them, so
    // only a pool without one takes over released slots.
    // Over the budget (an admin's cordon, a node gone NotReady), no slot is taken over:
    // the releases run side by side, and a grant after the first of them would
    // disrupt more than the budget until the others are done.
    // Nor when the window may close (or a freeze start) before the grant is written.
    if guard.has_control_plane(&pool)
        || unavailable > limit
        || !open_for_a_takeover(window, policy, now)
    {
        freeing.clear();
    }
    freeing.reverse();
    let mut taken_over = 0usize;
    for node in rest {
        let action =
            if (node.cordoned_by_baton && node.unschedulable) || node.agent.reboot_ok.is_some() {
                // Left by a grant that ended under a step in flight: it is baton's to undo.
                // The node still counts as unavailable until that is done.
                Action::ClearStaleGrant
            } else if let Some(reason) = newly_failed.remove(node.name.as_str()) {
                Action::Fail { reason }
            } else if failed.contains(node.name.as_str()) {
                let why = node
                    .failure
                    .clone()
                    .or_else(|| node.agent.message.clone())
                    .unwrap_or_else(|| {
                        format!(
                            "agent reported {}",
                            node.agent.state.map_or("", |s| s.as_str())
                        )
                    });
                Action::Skip(Skip::Failed(why))
            } else if !node.malformed.is_empty() {
                Action::Skip(Skip::Malformed(
                    node.malformed.iter().map(|e| e.to_string()).collect(),
                ))
            } else if !node.requests_reboot() {
                if is_up_to_date(node, policy) {
                    counts.up_to_date += 1;
                    Action::Skip(Skip::UpToDate)
                } else {
                    counts.waiting += 1;
                    let why = match node.agent.state {
                        Some(state) => format!("agent is {state}"),
                        None => "agent has not reported".to_string(),
                    };
                    Action::Skip(Skip::NotRequested(why))
                }
            } else {
                counts.waiting += 1;
                let promoted = match &policy.promotion {
                    None => Ok(()),
                    Some(rule) => {
                        let version = policy
                            .target_version
                            .as_ref()
                            .or(node.agent.target_version.as_ref());
                        crate::promotion::check(rule, snapshot.upstream.as_ref(), version, now)
                            .map_err(|(why, soaked)| {
                                timers.extend(soaked);
                                Skip::Promotion(why)
                            })
                    }
                };
                // Past the free room, a slot a release of this plan frees. Every
                // other check counts the releasing node as still disrupted (its zone's
                // use, its zone in progress), so taking its slot never goes beyond
                // what the release gives back.
                let room = if free > 0 { free } else { freeing.len() };
                match candidate(
                    node,
                    snapshot,
                    policy,
                    halted.is_some(),
                    &window_gate,
                    Room {
                        free: room,
                        released_only: free == 0,
                        active_zones: &active_zones,
                        zones: &zones,
                        promoted,
                    },
                    &guard,
                ) {
                    Ok(boot_id) => {
                        // Free room first, or else a released slot (`candidate` saw one).
                        let slot = if free > 0 {
                            free -= 1;
                            Ok(None)
                        } else {
                            freeing.pop().map(Some).ok_or(Skip::Budget)
                        };
                        match slot {
                            Ok(after) => {
                                taken_over += usize::from(after.is_some());
                                guard.granted(node.name.as_str());
                                zones.granted(node);
                                if policy.one_zone_at_a_time {
                                    active_zones.insert(node.zone(&policy.zone_label));
                                }
                                Action::Grant {
                                    boot_id,
                                    target_version: node.agent.target_version.clone(),
                                    drain: policy.before_reboot.is_none(),
                                    after: after.map(str::to_string),
                                }
                            }
                            Err(skip) => Action::Skip(skip),
                        }
                    }
                    Err(skip) => Action::Skip(skip),
                }
            };
        plans.push(NodePlan {
            node: node.name.clone(),
            action,
            seen: Seen::of(Some(node), None),
        });
    }
    // The failures of contested nodes, recorded (pool nodes' were, in order, above).
    plans.extend(
        std::mem::take(&mut newly_failed)
            .into_iter()
            .map(|(node, reason)| NodePlan {
                node: node.to_string(),
                action: Action::Fail { reason },
                seen: Seen::of(nodes_by_name.get(node).copied(), None),
            }),
    );
    plans.extend(publishes);

    let etcd = guard.has_control_plane(&pool).then(|| EtcdGuard {
        summary: snapshot.etcd.summary(),
        hold: plans.iter().find_map(|p| match &p.action {
            Action::Skip(Skip::Etcd(hold)) | Action::WaitForEtcd { hold, .. } => {
                Some((p.node.clone(), hold.clone()))
            }
            _ => None,
        }),
    });
    let granted = plans.iter().filter(|p| p.action.is_grant()).count();
    let mut holders: Vec<String> = plans
        .iter()
        .filter(|p| {
            !matches!(
                p.action,
                Action::Release(_)
                    | Action::Finish { release: true, .. }
                    | Action::Abort { .. }
                    | Action::ClearStaleGrant
                    | Action::Publish { .. }
                    | Action::Skip(Skip::UpToDate | Skip::NotRequested(_))
            )
        })
        .filter(|p| {
            p.action.is_grant()
                || leases_by_node
                    .get(p.node.as_str())
                    .is_some_and(|l| l.policy == policy.name)
        })
        .map(|p| p.node.clone())
        .collect();
    holders.sort();
    counts.waiting -= granted as u32;
    counts.in_progress += granted as u32;
    let waiting_on_window = counts.waiting > 0;
    let behind = counts.waiting + counts.in_progress > 0;
    let urgent = urgency.filter(|_| behind).map(|u| {
        format!(
            "the urgency deadline {} passed with {} node(s) not updated: windows{} no longer gate them",
            u.deadline,
            counts.waiting + counts.in_progress,
            if u.override_freezes { " and freezes" } else { "" }
        )
    });
    let deadline = policy
        .urgency
        .map(|u| u.deadline)
        .filter(|_| waiting_on_window);
    let next_change = timers
        .into_iter()
        .chain(waiting_on_window.then(|| window.next_edge()).flatten())
        .chain(deadline)
        .filter(|t| *t > now)
        .min();

    Plan {
        policy: policy.name.clone(),
        nodes: plans,
        holders,
        budget: BudgetUse {
            limit,
            unavailable,
            granted,
            taken_over,
        },
        window,
        halted,
        gate: snapshot.gate.clone(),
        urgent,
        etcd,
        conflicts,
        counts,
        next_change,
    }
}

/// Whether a node whose step `releases` it is available once that step is written:
/// Ready, not failed, and schedulable, or cordoned only by baton and uncordoned by the
/// same step. Its slot is then free for another grant.
fn available_once_released(node: &NodeView, releases: &Action) -> bool {
    let schedulable =
        !node.unschedulable || matches!(releases, Action::Finish { uncordon: true, .. });
    node.ready && schedulable && node.failure.is_none() && node.agent_failure().is_none()
}

/// Whether the window stays open [`TAKEOVER_WITHIN`] from `now` (with the longest
/// disruption fitting after that, in `Fit` mode), so that a grant taking a released slot
/// lands inside it however long the release takes within that bound.
fn open_for_a_takeover(window: WindowState, policy: &Policy, now: Timestamp) -> bool {
    let margin = match policy.window_mode {
        WindowMode::Fit => TAKEOVER_WITHIN.saturating_add(policy.longest_disruption()),
        WindowMode::Start => TAKEOVER_WITHIN,
    };
    match window {
        WindowState::Always => true,
        WindowState::Open { closes } => now.checked_add(margin).is_ok_and(|end| end <= closes),
        WindowState::Closed { .. } => false,
    }
}

/// Whether the window lets a disruption start now, or why not.
fn window_gate(window: WindowState, policy: &Policy, now: Timestamp) -> Result<(), Skip> {
    match window {
        WindowState::Always => Ok(()),
        WindowState::Closed { opens } => Err(Skip::OutsideWindow(opens)),
        WindowState::Open { closes } => {
            let fits = now
                .checked_add(policy.longest_disruption())
                .is_ok_and(|end| end <= closes);
            if policy.window_mode == WindowMode::Fit && !fits {
                Err(Skip::WindowTooShort(closes))
            } else {
                Ok(())
            }
        }
    }
}

/// What is left of the pool's room for new grants in this decision.
struct Room<'a, 'b> {
    /// Budget left.
    free: usize,
    /// Whether that budget is only slots this plan's releases free.
    released_only: bool,
    /// Zones in progress.
    active_zones: &'a BTreeSet<&'b str>,
    /// Each zone's cap and use.
    zones: &'a ZoneCaps<'b>,
    /// Whether the node's version is promoted to this pool (`spec.promotion`).
    promoted: Result<(), Skip>,
}

/// Whether a node that asks for a reboot may be granted now. Checks run from the
/// reasons an admin most needs to see to the most transient.
fn candidate(
    node: &NodeView,
    snapshot: &Snapshot,
    policy: &Policy,
    halted: bool,
    window: &Result<(), Skip>,
    room: Room,
    guard: &Guard,
) -> Result<crds::protocol::BootId, Skip> {
    let Room {
        free,
        released_only,
        active_zones,
        zones,
        promoted,
    } = room;
    if halted {
        return Err(Skip::Halted);
    }
    if policy.paused {
        return Err(Skip::PolicyPaused);
    }
    if node.paused {
        return Err(Skip::NodePaused);
    }
    if node.unschedulable {
        return Err(Skip::CordonedByOthers);
    }
    if !node.ready {
        return Err(Skip::NotReady);
    }
    let Some(boot_id) = node.agent.boot_id.clone() else {
        return Err(Skip::NotRequested(
            "agent has not reported a boot id".into(),
        ));
    };
    if let Some(pod) = &node.blocked_by {
        return Err(Skip::Blocked(pod.clone()));
    }
    if let Some(gate) = &snapshot.gate {
        return Err(Skip::Gate(gate.clone()));
    }
    window.clone()?;
    promoted?;
    guard.check(&node.name)?;
    if free == 0 {
        return Err(Skip::Budget);
    }
    let zone = node.zone(&policy.zone_label);
    let fits = zones.check(node).and_then(|()| {
        if policy.one_zone_at_a_time && !active_zones.is_empty() && !active_zones.contains(zone) {
            let busy = active_zones.iter().next().copied().unwrap_or_default();
            return Err(Skip::OtherZone(busy.to_string()));
        }
        Ok(())
    });
    match fits {
        // A released slot is offered only to a node that fits it; the others still
        // wait on the budget, which this snapshot shows full.
        Err(_) if released_only => Err(Skip::Budget),
        fits => fits.map(|()| boot_id),
    }
}

/// The documented rollout order: the operator's own node last, then by zone name, then
/// oldest first, then by name.
fn order_key<'a>(
    node: &'a NodeView,
    snapshot: &Snapshot,
    policy: &Policy,
) -> (bool, &'a str, Option<jiff::Timestamp>, &'a str) {
    let is_operator_node = snapshot.operator_node.as_deref() == Some(node.name.as_str());
    (
        is_operator_node,
        node.zone(&policy.zone_label),
        node.created,
        node.name.as_str(),
    )
}

/// On the policy's target (if it names one) and settled: a node whose agent has not
/// reported is not known to be up to date.
fn is_up_to_date(node: &NodeView, policy: &Policy) -> bool {
    let on_target = match &policy.target_version {
        Some(target) => node.agent.current_version.as_ref() == Some(target),
        None => true,
    };
    on_target && matches!(node.agent.state, Some(AgentState::Idle | AgentState::Done))
}

/// The next step of a node that holds one of `policy`'s leases (`node`: `None` once it
/// is deleted), exactly as [`decide`] gives it, without deciding the rest of the pool:
/// the operator's drain task takes a drain's next step with it. A policy being wound
/// down ([`Policy::ending`]) decides its grants otherwise: for those, ask [`decide`].
pub fn held(
    node: Option<&NodeView>,
    lease: &LeaseView,
    policy: &Policy,
    etcd: &Etcd,
    now: Timestamp,
) -> Action {
    if let Some(reason) = &lease.failure {
        // A failure counts until an admin retries it, even once its node is gone.
        let reason = match node {
            Some(_) => reason.clone(),
            None => format!("{reason} (node deleted; `kubectl baton retry` clears it)"),
        };
        return Action::Skip(Skip::Failed(reason));
    }
    let Some(node) = node else {
        return Action::Release(ReleaseReason::NodeDeleted);
    };
    if let Some(reason) = &node.failure {
        return Action::Skip(Skip::Failed(reason.clone()));
    }
    let agent = &node.agent;
    if let Some(state) = node.agent_failure() {
        let detail = agent.message.clone().unwrap_or_default();
        return Action::Fail {
            reason: format!("agent reported {state}: {detail}")
                .trim_end_matches(": ")
                .to_string(),
        };
    }
    if let Some(done) = lease.done {
        let until = done.checked_add(policy.settle_time).unwrap_or(done);
        return if now >= until {
            Action::Release(ReleaseReason::Done)
        } else {
            Action::Settle { until }
        };
    }
    let booted_new = agent.boot_id.is_some() && agent.boot_id != lease.granted_boot_id;
    let reboot_deadline = lease
        .drained
        .unwrap_or(lease.acquired)
        .checked_add(policy.reboot_timeout)
        .unwrap_or(now);

    if !booted_new {
        let Some(_) = lease.drained else {
            return before_reboot(node, lease, policy, now);
        };
        if now >= reboot_deadline {
            return Action::Fail {
                reason: format!(
                    "did not reboot within rebootTimeout ({})",
                    human(policy.reboot_timeout)
                ),
            };
        }
        let Some(boot_id) = lease.granted_boot_id.clone() else {
            return Action::Fail {
                reason: "the lease does not name the boot it was granted for".into(),
            };
        };
        if agent.reboot_ok.as_ref() != Some(&boot_id) {
            if control_plane::is_control_plane(node, etcd) {
                return before_control_plane_reboot(node, etcd, boot_id, reboot_deadline);
            }
            return Action::AllowReboot { boot_id };
        }
        return Action::WaitForReboot {
            deadline: reboot_deadline,
        };
    }

    // It rebooted: verify the version, readiness and the agent's own checks.
    let version_ok =
        lease.target_version.is_none() || agent.current_version == lease.target_version;
    if agent.state == Some(AgentState::Done) && !version_ok {
        return Action::Fail {
            reason: format!(
                "booted version {}, expected {}",
                agent
                    .current_version
                    .as_ref()
                    .map_or("unknown".into(), |v| v.to_string()),
                lease
                    .target_version
                    .as_ref()
                    .map_or("unknown".into(), |v| v.to_string()),
            ),
        };
    }
    if !(agent.state == Some(AgentState::Done) && node.ready) {
        if now >= reboot_deadline {
            return Action::Fail {
                reason: format!(
                    "not back Ready on the new version within rebootTimeout ({})",
                    human(policy.reboot_timeout)
                ),
            };
        }
        return Action::WaitForReboot {
            deadline: reboot_deadline,
        };
    }
    if control_plane::is_control_plane(node, etcd)
        && let Err(hold) = etcd.rejoined(&node.name)
    {
        if now >= reboot_deadline {
            return Action::Fail {
                reason: format!(
                    "its etcd member did not rejoin within rebootTimeout ({}): {hold}",
                    human(policy.reboot_timeout)
                ),
            };
        }
        return Action::WaitForEtcd {
            hold,
            deadline: reboot_deadline,
        };
    }
    if let Some(hook) = &policy.after_reboot {
        let missing = missing(node, hook);
        if !missing.is_empty() {
            let deadline = reboot_deadline
                .checked_add(hook.timeout)
                .unwrap_or(reboot_deadline);
            if now >= deadline {
                return Action::Fail {
                    reason: format!(
                        "after-reboot hook timed out waiting for {}",
                        missing.join(", ")
                    ),
                };
            }
            return Action::RunAfterHooks { missing, deadline };
        }
    }
    Action::Finish {
        uncordon: node.unschedulable && node.cordoned_by_baton,
        release: policy.settle_time.is_zero(),
    }
}

/// The last gate before a drained control-plane node may reboot: etcd keeps quorum
/// without it, and its member does not lead (leadership is moved first). Until both
/// hold it waits, within the reboot's bound.
fn before_control_plane_reboot(
    node: &NodeView,
    etcd: &Etcd,
    boot_id: crds::protocol::BootId,
    deadline: Timestamp,
) -> Action {
    if let Err(hold) = etcd.may_go_down(&node.name) {
        return Action::WaitForEtcd { hold, deadline };
    }
    match etcd.successor(&node.name) {
        None => Action::AllowReboot { boot_id },
        Some(Err(hold)) => Action::WaitForEtcd { hold, deadline },
        Some(Ok(next)) => {
            let leader = etcd.member_of(&node.name);
            match leader.and_then(|l| l.client_url.clone().map(|url| (l, url))) {
                Some((leader, leader_url)) => Action::MoveLeader {
                    from: leader.name.clone(),
                    leader_url,
                    to: next.name.clone(),
                    to_id: next.id,
                },
                None => Action::WaitForEtcd {
                    hold: crate::etcd::Hold::Unhealthy {
                        member: node.name.clone(),
                        problem: "it leads but advertises no client URL to move leadership through"
                            .into(),
                    },
                    deadline,
                },
            }
        }
    }
}

/// Cordon, before-reboot hooks and drain, in that order.
fn before_reboot(node: &NodeView, lease: &LeaseView, policy: &Policy, now: Timestamp) -> Action {
    if !node.unschedulable {
        return Action::Cordon;
    }
    if let Some(hook) = &policy.before_reboot {
        let missing = missing(node, hook);
        if !missing.is_empty() {
            let deadline = lease
                .acquired
                .checked_add(hook.timeout)
                .unwrap_or(lease.acquired);
            if now >= deadline {
                return Action::Fail {
                    reason: format!(
                        "before-reboot hook timed out waiting for {}",
                        missing.join(", ")
                    ),
                };
            }
            return Action::RunBeforeHooks { missing, deadline };
        }
    }
    let deadline = lease.drain_started.and_then(|s| policy.drain_deadline(s));
    match deadline {
        Some(d) if now >= d => Action::DrainTimedOut(policy.on_timeout),
        _ => Action::Drain { deadline },
    }
}

/// A policy being wound down ([`Ending`]): nothing new starts; each of its grants ends
/// at once unless its node may be rebooting right now, in which case the reboot and
/// its verification finish first (with no settle time) and then the grant ends.
fn wind_down(snapshot: &Snapshot, policy: &Policy, ending: Ending, now: Timestamp) -> Plan {
    let finishing = Policy {
        settle_time: jiff::SignedDuration::ZERO,
        ..policy.clone()
    };
    let mut plans = Vec::new();
    let mut counts = Counts::default();
    let mut timers = Vec::new();
    let nodes_by_name: HashMap<&str, &NodeView> = snapshot
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), &**n))
        .collect();
    for lease in snapshot.leases.iter().filter(|l| l.policy == policy.name) {
        let node = nodes_by_name.get(lease.node.as_str()).copied();
        let action = wind_down_step(node, lease, &finishing, &snapshot.etcd, ending, now);
        timers.extend(action.timer());
        match &action {
            Action::Skip(Skip::Failed(_)) | Action::Fail { .. } => counts.failed += 1,
            Action::Release(_) | Action::Finish { release: true, .. } | Action::Abort { .. } => {}
            _ => counts.in_progress += 1,
        }
        plans.push(NodePlan {
            node: lease.node.clone(),
            action,
            seen: Seen::of(node, Some(lease)),
        });
    }
    let holders = plans
        .iter()
        .filter(|p| !(p.action.releases() || matches!(p.action, Action::Abort { .. })))
        .map(|p| p.node.clone())
        .collect();
    Plan {
        policy: policy.name.clone(),
        budget: BudgetUse {
            limit: 0,
            unavailable: plans.len(),
            granted: 0,
            taken_over: 0,
        },
        nodes: plans,
        holders,
        window: policy.windows.state(now),
        halted: None,
        gate: None,
        urgent: None,
        etcd: None,
        conflicts: Vec::new(),
        counts,
        next_change: timers.into_iter().filter(|t| *t > now).min(),
    }
}

fn wind_down_step(
    node: Option<&NodeView>,
    lease: &LeaseView,
    policy: &Policy,
    etcd: &Etcd,
    ending: Ending,
    now: Timestamp,
) -> Action {
    let failure = lease
        .failure
        .clone()
        .or_else(|| node.and_then(|n| n.failure.clone()));
    if let (Some(reason), Ending::InvalidSpec) = (&failure, ending) {
        return Action::Skip(Skip::Failed(reason.clone()));
    }
    let Some(node) = node else {
        return Action::Release(ReleaseReason::NodeDeleted);
    };
    let why = match ending {
        Ending::InvalidSpec => "the policy's spec is invalid",
        Ending::Deleted => "the policy is being deleted",
    };
    if failure.is_some() {
        return Action::Abort {
            reason: format!("{why}: its failure record goes with it"),
        };
    }
    if may_be_rebooting(node, lease) {
        return held(Some(node), lease, policy, etcd, now);
    }
    Action::Abort {
        reason: format!("{why}: ending the grant before the reboot"),
    }
}

/// Whether the node may be rebooting now or has rebooted under this lease: it was
/// drained and given the grant, or it runs a boot other than the granted one, or it
/// is already done. Such a grant cannot be taken back; its reboot finishes first.
fn may_be_rebooting(node: &NodeView, lease: &LeaseView) -> bool {
    let granted = lease.granted_boot_id.as_ref();
    let allowed = lease.drained.is_some() && node.agent.reboot_ok.as_ref() == granted;
    let booted_new = node.agent.boot_id.is_some() && node.agent.boot_id.as_ref() != granted;
    lease.done.is_some() || allowed || booted_new
}

fn human(d: jiff::SignedDuration) -> String {
    crds::duration::format(d.unsigned_abs())
}

fn missing(node: &NodeView, hook: &HookRule) -> Vec<String> {
    hook.annotations
        .iter()
        .filter(|a| !node.true_annotations.contains(*a))
        .cloned()
        .collect()
}
