//! The fence around the operator's API requests: every request has a time bound, and a
//! replica that can no longer be sure it leads sends no write at all.
//!
//! Leadership is only known up to the moment the last successful renewal was *sent*
//! plus the renew deadline (shorter than the lease term, as client-go's
//! `renewDeadline` is). Past that moment another replica may lead, so the fence refuses
//! every write, even while the renewal itself still hangs on a dead connection. A write
//! let through is bounded so that it cannot outlive the fence either.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response};
use kube::{Client, client::Body};
use thiserror::Error;
use tokio::time::Instant;

/// Until when this replica may write.
#[derive(Debug)]
pub struct Fence(Mutex<Validity>);

#[derive(Debug, Clone, Copy)]
enum Validity {
    /// No leader election: a single replica may always write.
    Always,
    /// Leading, as far as is known, until then.
    Until(Instant),
    /// Not leading.
    Never,
}

/// Whether a replica may write now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writable {
    /// Always (no leader election).
    Always,
    /// Until then.
    Until(Instant),
    /// No: it does not lead, or cannot be sure it still does.
    No,
}

/// Why a request was not sent, or not answered in time.
#[derive(Debug, Error)]
pub enum Refused {
    /// The renew deadline passed (or leadership was never won): no write goes out.
    #[error("not sending {0}: this replica cannot be sure it still leads")]
    NotLeading(String),
    /// The request outlived its bound.
    #[error("{what} got no complete answer within {after:?}")]
    TimedOut {
        /// The request.
        what: String,
        /// Its bound.
        after: Duration,
    },
}

impl Fence {
    /// A fence that never closes (no leader election).
    pub fn always() -> Arc<Fence> {
        Arc::new(Fence(Mutex::new(Validity::Always)))
    }

    /// A fence closed until leadership is confirmed.
    pub fn leading_never() -> Arc<Fence> {
        Arc::new(Fence(Mutex::new(Validity::Never)))
    }

    fn get(&self) -> Validity {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, v: Validity) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = v;
    }

    /// Leadership is confirmed until `until` (a renewal sent at `until - deadline`
    /// succeeded).
    pub fn lead_until(&self, until: Instant) {
        if !matches!(self.get(), Validity::Always) {
            self.set(Validity::Until(until));
        }
    }

    /// Leadership is lost: no write from now on.
    pub fn close(&self) {
        if !matches!(self.get(), Validity::Always) {
            self.set(Validity::Never);
        }
    }

    /// Whether, and until when, this replica may write.
    pub fn writable(&self) -> Writable {
        self.writable_at(Instant::now())
    }

    /// [`Fence::writable`] at `now` (the simulation's clock).
    pub fn writable_at(&self, now: Instant) -> Writable {
        match self.get() {
            Validity::Always => Writable::Always,
            Validity::Until(t) if now < t => Writable::Until(t),
            Validity::Until(_) | Validity::Never => Writable::No,
        }
    }
}

/// `client`, with every request bounded by `timeout` and every write held to `fence`.
/// Watches are left to kube's watcher, which bounds an idle watch by itself.
pub fn bounded(client: Client, fence: Arc<Fence>, timeout: Duration) -> Client {
    let namespace = client.default_namespace().to_string();
    let service = tower::service_fn(move |request: Request<Body>| {
        let client = client.clone();
        let fence = Arc::clone(&fence);
        async move { send(&client, &fence, timeout, request).await }
    });
    Client::new(service, namespace)
}

async fn send(
    client: &Client,
    fence: &Fence,
    timeout: Duration,
    request: Request<Body>,
) -> Result<Response<Body>, tower::BoxError> {
    let what = format!("{} {}", request.method(), request.uri().path());
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    if watch {
        return Ok(client.send(request).await?);
    }
    let write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let start = Instant::now();
    let mut deadline = start + timeout;
    if write {
        match fence.writable() {
            Writable::No => return Err(Box::new(Refused::NotLeading(what))),
            Writable::Until(until) => deadline = deadline.min(until),
            Writable::Always => {}
        }
    }
    let answer = async {
        let response = client.send(request).await?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect_bytes().await?;
        Ok::<_, kube::Error>(Response::from_parts(parts, Body::from(bytes)))
    };
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Box::new(Refused::TimedOut {
            what,
            after: deadline.saturating_duration_since(start),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_opens_for_a_renewal_and_closes_at_its_deadline() {
        let fence = Fence::leading_never();
        assert_eq!(fence.writable(), Writable::No, "never led: no write");
        let until = Instant::now() + Duration::from_millis(50);
        fence.lead_until(until);
        assert_eq!(fence.writable(), Writable::Until(until));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            fence.writable(),
            Writable::No,
            "the deadline passed without a renewal"
        );
        fence.lead_until(Instant::now() + Duration::from_secs(5));
        fence.close();
        assert_eq!(fence.writable(), Writable::No);
        let single = Fence::always();
        single.close();
        assert_eq!(single.writable(), Writable::Always);
    }
}
