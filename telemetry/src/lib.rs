//! Logging for every baton binary: structured `tracing`, as text for humans or JSON
//! for log pipelines, filtered like `RUST_LOG`.
#![forbid(unsafe_code)]

use clap::{Args, ValueEnum};
use thiserror::Error;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event, with span fields.
    Json,
}

/// Logging flags, flattened into each binary's configuration.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "BATON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax (such as `info,operator=debug`).
    #[arg(long, env = "BATON_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Logging could not be set up.
#[derive(Debug, Error)]
pub enum Error {
    /// The filter does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// Why it does not parse.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised,
}

impl LogArgs {
    /// Installs the global subscriber.
    pub fn init(&self) -> Result<(), Error> {
        let filter = EnvFilter::try_new(&self.log_filter).map_err(|source| Error::Filter {
            filter: self.log_filter.clone(),
            source,
        })?;
        let registry = tracing_subscriber::registry().with(filter);
        let result = match self.log_format {
            // Colours only on a terminal, never into log files.
            LogFormat::Text => registry
                .with(
                    fmt::layer()
                        .with_target(true)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
                )
                .try_init(),
            LogFormat::Json => registry
                .with(
                    fmt::layer()
                        .json()
                        .with_current_span(true)
                        .with_span_list(true),
                )
                .try_init(),
        };
        result.map_err(|_| Error::AlreadyInitialised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_a_clear_error() {
        let args = LogArgs {
            log_format: LogFormat::Text,
            log_filter: "info,[".into(),
        };
        let err = args.init().unwrap_err();
        assert!(err.to_string().contains("invalid log filter"), "{err}");
    }
}
