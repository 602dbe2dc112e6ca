//! Changes to a Node's protocol marks, as merge patches: cordon and uncordon with
//! baton's own mark, the reboot grant, hook labels, the failure mark and the admin's
//! retry. The operator and `kubectl baton` build every patch here; each carries the
//! observed `resourceVersion`, so a change decided on a stale view fails with a
//! conflict instead of overwriting someone else's (such as an admin's cordon).

use k8s_openapi::api::core::v1::Node;
use serde_json::{Map, Value, json};

use crate::protocol::{self, BootId, Message, Version};

/// The label that takes a node out of cloud load balancers.
pub const EXCLUDE_FROM_LB: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// A set of changes to one Node.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodePatch {
    unschedulable: Option<bool>,
    annotations: Map<String, Value>,
    labels: Map<String, Value>,
}

impl NodePatch {
    /// Cordon, recording that baton did (and, if asked, leave load balancers).
    pub fn cordon(exclude_from_lb: bool) -> NodePatch {
        let mut p = NodePatch {
            unschedulable: Some(true),
            ..Default::default()
        };
        p.annotations.insert(
            protocol::CORDONED.name.into(),
            protocol::CORDONED.format(&true).into(),
        );
        if exclude_from_lb {
            p.labels.insert(EXCLUDE_FROM_LB.into(), "true".into());
            p.annotations.insert(
                protocol::LB_EXCLUDED.name.into(),
                protocol::LB_EXCLUDED.format(&true).into(),
            );
        }
        p
    }

    /// Uncordon a node baton cordoned, undoing only what baton added.
    pub fn uncordon(node: &Node) -> NodePatch {
        let mut p = NodePatch {
            unschedulable: Some(false),
            ..Default::default()
        };
        p.annotations
            .insert(protocol::CORDONED.name.into(), Value::Null);
        let lb_excluded = protocol::LB_EXCLUDED
            .read(node.metadata.annotations.as_ref())
            .ok()
            .flatten()
            .unwrap_or(false);
        if lb_excluded {
            p.labels.insert(EXCLUDE_FROM_LB.into(), Value::Null);
            p.annotations
                .insert(protocol::LB_EXCLUDED.name.into(), Value::Null);
        }
        p
    }

    /// Publish the release the node's agent should stage.
    pub fn desire(version: &Version, release: Option<&protocol::ReleaseRef>) -> NodePatch {
        let mut p = NodePatch::default();
        p.annotations.insert(
            protocol::DESIRED_VERSION.name.into(),
            protocol::DESIRED_VERSION.format(version).into(),
        );
        p.annotations.insert(
            protocol::DESIRED_RELEASE.name.into(),
            release.map_or(Value::Null, |r| protocol::DESIRED_RELEASE.format(r).into()),
        );
        p
    }

    /// Let the agent reboot out of `boot`.
    pub fn allow_reboot(boot: &BootId) -> NodePatch {
        let mut p = NodePatch::default();
        p.annotations.insert(
            protocol::REBOOT_OK.name.into(),
            protocol::REBOOT_OK.format(boot).into(),
        );
        p
    }

    /// Ask hook workloads to run (`before` or after the reboot).
    pub fn hook_label(before: bool) -> NodePatch {
        let key = if before {
            protocol::BEFORE_REBOOT.name
        } else {
            protocol::AFTER_REBOOT.name
        };
        let mut p = NodePatch::default();
        p.labels.insert(key.into(), "true".into());
        p
    }

    /// Remove the hook labels and the grant: the node is done or released.
    pub fn clear_rollout_marks() -> NodePatch {
        let mut p = NodePatch::default();
        p.labels
            .insert(protocol::BEFORE_REBOOT.name.into(), Value::Null);
        p.labels
            .insert(protocol::AFTER_REBOOT.name.into(), Value::Null);
        p.annotations
            .insert(protocol::REBOOT_OK.name.into(), Value::Null);
        p
    }

    /// Mark the node failed, with the reason. The grant ends in the same write: a
    /// failed node must never reboot on a `baton.dev/reboot-ok` left behind.
    pub fn fail(reason: &str) -> NodePatch {
        let mut p = NodePatch::default();
        let line: String = reason.replace('\n', " ").chars().take(1024).collect();
        p.annotations.insert(
            protocol::FAILURE.name.into(),
            protocol::FAILURE.format(&Message(line)).into(),
        );
        p.annotations
            .insert(protocol::REBOOT_OK.name.into(), Value::Null);
        p
    }

    /// End the node's grant: the grant and hook labels go, and baton's cordon (only
    /// baton's) is undone. Sent before the Lease is deleted, never after.
    pub fn end_grant(node: &Node) -> NodePatch {
        let baton_cordoned = protocol::CORDONED
            .read(node.metadata.annotations.as_ref())
            .ok()
            .flatten()
            .unwrap_or(false);
        let marks = NodePatch::clear_rollout_marks();
        if baton_cordoned {
            marks.and(NodePatch::uncordon(node))
        } else {
            marks
        }
    }

    /// Ask the node's agent to drop its failed verdict for `boot` (an admin's retry).
    pub fn retry(boot: &BootId) -> NodePatch {
        let mut p = NodePatch::default();
        p.annotations.insert(
            protocol::RETRY.name.into(),
            protocol::RETRY.format(boot).into(),
        );
        p
    }

    /// Pause (or resume) the node: no new disruption starts on it.
    pub fn paused(paused: bool) -> NodePatch {
        let mut p = NodePatch::default();
        p.annotations.insert(
            protocol::PAUSED.name.into(),
            if paused {
                protocol::PAUSED.format(&true).into()
            } else {
                Value::Null
            },
        );
        p
    }

    /// Remove the operator's failure mark.
    pub fn clear_failure() -> NodePatch {
        let mut p = NodePatch::default();
        p.annotations
            .insert(protocol::FAILURE.name.into(), Value::Null);
        p
    }

    /// Both sets of changes in one patch (one write, one resourceVersion check).
    pub fn and(mut self, other: NodePatch) -> NodePatch {
        self.unschedulable = other.unschedulable.or(self.unschedulable);
        self.annotations.extend(other.annotations);
        self.labels.extend(other.labels);
        self
    }

    /// The JSON merge patch, guarded by the node's observed `resourceVersion`.
    pub fn to_json(&self, resource_version: Option<String>) -> Value {
        let mut metadata = Map::new();
        metadata.insert(
            "resourceVersion".into(),
            resource_version.map_or(Value::Null, Value::String),
        );
        if !self.annotations.is_empty() {
            metadata.insert(
                "annotations".into(),
                Value::Object(self.annotations.clone()),
            );
        }
        if !self.labels.is_empty() {
            metadata.insert("labels".into(), Value::Object(self.labels.clone()));
        }
        let mut patch = json!({"metadata": metadata});
        if let Some(u) = self.unschedulable {
            patch["spec"] = json!({"unschedulable": u});
        }
        patch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cordon_records_that_baton_did_it_and_is_guarded_by_resource_version() {
        let patch = NodePatch::cordon(true).to_json(Some("42".into()));
        assert_eq!(patch["spec"]["unschedulable"], true);
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(
            patch["metadata"]["annotations"]["baton.dev/cordoned"],
            "true"
        );
        assert_eq!(patch["metadata"]["labels"][EXCLUDE_FROM_LB], "true");
    }

    #[test]
    fn failing_a_node_ends_its_grant_in_the_same_write() {
        let patch = NodePatch::fail("drain timed out").to_json(Some("7".into()));
        let a = &patch["metadata"]["annotations"];
        assert_eq!(a["baton.dev/failure"], "drain timed out");
        assert!(a["baton.dev/reboot-ok"].is_null() && a.get("baton.dev/reboot-ok").is_some());
        assert!(patch.get("spec").is_none(), "a failed node stays cordoned");
    }

    #[test]
    fn ending_a_grant_undoes_only_batons_cordon() {
        let mut node = Node::default();
        node.metadata.annotations = Some(
            [
                ("baton.dev/cordoned".to_string(), "true".to_string()),
                ("baton.dev/lb-excluded".to_string(), "true".to_string()),
            ]
            .into(),
        );
        let patch = NodePatch::end_grant(&node).to_json(None);
        assert_eq!(patch["spec"]["unschedulable"], false);
        assert!(patch["metadata"]["labels"][EXCLUDE_FROM_LB].is_null());
        assert!(
            patch["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key("baton.dev/reboot-ok")
        );
        let admins = NodePatch::end_grant(&Node::default()).to_json(None);
        assert!(admins.get("spec").is_none(), "an admin's cordon stays");
    }

    #[test]
    fn uncordon_removes_only_what_baton_added() {
        let mut node = Node::default();
        node.metadata.annotations =
            Some([("baton.dev/cordoned".to_string(), "true".to_string())].into());
        let patch = NodePatch::uncordon(&node).to_json(None);
        assert_eq!(patch["spec"]["unschedulable"], false);
        assert!(patch["metadata"]["annotations"]["baton.dev/cordoned"].is_null());
        assert!(
            patch["metadata"].get("labels").is_none(),
            "an LB label baton did not add stays"
        );
    }
}
