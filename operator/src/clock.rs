//! The operator's wall clock. Every rule is judged at the time this clock gives, which
//! is the system's, shifted by an offset that tests move to simulate a clock jump (an
//! NTP step, a VM resumed after a pause).

use std::sync::atomic::{AtomicI64, Ordering};

use jiff::{SignedDuration, Timestamp};

/// The system clock plus an adjustable offset.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Now, as the operator sees it.
    pub fn now(&self) -> Timestamp {
        let now = Timestamp::now();
        now.checked_add(SignedDuration::from_millis(
            self.offset_ms.load(Ordering::SeqCst),
        ))
        .unwrap_or(now)
    }

    /// Makes the clock read `offset` away from the system's (a jump).
    pub fn set_offset(&self, offset: SignedDuration) {
        let ms = i64::try_from(offset.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.store(ms, Ordering::SeqCst);
    }
}
