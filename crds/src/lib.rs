//! The baton API, group `baton.dev`, version `v1alpha1`.
//!
//! This crate holds what users write (the `UpdatePolicy` custom resource) and what the
//! agent and the operator exchange on each Node (the `baton.dev/*` annotation and label
//! protocol). It performs no I/O: the binaries wire it to the API server.
#![forbid(unsafe_code)]

pub mod budget;
pub mod crd;
pub mod drain;
pub mod duration;
pub mod grant;
pub mod health;
pub mod hooks;
pub mod node;
pub mod notify;
pub mod policy;
pub mod protocol;
pub mod release;
pub mod window;

pub use budget::{Budget, BudgetError};
pub use drain::{DrainSpec, OnTimeout};
pub use health::{AlertmanagerSilence, HealthSpec, PrometheusGate};
pub use hooks::{Hook, HooksSpec};
pub use policy::{
    Completion, ControlPlaneOrder, FailurePolicy, OrderingSpec, Promotion, UpdatePolicy,
    UpdatePolicySpec, UpdatePolicyStatus, Urgency, WindowMode,
};
pub use protocol::{AgentState, ProtocolError};
pub use release::Release;
pub use window::{Freeze, MaintenanceWindow, Weekday};

/// The API group of every baton resource and the prefix of every protocol key.
pub const GROUP: &str = "baton.dev";
/// The API version this crate describes.
pub const VERSION: &str = "v1alpha1";
