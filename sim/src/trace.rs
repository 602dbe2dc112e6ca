//! The trace of a run: time, actor, action and the objects it changed, one line each.
//! It is kept only when asked for (a replay) and for the last steps of every run, so
//! that exploring stays fast and a failure can still be shown.

use std::{collections::VecDeque, fmt, time::Duration};

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Virtual time.
    pub at: Duration,
    /// Who acted.
    pub actor: String,
    /// What it did, with the objects it changed.
    pub action: String,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.at.as_millis();
        write!(
            f,
            "{:>5}.{:03}s {:<14} {}",
            ms / 1000,
            ms % 1000,
            self.actor,
            self.action
        )
    }
}

/// The trace.
#[derive(Debug, Default)]
pub struct Trace {
    /// Keep every entry (a replay); otherwise only the last [`Trace::TAIL`].
    pub full: bool,
    entries: VecDeque<Entry>,
    /// Entries recorded in all.
    pub count: u64,
}

impl Trace {
    /// Entries kept when not tracing in full.
    pub const TAIL: usize = 64;

    /// Records an entry.
    pub fn record(&mut self, at: Duration, actor: &str, action: impl Into<String>) {
        self.count += 1;
        if !self.full && self.entries.len() == Self::TAIL {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            at,
            actor: actor.to_string(),
            action: action.into(),
        });
    }

    /// The entries kept.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}
