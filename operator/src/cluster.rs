//! The one narrow interface between the operator's decisions and the API server: the
//! reads an observation makes (the watch caches, the pods a blocking selector names)
//! and the writes a step makes (Node patches, reboot Leases, Events, drains).
//! [`Kube`] implements it with `kube::Api`; the deterministic simulation implements it
//! in memory.
//!
//! Every write is guarded by the version the decision saw (a Lease create by its name),
//! and [`Kube`] notes each one in the expectations before it is sent (`readback`).

use std::{future::Future, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        events::{Event, EventType},
        reflector::ObjectRef,
    },
};
use tracing::{Instrument, info_span, warn};

use crds::{UpdatePolicy, node::NodePatch, protocol};
use rollout::{
    expectations::{Expected, ObjectKey},
    plan::{LeaseFacts, NodeFacts},
};

use crate::{
    context::Context,
    drain::{self, DrainRules, Outcome},
    error::{Error, Result},
    readback,
};

/// The operator's access to the cluster.
pub trait Cluster: Send + Sync {
    /// The operator's namespace, where the reboot Leases are.
    fn namespace(&self) -> &str;
    /// Every Node, as cached.
    fn nodes(&self) -> Vec<Arc<Node>>;
    /// Every reboot Lease, as cached.
    fn leases(&self) -> Vec<Arc<Lease>>;
    /// Every UpdatePolicy, as cached.
    fn policies(&self) -> Vec<Arc<UpdatePolicy>>;
    /// The running pods a label selector (query syntax) names.
    fn running_pods(&self, selector: &str) -> impl Future<Output = Result<Vec<Pod>>> + Send;
    /// Patches a Node, guarded by the version `seen`.
    fn patch_node(
        &self,
        node: &str,
        seen: &NodeFacts,
        patch: &NodePatch,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Creates a reboot Lease; `Ok(false)` when it exists already.
    fn create_lease(&self, lease: &Lease) -> impl Future<Output = Result<bool>> + Send;
    /// Sets annotations on a reboot Lease, guarded by the version `seen`.
    fn annotate_lease(
        &self,
        seen: &LeaseFacts,
        annotations: &[(&str, String)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Deletes a reboot Lease, guarded by the uid and version `seen`.
    fn delete_lease(&self, seen: &LeaseFacts) -> impl Future<Output = Result<()>> + Send;
    /// Records an Event on a Node (best effort).
    fn event(
        &self,
        node: &str,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> impl Future<Output = ()> + Send;
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
}

impl Cluster for Kube {
    fn namespace(&self) -> &str {
        &self.0.config.namespace
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.0.nodes.state()
    }

    fn leases(&self) -> Vec<Arc<Lease>> {
        self.0.leases.state()
    }

    fn policies(&self) -> Vec<Arc<UpdatePolicy>> {
        self.0.policies.state()
    }

    async fn running_pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::all(self.0.client.clone());
        let params = ListParams::default()
            .labels(selector)
            .fields("status.phase=Running");
        Ok(pods.list(&params).await?.items)
    }

    async fn patch_node(&self, node: &str, seen: &NodeFacts, patch: &NodePatch) -> Result<()> {
        let ctx = &self.0;
        let key = ObjectKey::node(node);
        readback::note(
            ctx,
            key.clone(),
            Expected::Changed {
                from: seen.resource_version.clone(),
            },
        );
        let api: Api<Node> = Api::all(ctx.client.clone());
        let json = patch.to_json(seen.resource_version.clone());
        let result = api
            .patch(node, &PatchParams::default(), &Patch::Merge(&json))
            .await;
        readback::settle_write(ctx, &key, result.as_ref().err());
        result
            .map(drop)
            .map_err(|e| Error::from_kube(&format!("node {node}"), e))
    }

    async fn create_lease(&self, lease: &Lease) -> Result<bool> {
        let ctx = &self.0;
        let key = ObjectKey::lease(&lease.name_any());
        readback::note(ctx, key.clone(), Expected::Changed { from: None });
        match self
            .leases_api()
            .create(&PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(true),
            // It exists: the cache will show it, as the note expects.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => {
                readback::settle_write(ctx, &key, Some(&e));
                Err(Error::Kube(e))
            }
        }
    }

    async fn annotate_lease(
        &self,
        seen: &LeaseFacts,
        annotations: &[(&str, String)],
    ) -> Result<()> {
        let ctx = &self.0;
        let key = ObjectKey::lease(&seen.name);
        readback::note(
            ctx,
            key.clone(),
            Expected::Changed {
                from: seen.resource_version.clone(),
            },
        );
        let map: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into()))
            .collect();
        let patch = serde_json::json!({"metadata": {"resourceVersion": seen.resource_version, "annotations": map}});
        let result = self
            .leases_api()
            .patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        readback::settle_write(ctx, &key, result.as_ref().err());
        result
            .map(drop)
            .map_err(|e| Error::from_kube(&format!("lease {}", seen.name), e))
    }

    async fn delete_lease(&self, seen: &LeaseFacts) -> Result<()> {
        let ctx = &self.0;
        let key = ObjectKey::lease(&seen.name);
        readback::note(
            ctx,
            key.clone(),
            Expected::Gone {
                uid: seen.uid.clone(),
            },
        );
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: seen.resource_version.clone(),
                uid: seen.uid.clone(),
            }),
            ..Default::default()
        };
        match self.leases_api().delete(&seen.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => {
                readback::settle_write(ctx, &key, Some(&e));
                Err(Error::from_kube(&format!("lease {}", seen.name), e))
            }
        }
    }

    async fn event(&self, node: &str, type_: EventType, reason: &str, note: &str) {
        if let Some(n) = self.0.nodes.get(&ObjectRef::new(node)) {
            publish(&self.0, &n.object_ref(&()), type_, reason, note).await;
        }
    }

    async fn start_drain(&self, node: &str, rules: DrainRules, deadline: Timestamp) {
        if self.0.drains().get(node).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let rules = self.with_operator(rules);
        self.event(
            node,
            EventType::Normal,
            "DrainStarted",
            &format!("evicting pods until {deadline}"),
        )
        .await;
        let me = self.clone();
        let name = node.to_string();
        let handle = tokio::spawn(
            async move { me.drain(&name, rules, deadline).await }
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
        drain::force(&self.0.client, node, &self.with_operator(rules.clone())).await
    }
}

impl Kube {
    /// One drain, run as its own task: evicts within the deadline, reports each blocked
    /// pod once as an Event, and records the end of the drain on the Lease.
    async fn drain(&self, node: &str, rules: DrainRules, deadline: Timestamp) {
        let ctx = &self.0;
        let (blocked_tx, mut blocked_rx) = tokio::sync::mpsc::unbounded_channel::<drain::Blocked>();
        let reporter = {
            let me = self.clone();
            let node = node.to_string();
            tokio::spawn(async move {
                let mut seen = std::collections::HashSet::new();
                while let Some(b) = blocked_rx.recv().await {
                    me.0.metrics.evictions_blocked.inc();
                    if seen.insert(b.clone()) {
                        warn!(pod = %b.pod, budget = %b.budget, "eviction blocked by a PodDisruptionBudget");
                        let note = format!(
                            "evicting {} is blocked by PodDisruptionBudget {}; retrying until the drain times out",
                            b.pod, b.budget
                        );
                        me.event(&node, EventType::Warning, "DrainBlocked", &note)
                            .await;
                    }
                }
            })
        };
        ctx.metrics.drains.inc();
        let started = std::time::Instant::now();
        let outcome =
            drain::drain(&ctx.client, node, &rules, deadline, &blocked_tx, &ctx.clock).await;
        ctx.metrics.drains.dec();
        ctx.metrics
            .drain_seconds
            .observe(started.elapsed().as_secs_f64());
        drop(blocked_tx);
        let _ = reporter.await;
        match outcome {
            Ok(Outcome::Drained) => {
                let lease = ctx
                    .leases
                    .get(&ObjectRef::new(&crate::lease::name(node)).within(&ctx.config.namespace));
                if let Some(l) = lease {
                    let seen = LeaseFacts {
                        name: l.name_any(),
                        uid: l.uid(),
                        resource_version: l.resource_version(),
                    };
                    let at = protocol::lease::DRAINED_AT.format(&ctx.clock.now());
                    let drained = [(protocol::lease::DRAINED_AT.name, at)];
                    if let Err(e) = self.annotate_lease(&seen, &drained).await {
                        warn!(error = %e, "recording the drain failed; it will be redone");
                    }
                }
            }
            Ok(Outcome::TimedOut(remaining)) => {
                let note = format!("still on the node: {}", remaining.join(", "));
                self.event(node, EventType::Warning, "DrainTimedOut", &note)
                    .await;
            }
            Err(e) => warn!(error = %e, "drain failed; it will be retried"),
        }
    }
}

/// Records an Event (best effort: a failure is logged).
pub(crate) async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1024).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}
