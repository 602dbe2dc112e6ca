//! `spec.notify`: where a policy's rollout is announced (webhooks).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// One webhook that hears about a rollout.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlFrom)").message("set exactly one of url and urlFrom"))]
pub struct NotifyTarget {
    /// The URL to POST to (http:// or https://).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("url must be an http:// or https:// URL, such as https://hooks.example.com/baton"))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// A Secret key, in the operator's namespace, holding the URL (for a URL that
    /// carries a token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretKey>,
    /// Which events; every event when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6))]
    pub events: Vec<NotifyEvent>,
    /// The payload: baton's JSON (`json`, schema in docs/operations.md) or a Slack
    /// incoming-webhook message (`slack`).
    #[serde(default)]
    pub format: NotifyFormat,
}

/// A key of a Secret in the operator's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What a notification announces.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, schemars::JsonSchema,
)]
pub enum NotifyEvent {
    /// The first grant of a rollout (the policy starts progressing).
    Started,
    /// A node was updated, verified and released.
    NodeDone,
    /// A node failed.
    NodeFailed,
    /// The pool halted.
    Halted,
    /// The pool resumed after a halt.
    Resumed,
    /// Every node is up to date and nothing is in progress.
    Completed,
}

/// A notification's payload format.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// baton's JSON.
    #[default]
    Json,
    /// A Slack incoming-webhook message (`{"text": …}`).
    Slack,
}
