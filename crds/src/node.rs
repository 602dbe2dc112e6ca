//! A Node's baton marks: [`NodeMarks::read`] reads a Node once into typed marks (what
//! the agent reports, the operator's grant and cordon mark, the admin's marks, and the
//! Node facts baton reads), and [`NodePatch`] builds every change to them, as a merge
//! patch. The operator, the agent and `kubectl baton` read and write Nodes here and
//! nowhere else; each patch carries the observed `resourceVersion`, so a change decided
//! on a stale view fails with a conflict instead of overwriting someone else's (such as
//! an admin's cordon).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Map, Value, json};

use crate::{
    AgentState,
    protocol::{self, BootId, Key, Kind, Message, ProtocolError, ReleaseRef, Slot, Version},
};

/// A Node's baton marks, as read. Malformed values are kept in `malformed`, never
/// trusted: the field they would set reads as absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMarks {
    /// The Node's name.
    pub name: String,
    /// The resourceVersion the marks were read at.
    pub resource_version: Option<String>,
    /// When the Node was created.
    pub created: Option<Timestamp>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// `Ready=True`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned, by anyone).
    pub unschedulable: bool,
    /// The agent's report.
    pub agent: AgentMarks,
    /// The operator's grant: reboot out of this boot.
    pub reboot_ok: Option<BootId>,
    /// baton cordoned it (`cordoned=true`).
    pub cordoned: bool,
    /// baton added the load-balancer exclusion label.
    pub lb_excluded: bool,
    /// The release version the operator published on it.
    pub desired_version: Option<Version>,
    /// The release image the operator published on it.
    pub desired_release: Option<ReleaseRef>,
    /// The operator marked it failed, with the reason.
    pub failure: Option<String>,
    /// An admin paused it.
    pub paused: bool,
    /// An admin asked its agent to retry the failed boot this names.
    pub retry: Option<BootId>,
    /// Annotation keys whose value is `"true"` (hook answers).
    pub true_annotations: BTreeSet<String>,
    /// Values that did not parse.
    pub malformed: Vec<ProtocolError>,
}

/// What the agent reports on its Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentMarks {
    /// Its state; `None` when it has not reported one.
    pub state: Option<AgentState>,
    /// The version running now.
    pub current_version: Option<Version>,
    /// The version staged or being staged.
    pub target_version: Option<Version>,
    /// The boot it runs under.
    pub boot_id: Option<BootId>,
    /// The A/B slot it booted from.
    pub slot: Option<Slot>,
    /// It asks for a reboot.
    pub reboot_required: bool,
    /// Its message.
    pub message: Option<String>,
}

fn read<T: protocol::Value>(
    key: &Key<T>,
    map: Option<&BTreeMap<String, String>>,
    errors: &mut Vec<ProtocolError>,
) -> Option<T> {
    key.read(map).map_err(|e| errors.push(e)).ok().flatten()
}

impl NodeMarks {
    /// Reads a Node's marks.
    pub fn read(node: &Node) -> NodeMarks {
        let meta = &node.metadata;
        let annotations = meta.annotations.as_ref();
        let mut malformed = Vec::new();
        let m = &mut malformed;
        let agent = AgentMarks {
            state: read(&protocol::STATE, annotations, m),
            current_version: read(&protocol::CURRENT_VERSION, annotations, m),
            target_version: read(&protocol::TARGET_VERSION, annotations, m),
            boot_id: read(&protocol::BOOT_ID, annotations, m),
            slot: read(&protocol::SLOT, annotations, m),
            reboot_required: read(&protocol::REBOOT_REQUIRED, annotations, m).unwrap_or(false),
            message: read(&protocol::MESSAGE, annotations, m).map(|msg| msg.0),
        };
        NodeMarks {
            name: meta.name.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            labels: meta.labels.clone().unwrap_or_default(),
            ready: ready(node),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            agent,
            reboot_ok: read(&protocol::REBOOT_OK, annotations, m),
            cordoned: read(&protocol::CORDONED, annotations, m).unwrap_or(false),
            lb_excluded: read(&protocol::LB_EXCLUDED, annotations, m).unwrap_or(false),
            desired_version: read(&protocol::DESIRED_VERSION, annotations, m),
            desired_release: read(&protocol::DESIRED_RELEASE, annotations, m),
            failure: read(&protocol::FAILURE, annotations, m).map(|msg| msg.0),
            paused: read(&protocol::PAUSED, annotations, m).unwrap_or(false),
            retry: read(&protocol::RETRY, annotations, m),
            true_annotations: annotations
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.as_str() == "true")
                .map(|(k, _)| k.clone())
                .collect(),
            malformed,
        }
    }

    /// Whether baton's cordon is on the node: cordoned, with baton's mark.
    pub fn cordoned_by_baton(&self) -> bool {
        self.unschedulable && self.cordoned
    }

    /// The malformed value of `key`, if its value did not parse.
    pub fn malformed(&self, key: &str) -> Option<&ProtocolError> {
        self.malformed.iter().find(|e| e.key == key)
    }
}

/// The Node's `Ready` condition is True.
pub fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// The agent's report patch: the merge patch that brings `node`'s agent keys to
/// `report` (with `drop_retry`, the admin's retry mark goes in the same write), or
/// `None` when the node already shows it. `baton.dev/last-checked` rides along with a
/// real change and never causes a write by itself.
pub fn report_patch(
    node: &Node,
    report: &AgentMarks,
    drop_retry: bool,
    checked: Timestamp,
) -> Option<Value> {
    use protocol::{
        BOOT_ID, CURRENT_VERSION, MESSAGE, REBOOT_REQUIRED, REBOOT_REQUIRED_LABEL, SLOT, STATE,
        TARGET_VERSION,
    };
    let mut wanted: Vec<(&str, Kind, Option<String>)> = vec![
        (
            STATE.name,
            STATE.kind,
            report.state.map(|s| STATE.format(&s)),
        ),
        (
            CURRENT_VERSION.name,
            CURRENT_VERSION.kind,
            report
                .current_version
                .as_ref()
                .map(|v| CURRENT_VERSION.format(v)),
        ),
        (
            TARGET_VERSION.name,
            TARGET_VERSION.kind,
            report
                .target_version
                .as_ref()
                .map(|v| TARGET_VERSION.format(v)),
        ),
        (
            BOOT_ID.name,
            BOOT_ID.kind,
            report.boot_id.as_ref().map(|b| BOOT_ID.format(b)),
        ),
        (
            SLOT.name,
            SLOT.kind,
            report.slot.as_ref().map(|s| SLOT.format(s)),
        ),
        (
            MESSAGE.name,
            MESSAGE.kind,
            report
                .message
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| MESSAGE.format(&Message::line(m))),
        ),
        (
            REBOOT_REQUIRED.name,
            REBOOT_REQUIRED.kind,
            Some(REBOOT_REQUIRED.format(&report.reboot_required)),
        ),
        (
            REBOOT_REQUIRED_LABEL.name,
            REBOOT_REQUIRED_LABEL.kind,
            report
                .reboot_required
                .then(|| REBOOT_REQUIRED_LABEL.format(&true)),
        ),
    ];
    if drop_retry {
        wanted.push((protocol::RETRY.name, protocol::RETRY.kind, None));
    }
    let (annotations, labels) = (
        node.metadata.annotations.clone().unwrap_or_default(),
        node.metadata.labels.clone().unwrap_or_default(),
    );
    let mut a = Map::new();
    let mut l = Map::new();
    for (key, kind, value) in wanted {
        let (have, out) = match kind {
            Kind::Annotation => (&annotations, &mut a),
            Kind::Label => (&labels, &mut l),
        };
        if have.get(key) != value.as_ref() {
            out.insert(key.to_string(), value.map_or(Value::Null, Value::String));
        }
    }
    if a.is_empty() && l.is_empty() {
        return None;
    }
    a.insert(
        protocol::LAST_CHECKED.name.into(),
        Value::String(protocol::LAST_CHECKED.format(&checked)),
    );
    let mut metadata = Map::new();
    metadata.insert("annotations".into(), Value::Object(a));
    if !l.is_empty() {
        metadata.insert("labels".into(), Value::Object(l));
    }
    Some(json!({ "metadata": metadata }))
}

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

    /// Uncordon a node baton cordoned, undoing only what baton added (the
    /// load-balancer label when `lb_excluded`: baton's mark says it added it).
    pub fn uncordon(lb_excluded: bool) -> NodePatch {
        let mut p = NodePatch {
            unschedulable: Some(false),
            ..Default::default()
        };
        p.annotations
            .insert(protocol::CORDONED.name.into(), Value::Null);
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
        p.annotations.insert(
            protocol::FAILURE.name.into(),
            protocol::FAILURE.format(&Message::line(reason)).into(),
        );
        p.annotations
            .insert(protocol::REBOOT_OK.name.into(), Value::Null);
        p
    }

    /// End the node's grant: the grant and hook labels go, and baton's cordon (only
    /// baton's: `cordoned_by_baton`) is undone. Sent before the Lease is deleted, never
    /// after.
    pub fn end_grant(cordoned_by_baton: bool, lb_excluded: bool) -> NodePatch {
        let marks = NodePatch::clear_rollout_marks();
        if cordoned_by_baton {
            marks.and(NodePatch::uncordon(lb_excluded))
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
        let m = NodeMarks::read(&node);
        let patch = NodePatch::end_grant(m.cordoned, m.lb_excluded).to_json(None);
        assert_eq!(patch["spec"]["unschedulable"], false);
        assert!(patch["metadata"]["labels"][EXCLUDE_FROM_LB].is_null());
        assert!(
            patch["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key("baton.dev/reboot-ok")
        );
        let admins = NodePatch::end_grant(false, false).to_json(None);
        assert!(admins.get("spec").is_none(), "an admin's cordon stays");
    }

    #[test]
    fn uncordon_removes_only_what_baton_added() {
        let patch = NodePatch::uncordon(false).to_json(None);
        assert_eq!(patch["spec"]["unschedulable"], false);
        assert!(patch["metadata"]["annotations"]["baton.dev/cordoned"].is_null());
        assert!(
            patch["metadata"].get("labels").is_none(),
            "an LB label baton did not add stays"
        );
    }
}
