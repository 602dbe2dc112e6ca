//! The harness's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can stop the harness.
#[derive(Debug, Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `go build` of a control-plane binary failed.
    #[error("building {binary} failed (log: {log}):\n{tail}")]
    Build {
        /// The binary.
        binary: String,
        /// The full build log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A component did not become ready in time.
    #[error("{component} was not ready within {seconds}s (log: {log}):\n{tail}")]
    NotReady {
        /// The component.
        component: String,
        /// How long the harness waited.
        seconds: u64,
        /// Its log file.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// A program cannot run: missing, not executable, or exiting 126/127 (the shell's
    /// "cannot execute" and "not found").
    #[error("cannot run {path}: {problem}; {hint}")]
    CannotRun {
        /// The program.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// How to get it.
        hint: String,
    },
    /// Certificates could not be generated.
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be loaded.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A YAML document could not be parsed.
    #[error("{path}: {source}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_yaml_ng::Error,
    },
    /// A state the harness cannot continue from.
    #[error("{0}")]
    Other(String),
}

/// `Result` with the harness's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
