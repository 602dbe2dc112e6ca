//! The plugin's error type, its one-line explanations and its exit codes.
//!
//! Exit codes (documented in docs/kubectl-baton.md; scripts may rely on them):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | done (also: `status -w` whose output pipe was closed) |
//! | 1 | the API server refused or failed the request, or the command failed |
//! | 2 | usage: a flag or value is wrong |
//! | 3 | not found: the named policy or node does not exist |
//! | 4 | no cluster: no usable kubeconfig, the API server cannot be reached or does not answer in time, or it refused the credentials |

use std::time::Duration;

use thiserror::Error;

/// Done.
pub const EXIT_OK: u8 = 0;
/// The API server refused or failed the request, or the command failed.
pub const EXIT_FAILED: u8 = 1;
/// A flag or value is wrong (clap uses 2 too).
pub const EXIT_USAGE: u8 = 2;
/// The named object does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// No cluster to talk to: configuration, connection, time-out or credentials.
pub const EXIT_NO_CLUSTER: u8 = 4;

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
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
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
    /// A named object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Its kind, as kubectl names it (`updatepolicy`, `node`).
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// No kubeconfig (or in-cluster configuration) could be used.
    #[error("no usable cluster configuration: {0} (check --kubeconfig, $KUBECONFIG and --context)")]
    Config(String),
    /// A request got no answer within the bound.
    #[error("no answer from the API server within {}s", .0.as_secs())]
    Timeout(Duration),
    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
    /// The API server refused or failed a request.
    #[error("{}", explain_kube(.0))]
    Kube(#[from] kube::Error),
    /// Standard output is closed (a pipe whose reader left): stop quietly.
    #[error("standard output closed")]
    ClosedOutput,
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Read { .. } | Error::Parse { .. } => EXIT_USAGE,
            Error::InvalidPolicy { .. } => EXIT_USAGE,
            Error::NotFound { .. } => EXIT_NOT_FOUND,
            Error::Config(_) | Error::Timeout(_) => EXIT_NO_CLUSTER,
            Error::Kube(e) => match e {
                kube::Error::Api(s) if s.code == 404 => EXIT_NOT_FOUND,
                kube::Error::Api(s) if s.code == 401 || s.code == 403 => EXIT_NO_CLUSTER,
                kube::Error::Api(_) => EXIT_FAILED,
                e if unreachable(e).is_some() => EXIT_NO_CLUSTER,
                kube::Error::InferConfig(_) | kube::Error::InferKubeconfig(_) => EXIT_NO_CLUSTER,
                kube::Error::Auth(_) => EXIT_NO_CLUSTER,
                _ => EXIT_FAILED,
            },
            Error::Other(_) | Error::Write { .. } => EXIT_FAILED,
            Error::ClosedOutput => EXIT_OK,
        }
    }

    /// The one line printed for this error, naming the server where one was involved.
    pub fn line(&self, server: Option<&str>) -> String {
        let at = server.map(|s| format!(" ({s})")).unwrap_or_default();
        match self {
            Error::Kube(e) => match (e, server) {
                (e, Some(s)) if unreachable(e).is_some() => format!(
                    "cannot reach the API server at {s}: {}; check that the cluster runs and that --kubeconfig/--context select it",
                    unreachable(e).unwrap_or_default()
                ),
                (kube::Error::Api(st), _) if st.code == 401 => format!(
                    "the API server{at} refused the credentials: {}; check the user of the kubeconfig context",
                    st.message
                ),
                (kube::Error::Api(st), _) if st.code == 403 => format!(
                    "forbidden{at}: {}; check your RBAC (docs/kubectl-baton.md lists what each command needs)",
                    st.message
                ),
                _ => format!("{self}{at}"),
            },
            Error::Timeout(_) => format!("{self}{at}; check that the cluster runs"),
            Error::NotFound { .. } => format!("{self}{at}"),
            _ => self.to_string(),
        }
    }
}

/// Why a request did not reach the API server, if that is what happened: the
/// innermost I/O error in the chain, in words.
fn unreachable(e: &kube::Error) -> Option<String> {
    if !matches!(e, kube::Error::HyperError(_) | kube::Error::Service(_)) {
        return None;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "connection timed out".into(),
                _ => io.to_string(),
            });
        }
        last = c.to_string();
        cause = c.source();
    }
    Some(last)
}

/// A kube error in words: an API status as its message and reason, not a debug dump.
fn explain_kube(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.message.is_empty() => {
            format!("the API server answered {} {}", s.code, s.reason)
        }
        kube::Error::Api(s) if s.code == 404 => s.message.clone(),
        kube::Error::Api(s) => format!("{} ({}, HTTP {})", s.message, s.reason, s.code),
        e => match unreachable(e) {
            Some(why) => format!("cannot reach the API server: {why}"),
            None => e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": code, "reason": reason, "message": message,
        }))
        .unwrap();
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn api_errors_are_one_line_with_the_server_and_a_code_scripts_can_use() {
        let missing = api(
            404,
            "NotFound",
            "updatepolicies.baton.dev \"nosuch\" not found",
        );
        assert_eq!(missing.exit_code(), EXIT_NOT_FOUND);
        assert_eq!(
            missing.line(Some("https://127.0.0.1:6443")),
            "updatepolicies.baton.dev \"nosuch\" not found (https://127.0.0.1:6443)"
        );
        let forbidden = api(
            403,
            "Forbidden",
            "nodes is forbidden: User \"bob\" cannot list resource \"nodes\"",
        );
        assert_eq!(forbidden.exit_code(), EXIT_NO_CLUSTER);
        let line = forbidden.line(Some("https://k"));
        assert!(
            line.starts_with("forbidden (https://k): nodes is forbidden"),
            "{line}"
        );
        let conflict = api(409, "Conflict", "the object has been modified");
        assert_eq!(conflict.exit_code(), EXIT_FAILED);
        assert_eq!(
            conflict.line(None),
            "the object has been modified (Conflict, HTTP 409)"
        );
        for e in [missing, forbidden, conflict] {
            let l = e.line(Some("s"));
            assert!(!l.contains('\n') && !l.contains("Status {"), "{l}");
        }
    }

    #[test]
    fn the_other_errors_map_to_their_documented_codes() {
        assert_eq!(Error::Usage("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(
            Error::NotFound {
                kind: "updatepolicy",
                name: "x".into()
            }
            .exit_code(),
            EXIT_NOT_FOUND
        );
        assert_eq!(Error::Config("x".into()).exit_code(), EXIT_NO_CLUSTER);
        assert_eq!(
            Error::Timeout(Duration::from_secs(30)).line(Some("https://k")),
            "no answer from the API server within 30s (https://k); check that the cluster runs"
        );
        assert_eq!(Error::ClosedOutput.exit_code(), EXIT_OK);
    }
}
