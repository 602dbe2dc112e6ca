//! Observation: the snapshot `rollout::decide` needs, from the operator's caches
//! through [`Cluster`], plus the two things that are not watched: the pods that block
//! a node (listed only while some node asks for a reboot) and the Prometheus alert
//! gate.

use std::collections::HashMap;

use kube::{Resource, ResourceExt};
use tracing::warn;

use rollout::{LeaseView, NodeView, Policy, Snapshot, selector::Selector};

use crate::{cluster::Cluster, error::Result};

/// The snapshot from the caches alone, for the policy `rules`, on an operator running
/// on `operator_node`.
pub fn snapshot<C: Cluster>(c: &C, rules: &Policy, operator_node: Option<String>) -> Snapshot {
    let nodes = c.nodes().iter().map(|n| NodeView::from_node(n)).collect();
    let mut leases = Vec::new();
    for lease in c.leases() {
        let (view, errors) = LeaseView::from_lease(&lease);
        for e in errors {
            warn!(lease = %lease.name_any(), error = %e, "malformed lease annotation");
        }
        leases.extend(view);
    }
    // A policy being deleted claims no node any more (its Leases still hold theirs).
    let other_policies = c
        .policies()
        .iter()
        .filter(|p| p.name_any() != rules.name && p.meta().deletion_timestamp.is_none())
        .filter_map(|p| Some((p.name_any(), Selector::compile(&p.spec.node_selector).ok()?)))
        .collect();
    Snapshot {
        nodes,
        leases,
        operator_node,
        other_policies,
        gate: None,
    }
}

/// Marks the nodes that run a pod matching `health.blockingPodSelectors`, for nodes
/// that ask for a reboot. Returns whether any such node is blocked. Pending pods do
/// not block.
pub async fn mark_blocked<C: Cluster>(
    c: &C,
    rules: &Policy,
    snapshot: &mut Snapshot,
) -> Result<bool> {
    let selectors = &rules.blocking_pod_selectors;
    if selectors.is_empty() || !snapshot.nodes.iter().any(|n| n.requests_reboot()) {
        return Ok(false);
    }
    let mut blocking: HashMap<String, String> = HashMap::new();
    for selector in selectors {
        for pod in c.running_pods(&selector.to_query()).await? {
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
