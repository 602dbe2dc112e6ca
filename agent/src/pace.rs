//! How gently staging runs beside the node's workloads.
//!
//! Staging writes a whole OS image while the node serves traffic. Its threads (the
//! slot writer, the read-back and its hash) run in the idle I/O class (`ioprio_set`:
//! the I/O scheduler serves them when no other I/O waits; mq-deadline since Linux 5.14
//! and BFQ honour it, the `none` scheduler does not), at a low CPU priority (nice 19),
//! and, when asked, under a byte rate shared by the writes and the read-back
//! (`--stage-rate-limit`). Nothing
//! here can fail a staging: a priority the kernel refuses is reported once and
//! staging goes on at the priority it has.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The I/O scheduling class of the staging threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoClass {
    /// Served only while no other I/O waits for the disk (the default).
    Idle,
    /// The kernel's default class, at its lowest level (7).
    BestEffort,
    /// The thread's class is left as it is (the agent's own).
    Inherit,
}

/// How staging is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The staging threads' I/O class.
    pub io: IoClass,
    /// Their nice value (0 leaves it as it is; at most 19).
    pub nice: u8,
    /// The most bytes per second staging reads and writes on the device, if limited.
    pub rate: Option<u64>,
    /// The largest single read or write staging issues, if smaller than its buffers
    /// (a multiple of 4 KiB): a request already at the device cannot be overtaken, so
    /// a workload's read waits behind at most one of these.
    pub piece: Option<usize>,
}

impl Default for Pace {
    fn default() -> Self {
        Pace::gentle()
    }
}

/// The largest request of a gentle staging (see [`Pace::piece`]).
pub const GENTLE_PIECE: usize = 64 << 10;

/// The priorities a staging thread ended up with (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Its I/O priority as `ioprio_get` reports it (class << 13 | level).
    pub ioprio: Option<u16>,
    /// Its nice value.
    pub nice: Option<i32>,
}

impl Pace {
    /// The default: idle I/O class, nice 19, no rate limit, requests of at most
    /// [`GENTLE_PIECE`].
    pub fn gentle() -> Pace {
        Pace {
            io: IoClass::Idle,
            nice: 19,
            rate: None,
            piece: Some(GENTLE_PIECE),
        }
    }

    /// No pacing at all: the threads keep the agent's priorities (benchmark baseline).
    pub fn unpaced() -> Pace {
        Pace {
            io: IoClass::Inherit,
            nice: 0,
            rate: None,
            piece: None,
        }
    }

    /// Applies the I/O class and nice value to the calling thread (Linux keeps both
    /// per thread). A refusal is logged and staging goes on.
    pub fn enter(&self) -> Applied {
        use ioprio::{BePriorityLevel, Class, Pid, Priority, Target};
        let this_thread = Target::Process(Pid::from_raw(0));
        let class = match self.io {
            IoClass::Idle => Some(Class::Idle),
            IoClass::BestEffort => Some(Class::BestEffort(BePriorityLevel::lowest())),
            IoClass::Inherit => None,
        };
        if let Some(class) = class
            && let Err(e) = ioprio::set_priority(this_thread, Priority::new(class))
        {
            tracing::warn!(error = %e, class = ?self.io, "cannot set the staging I/O class");
        }
        if self.nice > 0 {
            let wanted = i32::from(self.nice.min(19));
            // Only ever lower the priority: raising it needs CAP_SYS_NICE.
            let current = rustix::process::getpriority_process(None).unwrap_or(0);
            if current < wanted
                && let Err(e) = rustix::process::setpriority_process(None, wanted)
            {
                tracing::warn!(error = %e, nice = wanted, "cannot lower the staging CPU priority");
            }
        }
        Applied {
            ioprio: ioprio::get_priority(this_thread).ok().map(|p| p.inner()),
            nice: rustix::process::getpriority_process(None).ok(),
        }
    }

    /// Runs `work` on a new thread named `name` at this pace; the result comes back
    /// through the returned receiver (closed without a value if `work` panicked).
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pace = *self;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                pace.enter();
                let _ = tx.send(work());
            })?;
        Ok(rx)
    }

    /// The size of the next request when `left` bytes remain: at most the piece
    /// (rounded down to 4 KiB, direct I/O's alignment, and at least that).
    pub fn request(&self, left: usize) -> usize {
        self.piece
            .map_or(left, |p| (p / 4096 * 4096).max(4096))
            .min(left)
    }

    /// `len` bytes cut into the requests this pace issues: (start, length) pairs.
    pub fn pieces(&self, len: usize) -> impl Iterator<Item = (usize, usize)> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let n = self.request(len - at);
            (n > 0).then(|| {
                at += n;
                (at - n, n)
            })
        })
    }

    /// A limiter for this pace's rate (one for a whole staging: writes and read-back
    /// share it).
    pub fn limiter(&self) -> Limiter {
        Limiter {
            pace: *self,
            bucket: self
                .rate
                .map(|rate| Mutex::new(Bucket::new(rate, Instant::now()))),
        }
    }
}

/// A byte rate with a burst of one second's worth: the pure part of the limit. Time is
/// passed in.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    /// Bytes that may go without waiting, as of `at` (negative: owed).
    credit: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket for `rate` bytes per second (at least 1) at `now`.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate.max(1);
        Bucket {
            rate,
            credit: rate as f64,
            at: now,
        }
    }

    /// Takes `bytes` at `now`; returns how long to wait before using them so that
    /// no window of time sees more than `rate` per second plus one second's burst.
    pub fn take(&mut self, now: Instant, bytes: u64) -> Duration {
        let rate = self.rate as f64;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.credit = (self.credit + elapsed * rate).min(rate) - bytes as f64;
        self.at = now.max(self.at);
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.credit / rate)
        }
    }
}

/// The rate limit of one staging, shared by its threads.
#[derive(Debug)]
pub struct Limiter {
    pace: Pace,
    bucket: Option<Mutex<Bucket>>,
}

impl Limiter {
    /// The pace it limits for.
    pub fn pace(&self) -> &Pace {
        &self.pace
    }

    /// Blocks the calling (staging) thread until `bytes` may go to the device.
    pub fn wait(&self, bytes: u64) {
        let Some(bucket) = &self.bucket else { return };
        let delay = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(Instant::now(), bytes);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_staging_thread_runs_in_the_idle_class_at_nice_19() {
        let applied = Pace::gentle()
            .spawn("test-pace", || Pace::gentle().enter())
            .unwrap()
            .blocking_recv()
            .unwrap();
        // IOPRIO_CLASS_IDLE is 3, in the top three bits.
        assert_eq!(applied.ioprio.map(|p| p >> 13), Some(3), "{applied:?}");
        assert_eq!(applied.nice, Some(19));
        // The caller's own thread is untouched.
        let here = ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(0)))
            .unwrap()
            .inner();
        assert_ne!(here >> 13, 3);
    }

    #[test]
    fn unpaced_threads_keep_the_agents_priorities() {
        let mine = (
            ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(0)))
                .unwrap()
                .inner(),
            rustix::process::getpriority_process(None).unwrap(),
        );
        let applied = Pace::unpaced()
            .spawn("test-unpaced", || Pace::unpaced().enter())
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert_eq!((applied.ioprio, applied.nice), (Some(mine.0), Some(mine.1)));
    }

    #[test]
    fn requests_are_cut_on_4_kib_boundaries_into_pieces() {
        let pace = Pace {
            piece: Some(10_000),
            ..Pace::gentle()
        };
        let pieces: Vec<_> = pace.pieces(20_000).collect();
        assert_eq!(pieces, [(0, 8192), (8192, 8192), (16384, 3616)]);
        assert_eq!(Pace::unpaced().pieces(5).collect::<Vec<_>>(), [(0, 5)]);
        assert_eq!(Pace::gentle().pieces(0).count(), 0);
    }

    #[test]
    fn a_full_bucket_lets_one_second_through_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        assert_eq!(b.take(t0, 100), Duration::ZERO);
        assert_eq!(b.take(t0, 50), Duration::from_millis(500));
        // Half a second later the debt is paid; 50 more wait half a second again.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, 50), Duration::from_millis(500));
    }

    proptest! {
        /// Whatever the sizes and timing, the bytes used by time t (each taken chunk
        /// used at its release time) never exceed rate·t plus one second's burst.
        #[test]
        fn the_rate_is_never_exceeded(
            rate in 1u64..10_000_000,
            steps in proptest::collection::vec((0u64..2_000_000, 0u64..50), 1..60),
        ) {
            let t0 = Instant::now();
            let mut b = Bucket::new(rate, t0);
            let mut now = t0;
            let mut used = 0f64;
            for (bytes, pause_ms) in steps {
                now += Duration::from_millis(pause_ms);
                let wait = b.take(now, bytes);
                // The caller sleeps, then uses the bytes.
                now += wait;
                used += bytes as f64;
                let allowed = rate as f64 * (1.0 + now.duration_since(t0).as_secs_f64());
                prop_assert!(used <= allowed * (1.0 + 1e-9) + 1.0, "{used} > {allowed}");
            }
        }
    }
}
