//! `baton-operator`: the cluster side of baton. It grants reboot leases, cordons and
//! drains through the Eviction API, and enforces maintenance windows, following the
//! plan the pure `rollout` core computes.
//!
//! The flow, one module per arrow (imports point the same way):
//!
//! ```text
//! replica -> controller: watch event -> cache -> reconcile -> observe (snapshot)
//!         -> rollout::decide -> plan -> step (one function per action)
//!         -> cluster (API writes)
//! ```
#![forbid(unsafe_code)]

pub mod alert;
pub mod cache;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod context;
pub mod controller;
pub mod drain;
pub mod error;
pub mod etcd;
pub mod event;
pub mod fence;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod readback;
pub mod reconcile;
pub mod replica;
pub mod silence;
pub mod status;
pub mod step;

/// The operator's API client, from the in-cluster config or a kubeconfig.
///
/// kube-rs's automatic retry of 429 answers is turned off: an eviction refused by a
/// PodDisruptionBudget is a 429, and the drain must see it at once (to report it and
/// to keep its deadline) instead of waiting minutes inside a retry loop. Every other
/// failed call is retried by the controller's requeue.
pub async fn client() -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.default_retry = false;
    kube::Client::try_from(config)
}
