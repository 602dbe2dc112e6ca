//! How the operator empties a node before its reboot.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Drain settings. The drain goes through the Eviction API, so PodDisruptionBudgets are
/// respected, and it is always bounded by `timeout`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// The longest a drain may take before `onTimeout` applies, such as `10m`.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new(crate::duration::POSITIVE_RULE).message("timeout must be a positive duration such as 90s, 10m or 1h"))]
    #[schemars(length(max = 32))]
    pub timeout: String,

    /// Overrides each pod's termination grace period when set. Unset uses the pod's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("gracePeriodSeconds must be 0 or more"))]
    pub grace_period_seconds: Option<i64>,

    /// Also evict pods that use emptyDir volumes (their data is lost). Without it such
    /// pods block the drain, as with `kubectl drain`.
    #[serde(default)]
    pub delete_empty_dir_data: bool,

    /// Pods matching this selector are left alone by the drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// How many evictions may be in flight at once.
    #[serde(default = "default_parallel")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("maxParallelEvictions must be from 1 to 1000"))]
    pub max_parallel_evictions: u32,

    /// What happens when the drain has not finished within `timeout`.
    #[serde(default)]
    pub on_timeout: OnTimeout,

    /// Label the node `node.kubernetes.io/exclude-from-external-load-balancers` while it
    /// is cordoned, so cloud load balancers stop sending it traffic first.
    #[serde(default)]
    pub exclude_from_load_balancers: bool,
}

/// What the operator does when a drain outlives its timeout.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum OnTimeout {
    /// Stop: do not reboot, uncordon the node if baton cordoned it, release its
    /// disruption slot and mark it failed (which counts towards `maxFailedNodes`).
    #[default]
    Abort,
    /// Delete the pods that are still there, bypassing PodDisruptionBudgets, wait for
    /// them to terminate, then reboot.
    Force,
    /// Leave the remaining pods where they are and reboot anyway (what FLUO does).
    Proceed,
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec {
            timeout: default_timeout(),
            grace_period_seconds: None,
            delete_empty_dir_data: false,
            pod_selector: None,
            max_parallel_evictions: default_parallel(),
            on_timeout: OnTimeout::default(),
            exclude_from_load_balancers: false,
        }
    }
}

fn default_timeout() -> String {
    "10m".into()
}

fn default_parallel() -> u32 {
    5
}
