//! `kubectl baton plan --svg FILE`: the simulated timeline as a Gantt chart. One row
//! per node, grouped by zone; the maintenance windows shaded; each node's bar from its
//! grant to done (red when it would fail, open-ended when still in progress at the
//! horizon); the expected end marked. Self-contained SVG: no script, no external font
//! (the generic `sans-serif` family), no external reference.
//!
//! Every bar carries `data-node`, `data-start` and `data-end` (RFC 3339), so that a test
//! (or a script) can check the picture against the text plan.

use std::{collections::BTreeMap, fmt::Write};

use jiff::{SignedDuration, Timestamp, tz::TimeZone};

use crate::plan::PlanReport;

/// The width of the node-name column, in pixels.
const LABEL: f64 = 220.0;
/// The width of the time axis, in pixels.
const AXIS: f64 = 960.0;
/// One row's height.
const ROW: f64 = 22.0;
/// The header (title and time labels).
const HEAD: f64 = 56.0;
/// The margin below the last row.
const FOOT: f64 = 28.0;

/// The chart's size in pixels for `plan`: (width, height).
pub fn size(plan: &PlanReport) -> (u32, u32) {
    let zones = by_zone(plan).len() as f64;
    let rows = plan.rows.len() as f64 + zones;
    (
        (LABEL + AXIS + 20.0) as u32,
        (HEAD + rows * ROW + FOOT) as u32,
    )
}

/// Rows grouped by zone (`-` for none), zones by name, rows in start order.
fn by_zone(plan: &PlanReport) -> BTreeMap<&str, Vec<&crate::plan::PlanRow>> {
    let mut zones: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for row in &plan.rows {
        zones
            .entry(row.zone.as_deref().unwrap_or("-"))
            .or_default()
            .push(row);
    }
    zones
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick step that gives at most 12 ticks over `span`.
fn tick(span: SignedDuration) -> SignedDuration {
    let minutes: [i64; 10] = [10, 30, 60, 180, 360, 720, 1440, 2880, 10080, 43200];
    minutes
        .iter()
        .map(|m| SignedDuration::from_mins(*m))
        .find(|step| span.as_secs() / step.as_secs().max(1) <= 12)
        .unwrap_or(SignedDuration::from_hours(24 * 30))
}

/// The chart for `plan`, with the windows' open stretches `open`, times labelled in
/// `zone`.
pub fn svg(plan: &PlanReport, open: &[(Timestamp, Timestamp)], zone: &TimeZone) -> String {
    let start = plan.start;
    let last = plan
        .rows
        .iter()
        .filter_map(|r| r.end.or(r.start))
        .max()
        .unwrap_or(start);
    let horizon = start
        .checked_add(SignedDuration::from_secs(
            crds::duration::parse(&plan.horizon)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        ))
        .unwrap_or(last);
    let end = match plan.expected_end {
        Some(e) => e,
        None => horizon,
    }
    .max(last)
    .max(
        start
            .checked_add(SignedDuration::from_mins(10))
            .unwrap_or(start),
    );
    // A little room after the last bar.
    let span = end.duration_since(start);
    let end = end
        .checked_add(SignedDuration::from_secs(span.as_secs() / 20))
        .unwrap_or(end);
    let span_secs = end.duration_since(start).as_secs().max(1) as f64;
    let x = |t: Timestamp| {
        LABEL + AXIS * (t.duration_since(start).as_secs() as f64 / span_secs).clamp(0.0, 1.0)
    };
    let fmt = |t: Timestamp| {
        t.to_zoned(zone.clone())
            .strftime("%a %m-%d %H:%M")
            .to_string()
    };
    let (width, height) = size(plan);
    let bottom = f64::from(height) - FOOT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(&format!(
            "Plan for UpdatePolicy {}: {} nodes, {} at once, reboot time {} (times in {})",
            plan.policy,
            plan.nodes,
            plan.at_once,
            plan.reboot_time,
            zone.iana_name().unwrap_or("UTC")
        ))
    );
    // The windows, shaded.
    for (from, to) in open {
        let _ = writeln!(
            out,
            r##"<rect class="window" x="{:.1}" y="{HEAD}" width="{:.1}" height="{:.1}" fill="#d9f2d9" data-start="{from}" data-end="{to}"/>"##,
            x(*from),
            (x(*to) - x(*from)).max(1.0),
            bottom - HEAD
        );
    }
    // The time axis.
    let step = tick(end.duration_since(start));
    let mut t = start;
    while t <= end {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{bottom}" stroke="#e0e0e0"/><text x="{0:.1}" y="{2}" text-anchor="middle" font-size="10">{3}</text>"##,
            x(t),
            HEAD - 4.0,
            HEAD - 8.0,
            escape(&fmt(t))
        );
        match t.checked_add(step) {
            Ok(next) => t = next,
            Err(_) => break,
        }
    }
    // One group per zone, one row per node.
    let mut y = HEAD;
    for (zone_name, rows) in by_zone(plan) {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-weight="bold">zone {}</text>"#,
            y + ROW - 6.0,
            escape(zone_name)
        );
        y += ROW;
        for row in rows {
            let _ = writeln!(
                out,
                r#"<text x="24" y="{:.1}">{}</text>"#,
                y + ROW - 6.0,
                escape(&row.node)
            );
            if let Some(s) = row.start {
                let e = row.end.unwrap_or(end);
                let color = if row.failed.is_some() {
                    "#d9534f"
                } else {
                    "#337ab7"
                };
                let _ = writeln!(
                    out,
                    r#"<rect class="node" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}" data-node="{}" data-start="{s}" data-end="{}"><title>{}</title></rect>"#,
                    x(s),
                    y + 4.0,
                    (x(e) - x(s)).max(2.0),
                    ROW - 8.0,
                    escape(&row.node),
                    row.end.map(|e| e.to_string()).unwrap_or_default(),
                    escape(&format!(
                        "{}: {} to {}",
                        row.node,
                        fmt(s),
                        row.end.map_or("after the horizon".to_string(), fmt)
                    ))
                );
            }
            y += ROW;
        }
    }
    if let Some(e) = plan.expected_end {
        let _ = writeln!(
            out,
            r##"<line class="end" x1="{0:.1}" y1="{HEAD}" x2="{0:.1}" y2="{bottom}" stroke="#d9534f" stroke-dasharray="4 3" data-end="{e}"/><text x="{0:.1}" y="{1:.1}" text-anchor="end" fill="#d9534f">expected end {2}</text>"##,
            x(e),
            bottom + 16.0,
            escape(&fmt(e))
        );
    }
    out.push_str("</svg>\n");
    out
}
