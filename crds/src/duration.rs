//! Durations as users write them in a policy: Go's format (`90s`, `10m`, `1h30m`),
//! the same format CEL's `duration()` accepts at admission.
//!
//! Spec fields stay strings so that a value that got past admission can never make the
//! whole object undecodable; it is parsed here and reported as `InvalidSpec` instead.

use std::time::Duration;

use thiserror::Error;

/// CEL rule for a duration field that must be strictly positive.
pub const POSITIVE_RULE: &str =
    "self.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')";
/// CEL rule for a duration field that may be zero.
pub const NON_NEGATIVE_RULE: &str =
    "self.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('0s')";

/// A duration string that is not a Go-style duration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{value:?} is not a duration: write a number and a unit (ns, us, ms, s, m, h), such as 90s, 10m or 1h30m"
)]
pub struct DurationError {
    /// The rejected text.
    pub value: String,
}

/// Parses a Go-style duration (`1h30m`, `90s`, `1.5h`, `250ms`). Negative values are errors.
pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        value: value.to_string(),
    };
    let text = value.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') {
        return Err(err());
    }
    // jiff's "friendly" format is a superset of Go's once spaces and signs are excluded.
    let parsed: jiff::SignedDuration = text.parse().map_err(|_| err())?;
    Duration::try_from(parsed).map_err(|_| err())
}

/// Formats a duration the way it is written in a policy (`1h30m`, `90s`, `0s`).
pub fn format(duration: Duration) -> String {
    let secs = duration.as_secs();
    let millis = duration.subsec_millis();
    if secs == 0 && millis > 0 {
        return format!("{millis}ms");
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        for (text, secs) in [
            ("90s", 90.0),
            ("10m", 600.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("250ms", 0.25),
            ("0s", 0.0),
            ("2h0m5s", 7205.0),
        ] {
            assert_eq!(parse(text).unwrap().as_secs_f64(), secs, "{text}");
        }
    }

    #[test]
    fn rejects_what_cel_rejects() {
        for text in [
            "", "5", "m", "-5m", "1 hour", "1d", "1h 30m", "5x", ".m", "1..5s",
        ] {
            assert!(parse(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["90s", "10m", "1h30m", "0s", "250ms", "2h5s"] {
            let d = parse(text).unwrap();
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
    }
}
