//! The operator's controller: watches UpdatePolicies, Nodes and the operator's reboot
//! Leases, and runs `reconcile::policy` for a policy (through `cluster::Kube`) whenever
//! something it reads changed or the requeue it asked for comes due. It keeps no state
//! of its own beyond running drains and the writes not yet seen in its caches: on
//! restart everything is rebuilt from the API.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action as Requeue,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tracing::{Instrument, debug, info, info_span, warn};

use crds::UpdatePolicy;

use crate::{
    cluster::Kube,
    config::Config,
    context::{AbortTasks, Context},
    error::{Error, Result},
    lease,
    metrics::{ErrorLabels, Metrics},
    reconcile,
};

/// Runs the controller until the process is stopped.
pub async fn run(client: Client, config: Config, metrics: Arc<Metrics>) {
    run_with_clock(
        client,
        config,
        metrics,
        Arc::new(crate::clock::Clock::system()),
    )
    .await;
}

/// [`run`], judging every rule at `clock`'s time.
pub async fn run_with_clock(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<crate::clock::Clock>,
) {
    let alerts = match crate::alert::Alerts::new() {
        Ok(alerts) => alerts,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the Prometheus client");
            return;
        }
    };
    let silences = match crate::silence::Alertmanager::new() {
        Ok(silences) => silences,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the Alertmanager client");
            return;
        }
    };
    let notifier = match crate::notify::Notifier::start(Arc::clone(&metrics)) {
        Ok(notifier) => notifier,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the webhook client");
            return;
        }
    };
    let etcd = match crate::etcd::EtcdClient::new(&config.etcd) {
        Ok(etcd) => etcd,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the etcd client");
            return;
        }
    };
    let nodes_api: Api<Node> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let nodes = crate::cache::Nodes::default();
    let (leases, lease_writer) = reflector::store();
    // Nodes are cached as baton's view of them (`cache::Nodes`): on big clusters their
    // images, addresses and conditions would dominate the operator's memory, and each
    // view is read once per change, not once per reconcile. Deletions count as changes
    // (touched, not only applied): a deleted node frees its lease at once. Heartbeats
    // and other changes baton does not read update the cache but wake nothing.
    let counted = Arc::clone(&metrics);
    let node_cache = nodes.clone();
    let node_stream = watcher(nodes_api, watcher::Config::default())
        .filter(move |event| {
            let admitted = event.as_ref().map_or(true, |e| node_cache.apply(e));
            counted.node_event(admitted);
            std::future::ready(admitted)
        })
        .touched_objects()
        .default_backoff();
    let lease_selector = format!("{}={}", lease::MANAGED_BY.0, lease::MANAGED_BY.1);
    let lease_stream = watcher(
        leases_api,
        watcher::Config::default().labels(&lease_selector),
    )
    .reflect(lease_writer)
    .touched_objects()
    .default_backoff();

    let controller = Controller::new(
        Api::<UpdatePolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let policies = controller.store();
    let every_policy = {
        let policies = policies.clone();
        move || {
            policies
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        }
    };
    let for_node = every_policy.clone();
    let for_policy = every_policy.clone();
    // A policy's spec change or deletion reconciles every policy: each judges overlap
    // with the others' selectors, so both sides of an overlap learn of it (and of its
    // end) at once. So does a pool completing a release or halting (what the pools
    // promoted after it wait for); other status writes wake nothing (`cache::Changes`).
    let mut spec_changes = crate::cache::Changes::<UpdatePolicy>::default();
    let policy_stream = watcher(
        Api::<UpdatePolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .filter(move |event| std::future::ready(event.as_ref().map_or(true, |e| spec_changes.admit(e))))
    .touched_objects()
    .default_backoff();
    let (events, event_writer) = crate::event::Queue::start(crate::event::Recorder::new(
        client.clone(),
        "baton-operator",
        &config.identity,
    ));
    let ctx = Arc::new(Context {
        events,
        event_writer,
        client,
        config,
        nodes,
        leases,
        policies,
        drains: std::sync::Mutex::new(HashMap::new()),
        metrics,
        alerts,
        silences,
        notifier,
        etcd,
        clock,
        expectations: std::sync::Mutex::default(),
    });
    // Drains and the Event writer run as their own tasks; they must not outlive this
    // controller (a replica that stops leading must stop evicting at once).
    let _tasks = AbortTasks(Arc::clone(&ctx));
    controller
        .watches_stream(node_stream, move |_| for_node())
        .watches_stream(lease_stream, move |_| every_policy())
        .watches_stream(policy_stream, move |_| for_policy())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn error_policy(policy: Arc<UpdatePolicy>, error: &Error, ctx: Arc<Context>) -> Requeue {
    if matches!(error, Error::Conflict(_)) {
        debug!(policy = %policy.name_any(), error = %error, kind = error.metric_label(), "reconcile conflicted; retrying");
    } else {
        warn!(policy = %policy.name_any(), error = %error, kind = error.metric_label(), "reconcile error; retrying");
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: error.metric_label().into(),
        })
        .inc();
    Requeue::requeue(reconcile::retry_after(error))
}

/// A reconcile that takes this long or longer is logged.
const SLOW_RECONCILE: Duration = Duration::from_secs(1);

async fn reconcile(policy: Arc<UpdatePolicy>, ctx: Arc<Context>) -> Result<Requeue> {
    let name = policy.name_any();
    let span = info_span!("policy", policy = %name);
    let started = std::time::Instant::now();
    let metrics = Arc::clone(&ctx.metrics);
    let result = async move {
        ctx.nodes.wait_until_ready().await;
        ctx.leases.wait_until_ready().await.ok();
        let next = reconcile::policy(&Kube(Arc::clone(&ctx)), &policy).await?;
        Ok(next.map_or_else(Requeue::await_change, Requeue::requeue))
    }
    .instrument(span)
    .await;
    let took = started.elapsed();
    metrics.reconcile_seconds.observe(took.as_secs_f64());
    if took >= SLOW_RECONCILE {
        info!(policy = %name, took_ms = took.as_millis(), "a slow reconcile");
    }
    result
}
