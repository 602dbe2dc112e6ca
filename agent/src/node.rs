//! The agent's own Node: what it reads there (through `crds::node`, the one reader of
//! the protocol) and its only API write, the report patch of its own keys. Nothing
//! changed, no request: the agent makes no periodic writes.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::Value;

use crds::{
    node::{AgentMarks, NodeMarks},
    protocol::{self, BootId},
};

use crate::{
    backend::Desired,
    lifecycle::{Report, Status},
};

/// What the agent reads on its Node.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The operator's grant, if any (a malformed one is none).
    pub grant: Option<BootId>,
    /// What the operator published for this node, if anything (malformed: nothing).
    pub desired: Option<Desired>,
    /// The admin's retry mark, if any (malformed: none).
    pub retry: Option<BootId>,
    /// `Ready=True`.
    pub ready: bool,
    /// baton's cordon is on the node.
    pub cordoned: bool,
    /// Why a value baton reads was ignored, for `baton.dev/message`.
    pub note: Option<String>,
}

/// Reads what the agent needs from its Node. Malformed values are ignored and said.
pub fn seen(node: &Node) -> Seen {
    let m = NodeMarks::read(node);
    let ignored = [
        (protocol::REBOOT_OK.name, "grant"),
        (protocol::DESIRED_VERSION.name, "desired version"),
        (protocol::DESIRED_RELEASE.name, "desired release"),
    ]
    .into_iter()
    .find_map(|(key, what)| {
        m.malformed(key)
            .map(|e| format!("ignoring a malformed {what}: {e}"))
    });
    Seen {
        cordoned: m.cordoned_by_baton(),
        desired: m.desired_version.clone().map(|version| Desired {
            version,
            release: m.desired_release.clone(),
        }),
        grant: m.reboot_ok,
        retry: m.retry,
        ready: m.ready,
        note: ignored,
    }
}

/// The agent's keys as it reports them: its decision, the backend's facts, its boot.
pub fn marks(report: &Report, status: &Status, boot: &BootId) -> AgentMarks {
    AgentMarks {
        state: Some(report.state),
        current_version: status.current_version.clone(),
        target_version: report.target_version.clone(),
        boot_id: Some(boot.clone()),
        slot: status.slot.clone(),
        reboot_required: report.reboot_required,
        message: report.message.clone(),
    }
}

/// The patch that brings the Node to `report`, or `None` when it already shows it.
pub fn patch(
    node: &Node,
    report: &Report,
    status: &Status,
    boot: &BootId,
    checked: Timestamp,
) -> Option<Value> {
    crds::node::report_patch(
        node,
        &marks(report, status, boot),
        report.drop_retry,
        checked,
    )
}

/// Sends a patch to the agent's own Node; returns the Node as written.
pub async fn apply(api: &Api<Node>, name: &str, patch: &Value) -> Result<Node, kube::Error> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
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
        let r = report(AgentState::RebootRequired, true);
        let first = patch(&node_with(&serde_json::json!({})), &r, &status, &boot, t0).unwrap();
        assert_eq!(
            first["metadata"]["labels"]["baton.dev/reboot-required"],
            "true"
        );
        let node = node_with(&first);
        let later = t0.checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        assert_eq!(
            patch(&node, &r, &status, &boot, later),
            None,
            "nothing changed: no write, even an hour later"
        );
        let r = report(AgentState::Rebooting, false);
        let second = patch(&node, &r, &status, &boot, later).unwrap();
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

    #[test]
    fn malformed_grants_and_releases_are_ignored_and_said() {
        let node = node_with(&serde_json::json!({"metadata": {"annotations": {
            "baton.dev/reboot-ok": "not a boot", "baton.dev/desired-version": "2.0.0"}}}));
        let s = seen(&node);
        assert_eq!(s.grant, None);
        assert_eq!(
            s.desired.map(|d| d.version.to_string()).as_deref(),
            Some("2.0.0")
        );
        assert!(s.note.unwrap().contains("ignoring a malformed grant"));
    }
}
