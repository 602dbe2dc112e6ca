//! `kubectl baton pause|resume|retry`: the documented admin steps as API calls.
//!
//! - pause/resume a policy: `spec.paused`;
//! - pause/resume a node: the `baton.dev/paused` annotation;
//! - retry a failed node, after fixing the cause (docs/operations.md): remove the
//!   operator's failure mark, uncordon it if baton cordoned it, delete its reboot Lease
//!   (freeing its disruption slot), and ask its agent to drop the failed verdict for the
//!   boot it runs (`baton.dev/retry`).

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crds::{UpdatePolicy, protocol};
use rollout::selector::Selector;

use crate::Error;

/// The merge patch that pauses (or resumes) a policy.
pub fn policy_paused(paused: bool) -> Value {
    json!({"spec": {"paused": paused}})
}

/// The merge patch that pauses (or resumes) a node.
pub fn node_paused(paused: bool) -> Value {
    json!({"metadata": {"annotations": {protocol::PAUSED.name: if paused { Value::from("true") } else { Value::Null }}}})
}

/// Whether a node needs a retry: the operator marked it failed, or its agent reports a
/// failed update.
pub fn failed(node: &Node) -> bool {
    let a = node.annotations();
    a.contains_key(protocol::FAILURE.name)
        || matches!(
            a.get(protocol::STATE.name).map(String::as_str),
            Some("RolledBack" | "Failed")
        )
}

/// The merge patch that clears a failed node: failure mark off, uncordoned if baton
/// cordoned it, and the agent asked to retry the boot it runs.
pub fn retry_patch(node: &Node) -> Value {
    let a = node.annotations();
    let mut annotations = serde_json::Map::new();
    annotations.insert(protocol::FAILURE.name.into(), Value::Null);
    if let Some(boot) = a.get(protocol::BOOT_ID.name) {
        annotations.insert(protocol::RETRY.name.into(), Value::from(boot.clone()));
    }
    let mut patch = json!({"metadata": {"annotations": annotations}});
    if a.get(protocol::CORDONED.name).map(String::as_str) == Some("true") {
        patch["spec"] = json!({"unschedulable": false});
        patch["metadata"]["annotations"][protocol::CORDONED.name] = Value::Null;
        if a.get(protocol::LB_EXCLUDED.name).map(String::as_str) == Some("true") {
            patch["metadata"]["annotations"][protocol::LB_EXCLUDED.name] = Value::Null;
            patch["metadata"]["labels"] =
                json!({"node.kubernetes.io/exclude-from-external-load-balancers": null});
        }
    }
    patch
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
            &Patch::Merge(node_paused(paused)),
        )
        .await?;
    Ok(())
}

/// Retries `nodes` (names), or every failed node of `policy`. Returns the nodes retried.
pub async fn retry(
    client: Client,
    namespace: &str,
    policy: Option<&str>,
    nodes: &[String],
) -> Result<Vec<String>, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let targets: Vec<Node> = match policy {
        Some(name) => {
            let p = Api::<UpdatePolicy>::all(client.clone()).get(name).await?;
            let selector = Selector::compile(&p.spec.node_selector)
                .map_err(|e| Error::Other(e.to_string()))?;
            api.list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|n| selector.matches(n.labels()) && failed(n))
                .collect()
        }
        None => {
            let mut out = Vec::new();
            for name in nodes {
                out.push(api.get(name).await?);
            }
            out
        }
    };
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let mut done = Vec::new();
    for node in targets {
        let name = node.name_any();
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(retry_patch(&node)),
        )
        .await?;
        match leases
            .delete(&format!("baton-reboot-{name}"), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        done.push(name);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_undoes_only_what_baton_did() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "annotations": {
            "baton.dev/failure": "agent reported RolledBack", "baton.dev/state": "RolledBack",
            "baton.dev/boot-id": "abcd", "baton.dev/cordoned": "true", "example.com/owner": "me"}},
            "spec": {"unschedulable": true}}))
        .unwrap();
        assert!(failed(&node));
        let p = retry_patch(&node);
        assert_eq!(p["spec"]["unschedulable"], false);
        assert_eq!(p["metadata"]["annotations"]["baton.dev/retry"], "abcd");
        assert_eq!(
            p["metadata"]["annotations"]["baton.dev/failure"],
            Value::Null
        );
        assert!(
            p["metadata"]["annotations"]
                .get("example.com/owner")
                .is_none()
        );
        // An admin's cordon stays.
        let admin: Node = serde_json::from_value(
            json!({"metadata": {"name": "n2", "annotations": {"baton.dev/failure": "x"}},
            "spec": {"unschedulable": true}}),
        )
        .unwrap();
        assert!(retry_patch(&admin).get("spec").is_none());
        assert_eq!(
            node_paused(false)["metadata"]["annotations"]["baton.dev/paused"],
            Value::Null
        );
    }
}
