//! Instance threads: each owns one executor, takes its next batch from the shared queue when
//! idle, and runs it, so N instances execute concurrently and inference never blocks the async
//! runtime.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::queue::Shared;
use crate::{BatchError, Completed, Executor, Outcome, Pending, Reply};

pub(crate) fn spawn<X: Executor>(
    name: &str,
    index: usize,
    mut executor: X,
    shared: Arc<Shared<X>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("{name}-i{index}"))
        .spawn(move || {
            let mut latencies = Vec::new();
            while let Some(batch) = shared.next_batch(&latencies) {
                latencies.clear();
                execute(&mut executor, batch, &shared, &mut latencies);
            }
        })?;
    Ok(())
}

/// Runs one batch and answers its callers; `latencies` gets each executed job's time from
/// submission to answer.
fn execute<X: Executor>(
    executor: &mut X,
    batch: Vec<Pending<X>>,
    shared: &Shared<X>,
    latencies: &mut Vec<Duration>,
) {
    let started = Instant::now();
    let mut executing = Executing {
        shared,
        told: false,
    };
    let mut jobs = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    for pending in batch {
        // A caller that left since the batch was formed costs no compute.
        if pending.departed() {
            continue;
        }
        jobs.push(pending.job);
        waiting.push((pending.reply, started - pending.enqueued));
    }
    if jobs.is_empty() {
        return;
    }
    let rows: usize = jobs.iter().map(crate::Job::rows).sum();
    let result = catch_unwind(AssertUnwindSafe(|| executor.execute(&jobs)));
    let compute = started.elapsed();
    executing.finish();
    shared.observer().batch_executed(jobs.len(), rows, compute);
    latencies.extend(waiting.iter().map(|(_, queue)| *queue + compute));
    let answers: Vec<(Reply<X>, Outcome<X>)> = match result {
        Ok(Ok(outputs)) if outputs.len() == waiting.len() => waiting
            .into_iter()
            .zip(outputs)
            .map(|((reply, queue), output)| {
                let completed = Completed {
                    output,
                    queue,
                    compute,
                    batch_rows: rows,
                };
                (reply, Ok(completed))
            })
            .collect(),
        Ok(Ok(outputs)) => {
            let message = format!(
                "executor returned {} outputs for {} requests",
                outputs.len(),
                waiting.len()
            );
            fail_all::<X>(waiting, BatchError::Internal(message))
        }
        Ok(Err(error)) => fail_all::<X>(waiting, BatchError::Executor(error)),
        Err(panic) => {
            // The panic's message may hold internals (paths, other requests' values): it goes to
            // the log under an incident id, and the callers get the id.
            let message = panic_message(panic.as_ref());
            let incident = incident_id();
            tracing::error!(%incident, %message, "executor panicked; the batch failed, the instance goes on");
            fail_all::<X>(
                waiting,
                BatchError::Internal(format!(
                    "the model failed on this batch (incident {incident}; its log has the details)"
                )),
            )
        }
    };
    deliver(shared, answers);
}

/// Tells the queue that the batch it handed out is done executing ([`Shared::executed`]): when
/// the batch's compute ends, or, if the batch is dropped without answers (every caller left, or a
/// panic outside the executor unwinds the instance), when this guard goes, so the company
/// estimate never counts a batch as executing forever.
struct Executing<'a, X: Executor> {
    shared: &'a Shared<X>,
    told: bool,
}

impl<X: Executor> Executing<'_, X> {
    fn finish(&mut self) {
        if !self.told {
            self.told = true;
            self.shared.executed();
        }
    }
}

impl<X: Executor> Drop for Executing<'_, X> {
    fn drop(&mut self) {
        self.finish();
    }
}

fn fail_all<X: Executor>(
    waiting: Vec<(Reply<X>, Duration)>,
    error: BatchError<X::Error>,
) -> Vec<(Reply<X>, Outcome<X>)> {
    waiting
        .into_iter()
        .map(|(reply, _)| (reply, Err(error.clone())))
        .collect()
}

/// Hands a batch's answers to their callers. Sent from this thread, each answer would wake its
/// caller's task from outside the async runtime: one cross-thread wake-up (and often a thread
/// unpark) per request. A batch of several goes instead as one task onto the runtime the batcher
/// was started on, which answers them all from inside: one wake-up per batch, and on a runtime
/// that runs woken tasks in order (the single-threaded one, or the multi-threaded one without its
/// LIFO slot) the callers' tasks then run one after another, so answers bound for one connection
/// leave together.
fn deliver<X: Executor>(shared: &Shared<X>, answers: Vec<(Reply<X>, Outcome<X>)>) {
    let delivery = Delivery::<X>(answers);
    match shared.runtime() {
        Some(runtime) if delivery.0.len() > 1 => {
            runtime.spawn(async move { drop(delivery) });
        }
        _ => drop(delivery),
    }
}

/// A batch's answers on their way: dropping it sends them, so a runtime that has shut down (and
/// drops the task unrun) still answers every caller.
struct Delivery<X: Executor>(Vec<(Reply<X>, Outcome<X>)>);

impl<X: Executor> Drop for Delivery<X> {
    fn drop(&mut self) {
        for (reply, answer) in self.0.drain(..) {
            let _ = reply.send(answer);
        }
    }
}

/// An id that finds one incident in the log: the time in milliseconds and a process-wide count.
fn incident_id() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("batch-{millis:x}-{n}")
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
