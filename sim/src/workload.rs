//! Workloads: Deployments' pods spread over the nodes, each app under a
//! PodDisruptionBudget, and the ReplicaSet controller that replaces an evicted or
//! deleted pod on another schedulable node after a while (so a budget that refused an
//! eviction allows it once the replacement runs).

use std::time::Duration;

use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::ResourceExt;

use crate::world::Sim;

/// The namespace of the workloads.
pub const NAMESPACE: &str = "app";

/// A Running pod of `app` on `node`.
pub fn pod(app: &str, name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/app:1"}]},
        "status": {"phase": "Running"},
    }))
    .unwrap_or_default()
}

/// A budget over `app`: at least `min_available` pods (`None`: never any disruption).
pub fn budget(app: &str, min_available: Option<i32>) -> PodDisruptionBudget {
    let spec = match min_available {
        Some(n) => {
            serde_json::json!({"minAvailable": n, "selector": {"matchLabels": {"app": app}}})
        }
        None => serde_json::json!({"maxUnavailable": 0, "selector": {"matchLabels": {"app": app}}}),
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": app, "namespace": NAMESPACE},
        "spec": spec,
    }))
    .unwrap_or_default()
}

/// The ReplicaSet controller: a pod of an app that went is replaced, after 1-4 s, on a
/// schedulable Ready node other than the one it left.
pub fn replace(sim: &Sim, gone: Pod) {
    let Some(app) = gone.labels().get("app").cloned() else {
        return;
    };
    let left = gone
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let delay = {
        let mut w = sim.lock();
        Duration::from_secs(1) + w.jitter(Duration::from_secs(3))
    };
    let s = sim.clone();
    sim.rt.spawn(async move {
        s.rt.sleep(delay).await;
        let mut w = s.lock();
        let candidates: Vec<String> = w
            .api
            .nodes
            .values()
            .filter(|n| n.name_any() != left)
            .filter(|n| {
                !n.spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
            })
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .map(|n| n.name_any())
            .collect();
        if candidates.is_empty() {
            drop(w);
            // Nowhere to go yet: try again later.
            replace(&s, gone);
            return;
        }
        let i = w
            .jitter(Duration::from_millis(candidates.len() as u64 - 1))
            .as_millis() as usize;
        let node = candidates[i].clone();
        let n = w.api.resource_version();
        let name = format!("{app}-{n}");
        let _ = w.api.create_pod(pod(&app, &name, &node));
    });
}
