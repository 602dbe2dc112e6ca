//! Before- and after-reboot hooks, FLUO style: the operator sets a label on the node,
//! hook workloads (typically DaemonSets selecting that label) do their work and answer
//! by setting annotations to `"true"`.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The hooks of a policy. With no hooks the operator does not wait.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HooksSpec {
    /// Runs once the node is cordoned, before it is drained (as in FLUO). The operator
    /// labels the node `baton.dev/before-reboot=true` and waits for every listed
    /// annotation; the timeout runs from the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_reboot: Option<Hook>,
    /// Runs after the node is back on the new version, before it is uncordoned. The
    /// operator labels the node `baton.dev/after-reboot=true` and waits likewise; the
    /// timeout runs from the end of the reboot's own bound (`health.rebootTimeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_reboot: Option<Hook>,
}

/// One hook: the annotations the operator waits for, and for how long.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// Node annotation keys that must all be `"true"` before the rollout goes on.
    #[x_kube(validation = Rule::new("size(self) >= 1").message("a hook must wait for at least one annotation"))]
    #[schemars(length(max = 16), inner(length(max = 316)))]
    pub annotations: Vec<String>,
    /// How long to wait. Past it the node is marked failed.
    #[serde(default = "default_hook_timeout")]
    #[x_kube(validation = Rule::new(crate::duration::POSITIVE_RULE).message("timeout must be a positive duration such as 5m or 1h"))]
    #[schemars(length(max = 32))]
    pub timeout: String,
}

fn default_hook_timeout() -> String {
    "15m".into()
}
