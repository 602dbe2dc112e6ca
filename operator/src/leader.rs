//! Leader election on a `coordination.k8s.io/v1` Lease, fenced by resourceVersion.
//!
//! Written on the Lease API rather than with a crate: the protocol is a few lines, and
//! baton's safety rests on it, so it is kept where it can be read and tested: every
//! write is a compare-and-swap on the observed resourceVersion, so two replicas can
//! never both believe they lead. A replica that loses the Lease stops acting at once
//! (the process exits and is restarted), so a leader change in the middle of a drain
//! is handled by the new leader rebuilding everything from the API.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

use crate::error::Result;

/// The leader-election Lease's name.
pub const LEASE_NAME: &str = "baton-operator-leader";

/// Whether `me` may take or keep the lock described by `spec` at `now`.
pub fn may_hold(
    spec: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: SignedDuration,
) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == me => true,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .map_or(default_duration, |s| SignedDuration::from_secs(s.into()));
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            renewed.is_none_or(|r| r.checked_add(duration).is_ok_and(|expiry| expiry <= now))
        }
    }
}

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
}

impl Elector {
    /// An elector for `identity` in the Lease's namespace.
    pub fn new(api: Api<Lease>, identity: String, duration: Duration) -> Elector {
        Elector {
            api,
            identity,
            duration,
        }
    }

    /// Takes or renews the lock. `Ok(true)` while this replica leads.
    pub async fn try_lead(&self) -> Result<bool> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let current = self.api.get_opt(LEASE_NAME).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return Ok(self
                .api
                .create(&PostParams::default(), &lease)
                .await
                .is_ok());
        };
        let default =
            SignedDuration::try_from(self.duration).unwrap_or(SignedDuration::from_secs(15));
        if !may_hold(lease.spec.as_ref(), &self.identity, now, default) {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            info!(previous = ?spec.holder_identity, "taking over leadership");
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        // `replace` carries the observed resourceVersion: a concurrent writer makes it 409.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica leads, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_lead().await {
                Ok(true) => {
                    info!(identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every `interval`; returns as soon as leadership is lost or cannot be
    /// confirmed within the lease duration.
    pub async fn hold(&self, interval: Duration) {
        let mut confirmed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            match self.try_lead().await {
                Ok(true) => confirmed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("leadership lost");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "renewing leadership failed");
                    // Stop before another replica may legitimately take over.
                    if confirmed.elapsed() + interval >= self.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..Default::default()
        }
    }

    #[test]
    fn a_free_or_own_lock_may_be_held() {
        let d = SignedDuration::from_secs(15);
        assert!(may_hold(None, "a", at("2026-01-01T00:00:00Z"), d));
        assert!(may_hold(
            Some(&spec("a", "2026-01-01T00:00:00Z")),
            "a",
            at("2026-01-01T00:00:05Z"),
            d
        ));
    }

    #[test]
    fn another_holders_lock_is_taken_only_once_it_expired() {
        let d = SignedDuration::from_secs(15);
        let s = spec("b", "2026-01-01T00:00:00Z");
        assert!(!may_hold(Some(&s), "a", at("2026-01-01T00:00:14Z"), d));
        assert!(may_hold(Some(&s), "a", at("2026-01-01T00:00:15Z"), d));
    }
}
