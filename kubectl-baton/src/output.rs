//! Where output goes: `-o table|json|yaml`, and a standard output that ends the
//! command quietly when its reader leaves (`kubectl baton status -w | head`): the
//! write fails with `BrokenPipe`, which becomes [`Error::ClosedOutput`] and exit 0.

use std::io::Write;

use serde::Serialize;

use crate::Error;

/// `-o`: how a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// For humans.
    #[default]
    Table,
    /// The report as JSON (schema: docs/kubectl-baton.md).
    Json,
    /// The report as YAML (the same fields as JSON).
    Yaml,
}

impl Format {
    /// `value` as JSON or YAML text; `None` for a table (the caller draws it).
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Option<String>, Error> {
        match self {
            Format::Table => Ok(None),
            Format::Json => serde_json::to_string_pretty(value)
                .map(|s| Some(s + "\n"))
                .map_err(|e| Error::Other(format!("cannot encode the report: {e}"))),
            Format::Yaml => serde_yaml_ng::to_string(value)
                .map(Some)
                .map_err(|e| Error::Other(format!("cannot encode the report: {e}"))),
        }
    }
}

/// Writes `text` to `out` and flushes it; a closed pipe is [`Error::ClosedOutput`].
pub fn write(out: &mut impl Write, text: &str) -> Result<(), Error> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Error::ClosedOutput,
            _ => Error::Other(format!("cannot write the output: {e}")),
        })
}

/// [`write`] to standard output.
pub fn print(text: &str) -> Result<(), Error> {
    write(&mut std::io::stdout().lock(), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_ends_quietly() {
        let e = write(&mut Closed, "x").unwrap_err();
        assert!(matches!(e, Error::ClosedOutput));
        assert_eq!(e.exit_code(), crate::error::EXIT_OK);
    }

    #[test]
    fn reports_encode_as_json_and_yaml() {
        let v = serde_json::json!({"a": 1});
        assert_eq!(Format::Table.encode(&v).unwrap(), None);
        assert_eq!(
            Format::Json.encode(&v).unwrap().unwrap(),
            "{\n  \"a\": 1\n}\n"
        );
        assert_eq!(Format::Yaml.encode(&v).unwrap().unwrap(), "a: 1\n");
    }
}
