//! Delivers rollout notifications (`spec.notify`) to webhooks, at least once and never
//! in the rollout's way.
//!
//! - A reconcile hands each notification to [`Notifier::send`], which never waits: it
//!   queues it (at most [`QUEUE`]; beyond that the newest is dropped and counted).
//! - One worker task per webhook delivers its queue in order (a failing webhook delays
//!   only its own notifications): each POST is bounded by
//!   [`TIMEOUT`] and retried [`ATTEMPTS`] times with doubling backoff from 1 s (about
//!   31 s in all), then given up, logged and counted.
//! - The same node event (policy, event, node) seen again within [`REPEAT`] is not
//!   sent twice: a reconcile that retries its step announces it once.
//! - The queue lives in the leader's memory: notifications it had not delivered when it
//!   stops are lost (at most its retry budget's worth); the new leader announces what
//!   it sees change from then on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crds::notify::NotifyFormat;
use rollout::notify::Notification;

use crate::metrics::Metrics;

/// The bound on one POST.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per notification and webhook.
pub const ATTEMPTS: u32 = 5;
/// Notifications waiting for delivery, at most.
pub const QUEUE: usize = 1000;
/// How long a node event is remembered, so that it is announced once.
pub const REPEAT: SignedDuration = SignedDuration::from_mins(10);

/// One notification for one webhook.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The webhook's URL.
    pub url: String,
    /// Its payload format.
    pub format: NotifyFormat,
    /// What to say.
    pub notification: Notification,
}

/// The queues to the delivery workers, one per webhook URL.
pub struct Notifier {
    http: reqwest::Client,
    queues: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    seen: Mutex<HashMap<String, (Timestamp, String)>>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// A notifier; each webhook's worker starts with its first notification and ends
    /// when the notifier is dropped.
    pub fn start(metrics: Arc<Metrics>) -> Result<Notifier, String> {
        Ok(Notifier {
            http: crate::alert::http_client(TIMEOUT)?,
            queues: Mutex::default(),
            seen: Mutex::default(),
            metrics,
        })
    }

    /// Queues `delivery` without waiting. A repeat is skipped: the same node event
    /// within [`REPEAT`], or the same policy event as the last one this webhook got for
    /// the policy (a reconcile that still reads the older status from its cache sees
    /// the same change again).
    pub fn send(&self, delivery: Delivery) {
        let n = &delivery.notification;
        let (key, value) = match &n.node {
            Some(node) => (
                format!(
                    "{}\u{0}{:?}\u{0}{node}\u{0}{}",
                    n.policy, n.event, delivery.url
                ),
                String::new(),
            ),
            None => (
                format!("{}\u{0}{}", n.policy, delivery.url),
                format!("{:?}", n.event),
            ),
        };
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Policy events (a non-empty last event) are kept; node events for REPEAT.
            seen.retain(|_, (at, last)| !last.is_empty() || n.time.duration_since(*at) < REPEAT);
            let repeat = match seen.get(&key) {
                Some((_, last)) if n.node.is_none() => *last == value,
                Some(_) => true,
                None => false,
            };
            if repeat {
                debug!(policy = %n.policy, event = ?n.event, "notification already sent");
                return;
            }
            seen.insert(key, (n.time, value));
        }
        let tx = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(delivery.url.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(deliver(self.http.clone(), rx, Arc::clone(&self.metrics)));
                tx
            })
            .clone();
        if tx.try_send(delivery).is_err() {
            warn!("notification queue full: dropped one");
            self.metrics.notified("dropped");
        }
    }
}

async fn deliver(http: reqwest::Client, mut rx: mpsc::Receiver<Delivery>, metrics: Arc<Metrics>) {
    while let Some(d) = rx.recv().await {
        let body = d.notification.body(d.format);
        let mut backoff = Duration::from_secs(1);
        let mut outcome = "failed";
        for attempt in 1..=ATTEMPTS {
            match http.post(&d.url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    outcome = "sent";
                    break;
                }
                Ok(r) => debug!(attempt, status = %r.status(), "webhook refused a notification"),
                Err(e) => debug!(attempt, error = %e, "webhook unreachable"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        if outcome == "failed" {
            warn!(
                policy = %d.notification.policy,
                event = ?d.notification.event,
                "gave up delivering a notification after {ATTEMPTS} attempts"
            );
        }
        metrics.notified(outcome);
    }
}

/// Announces the events of one reconcile of `policy` (`old` status read, `new` status
/// written, `plan` carried out) to each of its webhooks that asks for them.
pub async fn announce<C: crate::cluster::Cluster>(
    c: &C,
    policy: &crds::UpdatePolicy,
    new: &crds::UpdatePolicyStatus,
    plan: &rollout::Plan,
    now: Timestamp,
) {
    if policy.spec.notify.is_empty() {
        return;
    }
    let events = rollout::notify::events(&plan.policy, policy.status.as_ref(), new, plan, now);
    if events.is_empty() {
        return;
    }
    for target in &policy.spec.notify {
        let wanted: Vec<&Notification> = events
            .iter()
            .filter(|e| target.events.is_empty() || target.events.contains(&e.event))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let url = match (&target.url, &target.url_from) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(key)) => c.secret(&key.name, &key.key).await,
            (None, None) => None,
        };
        let Some(url) = url else {
            warn!(policy = %plan.policy, "a notify target has no usable URL (its Secret key is missing)");
            c.metrics().notified("failed");
            continue;
        };
        for n in wanted {
            c.notify(Delivery {
                url: url.clone(),
                format: target.format,
                notification: n.clone(),
            });
        }
    }
}
