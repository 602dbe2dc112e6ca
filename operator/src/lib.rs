//! `baton-operator`: the cluster side of baton. It grants reboot leases, cordons and
//! drains through the Eviction API, and enforces maintenance windows, following the
//! plan the pure `rollout` core computes.
#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod drain;
pub mod error;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod status;
pub mod step;
