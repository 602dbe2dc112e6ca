//! Leader election on a `coordination.k8s.io/v1` Lease, fenced by resourceVersion.
//!
//! Written on the Lease API rather than with a crate: the protocol is a few lines, and
//! baton's safety rests on it, so it is kept where it can be read and tested: every
//! write is a compare-and-swap on the observed resourceVersion, so two replicas can
//! never both believe they lead. A replica that loses the Lease stops acting at once
//! (the process exits and is restarted), so a leader change in the middle of a drain
//! is handled by the new leader rebuilding everything from the API.
//!
//! The election costs one request per renewal and nothing else: the leader renews from
//! the Lease its last write returned (an update, no read), and followers watch the
//! Lease instead of polling it. Like client-go, a follower judges expiry by how long
//! it has itself seen the Lease unchanged, on its monotonic clock, never by comparing
//! the holder's timestamps with its own wall clock, so clock skew between machines
//! cannot shorten a leader's term.
//!
//! The leader acts only inside its [`Fence`]: until the last renewal that succeeded
//! was *sent* a full renew deadline ago. The deadline is shorter than the term, so a
//! deposed leader stops writing before a follower may take over, even while its
//! renewal hangs on a half-open connection.

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::time::Instant;
use tracing::{info, warn};

use std::sync::Arc;

use crate::{error::Result, fence::Fence};

/// The leader-election Lease's name.
pub const LEASE_NAME: &str = "baton-operator-leader";

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Whether `me` may take or keep the lock described by `spec`, having seen it
/// unchanged for `unchanged_for`. A lock held by another replica may be taken only
/// once it went unrenewed for its whole duration (`default_duration` when it names
/// none).
pub fn may_hold(
    spec: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == me => true,
        Some(_) => unchanged_for >= term_of(spec, default_duration),
    }
}

/// How long the lock described by `spec` stays valid without renewal.
fn term_of(spec: &LeaseSpec, default_duration: Duration) -> Duration {
    spec.lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_duration, Duration::from_secs)
}

/// What identifies one renewal of the lock (resourceVersion and holder): a follower
/// restarts its countdown when it changes.
pub type RenewalId = (Option<String>, Option<String>);

/// The [`RenewalId`] of `lease`.
pub fn renewal(lease: &Lease) -> RenewalId {
    (
        lease.metadata.resource_version.clone(),
        lease.spec.as_ref().and_then(|s| s.holder_identity.clone()),
    )
}

/// Whether nobody holds the lock (its holder gave it up on a clean shutdown): a
/// follower may take it at once.
pub fn is_free(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

/// What an attempt to take the lock should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// There is no Lease: create this one.
    Create(Lease),
    /// Write this over the Lease seen (its resourceVersion guards the write).
    Replace(Lease),
    /// Another replica holds it (the Lease as seen): follow it.
    Wait(Option<Lease>),
}

/// What `me` does with the leader Lease `current` (as just read), having seen the
/// renewal `watched` unchanged for `unchanged_for` (a renewal the watch had not shown
/// yet counts as just seen), with a term of `duration`, at `now`.
pub fn take(
    current: Option<&Lease>,
    me: &str,
    watched: Option<&RenewalId>,
    unchanged_for: Duration,
    duration: Duration,
    now: Timestamp,
) -> Take {
    let now = MicroTime(now);
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    let Some(lease) = current else {
        return Take::Create(Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        });
    };
    let unchanged_for = if watched == Some(&renewal(lease)) {
        unchanged_for
    } else {
        Duration::ZERO
    };
    if !may_hold(lease.spec.as_ref(), me, unchanged_for, duration) {
        return Take::Wait(Some(lease.clone()));
    }
    let mut lease = lease.clone();
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        info!(previous = ?spec.holder_identity, "taking over leadership");
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    Take::Replace(lease)
}

/// `held` (as this replica last wrote it) renewed at `now` for a term of `duration`.
pub fn renewed(held: &Lease, now: Timestamp, duration: Duration) -> Lease {
    let mut next = held.clone();
    let spec = next.spec.get_or_insert_with(Default::default);
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX));
    next
}

/// What a renewal found.
enum Renewal {
    /// Renewed; the Lease as written.
    Renewed(Lease),
    /// Someone else wrote the Lease but this replica still holds it; renew from this.
    Stale(Lease),
    /// Another replica holds it, or it is gone.
    Lost,
}

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    fence: Arc<Fence>,
    /// The Lease as this replica last wrote it, while it leads.
    held: std::sync::Mutex<Option<Lease>>,
}

impl Elector {
    /// An elector for `identity` in the Lease's namespace, with a term of `duration`;
    /// it keeps `fence` open for `renew_deadline` after each successful renewal was
    /// sent.
    pub fn new(
        api: Api<Lease>,
        identity: String,
        duration: Duration,
        renew_deadline: Duration,
        fence: Arc<Fence>,
    ) -> Elector {
        Elector {
            api,
            identity,
            duration,
            renew_deadline,
            fence,
            held: std::sync::Mutex::new(None),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Lease>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the lock if `may_hold` allows it, having seen the renewal `watched`
    /// unchanged for `unchanged_for` (a renewal the watch had not shown yet counts as
    /// just seen). `Ok(Ok(lease))` when this replica now leads, `Ok(Err(lease))` with
    /// the Lease as seen when another replica holds it.
    async fn try_take(
        &self,
        watched: Option<&RenewalId>,
        unchanged_for: Duration,
    ) -> Result<std::result::Result<Lease, Option<Lease>>> {
        let current = self.api.get_opt(LEASE_NAME).await?;
        let written = match take(
            current.as_ref(),
            &self.identity,
            watched,
            unchanged_for,
            self.duration,
            Timestamp::now(),
        ) {
            Take::Wait(seen) => return Ok(Err(seen)),
            Take::Create(lease) => self.api.create(&PostParams::default(), &lease).await,
            // `replace` carries the observed resourceVersion: a concurrent writer makes it 409.
            Take::Replace(lease) => {
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(taken) => Ok(Ok(taken)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Err(None)),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica leads. Between attempts it only watches the Lease.
    pub async fn acquire(&self) {
        let mut watched: Option<(RenewalId, Duration)> = None;
        loop {
            let (seen, unchanged_for) = watched
                .as_ref()
                .map_or((None, Duration::ZERO), |(id, d)| (Some(id), *d));
            let sent = Instant::now();
            match self.try_take(seen, unchanged_for).await {
                Ok(Ok(lease)) => {
                    info!(identity = %self.identity, "leading");
                    *self.held() = Some(lease);
                    self.fence.lead_until(sent + self.renew_deadline);
                    return;
                }
                Ok(Err(seen)) => {
                    watched = Some(self.follow(seen.as_ref()).await);
                }
                Err(e) => {
                    warn!(error = %e, "leader election failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Watches the Lease held by another replica until it goes unrenewed for its
    /// term, or is released or deleted. Returns the last renewal seen and how long it
    /// was seen unchanged.
    async fn follow(&self, seen: Option<&Lease>) -> (RenewalId, Duration) {
        let mut last = seen.map(renewal);
        let mut term = seen
            .and_then(|l| l.spec.as_ref())
            .map_or(self.duration, |s| term_of(s, self.duration));
        let mut since = Instant::now();
        let mut events =
            std::pin::pin!(watcher::watch_object(self.api.clone(), LEASE_NAME).default_backoff());
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(since + term) => return (last.unwrap_or_default(), since.elapsed()),
                event = events.next() => match event {
                    Some(Ok(Some(lease))) => {
                        if is_free(&lease) {
                            return (last.unwrap_or_default(), since.elapsed());
                        }
                        let now = Some(renewal(&lease));
                        if now != last {
                            last = now;
                            since = Instant::now();
                            term = lease.spec.as_ref().map_or(self.duration, |s| term_of(s, self.duration));
                        }
                    }
                    Some(Ok(None)) => return (last.unwrap_or_default(), since.elapsed()),
                    Some(Err(e)) => warn!(error = %e, "watching the leader Lease failed; retrying"),
                    None => return (last.unwrap_or_default(), since.elapsed()),
                },
            }
        }
    }

    /// Renews `lease` (as this replica last wrote it) with one update.
    async fn renew(&self, lease: &Lease) -> Result<Renewal> {
        let next = renewed(lease, Timestamp::now(), self.duration);
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &next)
            .await
        {
            Ok(renewed) => Ok(Renewal::Renewed(renewed)),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                // Someone else wrote it: look once.
                let current = self.api.get_opt(LEASE_NAME).await?;
                let mine = current
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(self.identity.as_str());
                Ok(match current {
                    Some(current) if mine => Renewal::Stale(current),
                    _ => Renewal::Lost,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Renews every `interval` from the Lease as last written; returns, with the fence
    /// closed, as soon as leadership is lost or the renew deadline passes without a
    /// successful renewal, whatever a hung request is doing.
    pub async fn hold(&self, interval: Duration) {
        let crate::fence::Writable::Until(mut deadline) = self.fence.writable() else {
            self.fence.close();
            return;
        };
        let mut wait = interval;
        loop {
            if tokio::time::timeout_at(deadline, tokio::time::sleep(wait))
                .await
                .is_err()
            {
                break;
            }
            let Some(lease) = self.held().clone() else {
                break;
            };
            let sent = Instant::now();
            let Ok(renewal) = tokio::time::timeout_at(deadline, self.renew(&lease)).await else {
                warn!("no renewal within the renew deadline");
                break;
            };
            match renewal {
                Ok(Renewal::Renewed(renewed)) => {
                    *self.held() = Some(renewed);
                    deadline = sent + self.renew_deadline;
                    self.fence.lead_until(deadline);
                    wait = interval;
                }
                Ok(Renewal::Stale(current)) => {
                    *self.held() = Some(current);
                    wait = Duration::ZERO;
                }
                Ok(Renewal::Lost) => {
                    *self.held() = None;
                    warn!("leadership lost");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "renewing leadership failed");
                    wait = RETRY.min(interval);
                }
            }
        }
        self.fence.close();
        warn!("no longer acting as the leader");
    }

    /// Gives the lock up (on a clean shutdown) so that a follower takes over at once
    /// instead of after the lease duration. Best effort: a failure only delays that.
    pub async fn release(&self) {
        self.fence.close();
        let Some(mut next) = self.held().take() else {
            return;
        };
        if let Some(spec) = next.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        if let Err(e) = self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &next)
            .await
        {
            warn!(error = %e, "could not release leadership");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(30);

    #[test]
    fn a_free_or_own_lock_may_be_held() {
        assert!(may_hold(None, "a", Duration::ZERO, D));
        assert!(may_hold(Some(&spec("a")), "a", Duration::ZERO, D));
        assert!(may_hold(Some(&spec("")), "a", Duration::ZERO, D));
    }

    #[test]
    fn another_holders_lock_is_taken_only_once_seen_unrenewed_for_its_term() {
        let s = spec("b");
        assert!(!may_hold(Some(&s), "a", Duration::from_secs(14), D));
        assert!(may_hold(Some(&s), "a", Duration::from_secs(15), D));
        let unnamed = LeaseSpec {
            lease_duration_seconds: None,
            ..spec("b")
        };
        assert!(!may_hold(Some(&unnamed), "a", Duration::from_secs(15), D));
        assert!(may_hold(Some(&unnamed), "a", D, D));
    }
}
