//! Reboot leases: one `coordination.k8s.io/v1` Lease per disrupted node, in the
//! operator's namespace. A Lease is the source of truth for "this node may disrupt";
//! it is created and deleted with optimistic concurrency (`writes`) and never expires
//! by itself.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::api::ObjectMeta;

use crds::protocol::{self, BootId, Message, Version};
use rollout::Policy;

pub use crds::grant::{MANAGED_BY, lease_name as name};

/// The Lease granting `node` a disruption under `policy`; `drain_started` when the
/// drain starts with the grant.
pub fn grant(
    node: &str,
    namespace: &str,
    policy: &Policy,
    boot_id: &BootId,
    target: Option<&Version>,
    drain_started: Option<Timestamp>,
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
    if let Some(at) = drain_started {
        annotations.insert(
            protocol::lease::DRAIN_STARTED_AT.name.to_string(),
            protocol::lease::DRAIN_STARTED_AT.format(&at),
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
