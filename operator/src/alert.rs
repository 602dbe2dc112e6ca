//! Asks Prometheus which alerts are firing (`GET /api/v1/alerts`), for the alert gate.
//! Answers are kept for [`MAX_AGE`] so that a burst of reconciles makes one request;
//! the judging is `rollout::alert`'s.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use thiserror::Error;

use rollout::alert::{Alert, AlertGate};

/// How long an answer from Prometheus is reused.
pub const MAX_AGE: SignedDuration = SignedDuration::from_secs(10);

/// The bound on one query.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why Prometheus could not be asked.
#[derive(Debug, Error, Clone)]
pub enum QueryError {
    /// The request failed or timed out.
    #[error("request failed: {0}")]
    Http(String),
    /// Prometheus answered with an error status.
    #[error("Prometheus answered HTTP {0}")]
    Status(u16),
    /// The answer was not the alerts API's JSON.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// A Prometheus client with a short-lived cache per URL.
pub struct Alerts {
    http: reqwest::Client,
    cache: Mutex<HashMap<String, Answered>>,
}

/// One answer (or failure) from Prometheus and when it was had.
type Answered = (Timestamp, Result<Vec<Alert>, QueryError>);

#[derive(Deserialize)]
struct Answer {
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    alerts: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    labels: HashMap<String, String>,
    state: String,
}

/// An HTTP client for the monitoring stack (Prometheus, Alertmanager): every request
/// bounded by `timeout`, and the operator named in its user agent. Errors only when no
/// TLS backend can be set up (a start-up failure).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("baton-operator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

impl Alerts {
    /// A client; errors only when no TLS backend can be set up (a start-up failure).
    pub fn new() -> Result<Alerts, QueryError> {
        let http = http_client(TIMEOUT).map_err(QueryError::Http)?;
        Ok(Alerts {
            http,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Why `gate` is closed at `now`, or `None` when it is open. An error closes it.
    pub async fn verdict(&self, gate: &AlertGate, now: Timestamp) -> Option<String> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&gate.url)
            .filter(|(at, _)| now.duration_since(*at) < MAX_AGE)
            .map(|(_, answer)| answer.clone());
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let answer = self.query(&gate.url).await;
                if let Err(e) = &answer {
                    tracing::warn!(url = %gate.url, error = %e, "Prometheus alert gate query failed");
                }
                self.cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(gate.url.clone(), (now, answer.clone()));
                answer
            }
        };
        match answer {
            Ok(alerts) => gate.verdict(&alerts),
            Err(e) => Some(gate.unreachable(&e.to_string())),
        }
    }

    async fn query(&self, base: &str) -> Result<Vec<Alert>, QueryError> {
        let url = format!("{}/api/v1/alerts", base.trim_end_matches('/'));
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| QueryError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(QueryError::Status(response.status().as_u16()));
        }
        let answer: Answer = response
            .json()
            .await
            .map_err(|e| QueryError::Decode(e.to_string()))?;
        Ok(answer
            .data
            .alerts
            .into_iter()
            .map(|e| Alert {
                name: e.labels.get("alertname").cloned().unwrap_or_default(),
                state: e.state,
            })
            .collect())
    }
}
