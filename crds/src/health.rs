//! Health gates: how long a node may take to come back, and what blocks new grants.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Health settings. Gates block *new* grants only; they never interrupt a reboot that
/// has already started.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// How long a node may take, from its reboot grant, to come back Ready on the new
    /// version and report healthy. Past it the node is marked failed.
    #[serde(default = "default_reboot_timeout")]
    #[x_kube(validation = Rule::new(crate::duration::POSITIVE_RULE).message("rebootTimeout must be a positive duration such as 20m or 1h"))]
    #[schemars(length(max = 32))]
    pub reboot_timeout: String,

    /// The wait after a node is done before its disruption slot goes to the next node.
    #[serde(default = "default_settle_time")]
    #[x_kube(validation = Rule::new(crate::duration::NON_NEGATIVE_RULE).message("settleTime must be a duration of 0s or more, such as 0s, 30s or 5m"))]
    #[schemars(length(max = 32))]
    pub settle_time: String,

    /// A pod matching any of these selectors blocks grants to the node it runs on (as
    /// kured's `--blocking-pod-selector` does). Pending pods are not counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub blocking_pod_selectors: Vec<LabelSelector>,

    /// While Prometheus reports firing alerts (other than the filtered ones), no new
    /// grants are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusGate>,

    /// Silence a node's alerts in Alertmanager while baton disrupts it: from its grant
    /// until it is done plus `extra`; a node that fails has its silence expired at once,
    /// so that it pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<AlertmanagerSilence>,
}

/// Alertmanager silences for disrupted nodes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerSilence {
    /// The Alertmanager base URL, such as `http://alertmanager.monitoring:9093`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("url must be an http:// or https:// URL, such as http://alertmanager.monitoring:9093"))]
    #[schemars(length(max = 2048))]
    pub url: String,

    /// The silence's matchers, `label=value`, `label!=value`, `label=~regex` or
    /// `label!~regex`; `{{node}}` is replaced by the node's name (escaped in a regex).
    #[x_kube(validation = Rule::new("self.all(m, m.matches('^[a-zA-Z_][a-zA-Z0-9_]*(=|!=|=~|!~).+$'))").message("each matcher must be label=value, label!=value, label=~regex or label!~regex, such as instance=~\"{{node}}:.*\""))]
    #[schemars(length(min = 1, max = 16), inner(length(max = 256)))]
    pub matchers: Vec<String>,

    /// How long the silence lasts after the node is done.
    #[serde(default = "default_extra")]
    #[x_kube(validation = Rule::new(crate::duration::NON_NEGATIVE_RULE).message("extra must be a duration of 0s or more, such as 10m"))]
    #[schemars(length(max = 32))]
    pub extra: String,
}

fn default_extra() -> String {
    "10m".into()
}

/// The Prometheus alert gate.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusGate {
    /// The Prometheus base URL, such as `http://prometheus.monitoring:9090`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("url must be an http:// or https:// URL, such as http://prometheus.monitoring:9090"))]
    #[schemars(length(max = 2048))]
    pub url: String,

    /// A regular expression over alert names: matching alerts are ignored by the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub alert_filter: Option<String>,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            reboot_timeout: default_reboot_timeout(),
            settle_time: default_settle_time(),
            blocking_pod_selectors: Vec::new(),
            prometheus: None,
            alertmanager: None,
        }
    }
}

fn default_reboot_timeout() -> String {
    "30m".into()
}

fn default_settle_time() -> String {
    "0s".into()
}
