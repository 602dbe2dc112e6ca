//! The deterministic runtime: a single-threaded executor on a virtual clock. Tasks run
//! in the order they were woken, timers fire in (deadline, order of arming), and time
//! jumps straight to the next timer when nothing is runnable. Nothing here reads the
//! real clock or any source of randomness: one seed gives one run.

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

/// A task's id: increasing, never reused.
pub type TaskId = u64;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The shared part: what wakers and timers touch.
#[derive(Default)]
struct Shared {
    ready: VecDeque<TaskId>,
    queued: std::collections::BTreeSet<TaskId>,
    timers: BTreeMap<(Duration, u64), Waker>,
    next_timer: u64,
    now: Duration,
}

/// The executor and its clock.
#[derive(Clone, Default)]
pub struct Runtime {
    shared: Arc<Mutex<Shared>>,
    tasks: Arc<Mutex<BTreeMap<TaskId, Option<Task>>>>,
    next_task: Arc<Mutex<TaskId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct TaskWaker {
    id: TaskId,
    shared: Arc<Mutex<Shared>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut s = lock(&self.shared);
        if s.queued.insert(self.id) {
            s.ready.push_back(self.id);
        }
    }
}

/// What one call of [`Runtime::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepped {
    /// Polled a task.
    Polled(TaskId),
    /// Advanced the clock to the next timer and fired it.
    Advanced(Duration),
    /// Nothing runnable and no timer: everything waits forever.
    Idle,
}

impl Runtime {
    /// Virtual time since the start of the run.
    pub fn now(&self) -> Duration {
        lock(&self.shared).now
    }

    /// Starts a task; it is first polled after the tasks already runnable.
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) -> TaskId {
        let id = {
            let mut next = lock(&self.next_task);
            *next += 1;
            *next
        };
        lock(&self.tasks).insert(id, Some(Box::pin(future)));
        let mut s = lock(&self.shared);
        s.queued.insert(id);
        s.ready.push_back(id);
        id
    }

    /// Stops a task at once: its future is dropped, as an aborted task's would be.
    pub fn kill(&self, id: TaskId) {
        // Dropped outside the lock: its destructor may touch the runtime.
        let task = lock(&self.tasks).remove(&id);
        drop(task);
    }

    /// Drops every task and timer. Tasks hold the simulation they run in, so a run
    /// that ends without this keeps its whole world alive (a reference cycle).
    pub fn shutdown(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        drop(tasks);
        let timers = std::mem::take(&mut lock(&self.shared).timers);
        drop(timers);
    }

    /// Whether the task still runs.
    pub fn alive(&self, id: TaskId) -> bool {
        lock(&self.tasks).contains_key(&id)
    }

    /// A future that completes at `now + d`.
    pub fn sleep(&self, d: Duration) -> Sleep {
        let deadline = self.now() + d;
        Sleep {
            shared: Arc::clone(&self.shared),
            deadline,
            armed: None,
        }
    }

    /// A future that completes at `deadline` (virtual time since the start).
    pub fn sleep_until(&self, deadline: Duration) -> Sleep {
        Sleep {
            shared: Arc::clone(&self.shared),
            deadline,
            armed: None,
        }
    }

    /// Runs one task, or advances the clock to the next timer when none is runnable.
    pub fn step(&self) -> Stepped {
        let next = {
            let mut s = lock(&self.shared);
            let id = s.ready.pop_front();
            if let Some(id) = id {
                s.queued.remove(&id);
            }
            id
        };
        if let Some(id) = next {
            self.poll(id);
            return Stepped::Polled(id);
        }
        let fired = {
            let mut s = lock(&self.shared);
            let Some(&(at, _)) = s.timers.keys().next() else {
                return Stepped::Idle;
            };
            s.now = s.now.max(at);
            let mut wakers = Vec::new();
            while let Some(entry) = s.timers.first_entry() {
                if entry.key().0 > at {
                    break;
                }
                wakers.push(entry.remove());
            }
            (at, wakers)
        };
        for waker in fired.1 {
            waker.wake();
        }
        Stepped::Advanced(fired.0)
    }

    /// The time of the next timer, if any.
    pub fn next_timer(&self) -> Option<Duration> {
        lock(&self.shared).timers.keys().next().map(|k| k.0)
    }

    /// Whether a task is runnable now.
    pub fn runnable(&self) -> bool {
        !lock(&self.shared).ready.is_empty()
    }

    fn poll(&self, id: TaskId) {
        // Take the task out while it runs, so that it may spawn or kill others.
        let Some(mut task) = lock(&self.tasks).get_mut(&id).and_then(Option::take) else {
            return;
        };
        let waker = Waker::from(Arc::new(TaskWaker {
            id,
            shared: Arc::clone(&self.shared),
        }));
        let mut cx = Context::from_waker(&waker);
        let done = task.as_mut().poll(&mut cx).is_ready();
        let mut tasks = lock(&self.tasks);
        match tasks.get_mut(&id) {
            // Killed while it ran: drop it (outside the lock).
            None => {
                drop(tasks);
                drop(task);
            }
            Some(slot) if done => {
                *slot = None;
                tasks.remove(&id);
            }
            Some(slot) => *slot = Some(task),
        }
    }
}

/// A virtual-time sleep.
pub struct Sleep {
    shared: Arc<Mutex<Shared>>,
    deadline: Duration,
    armed: Option<u64>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = lock(&self.shared);
        if s.now >= self.deadline {
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        match self.armed {
            Some(order) => {
                s.timers.insert((deadline, order), cx.waker().clone());
            }
            None => {
                let order = s.next_timer;
                s.next_timer += 1;
                s.timers.insert((deadline, order), cx.waker().clone());
                drop(s);
                self.armed = Some(order);
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(order) = self.armed {
            lock(&self.shared).timers.remove(&(self.deadline, order));
        }
    }
}

/// Runs `future` to completion with `bound` as the longest wait; `None` when it did
/// not finish in time (the request timeouts of the real clients).
pub async fn within<T>(
    rt: &Runtime,
    bound: Duration,
    future: impl Future<Output = T>,
) -> Option<T> {
    let mut future = std::pin::pin!(future);
    let mut sleep = std::pin::pin!(rt.sleep(bound));
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn timers_fire_in_deadline_order_and_time_jumps_to_them() {
        let rt = Runtime::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        for (name, secs) in [("b", 5u64), ("a", 2), ("c", 5)] {
            let (rt2, log) = (rt.clone(), Arc::clone(&log));
            rt.spawn(async move {
                rt2.sleep(Duration::from_secs(secs)).await;
                lock(&log).push((name, rt2.now()));
            });
        }
        while rt.step() != Stepped::Idle {}
        assert_eq!(
            *lock(&log),
            [
                ("a", Duration::from_secs(2)),
                ("b", Duration::from_secs(5)),
                ("c", Duration::from_secs(5))
            ]
        );
    }

    #[test]
    fn a_killed_task_never_runs_again_and_within_bounds_a_hung_future() {
        let rt = Runtime::default();
        let runs = Arc::new(AtomicU64::new(0));
        let (rt2, r) = (rt.clone(), Arc::clone(&runs));
        let id = rt.spawn(async move {
            loop {
                rt2.sleep(Duration::from_secs(1)).await;
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        for _ in 0..7 {
            rt.step();
        }
        rt.kill(id);
        let seen = runs.load(Ordering::SeqCst);
        for _ in 0..10 {
            rt.step();
        }
        assert_eq!(runs.load(Ordering::SeqCst), seen);
        let rt3 = rt.clone();
        let out = Arc::new(Mutex::new(None));
        let o = Arc::clone(&out);
        rt.spawn(async move {
            let hung = std::future::pending::<()>();
            *lock(&o) = Some(within(&rt3, Duration::from_secs(30), hung).await);
        });
        while rt.step() != Stepped::Idle {}
        assert_eq!(*lock(&out), Some(None));
    }
}
