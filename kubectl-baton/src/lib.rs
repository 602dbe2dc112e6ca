//! `kubectl baton`: a kubectl plugin to plan, watch and steer baton rollouts.
#![forbid(unsafe_code)]

pub mod error;
pub mod plan;

pub use error::Error;
