//! Freezes: absolute ranges of local time (`2026-12-20T00:00` to `2027-01-06T00:00`,
//! Europe/Berlin) in which no new disruption starts, whatever the windows say. They are
//! folded into [`crate::window::Windows`], so that the window state, the next opening
//! and `windowMode: Fit` all account for them.
//!
//! It must never report a moment inside a freeze as open.

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};

use crds::Freeze as FreezeSpec;

/// One freeze, resolved to instants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    /// Its first instant (a local start in a DST gap moves forward).
    pub start: Timestamp,
    /// Its end (exclusive; a local end in a DST overlap takes the earlier instant).
    pub end: Timestamp,
    /// Its time zone, to show its times in.
    pub zone: TimeZone,
    /// Its reason, if given.
    pub reason: Option<String>,
}

/// A freeze that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreezeError {
    /// Not an IANA time zone.
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin")]
    TimeZone(String),
    /// Not `YYYY-MM-DDTHH:MM`.
    #[error("{field} {value:?} is not a local date and time YYYY-MM-DDTHH:MM")]
    Time {
        /// `start` or `end`.
        field: &'static str,
        /// As written.
        value: String,
    },
    /// It ends before it starts (in instants: a DST shift can do that to close times).
    #[error("it ends ({end}) before it starts ({start})")]
    Backwards {
        /// As written.
        start: String,
        /// As written.
        end: String,
    },
}

impl FreezeError {
    /// The field of the freeze it is about.
    pub fn field(&self) -> &'static str {
        match self {
            FreezeError::TimeZone(_) => "timeZone",
            FreezeError::Time { field, .. } => field,
            FreezeError::Backwards { .. } => "end",
        }
    }
}

impl Freeze {
    /// Resolves a freeze as written in a policy.
    pub fn compile(spec: &FreezeSpec) -> Result<Freeze, FreezeError> {
        let zone = TimeZone::get(&spec.time_zone)
            .map_err(|_| FreezeError::TimeZone(spec.time_zone.clone()))?;
        let instant = |field: &'static str, value: &str| {
            let bad = || FreezeError::Time {
                field,
                value: value.to_string(),
            };
            let civil = DateTime::strptime("%Y-%m-%dT%H:%M", value).map_err(|_| bad())?;
            zone.to_ambiguous_zoned(civil)
                .compatible()
                .map(|z| z.timestamp())
                .map_err(|_| bad())
        };
        let start = instant("start", &spec.start)?;
        let end = instant("end", &spec.end)?;
        if end <= start {
            return Err(FreezeError::Backwards {
                start: spec.start.clone(),
                end: spec.end.clone(),
            });
        }
        Ok(Freeze {
            start,
            end,
            zone,
            reason: spec.reason.clone(),
        })
    }

    /// Whether `at` is inside it.
    pub fn contains(&self, at: Timestamp) -> bool {
        self.start <= at && at < self.end
    }

    /// In words: `year-end freeze (2026-12-20 00:00 to 2027-01-06 00:00 Europe/Berlin)`.
    pub fn describe(&self) -> String {
        let local = |t: Timestamp| {
            t.to_zoned(self.zone.clone())
                .strftime("%Y-%m-%d %H:%M")
                .to_string()
        };
        let zone = self.zone.iana_name().unwrap_or("UTC");
        let span = format!("{} to {} {zone}", local(self.start), local(self.end));
        match &self.reason {
            Some(reason) => format!("{reason} ({span})"),
            None => format!("freeze ({span})"),
        }
    }
}
