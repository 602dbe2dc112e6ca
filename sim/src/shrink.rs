//! Shrinking a failing scenario: drop events (halves first, then one at a time) and
//! shorten the fault phase while the same property still breaks. The world's random
//! source stays seeded the same, so each trial is as deterministic as the original.

use crate::{run, scenario::Scenario};

/// The smallest scenario found that still breaks `property`, and its outcome.
pub fn shrink(original: &Scenario, property: &str, max_trials: usize) -> (Scenario, run::Outcome) {
    let fails = |s: &Scenario| {
        let out = run::run(s, false);
        let same = out
            .violation
            .as_ref()
            .is_some_and(|v| v.property == property);
        (same, out)
    };
    let mut best = original.clone();
    let mut outcome = run::run(&best, false);
    let mut trials = 0;
    // Halves, then quarters, ... then single events.
    let mut chunk = best.events.len().div_ceil(2).max(1);
    while chunk >= 1 && trials < max_trials {
        let mut i = 0;
        let mut progressed = false;
        while i < best.events.len() && trials < max_trials {
            let mut candidate = best.clone();
            let end = (i + chunk).min(candidate.events.len());
            candidate.events.drain(i..end);
            trials += 1;
            let (same, out) = fails(&candidate);
            if same {
                best = candidate;
                outcome = out;
                progressed = true;
            } else {
                i += chunk;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    // A shorter fault phase, if the failure does not need the rest of it.
    if let Some(last) = best.events.last().map(|(at, _)| *at) {
        let mut candidate = best.clone();
        candidate.quiet_at = last + std::time::Duration::from_secs(1);
        if candidate.quiet_at < best.quiet_at && trials < max_trials {
            let (same, out) = fails(&candidate);
            if same {
                best = candidate;
                outcome = out;
            }
        }
    }
    (best, outcome)
}
