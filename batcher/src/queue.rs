//! The queue every instance pulls batches from, and the rules that decide when a batch is ready.
//!
//! Formation follows Triton's dynamic batcher. An idle instance takes queued jobs in priority order
//! (FIFO within a level) while they fit in `max_batch_size` rows and can share a batch with the
//! first one. The batch goes at once if it cannot grow (it is full, or the next job does not fit),
//! if a prefix of it has a preferred size (the largest such prefix goes), if there is no queue
//! delay, or once its oldest job has waited `max_queue_delay`. Otherwise the instance waits for
//! more jobs or for the delay to run out. Without dynamic batching each job runs alone. Jobs whose
//! callers left, or whose deadline passed, are dropped unexecuted. With a latency budget the delay
//! is not fixed but follows the model's measured latency (`adaptive.rs`); with
//! `wait_only_for_company` it is waited only while another job is likely to arrive in it
//! (`company.rs`).
//!
//! A batch is exactly the jobs that formation judged: their positions are recorded while deciding
//! and taken as they are, so a caller leaving in between cannot pull an unjudged job (too large, or
//! of another shape) into the batch. Taking a job claims it (`Pending::start`): from then on its
//! caller's timeout no longer applies and it gets its answer.
//!
//! The queue is a mutex and a condition variable rather than a scheduler thread: a job queued while
//! every instance is busy wakes no thread, and a free instance forms its next batch itself. The
//! deadline of a waiting job is kept by its caller's future (see `Batcher::submit`), so timeouts
//! fire on time even when no instance is free; instances only skip such jobs.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::adaptive::AdaptiveDelay;
use crate::company::CompanyEstimate;
use crate::{BatchError, BatchObserver, BatchPolicy, Executor, Job, Pending};

/// State shared by the batcher handle and its instances.
pub(crate) struct Shared<X: Executor> {
    pub(crate) policy: BatchPolicy,
    observer: Arc<dyn BatchObserver>,
    state: Mutex<State<X>>,
    /// Signalled when jobs arrive or the batcher shuts down; idle instances wait on it.
    arrived: Condvar,
    /// The async runtime the batcher was started on, where instances deliver a batch's answers
    /// (see `instance::deliver`); `None` when started outside one.
    runtime: Option<tokio::runtime::Handle>,
}

struct State<X: Executor> {
    /// One FIFO per priority level, index 0 = level 1.
    queues: Vec<VecDeque<Pending<X>>>,
    /// Instances waiting on `arrived`.
    waiting: usize,
    /// A `DeferredWake` is on its way to wake an instance: since when, and the rows pushed since;
    /// arrivals until it runs need not wake one themselves (within bounds, see `push`).
    deferred: Option<(Instant, usize)>,
    shut_down: bool,
    /// (level index, position) of the live jobs the last decision judged, in batch order; kept
    /// here so forming a batch allocates nothing.
    judged: Vec<(usize, usize)>,
    /// Jobs dropped for their deadline since the last look: each counts as over the latency
    /// budget (else the adaptive delay would learn only from the jobs fast enough to run).
    timed_out: usize,
    /// The queue delay under a latency budget; `None` means the policy's fixed delay.
    adaptive: Option<AdaptiveDelay>,
    /// The arrival rate that says whether the delay is worth waiting, under
    /// `wait_only_for_company`; `None` means it is always waited.
    company: Option<CompanyEstimate>,
}

/// What batch formation decided.
#[derive(Clone, Copy)]
enum Decision {
    /// Take the first `n` jobs of `State::judged` now.
    Take(usize),
    /// Nothing is ready; look again at this instant, or when a job arrives.
    WaitUntil(Instant),
    /// The queues are empty.
    Empty,
}

impl<X: Executor> Shared<X> {
    pub(crate) fn new(policy: BatchPolicy, observer: Arc<dyn BatchObserver>) -> Self {
        Self {
            state: Mutex::new(State {
                queues: (0..policy.priority_levels)
                    .map(|_| VecDeque::new())
                    .collect(),
                waiting: 0,
                deferred: None,
                shut_down: false,
                judged: Vec::new(),
                timed_out: 0,
                adaptive: policy
                    .latency_budget
                    .map(|budget| AdaptiveDelay::new(budget, policy.delay_ceiling())),
                company: policy
                    .wait_only_for_company
                    .then(|| CompanyEstimate::new(Instant::now())),
            }),
            arrived: Condvar::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            policy,
            observer,
        }
    }

    pub(crate) fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref()
    }

    pub(crate) fn observer(&self) -> &dyn BatchObserver {
        self.observer.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State<X>> {
        // A panic while holding the lock can only come from an observer; the queue stays usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn depth(&self) -> usize {
        self.lock().queues.iter().map(VecDeque::len).sum()
    }

    /// Queues a job, or rejects it at once when its level is full or the batcher is stopping.
    /// An idle instance is woken for it, at once or by a `DeferredWake`.
    pub(crate) fn push(self: &Arc<Self>, pending: Pending<X>) -> Result<(), BatchError<X::Error>> {
        let (rows, enqueued) = (pending.rows, pending.enqueued);
        let mut state = self.lock();
        if state.shut_down {
            return Err(BatchError::Shutdown);
        }
        let level = pending.level;
        let capacity = self.policy.queue_policy(level).max_queue_size;
        let State {
            queues, timed_out, ..
        } = &mut *state;
        let queue = &mut queues[level as usize - 1];
        if queue.len() >= capacity {
            // Jobs whose callers left hold no place.
            let now = Instant::now();
            queue.retain(|p| {
                let keep = !p.departed();
                if !keep && p.timed_out(now) {
                    *timed_out += 1;
                }
                keep
            });
            if queue.len() >= capacity {
                return Err(BatchError::QueueFull { level, capacity });
            }
        }
        queue.push_back(pending);
        let depth = state.queues.iter().map(VecDeque::len).sum();
        if let Some(company) = &mut state.company {
            company.arrived(depth > 1);
        }
        let wake = if state.waiting == 0 {
            Wake::None
        } else {
            match &mut state.deferred {
                // A deferred wake-up is coming: this job joins its batch, unless the batch is
                // already full or the wake-up is late (its runtime is busy).
                Some((since, deferred_rows)) => {
                    *deferred_rows += rows;
                    // (Deferral needs batching: `max_batch_size` is above 0 here.)
                    let full = *deferred_rows >= self.policy.max_batch_size;
                    if full || enqueued.saturating_duration_since(*since) >= MAX_DEFERRAL {
                        Wake::Now
                    } else {
                        Wake::None
                    }
                }
                None => match deferrable_runtime() {
                    Some(runtime) if self.policy.max_batch_size > rows => {
                        state.deferred = Some((enqueued, rows));
                        Wake::Deferred(runtime)
                    }
                    _ => Wake::Now,
                },
            }
        };
        // Reported under the lock, so reports reach the observer in the order the queue changed.
        self.observer.queue_depth(depth);
        drop(state);
        // Notified after unlocking, so the woken instance does not block on the lock at once.
        match wake {
            Wake::None => {}
            Wake::Now => self.arrived.notify_one(),
            Wake::Deferred(runtime) => {
                let wake = DeferredWake(self.clone());
                runtime.spawn(async move { drop(wake) });
            }
        }
        Ok(())
    }

    /// Answers every queued job with `Shutdown` and releases the instances.
    pub(crate) fn shut_down(&self) {
        let mut state = self.lock();
        state.shut_down = true;
        let queued: Vec<Pending<X>> = state.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
        self.observer.queue_depth(0);
        drop(state);
        self.arrived.notify_all();
        for pending in queued {
            pending.fail(BatchError::Shutdown);
        }
    }

    /// The queue delay batch formation uses now (the fixed one, or the adaptive one's).
    pub(crate) fn queue_delay(&self) -> Duration {
        match &self.lock().adaptive {
            Some(adaptive) => adaptive.current(),
            None => self.policy.max_queue_delay,
        }
    }

    /// An instance finished executing its batch and is about to answer it. Told before the
    /// answers go, so a caller's next request, sent because its answer came, is never counted as
    /// arriving while the batch executed.
    pub(crate) fn executed(&self) {
        if self.policy.wait_only_for_company
            && let Some(company) = &mut self.lock().company
        {
            company.finished(Instant::now());
        }
    }

    /// Takes the latencies of the jobs of the batch an instance just finished (they steer the
    /// adaptive delay), then blocks until a batch is ready and returns it; `None` once the
    /// batcher shuts down. The batch may be empty when every judged job's caller gave up.
    pub(crate) fn next_batch(&self, finished: &[Duration]) -> Option<Vec<Pending<X>>> {
        let mut state = self.lock();
        if let Some(adaptive) = &mut state.adaptive {
            adaptive.record(finished);
        }
        loop {
            if state.shut_down {
                return None;
            }
            let now = Instant::now();
            let delay = match &state.adaptive {
                Some(adaptive) => adaptive.current(),
                None => self.policy.max_queue_delay,
            };
            let State {
                queues,
                judged,
                timed_out,
                adaptive,
                company,
                ..
            } = &mut *state;
            let waits = Waits {
                delay,
                company: company.as_ref(),
            };
            let decision = decide(&self.policy, waits, queues, judged, timed_out, now);
            let batch = match decision {
                Decision::Take(n) => Some(take(queues, &judged[..n], timed_out, now)),
                _ => None,
            };
            if let Some(adaptive) = adaptive {
                adaptive.record_timeouts(*timed_out);
            }
            *timed_out = 0;
            match decision {
                Decision::Take(_) => {
                    let batch = batch.expect("taken above");
                    if let Some(company) = &mut state.company {
                        company.started(now);
                    }
                    let depth = state.queues.iter().map(VecDeque::len).sum();
                    self.observer.queue_depth(depth);
                    // Jobs left behind (they did not fit) wake an idle instance, which would
                    // otherwise sleep until the next arrival.
                    let wake = depth > 0 && state.waiting > 0;
                    drop(state);
                    if wake {
                        self.arrived.notify_one();
                    }
                    return Some(batch);
                }
                Decision::WaitUntil(at) => {
                    state.waiting += 1;
                    let timeout = at.saturating_duration_since(now);
                    state = self
                        .arrived
                        .wait_timeout(state, timeout)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                    state.waiting -= 1;
                }
                Decision::Empty => {
                    state.waiting += 1;
                    state = self
                        .arrived
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    state.waiting -= 1;
                }
            }
        }
    }
}

/// How long jobs may wait for a deferred wake-up before a new arrival wakes an instance itself.
const MAX_DEFERRAL: Duration = Duration::from_micros(200);

/// How `push` wakes an idle instance for the job it queued.
enum Wake {
    None,
    Now,
    Deferred(tokio::runtime::Handle),
}

/// The runtime to defer a wake-up onto: tokio's single-threaded one, when the push runs in one
/// of its tasks. It runs woken tasks in order, so the wake-up runs after the tasks already queued
/// there. (The multi-threaded scheduler may run the spawned task on another worker at once, which
/// would defer nothing.)
fn deferrable_runtime() -> Option<tokio::runtime::Handle> {
    tokio::task::try_id()?;
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    (runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread).then_some(runtime)
}

/// Wakes an idle instance for jobs pushed from a single-threaded runtime, from a task of that
/// runtime: the tasks queued before it are often more requests read in the same burst from the
/// network, so the instance wakes once and takes them together rather than waking for the first
/// and leaving the rest to the next batch. The first job waits for what the runtime was already
/// doing, at most until a full batch is queued or `MAX_DEFERRAL` has passed at the next arrival.
/// Dropping it wakes, so a runtime that shuts down before running the task leaves no instance
/// asleep.
struct DeferredWake<X: Executor>(Arc<Shared<X>>);

impl<X: Executor> Drop for DeferredWake<X> {
    fn drop(&mut self) {
        self.0.lock().deferred = None;
        self.0.arrived.notify_one();
    }
}

/// A job that must not run: its caller left or its deadline passed.
fn gone<X: Executor>(pending: &Pending<X>, now: Instant) -> bool {
    pending.departed() || pending.expired(now)
}

/// Removes a dead job from the queue for good, telling a caller still waiting that it timed out;
/// timed-out jobs are counted in `timed_out`.
fn dismiss<X: Executor>(pending: Pending<X>, timed_out: &mut usize, now: Instant) {
    if pending.timed_out(now) {
        *timed_out += 1;
    }
    if pending.expired(now) {
        let waited = now - pending.enqueued;
        pending.fail(BatchError::TimedOut { waited });
    }
}

/// How long a batch that can grow may wait: the queue delay in force, and the estimate that says
/// whether it is worth waiting at all.
struct Waits<'a> {
    delay: Duration,
    company: Option<&'a CompanyEstimate>,
}

/// Looks at the queue heads and decides whether a batch is ready, recording the live jobs it
/// judged in `judged`.
fn decide<X: Executor>(
    policy: &BatchPolicy,
    waits: Waits<'_>,
    queues: &mut [VecDeque<Pending<X>>],
    judged: &mut Vec<(usize, usize)>,
    timed_out: &mut usize,
    now: Instant,
) -> Decision {
    for queue in queues.iter_mut() {
        while queue.front().is_some_and(|p| gone(p, now)) {
            dismiss(queue.pop_front().expect("front exists"), timed_out, now);
        }
    }
    judged.clear();
    let mut candidates = queues.iter().enumerate().flat_map(|(level, queue)| {
        queue
            .iter()
            .enumerate()
            .filter(move |(_, p)| !gone(p, now))
            .map(move |(position, p)| ((level, position), p))
    });
    let Some((place, first)) = candidates.next() else {
        return Decision::Empty;
    };
    judged.push(place);
    if policy.max_batch_size == 0 || !policy.dynamic_batching {
        return Decision::Take(1);
    }
    let mut rows = first.rows;
    let mut oldest = first.enqueued;
    let mut preferred_prefix = policy.preferred_batch_sizes.contains(&rows).then_some(1);
    let mut cannot_grow = rows >= policy.max_batch_size;
    for (place, pending) in candidates {
        if cannot_grow {
            break;
        }
        if rows + pending.rows > policy.max_batch_size || !pending.job.can_batch_with(&first.job) {
            cannot_grow = true;
            break;
        }
        judged.push(place);
        rows += pending.rows;
        oldest = oldest.min(pending.enqueued);
        if policy.preferred_batch_sizes.contains(&rows) {
            preferred_prefix = Some(judged.len());
        }
        cannot_grow = rows >= policy.max_batch_size;
    }
    let deadline = oldest + waits.delay;
    let delay_over = now >= deadline;
    let alone = || {
        waits
            .company
            .is_some_and(|company| !company.worth_waiting(deadline - now, now))
    };
    if cannot_grow || waits.delay.is_zero() || delay_over || alone() {
        Decision::Take(judged.len())
    } else if let Some(prefix) = preferred_prefix {
        Decision::Take(prefix)
    } else {
        Decision::WaitUntil(deadline)
    }
}

/// Removes exactly the `judged` jobs from the queues and claims them for a batch, with the dead
/// jobs queued before them (each level's judged jobs form a prefix of its live jobs). A judged job
/// whose caller timed out since is dropped: that only shrinks the batch.
fn take<X: Executor>(
    queues: &mut [VecDeque<Pending<X>>],
    judged: &[(usize, usize)],
    timed_out: &mut usize,
    now: Instant,
) -> Vec<Pending<X>> {
    let mut batch = Vec::with_capacity(judged.len());
    for (level, queue) in queues.iter_mut().enumerate() {
        let Some(&(_, last)) = judged.iter().rev().find(|(l, _)| *l == level) else {
            continue;
        };
        let mut places = judged.iter().filter(|(l, _)| *l == level).peekable();
        for (position, pending) in queue.drain(..=last).enumerate() {
            if places.next_if(|(_, p)| *p == position).is_some() {
                if pending.start() {
                    batch.push(pending);
                } else {
                    // Its caller's timeout fired between the decision and now.
                    *timed_out += 1;
                }
            } else {
                dismiss(pending, timed_out, now);
            }
        }
    }
    batch
}
