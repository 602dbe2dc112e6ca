//! Control-plane nodes in a rollout: one at a time whatever the budget, in the place
//! the policy gives them (after the workers by default), alone when a cluster has only
//! one, and only while etcd keeps quorum without them ([`crate::etcd`]).
//!
//! It must never let two control-plane nodes be down at once, nor start anything while
//! a cluster's only control-plane node (and with it the API server) is down.

use std::collections::{BTreeSet, HashMap};

use crds::ControlPlaneOrder;

use crate::{
    etcd::{self, Etcd},
    plan::Skip,
    policy::Policy,
    snapshot::{LeaseView, NodeView, Snapshot},
};

/// Whether `node` is a control-plane node: labelled so, or running an etcd member.
pub fn is_control_plane(node: &NodeView, etcd: &Etcd) -> bool {
    etcd::is_control_plane(&node.labels) || etcd.member_of(&node.name).is_some()
}

/// What the rules need to know, gathered once per decision.
#[derive(Debug)]
pub struct Guard<'a> {
    /// Control-plane nodes: labelled so, or running an etcd member.
    control_plane: BTreeSet<&'a str>,
    /// Control-plane nodes down or in flight (holding any policy's lease, or not Ready).
    down: BTreeSet<&'a str>,
    /// Nodes holding any lease.
    leased: BTreeSet<&'a str>,
    /// The pool's workers still to update (asking for a reboot, or in flight here).
    /// Workers held back by an admin (paused, cordoned by someone else), failed or with
    /// malformed annotations do not count: they would hold the control-plane nodes
    /// until someone acts on them.
    workers_pending: usize,
    /// The pool's control-plane nodes still to update.
    control_plane_pending: usize,
    order: ControlPlaneOrder,
    etcd: &'a Etcd,
}

impl<'a> Guard<'a> {
    /// The guard for `policy`'s `pool` in `snapshot`.
    pub fn new(
        snapshot: &'a Snapshot,
        policy: &Policy,
        pool: &[&'a NodeView],
        leases_by_node: &HashMap<&str, &LeaseView>,
    ) -> Guard<'a> {
        let control_plane: BTreeSet<&str> = snapshot
            .nodes
            .iter()
            .filter(|n| is_control_plane(n, &snapshot.etcd))
            .map(|n| n.name.as_str())
            .collect();
        let leased: BTreeSet<&str> = snapshot.leases.iter().map(|l| l.node.as_str()).collect();
        let down = snapshot
            .nodes
            .iter()
            .filter(|n| control_plane.contains(n.name.as_str()))
            .filter(|n| !n.ready || leased.contains(n.name.as_str()))
            .map(|n| n.name.as_str())
            .collect();
        let pending = |cp: bool| {
            pool.iter()
                .filter(|n| control_plane.contains(n.name.as_str()) == cp)
                .filter(|n| {
                    leases_by_node
                        .get(n.name.as_str())
                        .is_some_and(|l| l.policy == policy.name && l.failure.is_none())
                        || (n.requests_reboot()
                            && !n.paused
                            && !n.failed()
                            && (!n.unschedulable || n.cordoned_by_baton)
                            && n.malformed.is_empty())
                })
                .count()
        };
        Guard {
            workers_pending: pending(false),
            control_plane_pending: pending(true),
            control_plane,
            down,
            leased,
            order: policy.control_plane,
            etcd: &snapshot.etcd,
        }
    }

    /// Whether `pool` has a control-plane node.
    pub fn has_control_plane(&self, pool: &[&NodeView]) -> bool {
        pool.iter().any(|n| self.is_control_plane(&n.name))
    }

    /// Whether `node` is a control-plane node.
    pub fn is_control_plane(&self, node: &str) -> bool {
        self.control_plane.contains(node)
    }

    /// The cluster's only control-plane node, when it has exactly one.
    fn sole(&self) -> Option<&'a str> {
        (self.control_plane.len() == 1)
            .then(|| self.control_plane.first().copied())
            .flatten()
    }

    /// Whether `node` may be granted now, as far as control-plane rules go.
    pub fn check(&self, node: &str) -> Result<(), Skip> {
        if let Some(sole) = self.sole().filter(|s| *s != node)
            && self.leased.contains(sole)
        {
            return Err(Skip::ControlPlane(format!(
                "{sole}, the only control-plane node, is updating: nothing else starts while the API server is down"
            )));
        }
        if !self.is_control_plane(node) {
            if self.order == ControlPlaneOrder::First && self.control_plane_pending > 0 {
                return Err(Skip::ControlPlane(format!(
                    "control-plane nodes go first ({} still to update)",
                    self.control_plane_pending
                )));
            }
            return Ok(());
        }
        if let Some(other) = self.down.iter().find(|n| **n != node) {
            return Err(Skip::ControlPlane(format!(
                "control-plane node {other} is down or updating: control-plane nodes go one at a time"
            )));
        }
        if self.order == ControlPlaneOrder::Last && self.workers_pending > 0 {
            return Err(Skip::ControlPlane(format!(
                "workers go first ({} still to update)",
                self.workers_pending
            )));
        }
        if self.sole() == Some(node) {
            let others = self.leased.iter().filter(|n| **n != node).count();
            if others > 0 {
                return Err(Skip::ControlPlane(format!(
                    "the only control-plane node goes alone ({others} other node(s) in flight)"
                )));
            }
        }
        self.etcd.may_go_down(node).map_err(Skip::Etcd)
    }

    /// Records a grant made in this decision.
    pub fn granted(&mut self, node: &'a str) {
        if self.is_control_plane(node) {
            self.down.insert(node);
        }
        self.leased.insert(node);
    }
}
