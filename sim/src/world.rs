//! The simulated world: the model API server, the machines, the checker, the trace
//! and the seeded random source, behind one lock, with the runtime that drives every
//! actor. Every actor holds a [`Sim`] handle.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
    time::Duration,
};

use jiff::Timestamp;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::{
    apiserver::{ApiError, ApiServer},
    check::Checker,
    machine::Machine,
    runtime::Runtime,
    trace::Trace,
};

/// Timing of the world, fixed per scenario.
#[derive(Debug, Clone)]
pub struct Timing {
    /// The longest an API request takes.
    pub max_latency: Duration,
    /// The longest a watch event takes to arrive.
    pub max_watch_delay: Duration,
    /// How long a dropped watch takes to relist.
    pub relist_after: Duration,
    /// The request bound of every client (a hung request fails after this).
    pub request_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            max_latency: Duration::from_millis(50),
            max_watch_delay: Duration::from_secs(2),
            relist_after: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Faults that act on requests while they are on.
#[derive(Debug, Clone, Default)]
pub struct RequestFaults {
    /// Per mille of requests that fail with 503.
    pub error_per_mille: u32,
    /// Requests of these clients hang (until their timeout); `true` for renewals only.
    pub hung: BTreeMap<String, bool>,
    /// Per mille of watch deliveries that drop the watch (a relist follows).
    pub drop_per_mille: u32,
}

/// Everything the actors share.
pub struct World {
    /// The model API server.
    pub api: ApiServer,
    /// The one random source: every draw comes from here, in a fixed order.
    pub rng: Pcg64Mcg,
    /// The safety properties.
    pub checker: Checker,
    /// What happened.
    pub trace: Trace,
    /// The machines, by node name.
    pub machines: BTreeMap<String, Machine>,
    /// Wall-clock offsets of operator replicas (clock jumps), by identity.
    pub clock_offsets: BTreeMap<String, jiff::SignedDuration>,
    /// Request faults now on.
    pub faults: RequestFaults,
    /// Timing.
    pub timing: Timing,
    /// Wall time at virtual time zero.
    pub start: Timestamp,
    /// Woken on every change to a watched kind.
    pub watchers: Vec<Arc<Signal>>,
    /// The operator replicas' tasks, by index.
    pub replicas: BTreeMap<usize, crate::runtime::TaskId>,
    /// The tasks of each replica's current life (caches, controller, drains), by
    /// identity: they die with it.
    pub replica_tasks: BTreeMap<String, Vec<crate::runtime::TaskId>>,
    /// The base of the tokio instants the fences use (only differences matter).
    pub base_instant: tokio::time::Instant,
}

impl World {
    /// A world starting at `start`, its random source seeded with `seed`.
    pub fn new(seed: u64, start: Timestamp, timing: Timing, staleness: Duration) -> World {
        World {
            api: {
                let mut api = ApiServer::default();
                api.now = Some(start);
                api
            },
            rng: Pcg64Mcg::seed_from_u64(seed),
            checker: Checker::new(staleness),
            trace: Trace::default(),
            machines: BTreeMap::new(),
            clock_offsets: BTreeMap::new(),
            faults: RequestFaults::default(),
            timing,
            start,
            watchers: Vec::new(),
            replicas: BTreeMap::new(),
            replica_tasks: BTreeMap::new(),
            base_instant: tokio::time::Instant::now(),
        }
    }

    /// A draw in `0..=max` milliseconds.
    pub fn jitter(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis() as u64;
        Duration::from_millis(if ms == 0 {
            0
        } else {
            self.rng.random_range(0..=ms)
        })
    }

    /// `true` with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.rng.random_range(0..1000) < per_mille
    }

    /// Wakes every watch: the change log grew.
    pub fn changed(&mut self) {
        // A watch whose task is gone holds no other handle on its signal.
        self.watchers.retain(|w| Arc::strong_count(w) > 1);
        for w in &self.watchers {
            w.notify();
        }
    }
}

/// A handle on the world and its runtime.
#[derive(Clone)]
pub struct Sim {
    /// The runtime.
    pub rt: Runtime,
    /// The world.
    pub world: Arc<Mutex<World>>,
}

impl Sim {
    /// The world, locked. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The true wall time.
    pub fn wall(&self) -> Timestamp {
        let start = self.lock().start;
        start
            .checked_add(jiff::SignedDuration::try_from(self.rt.now()).unwrap_or_default())
            .unwrap_or(start)
    }

    /// An API request's trip: a random latency, then `apply` on the world (atomically),
    /// unless a fault fails it first or it hangs until the client's bound.
    pub async fn request<T>(
        &self,
        client: &str,
        renewal: bool,
        apply: impl FnOnce(&mut World) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (latency, fail, hang, timeout) = {
            let mut w = self.lock();
            let max = w.timing.max_latency;
            let latency = w.jitter(max);
            let per_mille = w.faults.error_per_mille;
            let fail = w.chance(per_mille);
            let hang = w
                .faults
                .hung
                .get(client)
                .is_some_and(|renewals_only| !renewals_only || renewal);
            (latency, fail, hang, w.timing.request_timeout)
        };
        if hang {
            self.rt.sleep(timeout).await;
            return Err(ApiError::Timeout);
        }
        self.rt.sleep(latency).await;
        if fail {
            return Err(ApiError::Unavailable);
        }
        let mut w = self.lock();
        w.api.now = Some(
            w.start
                .checked_add(jiff::SignedDuration::try_from(self.rt.now()).unwrap_or_default())
                .unwrap_or(w.start),
        );
        let before = w.api.log.len();
        let out = apply(&mut w);
        if w.api.log.len() != before {
            w.changed();
        }
        out
    }
}

/// A one-slot wake-up: `notify` sets it, `wait` completes once it is set and clears it.
#[derive(Default)]
pub struct Signal(Mutex<(bool, Option<Waker>)>);

impl Signal {
    /// Sets the signal, waking its waiter.
    pub fn notify(&self) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        s.0 = true;
        if let Some(w) = s.1.take() {
            w.wake();
        }
    }

    /// Completes once the signal is set (at once if it is), and clears it.
    pub fn wait(&self) -> Wait<'_> {
        Wait(self)
    }
}

/// [`Signal::wait`].
pub struct Wait<'a>(&'a Signal);

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = (self.0).0.lock().unwrap_or_else(PoisonError::into_inner);
        if s.0 {
            s.0 = false;
            Poll::Ready(())
        } else {
            s.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Which of two futures finished first (`a` is polled first).
pub enum Either<A, B> {
    /// The first.
    Left(A),
    /// The second.
    Right(B),
}

/// Runs both futures until one finishes; `a` is polled first.
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}
