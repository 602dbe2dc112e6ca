//! `kubectl baton pause|resume|retry`: the documented admin steps as API calls.
//!
//! - pause/resume a policy: `spec.paused`;
//! - pause/resume a node: the `baton.dev/paused` annotation;
//! - retry a failed node, after fixing the cause (docs/operations.md): end its grant
//!   (the same patch the operator uses: the grant and hook labels go, baton's cordon
//!   and only baton's is undone), remove the failure mark and ask its agent to drop the
//!   failed verdict for the boot it runs (`baton.dev/retry`), all in one write guarded
//!   by the node's resourceVersion; only then delete its reboot Lease, freeing its
//!   disruption slot. A failed node that was deleted is retried by deleting its Lease.

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
};
use serde_json::{Value, json};

use crds::{
    UpdatePolicy, grant,
    node::{NodeMarks, NodePatch},
    protocol,
};
use rollout::{NodeView, selector::Selector};

use crate::Error;

/// The merge patch that pauses (or resumes) a policy.
pub fn policy_paused(paused: bool) -> Value {
    json!({"spec": {"paused": paused}})
}

/// Whether a node needs a retry: the operator marked it failed, or its agent reports a
/// failed update.
pub fn failed(node: &Node) -> bool {
    NodeView::from_node(node).failed()
}

/// The failure recorded on a reboot Lease, if any.
fn lease_failure(lease: &Lease) -> Option<&String> {
    lease.annotations().get(protocol::lease::FAILURE.name)
}

/// The patch that clears a failed node: its grant ended (baton's cordon undone), the
/// failure mark off, and its agent asked to retry the boot it runs.
pub fn retry_patch(node: &Node) -> NodePatch {
    let marks = NodeMarks::read(node);
    let patch =
        NodePatch::end_grant(marks.cordoned, marks.lb_excluded).and(NodePatch::clear_failure());
    match &marks.agent.boot_id {
        Some(boot) => patch.and(NodePatch::retry(boot)),
        None => patch,
    }
}

/// Pauses or resumes a policy.
pub async fn set_policy_paused(client: Client, name: &str, paused: bool) -> Result<(), Error> {
    Api::<UpdatePolicy>::all(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(policy_paused(paused)),
        )
        .await?;
    Ok(())
}

/// The merge patch that sets (or, with `None`, clears) a policy's urgency deadline.
pub fn policy_urgency(deadline: Option<Timestamp>, override_freezes: bool) -> Value {
    match deadline {
        Some(d) => json!({"spec": {"urgency": {
            "deadline": d.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "overrideFreezes": override_freezes,
        }}}),
        None => json!({"spec": {"urgency": null}}),
    }
}

/// Sets or clears a policy's urgency deadline.
pub async fn set_policy_urgency(
    client: Client,
    name: &str,
    deadline: Option<Timestamp>,
    override_freezes: bool,
) -> Result<(), Error> {
    Api::<UpdatePolicy>::all(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(policy_urgency(deadline, override_freezes)),
        )
        .await?;
    Ok(())
}

/// Pauses or resumes a node.
pub async fn set_node_paused(client: Client, name: &str, paused: bool) -> Result<(), Error> {
    Api::<Node>::all(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(NodePatch::paused(paused).to_json(None)),
        )
        .await?;
    Ok(())
}

/// One node to retry: the node (absent when deleted) and its reboot Lease, if any.
#[derive(Debug, Clone)]
pub struct Target {
    /// The node's name.
    pub name: String,
    /// The node as listed; `None` when it was deleted.
    pub node: Option<Node>,
    /// Its reboot Lease, if it holds one.
    pub lease: Option<Lease>,
}

/// The lease delete of a retry: the Lease's name, uid and resourceVersion as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseDelete {
    /// The Lease.
    pub name: String,
    /// The uid it must still have.
    pub uid: Option<String>,
    /// The resourceVersion it must still have.
    pub resource_version: Option<String>,
}

impl Target {
    /// The first write: the node's grant ended and its failure cleared, guarded by the
    /// resourceVersion it was listed at (none for a deleted node).
    pub fn node_patch(&self) -> Option<Value> {
        self.node
            .as_ref()
            .map(|n| retry_patch(n).to_json(n.resource_version()))
    }

    /// The second write, once the first went through: the Lease deleted, guarded by
    /// its uid and resourceVersion.
    pub fn lease_delete(&self) -> Option<LeaseDelete> {
        self.lease.as_ref().map(|l| LeaseDelete {
            name: l.name_any(),
            uid: l.uid(),
            resource_version: l.resource_version(),
        })
    }
}

/// What to retry.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Every failed node of the policy `name` (`policy` is the policy as read, `None`
    /// when there is none).
    Policy {
        /// The policy's name.
        name: &'a str,
        /// The policy.
        policy: Option<&'a UpdatePolicy>,
    },
    /// These nodes, each of which must have failed.
    Nodes(&'a [String]),
}

/// The nodes a retry clears, from the Nodes and baton's reboot Leases as listed: every
/// failed node of a policy (including failed nodes that were deleted and still hold
/// its Lease), or the named nodes. A named node that has not failed is refused, and
/// nothing is to be changed.
pub fn retry_targets(
    selection: Selection<'_>,
    nodes: &[Node],
    leases: &[Lease],
) -> Result<Vec<Target>, Error> {
    let lease_of = |name: &str| {
        leases
            .iter()
            .find(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(name))
            .cloned()
    };
    let node_named = |name: &str| nodes.iter().find(|n| n.name_any() == name).cloned();
    let policy_of = |l: &Lease| {
        l.annotations()
            .get(protocol::lease::POLICY.name)
            .map(String::as_str)
            .map(str::to_string)
    };
    let mut targets: Vec<Target> = Vec::new();
    match selection {
        Selection::Policy { name, policy } => {
            let Some(p) = policy else {
                return Err(Error::Other(format!("no UpdatePolicy {name}")));
            };
            let pool = Selector::compile(&p.spec.node_selector)
                .map_err(|e| Error::Other(format!("policy {name}: {e}")))?;
            for node in nodes {
                let mine =
                    lease_of(&node.name_any()).filter(|l| policy_of(l).as_deref() == Some(name));
                // A node holding this policy's Lease is this policy's, wherever its
                // labels point now; its failure may be marked on the node alone.
                let failed_here = (pool.matches(node.labels()) && failed(node))
                    || mine
                        .as_ref()
                        .is_some_and(|l| lease_failure(l).is_some() || failed(node));
                if failed_here {
                    targets.push(Target {
                        name: node.name_any(),
                        lease: lease_of(&node.name_any()),
                        node: Some(node.clone()),
                    });
                }
            }
            // Failed nodes deleted since: only their Lease is left.
            for lease in leases {
                let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
                let ours = policy_of(lease).as_deref() == Some(name);
                if let Some(holder) =
                    holder.filter(|h| ours && !targets.iter().any(|t| &t.name == h))
                    && lease_failure(lease).is_some()
                    && node_named(&holder).is_none()
                {
                    targets.push(Target {
                        name: holder,
                        node: None,
                        lease: Some(lease.clone()),
                    });
                }
            }
        }
        Selection::Nodes(names) => {
            for name in names {
                let node = node_named(name);
                let lease = lease_of(name);
                let lease_failed = lease.as_ref().and_then(lease_failure);
                match (&node, lease_failed) {
                    (None, None) => {
                        return Err(Error::Other(format!(
                            "no node {name}, and no failed reboot Lease for it"
                        )));
                    }
                    (Some(n), None) if !failed(n) => {
                        let doing = match &lease {
                            Some(l) => format!(
                                "; it holds a reboot Lease of policy {} and its update is in progress",
                                policy_of(l).as_deref().unwrap_or("?")
                            ),
                            None => String::new(),
                        };
                        return Err(Error::Other(format!(
                            "node {name} has not failed{doing}: retry only clears failed nodes, nothing was changed"
                        )));
                    }
                    _ => targets.push(Target {
                        name: name.clone(),
                        node,
                        lease,
                    }),
                }
            }
        }
    }
    Ok(targets)
}

/// Retries `nodes` (names), or every failed node of `policy` ([`retry_targets`]).
/// Returns the nodes retried.
pub async fn retry(
    client: Client,
    namespace: &str,
    policy: Option<&str>,
    nodes: &[String],
) -> Result<Vec<String>, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{}={}", grant::MANAGED_BY.0, grant::MANAGED_BY.1);
    let held = leases
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let listed = api.list(&ListParams::default()).await?.items;
    let read_policy = match policy {
        Some(name) => {
            Api::<UpdatePolicy>::all(client.clone())
                .get_opt(name)
                .await?
        }
        None => None,
    };
    let selection = match policy {
        Some(name) => Selection::Policy {
            name,
            policy: read_policy.as_ref(),
        },
        None => Selection::Nodes(nodes),
    };
    let mut done = Vec::new();
    for target in retry_targets(selection, &listed, &held)? {
        // The grant goes from the node first, in one guarded write; then the Lease.
        if let Some(patch) = target.node_patch() {
            api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| match e {
                    kube::Error::Api(s) if s.code == 409 => Error::Other(format!(
                        "node {} changed while it was being retried; run the retry again",
                        target.name
                    )),
                    e => Error::Kube(e),
                })?;
        }
        if let Some(delete) = target.lease_delete() {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: delete.resource_version,
                    uid: delete.uid,
                }),
                ..Default::default()
            };
            match leases.delete(&delete.name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        done.push(target.name);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the simulation (seed 14099): n1 failed under `pool` (marked on the node;
    /// the Lease's mark was refused), then was relabelled out of it. Its Lease still
    /// uses the pool's budget, so retrying the policy must retry it.
    #[test]
    fn a_policy_retry_takes_a_failed_node_holding_its_lease_wherever_its_labels_point() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1",
            "labels": {"pool": "b"}, "annotations": {protocol::FAILURE.name: "did not reboot"}}}))
        .unwrap();
        let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "baton-reboot-n1",
            "annotations": {protocol::lease::POLICY.name: "pool"}}, "spec": {"holderIdentity": "n1"}}))
        .unwrap();
        let policy = UpdatePolicy::new(
            "pool",
            serde_json::from_value(json!({"nodeSelector": {"matchLabels": {"pool": "a"}}}))
                .unwrap(),
        );
        let targets = retry_targets(
            Selection::Policy {
                name: "pool",
                policy: Some(&policy),
            },
            &[node],
            &[lease],
        )
        .unwrap();
        assert_eq!(targets.len(), 1);
        assert!(targets[0].lease_delete().is_some());
    }

    #[test]
    fn a_retry_ends_the_grant_and_undoes_only_what_baton_did() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "annotations": {
            "baton.dev/failure": "agent reported RolledBack", "baton.dev/state": "RolledBack",
            "baton.dev/boot-id": "abcd", "baton.dev/cordoned": "true", "baton.dev/reboot-ok": "abcd",
            "example.com/owner": "me"}},
            "spec": {"unschedulable": true}}))
        .unwrap();
        assert!(failed(&node));
        let p = retry_patch(&node).to_json(Some("42".into()));
        assert_eq!(p["spec"]["unschedulable"], false);
        let a = &p["metadata"]["annotations"];
        assert_eq!(a["baton.dev/retry"], "abcd");
        assert_eq!(a["baton.dev/failure"], Value::Null);
        assert!(
            a.get("baton.dev/reboot-ok").is_some_and(Value::is_null),
            "the stale grant goes in the same write"
        );
        assert!(a.get("example.com/owner").is_none());
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        // An admin's cordon stays.
        let admin: Node = serde_json::from_value(
            json!({"metadata": {"name": "n2", "annotations": {"baton.dev/failure": "x"}},
            "spec": {"unschedulable": true}}),
        )
        .unwrap();
        assert!(retry_patch(&admin).to_json(None).get("spec").is_none());
        assert_eq!(
            NodePatch::paused(false).to_json(None)["metadata"]["annotations"]["baton.dev/paused"],
            Value::Null
        );
    }
}
