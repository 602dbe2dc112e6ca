//! The one narrow interface between the operator's decisions and the API server: the
//! reads an observation makes (the watch caches, a fresh read of one object, the pods
//! a blocking selector names, the alert gate) and the writes a reconcile makes (Node
//! patches, reboot Leases, the policy's status and finalizer, Events, drains).
//! [`Kube`] implements it with `kube::Api`; the deterministic simulation (`sim`)
//! implements it on its model API server.
//!
//! Every write is guarded by the version the decision saw (a Lease create by its name)
//! and noted in the expectations before it is sent (`readback`): the provided methods
//! here do that for every implementation, which only sends.

use std::{
    future::Future,
    sync::{Arc, MutexGuard},
};

use jiff::Timestamp;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{events::EventType, reflector::ObjectRef},
};
use serde_json::Value;
use tracing::{Instrument, info_span};

use crds::{UpdatePolicy, UpdatePolicyStatus, node::NodePatch};
use rollout::{
    alert::AlertGate,
    expectations::{Expectations, Expected, ObjectKey, Seen},
    plan::{LeaseFacts, NodeFacts},
};

use crate::{
    cache::CachedNode,
    config::Config,
    context::Context,
    drain::{self, DrainRules},
    error::{Error, Result},
    metrics::Metrics,
    readback,
};

/// One write, as the API server receives it.
#[derive(Debug, Clone)]
pub enum Write<'a> {
    /// A merge patch of a Node (its `metadata.resourceVersion`, if any, guards it).
    PatchNode {
        /// The Node.
        node: &'a str,
        /// The patch.
        patch: &'a Value,
    },
    /// A reboot Lease created.
    CreateLease(&'a Lease),
    /// A merge patch of a reboot Lease (guarded like a Node patch).
    PatchLease {
        /// The Lease.
        name: &'a str,
        /// The patch.
        patch: &'a Value,
    },
    /// A reboot Lease deleted under preconditions.
    DeleteLease {
        /// The Lease.
        name: &'a str,
        /// The uid it must have.
        uid: Option<String>,
        /// The resourceVersion it must have.
        resource_version: Option<String>,
    },
    /// A merge patch of an UpdatePolicy's metadata (the finalizer).
    PatchPolicy {
        /// The policy.
        name: &'a str,
        /// The patch.
        patch: &'a Value,
    },
    /// A merge patch of an UpdatePolicy's status.
    PatchPolicyStatus {
        /// The policy.
        name: &'a str,
        /// The patch.
        patch: &'a Value,
    },
}

/// Why a request failed: the API server's answer (`code`), or none at all (a request
/// that got no answer may still have been applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The HTTP status the API server answered, if it answered.
    pub code: Option<u16>,
    /// What went wrong.
    pub message: String,
}

impl Refusal {
    /// The refusal of a kube request.
    pub fn from_kube(e: &kube::Error) -> Refusal {
        Refusal {
            code: match e {
                kube::Error::Api(s) => Some(s.code),
                _ => None,
            },
            message: e.to_string(),
        }
    }
}

/// The operator's access to the cluster.
pub trait Cluster: Send + Sync {
    /// The operator's namespace, where the reboot Leases are.
    fn namespace(&self) -> &str;
    /// Now, on the operator's clock.
    fn now(&self) -> Timestamp;
    /// The operator's configuration.
    fn config(&self) -> &Config;
    /// Its metrics.
    fn metrics(&self) -> &Metrics;
    /// Every Node, as cached.
    fn nodes(&self) -> Vec<Arc<CachedNode>>;
    /// Every reboot Lease, as cached.
    fn leases(&self) -> Vec<Arc<Lease>>;
    /// Every UpdatePolicy, as cached.
    fn policies(&self) -> Vec<Arc<UpdatePolicy>>;
    /// Whether every cache has been filled once.
    fn caches_ready(&self) -> bool;
    /// The cached version of one Node or reboot Lease.
    fn cached(&self, key: &ObjectKey) -> Option<Seen>;
    /// The writes not yet seen in the caches. Never held across an await.
    fn expectations(&self) -> MutexGuard<'_, Expectations>;
    /// A fresh read of one Node or reboot Lease.
    fn read(&self, key: &ObjectKey) -> impl Future<Output = Result<Option<Seen>, Refusal>> + Send;
    /// The running pods a label selector (query syntax) names.
    fn running_pods(&self, selector: &str) -> impl Future<Output = Result<Vec<Pod>>> + Send;
    /// Sends one write. Returns the written object's resourceVersion when the answer
    /// carries one.
    fn send(
        &self,
        write: Write<'_>,
    ) -> impl Future<Output = Result<Option<String>, Refusal>> + Send;
    /// Records an Event on a Node (best effort).
    fn event(
        &self,
        node: &str,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> impl Future<Output = ()> + Send;
    /// Records an Event on a policy (best effort).
    fn policy_event(
        &self,
        policy: &UpdatePolicy,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> impl Future<Output = ()> + Send;
    /// baton's silences in the Alertmanager at `url` (none where there is no
    /// Alertmanager, as in the simulation).
    fn silences(
        &self,
        url: &str,
    ) -> impl Future<Output = Result<Vec<rollout::silence::Existing>, crate::silence::SilenceError>> + Send
    {
        let _ = url;
        async { Ok(Vec::new()) }
    }
    /// Carries out one silence change for `policy` (matchers as templates) at `now`.
    fn silence(
        &self,
        url: &str,
        policy: &str,
        matchers: &[rollout::silence::Matcher],
        op: &rollout::silence::Op,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), crate::silence::SilenceError>> + Send {
        let _ = (url, policy, matchers, op, now);
        async { Ok(()) }
    }
    /// Queues a notification for delivery; never waits (none where nothing delivers,
    /// as in the simulation).
    fn notify(&self, delivery: crate::notify::Delivery) {
        let _ = delivery;
    }
    /// The value of `key` in the Secret `name` of the operator's namespace, if both
    /// exist (bounded by the request timeout).
    fn secret(&self, name: &str, key: &str) -> impl Future<Output = Option<String>> + Send {
        let _ = (name, key);
        async { None }
    }
    /// etcd as the quorum guard sees it (not observed where the operator has no etcd
    /// access, as in the simulation).
    fn etcd(&self) -> impl Future<Output = rollout::etcd::Etcd> + Send {
        async { rollout::etcd::Etcd::NotObserved }
    }
    /// Moves etcd leadership from the leader at `leader_url` to member `to`, returning
    /// once the transfer is done or failed.
    fn move_leader(
        &self,
        leader_url: &str,
        to: u64,
    ) -> impl Future<Output = Result<(), crate::etcd::EtcdError>> + Send {
        let _ = (leader_url, to);
        async { Ok(()) }
    }
    /// Why the Prometheus alert gate is closed at `now`, or `None` when it is open.
    fn alert_gate(
        &self,
        gate: &AlertGate,
        now: Timestamp,
    ) -> impl Future<Output = Option<String>> + Send;
    /// Starts draining `node` until `deadline`, unless a drain of it runs; when it ends,
    /// its Lease records it.
    fn start_drain(
        &self,
        node: &str,
        rules: DrainRules,
        deadline: Timestamp,
    ) -> impl Future<Output = ()> + Send;
    /// Stops the drain of `node`, if one runs.
    fn stop_drain(&self, node: &str);
    /// Deletes the pods a drain left on `node` (`onTimeout: Force`); returns how many.
    fn force_drain(
        &self,
        node: &str,
        rules: &DrainRules,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Patches a Node, guarded by the version `seen`.
    fn patch_node(
        &self,
        node: &str,
        seen: &NodeFacts,
        patch: &NodePatch,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let key = ObjectKey::node(node);
            readback::note(
                self,
                key.clone(),
                Expected::Changed {
                    from: seen.resource_version.clone(),
                },
            );
            let json = patch.to_json(seen.resource_version.clone());
            let result = self.send(Write::PatchNode { node, patch: &json }).await;
            readback::settle_write(self, &key, seen.resource_version.as_deref(), &result);
            result
                .map(drop)
                .map_err(|e| Error::api(&format!("node {node}"), e))
        }
    }

    /// Creates a reboot Lease; `Ok(false)` when it exists already.
    fn create_lease(&self, lease: &Lease) -> impl Future<Output = Result<bool>> + Send {
        async move {
            let key = ObjectKey::lease(&lease.name_any());
            readback::note(self, key.clone(), Expected::Changed { from: None });
            match self.send(Write::CreateLease(lease)).await {
                Ok(_) => Ok(true),
                // It exists: the cache will show it, as the note expects.
                Err(r) if r.code == Some(409) => Ok(false),
                Err(r) => {
                    let refused = Err(r);
                    readback::settle_write(self, &key, None, &refused);
                    refused
                        .map(|_| false)
                        .map_err(|r| Error::api(&format!("lease {}", lease.name_any()), r))
                }
            }
        }
    }

    /// Sets annotations on a reboot Lease, guarded by the version `seen`.
    fn annotate_lease(
        &self,
        seen: &LeaseFacts,
        annotations: &[(&str, String)],
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let key = ObjectKey::lease(&seen.name);
            readback::note(
                self,
                key.clone(),
                Expected::Changed {
                    from: seen.resource_version.clone(),
                },
            );
            let map: serde_json::Map<String, Value> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into()))
                .collect();
            let patch = serde_json::json!({"metadata": {"resourceVersion": seen.resource_version, "annotations": map}});
            let result = self
                .send(Write::PatchLease {
                    name: &seen.name,
                    patch: &patch,
                })
                .await;
            readback::settle_write(self, &key, seen.resource_version.as_deref(), &result);
            result
                .map(drop)
                .map_err(|e| Error::api(&format!("lease {}", seen.name), e))
        }
    }

    /// Deletes a reboot Lease, guarded by the uid and version `seen`.
    fn delete_lease(&self, seen: &LeaseFacts) -> impl Future<Output = Result<()>> + Send {
        async move {
            let key = ObjectKey::lease(&seen.name);
            readback::note(
                self,
                key.clone(),
                Expected::Gone {
                    uid: seen.uid.clone(),
                },
            );
            let delete = Write::DeleteLease {
                name: &seen.name,
                uid: seen.uid.clone(),
                resource_version: seen.resource_version.clone(),
            };
            match self.send(delete).await {
                Ok(_) => Ok(()),
                Err(r) if r.code == Some(404) => Ok(()),
                Err(r) => {
                    let refused = Err(r);
                    readback::settle_write(self, &key, None, &refused);
                    refused
                        .map(drop)
                        .map_err(|r| Error::api(&format!("lease {}", seen.name), r))
                }
            }
        }
    }

    /// Writes a policy's status.
    fn write_status(
        &self,
        name: &str,
        status: &UpdatePolicyStatus,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let patch = status.merge_patch();
            self.send(Write::PatchPolicyStatus {
                name,
                patch: &patch,
            })
            .await
            .map(drop)
            .map_err(|e| Error::api(&format!("status of {name}"), e))
        }
    }

    /// Replaces a policy's finalizers, guarded by its resourceVersion.
    fn set_finalizers(
        &self,
        policy: &UpdatePolicy,
        finalizers: Vec<String>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let name = policy.name_any();
            let patch = serde_json::json!({"metadata": {"resourceVersion": policy.resource_version(), "finalizers": finalizers}});
            self.send(Write::PatchPolicy {
                name: &name,
                patch: &patch,
            })
            .await
            .map(drop)
            .map_err(|e| Error::api(&format!("finalizers of {name}"), e))
        }
    }
}

/// [`Cluster`] on the API server, through the controller run's [`Context`].
#[derive(Clone)]
pub struct Kube(pub(crate) Arc<Context>);

impl Kube {
    fn leases_api(&self) -> Api<Lease> {
        Api::namespaced(self.0.client.clone(), &self.0.config.namespace)
    }

    /// The drain rules as this operator applies them: never its own pod.
    fn with_operator(&self, mut rules: DrainRules) -> DrainRules {
        rules.operator_pod = Some((
            self.0.config.namespace.clone(),
            self.0.config.identity.clone(),
        ));
        rules
    }

    fn pods(&self) -> drain::KubePods {
        drain::KubePods(self.0.client.clone())
    }
}

fn seen<K: Resource>(object: Option<Arc<K>>) -> Option<Seen> {
    object.map(|o| Seen {
        uid: o.uid(),
        resource_version: o.resource_version(),
    })
}

fn merge(patch: &Value) -> Patch<&Value> {
    Patch::Merge(patch)
}

impl Cluster for Kube {
    fn namespace(&self) -> &str {
        &self.0.config.namespace
    }

    fn now(&self) -> Timestamp {
        self.0.clock.now()
    }

    fn config(&self) -> &Config {
        &self.0.config
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn nodes(&self) -> Vec<Arc<CachedNode>> {
        self.0.nodes.state()
    }

    fn leases(&self) -> Vec<Arc<Lease>> {
        self.0.leases.state()
    }

    fn policies(&self) -> Vec<Arc<UpdatePolicy>> {
        self.0.policies.state()
    }

    fn caches_ready(&self) -> bool {
        // The controller waits for the stores before its first reconcile.
        true
    }

    fn cached(&self, key: &ObjectKey) -> Option<Seen> {
        match key.kind {
            "Node" => self.0.nodes.get(&key.name).map(|n| Seen {
                uid: n.uid.clone(),
                resource_version: n.view.resource_version.clone(),
            }),
            _ => seen(
                self.0
                    .leases
                    .get(&ObjectRef::new(&key.name).within(&self.0.config.namespace)),
            ),
        }
    }

    fn expectations(&self) -> MutexGuard<'_, Expectations> {
        self.0
            .expectations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn read(&self, key: &ObjectKey) -> Result<Option<Seen>, Refusal> {
        fn of<K: Resource>(o: K) -> Seen {
            Seen {
                uid: o.uid(),
                resource_version: o.resource_version(),
            }
        }
        let found = match key.kind {
            "Node" => Api::<Node>::all(self.0.client.clone())
                .get_opt(&key.name)
                .await
                .map(|n| n.map(of)),
            _ => self
                .leases_api()
                .get_opt(&key.name)
                .await
                .map(|l| l.map(of)),
        };
        found.map_err(|e| Refusal::from_kube(&e))
    }

    async fn running_pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::all(self.0.client.clone());
        let params = ListParams::default()
            .labels(selector)
            .fields("status.phase=Running");
        Ok(pods.list(&params).await?.items)
    }

    async fn send(&self, write: Write<'_>) -> Result<Option<String>, Refusal> {
        let client = self.0.client.clone();
        let params = PatchParams::default();
        let result = match write {
            Write::PatchNode { node, patch } => Api::<Node>::all(client)
                .patch(node, &params, &merge(patch))
                .await
                .map(|o| o.resource_version()),
            Write::CreateLease(lease) => self
                .leases_api()
                .create(&PostParams::default(), lease)
                .await
                .map(|o| o.resource_version()),
            Write::PatchLease { name, patch } => self
                .leases_api()
                .patch(name, &params, &merge(patch))
                .await
                .map(|o| o.resource_version()),
            Write::DeleteLease {
                name,
                uid,
                resource_version,
            } => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version,
                        uid,
                    }),
                    ..Default::default()
                };
                self.leases_api().delete(name, &params).await.map(|_| None)
            }
            Write::PatchPolicy { name, patch } => Api::<UpdatePolicy>::all(client)
                .patch(name, &params, &merge(patch))
                .await
                .map(|o| o.resource_version()),
            Write::PatchPolicyStatus { name, patch } => Api::<UpdatePolicy>::all(client)
                .patch_status(name, &params, &merge(patch))
                .await
                .map(|o| o.resource_version()),
        };
        result.map_err(|e| Refusal::from_kube(&e))
    }

    async fn event(&self, node: &str, type_: EventType, reason: &str, note: &str) {
        if let Some(n) = self.0.nodes.get(node) {
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                uid: n.uid.clone(),
                ..Default::default()
            };
            publish(&self.0, &reference, type_, reason, note);
        }
    }

    async fn policy_event(
        &self,
        policy: &UpdatePolicy,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        publish(&self.0, &policy.object_ref(&()), type_, reason, note);
    }

    async fn alert_gate(&self, gate: &AlertGate, now: Timestamp) -> Option<String> {
        self.0.alerts.verdict(gate, now).await
    }

    async fn etcd(&self) -> rollout::etcd::Etcd {
        match &self.0.etcd {
            Some(etcd) => etcd.observe(&self.nodes()).await,
            None => rollout::etcd::Etcd::NotObserved,
        }
    }

    async fn move_leader(&self, leader_url: &str, to: u64) -> Result<(), crate::etcd::EtcdError> {
        match &self.0.etcd {
            Some(etcd) => etcd.move_leader(leader_url, to).await,
            None => Err(crate::etcd::EtcdError::Refused {
                url: leader_url.to_string(),
                message: "the operator has no etcd access".into(),
            }),
        }
    }

    async fn silences(
        &self,
        url: &str,
    ) -> Result<Vec<rollout::silence::Existing>, crate::silence::SilenceError> {
        self.0.silences.list(url).await
    }

    fn notify(&self, delivery: crate::notify::Delivery) {
        self.0.notifier.send(delivery);
    }

    async fn secret(&self, name: &str, key: &str) -> Option<String> {
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.0.client.clone(), &self.0.config.namespace);
        let secret = tokio::time::timeout(self.0.config.request_timeout, api.get_opt(name))
            .await
            .ok()?
            .ok()??;
        let bytes = secret.data?.remove(key)?;
        String::from_utf8(bytes.0)
            .ok()
            .map(|s| s.trim().to_string())
    }

    async fn silence(
        &self,
        url: &str,
        policy: &str,
        matchers: &[rollout::silence::Matcher],
        op: &rollout::silence::Op,
        now: Timestamp,
    ) -> Result<(), crate::silence::SilenceError> {
        self.0.silences.apply(url, policy, matchers, op, now).await
    }

    async fn start_drain(&self, node: &str, rules: DrainRules, deadline: Timestamp) {
        if self.0.drains().get(node).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let rules = self.with_operator(rules);
        let me = self.clone();
        let name = node.to_string();
        let handle = tokio::spawn(
            async move { drain::run(&me, &me.pods(), &name, rules, deadline).await }
                .instrument(info_span!("drain", node = %node)),
        );
        self.0.drains().insert(node.to_string(), handle);
    }

    fn stop_drain(&self, node: &str) {
        if let Some(handle) = self.0.drains().remove(node) {
            handle.abort();
        }
    }

    async fn force_drain(&self, node: &str, rules: &DrainRules) -> Result<usize> {
        drain::force(&self.pods(), node, &self.with_operator(rules.clone())).await
    }
}

/// Records an Event (best effort: queued, written by the Event writer, a failure
/// logged).
pub(crate) fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    ctx.events
        .send(reference, type_, reason, note, ctx.clock.now());
}
