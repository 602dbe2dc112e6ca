//! Observation: the snapshot `rollout::decide` needs, from the operator's caches
//! through [`Cluster`], plus the two things that are not watched: the pods that block
//! a node (listed only while some node asks for a reboot) and the Prometheus alert
//! gate.

use std::collections::BTreeMap;

use kube::ResourceExt;
use tracing::warn;

use rollout::{Policy, Snapshot};

use crate::{cluster::Cluster, error::Result};

/// The snapshot from the caches alone, for the policy `rules`, on an operator running
/// on `operator_node`.
pub fn snapshot<C: Cluster>(c: &C, rules: &Policy, operator_node: Option<String>) -> Snapshot {
    let (nodes, leases, policies) = (c.nodes(), c.leases(), c.policies());
    let (snapshot, malformed) = Snapshot::from_views(
        nodes
            .iter()
            .map(|n| std::sync::Arc::clone(&n.view))
            .collect(),
        leases.iter().map(|l| l.as_ref()),
        policies.iter().map(|p| p.as_ref()),
        &rules.name,
        operator_node,
    );
    for (lease, e) in malformed {
        warn!(%lease, error = %e, "malformed lease annotation");
    }
    snapshot
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
    let mut blocking: BTreeMap<String, String> = BTreeMap::new();
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
    Ok(snapshot.mark_blocked(&blocking))
}
