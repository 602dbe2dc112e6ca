//! baton's test harness: a real Kubernetes control plane run as local processes (like
//! controller-runtime's envtest, plus controllers, a scheduler and kwok nodes), built
//! from pinned Go modules and cached outside the repository, and the real peers the
//! tests talk to (a D-Bus daemon, Prometheus, an HTTPS image server, a stalling proxy,
//! fleets of agent processes).
//!
//! It depends on no baton crate: it runs baton's binaries and reads its files, so the
//! code under test never tests itself.
#![forbid(unsafe_code)]

pub mod alertmanager;
pub mod audit;
pub mod binaries;
pub mod cluster;
pub mod dbus;
pub mod error;
pub mod etcd;
pub mod fleet;
pub mod identity;
pub mod image_server;
pub mod interrupt;
pub mod packages;
pub mod pki;
pub mod polkit;
pub mod port;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod workload;

pub use cluster::TestCluster;
pub use error::{Error, Result};
