//! The scheduler thread: owns the priority queues and decides when a batch is ready.
//!
//! A dedicated OS thread rather than an async task because the queue delay is measured in
//! microseconds and the async runtime's timers tick in milliseconds.
//!
//! Batch formation follows Triton's dynamic batcher. When an instance is idle, the scheduler takes
//! queued jobs in priority order (FIFO within a level) while they fit in `max_batch_size` rows and
//! can share a batch with the first one. The batch goes at once if it cannot grow (it is full, or
//! the next job does not fit), if a prefix of it has a preferred size (the largest such prefix
//! goes), if there is no queue delay, or once its oldest job has waited `max_queue_delay`.
//! Otherwise the scheduler waits for more jobs or for the delay to run out. Jobs whose callers left
//! are dropped unexecuted; jobs past their deadline are rejected unexecuted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::instance::InstanceHandle;
use crate::{BatchError, BatchObserver, BatchPolicy, Executor, Job, Message, Pending, Shared};

pub(crate) fn spawn<X: Executor>(
    name: &str,
    policy: Arc<BatchPolicy>,
    shared: Arc<Shared>,
    inbox: Receiver<Message<X>>,
    instances: Vec<InstanceHandle<X>>,
    observer: Arc<dyn BatchObserver>,
) -> std::io::Result<()> {
    let idle = (0..instances.len()).collect();
    let scheduler = Scheduler {
        queues: (0..policy.priority_levels)
            .map(|_| VecDeque::new())
            .collect(),
        policy,
        shared,
        instances,
        idle,
        next_deadline: None,
        observer,
    };
    std::thread::Builder::new()
        .name(format!("{name}-sched"))
        .spawn(move || scheduler.run(inbox))?;
    Ok(())
}

struct Scheduler<X: Executor> {
    policy: Arc<BatchPolicy>,
    shared: Arc<Shared>,
    /// One FIFO per priority level, index 0 = level 1.
    queues: Vec<VecDeque<Pending<X>>>,
    instances: Vec<InstanceHandle<X>>,
    idle: Vec<usize>,
    /// Earliest job deadline in the queues, if any job has one (may be stale-early, never late).
    next_deadline: Option<Instant>,
    observer: Arc<dyn BatchObserver>,
}

/// What batch formation decided.
enum Decision {
    /// Dispatch the first `n` queued jobs (in priority order) now.
    Dispatch(usize),
    /// Nothing is ready; look again at this instant (or when something arrives).
    WaitUntil(Instant),
    /// The queues are empty.
    Empty,
}

impl<X: Executor> Scheduler<X> {
    fn run(mut self, inbox: Receiver<Message<X>>) {
        let mut wake_at: Option<Instant> = None;
        loop {
            let message = match wake_at {
                Some(at) => match inbox.recv_deadline(at) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match inbox.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
            };
            if let Some(message) = message {
                if !self.accept(message) {
                    break;
                }
                // Take everything already waiting before deciding, so a burst forms one batch.
                let mut stop = false;
                while let Ok(message) = inbox.try_recv() {
                    if !self.accept(message) {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
            wake_at = self.schedule(Instant::now());
        }
        self.shutdown();
    }

    /// Takes one message in; false means shut down.
    fn accept(&mut self, message: Message<X>) -> bool {
        match message {
            Message::Enqueue(pending) => {
                if let Some(deadline) = pending.deadline {
                    self.next_deadline =
                        Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
                }
                self.queues[pending.level as usize - 1].push_back(pending);
                true
            }
            Message::InstanceIdle(index) => {
                self.idle.push(index);
                true
            }
            Message::Shutdown => false,
        }
    }

    /// Expires overdue jobs and dispatches every ready batch; returns when to look again.
    fn schedule(&mut self, now: Instant) -> Option<Instant> {
        if self.next_deadline.is_some_and(|d| d <= now) {
            self.expire(now);
        }
        let mut wake_at = None;
        while !self.idle.is_empty() {
            match self.decide(now) {
                Decision::Dispatch(n) => self.dispatch(n),
                Decision::WaitUntil(at) => {
                    wake_at = Some(at);
                    break;
                }
                Decision::Empty => break,
            }
        }
        self.observer.queue_depth(self.depth());
        match (wake_at, self.next_deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        }
    }

    fn depth(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Rejects every job whose deadline has passed, and recomputes the next deadline.
    fn expire(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let before = queue.len();
            let mut kept = VecDeque::with_capacity(before);
            for pending in queue.drain(..) {
                match pending.deadline {
                    Some(d) if d <= now => {
                        let waited = now - pending.enqueued;
                        pending.fail(BatchError::TimedOut { waited });
                    }
                    deadline => {
                        if let Some(d) = deadline {
                            next = Some(next.map_or(d, |n| n.min(d)));
                        }
                        kept.push_back(pending);
                    }
                }
            }
            let removed = before - kept.len();
            *queue = kept;
            if removed > 0 {
                self.shared.queued[index].fetch_sub(removed, Ordering::AcqRel);
            }
        }
        self.next_deadline = next;
    }

    /// Looks at the queue heads and decides whether a batch is ready.
    fn decide(&mut self, now: Instant) -> Decision {
        self.drop_departed_heads();
        let policy = &*self.policy;
        let mut candidates = self.queues.iter().flatten();
        let Some(first) = candidates.next() else {
            return Decision::Empty;
        };
        if policy.max_batch_size == 0 || !policy.dynamic_batching {
            return Decision::Dispatch(1);
        }
        let mut count = 1;
        let mut rows = first.rows;
        let mut oldest = first.enqueued;
        let mut preferred_prefix = policy
            .preferred_batch_sizes
            .contains(&rows)
            .then_some(count);
        let mut cannot_grow = rows >= policy.max_batch_size;
        for pending in candidates {
            if cannot_grow {
                break;
            }
            if pending.departed() {
                // Dropped when it reaches the head; it does not hold up the others.
                continue;
            }
            if rows + pending.rows > policy.max_batch_size
                || !pending.job.can_batch_with(&first.job)
            {
                cannot_grow = true;
                break;
            }
            count += 1;
            rows += pending.rows;
            oldest = oldest.min(pending.enqueued);
            if policy.preferred_batch_sizes.contains(&rows) {
                preferred_prefix = Some(count);
            }
            cannot_grow = rows >= policy.max_batch_size;
        }
        let delay_over = now >= oldest + policy.max_queue_delay;
        if cannot_grow || policy.max_queue_delay.is_zero() || delay_over {
            Decision::Dispatch(count)
        } else if let Some(prefix) = preferred_prefix {
            Decision::Dispatch(prefix)
        } else {
            Decision::WaitUntil(oldest + policy.max_queue_delay)
        }
    }

    /// Removes departed jobs from the queue heads so the first candidate is a live one.
    fn drop_departed_heads(&mut self) {
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let mut removed = 0;
            while queue.front().is_some_and(Pending::departed) {
                queue.pop_front();
                removed += 1;
            }
            if removed > 0 {
                self.shared.queued[index].fetch_sub(removed, Ordering::AcqRel);
            }
        }
    }

    /// Moves the first `n` live queued jobs (priority order) to an idle instance.
    fn dispatch(&mut self, n: usize) {
        let mut batch = Vec::with_capacity(n);
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let mut removed = 0;
            while batch.len() < n {
                let Some(pending) = queue.pop_front() else {
                    break;
                };
                removed += 1;
                if !pending.departed() {
                    batch.push(pending);
                }
            }
            if removed > 0 {
                self.shared.queued[index].fetch_sub(removed, Ordering::AcqRel);
            }
            if batch.len() == n {
                break;
            }
        }
        let instance = self.idle.pop().expect("dispatch needs an idle instance");
        if let Err(crossbeam_channel::SendError(batch)) =
            self.instances[instance].batches.send(batch)
        {
            // The instance thread is gone (it can only end by panicking outside the executor).
            for pending in batch {
                pending.fail(BatchError::Internal("model instance stopped".into()));
            }
        }
    }

    fn shutdown(&mut self) {
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let removed = queue.len();
            for pending in queue.drain(..) {
                pending.fail(BatchError::Shutdown);
            }
            self.shared.queued[index].fetch_sub(removed, Ordering::AcqRel);
        }
    }
}
