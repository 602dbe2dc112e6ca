//! Draining a node through the Eviction API: PodDisruptionBudgets are respected, 429s
//! are retried with backoff, the node's pods are listed again every round (new pods can
//! land on it), and the whole drain is bounded by a deadline.
//!
//! It must never evict DaemonSet or mirror pods, pods the policy leaves alone, or the
//! operator's own last replica (which would strand the rollout, FLUO #123).

use std::time::Duration;

use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, EvictParams, ListParams},
};
use tracing::{debug, info, warn};

use rollout::selector::Selector;

use crate::error::Result;

/// What a drain does and does not touch.
#[derive(Debug, Clone)]
pub struct DrainRules {
    /// Pods matching this are left alone.
    pub leave_alone: Option<Selector>,
    /// Evict pods with emptyDir volumes too.
    pub delete_empty_dir_data: bool,
    /// Override of pods' grace period.
    pub grace_period_seconds: Option<i64>,
    /// Evictions in flight at once.
    pub max_parallel: usize,
    /// The operator's own pod (namespace, name): never evicted while it is the last replica.
    pub operator_pod: Option<(String, String)>,
}

impl DrainRules {
    /// A policy's drain rules (the operator adds its own pod to leave alone).
    pub fn from_policy(policy: &rollout::Policy) -> DrainRules {
        DrainRules {
            leave_alone: policy.drain_pod_selector.clone(),
            delete_empty_dir_data: policy.delete_empty_dir_data,
            grace_period_seconds: policy.grace_period_seconds,
            max_parallel: policy.max_parallel_evictions as usize,
            operator_pod: None,
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every pod that had to go is gone.
    Drained,
    /// The deadline passed with these pods still there, each with why.
    TimedOut(Vec<String>),
}

/// Why a pod stays on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stay {
    /// A DaemonSet's pod: it belongs on every node.
    DaemonSet,
    /// A static (mirror) pod.
    Mirror,
    /// The policy's `drain.podSelector` leaves it alone.
    Selected,
    /// The operator itself.
    Operator,
}

/// What the drain does with one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it.
    Stay(Stay),
    /// Evict it.
    Evict,
    /// It uses emptyDir and `deleteEmptyDirData` is off: it blocks the drain.
    BlockedByEmptyDir,
    /// Already terminating: wait for it.
    Terminating,
}

/// Decides what the drain does with a pod.
pub fn verdict(pod: &Pod, rules: &DrainRules) -> Verdict {
    let owners = pod.metadata.owner_references.iter().flatten();
    if owners
        .clone()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true))
    {
        return Verdict::Stay(Stay::DaemonSet);
    }
    if pod
        .annotations()
        .contains_key("kubernetes.io/config.mirror")
    {
        return Verdict::Stay(Stay::Mirror);
    }
    if rules
        .leave_alone
        .as_ref()
        .is_some_and(|s| s.matches(pod.labels()))
    {
        return Verdict::Stay(Stay::Selected);
    }
    if rules.operator_pod.as_ref().is_some_and(|(ns, name)| {
        pod.namespace().as_deref() == Some(ns.as_str()) && &pod.name_any() == name
    }) {
        return Verdict::Stay(Stay::Operator);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Verdict::Terminating;
    }
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let empty_dir = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.empty_dir.is_some());
    if empty_dir && !finished && !rules.delete_empty_dir_data {
        return Verdict::BlockedByEmptyDir;
    }
    Verdict::Evict
}

/// An eviction a PodDisruptionBudget refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Blocked {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The budget's name.
    pub budget: String,
}

/// Drains `node` until it is empty or `deadline` passes. Each eviction a
/// PodDisruptionBudget refuses is sent to `blocked_tx`.
pub async fn drain(
    client: &Client,
    node: &str,
    rules: &DrainRules,
    deadline: Timestamp,
    blocked_tx: &tokio::sync::mpsc::UnboundedSender<Blocked>,
    clock: &crate::clock::Clock,
) -> Result<Outcome> {
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let mut backoff = Duration::from_millis(250);
    loop {
        let list = pods.list(&on_node).await?;
        let mut remaining = Vec::new();
        let mut to_evict = Vec::new();
        for pod in &list.items {
            match verdict(pod, rules) {
                Verdict::Stay(_) => {}
                Verdict::Evict => {
                    remaining.push(format!(
                        "{}/{}",
                        pod.namespace().unwrap_or_default(),
                        pod.name_any()
                    ));
                    to_evict.push(pod.clone());
                }
                Verdict::BlockedByEmptyDir => remaining.push(format!(
                    "{}/{} (emptyDir; deleteEmptyDirData is off)",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any()
                )),
                Verdict::Terminating => remaining.push(format!(
                    "{}/{} (terminating)",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any()
                )),
            }
        }
        if remaining.is_empty() {
            info!(node, "drained");
            return Ok(Outcome::Drained);
        }
        if clock.now() >= deadline {
            return Ok(Outcome::TimedOut(remaining));
        }
        let results: Vec<(Pod, std::result::Result<(), kube::Error>)> = stream::iter(to_evict)
            .map(|pod| {
                let api: Api<Pod> =
                    Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                let params = EvictParams {
                    delete_options: rules.grace_period_seconds.map(|g| DeleteParams {
                        grace_period_seconds: Some(g as u32),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                async move {
                    let r = api.evict(&pod.name_any(), &params).await.map(drop);
                    (pod, r)
                }
            })
            .buffer_unordered(rules.max_parallel.max(1))
            .collect()
            .await;
        let mut blocked = false;
        for (pod, result) in results {
            match result {
                Ok(()) => debug!(node, pod = %pod.name_any(), "evicted"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    blocked = true;
                    let budget = match blocking_budget(client, &pod).await {
                        Ok(Some(name)) => name,
                        Ok(None) => "a PodDisruptionBudget".into(),
                        Err(e) => {
                            warn!(node, pod = %pod.name_any(), error = %e, "cannot list PodDisruptionBudgets");
                            format!("a PodDisruptionBudget (cannot list them to say which: {e})")
                        }
                    };
                    let pod = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                    let _ = blocked_tx.send(Blocked { pod, budget });
                }
                Err(e) => warn!(node, pod = %pod.name_any(), error = %e, "eviction failed"),
            }
        }
        // Wait before the next round; longer while budgets refuse, never past the deadline.
        backoff = if blocked {
            (backoff * 2).min(Duration::from_secs(10))
        } else {
            Duration::from_millis(250)
        };
        let left = deadline.duration_since(clock.now()).unsigned_abs();
        tokio::time::sleep(backoff.min(left)).await;
    }
}

/// Deletes the pods a timed-out drain left (bypassing PodDisruptionBudgets), for
/// `onTimeout: Force`. DaemonSet, mirror, left-alone and operator pods still stay.
pub async fn force(client: &Client, node: &str, rules: &DrainRules) -> Result<usize> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    let mut deleted = 0;
    for pod in list.items {
        if matches!(
            verdict(&pod, rules),
            Verdict::Evict | Verdict::BlockedByEmptyDir
        ) {
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            let params = DeleteParams {
                grace_period_seconds: rules.grace_period_seconds.map(|g| g as u32),
                ..Default::default()
            };
            match api.delete(&pod.name_any(), &params).await {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(deleted)
}

/// The name of a PodDisruptionBudget selecting `pod`, to say which one blocks it.
async fn blocking_budget(client: &Client, pod: &Pod) -> Result<Option<String>, kube::Error> {
    let Some(namespace) = pod.namespace() else {
        return Ok(None);
    };
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().find_map(|pdb| {
        let selector = Selector::compile(pdb.spec.as_ref()?.selector.as_ref()?).ok()?;
        selector.matches(pod.labels()).then(|| pdb.name_any())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn rules() -> DrainRules {
        DrainRules {
            leave_alone: None,
            delete_empty_dir_data: false,
            grace_period_seconds: None,
            max_parallel: 5,
            operator_pod: Some(("baton-system".into(), "baton-operator-0".into())),
        }
    }

    #[test]
    fn daemonset_and_mirror_pods_stay() {
        let ds = pod(
            serde_json::json!({"metadata": {"name": "a", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "u", "controller": true}]}}),
        );
        assert_eq!(verdict(&ds, &rules()), Verdict::Stay(Stay::DaemonSet));
        let mirror = pod(
            serde_json::json!({"metadata": {"name": "b", "annotations": {"kubernetes.io/config.mirror": "h"}}}),
        );
        assert_eq!(verdict(&mirror, &rules()), Verdict::Stay(Stay::Mirror));
    }

    #[test]
    fn pods_the_policy_selects_and_the_operator_itself_stay() {
        let mut r = rules();
        r.leave_alone = Some(
            Selector::compile(
                &serde_json::from_value(serde_json::json!({"matchLabels": {"keep": "yes"}}))
                    .unwrap(),
            )
            .unwrap(),
        );
        assert_eq!(
            verdict(
                &pod(serde_json::json!({"metadata": {"name": "c", "labels": {"keep": "yes"}}})),
                &r
            ),
            Verdict::Stay(Stay::Selected)
        );
        assert_eq!(
            verdict(
                &pod(
                    serde_json::json!({"metadata": {"name": "baton-operator-0", "namespace": "baton-system"}})
                ),
                &r
            ),
            Verdict::Stay(Stay::Operator)
        );
    }

    #[test]
    fn empty_dir_pods_block_unless_opted_in_and_finished_pods_go() {
        let p = pod(
            serde_json::json!({"metadata": {"name": "d"}, "spec": {"containers": [], "volumes": [{"name": "s", "emptyDir": {}}]}}),
        );
        assert_eq!(verdict(&p, &rules()), Verdict::BlockedByEmptyDir);
        let mut r = rules();
        r.delete_empty_dir_data = true;
        assert_eq!(verdict(&p, &r), Verdict::Evict);
        let done = pod(
            serde_json::json!({"metadata": {"name": "e"}, "spec": {"containers": [], "volumes": [{"name": "s", "emptyDir": {}}]}, "status": {"phase": "Succeeded"}}),
        );
        assert_eq!(verdict(&done, &rules()), Verdict::Evict);
    }
}
