//! The operator's error type, with a label for the reconcile-errors metric.

use thiserror::Error;

/// Everything a reconcile can fail with. None of these crash the operator: the policy
/// is requeued and the error is reported.
#[derive(Debug, Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Someone else changed the object first; the next reconcile sees the new state.
    #[error("conflict on {0}: retrying with fresh state")]
    Conflict(String),
    /// A write or read failed (refused by the API server, or not answered in time).
    #[error("{what}: {refusal}")]
    Api {
        /// What was being done.
        what: String,
        /// How it failed.
        refusal: crate::cluster::Refusal,
    },
    /// etcd refused or did not answer (the quorum guard's reads and leader moves).
    #[error("etcd: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    /// A value could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// Every `kind` label of `baton_reconcile_errors_total`, exported at 0 from the start.
    pub const METRIC_LABELS: [&'static str; 4] = ["kube", "conflict", "etcd", "encode"];

    /// The `kind` label of `baton_reconcile_errors_total` (one of [`Self::METRIC_LABELS`]).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
            Error::Api { .. } => "kube",
            Error::Etcd(_) => "etcd",
            Error::Encode(_) => "encode",
        }
    }

    /// A failed request; a 409 is [`Error::Conflict`].
    pub fn api(what: &str, refusal: crate::cluster::Refusal) -> Error {
        if refusal.code == Some(409) {
            Error::Conflict(what.to_string())
        } else {
            Error::Api {
                what: what.to_string(),
                refusal,
            }
        }
    }

    /// Maps a 409 to [`Error::Conflict`].
    pub fn from_kube(what: &str, e: kube::Error) -> Error {
        match &e {
            kube::Error::Api(s) if s.code == 409 => Error::Conflict(what.to_string()),
            _ => Error::Kube(e),
        }
    }
}

/// `Result` with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
