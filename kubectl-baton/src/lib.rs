//! `kubectl baton`: a kubectl plugin to plan, watch and steer baton rollouts.
//!
//! - [`plan`]: what a policy will do, simulated.
//! - [`status`]: the live table.
//! - [`steer`]: pause, resume and retry.
#![forbid(unsafe_code)]

pub mod error;
pub mod plan;
pub mod status;
pub mod steer;

pub use error::Error;
