//! Reading the API server's audit log: who made which request, to count API traffic.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, io};

/// One audited request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `get`, `list`, `watch`, `patch`, …
    pub verb: String,
    /// The caller.
    pub user: User,
    /// The request path.
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    /// When the request arrived.
    pub request_received_timestamp: jiff::Timestamp,
    /// The HTTP status code, when the request completed.
    #[serde(default)]
    pub response_status: Option<Status>,
    /// The object the request is about (for a list or watch by `metadata.name`, that
    /// name).
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
}

/// The object a request is about.
#[derive(Debug, Clone, Deserialize)]
pub struct ObjectRef {
    /// `nodes`, `leases`, …
    #[serde(default)]
    pub resource: String,
    /// The object's name, when the request names one.
    #[serde(default)]
    pub name: Option<String>,
}

impl Request {
    /// The name of the `resource` object this request is about, if it names one.
    pub fn names(&self, resource: &str) -> Option<&str> {
        self.object_ref
            .as_ref()
            .filter(|o| o.resource == resource)
            .and_then(|o| o.name.as_deref())
    }
}

/// The caller of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    /// Such as `system:serviceaccount:baton-system:baton-agent`.
    pub username: String,
}

/// A response's status.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// The HTTP code.
    #[serde(default)]
    pub code: Option<u16>,
}

/// Every request in the log (lines that do not parse are skipped).
pub fn read(path: &Path) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The username of a ServiceAccount.
pub fn service_account(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}
