//! What the decision core returns: one action per node, each with its reason, and the
//! earliest moment the decision can change.

use std::fmt;

use jiff::{SignedDuration, Timestamp};

use crds::{
    OnTimeout,
    protocol::{BootId, ReleaseRef, Version},
};

use crate::window::WindowState;

/// The etcd quorum guard, as a plan reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdGuard {
    /// What it sees, in words (members healthy, external etcd, not observed).
    pub summary: String,
    /// The first control-plane node it holds, and why.
    pub hold: Option<(String, crate::etcd::Hold)>,
}

/// The decision for one policy at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The policy's name.
    pub policy: String,
    /// One entry per node in the pool or holding one of the policy's leases, in the
    /// order the rollout takes them.
    pub nodes: Vec<NodePlan>,
    /// Nodes holding one of the policy's leases after this plan (released ones excluded,
    /// new grants included).
    pub holders: Vec<String>,
    /// The budget and how much of it is used.
    pub budget: BudgetUse,
    /// The maintenance windows now.
    pub window: WindowState,
    /// Why the pool is halted, if it is.
    pub halted: Option<String>,
    /// Why a cluster-wide health gate holds new grants back, if one does.
    pub gate: Option<String>,
    /// Set when `spec.urgency`'s deadline has passed with nodes not yet updated: what
    /// no longer gates them.
    pub urgent: Option<String>,
    /// For a pool with control-plane nodes: what the etcd quorum guard sees, and the
    /// first hold it puts on one of them, if any.
    pub etcd: Option<EtcdGuard>,
    /// Nodes that another policy also selects; neither policy touches them.
    pub conflicts: Vec<Conflict>,
    /// Counts for the status.
    pub counts: Counts,
    /// The earliest moment at which this plan can change without any watch event: a
    /// window edge, a timeout or the end of a settle time. `None`: only events matter.
    pub next_change: Option<Timestamp>,
}

/// One node's next step.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// The node.
    pub node: String,
    /// What to do.
    pub action: Action,
    /// The node and lease as the decision saw them: a step writes on these versions,
    /// so a write on an object that changed since fails instead of acting on facts the
    /// decision never saw.
    pub seen: Seen,
}

/// The objects a decision was made on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The node, when it exists.
    pub node: Option<NodeFacts>,
    /// Its reboot lease, when it holds one.
    pub lease: Option<LeaseFacts>,
}

/// What a step needs to know of a node besides the action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The resourceVersion the decision saw.
    pub resource_version: Option<String>,
    /// Baton cordoned it.
    pub cordoned_by_baton: bool,
    /// Baton added the load-balancer exclusion label.
    pub lb_excluded: bool,
    /// It carries a grant (`reboot-ok`).
    pub reboot_ok: bool,
    /// Its hook labels are set (before, after).
    pub hook_labels: (bool, bool),
}

/// A reboot lease as the decision saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFacts {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: Option<String>,
    /// The resourceVersion the decision saw.
    pub resource_version: Option<String>,
}

impl Seen {
    /// The objects `node` and `lease` (either may be absent).
    pub fn of(node: Option<&crate::NodeView>, lease: Option<&crate::LeaseView>) -> Seen {
        Seen {
            node: node.map(|n| NodeFacts {
                resource_version: n.resource_version.clone(),
                cordoned_by_baton: n.cordoned_by_baton,
                lb_excluded: n.lb_excluded,
                reboot_ok: n.agent.reboot_ok.is_some(),
                hook_labels: (
                    n.labels.contains_key(crds::protocol::BEFORE_REBOOT.name),
                    n.labels.contains_key(crds::protocol::AFTER_REBOOT.name),
                ),
            }),
            lease: lease.map(|l| LeaseFacts {
                name: l.name.clone(),
                uid: l.uid.clone(),
                resource_version: l.resource_version.clone(),
            }),
        }
    }
}

/// How long after its decision a grant that takes a released slot may still be made:
/// `decide` offers a released slot only while the window stays open (and, in `Fit`
/// mode, the disruption still fits) this much longer, and the operator drops the grant
/// when its release took longer than that.
pub const TAKEOVER_WITHIN: SignedDuration = SignedDuration::from_secs(30);

/// How the budget is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetUse {
    /// `maxUnavailable` resolved against the pool size.
    pub limit: usize,
    /// Pool nodes unavailable before this plan's grants (leased, NotReady, cordoned, failed).
    pub unavailable: usize,
    /// Grants in this plan.
    pub granted: usize,
    /// Of those, the grants that take the slot of a node this plan releases (each
    /// performed only after its release): they add nothing to what is disrupted.
    pub taken_over: usize,
}

impl BudgetUse {
    /// How much of the budget this decision counts as used: the unavailable nodes (a
    /// node being released still counts until its release is seen) and the new
    /// disruptions (a grant that takes a released slot adds none).
    pub fn used(&self) -> usize {
        (self.unavailable + self.granted).saturating_sub(self.taken_over)
    }
}

/// Counts for `UpdatePolicy.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Nodes selected.
    pub nodes: u32,
    /// Nodes with nothing left to do.
    pub up_to_date: u32,
    /// Nodes that need an update and have not started.
    pub waiting: u32,
    /// Nodes between grant and release, not failed.
    pub in_progress: u32,
    /// Failed nodes.
    pub failed: u32,
}

/// A node selected by more than one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The node.
    pub node: String,
    /// The other policies selecting it.
    pub others: Vec<String>,
}

/// The next step for one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create its reboot lease: it may start its disruption. The same step cordons it
    /// (what the next decision would do first) and, with no before-reboot hook to wait
    /// for, records the drain's start on the Lease and starts the drain.
    Grant {
        /// The boot the grant applies to.
        boot_id: BootId,
        /// The version the node staged; its reboot must land on it.
        target_version: Option<Version>,
        /// Whether the drain starts in the same step (no before-reboot hook).
        drain: bool,
        /// The node whose release, in this same plan, frees the slot this grant takes:
        /// the grant is performed right after that release succeeded, and not at all
        /// when it failed. `None` for a grant on the budget's free room.
        after: Option<String>,
    },
    /// Cordon it, recording that baton did.
    Cordon,
    /// Label it for the before-reboot hooks and wait for their annotations.
    RunBeforeHooks {
        /// Annotations still missing.
        missing: Vec<String>,
        /// When the wait fails the node.
        deadline: Timestamp,
    },
    /// Evict its pods, within the deadline (set when the drain starts: the step that
    /// records the start also starts the eviction).
    Drain {
        /// When the drain's time is up; `None` until it has started.
        deadline: Option<Timestamp>,
    },
    /// The drain outlived its timeout: apply `onTimeout`.
    DrainTimedOut(OnTimeout),
    /// Publish the policy's release on the node, for its agent to stage (never a
    /// disruption).
    Publish {
        /// The version.
        version: Version,
        /// Its image, for the A/B backend.
        release: Option<ReleaseRef>,
    },
    /// Tell the agent it may reboot out of this boot.
    AllowReboot {
        /// The boot the grant names.
        boot_id: BootId,
    },
    /// Move etcd leadership away from the member on this node before it reboots: its
    /// member leads, and a reboot would cost an election.
    MoveLeader {
        /// The leading member's name.
        from: String,
        /// Its client URL, where the transfer is asked for.
        leader_url: String,
        /// The member to take over.
        to: String,
        /// Its member ID.
        to_id: u64,
    },
    /// Wait for etcd: quorum would not hold with this node down, or its member has not
    /// rejoined and caught up since the reboot.
    WaitForEtcd {
        /// What etcd is waited on for.
        hold: crate::etcd::Hold,
        /// When waiting fails the node (the reboot's bound).
        deadline: Timestamp,
    },
    /// Wait for the node to come back Ready on the new version.
    WaitForReboot {
        /// When waiting fails the node.
        deadline: Timestamp,
    },
    /// Label it for the after-reboot hooks and wait for their annotations.
    RunAfterHooks {
        /// Annotations still missing.
        missing: Vec<String>,
        /// When the wait fails the node.
        deadline: Timestamp,
    },
    /// Finish it: it is back on the new version and verified. One write to the node
    /// takes baton's marks off (and baton's cordon, when `uncordon`: only a cordon
    /// baton made); then the lease is deleted at once when `release` (no settle time),
    /// or marked done, and the settle time starts.
    Finish {
        /// Baton cordoned it and it is still cordoned.
        uncordon: bool,
        /// No settle time: the slot is released in the same step.
        release: bool,
    },
    /// Wait for the settle time to pass before releasing the slot.
    Settle {
        /// When the lease may be released.
        until: Timestamp,
    },
    /// Delete its lease.
    Release(ReleaseReason),
    /// Mark it failed (it keeps its lease, and its slot, until an admin retries it).
    /// The grant ends with it: `baton.dev/reboot-ok` goes in the same write.
    Fail {
        /// Why.
        reason: String,
    },
    /// End its grant before its reboot: stop the drain, undo what baton did to the node
    /// (its cordon, the load-balancer label, the hook labels, the grant and, when the
    /// policy is deleted, its failure mark), then delete its lease.
    Abort {
        /// Why.
        reason: String,
    },
    /// Undo baton's cordon (and the load-balancer label) and a `reboot-ok` on a node
    /// that no reboot Lease holds: a grant ended while a step of it was in flight (an
    /// admin's retry deleted the Lease under a reconcile that still saw it). The step
    /// reads the Lease fresh first and does nothing if it exists. A failure mark stays.
    ClearStaleGrant,
    /// Nothing to do now.
    Skip(Skip),
}

/// Why a lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The node is done and settled.
    Done,
    /// The node no longer exists.
    NodeDeleted,
}

/// Why nothing happens to a node now.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// On the target, nothing requested.
    UpToDate,
    /// Its agent is working (staging, or has not reported); no reboot requested yet.
    NotRequested(String),
    /// The policy is paused.
    PolicyPaused,
    /// An admin paused this node.
    NodePaused,
    /// The pool is halted.
    Halted,
    /// A freeze is in force (described).
    Frozen(String),
    /// No window is open; the next opens then.
    OutsideWindow(Option<Timestamp>),
    /// A window is open, but closes before the longest disruption would end
    /// (`windowMode: Fit`): hooks, drain and reboot, each at its bound.
    WindowTooShort(Timestamp),
    /// The budget is used up.
    Budget,
    /// Another zone is in progress.
    OtherZone(String),
    /// Its zone has `maxUnavailablePerZone` nodes disrupted.
    ZoneBudget(String),
    /// Someone other than baton cordoned it; baton leaves it alone.
    CordonedByOthers,
    /// It is not Ready.
    NotReady,
    /// A blocking pod runs on it.
    Blocked(String),
    /// A cluster-wide gate is closed.
    Gate(String),
    /// Its `baton.dev/*` annotations are malformed.
    Malformed(Vec<String>),
    /// Another policy selects it too.
    Conflict(Vec<String>),
    /// It failed; an admin must retry it.
    Failed(String),
    /// A control-plane rule holds it: one at a time, workers first, or the only
    /// control-plane node alone.
    ControlPlane(String),
    /// The etcd quorum guard holds it.
    Etcd(crate::etcd::Hold),
    /// Its upstream pool has not completed and soaked the version (`spec.promotion`).
    Promotion(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Grant { drain: false, .. } => {
                write!(f, "grant: start the disruption (and cordon)")
            }
            Action::Grant { drain: true, .. } => {
                write!(f, "grant: start the disruption (cordon and drain)")
            }
            Action::Cordon => write!(f, "cordon"),
            Action::RunBeforeHooks { missing, deadline } => {
                write!(
                    f,
                    "wait for before-reboot hooks ({}) until {deadline}",
                    missing.join(", ")
                )
            }
            Action::Drain { deadline: Some(d) } => write!(f, "drain until {d}"),
            Action::Drain { deadline: None } => write!(f, "start the drain"),
            Action::DrainTimedOut(on) => write!(f, "drain timed out: {on:?}"),
            Action::Publish { version, .. } => write!(f, "publish release {version}"),
            Action::AllowReboot { .. } => write!(f, "allow the reboot"),
            Action::MoveLeader { from, to, .. } => {
                write!(f, "move etcd leadership from {from} to {to}")
            }
            Action::WaitForEtcd { hold, deadline } => {
                write!(f, "wait for etcd until {deadline}: {hold}")
            }
            Action::WaitForReboot { deadline } => write!(f, "wait for the reboot until {deadline}"),
            Action::RunAfterHooks { missing, deadline } => {
                write!(
                    f,
                    "wait for after-reboot hooks ({}) until {deadline}",
                    missing.join(", ")
                )
            }
            Action::Finish { uncordon, release } => write!(
                f,
                "{}mark done{}",
                if *uncordon { "uncordon, " } else { "" },
                if *release { ", release" } else { "" }
            ),
            Action::Settle { until } => write!(f, "settle until {until}"),
            Action::Release(ReleaseReason::Done) => write!(f, "release: done"),
            Action::Release(ReleaseReason::NodeDeleted) => write!(f, "release: node deleted"),
            Action::Fail { reason } => write!(f, "fail: {reason}"),
            Action::Abort { reason } => write!(f, "end the grant: {reason}"),
            Action::ClearStaleGrant => write!(f, "undo baton's cordon: no Lease holds the node"),
            Action::Skip(skip) => write!(f, "skip: {skip}"),
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::UpToDate => write!(f, "up to date"),
            Skip::NotRequested(why) => write!(f, "no reboot requested ({why})"),
            Skip::PolicyPaused => write!(f, "policy paused"),
            Skip::NodePaused => write!(f, "node paused"),
            Skip::Halted => write!(f, "pool halted"),
            Skip::Frozen(freeze) => write!(f, "frozen: {freeze}"),
            Skip::OutsideWindow(Some(t)) => {
                write!(f, "outside the maintenance window; next opens {t}")
            }
            Skip::OutsideWindow(None) => write!(
                f,
                "outside the maintenance window; none opens within 5 years"
            ),
            Skip::WindowTooShort(c) => write!(
                f,
                "the window closes at {c}, before the hooks, drain.timeout and rebootTimeout would end (windowMode: Fit)"
            ),
            Skip::Budget => write!(f, "maxUnavailable reached"),
            Skip::OtherZone(z) => write!(f, "zone {z:?} is in progress"),
            Skip::ZoneBudget(z) => write!(f, "maxUnavailablePerZone reached in zone {z:?}"),
            Skip::CordonedByOthers => write!(f, "cordoned by someone else"),
            Skip::NotReady => write!(f, "not Ready"),
            Skip::Blocked(why) => write!(f, "blocked by {why}"),
            Skip::Gate(why) => write!(f, "gate closed: {why}"),
            Skip::Malformed(errors) => write!(f, "malformed annotations: {}", errors.join("; ")),
            Skip::Conflict(others) => write!(f, "also selected by {}", others.join(", ")),
            Skip::Failed(why) => write!(f, "failed: {why}"),
            Skip::ControlPlane(why) => write!(f, "{why}"),
            Skip::Etcd(hold) => write!(f, "etcd quorum guard: {hold}"),
            Skip::Promotion(why) => write!(f, "{why}"),
        }
    }
}

impl Action {
    /// Whether performing this action does anything: waits and skips do nothing, so a
    /// pass over 10,000 idle nodes performs nothing.
    pub fn acts(&self) -> bool {
        !matches!(
            self,
            Action::WaitForReboot { .. }
                | Action::WaitForEtcd { .. }
                | Action::Settle { .. }
                | Action::Skip(_)
        )
    }

    /// Whether this action gives the node's slot back (its lease is deleted).
    pub fn releases(&self) -> bool {
        matches!(
            self,
            Action::Release(_) | Action::Finish { release: true, .. }
        )
    }

    /// Whether this action ends a node's update, done: its slot is released after it
    /// was verified (not because it was deleted).
    pub fn completes(&self) -> bool {
        matches!(
            self,
            Action::Release(ReleaseReason::Done) | Action::Finish { release: true, .. }
        )
    }

    /// Whether this action starts a new disruption.
    pub fn is_grant(&self) -> bool {
        matches!(self, Action::Grant { .. })
    }

    /// The node whose release this grant waits on, when it takes that node's slot.
    pub fn after(&self) -> Option<&str> {
        match self {
            Action::Grant { after, .. } => after.as_deref(),
            _ => None,
        }
    }

    /// The deadline or timer this action waits on, if any.
    pub fn timer(&self) -> Option<Timestamp> {
        match self {
            Action::RunBeforeHooks { deadline, .. }
            | Action::WaitForReboot { deadline }
            | Action::WaitForEtcd { deadline, .. }
            | Action::RunAfterHooks { deadline, .. } => Some(*deadline),
            Action::Drain { deadline } => *deadline,
            Action::Settle { until } => Some(*until),
            _ => None,
        }
    }
}

impl Plan {
    /// The plan for one node, if it is in this plan (its step, not its publishing).
    pub fn node(&self, name: &str) -> Option<&Action> {
        self.nodes
            .iter()
            .find(|n| n.node == name && !matches!(n.action, Action::Publish { .. }))
            .map(|n| &n.action)
    }

    /// The nodes the policy's release is published on in this plan.
    pub fn publishes(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.action, Action::Publish { .. }))
            .map(|n| n.node.as_str())
    }

    /// The nodes granted in this plan.
    pub fn grants(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|n| n.action.is_grant())
            .map(|n| n.node.as_str())
    }
}
