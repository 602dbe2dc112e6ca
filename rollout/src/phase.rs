//! Where a node is in its update, as the operator and its agent see it together: what
//! `kubectl baton status` shows and `baton_node_state{policy,state}` counts.
//!
//! The agent's own state alone misleads: a node holding a Lease, cordoned and waiting
//! on hooks still reports `RebootRequired`. The phase reads the grant first (Lease,
//! baton's cordon, the hook labels, the reboot grant), then the agent.

use std::fmt;

use crds::protocol::{self, AgentState};

use crate::NodeView;

/// A node's combined phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// No agent report yet.
    Unknown,
    /// Nothing to do: the agent reports no update.
    Idle,
    /// The agent writes the new version into the inactive slot.
    Staging,
    /// Staged and asking for a reboot; no grant yet.
    Waiting,
    /// Paused by an admin (`baton.dev/paused`) while it needs an update.
    Paused,
    /// Granted (it holds a Lease), not yet cordoned.
    Granted,
    /// Cordoned by baton and being drained.
    Draining,
    /// Before-reboot hooks run.
    Hooks,
    /// Allowed to reboot, or rebooting.
    Rebooting,
    /// Booted; the agent checks the new slot and the node's health.
    Verifying,
    /// After-reboot hooks run.
    AfterHooks,
    /// Healthy on the new version; the operator ends the grant.
    Releasing,
    /// On the target version, nothing left to do.
    UpToDate,
    /// Marked failed (by the operator or its agent); halts the pool until a retry.
    Failed,
}

impl Phase {
    /// Every phase, in rollout order.
    pub const ALL: [Phase; 14] = [
        Phase::Unknown,
        Phase::Idle,
        Phase::Staging,
        Phase::Waiting,
        Phase::Paused,
        Phase::Granted,
        Phase::Draining,
        Phase::Hooks,
        Phase::Rebooting,
        Phase::Verifying,
        Phase::AfterHooks,
        Phase::Releasing,
        Phase::UpToDate,
        Phase::Failed,
    ];

    /// The phase of `node`; `lease_held` says whether it holds a reboot Lease.
    pub fn of(node: &NodeView, lease_held: bool) -> Phase {
        let label = |key: &str| node.labels.get(key).is_some_and(|v| v == "true");
        let agent = node.agent.state;
        if node.failed() {
            return Phase::Failed;
        }
        if lease_held {
            return if label(protocol::AFTER_REBOOT.name) {
                Phase::AfterHooks
            } else if agent == Some(AgentState::Done) {
                Phase::Releasing
            } else if agent == Some(AgentState::Verifying) {
                Phase::Verifying
            } else if agent == Some(AgentState::Rebooting) || node.agent.reboot_ok.is_some() {
                Phase::Rebooting
            } else if label(protocol::BEFORE_REBOOT.name) {
                Phase::Hooks
            } else if node.cordoned_by_baton {
                Phase::Draining
            } else {
                Phase::Granted
            };
        }
        match agent {
            None => Phase::Unknown,
            Some(AgentState::RebootRequired) if node.paused => Phase::Paused,
            Some(AgentState::RebootRequired) => Phase::Waiting,
            Some(AgentState::Staging) => Phase::Staging,
            Some(AgentState::Rebooting) => Phase::Rebooting,
            Some(AgentState::Verifying) => Phase::Verifying,
            Some(AgentState::Done) => Phase::UpToDate,
            Some(AgentState::Idle) => Phase::Idle,
            Some(AgentState::RolledBack | AgentState::Failed) => Phase::Failed,
        }
    }

    /// Its name, as shown and as the metric's `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Unknown => "Unknown",
            Phase::Idle => "Idle",
            Phase::Staging => "Staging",
            Phase::Waiting => "Waiting",
            Phase::Paused => "Paused",
            Phase::Granted => "Granted",
            Phase::Draining => "Draining",
            Phase::Hooks => "Hooks",
            Phase::Rebooting => "Rebooting",
            Phase::Verifying => "Verifying",
            Phase::AfterHooks => "AfterHooks",
            Phase::Releasing => "Releasing",
            Phase::UpToDate => "UpToDate",
            Phase::Failed => "Failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::protocol::BootId;

    fn node(state: AgentState) -> NodeView {
        let mut n = NodeView {
            name: "n1".into(),
            ..Default::default()
        };
        n.agent.state = Some(state);
        n.agent.reboot_required = state == AgentState::RebootRequired;
        n
    }

    #[test]
    fn a_granted_node_shows_the_operators_step_not_the_agents_request() {
        let mut n = node(AgentState::RebootRequired);
        assert_eq!(Phase::of(&n, false), Phase::Waiting);
        assert_eq!(Phase::of(&n, true), Phase::Granted);
        n.cordoned_by_baton = true;
        n.unschedulable = true;
        assert_eq!(Phase::of(&n, true), Phase::Draining);
        n.labels
            .insert(protocol::BEFORE_REBOOT.name.into(), "true".into());
        assert_eq!(Phase::of(&n, true), Phase::Hooks);
        n.agent.reboot_ok = Some(BootId::new("b1").unwrap());
        assert_eq!(Phase::of(&n, true), Phase::Rebooting);
        n.agent.state = Some(AgentState::Verifying);
        assert_eq!(Phase::of(&n, true), Phase::Verifying);
        n.labels
            .insert(protocol::AFTER_REBOOT.name.into(), "true".into());
        assert_eq!(Phase::of(&n, true), Phase::AfterHooks);
    }

    #[test]
    fn failure_wins_and_a_paused_node_says_so() {
        let mut n = node(AgentState::RebootRequired);
        n.paused = true;
        assert_eq!(Phase::of(&n, false), Phase::Paused);
        n.failure = Some("drain timed out".into());
        assert_eq!(Phase::of(&n, true), Phase::Failed);
        assert_eq!(
            Phase::of(&node(AgentState::RolledBack), false),
            Phase::Failed
        );
        assert_eq!(Phase::of(&node(AgentState::Done), false), Phase::UpToDate);
        assert_eq!(Phase::of(&node(AgentState::Done), true), Phase::Releasing);
        assert_eq!(Phase::of(&NodeView::default(), false), Phase::Unknown);
    }

    #[test]
    fn names_are_distinct() {
        let names: std::collections::BTreeSet<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names.len(), Phase::ALL.len());
    }
}
