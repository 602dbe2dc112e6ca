//! `kubectl baton`: a kubectl plugin to plan, watch and steer baton rollouts.
//!
//! - [`cluster`]: kubectl's flags (`--kubeconfig`, `--context`, `-n`), resolved.
//! - [`plan`]: what a policy will do, simulated.
//! - [`gantt`]: the plan as an SVG Gantt chart.
//! - [`status`]: the report and its table.
//! - [`live`]: `status -w`, from watches.
//! - [`output`]: `-o json|yaml`, and a standard output that tolerates a closed pipe.
//! - [`steer`]: pause, resume and retry.
//! - [`why`]: why a node is (not) updating, from the real decision core.
//! - [`error`]: one-line errors and the documented exit codes.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod error;
pub mod gantt;
pub mod live;
pub mod output;
pub mod plan;
pub mod status;
pub mod steer;
pub mod why;

pub use error::Error;
