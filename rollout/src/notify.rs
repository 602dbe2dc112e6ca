//! Rollout notifications (`spec.notify`): which events a reconcile produced, from the
//! status it replaces, the status it writes and the plan it carried out. Pure; the
//! operator delivers them.

use jiff::Timestamp;
use serde::Serialize;

use crds::{
    UpdatePolicyStatus,
    notify::{NotifyEvent, NotifyFormat},
    policy::condition,
};

use crate::plan::{Action, Plan};

/// The `apiVersion` of a notification's JSON payload: baton's API group and version.
pub fn api_version() -> String {
    format!("{}/{}", crds::GROUP, crds::VERSION)
}

/// One notification: baton's JSON payload (docs/operations.md, "Notifications").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// [`api_version`].
    pub api_version: String,
    /// `Notification`.
    pub kind: &'static str,
    /// What happened.
    pub event: NotifyEvent,
    /// The UpdatePolicy.
    pub policy: String,
    /// The node, for `NodeDone` and `NodeFailed`.
    pub node: Option<String>,
    /// What happened, in words.
    pub message: String,
    /// When the operator saw it.
    pub time: Timestamp,
}

impl Notification {
    /// The request body in `format`.
    pub fn body(&self, format: NotifyFormat) -> serde_json::Value {
        match format {
            NotifyFormat::Json => serde_json::to_value(self).unwrap_or_default(),
            NotifyFormat::Slack => serde_json::json!({
                "text": format!("baton {:?}: {}", self.event, self.message),
            }),
        }
    }
}

fn is_true(status: Option<&UpdatePolicyStatus>, type_: &str) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    })
}

/// The events of one reconcile of `policy`: `old` is the status it read, `new` the
/// status it writes, `plan` what it carried out; in this order: started, each node
/// failed or done, halted, resumed, completed.
pub fn events(
    policy: &str,
    old: Option<&UpdatePolicyStatus>,
    new: &UpdatePolicyStatus,
    plan: &Plan,
    now: Timestamp,
) -> Vec<Notification> {
    let note = |event, node: Option<&str>, message: String| Notification {
        api_version: api_version(),
        kind: "Notification",
        event,
        policy: policy.to_string(),
        node: node.map(str::to_string),
        message,
        time: now,
    };
    let mut out = Vec::new();
    let progressing = (
        is_true(old, condition::PROGRESSING),
        is_true(Some(new), condition::PROGRESSING),
    );
    if progressing == (false, true) {
        out.push(note(
            NotifyEvent::Started,
            None,
            format!(
                "UpdatePolicy {policy} started rolling out: {} of {} nodes to update",
                new.waiting + new.in_progress,
                new.nodes
            ),
        ));
    }
    for n in &plan.nodes {
        match &n.action {
            Action::Fail { reason } => out.push(note(
                NotifyEvent::NodeFailed,
                Some(&n.node),
                format!("node {} of UpdatePolicy {policy} failed: {reason}", n.node),
            )),
            action if action.completes() => out.push(note(
                NotifyEvent::NodeDone,
                Some(&n.node),
                format!(
                    "node {} of UpdatePolicy {policy} is updated, verified and back in service",
                    n.node
                ),
            )),
            _ => {}
        }
    }
    match (
        is_true(old, condition::HALTED),
        is_true(Some(new), condition::HALTED),
    ) {
        (false, true) => out.push(note(
            NotifyEvent::Halted,
            None,
            format!(
                "UpdatePolicy {policy} halted: {}",
                plan.halted.as_deref().unwrap_or("a node failed")
            ),
        )),
        (true, false) => out.push(note(
            NotifyEvent::Resumed,
            None,
            format!("UpdatePolicy {policy} resumed"),
        )),
        _ => {}
    }
    if progressing == (true, false) && new.failed == 0 && new.up_to_date == new.nodes {
        out.push(note(
            NotifyEvent::Completed,
            None,
            format!(
                "UpdatePolicy {policy} completed: {} of {} nodes up to date",
                new.up_to_date, new.nodes
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NodePlan, ReleaseReason};

    fn status(progressing: bool, halted: bool, counts: (u32, u32, u32)) -> UpdatePolicyStatus {
        let c = |t: &str, on: bool| serde_json::json!({"type": t, "status": if on { "True" } else { "False" }, "reason": "r", "message": "m", "lastTransitionTime": "2026-12-01T10:00:00Z"});
        serde_json::from_value(serde_json::json!({
            "nodes": counts.0, "upToDate": counts.1, "waiting": counts.2,
            "conditions": [c("Halted", halted), c("Progressing", progressing)],
        }))
        .unwrap()
    }

    fn plan(actions: Vec<(&str, Action)>) -> Plan {
        Plan {
            policy: "demo".into(),
            nodes: actions
                .into_iter()
                .map(|(node, action)| NodePlan {
                    node: node.into(),
                    action,
                    seen: Default::default(),
                })
                .collect(),
            holders: Vec::new(),
            budget: Default::default(),
            window: crate::window::WindowState::Always,
            halted: Some("1 failed node(s) reached maxFailedNodes=1: n2".into()),
            gate: None,
            urgent: None,
            etcd: None,
            conflicts: Vec::new(),
            counts: Default::default(),
            next_change: None,
        }
    }

    fn kinds(events: &[Notification]) -> Vec<NotifyEvent> {
        events.iter().map(|e| e.event).collect()
    }

    #[test]
    fn a_rollout_starts_finishes_nodes_and_completes() {
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let idle = status(false, false, (3, 3, 0));
        let started = status(true, false, (3, 0, 3));
        let e = events("demo", Some(&idle), &started, &plan(vec![]), now);
        assert_eq!(kinds(&e), [NotifyEvent::Started]);
        assert_eq!(
            e[0].message,
            "UpdatePolicy demo started rolling out: 3 of 3 nodes to update"
        );
        let e = events(
            "demo",
            Some(&started),
            &started,
            &plan(vec![("n1", Action::Release(ReleaseReason::Done))]),
            now,
        );
        assert_eq!(kinds(&e), [NotifyEvent::NodeDone]);
        assert_eq!(e[0].node.as_deref(), Some("n1"));
        let done = status(false, false, (3, 3, 0));
        let e = events(
            "demo",
            Some(&started),
            &done,
            &plan(vec![("n3", Action::Release(ReleaseReason::Done))]),
            now,
        );
        assert_eq!(kinds(&e), [NotifyEvent::NodeDone, NotifyEvent::Completed]);
        // With no settle time a node is done in the step that finishes it.
        let finish = Action::Finish {
            uncordon: true,
            release: true,
        };
        let finished = events(
            "demo",
            Some(&started),
            &started,
            &plan(vec![("n2", finish)]),
            now,
        );
        assert_eq!(kinds(&finished), [NotifyEvent::NodeDone]);
        let settling = Action::Finish {
            uncordon: true,
            release: false,
        };
        let settled = events(
            "demo",
            Some(&started),
            &started,
            &plan(vec![("n2", settling)]),
            now,
        );
        assert!(
            settled.is_empty(),
            "done once released, after its settle time"
        );
        assert!(
            events("demo", Some(&done), &done, &plan(vec![]), now).is_empty(),
            "no change, no event"
        );
        let json = e[1].body(NotifyFormat::Json);
        assert_eq!(json["apiVersion"], "baton.dev/v1alpha1");
        assert_eq!(json["event"], "Completed");
        assert_eq!(json["node"], serde_json::Value::Null);
        assert_eq!(
            e[1].body(NotifyFormat::Slack)["text"],
            "baton Completed: UpdatePolicy demo completed: 3 of 3 nodes up to date"
        );
    }

    #[test]
    fn a_failure_halts_and_a_retry_resumes() {
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let running = status(true, false, (3, 1, 1));
        let halted = status(true, true, (3, 1, 1));
        let e = events(
            "demo",
            Some(&running),
            &halted,
            &plan(vec![(
                "n2",
                Action::Fail {
                    reason: "booted the old slot".into(),
                },
            )]),
            now,
        );
        assert_eq!(kinds(&e), [NotifyEvent::NodeFailed, NotifyEvent::Halted]);
        assert_eq!(
            e[0].message,
            "node n2 of UpdatePolicy demo failed: booted the old slot"
        );
        assert_eq!(
            e[1].message,
            "UpdatePolicy demo halted: 1 failed node(s) reached maxFailedNodes=1: n2"
        );
        let e = events("demo", Some(&halted), &running, &plan(vec![]), now);
        assert_eq!(kinds(&e), [NotifyEvent::Resumed]);
    }
}
