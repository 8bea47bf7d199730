//! The thread a sink does its heavy work on: turning a batch of records into Parquet pages or
//! Kafka messages takes milliseconds of CPU, and done on the runtime (or on a blocking thread
//! of equal priority) it lands on the prediction path as a latency spike for whichever requests
//! wait behind it. One OS thread per sink, at a lower scheduling priority ([`NICE`] steps
//! nicer than the process, on Linux), takes the jobs in order: the scheduler lets waiting
//! requests in first and spreads the encoding over the time in between, and a saturated machine
//! still gives it a share (a nice-5 thread weighs a third of a normal one), so the buffer does
//! not fill behind it. Records a job owns are also freed there.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use crate::EventError;

/// How much nicer than the process a sink's thread is: low enough that requests go first, high
/// enough that a machine busy with requests still drains the log.
const NICE: i32 = 5;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Background {
    /// `None` once dropped: the thread then runs out its queue and ends.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the thread, named `name`; dropping the handle waits for the jobs queued so far
    /// (a flush the log's shutdown stopped waiting for still closes its files).
    pub fn spawn(name: &str) -> Result<Self, EventError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                lower_priority();
                for job in queue {
                    job();
                }
            })
            .map_err(|e| EventError::Config(format!("starting the {name} thread: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) -> Result<(), String> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| "the sink's thread has stopped".to_string())
    }

    /// Runs `job` on the thread after the jobs before it; a panic comes back as its message.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into())
            });
            let _ = answer.send(result);
        });
        self.send(job)?;
        answered
            .await
            .map_err(|_| "the sink's thread dropped the job".to_string())?
    }

    /// Frees `value` on the thread (a batch of records takes a while to free).
    pub fn discard<T: Send + 'static>(&self, value: T) {
        // Were the thread gone, the value comes back in the error and is freed here.
        let _ = self.send(Box::new(move || drop(value)));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("an event sink's thread panicked");
        }
    }
}

/// Linux gives every thread its own nice value (`setpriority` on the thread id); elsewhere the
/// thread keeps the process's priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: these calls only read their integer arguments; a failure leaves the thread at
        // its priority, which is correct, only less polite.
        let thread = unsafe { libc::gettid() } as libc::id_t;
        let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, thread) };
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, thread, (now + NICE).min(19)) } != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "the event sink's thread keeps its priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_and_a_panic_comes_back_as_its_message() {
        let background = Background::spawn("test-sink").unwrap();
        let first = background.run(|| 1);
        let second = background.run(|| -> u32 { panic!("broken batch") });
        assert_eq!(first.await, Ok(1));
        assert_eq!(second.await, Err("broken batch".to_string()));
        assert_eq!(background.run(|| 3).await, Ok(3), "the thread survives");
        #[cfg(target_os = "linux")]
        {
            let nice = background
                .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as _) })
                .await
                .unwrap();
            let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as _) };
            assert!(
                nice > ours || ours == 19,
                "the sink's thread runs at a lower priority"
            );
        }
    }
}
