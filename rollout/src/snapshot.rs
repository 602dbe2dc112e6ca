//! What the cluster looks like at one moment, as the decision core sees it.
//!
//! Views are built from Nodes and Leases by [`NodeView::from_node`] and
//! [`LeaseView::from_lease`]; malformed `baton.dev/*` values are kept as reports and
//! never trusted.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};

use crds::{
    AgentState, ProtocolError,
    node::NodeMarks,
    protocol::{self, BootId, Key, Value, Version},
};

use crate::selector::Selector;

/// The observed cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every node. Shared: the operator keeps each node's view between reconciles and
    /// builds it again only when the node changes.
    pub nodes: Vec<Arc<NodeView>>,
    /// Every baton reboot lease.
    pub leases: Vec<LeaseView>,
    /// The node the operator runs on; it goes last.
    pub operator_node: Option<String>,
    /// The other valid policies' selectors, to detect nodes claimed twice.
    pub other_policies: Vec<(String, Selector)>,
    /// Why a cluster-wide gate (the Prometheus alert gate) blocks new grants, if it does.
    pub gate: Option<String>,
    /// The etcd members, for the quorum guard.
    pub etcd: crate::etcd::Etcd,
    /// The upstream pool, when the policy is promoted after another.
    pub upstream: Option<crate::promotion::Upstream>,
}

/// One node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created; older nodes go first.
    pub created: Option<Timestamp>,
    /// `Ready=True`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned, by anyone).
    pub unschedulable: bool,
    /// The resourceVersion it was observed at.
    pub resource_version: Option<String>,
    /// Baton cordoned it (`baton.dev/cordoned=true`).
    pub cordoned_by_baton: bool,
    /// Baton added the load-balancer exclusion label.
    pub lb_excluded: bool,
    /// An admin paused it (`baton.dev/paused=true`).
    pub paused: bool,
    /// An admin asked its agent to retry the failed boot this names (`baton.dev/retry`).
    pub retry: Option<BootId>,
    /// The operator marked it failed, with the reason.
    pub failure: Option<String>,
    /// What its agent reports.
    pub agent: AgentView,
    /// Annotation keys whose value is `"true"` (hook answers).
    pub true_annotations: BTreeSet<String>,
    /// A pod matching a blocking selector runs on it (the operator fills this in).
    pub blocked_by: Option<String>,
    /// `baton.dev/*` values that did not parse.
    pub malformed: Vec<ProtocolError>,
    /// The release version the operator last published on it.
    pub desired_version: Option<Version>,
    /// The release image the operator last published on it.
    pub desired_release: Option<protocol::ReleaseRef>,
}

/// The agent's report on its node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentView {
    /// Its state; `None` when it has not reported one.
    pub state: Option<AgentState>,
    /// The version running now.
    pub current_version: Option<Version>,
    /// The version staged.
    pub target_version: Option<Version>,
    /// The boot it runs under.
    pub boot_id: Option<BootId>,
    /// It asks for a reboot.
    pub reboot_required: bool,
    /// The operator's grant, naming the boot it applies to.
    pub reboot_ok: Option<BootId>,
    /// Its message.
    pub message: Option<String>,
}

/// One reboot lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// The lease object's name.
    pub name: String,
    /// Its uid.
    pub uid: Option<String>,
    /// The resourceVersion it was observed at.
    pub resource_version: Option<String>,
    /// The node holding it.
    pub node: String,
    /// The policy that granted it.
    pub policy: String,
    /// When it was granted.
    pub acquired: Timestamp,
    /// The node's boot id at the grant.
    pub granted_boot_id: Option<BootId>,
    /// The version the node had staged at the grant.
    pub target_version: Option<Version>,
    /// When the drain started.
    pub drain_started: Option<Timestamp>,
    /// When the drain finished.
    pub drained: Option<Timestamp>,
    /// When the node was verified done.
    pub done: Option<Timestamp>,
    /// Why the node failed, if it did.
    pub failure: Option<String>,
}

impl Snapshot {
    /// The snapshot of `nodes` and `leases` (baton's reboot Leases) for the policy named
    /// `own`, with the other live policies' selectors (to find nodes claimed twice).
    /// Returns the malformed Lease annotations beside it, as (Lease, error): reported,
    /// never trusted.
    pub fn from_objects<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        leases: impl IntoIterator<Item = &'a Lease>,
        policies: impl IntoIterator<Item = &'a crds::UpdatePolicy>,
        own: &str,
        operator_node: Option<String>,
    ) -> (Snapshot, Vec<(String, ProtocolError)>) {
        Snapshot::from_views(
            nodes
                .into_iter()
                .map(|n| Arc::new(NodeView::from_node(n)))
                .collect(),
            leases,
            policies,
            own,
            operator_node,
        )
    }

    /// [`Snapshot::from_objects`] with the nodes' views already built.
    pub fn from_views<'a>(
        nodes: Vec<Arc<NodeView>>,
        leases: impl IntoIterator<Item = &'a Lease>,
        policies: impl IntoIterator<Item = &'a crds::UpdatePolicy>,
        own: &str,
        operator_node: Option<String>,
    ) -> (Snapshot, Vec<(String, ProtocolError)>) {
        let mut malformed = Vec::new();
        let mut views = Vec::new();
        for lease in leases {
            let (view, errors) = LeaseView::from_lease(lease);
            let name = lease.metadata.name.clone().unwrap_or_default();
            malformed.extend(errors.into_iter().map(|e| (name.clone(), e)));
            views.extend(view);
        }
        let policies: Vec<&crds::UpdatePolicy> = policies.into_iter().collect();
        let upstream = crate::promotion::upstream(own, policies.iter().copied());
        // A policy being deleted claims no node any more (its Leases still hold theirs).
        let other_policies = policies
            .into_iter()
            .filter(|p| {
                p.metadata.name.as_deref() != Some(own) && p.metadata.deletion_timestamp.is_none()
            })
            .filter_map(|p| {
                Some((
                    p.metadata.name.clone()?,
                    Selector::compile(&p.spec.node_selector).ok()?,
                ))
            })
            .collect();
        let snapshot = Snapshot {
            nodes,
            leases: views,
            operator_node,
            other_policies,
            gate: None,
            etcd: crate::etcd::Etcd::default(),
            upstream,
        };
        (snapshot, malformed)
    }

    /// Marks the nodes that ask for a reboot and run a blocking pod (`blocking`: node
    /// name to `pod namespace/name`). Returns whether any is blocked.
    pub fn mark_blocked(&mut self, blocking: &BTreeMap<String, String>) -> bool {
        let mut any = false;
        for node in self.nodes.iter_mut().filter(|n| n.requests_reboot()) {
            let blocked_by = blocking.get(&node.name).cloned();
            any |= blocked_by.is_some();
            if node.blocked_by != blocked_by {
                Arc::make_mut(node).blocked_by = blocked_by;
            }
        }
        any
    }
}

impl NodeView {
    /// Whether this node asks for a reboot: state `RebootRequired` and the flag set.
    pub fn requests_reboot(&self) -> bool {
        self.agent.reboot_required && self.agent.state == Some(AgentState::RebootRequired)
    }

    /// Whether the node failed: the operator marked it, or its agent reports a failed
    /// update that no admin retry is waiting on.
    pub fn failed(&self) -> bool {
        self.failure.is_some() || self.agent_failure().is_some()
    }

    /// The agent's own failure report, unless an admin's retry names the boot it is
    /// for (the agent is about to drop it).
    pub fn agent_failure(&self) -> Option<AgentState> {
        let retrying = self.retry.is_some() && self.retry == self.agent.boot_id;
        self.agent.state.filter(|s| s.is_failure() && !retrying)
    }

    /// The node's zone under `label`, or `""` when it has none.
    pub fn zone<'a>(&'a self, label: &str) -> &'a str {
        self.labels.get(label).map(String::as_str).unwrap_or("")
    }

    /// Builds the view of a Node.
    pub fn from_node(node: &Node) -> NodeView {
        NodeView::from_marks(NodeMarks::read(node))
    }

    /// Builds the view of a Node's marks.
    pub fn from_marks(m: NodeMarks) -> NodeView {
        NodeView {
            resource_version: m.resource_version,
            cordoned_by_baton: m.cordoned,
            lb_excluded: m.lb_excluded,
            agent: AgentView {
                state: m.agent.state,
                current_version: m.agent.current_version,
                target_version: m.agent.target_version,
                boot_id: m.agent.boot_id,
                reboot_required: m.agent.reboot_required,
                reboot_ok: m.reboot_ok,
                message: m.agent.message,
            },
            name: m.name,
            labels: m.labels,
            created: m.created,
            ready: m.ready,
            unschedulable: m.unschedulable,
            paused: m.paused,
            retry: m.retry,
            failure: m.failure,
            true_annotations: m.true_annotations,
            blocked_by: None,
            malformed: m.malformed,
            desired_version: m.desired_version,
            desired_release: m.desired_release,
        }
    }
}

impl LeaseView {
    /// Builds the view of a baton reboot Lease. A lease whose `baton.dev/*` values are
    /// malformed is still tracked: the errors come back beside it.
    pub fn from_lease(lease: &Lease) -> (Option<LeaseView>, Vec<ProtocolError>) {
        let meta = &lease.metadata;
        let annotations = meta.annotations.as_ref();
        let mut errors = Vec::new();
        let policy = read(&protocol::lease::POLICY, annotations, &mut errors).map(|m| m.0);
        let spec = lease.spec.as_ref();
        let Some(node) = spec.and_then(|s| s.holder_identity.clone()) else {
            return (None, errors);
        };
        let acquired = spec
            .and_then(|s| s.acquire_time.as_ref())
            .map(|t| t.0)
            .or_else(|| meta.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let view = LeaseView {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            node,
            policy: policy.unwrap_or_default(),
            acquired,
            granted_boot_id: read(&protocol::lease::GRANTED_BOOT_ID, annotations, &mut errors),
            target_version: read(&protocol::lease::TARGET_VERSION, annotations, &mut errors),
            drain_started: read(&protocol::lease::DRAIN_STARTED_AT, annotations, &mut errors),
            drained: read(&protocol::lease::DRAINED_AT, annotations, &mut errors),
            done: read(&protocol::lease::DONE_AT, annotations, &mut errors),
            failure: read(&protocol::lease::FAILURE, annotations, &mut errors).map(|m| m.0),
        };
        (Some(view), errors)
    }
}

fn read<T: Value>(
    key: &Key<T>,
    map: Option<&BTreeMap<String, String>>,
    errors: &mut Vec<ProtocolError>,
) -> Option<T> {
    key.read(map).map_err(|e| errors.push(e)).ok().flatten()
}
