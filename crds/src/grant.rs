//! The reboot grant, and when it is live.
//!
//! A grant is live only while three things hold together: the Lease
//! `baton-reboot-<node>` exists, names the node and the boot, and records no failure;
//! the node's `baton.dev/reboot-ok` names the same boot; and baton's cordon is on the
//! node. The agent checks this on fresh reads right before it reboots, and reboots
//! only when [`check`] says the grant is live. It must never be relaxed to trust one
//! of the three alone: each of them outlived its grant in a bug once.

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use thiserror::Error;

use crate::protocol::{self, BootId, ProtocolError};

/// The label on every reboot Lease, which the operator's watch selects.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "baton");

/// The prefix of every reboot Lease's name.
pub const LEASE_PREFIX: &str = "baton-reboot-";

/// The reboot Lease's name for `node`.
pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// Why a grant is not live.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotLive {
    /// No reboot Lease exists for the node.
    #[error("no reboot Lease {0}")]
    NoLease(String),
    /// The Lease is held by someone else.
    #[error("the Lease {lease} is held by {holder:?}, not {node}")]
    OtherHolder {
        /// The Lease.
        lease: String,
        /// Its holder.
        holder: Option<String>,
        /// The node asking.
        node: String,
    },
    /// The Lease was granted for another boot (or names none).
    #[error("the Lease was granted for boot {granted:?}, this node runs boot {boot}")]
    OtherBoot {
        /// The boot the Lease names.
        granted: Option<String>,
        /// The boot the node runs.
        boot: String,
    },
    /// The operator recorded a failure on the Lease: the grant ended.
    #[error("the Lease records a failure: {0}")]
    Failed(String),
    /// The node's `baton.dev/reboot-ok` does not name this boot.
    #[error("baton.dev/reboot-ok is {found:?}, not boot {boot}")]
    NoRebootOk {
        /// What the node carries.
        found: Option<String>,
        /// The boot the node runs.
        boot: String,
    },
    /// baton's cordon is not on the node.
    #[error(
        "baton's cordon is not on the node (unschedulable={unschedulable}, baton.dev/cordoned={marked})"
    )]
    NotCordoned {
        /// `spec.unschedulable`.
        unschedulable: bool,
        /// `baton.dev/cordoned=true`.
        marked: bool,
    },
    /// A value the check needs is malformed, so it is not trusted.
    #[error("{0}")]
    Malformed(ProtocolError),
}

/// Whether `node`, running `boot`, holds a live grant, given its reboot Lease as read.
pub fn check(node: &Node, lease: Option<&Lease>, boot: &BootId) -> Result<(), NotLive> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let Some(lease) = lease else {
        return Err(NotLive::NoLease(lease_name(&name)));
    };
    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
    if holder.as_deref() != Some(name.as_str()) {
        return Err(NotLive::OtherHolder {
            lease: lease.metadata.name.clone().unwrap_or_default(),
            holder,
            node: name,
        });
    }
    let on_lease = lease.metadata.annotations.as_ref();
    let granted = protocol::lease::GRANTED_BOOT_ID
        .read(on_lease)
        .map_err(NotLive::Malformed)?;
    if granted.as_ref() != Some(boot) {
        return Err(NotLive::OtherBoot {
            granted: granted.map(|b| b.to_string()),
            boot: boot.to_string(),
        });
    }
    if let Some(failure) = on_lease.and_then(|a| a.get(protocol::lease::FAILURE.name)) {
        return Err(NotLive::Failed(failure.clone()));
    }
    let on_node = node.metadata.annotations.as_ref();
    let ok = protocol::REBOOT_OK.read(on_node);
    if ok.as_ref().ok().and_then(Option::as_ref) != Some(boot) {
        return Err(NotLive::NoRebootOk {
            found: on_node.and_then(|a| a.get(protocol::REBOOT_OK.name).cloned()),
            boot: boot.to_string(),
        });
    }
    let marked = protocol::CORDONED
        .read(on_node)
        .map_err(NotLive::Malformed)?
        .unwrap_or(false);
    let unschedulable = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if !(marked && unschedulable) {
        return Err(NotLive::NotCordoned {
            unschedulable,
            marked,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "3f1c2b8e-5d6a-4e2f-9b1a-0c7d8e9f0a1b";

    fn node(annotations: serde_json::Value, unschedulable: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "annotations": annotations},
            "spec": {"unschedulable": unschedulable},
        }))
        .unwrap()
    }

    fn granted() -> Node {
        node(
            serde_json::json!({"baton.dev/reboot-ok": BOOT, "baton.dev/cordoned": "true"}),
            true,
        )
    }

    fn lease(holder: &str, annotations: serde_json::Value) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": lease_name(holder), "annotations": annotations},
            "spec": {"holderIdentity": holder},
        }))
        .unwrap()
    }

    fn live_lease() -> Lease {
        lease("n1", serde_json::json!({"baton.dev/granted-boot-id": BOOT}))
    }

    fn boot() -> BootId {
        BootId::new(BOOT).unwrap()
    }

    #[test]
    fn a_grant_is_live_when_lease_reboot_ok_and_cordon_agree() {
        assert_eq!(check(&granted(), Some(&live_lease()), &boot()), Ok(()));
    }

    #[test]
    fn a_reboot_ok_without_its_lease_is_not_a_grant() {
        assert_eq!(
            check(&granted(), None, &boot()),
            Err(NotLive::NoLease("baton-reboot-n1".into()))
        );
    }

    #[test]
    fn a_failed_lease_another_holder_or_another_boot_ends_the_grant() {
        let failed = lease(
            "n1",
            serde_json::json!({"baton.dev/granted-boot-id": BOOT, "baton.dev/failure": "drain timed out"}),
        );
        assert!(matches!(
            check(&granted(), Some(&failed), &boot()),
            Err(NotLive::Failed(_))
        ));
        let other = lease("n2", serde_json::json!({"baton.dev/granted-boot-id": BOOT}));
        assert!(matches!(
            check(&granted(), Some(&other), &boot()),
            Err(NotLive::OtherHolder { .. })
        ));
        let old = lease(
            "n1",
            serde_json::json!({"baton.dev/granted-boot-id": "aaaa"}),
        );
        assert!(matches!(
            check(&granted(), Some(&old), &boot()),
            Err(NotLive::OtherBoot { .. })
        ));
    }

    #[test]
    fn without_reboot_ok_or_without_batons_cordon_there_is_no_grant() {
        let no_ok = node(serde_json::json!({"baton.dev/cordoned": "true"}), true);
        assert!(matches!(
            check(&no_ok, Some(&live_lease()), &boot()),
            Err(NotLive::NoRebootOk { .. })
        ));
        let uncordoned = node(
            serde_json::json!({"baton.dev/reboot-ok": BOOT, "baton.dev/cordoned": "true"}),
            false,
        );
        assert!(matches!(
            check(&uncordoned, Some(&live_lease()), &boot()),
            Err(NotLive::NotCordoned { .. })
        ));
        let admins_cordon = node(serde_json::json!({"baton.dev/reboot-ok": BOOT}), true);
        assert!(matches!(
            check(&admins_cordon, Some(&live_lease()), &boot()),
            Err(NotLive::NotCordoned { .. })
        ));
    }
}
