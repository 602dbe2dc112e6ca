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
struct Target {
    name: String,
    node: Option<Node>,
    lease: Option<Lease>,
}

/// Retries `nodes` (names), or every failed node of `policy` (including failed nodes
/// that were deleted and still hold its Lease). Returns the nodes retried. A node
/// named with `--node` that has not failed is refused, and nothing is changed.
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
    let lease_of = |name: &str| {
        held.iter()
            .find(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(name))
            .cloned()
    };
    let mut targets: Vec<Target> = Vec::new();
    match policy {
        Some(name) => {
            let p = match Api::<UpdatePolicy>::all(client.clone())
                .get_opt(name)
                .await?
            {
                Some(p) => p,
                None => return Err(Error::Other(format!("no UpdatePolicy {name}"))),
            };
            let pool = Selector::compile(&p.spec.node_selector)
                .map_err(|e| Error::Other(format!("policy {name}: {e}")))?;
            for node in api.list(&ListParams::default()).await?.items {
                let mine = lease_of(&node.name_any()).filter(|l| {
                    l.annotations()
                        .get(protocol::lease::POLICY.name)
                        .map(String::as_str)
                        == Some(name)
                });
                let failed_here = (pool.matches(node.labels()) && failed(&node))
                    || mine.as_ref().is_some_and(|l| lease_failure(l).is_some());
                if failed_here {
                    targets.push(Target {
                        name: node.name_any(),
                        lease: lease_of(&node.name_any()),
                        node: Some(node),
                    });
                }
            }
            // Failed nodes deleted since: only their Lease is left.
            for lease in &held {
                let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
                let ours = lease
                    .annotations()
                    .get(protocol::lease::POLICY.name)
                    .map(String::as_str)
                    == Some(name);
                if let Some(holder) =
                    holder.filter(|h| ours && !targets.iter().any(|t| &t.name == h))
                    && lease_failure(lease).is_some()
                    && api.get_opt(&holder).await?.is_none()
                {
                    targets.push(Target {
                        name: holder,
                        node: None,
                        lease: Some(lease.clone()),
                    });
                }
            }
        }
        None => {
            for name in nodes {
                let node = api.get_opt(name).await?;
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
                                l.annotations()
                                    .get(protocol::lease::POLICY.name)
                                    .map_or("?", String::as_str)
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
    let mut done = Vec::new();
    for target in targets {
        // The grant goes from the node first, in one guarded write; then the Lease.
        if let Some(node) = &target.node {
            let patch = retry_patch(node).to_json(node.resource_version());
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
        if let Some(lease) = &target.lease {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.resource_version(),
                    uid: lease.uid(),
                }),
                ..Default::default()
            };
            match leases.delete(&lease.name_any(), &params).await {
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
