//! One operator replica: with leader election, it waits to lead, then runs the
//! controller inside its fence (every write stops at the renew deadline, whatever a
//! hung request does) until leadership is lost or it is asked to stop; without, it
//! runs the controller until it is stopped.

use std::sync::Arc;

use kube::{Api, Client};
use tracing::warn;

use crate::{
    config::Config,
    controller::run_with_clock,
    fence::{self, Fence},
    metrics::Metrics,
};

/// One operator replica: waits to lead, then runs the controller until leadership is
/// lost (or the future is dropped).
pub async fn run_replica(client: Client, config: Config) {
    run_replica_with(client, config, Arc::new(Metrics::default())).await;
}

/// [`run_replica`], recording into `metrics`.
pub async fn run_replica_with(client: Client, config: Config, metrics: Arc<Metrics>) {
    run_replica_with_clock(
        client,
        config,
        metrics,
        Arc::new(crate::clock::Clock::system()),
    )
    .await;
}

/// [`run_replica_with`], judging every rule at `clock`'s time.
pub async fn run_replica_with_clock(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<crate::clock::Clock>,
) {
    run_replica_until(client, config, metrics, clock, std::future::pending()).await;
}

/// How a replica's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Leadership was lost (or could not be confirmed), or the controller stopped:
    /// the replica must stop acting.
    LostLeadership,
    /// `shutdown` completed; leadership, if held, was released.
    ShutDown,
}

/// One operator replica until leadership is lost or `shutdown` completes. On a clean
/// shutdown the leader gives its Lease up, so a follower takes over at once.
pub async fn run_replica_until(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<crate::clock::Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Ended {
    let mut shutdown = std::pin::pin!(shutdown);
    // Every request is bounded; the controller's writes are also fenced by leadership,
    // which the elector (on its own, unfenced client) keeps open.
    let fence = if config.leader_elect {
        Fence::leading_never()
    } else {
        Fence::always()
    };
    let elector_client = fence::bounded(client.clone(), Fence::always(), config.request_timeout);
    let client = fence::bounded(client, Arc::clone(&fence), config.request_timeout);
    let elector = config.leader_elect.then(|| {
        crate::leader::Elector::new(
            Api::namespaced(elector_client, &config.namespace),
            config.identity.clone(),
            config.leader_lease_duration,
            config.renew_deadline(),
            Arc::clone(&fence),
        )
    });
    if let Some(elector) = &elector {
        tokio::select! {
            () = elector.acquire() => {}
            () = &mut shutdown => return Ended::ShutDown,
        }
    }
    // Without an election, this replica acts until it is stopped.
    let hold = async {
        match &elector {
            Some(elector) => {
                elector.hold(config.leader_renew_interval).await;
                warn!("stopping: no longer the leader");
            }
            None => std::future::pending().await,
        }
    };
    metrics.leader.set(1);
    let ended = tokio::select! {
        () = run_with_clock(client, config.clone(), Arc::clone(&metrics), clock) => Ended::LostLeadership,
        () = hold => Ended::LostLeadership,
        () = &mut shutdown => Ended::ShutDown,
    };
    metrics.leader.set(0);
    if let (Ended::ShutDown, Some(elector)) = (ended, &elector) {
        elector.release().await;
    }
    ended
}
