//! The operator's writes to Nodes and reboot Leases. Each one is guarded by the
//! resourceVersion it was decided on (a Lease create by its name), and each is noted
//! in the expectations before it is sent, so that no later decision is taken on a
//! cache that does not show it yet (`readback`).

use crds::node::NodePatch;
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use rollout::expectations::{Expected, ObjectKey};

use crate::{
    controller::Context,
    error::{Error, Result},
    readback,
};

/// Applies `patch` to `node` as observed (guarded by its resourceVersion).
pub(crate) async fn patch_node(ctx: &Context, node: &Node, patch: &NodePatch) -> Result<()> {
    let name = node.name_any();
    let key = ObjectKey::node(&name);
    readback::note(
        ctx,
        key.clone(),
        Expected::Changed {
            from: node.resource_version(),
        },
    );
    let api: Api<Node> = Api::all(ctx.client.clone());
    let json = patch.to_json(node.resource_version());
    let result = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&json))
        .await;
    readback::settle_write(ctx, &key, result.as_ref().err());
    result
        .map(drop)
        .map_err(|e| Error::from_kube(&format!("node {name}"), e))
}

/// Creates a reboot Lease. `Ok(false)` when it already exists (another leader's grant).
pub(crate) async fn create_lease(ctx: &Context, lease: &Lease) -> Result<bool> {
    let key = ObjectKey::lease(&lease.name_any());
    readback::note(ctx, key.clone(), Expected::Changed { from: None });
    let result = leases(ctx).create(&PostParams::default(), lease).await;
    match result {
        Ok(_) => Ok(true),
        // It exists: the cache will show it, as the note expects.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => {
            readback::settle_write(ctx, &key, Some(&e));
            Err(Error::Kube(e))
        }
    }
}

/// Sets annotations on a Lease, only if it is still the version observed.
pub(crate) async fn annotate_lease(
    ctx: &Context,
    lease: &Lease,
    annotations: &[(&str, String)],
) -> Result<()> {
    let name = lease.name_any();
    let key = ObjectKey::lease(&name);
    readback::note(
        ctx,
        key.clone(),
        Expected::Changed {
            from: lease.resource_version(),
        },
    );
    let map: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone().into()))
        .collect();
    let patch = serde_json::json!({"metadata": {"resourceVersion": lease.resource_version(), "annotations": map}});
    let result = leases(ctx)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    readback::settle_write(ctx, &key, result.as_ref().err());
    result
        .map(drop)
        .map_err(|e| Error::from_kube(&format!("lease {name}"), e))
}

/// Records `annotation = at` on a Lease.
pub(crate) async fn stamp_lease(
    ctx: &Context,
    lease: &Lease,
    key: &crds::protocol::Key<Timestamp>,
    at: Timestamp,
) -> Result<()> {
    annotate_lease(ctx, lease, &[(key.name, key.format(&at))]).await
}

/// Deletes a Lease, only if it is still the version observed.
pub(crate) async fn delete_lease(ctx: &Context, lease: &Lease) -> Result<()> {
    let name = lease.name_any();
    let key = ObjectKey::lease(&name);
    readback::note(ctx, key.clone(), Expected::Gone { uid: lease.uid() });
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.resource_version(),
            uid: lease.uid(),
        }),
        ..Default::default()
    };
    match leases(ctx).delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => {
            readback::settle_write(ctx, &key, Some(&e));
            Err(Error::from_kube(&format!("lease {name}"), e))
        }
    }
}

fn leases(ctx: &Context) -> Api<Lease> {
    Api::namespaced(ctx.client.clone(), &ctx.config.namespace)
}
