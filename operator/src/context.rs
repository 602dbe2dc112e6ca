//! What every reconcile of one controller run shares: the client, the configuration,
//! the watch caches, the Event recorder, the running drains, the metrics, the alert
//! gate's client, the clock, and the writes not yet seen in the caches.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Client, runtime::reflector::Store};

use crds::UpdatePolicy;

use crate::{config::Config, metrics::Metrics};

/// What every reconcile shares.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) config: Config,
    pub(crate) nodes: crate::cache::Nodes,
    pub(crate) leases: Store<Lease>,
    pub(crate) policies: Store<UpdatePolicy>,
    pub(crate) events: crate::event::Queue,
    /// The task writing the queued Events.
    pub(crate) event_writer: tokio::task::JoinHandle<()>,
    pub(crate) drains: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) alerts: crate::alert::Alerts,
    pub(crate) silences: crate::silence::Alertmanager,
    pub(crate) notifier: crate::notify::Notifier,
    /// etcd, when the operator has access to it.
    pub(crate) etcd: Option<crate::etcd::EtcdClient>,
    pub(crate) clock: Arc<crate::clock::Clock>,
    /// Writes not yet seen in the caches (`readback`).
    pub(crate) expectations: std::sync::Mutex<rollout::expectations::Expectations>,
}

impl Context {
    /// The running drains. Never held across an await.
    pub(crate) fn drains(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
        self.drains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Aborts the run's own tasks when dropped, every running drain and the Event writer:
/// they must not outlive the controller run that started them (a replica that stops
/// leading stops evicting, and reporting, at once).
pub(crate) struct AbortTasks(pub(crate) Arc<Context>);

impl Drop for AbortTasks {
    fn drop(&mut self) {
        for handle in self.0.drains().values() {
            handle.abort();
        }
        self.0.event_writer.abort();
    }
}
