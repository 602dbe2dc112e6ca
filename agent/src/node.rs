//! The agent's only API writes: `baton.dev/*` annotations and the reboot-required label
//! on its own Node, as a merge patch holding only what changed. Nothing changed, no
//! request: the agent makes no periodic writes.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::{Map, Value};

use crds::protocol::{self, BootId, Kind, Message};

use crate::lifecycle::{Report, Status};

/// The agent's keys and the values it wants on its Node (`None`: absent).
pub fn wanted(
    report: &Report,
    status: &Status,
    boot: &BootId,
) -> Vec<(&'static str, Kind, Option<String>)> {
    use protocol::{
        BOOT_ID, CURRENT_VERSION, MESSAGE, REBOOT_REQUIRED, REBOOT_REQUIRED_LABEL, SLOT, STATE,
        TARGET_VERSION,
    };
    let message = report
        .message
        .as_ref()
        .filter(|m| !m.is_empty())
        .map(|m| MESSAGE.format(&Message(m.replace('\n', " ").chars().take(1024).collect())));
    let mut keys = vec![
        (STATE.name, STATE.kind, Some(STATE.format(&report.state))),
        (
            CURRENT_VERSION.name,
            CURRENT_VERSION.kind,
            status
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
        (BOOT_ID.name, BOOT_ID.kind, Some(BOOT_ID.format(boot))),
        (
            SLOT.name,
            SLOT.kind,
            status.slot.as_ref().map(|s| SLOT.format(s)),
        ),
        (MESSAGE.name, MESSAGE.kind, message),
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
    if report.drop_retry {
        keys.push((protocol::RETRY.name, protocol::RETRY.kind, None));
    }
    keys
}

/// The merge patch that brings `node` to `wanted`, or `None` when it already matches.
/// `baton.dev/last-checked` rides along with a real change and never causes a write
/// by itself.
pub fn patch(
    node: &Node,
    wanted: &[(&'static str, Kind, Option<String>)],
    checked: Timestamp,
) -> Option<Value> {
    let (annotations, labels) = (node.annotations(), node.labels());
    let mut a = Map::new();
    let mut l = Map::new();
    for (key, kind, value) in wanted {
        let (have, out) = match kind {
            Kind::Annotation => (annotations, &mut a),
            Kind::Label => (labels, &mut l),
        };
        if have.get(*key) != value.as_ref() {
            out.insert(
                (*key).to_string(),
                value.clone().map_or(Value::Null, Value::String),
            );
        }
    }
    if a.is_empty() && l.is_empty() {
        return None;
    }
    a.insert(
        protocol::LAST_CHECKED.name.into(),
        Value::String(protocol::LAST_CHECKED.format(&checked)),
    );
    let mut metadata = BTreeMap::new();
    metadata.insert("annotations", Value::Object(a));
    if !l.is_empty() {
        metadata.insert("labels", Value::Object(l));
    }
    Some(serde_json::json!({ "metadata": metadata }))
}

/// Sends a patch to the agent's own Node.
pub async fn apply(api: &Api<Node>, name: &str, patch: &Value) -> Result<(), kube::Error> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
}

/// The admin's retry mark, if any (a malformed one is ignored: it names no boot).
pub fn retry(node: &Node) -> Option<BootId> {
    protocol::RETRY
        .read(node.metadata.annotations.as_ref())
        .ok()
        .flatten()
}

/// The grant on the Node, if any. A malformed one is no grant, and says why.
pub fn grant(node: &Node) -> (Option<BootId>, Option<String>) {
    match protocol::REBOOT_OK.read(node.metadata.annotations.as_ref()) {
        Ok(grant) => (grant, None),
        Err(e) => (None, Some(format!("ignoring a malformed grant: {e}"))),
    }
}

/// What the operator published for this node, if anything (malformed: nothing, and
/// why).
pub fn desired(node: &Node) -> (Option<crate::backend::Desired>, Option<String>) {
    let annotations = node.metadata.annotations.as_ref();
    let version = match protocol::DESIRED_VERSION.read(annotations) {
        Ok(v) => v,
        Err(e) => {
            return (
                None,
                Some(format!("ignoring a malformed desired version: {e}")),
            );
        }
    };
    let (release, note) = match protocol::DESIRED_RELEASE.read(annotations) {
        Ok(r) => (r, None),
        Err(e) => (
            None,
            Some(format!("ignoring a malformed desired release: {e}")),
        ),
    };
    (
        version.map(|version| crate::backend::Desired { version, release }),
        note,
    )
}

/// Whether baton's cordon is on the node (`spec.unschedulable` and `baton.dev/cordoned`).
pub fn cordoned(node: &Node) -> bool {
    let marked = protocol::CORDONED
        .read(node.metadata.annotations.as_ref())
        .ok()
        .flatten()
        .unwrap_or(false);
    marked
        && node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
}

/// The Node's `Ready` condition is True.
pub fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Update;
    use crds::{AgentState, protocol::Version};

    fn report(state: AgentState, required: bool) -> Report {
        Report {
            state,
            target_version: Version::new("2.0.0").ok(),
            reboot_required: required,
            message: None,
            drop_retry: false,
        }
    }

    fn node_with(patch: &Value) -> Node {
        let mut node: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}})).unwrap();
        for (kind, map) in [
            (
                "annotations",
                node.metadata.annotations.get_or_insert_default(),
            ),
            ("labels", node.metadata.labels.get_or_insert_default()),
        ] {
            if let Some(obj) = patch["metadata"][kind].as_object() {
                for (k, v) in obj {
                    match v.as_str() {
                        Some(s) => map.insert(k.clone(), s.to_string()),
                        None => map.remove(k),
                    };
                }
            }
        }
        node
    }

    #[test]
    fn an_unchanged_report_writes_nothing_and_a_change_writes_only_itself() {
        let boot = BootId::new("aa").unwrap();
        let status = Status {
            current_version: Version::new("1.0.0").ok(),
            update: Update::Idle,
            ..Status::default()
        };
        let t0: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let w = wanted(&report(AgentState::RebootRequired, true), &status, &boot);
        let first = patch(&node_with(&serde_json::json!({})), &w, t0).unwrap();
        assert_eq!(
            first["metadata"]["labels"]["baton.dev/reboot-required"],
            "true"
        );
        let node = node_with(&first);
        let later = t0.checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        assert_eq!(
            patch(&node, &w, later),
            None,
            "nothing changed: no write, even an hour later"
        );
        let w = wanted(&report(AgentState::Rebooting, false), &status, &boot);
        let second = patch(&node, &w, later).unwrap();
        let keys: Vec<_> = second["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            [
                "baton.dev/last-checked",
                "baton.dev/reboot-required",
                "baton.dev/state"
            ]
        );
        assert_eq!(
            second["metadata"]["labels"]["baton.dev/reboot-required"],
            Value::Null
        );
    }
}
