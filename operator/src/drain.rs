//! Draining a node through the Eviction API: PodDisruptionBudgets are respected, 429s
//! are retried with backoff, the node's pods are listed again every round (new pods can
//! land on it), and the whole drain is bounded by a deadline.
//!
//! It must never evict DaemonSet or mirror pods, pods the policy leaves alone, or the
//! operator's own last replica (which would strand the rollout, FLUO #123).

use std::{collections::HashSet, future::Future, time::Duration};

use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, EvictParams, ListParams},
    runtime::events::EventType,
};
use tracing::{debug, info, warn};

use crds::protocol;
use rollout::{plan::LeaseFacts, selector::Selector};

use crate::{
    cluster::{Cluster, Refusal},
    error::Result,
    reconcile::{self, AfterDrain},
};

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

/// The pod side of the API a drain uses: listing a node's pods, the Eviction API,
/// plain deletes (for `onTimeout: Force`) and the budget that refused an eviction.
pub trait Pods: Send + Sync {
    /// Waits `d` (between rounds).
    fn pause(&self, d: Duration) -> impl Future<Output = ()> + Send;
    /// The pods scheduled on `node`.
    fn on_node(&self, node: &str) -> impl Future<Output = Result<Vec<Pod>>> + Send;
    /// Evicts a pod through the Eviction API, with this grace period if set.
    fn evict(
        &self,
        pod: &Pod,
        grace: Option<i64>,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// Deletes a pod, bypassing PodDisruptionBudgets, with this grace period if set.
    fn delete(
        &self,
        pod: &Pod,
        grace: Option<i64>,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// The name of a PodDisruptionBudget selecting `pod`, to say which one blocks it.
    fn budget_of(&self, pod: &Pod) -> impl Future<Output = Option<String>> + Send;
}

fn named(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Drains `node` until it is empty or `deadline` passes (on `c`'s clock). Each pod a
/// PodDisruptionBudget blocks is reported once, as an Event.
pub async fn drain<C: Cluster, P: Pods>(
    c: &C,
    pods: &P,
    node: &str,
    rules: &DrainRules,
    deadline: Timestamp,
) -> Result<Outcome> {
    let mut backoff = Duration::from_millis(250);
    let mut reported: HashSet<Blocked> = HashSet::new();
    loop {
        let list = pods.on_node(node).await?;
        let mut remaining = Vec::new();
        let mut to_evict = Vec::new();
        for pod in &list {
            match verdict(pod, rules) {
                Verdict::Stay(_) => {}
                Verdict::Evict => {
                    remaining.push(named(pod));
                    to_evict.push(pod.clone());
                }
                Verdict::BlockedByEmptyDir => remaining.push(format!(
                    "{} (emptyDir; deleteEmptyDirData is off)",
                    named(pod)
                )),
                Verdict::Terminating => remaining.push(format!("{} (terminating)", named(pod))),
            }
        }
        if remaining.is_empty() {
            info!(node, "drained");
            return Ok(Outcome::Drained);
        }
        if c.now() >= deadline {
            return Ok(Outcome::TimedOut(remaining));
        }
        let results: Vec<(Pod, std::result::Result<(), Refusal>)> = stream::iter(to_evict)
            .map(|pod| async move {
                let r = pods.evict(&pod, rules.grace_period_seconds).await;
                (pod, r)
            })
            .buffer_unordered(rules.max_parallel.max(1))
            .collect()
            .await;
        let mut blocked = false;
        for (pod, result) in results {
            match result {
                Ok(()) => debug!(node, pod = %pod.name_any(), "evicted"),
                Err(r) if r.code == Some(404) => {}
                Err(r) if r.code == Some(429) => {
                    blocked = true;
                    c.metrics().evictions_blocked.inc();
                    let budget = pods
                        .budget_of(&pod)
                        .await
                        .unwrap_or_else(|| "a PodDisruptionBudget".into());
                    let b = Blocked {
                        pod: named(&pod),
                        budget,
                    };
                    if reported.insert(b.clone()) {
                        warn!(pod = %b.pod, budget = %b.budget, "eviction blocked by a PodDisruptionBudget");
                        let note = format!(
                            "evicting {} is blocked by PodDisruptionBudget {}; retrying until the drain times out",
                            b.pod, b.budget
                        );
                        c.event(node, EventType::Warning, "DrainBlocked", &note)
                            .await;
                    }
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
        let left = deadline.duration_since(c.now()).unsigned_abs();
        pods.pause(backoff.min(left)).await;
    }
}

/// One drain, run as its own task: evicts within the deadline, records the end of the
/// drain on the node's Lease (as the cache shows it), and then takes the step that
/// follows, the reboot's allowance, without waiting for the policy's next pass.
pub async fn run<C: Cluster, P: Pods>(
    c: &C,
    pods: &P,
    node: &str,
    rules: DrainRules,
    deadline: Timestamp,
) {
    c.event(
        node,
        EventType::Normal,
        "DrainStarted",
        &format!("evicting pods until {deadline}"),
    )
    .await;
    c.metrics().drains.inc();
    let started = c.now();
    let outcome = drain(c, pods, node, &rules, deadline).await;
    c.metrics().drains.dec();
    c.metrics()
        .drain_seconds
        .observe(c.now().duration_since(started).as_secs_f64().max(0.0));
    match outcome {
        Ok(Outcome::Drained) => {
            if record_drained(c, pods, node).await {
                allow_reboot(c, pods, node).await;
            }
        }
        Ok(Outcome::TimedOut(remaining)) => {
            let note = format!("still on the node: {}", remaining.join(", "));
            c.event(node, EventType::Warning, "DrainTimedOut", &note)
                .await;
        }
        Err(e) => warn!(error = %e, "drain failed; it will be retried"),
    }
}

/// How often the end of a drain is tried while the cache lags the write of its start.
const RECORD_TRIES: u32 = 10;
/// The pause between those tries.
const RECORD_PAUSE: Duration = Duration::from_millis(100);

/// Records the end of the drain on the node's Lease, as the cache shows it. The drain's
/// start was written to the Lease just before the drain began (or the Lease was created
/// with it), and a drain of a node without pods ends before the cache has seen that
/// write: a conflict, or no Lease in the cache yet, then means "not yet", so the record
/// is tried again a few times (at most RECORD_TRIES, one second) rather than left to
/// the next reconcile.
async fn record_drained<C: Cluster, P: Pods>(c: &C, pods: &P, node: &str) -> bool {
    let name = crate::lease::name(node);
    for attempt in 1..=RECORD_TRIES {
        let Some(l) = c.leases().into_iter().find(|l| l.name_any() == name) else {
            if attempt < RECORD_TRIES {
                pods.pause(RECORD_PAUSE).await;
                continue;
            }
            return false;
        };
        let seen = LeaseFacts {
            name: l.name_any(),
            uid: l.uid(),
            resource_version: l.resource_version(),
        };
        let at = protocol::lease::DRAINED_AT.format(&c.now());
        let drained = [(protocol::lease::DRAINED_AT.name, at)];
        match c.annotate_lease(&seen, &drained).await {
            Ok(()) => return true,
            Err(crate::error::Error::Conflict(_)) if attempt < RECORD_TRIES => {
                pods.pause(RECORD_PAUSE).await;
            }
            Err(e) => {
                warn!(error = %e, "recording the drain failed; it will be redone");
                return false;
            }
        }
    }
    false
}

/// How often the step after a drain is tried while the caches lag the drain's record.
const ALLOW_TRIES: u32 = 40;
/// The pause between those tries (a watch event is usually a few milliseconds away).
const ALLOW_PAUSE: Duration = Duration::from_millis(25);

/// Takes the step that follows the drain's end at once ([`reconcile::after_drain`]):
/// the reboot's allowance, when the decision on caches that show the drain's record
/// gives it. While the caches lag, or on a write conflict, it is tried again, at most
/// ALLOW_TRIES times (one second); whatever is left is the policy's next pass's, which
/// the record's watch event starts anyway.
async fn allow_reboot<C: Cluster, P: Pods>(c: &C, pods: &P, node: &str) {
    for attempt in 1..=ALLOW_TRIES {
        match reconcile::after_drain(c, node).await {
            Ok(AfterDrain::Allowed | AfterDrain::Left) => return,
            Ok(AfterDrain::NotYet) | Err(crate::error::Error::Conflict(_))
                if attempt < ALLOW_TRIES =>
            {
                pods.pause(ALLOW_PAUSE).await;
            }
            Ok(AfterDrain::NotYet) => return,
            Err(e) => {
                debug!(error = %e, "the reboot's allowance is left to the next pass");
                return;
            }
        }
    }
}

/// Deletes the pods a timed-out drain left (bypassing PodDisruptionBudgets), for
/// `onTimeout: Force`. DaemonSet, mirror, left-alone and operator pods still stay.
pub async fn force<P: Pods>(pods: &P, node: &str, rules: &DrainRules) -> Result<usize> {
    let mut deleted = 0;
    for pod in pods.on_node(node).await? {
        if matches!(
            verdict(&pod, rules),
            Verdict::Evict | Verdict::BlockedByEmptyDir
        ) {
            match pods.delete(&pod, rules.grace_period_seconds).await {
                Ok(()) => deleted += 1,
                Err(r) if r.code == Some(404) => {}
                Err(r) => return Err(crate::error::Error::api(&format!("pod {}", named(&pod)), r)),
            }
        }
    }
    Ok(deleted)
}

/// [`Pods`] on the API server.
#[derive(Clone)]
pub struct KubePods(pub Client);

impl Pods for KubePods {
    async fn pause(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    async fn on_node(&self, node: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::all(self.0.clone());
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        Ok(pods.list(&on_node).await?.items)
    }

    async fn evict(&self, pod: &Pod, grace: Option<i64>) -> std::result::Result<(), Refusal> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), &pod.namespace().unwrap_or_default());
        let params = EvictParams {
            delete_options: grace.map(|g| DeleteParams {
                grace_period_seconds: u32::try_from(g).ok(),
                ..Default::default()
            }),
            ..Default::default()
        };
        api.evict(&pod.name_any(), &params)
            .await
            .map(drop)
            .map_err(|e| Refusal::from_kube(&e))
    }

    async fn delete(&self, pod: &Pod, grace: Option<i64>) -> std::result::Result<(), Refusal> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: grace.and_then(|g| u32::try_from(g).ok()),
            ..Default::default()
        };
        api.delete(&pod.name_any(), &params)
            .await
            .map(drop)
            .map_err(|e| Refusal::from_kube(&e))
    }

    async fn budget_of(&self, pod: &Pod) -> Option<String> {
        let namespace = pod.namespace()?;
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.0.clone(), &namespace);
        match api.list(&ListParams::default()).await {
            Ok(list) => list.items.into_iter().find_map(|pdb| {
                let selector = Selector::compile(pdb.spec.as_ref()?.selector.as_ref()?).ok()?;
                selector.matches(pod.labels()).then(|| pdb.name_any())
            }),
            Err(e) => {
                warn!(pod = %pod.name_any(), error = %e, "cannot list PodDisruptionBudgets");
                Some(format!(
                    "a PodDisruptionBudget (cannot list them to say which: {e})"
                ))
            }
        }
    }
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
