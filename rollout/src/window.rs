//! Maintenance windows: when a disruption may start.
//!
//! Times are wall-clock times in the window's IANA zone, resolved with jiff. A start
//! that falls in a spring-forward gap moves forward by the gap (02:30 on the day
//! Berlin skips 02:00-03:00 starts at 03:30 CEST); a start that occurs twice in a
//! fall-back overlap starts at its first occurrence only. A window's duration is
//! elapsed time, so a 4h window across a DST change is open for 4 real hours. Several
//! windows combine: the pool is open while any of them is.
//!
//! Nothing here reads the clock: every question takes `now`.

use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};
use jiff::{
    SignedDuration, Timestamp, ToSpan,
    civil::{DateTime, Time},
    tz::TimeZone,
};
use thiserror::Error;

use crds::{MaintenanceWindow, Weekday};

/// One compiled window.
#[derive(Debug, Clone)]
pub struct Window {
    schedule: Schedule,
    duration: SignedDuration,
    zone: TimeZone,
}

#[derive(Debug, Clone)]
enum Schedule {
    Cron(Box<Cron>),
    Weekly { days: Vec<Weekday>, start: Time },
}

/// A window that cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowError {
    /// The cron expression does not parse, or does not have 5 fields.
    #[error("schedule {schedule:?} is not a 5-field cron expression: {reason}")]
    Cron {
        /// The expression as written.
        schedule: String,
        /// What croner said.
        reason: String,
    },
    /// `start` is not HH:MM.
    #[error("start {0:?} is not a 24-hour HH:MM time")]
    Start(String),
    /// `duration` is not a positive duration.
    #[error("duration: {0}")]
    Duration(String),
    /// The time zone is unknown to the bundled tz database.
    #[error("timeZone {0:?} is not a known IANA time zone")]
    TimeZone(String),
    /// Neither or both of `schedule` and `weekdays` are set.
    #[error("set exactly one of schedule or weekdays+start")]
    Shape,
    /// The cron expression parses but matches no date at all (such as February 30th):
    /// the window would never open.
    #[error("schedule {0:?} matches no date in any year: this window never opens")]
    NeverOpens(String),
}

impl WindowError {
    /// The field of the window the error is in, such as `schedule`.
    pub fn field(&self) -> &'static str {
        match self {
            WindowError::Cron { .. } | WindowError::NeverOpens(_) => "schedule",
            WindowError::Start(_) => "start",
            WindowError::Duration(_) => "duration",
            WindowError::TimeZone(_) => "timeZone",
            WindowError::Shape => "schedule",
        }
    }
}

/// Whether the windows are open at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// No windows are configured: always open.
    Always,
    /// Open now, until `closes` (the end of the combined open stretch).
    Open {
        /// When the combined stretch closes.
        closes: Timestamp,
    },
    /// Closed now.
    Closed {
        /// When the next window opens, if one opens within the search horizon (5 years).
        opens: Option<Timestamp>,
    },
}

impl WindowState {
    /// Whether a disruption may start now.
    pub fn is_open(self) -> bool {
        !matches!(self, WindowState::Closed { .. })
    }

    /// The next moment this state changes, if any.
    pub fn next_edge(self) -> Option<Timestamp> {
        match self {
            WindowState::Always => None,
            WindowState::Open { closes } => Some(closes),
            WindowState::Closed { opens } => opens,
        }
    }

    /// The word shown in `kubectl get updatepolicies`.
    pub fn label(self) -> &'static str {
        match self {
            WindowState::Always => "Always",
            WindowState::Open { .. } => "Open",
            WindowState::Closed { .. } => "Closed",
        }
    }
}

impl Window {
    /// Compiles a window as written in a policy.
    pub fn compile(spec: &MaintenanceWindow) -> Result<Window, WindowError> {
        let zone = TimeZone::get(&spec.time_zone)
            .map_err(|_| WindowError::TimeZone(spec.time_zone.clone()))?;
        let duration = crds::duration::parse(&spec.duration)
            .map_err(|e| WindowError::Duration(e.to_string()))
            .and_then(|d| {
                SignedDuration::try_from(d).map_err(|e| WindowError::Duration(e.to_string()))
            })?;
        if duration.is_zero() {
            return Err(WindowError::Duration("must be longer than 0s".into()));
        }
        let schedule = match (&spec.schedule, &spec.weekdays, &spec.start) {
            (Some(expr), None, None) => {
                let cron = parse_cron(expr)?;
                if !ever_matches(&cron) {
                    return Err(WindowError::NeverOpens(expr.clone()));
                }
                Schedule::Cron(Box::new(cron))
            }
            (None, Some(days), Some(start)) if !days.is_empty() => Schedule::Weekly {
                days: days.clone(),
                start: parse_start(start)?,
            },
            _ => return Err(WindowError::Shape),
        };
        Ok(Window {
            schedule,
            duration,
            zone,
        })
    }

    /// Start instants of this window's occurrences whose wall-clock start lies in
    /// `[from, to]` (civil times in the window's zone), in no particular order.
    fn starts(&self, from: DateTime, to: DateTime) -> Vec<Timestamp> {
        let civil: Vec<DateTime> = match &self.schedule {
            Schedule::Cron(cron) => cron
                .iter_from(from, croner::Direction::Forward)
                .take_while(|dt| *dt <= to)
                .take(100_000)
                .collect(),
            Schedule::Weekly { days, start } => {
                let mut out = Vec::new();
                let mut date = from.date();
                while date <= to.date() {
                    let at = date.to_datetime(*start);
                    if (from..=to).contains(&at)
                        && days.iter().any(|d| d.to_jiff() == date.weekday())
                    {
                        out.push(at);
                    }
                    match date.tomorrow() {
                        Ok(next) => date = next,
                        Err(_) => break,
                    }
                }
                out
            }
        };
        civil
            .into_iter()
            // "compatible": a gap moves forward, an overlap takes the earlier instant.
            .filter_map(|dt| self.zone.to_ambiguous_zoned(dt).compatible().ok())
            .map(|zoned| zoned.timestamp())
            .collect()
    }

    fn civil(&self, at: Timestamp) -> DateTime {
        at.to_zoned(self.zone.clone()).datetime()
    }

    /// Occurrences `(start, end)` that contain `at`.
    fn containing(&self, at: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        // Look back one duration plus a day of slack for offsets and DST shifts.
        let back = self
            .civil(at.saturating_sub(self.duration).unwrap_or(at))
            .saturating_sub(1.day());
        let ahead = self.civil(at).saturating_add(1.day());
        let duration = self.duration;
        self.starts(back, ahead)
            .into_iter()
            .filter_map(move |s| Some((s, s.checked_add(duration).ok()?)))
            .filter(move |(s, e)| *s <= at && at < *e)
    }

    /// The first start strictly after `after`, within five years.
    fn next_start(&self, after: Timestamp) -> Option<Timestamp> {
        let mut from = self.civil(after).saturating_sub(1.day());
        // Search in growing steps so sparse schedules (Feb 29) stay cheap.
        for span_days in [8, 40, 400, 1900] {
            let to = self.civil(after).saturating_add(span_days.days());
            if let Some(first) = self
                .starts(from, to)
                .into_iter()
                .filter(|s| *s > after)
                .min()
            {
                return Some(first);
            }
            from = to;
        }
        None
    }
}

/// The windows of one policy, combined, with its freezes.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    windows: Vec<Window>,
    freezes: Vec<crate::freeze::Freeze>,
}

impl Windows {
    /// Compiles every window, collecting each error with its index.
    pub fn compile(specs: &[MaintenanceWindow]) -> Result<Windows, Vec<(usize, WindowError)>> {
        let mut windows = Vec::new();
        let mut errors = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            match Window::compile(spec) {
                Ok(w) => windows.push(w),
                Err(e) => errors.push((i, e)),
            }
        }
        if errors.is_empty() {
            Ok(Windows {
                windows,
                freezes: Vec::new(),
            })
        } else {
            Err(errors)
        }
    }

    /// No windows: always open.
    pub fn always() -> Windows {
        Windows::default()
    }

    /// These windows, closed during `freezes`.
    pub fn with_freezes(self, freezes: Vec<crate::freeze::Freeze>) -> Windows {
        Windows { freezes, ..self }
    }

    /// The freeze in force at `now`, if any.
    pub fn freeze_at(&self, now: Timestamp) -> Option<&crate::freeze::Freeze> {
        self.freezes.iter().find(|f| f.contains(now))
    }

    /// The freeze in force at `now`, or else the next one to start.
    pub fn current_or_next_freeze(&self, now: Timestamp) -> Option<&crate::freeze::Freeze> {
        self.freeze_at(now).or_else(|| {
            self.freezes
                .iter()
                .filter(|f| f.start > now)
                .min_by_key(|f| f.start)
        })
    }

    /// The stretches in which the windows are open between `from` and `to`, clipped to
    /// them: what `kubectl baton plan --svg` shades. Always open is one stretch.
    pub fn open_spans(&self, from: Timestamp, to: Timestamp) -> Vec<(Timestamp, Timestamp)> {
        let mut spans = Vec::new();
        let mut at = from;
        // Each step moves to the next edge; 10,000 steps bound a pathological schedule.
        for _ in 0..10_000 {
            if at >= to {
                break;
            }
            match self.state(at) {
                WindowState::Always => {
                    spans.push((at, to));
                    break;
                }
                WindowState::Open { closes } => {
                    spans.push((at, closes.min(to)));
                    at = closes;
                }
                WindowState::Closed { opens: Some(opens) } => at = opens,
                WindowState::Closed { opens: None } => break,
            }
        }
        spans
    }

    /// The next start of any window after `now`, in the time zone of the window that
    /// starts then: what `kubectl get upol -o wide` shows as NEXT-WINDOW.
    /// A window opening inside a freeze opens, in effect, when the freeze ends (shown in
    /// the freeze's time zone).
    pub fn next_opening(&self, now: Timestamp) -> Option<jiff::Zoned> {
        let at = match self.state(now) {
            WindowState::Closed { opens } => opens?,
            _ => {
                let next = self
                    .windows
                    .iter()
                    .filter_map(|w| w.next_start(now))
                    .min()?;
                self.opening_from(next)?
            }
        };
        let zone = self
            .freezes
            .iter()
            .find(|f| f.end == at)
            .map(|f| f.zone.clone())
            .or_else(|| {
                self.windows
                    .iter()
                    .find(|w| w.containing(at).next().is_some())
                    .map(|w| w.zone.clone())
            })
            .unwrap_or(TimeZone::UTC);
        Some(at.to_zoned(zone))
    }

    /// Whether a disruption may start at `now` (windows open, no freeze), and until or
    /// from when.
    pub fn state(&self, now: Timestamp) -> WindowState {
        if let Some(f) = self.freeze_at(now) {
            return WindowState::Closed {
                opens: self.opening_from(f.end),
            };
        }
        let next_freeze = self
            .freezes
            .iter()
            .map(|f| f.start)
            .filter(|s| *s > now)
            .min();
        match self.window_state(now) {
            WindowState::Always => match next_freeze {
                Some(start) => WindowState::Open { closes: start },
                None => WindowState::Always,
            },
            WindowState::Open { closes } => WindowState::Open {
                closes: next_freeze.map_or(closes, |s| s.min(closes)),
            },
            WindowState::Closed { opens } => WindowState::Closed {
                opens: opens.and_then(|o| self.opening_from(o)),
            },
        }
    }

    /// The first moment at or after `at` when a disruption may start.
    fn opening_from(&self, at: Timestamp) -> Option<Timestamp> {
        let mut at = at;
        // Each step passes a freeze or a closed stretch; 1,000 bound a pathological list.
        for _ in 0..1000 {
            if let Some(f) = self.freeze_at(at) {
                at = f.end;
                continue;
            }
            match self.window_state(at) {
                WindowState::Always | WindowState::Open { .. } => return Some(at),
                WindowState::Closed { opens } => at = opens?,
            }
        }
        None
    }

    /// The windows alone, without freezes.
    fn window_state(&self, now: Timestamp) -> WindowState {
        if self.windows.is_empty() {
            return WindowState::Always;
        }
        let Some(mut closes) = self
            .windows
            .iter()
            .flat_map(|w| w.containing(now))
            .map(|(_, e)| e)
            .max()
        else {
            let opens = self.windows.iter().filter_map(|w| w.next_start(now)).min();
            return WindowState::Closed { opens };
        };
        // Extend across windows that overlap or touch the current stretch.
        for _ in 0..1000 {
            let extended = self
                .windows
                .iter()
                .flat_map(|w| w.containing(closes))
                .map(|(_, e)| e)
                .max()
                .filter(|e| *e > closes);
            match extended {
                Some(e) => closes = e,
                None => break,
            }
        }
        WindowState::Open { closes }
    }
}

fn parse_cron(expr: &str) -> Result<Cron, WindowError> {
    let err = |reason: String| WindowError::Cron {
        schedule: expr.to_string(),
        reason,
    };
    if expr.split_whitespace().count() != 5 {
        return Err(err(
            "expected 5 fields: minute hour day-of-month month day-of-week".into(),
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| err(e.to_string()))
}

/// Whether a 5-field cron expression matches any date. Without a year field, a
/// schedule repeats every 400 years at the latest, and every date it can match (even
/// February 29th) comes up within 8 years of 2000-01-01, which starts a leap year.
fn ever_matches(cron: &Cron) -> bool {
    let from = DateTime::constant(2000, 1, 1, 0, 0, 0, 0);
    let to = DateTime::constant(2008, 12, 31, 23, 59, 0, 0);
    cron.iter_from(from, croner::Direction::Forward)
        .next()
        .is_some_and(|first| first <= to)
}

fn parse_start(text: &str) -> Result<Time, WindowError> {
    let err = || WindowError::Start(text.to_string());
    let (h, m) = text.split_once(':').ok_or_else(err)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(err());
    }
    let (h, m): (i8, i8) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    Time::new(h, m, 0, 0).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str, duration: &str, zone: &str) -> Windows {
        Windows::compile(&[MaintenanceWindow {
            schedule: Some(expr.into()),
            weekdays: None,
            start: None,
            duration: duration.into(),
            time_zone: zone.into(),
        }])
        .unwrap()
    }

    #[test]
    fn a_schedule_that_matches_no_date_is_refused_naming_the_schedule() {
        for never in ["0 2 30 2 *", "0 2 31 4 *", "0 2 31 2,4,6,9,11 *"] {
            let err = Window::compile(&MaintenanceWindow {
                schedule: Some(never.into()),
                weekdays: None,
                start: None,
                duration: "1h".into(),
                time_zone: "UTC".into(),
            })
            .unwrap_err();
            assert_eq!(err, WindowError::NeverOpens(never.into()));
            assert_eq!(err.field(), "schedule");
            assert!(err.to_string().contains("never opens"), "{err}");
        }
        // Rare is not never: February 29th comes every leap year.
        let leap = cron("0 2 29 2 *", "1h", "UTC");
        let WindowState::Closed { opens: Some(opens) } =
            leap.state("2026-11-28T03:00:00Z".parse().unwrap())
        else {
            panic!()
        };
        assert_eq!(opens, "2028-02-29T02:00:00Z".parse::<Timestamp>().unwrap());
    }

    fn weekly(days: &[Weekday], start: &str, duration: &str, zone: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            schedule: None,
            weekdays: Some(days.to_vec()),
            start: Some(start.into()),
            duration: duration.into(),
            time_zone: zone.into(),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn no_windows_means_always_open() {
        assert_eq!(
            Windows::always().state(ts("2026-01-01T00:00:00Z")),
            WindowState::Always
        );
    }

    #[test]
    fn a_cron_window_is_open_from_its_start_for_its_duration() {
        let w = cron("0 2 * * 6", "4h", "UTC"); // Saturdays 02:00-06:00
        assert_eq!(
            w.state(ts("2026-11-28T02:00:00Z")),
            WindowState::Open {
                closes: ts("2026-11-28T06:00:00Z")
            }
        );
        assert_eq!(
            w.state(ts("2026-11-28T05:59:59Z")),
            WindowState::Open {
                closes: ts("2026-11-28T06:00:00Z")
            }
        );
        assert_eq!(
            w.state(ts("2026-11-28T06:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-12-05T02:00:00Z"))
            }
        );
        assert_eq!(
            w.state(ts("2026-11-26T12:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-11-28T02:00:00Z"))
            }
        );
    }

    #[test]
    fn a_window_crossing_midnight_stays_open_into_the_next_day() {
        let w =
            Windows::compile(&[weekly(&[Weekday::Fri], "23:00", "3h", "Europe/Berlin")]).unwrap();
        // Friday 2026-11-27 23:00 CET = 22:00Z, until Saturday 02:00 CET = 01:00Z.
        assert!(!w.state(ts("2026-11-27T21:59:00Z")).is_open());
        assert!(w.state(ts("2026-11-27T23:30:00Z")).is_open());
        assert_eq!(
            w.state(ts("2026-11-28T00:30:00Z")),
            WindowState::Open {
                closes: ts("2026-11-28T01:00:00Z")
            }
        );
        assert!(!w.state(ts("2026-11-28T01:00:00Z")).is_open());
    }

    #[test]
    fn berlin_spring_forward_moves_a_start_in_the_gap_forward() {
        // 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist.
        let w = cron("30 2 * * *", "1h", "Europe/Berlin");
        // The start moves to 03:30 CEST = 01:30Z, and the window lasts one real hour.
        assert_eq!(
            w.state(ts("2026-03-29T01:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-03-29T01:30:00Z"))
            }
        );
        assert_eq!(
            w.state(ts("2026-03-29T01:30:00Z")),
            WindowState::Open {
                closes: ts("2026-03-29T02:30:00Z")
            }
        );
        // The day before, 02:30 CET = 01:30Z as usual.
        assert_eq!(
            w.state(ts("2026-03-28T01:30:00Z")),
            WindowState::Open {
                closes: ts("2026-03-28T02:30:00Z")
            }
        );
    }

    #[test]
    fn berlin_fall_back_starts_once_in_the_overlap() {
        // 2026-10-25: Berlin repeats 02:00-03:00 (first CEST = 00:00Z, then CET = 01:00Z).
        let w = cron("30 2 * * *", "20m", "Europe/Berlin");
        // First occurrence of 02:30 (CEST) = 00:30Z opens it.
        assert!(w.state(ts("2026-10-25T00:35:00Z")).is_open());
        // The second 02:30 (CET) = 01:30Z does not open it again.
        assert!(!w.state(ts("2026-10-25T01:35:00Z")).is_open());
        assert_eq!(
            w.state(ts("2026-10-25T01:35:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-10-26T01:30:00Z"))
            }
        );
    }

    #[test]
    fn new_york_spring_forward_and_fall_back() {
        // 2026-03-08: New York skips 02:00-03:00 EST->EDT.
        let w = Windows::compile(&[weekly(&[Weekday::Sun], "02:15", "30m", "America/New_York")])
            .unwrap();
        // 02:15 does not exist; the start moves to 03:15 EDT = 07:15Z.
        assert_eq!(
            w.state(ts("2026-03-08T07:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-03-08T07:15:00Z"))
            }
        );
        assert!(w.state(ts("2026-03-08T07:20:00Z")).is_open());
        // 2026-11-01: 01:00-02:00 repeats. A 01:30 window opens at the first 01:30 (EDT = 05:30Z) only.
        let w = Windows::compile(&[weekly(&[Weekday::Sun], "01:30", "20m", "America/New_York")])
            .unwrap();
        assert!(w.state(ts("2026-11-01T05:40:00Z")).is_open());
        assert!(!w.state(ts("2026-11-01T06:40:00Z")).is_open());
    }

    #[test]
    fn a_window_across_a_dst_change_lasts_its_elapsed_duration() {
        // Saturday 22:00 Berlin for 6h, the night clocks go back (2026-10-24/25).
        let w = cron("0 22 * * 6", "6h", "Europe/Berlin");
        // Opens 22:00 CEST = 20:00Z, closes six real hours later at 02:00Z (03:00 CET).
        assert_eq!(
            w.state(ts("2026-10-24T20:00:00Z")),
            WindowState::Open {
                closes: ts("2026-10-25T02:00:00Z")
            }
        );
    }

    #[test]
    fn several_windows_combine_and_chain() {
        let w = Windows::compile(&[
            weekly(&[Weekday::Sat], "01:00", "2h", "UTC"),
            weekly(&[Weekday::Sat], "02:30", "2h", "UTC"),
            weekly(&[Weekday::Wed], "12:00", "1h", "UTC"),
        ])
        .unwrap();
        // 01:00-03:00 and 02:30-04:30 overlap into one stretch that closes at 04:30.
        assert_eq!(
            w.state(ts("2026-11-28T01:10:00Z")),
            WindowState::Open {
                closes: ts("2026-11-28T04:30:00Z")
            }
        );
        // The next opening after Saturday is Wednesday noon.
        assert_eq!(
            w.state(ts("2026-11-28T05:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2026-12-02T12:00:00Z"))
            }
        );
    }

    #[test]
    fn open_spans_are_the_windows_clipped_to_the_range() {
        let w = Windows::compile(&[weekly(&[Weekday::Sat, Weekday::Sun], "02:00", "4h", "UTC")])
            .unwrap();
        assert_eq!(
            w.open_spans(ts("2026-12-05T03:00:00Z"), ts("2026-12-06T05:00:00Z")),
            [
                (ts("2026-12-05T03:00:00Z"), ts("2026-12-05T06:00:00Z")),
                (ts("2026-12-06T02:00:00Z"), ts("2026-12-06T05:00:00Z")),
            ]
        );
        let always = Windows::always();
        assert_eq!(
            always.open_spans(ts("2026-12-05T03:00:00Z"), ts("2026-12-06T05:00:00Z")),
            [(ts("2026-12-05T03:00:00Z"), ts("2026-12-06T05:00:00Z"))]
        );
    }

    #[test]
    fn the_next_opening_is_told_in_the_zone_of_the_window_that_opens() {
        let w = Windows::compile(&[
            weekly(&[Weekday::Sat], "22:00", "4h", "Europe/Berlin"),
            weekly(&[Weekday::Sun], "02:00", "2h", "America/New_York"),
        ])
        .unwrap();
        // Tuesday: Berlin's Saturday 22:00 (21:00Z) comes before New York's Sunday.
        let next = w.next_opening(ts("2026-12-01T12:00:00Z")).unwrap();
        assert_eq!(
            next.strftime("%Y-%m-%d %H:%M %Q").to_string(),
            "2026-12-05 22:00 Europe/Berlin"
        );
        assert_eq!(
            Some(next.timestamp()),
            w.state(ts("2026-12-01T12:00:00Z")).next_edge()
        );
        // Sunday 03:00Z: the next is New York's 02:00 (07:00Z).
        let next = w.next_opening(ts("2026-12-06T03:00:00Z")).unwrap();
        assert_eq!(
            next.strftime("%Y-%m-%d %H:%M %Q").to_string(),
            "2026-12-06 02:00 America/New_York"
        );
        assert_eq!(
            Windows::always().next_opening(ts("2026-12-01T12:00:00Z")),
            None
        );
    }

    #[test]
    fn a_sparse_cron_finds_its_next_start_years_ahead() {
        let w = cron("0 0 29 2 *", "1h", "UTC");
        assert_eq!(
            w.state(ts("2026-03-01T00:00:00Z")),
            WindowState::Closed {
                opens: Some(ts("2028-02-29T00:00:00Z"))
            }
        );
    }

    #[test]
    fn invalid_windows_say_what_is_wrong() {
        let mut bad = weekly(&[Weekday::Sat], "02:00", "1h", "Mars/Olympus");
        assert_eq!(
            Window::compile(&bad).unwrap_err(),
            WindowError::TimeZone("Mars/Olympus".into())
        );
        bad.time_zone = "UTC".into();
        bad.start = Some("2:00".into());
        assert!(matches!(Window::compile(&bad), Err(WindowError::Start(_))));
        bad.start = Some("02:00".into());
        bad.duration = "0s".into();
        assert!(matches!(
            Window::compile(&bad),
            Err(WindowError::Duration(_))
        ));
        let six = MaintenanceWindow {
            schedule: Some("0 0 2 * * 6".into()),
            weekdays: None,
            start: None,
            duration: "1h".into(),
            time_zone: "UTC".into(),
        };
        assert!(matches!(
            Window::compile(&six),
            Err(WindowError::Cron { .. })
        ));
        let out_of_range = MaintenanceWindow {
            schedule: Some("61 2 * * *".into()),
            ..six
        };
        assert!(matches!(
            Window::compile(&out_of_range),
            Err(WindowError::Cron { .. })
        ));
    }
}
