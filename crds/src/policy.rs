//! `UpdatePolicy`: which nodes baton updates, how many at once, when, and how.

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector, Time},
    util::intstr::IntOrString,
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{DrainSpec, HealthSpec, HooksSpec, MaintenanceWindow, Release};

/// The desired rollout behaviour for one pool of nodes (cluster-scoped).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "baton.dev",
    version = "v1alpha1",
    kind = "UpdatePolicy",
    plural = "updatepolicies",
    shortname = "upol",
    category = "baton",
    status = "UpdatePolicyStatus",
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodes"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.upToDate"}"#,
    printcolumn = r#"{"name":"In-Progress","type":"integer","jsonPath":".status.inProgress"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Window","type":"string","jsonPath":".status.window"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused"}"#,
    printcolumn = r#"{"name":"Next-Window","type":"string","priority":1,"jsonPath":".status.nextWindowLocal","description":"When the next maintenance window opens, in its own time zone (while the windows are closed)"}"#,
    printcolumn = r#"{"name":"Condition","type":"string","priority":1,"jsonPath":".status.conditions[?(@.status==\"True\")].type","description":"The first true condition: a problem (InvalidSpec, Overlapping, Halted, Paused, GateClosed) before Progressing and Ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicySpec {
    /// The nodes this policy governs. Empty selects every node. A node selected by two
    /// policies is an error reported on both, and neither touches it.
    #[serde(default)]
    pub node_selector: LabelSelector,

    /// How many selected nodes may be disrupted at once: a count (`2`) or a percentage
    /// (`"20%"`, rounded down, minimum 1). Nodes that are NotReady, cordoned by someone
    /// else or failed count against it.
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new(crate::budget::RULE).message(crate::budget::RULE_MESSAGE))]
    pub max_unavailable: IntOrString,

    /// At most this many nodes disrupted at once in any one zone (the `ordering.zoneLabel`
    /// label), on top of `maxUnavailable`: a count (`1`) or a percentage of the zone's
    /// selected nodes (`"50%"`, rounded down, minimum 1). Nodes without the label form
    /// one zone. Unset: no per-zone cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(crate::budget::RULE).message(crate::budget::PER_ZONE_MESSAGE))]
    pub max_unavailable_per_zone: Option<IntOrString>,

    /// When disruptions may start. Several windows combine; an empty list means always.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub maintenance_windows: Vec<MaintenanceWindow>,

    /// Freezes: absolute ranges of local time in which no new disruption starts, even in
    /// an open window; a node already in flight finishes. Windows, `windowMode: Fit` and
    /// the next window all account for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub freezes: Vec<crate::Freeze>,

    /// Canary promotion: this pool reboots into a release version only once every node of
    /// the `after` policy's pool has run that same version, done, for `soak`. Chains
    /// (dev → stage → prod) work; a cycle is an invalid spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,

    /// An urgent release (a CVE fix): if it is not done on every node by `deadline`,
    /// windows (and, with `overrideFreezes`, freezes) stop gating it. The budget,
    /// PodDisruptionBudgets, blocking pods, the alert gate, halts and the etcd guard still
    /// hold. `kubectl baton urgent <policy> --by <time>` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgency: Option<Urgency>,

    /// Whether a window gates only the start of a node's disruption (`Start`), or also
    /// requires `health.rebootTimeout` to fit before the window closes (`Fit`).
    #[serde(default)]
    pub window_mode: WindowMode,

    /// How nodes are drained.
    #[serde(default)]
    pub drain: DrainSpec,

    /// Reboot timeout, settle time and the gates that block new grants.
    #[serde(default)]
    pub health: HealthSpec,

    /// Before- and after-reboot hooks.
    #[serde(default)]
    pub hooks: HooksSpec,

    /// When the pool halts.
    #[serde(default)]
    pub failure_policy: FailurePolicy,

    /// The order nodes are taken in.
    #[serde(default)]
    pub ordering: OrderingSpec,

    /// Stop starting new disruptions. Disruptions in flight run to completion.
    #[serde(default)]
    pub paused: bool,

    /// The OS image the native A/B backend installs. Unused by the flatcar and sentinel
    /// backends, whose target comes from the node itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,

    /// Webhooks that hear about the rollout: started, each node done or failed,
    /// halted, resumed, completed. Delivered at least once, never holding the rollout
    /// back (docs/operations.md, "Notifications").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub notify: Vec<crate::notify::NotifyTarget>,
}

/// How a maintenance window gates a disruption.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum WindowMode {
    /// A disruption may start at any moment a window is open.
    #[default]
    Start,
    /// A disruption may start only when `health.rebootTimeout` ends before the window
    /// closes.
    Fit,
}

/// Where a release must have soaked first.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// The UpdatePolicy whose pool goes first.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("after must name an UpdatePolicy (a DNS subdomain name such as canary)"))]
    #[schemars(length(min = 1, max = 253))]
    pub after: String,
    /// How long every node of that pool must have been done on the version.
    #[serde(default = "default_soak")]
    #[x_kube(validation = Rule::new(crate::duration::NON_NEGATIVE_RULE).message("soak must be a duration such as 24h or 90m"))]
    #[schemars(length(max = 32))]
    pub soak: String,
}

fn default_soak() -> String {
    "24h".into()
}

/// A pool done on one release version, and since when (for the pools promoted after it).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Completion {
    /// The release version every node of the pool runs, done.
    pub version: String,
    /// Since when.
    pub since: Time,
}

/// An urgent release's deadline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Urgency {
    /// RFC 3339, such as `2026-12-05T00:00:00Z` or `2026-12-05T01:00:00+01:00`.
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')").message("deadline must be an RFC 3339 time such as 2026-12-05T00:00:00Z"))]
    #[schemars(length(max = 40))]
    pub deadline: String,
    /// Past the deadline, freezes stop gating too (off: freezes still hold).
    #[serde(default)]
    pub override_freezes: bool,
}

/// When a pool stops making new grants.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Once this many nodes have failed, the pool halts until an admin clears the
    /// failures (see docs/operations.md, "Resuming a halted pool").
    #[serde(default = "default_max_failed")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxFailedNodes must be at least 1"))]
    pub max_failed_nodes: u32,
}

/// The order in which nodes are taken.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderingSpec {
    /// Disrupt nodes of one zone at a time, even when the budget would allow nodes in
    /// several zones.
    #[serde(default = "default_true")]
    pub one_zone_at_a_time: bool,
    /// The node label that names a node's zone.
    #[serde(default = "default_zone_label")]
    #[x_kube(validation = Rule::new("size(self) > 0").message("zoneLabel must name a node label, such as topology.kubernetes.io/zone"))]
    #[schemars(length(max = 316))]
    pub zone_label: String,
    /// Where control-plane nodes (`node-role.kubernetes.io/control-plane`) go: `Last`
    /// (after every worker of the pool, the default), `First` or `Any` (in the usual
    /// order). Whatever this says, they go one at a time, and only while etcd keeps
    /// quorum with that node down (see docs/rollout.md, "Control-plane nodes").
    #[serde(default)]
    pub control_plane: ControlPlaneOrder,
}

/// Where control-plane nodes go in a rollout.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum ControlPlaneOrder {
    /// After every worker of the pool that asks for a reboot.
    #[default]
    Last,
    /// Before any worker of the pool.
    First,
    /// In the usual order (operator's node last, then zone, age and name).
    Any,
}

/// What baton observes of its pool, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicyStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Halted`, `Paused`, `InvalidSpec`, `Overlapping`,
    /// `GateClosed` and (for a pool with control-plane nodes) `EtcdHeld`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Nodes the policy selects.
    #[serde(default)]
    pub nodes: u32,
    /// Nodes on the target version with nothing left to do.
    #[serde(default)]
    pub up_to_date: u32,
    /// Nodes that need an update and have not started.
    #[serde(default)]
    pub waiting: u32,
    /// Nodes between grant and release.
    #[serde(default)]
    pub in_progress: u32,
    /// Nodes marked failed.
    #[serde(default)]
    pub failed: u32,
    /// Nodes that hold a reboot lease now.
    #[serde(default)]
    pub lease_holders: Vec<String>,
    /// `Open`, `Closed` or `Always`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// When the next window opens, if it is closed now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<Time>,
    /// `nextWindow` in the time zone of the window that opens then, such as
    /// `2026-12-05 22:00 Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window_local: Option<String>,
    /// The freeze in force now (`active until …`), or else the next one (`next …`),
    /// with its reason, in its own time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<String>,
    /// Every node of the pool runs `spec.release.version`, done, since then: what a
    /// pool promoted after this one waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<Completion>,
}

impl UpdatePolicyStatus {
    /// This status as the body of a JSON merge patch that replaces the whole status:
    /// a field now empty is sent as `null`, so that the API server drops what an older
    /// status had (a skipped field would leave it there for good, and the operator
    /// would see a difference at every reconcile).
    pub fn merge_patch(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(fields) = value.as_object_mut() {
            for field in [
                "observedGeneration",
                "window",
                "nextWindow",
                "nextWindowLocal",
                "freeze",
                "completed",
            ] {
                fields.entry(field).or_insert(serde_json::Value::Null);
            }
        }
        serde_json::json!({ "status": value })
    }
}

/// The finalizer the operator puts on every UpdatePolicy: deleting a policy first ends
/// its grants (undoing baton's cordons and releasing its Leases; a reboot under way
/// finishes first), and only then does the policy go.
pub const FINALIZER: &str = "baton.dev/end-grants";

/// The condition types baton sets on an `UpdatePolicy`.
pub mod condition {
    /// The policy is valid and its pool is not halted.
    pub const READY: &str = "Ready";
    /// At least one node is between grant and release.
    pub const PROGRESSING: &str = "Progressing";
    /// Failures reached `maxFailedNodes`: no new grants until an admin acts.
    pub const HALTED: &str = "Halted";
    /// `spec.paused` is set.
    pub const PAUSED: &str = "Paused";
    /// The spec cannot be used as written; the message says why.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A health gate (the Prometheus alert gate) holds new grants back; reboots already
    /// under way carry on.
    pub const GATE_CLOSED: &str = "GateClosed";
    /// Some nodes this policy selects are selected by another policy too: baton leaves
    /// them alone until the selectors are disjoint (reported on every policy involved).
    pub const OVERLAPPING: &str = "Overlapping";
    /// The etcd quorum guard holds a control-plane node back (a member unhealthy,
    /// behind its leader or unreachable, or a rebooted member not yet caught up); the
    /// message names the node and why. False says what the guard sees (etcd healthy,
    /// external, or not observed). Absent when the pool has no control-plane node.
    pub const ETCD_HELD: &str = "EtcdHeld";
    /// `spec.urgency`'s deadline passed with nodes not yet updated: windows (and, if
    /// asked, freezes) no longer gate them; the message says since when.
    pub const URGENT: &str = "Urgent";
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            max_failed_nodes: default_max_failed(),
        }
    }
}

impl Default for OrderingSpec {
    fn default() -> Self {
        OrderingSpec {
            one_zone_at_a_time: true,
            zone_label: default_zone_label(),
            control_plane: ControlPlaneOrder::default(),
        }
    }
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

fn default_max_failed() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

fn default_zone_label() -> String {
    "topology.kubernetes.io/zone".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_spec_gets_every_default() {
        let spec: UpdatePolicySpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.max_unavailable, IntOrString::Int(1));
        assert!(spec.maintenance_windows.is_empty());
        assert_eq!(spec.window_mode, WindowMode::Start);
        assert_eq!(spec.drain, DrainSpec::default());
        assert_eq!(spec.drain.timeout, "10m");
        assert_eq!(spec.drain.max_parallel_evictions, 5);
        assert_eq!(spec.drain.on_timeout, crate::OnTimeout::Abort);
        assert_eq!(spec.health.reboot_timeout, "30m");
        assert_eq!(spec.health.settle_time, "0s");
        assert_eq!(spec.failure_policy.max_failed_nodes, 1);
        assert!(spec.ordering.one_zone_at_a_time);
        assert_eq!(spec.ordering.zone_label, "topology.kubernetes.io/zone");
        assert!(!spec.paused);
        assert!(spec.release.is_none());
        assert_eq!(spec.hooks, HooksSpec::default());
    }

    #[test]
    fn a_status_patch_names_every_field_so_an_old_value_never_survives() {
        let schema = serde_json::to_value(schemars::schema_for!(UpdatePolicyStatus)).unwrap();
        let fields = schema["properties"].as_object().unwrap();
        let patch = UpdatePolicyStatus::default().merge_patch();
        for field in fields.keys() {
            assert!(patch["status"].get(field).is_some(), "{field} is missing");
        }
        // A window gone stays gone once merged over a status that had one.
        let mut stored = serde_json::json!({"status": {"window": "Closed", "nextWindow": "2026-03-09T01:30:00Z"}});
        let now = UpdatePolicyStatus {
            window: Some("Always".into()),
            ..Default::default()
        };
        // RFC 7386, as the API server applies a merge patch.
        json_patch::merge(&mut stored, &now.merge_patch());
        let back: UpdatePolicyStatus = serde_json::from_value(stored["status"].clone()).unwrap();
        assert_eq!(back, now);
    }

    #[test]
    fn a_window_defaults_to_utc() {
        let w: MaintenanceWindow =
            serde_json::from_str(r#"{"schedule":"0 2 * * *","duration":"4h"}"#).unwrap();
        assert_eq!(w.time_zone, "UTC");
    }

    #[test]
    fn a_hook_defaults_to_fifteen_minutes() {
        let h: crate::Hook = serde_json::from_str(r#"{"annotations":["a"]}"#).unwrap();
        assert_eq!(h.timeout, "15m");
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = UpdatePolicyStatus {
            up_to_date: 3,
            in_progress: 1,
            lease_holders: vec!["n1".into()],
            window: Some("Open".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["upToDate"], 3);
        assert_eq!(json["leaseHolders"][0], "n1");
        let back: UpdatePolicyStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
