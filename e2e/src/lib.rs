//! baton's end-to-end layer: the system tests' scenario driver and invariant watcher,
//! the demo, and the benchmarks, on the control plane of the `harness` crate. The
//! `e2e` command (`src/main.rs`) runs the demo, the benchmarks and the whole test
//! suite.
#![forbid(unsafe_code)]

pub mod demo;
pub mod footprint;
pub mod image;
pub mod invariants;
pub mod makespan;
pub mod quorum;
pub mod scenario;
