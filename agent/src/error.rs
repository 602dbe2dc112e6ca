//! The agent's error type.

use thiserror::Error;

/// Everything the agent can fail with. Runtime failures are reported on the Node and
/// retried; only start-up failures end the process.
#[derive(Debug, Error)]
pub enum AgentError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The Kubernetes API refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A D-Bus call failed.
    #[error("D-Bus: {0}")]
    DBus(#[from] zbus::Error),
    /// The backend could not do what was asked.
    #[error("{0}")]
    Backend(String),
    /// A configured command line cannot be run.
    #[error(transparent)]
    BadCommand(#[from] crate::command::BadCommand),
    /// The reboot could not be requested.
    #[error("reboot: {0}")]
    Reboot(String),
    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
}

/// Wraps an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}
