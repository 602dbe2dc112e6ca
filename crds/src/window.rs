//! Maintenance windows as users write them. Evaluation (cron, time zones, DST) lives
//! in the `rollout` crate; this module only holds the shape and its admission rules.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A recurring period during which new disruptions may start.
///
/// Either a 5-field cron `schedule`, or `weekdays` plus `start`; either way with a
/// `duration` and an IANA `timeZone`. Times are wall-clock times in that zone. A window
/// only gates the *start* of a node's disruption: a reboot in flight when it closes
/// runs to completion.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.schedule) != has(self.weekdays)").message("set exactly one of schedule (a 5-field cron expression) or weekdays (with start)"))]
#[x_kube(validation = Rule::new("has(self.weekdays) == has(self.start)").message("weekdays and start go together: set both, or use schedule instead"))]
pub struct MaintenanceWindow {
    /// A 5-field cron expression (minute hour day-of-month month day-of-week) for the
    /// window's start, such as `0 2 * * 6` for 02:00 every Saturday.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(CRON_RULE).message("schedule must be a 5-field cron expression: minute hour day-of-month month day-of-week, such as '0 2 * * 6' (seconds and years are not supported)"))]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,

    /// The days on which the window opens at `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("weekdays must list at least one day, such as [Sat, Sun]"))]
    #[schemars(length(max = 7))]
    pub weekdays: Option<Vec<Weekday>>,

    /// The local time the window opens on each of `weekdays`, as `HH:MM` (24-hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')").message("start must be a 24-hour time HH:MM, such as 02:00 or 23:30"))]
    #[schemars(length(max = 5))]
    pub start: Option<String>,

    /// How long the window stays open after each start, such as `4h` or `90m`.
    #[x_kube(validation = Rule::new(crate::duration::POSITIVE_RULE).message("duration must be a positive duration such as 90m, 4h or 1h30m"))]
    #[schemars(length(max = 32))]
    pub duration: String,

    /// The IANA time zone the window's times are in, such as `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$')").message("timeZone must be an IANA time zone name such as UTC, Europe/Berlin or America/New_York"))]
    #[schemars(length(max = 64))]
    pub time_zone: String,
}

/// The CEL shape check for a cron schedule: five whitespace-separated fields of digits,
/// names, `*`, `,`, `-` and `/`. croner checks the values when the operator loads it.
pub const CRON_RULE: &str = "self.matches('^ *[0-9A-Za-z*,/-]+( +[0-9A-Za-z*,/-]+){4} *$')";

fn default_time_zone() -> String {
    "UTC".to_string()
}

/// A day of the week.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// The same day in jiff's calendar.
    pub fn to_jiff(self) -> jiff::civil::Weekday {
        use jiff::civil::Weekday as J;
        match self {
            Weekday::Mon => J::Monday,
            Weekday::Tue => J::Tuesday,
            Weekday::Wed => J::Wednesday,
            Weekday::Thu => J::Thursday,
            Weekday::Fri => J::Friday,
            Weekday::Sat => J::Saturday,
            Weekday::Sun => J::Sunday,
        }
    }
}

/// A freeze: an absolute range of civil time in which no new disruption starts, even
/// while a maintenance window is open. A node already in flight finishes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.end > self.start").message("a freeze's end must come after its start"))]
pub struct Freeze {
    /// When it starts, in `timeZone`: `YYYY-MM-DDTHH:MM`, such as `2026-12-20T00:00`.
    #[x_kube(validation = Rule::new(FREEZE_TIME_RULE).message("start must be a local date and time YYYY-MM-DDTHH:MM, such as 2026-12-20T00:00"))]
    #[schemars(length(max = 32))]
    pub start: String,
    /// When it ends (exclusive), in `timeZone`: `YYYY-MM-DDTHH:MM`.
    #[x_kube(validation = Rule::new(FREEZE_TIME_RULE).message("end must be a local date and time YYYY-MM-DDTHH:MM, such as 2027-01-06T00:00"))]
    #[schemars(length(max = 32))]
    pub end: String,
    /// The IANA time zone of `start` and `end`, such as `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$')").message("timeZone must be an IANA time zone name such as UTC, Europe/Berlin or America/New_York"))]
    #[schemars(length(max = 64))]
    pub time_zone: String,
    /// Why, shown in the status and in a waiting node's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub reason: Option<String>,
}

/// The CEL shape check for a freeze's local date and time (one fixed width, so that
/// `end > start` compares them as strings correctly).
pub const FREEZE_TIME_RULE: &str = "self.matches('^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]$')";
