//! Alertmanager silences for disrupted nodes (`spec.health.alertmanager`): the client
//! (Alertmanager's v2 API, each request bounded by [`TIMEOUT`]) and [`sync`], which
//! lists baton's silences, asks `rollout::silence::ops` what to change, and changes it.
//!
//! Silences are a courtesy to whoever is on call, never a gate: an Alertmanager that is
//! down or refuses delays no grant and no reboot; it is logged, counted and said in a
//! Warning Event on the policy (once per reconcile that needed it).

use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use rollout::{
    Plan, Policy,
    silence::{self, Existing, Intent, Matcher, Op},
};

use crate::cluster::Cluster;

/// The bound on one request to Alertmanager.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Why Alertmanager could not be asked or told.
#[derive(Debug, Error, Clone)]
pub enum SilenceError {
    /// The request failed or timed out.
    #[error("request to Alertmanager failed: {0}")]
    Http(String),
    /// Alertmanager answered with an error status.
    #[error("Alertmanager answered HTTP {0}: {1}")]
    Status(u16, String),
    /// The answer was not the v2 API's JSON.
    #[error("unexpected answer from Alertmanager: {0}")]
    Decode(String),
}

/// A matcher as the v2 API writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiMatcher {
    name: String,
    value: String,
    is_regex: bool,
    #[serde(default = "yes")]
    is_equal: bool,
}

fn yes() -> bool {
    true
}

/// A silence as the v2 API writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiSilence {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    matchers: Vec<ApiMatcher>,
    starts_at: Timestamp,
    ends_at: Timestamp,
    created_by: String,
    comment: String,
    #[serde(default, skip_serializing)]
    status: Option<ApiStatus>,
}

#[derive(Debug, Clone, Deserialize)]
struct ApiStatus {
    state: String,
}

/// An Alertmanager v2 API client.
pub struct Alertmanager {
    http: reqwest::Client,
}

impl Alertmanager {
    /// A client whose every request is bounded by [`TIMEOUT`].
    pub fn new() -> Result<Alertmanager, SilenceError> {
        let http = crate::alert::http_client(TIMEOUT).map_err(SilenceError::Http)?;
        Ok(Alertmanager { http })
    }

    async fn check(response: reqwest::Response) -> Result<reqwest::Response, SilenceError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(SilenceError::Status(
            status.as_u16(),
            body.chars().take(200).collect(),
        ))
    }

    /// Every silence baton made at `url`.
    pub async fn list(&self, url: &str) -> Result<Vec<Existing>, SilenceError> {
        let response = self
            .http
            .get(format!("{}/api/v2/silences", url.trim_end_matches('/')))
            .send()
            .await
            .map_err(|e| SilenceError::Http(e.to_string()))?;
        let all: Vec<ApiSilence> = Self::check(response)
            .await?
            .json()
            .await
            .map_err(|e| SilenceError::Decode(e.to_string()))?;
        Ok(all
            .into_iter()
            .filter(|s| s.created_by == silence::CREATED_BY)
            .filter_map(|s| {
                let (policy, node) = silence::parse_comment(&s.comment)?;
                Some(Existing {
                    id: s.id?,
                    policy,
                    node,
                    starts_at: s.starts_at,
                    ends_at: s.ends_at,
                    live: s.status.is_some_and(|st| st.state != "expired"),
                })
            })
            .collect())
    }

    /// Carries out `op` for `policy` with `matchers` (templates) at `now`.
    pub async fn apply(
        &self,
        url: &str,
        policy: &str,
        matchers: &[Matcher],
        op: &Op,
        now: Timestamp,
    ) -> Result<(), SilenceError> {
        let base = url.trim_end_matches('/');
        let request = match op {
            Op::Expire { id, .. } => self.http.delete(format!("{base}/api/v2/silence/{id}")),
            Op::Create { node, ends_at } | Op::Update { node, ends_at, .. } => {
                let body = ApiSilence {
                    id: match op {
                        Op::Update { id, .. } => Some(id.clone()),
                        _ => None,
                    },
                    matchers: matchers
                        .iter()
                        .map(|m| m.for_node(node))
                        .map(|m| ApiMatcher {
                            name: m.name,
                            value: m.value,
                            is_regex: m.is_regex,
                            is_equal: m.is_equal,
                        })
                        .collect(),
                    // An update keeps the start: Alertmanager replaces a silence
                    // whose start changed.
                    starts_at: match op {
                        Op::Update { starts_at, .. } => *starts_at,
                        _ => now,
                    },
                    ends_at: *ends_at,
                    created_by: silence::CREATED_BY.into(),
                    comment: silence::comment(policy, node),
                    status: None,
                };
                self.http
                    .post(format!("{base}/api/v2/silences"))
                    .json(&body)
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| SilenceError::Http(e.to_string()))?;
        Self::check(response).await.map(drop)
    }
}

/// Brings the silences of `rules`' nodes in line with `plan` at `now`. Asks nothing
/// when no node of the plan is in flight, done or failed.
pub async fn sync<C: Cluster>(c: &C, rules: &Policy, plan: &Plan, now: Timestamp) {
    let Some(s) = &rules.silence else {
        return;
    };
    let intents: Vec<(String, Intent)> =
        silence::intents(plan.nodes.iter().map(|n| (n.node.as_str(), &n.action)));
    if intents.is_empty() {
        return;
    }
    let existing = match c.silences(&s.url).await {
        Ok(existing) => existing,
        Err(e) => {
            warn!(policy = %rules.name, error = %e, "cannot list Alertmanager silences");
            return;
        }
    };
    for op in silence::ops(&rules.name, &intents, &existing, s.extra, now) {
        let (node, what) = match &op {
            Op::Create { node, ends_at } => (node, format!("silenced its alerts until {ends_at}")),
            Op::Update { node, ends_at, .. } => {
                (node, format!("its alerts stay silenced until {ends_at}"))
            }
            Op::Expire { node, .. } => (
                node,
                "expired the silence of its alerts, so that it pages".to_string(),
            ),
        };
        match c.silence(&s.url, &rules.name, &s.matchers, &op, now).await {
            Ok(()) => {
                if !matches!(op, Op::Update { .. }) {
                    c.event(node, EventType::Normal, "Silenced", &what).await;
                }
            }
            Err(e) => {
                warn!(policy = %rules.name, %node, error = %e, "cannot change an Alertmanager silence");
                c.event(node, EventType::Warning, "SilenceFailed", &e.to_string())
                    .await;
            }
        }
    }
}
