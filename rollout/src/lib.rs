//! The rollout decision core. Every rule of a rollout lives here, as pure functions of
//! observed cluster state and an injected `now`: no I/O, no clock.
//!
//! - [`alert`]: the Prometheus alert gate's rules.
//! - [`window`]: maintenance windows (cron or weekdays, IANA zones, DST).
//! - [`freeze`]: freezes, absolute ranges of local time with no new disruption.
//! - [`zone`]: per-zone caps (`maxUnavailablePerZone`).
//! - [`policy`]: a spec parsed and checked once.
//! - [`promotion`]: canary promotion between pools.
//! - [`snapshot`]: the observed cluster.
//! - [`etcd`]: etcd's members and the quorum guard's checks.
//! - [`control_plane`]: control-plane nodes: one at a time, in their place, alone when
//!   only one.
//! - [`phase`]: a node's combined phase (operator and agent), as shown and counted.
//! - [`decide()`]: the next action for every node, and when to look again.
//! - [`expectations`]: read-your-writes over the operator's watch caches.
//! - [`why`]: why a node waits, in words, and each gate on its way to a grant.
//! - [`notify`]: the rollout events a reconcile produced, for webhooks.
//! - [`silence`]: Alertmanager silences for disrupted nodes.
//! - [`simulate`]: a model cluster driven by `decide`, for `kubectl baton plan` and tests.
#![forbid(unsafe_code)]

pub mod alert;
pub mod control_plane;
pub mod decide;
pub mod etcd;
pub mod expectations;
pub mod freeze;
pub mod notify;
pub mod phase;
pub mod plan;
pub mod policy;
pub mod promotion;
pub mod selector;
pub mod silence;
pub mod simulate;
pub mod snapshot;
pub mod why;
pub mod window;
pub mod zone;

pub use decide::decide;
pub use plan::{Action, Plan, Skip};
pub use policy::Policy;
pub use snapshot::{AgentView, LeaseView, NodeView, Snapshot};
