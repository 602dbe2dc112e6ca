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
    /// An API request failed (as a host other than kube reports it).
    #[error("kubernetes API: {0}")]
    Api(String),
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
    /// A configuration that cannot work, with the flag to change.
    #[error("{flag}: {reason}")]
    Config {
        /// The flag.
        flag: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A boot id file holds no boot id.
    #[error("{path}: {reason}")]
    BootId {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A record or state file could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// A payload setting (a key, a CA) is unusable.
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    /// The watch on the agent's Node ended.
    #[error("the watch on this node ended")]
    WatchEnded,
}

/// Wraps an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}
