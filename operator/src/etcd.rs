//! The etcd quorum guard's eyes and hands: etcd's members, their health and raft
//! progress, read through etcd's v3 JSON gateway over mutual TLS; and leadership moved
//! away from a member (`MoveLeader`). Every request is bounded; what cannot be read
//! becomes an unhealthy member or [`Etcd::Unreachable`], never a guess that passes.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::join_all;
use rollout::etcd::{Etcd, Member};
use serde::Deserialize;
use thiserror::Error;
use tracing::debug;

/// The bound on each request to a member.
const TIMEOUT: Duration = Duration::from_secs(3);

/// How long one observation serves the reconciles that ask for it.
const FRESH: Duration = Duration::from_secs(1);

/// How baton reaches etcd.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EtcdAccess {
    /// etcd client URLs to read the member list from (comma-separated), such as
    /// `https://10.0.0.1:2379`. Unset: etcd is not observed, and the quorum guard says
    /// so (control-plane nodes still go one at a time).
    #[arg(
        long = "etcd-endpoints",
        env = "BATON_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
    /// The CA that signed etcd's serving certificates (PEM).
    #[arg(long = "etcd-ca-file", env = "BATON_ETCD_CA_FILE")]
    pub ca: Option<PathBuf>,
    /// The client certificate baton presents to etcd (PEM).
    #[arg(long = "etcd-cert-file", env = "BATON_ETCD_CERT_FILE")]
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long = "etcd-key-file", env = "BATON_ETCD_KEY_FILE")]
    pub key: Option<PathBuf>,
}

/// What can go wrong talking to etcd.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// A certificate or key file could not be read or used (a start-up failure).
    #[error("etcd TLS: {0}")]
    Tls(String),
    /// A request failed or was not answered in time.
    #[error("{url}: {error}")]
    Request {
        /// Where.
        url: String,
        /// What.
        error: String,
    },
    /// etcd answered with an error.
    #[error("{url}: etcd refused: {message}")]
    Refused {
        /// Where.
        url: String,
        /// etcd's message.
        message: String,
    },
}

/// The etcd client the operator shares between reconciles.
pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The last observation (or why there was none), so that the reconciles of one
    /// moment share it and an unreachable etcd costs one timeout, not one per policy.
    last: Mutex<Option<(Instant, Reading)>>,
}

/// One reading of every member, or why there was none.
type Reading = Result<Vec<Observed>, String>;

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// One member as read, before it is matched to a node.
#[derive(Debug, Clone)]
struct Observed {
    id: u64,
    name: String,
    peer_urls: Vec<String>,
    client_url: Option<String>,
    learner: bool,
    status: Result<Status, String>,
}

#[derive(Debug, Clone)]
struct Status {
    leader: u64,
    raft_index: u64,
}

impl EtcdClient {
    /// A client for `access`, or `None` when no endpoint is configured. Fails only on
    /// unreadable or unusable certificate files (a start-up failure).
    pub fn new(access: &EtcdAccess) -> Result<Option<EtcdClient>, EtcdError> {
        if access.endpoints.is_empty() {
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| EtcdError::Tls(format!("{}: {e}", path.display())))
        };
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .user_agent(concat!("baton-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &access.ca {
            let cert = reqwest::Certificate::from_pem(&read(ca)?)
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        match (&access.cert, &access.key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read(key)?);
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| EtcdError::Tls(format!("{}: {e}", cert.display())))?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Tls(
                    "--etcd-cert-file and --etcd-key-file go together".into(),
                ));
            }
        }
        let http = builder.build().map_err(|e| EtcdError::Tls(e.to_string()))?;
        Ok(Some(EtcdClient {
            http,
            endpoints: access.endpoints.clone(),
            last: Mutex::new(None),
        }))
    }

    /// etcd as it is now (or within the last second), its members matched to `nodes`.
    pub async fn observe(&self, nodes: &[std::sync::Arc<crate::cache::CachedNode>]) -> Etcd {
        let cached = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FRESH)
            .map(|(_, m)| m.clone());
        let observed = match cached {
            Some(m) => m,
            None => {
                let read = self.read().await;
                *self
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((Instant::now(), read.clone()));
                read
            }
        };
        let observed = match observed {
            Ok(m) => m,
            Err(why) => return Etcd::Unreachable(why),
        };
        let addresses: Vec<(&str, Vec<&str>)> = nodes
            .iter()
            .map(|n| {
                let addrs = n.internal_ips.iter().map(String::as_str).collect();
                (n.view.name.as_str(), addrs)
            })
            .collect();
        let leader = observed
            .iter()
            .filter_map(|m| m.status.as_ref().ok())
            .map(|s| s.leader)
            .find(|l| *l != 0);
        Etcd::Members(
            observed
                .into_iter()
                .map(|m| {
                    let node = rollout::etcd::node_of(&m.name, &m.peer_urls, addresses.clone());
                    let (healthy, problem, raft_index) = match &m.status {
                        Ok(s) if s.leader == 0 => {
                            (false, Some("knows no leader".into()), Some(s.raft_index))
                        }
                        Ok(s) => (true, None, Some(s.raft_index)),
                        Err(e) => (false, Some(e.clone()), None),
                    };
                    Member {
                        leader: leader == Some(m.id),
                        id: m.id,
                        name: m.name,
                        node,
                        client_url: m.client_url,
                        healthy,
                        problem,
                        raft_index,
                        learner: m.learner,
                    }
                })
                .collect(),
        )
    }

    /// Moves leadership from the leader (at `leader_url`) to the member `to`. etcd
    /// answers once the new leader has taken over (or the transfer failed).
    pub async fn move_leader(&self, leader_url: &str, to: u64) -> Result<(), EtcdError> {
        let body = serde_json::json!({ "targetID": to.to_string() });
        let _: serde_json::Value = self
            .post(leader_url, "/v3/maintenance/transfer-leadership", &body)
            .await?;
        // The next observation must see the new leader, not the cached old one.
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        Ok(())
    }

    /// The member list (from the first endpoint that answers), then each member's
    /// status and health, concurrently.
    async fn read(&self) -> Result<Vec<Observed>, String> {
        let mut errors = Vec::new();
        let mut list = None;
        for endpoint in &self.endpoints {
            match self
                .post::<MemberList>(endpoint, "/v3/cluster/member/list", &serde_json::json!({}))
                .await
            {
                Ok(l) => {
                    list = Some(l);
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(list) = list else {
            return Err(errors.join("; "));
        };
        let reads = list.members.into_iter().map(|m| async move {
            let client_url = m.client_urls.first().cloned();
            let status = match &client_url {
                None => Err("not started (it advertises no client URL)".to_string()),
                Some(url) => self.member_status(url).await.map_err(|e| e.to_string()),
            };
            Observed {
                id: m.id.0,
                name: m.name,
                peer_urls: m.peer_urls,
                client_url,
                learner: m.is_learner,
                status,
            }
        });
        Ok(join_all(reads).await)
    }

    /// One member's status, healthy only if it also serves a quorum read (`/health`)
    /// and raises no alarm.
    async fn member_status(&self, url: &str) -> Result<Status, EtcdError> {
        let empty = serde_json::json!({});
        let (status, health) = tokio::join!(
            self.post::<StatusResponse>(url, "/v3/maintenance/status", &empty),
            self.health(url)
        );
        let status = status?;
        health?;
        if let Some(e) = status.errors.first() {
            return Err(EtcdError::Refused {
                url: url.to_string(),
                message: e.clone(),
            });
        }
        Ok(Status {
            leader: status.leader.0,
            raft_index: status.raft_index.0,
        })
    }

    async fn health(&self, url: &str) -> Result<(), EtcdError> {
        let full = format!("{}/health", url.trim_end_matches('/'));
        let health: Health = self
            .http
            .get(&full)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| request(&full, &e))?
            .json()
            .await
            .map_err(|e| request(&full, &e))?;
        if health.health == "true" {
            Ok(())
        } else {
            Err(EtcdError::Refused {
                url: full,
                message: format!("unhealthy: {}", health.reason),
            })
        }
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, EtcdError> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        debug!(%url, "etcd request");
        let response = self
            .http
            .post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| request(&url, &e))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<GatewayError>(&text)
                .map(|e| e.message)
                .unwrap_or_else(|_| format!("HTTP {status}: {text}"));
            return Err(EtcdError::Refused { url, message });
        }
        response.json().await.map_err(|e| request(&url, &e))
    }
}

fn request(url: &str, e: &reqwest::Error) -> EtcdError {
    let error = if e.is_timeout() {
        format!("no answer within {}s", TIMEOUT.as_secs())
    } else {
        // The innermost cause says what happened (connection refused, bad certificate).
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    };
    EtcdError::Request {
        url: url.to_string(),
        error,
    }
}

/// A uint64 as the gateway encodes it: a decimal string.
#[derive(Debug, Default, Clone, Copy)]
struct U64(u64);

impl<'de> Deserialize<'de> for U64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<U64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Number(u64),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(U64(n)),
            Either::Text(s) => s.parse().map(U64).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Deserialize)]
struct MemberList {
    #[serde(default)]
    members: Vec<ListedMember>,
}

#[derive(Debug, Deserialize)]
struct ListedMember {
    #[serde(rename = "ID")]
    id: U64,
    #[serde(default)]
    name: String,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    is_learner: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusResponse {
    #[serde(default)]
    leader: U64,
    #[serde(default)]
    raft_index: U64,
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Health {
    health: String,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
struct GatewayError {
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_answers_parse_with_their_uint64_strings() {
        let status: StatusResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"1","member_id":"2"},"version":"3.7.3","leader":"13668033151171901709","raftIndex":"4","raftTerm":"2"}"#,
        )
        .unwrap();
        assert_eq!(status.leader.0, 13668033151171901709);
        assert_eq!(status.raft_index.0, 4);
        let list: MemberList = serde_json::from_str(
            r#"{"members":[{"ID":"13668033151171901709","name":"cp-1","peerURLs":["https://10.0.0.1:2380"],"clientURLs":["https://10.0.0.1:2379"]},{"ID":"7","peerURLs":["https://10.0.0.4:2380"],"isLearner":true}]}"#,
        )
        .unwrap();
        assert_eq!(list.members[0].name, "cp-1");
        assert!(list.members[1].client_urls.is_empty() && list.members[1].is_learner);
    }

    #[test]
    fn no_endpoint_means_etcd_is_not_observed() {
        let access = EtcdAccess {
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
        };
        assert!(EtcdClient::new(&access).unwrap().is_none());
    }
}
