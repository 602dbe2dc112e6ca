//! Reboot leases: one `coordination.k8s.io/v1` Lease per disrupted node, in the
//! operator's namespace. A Lease is the source of truth for "this node may disrupt";
//! it is created and deleted with optimistic concurrency and never expires by itself.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
};

use crds::protocol::{self, BootId, Message, Version};
use rollout::Policy;

use crate::error::{Error, Result};

/// The label on every baton reboot Lease, which the operator's watch selects.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "baton");

/// The Lease name for a node.
pub fn name(node: &str) -> String {
    format!("baton-reboot-{node}")
}

/// The Lease granting `node` a disruption under `policy`.
pub fn grant(
    node: &str,
    namespace: &str,
    policy: &Policy,
    boot_id: &BootId,
    target: Option<&Version>,
    now: Timestamp,
) -> Lease {
    let mut annotations = BTreeMap::from([
        (
            protocol::lease::POLICY.name.to_string(),
            protocol::lease::POLICY.format(&Message(policy.name.clone())),
        ),
        (
            protocol::lease::GRANTED_BOOT_ID.name.to_string(),
            protocol::lease::GRANTED_BOOT_ID.format(boot_id),
        ),
    ]);
    if let Some(target) = target {
        annotations.insert(
            protocol::lease::TARGET_VERSION.name.to_string(),
            protocol::lease::TARGET_VERSION.format(target),
        );
    }
    // Informational: how long the whole disruption may take when every bound is used.
    let bound = policy.drain_timeout + policy.reboot_timeout + policy.settle_time;
    Lease {
        metadata: ObjectMeta {
            name: Some(name(node)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            lease_duration_seconds: Some(i32::try_from(bound.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Creates a Lease. `Ok(false)` when it already exists (another leader's grant).
pub async fn create(api: &Api<Lease>, lease: &Lease) -> Result<bool> {
    match api.create(&PostParams::default(), lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Sets annotations on a Lease, only if it is still the version observed.
pub async fn annotate(
    api: &Api<Lease>,
    lease: &Lease,
    annotations: &[(&str, String)],
) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone().into()))
        .collect();
    let patch = serde_json::json!({"metadata": {"resourceVersion": lease.resource_version(), "annotations": map}});
    api.patch(
        &lease.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
    .map_err(|e| Error::from_kube(&format!("lease {}", lease.name_any()), e))
}

/// Deletes a Lease, only if it is still the version observed.
pub async fn release(api: &Api<Lease>, lease: &Lease) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.resource_version(),
            uid: lease.uid(),
        }),
        ..Default::default()
    };
    match api.delete(&lease.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::from_kube(&format!("lease {}", lease.name_any()), e)),
    }
}
