//! Update backends: where updates come from and how they are staged and committed. All
//! sit behind [`Backend`]; the daemon is generic over it.
//!
//! - [`sim`]: slots and a boot id in a state directory, for tests and the demo.
//! - [`sentinel`]: kured-compatible; a file or a command says a reboot is needed.
//! - [`flatcar`]: Flatcar's update_engine over D-Bus.
//! - [`ab`]: the native A/B updater on GPT slots.

use std::future::Future;

use futures::stream::BoxStream;

use crds::protocol::{ReleaseRef, Version};

use crate::{error::AgentError, lifecycle::Status};

pub mod ab;
pub mod flatcar;
pub mod sentinel;
pub mod sim;

/// What the operator published for this node: the version to converge on and, for the
/// A/B backend, where its image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// `baton.dev/desired-version`.
    pub version: Version,
    /// `baton.dev/desired-release`.
    pub release: Option<ReleaseRef>,
}

/// One way of getting OS updates onto a node.
pub trait Backend: Send {
    /// Reads where the OS stands. `desired` is what the operator published on the
    /// Node, for backends that install a given version.
    fn status(
        &mut self,
        desired: Option<&Desired>,
    ) -> impl Future<Output = Result<Status, AgentError>> + Send;

    /// Writes the desired version into the inactive slot, never touching the booted one.
    fn stage(&mut self, desired: &Desired) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// Marks the booted slot good, after the health checks passed.
    fn commit(&mut self) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// Wake-ups when the backend's state changes by itself (update_engine's signals),
    /// so that the daemon need not poll for them.
    fn changes(&mut self) -> Option<BoxStream<'static, ()>> {
        None
    }
}
