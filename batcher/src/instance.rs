//! Instance threads: each owns one executor and runs the batches the scheduler hands it, so
//! inference never blocks the async runtime and N instances execute concurrently.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::{BatchError, BatchObserver, Completed, Executor, Message, Pending};

/// The scheduler's end of an instance: where it sends batches.
pub(crate) struct InstanceHandle<X: Executor> {
    pub(crate) batches: Sender<Vec<Pending<X>>>,
}

pub(crate) fn spawn<X: Executor>(
    name: &str,
    index: usize,
    executor: X,
    scheduler: Sender<Message<X>>,
    observer: Arc<dyn BatchObserver>,
) -> std::io::Result<InstanceHandle<X>> {
    let (batches, receiver) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name(format!("{name}-i{index}"))
        .spawn(move || run(index, executor, receiver, scheduler, observer))?;
    Ok(InstanceHandle { batches })
}

fn run<X: Executor>(
    index: usize,
    mut executor: X,
    batches: Receiver<Vec<Pending<X>>>,
    scheduler: Sender<Message<X>>,
    observer: Arc<dyn BatchObserver>,
) {
    while let Ok(batch) = batches.recv() {
        execute(&mut executor, batch, observer.as_ref());
        if scheduler.send(Message::InstanceIdle(index)).is_err() {
            break;
        }
    }
}

fn execute<X: Executor>(executor: &mut X, batch: Vec<Pending<X>>, observer: &dyn BatchObserver) {
    let started = Instant::now();
    let mut jobs = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    for pending in batch {
        // A client that left while the batch was being handed over costs no compute.
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
    observer.batch_executed(jobs.len(), rows, compute);
    match result {
        Ok(Ok(outputs)) if outputs.len() == waiting.len() => {
            for ((reply, queue), output) in waiting.into_iter().zip(outputs) {
                let _ = reply.send(Ok(Completed {
                    output,
                    queue,
                    compute,
                    batch_rows: rows,
                }));
            }
        }
        Ok(Ok(outputs)) => {
            let message = format!(
                "executor returned {} outputs for {} requests",
                outputs.len(),
                waiting.len()
            );
            for (reply, _) in waiting {
                let _ = reply.send(Err(BatchError::Internal(message.clone())));
            }
        }
        Ok(Err(error)) => {
            for (reply, _) in waiting {
                let _ = reply.send(Err(BatchError::Executor(error.clone())));
            }
        }
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            tracing::error!(%message, "executor panicked; the batch failed, the instance goes on");
            for (reply, _) in waiting {
                let _ = reply.send(Err(BatchError::Internal(format!(
                    "executor panicked: {message}"
                ))));
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
