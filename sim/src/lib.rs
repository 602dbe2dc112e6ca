//! baton's deterministic whole-system simulation: the real operator (controller, steps,
//! drains, election rules and fence), the real agent (`agent::daemon::Agent` and its
//! lifecycle) and the real `kubectl baton retry`, on a model API server, a virtual
//! clock and one seeded random source, under random faults and admin actions, with
//! every safety property checked at every write.
//!
//! One seed gives one exact run: `cargo run --release -p sim -- --seed S --trace`
//! replays it, byte for byte. See docs/testing.md.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod check;
pub mod machine;
pub mod replica;
pub mod run;
pub mod runtime;
pub mod scenario;
pub mod shrink;
pub mod trace;
pub mod watch;
pub mod workload;
pub mod world;
