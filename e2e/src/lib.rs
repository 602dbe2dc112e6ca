//! baton's end-to-end harness: a real Kubernetes control plane run as local processes
//! (like controller-runtime's envtest, plus controllers, a scheduler and kwok nodes),
//! built from pinned Go modules and cached outside the repository.
#![forbid(unsafe_code)]

pub mod audit;
pub mod binaries;
pub mod cluster;
pub mod dbus;
pub mod demo;
pub mod error;
pub mod fleet;
pub mod footprint;
pub mod identity;
pub mod image_server;
pub mod invariants;
pub mod makespan;
pub mod packages;
pub mod pki;
pub mod polkit;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod workload;

pub use cluster::TestCluster;
pub use error::{Error, Result};
