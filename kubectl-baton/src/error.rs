//! The plugin's error type.

use thiserror::Error;

/// Everything that can stop a `kubectl baton` command.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not the YAML or JSON expected.
    #[error("{path} is not {what}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What it should hold.
        what: &'static str,
        /// Why it does not parse.
        source: serde_yaml_ng::Error,
    },
    /// The policy cannot be used as written.
    #[error("policy {name} is invalid:\n  {}", .errors.join("\n  "))]
    InvalidPolicy {
        /// The policy.
        name: String,
        /// What is wrong.
        errors: Vec<String>,
    },
    /// A command-line value is malformed.
    #[error("{0}")]
    Usage(String),
    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}
