//! Dynamic batching for one model version, with Triton's semantics.
//!
//! Why a crate of its own: batching decides a model server's throughput, and its rules (batch size,
//! preferred sizes, queue delay, bounded queues, timeouts, priorities, concurrent instances) are
//! subtle enough to deserve tests that need no model and no network. The crate knows nothing of HTTP,
//! gRPC or ONNX: a [`Job`] is anything with a row count, an [`Executor`] anything that turns a slice
//! of jobs into one output per job.
//!
//! Shape: [`Batcher::submit`] puts a job on a bounded queue and awaits its result. Each instance
//! is an OS thread that owns one executor (for ONNX Runtime, one session); when idle it takes the
//! next batch from the shared queue itself, by Triton's formation rules (see `queue.rs`), so a job
//! queued while every instance is busy costs no thread wake-up at all, and inference never runs on
//! the async runtime. A batch of several jobs is answered from one task on the runtime the
//! batcher was started on (one cross-thread wake-up per batch, not per job).

mod adaptive;
mod company;
mod instance;
mod policy;
mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::queue::Shared;

pub use policy::{BatchPolicy, PolicyError, QueuePolicy};

/// A unit of work submitted by one caller: it contributes `rows()` rows to a batch.
pub trait Job: Send + 'static {
    /// Rows this job adds to a batch (its batch dimension).
    fn rows(&self) -> usize;

    /// Whether this job may share a batch with `first`, the batch's first job. Models batch only
    /// requests whose non-batch dimensions agree, as Triton does.
    fn can_batch_with(&self, first: &Self) -> bool {
        let _ = first;
        true
    }
}

/// Runs batches. One value per instance; it lives on that instance's thread for its whole life.
pub trait Executor: Send + 'static {
    type Job: Job;
    type Output: Send + 'static;
    type Error: Clone + Send + std::fmt::Display + 'static;

    /// Runs `jobs` as one batch and returns exactly one output per job, in the same order.
    fn execute(&mut self, jobs: &[Self::Job]) -> Result<Vec<Self::Output>, Self::Error>;
}

/// Receives what happens inside the batcher, for metrics. Methods are called on instance threads
/// and by submitters, `queue_depth` while the queue is locked, so they must be cheap.
pub trait BatchObserver: Send + Sync + 'static {
    /// A batch finished executing (successfully or not).
    fn batch_executed(&self, jobs: usize, rows: usize, compute: Duration) {
        let _ = (jobs, rows, compute);
    }
    /// Queue depth (jobs waiting) changed.
    fn queue_depth(&self, depth: usize) {
        let _ = depth;
    }
}

/// An observer that records nothing.
pub struct NoObserver;
impl BatchObserver for NoObserver {}

/// Per-submission scheduling options: Triton's `priority` and `timeout` request parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitOptions {
    /// Priority level, 1 is highest; `None` or 0 means the model's default level.
    pub priority: Option<u32>,
    /// How long the job may wait in the queue before it is rejected unexecuted.
    pub timeout: Option<Duration>,
}

/// A job's output plus where its time went.
#[derive(Debug)]
pub struct Completed<O> {
    pub output: O,
    /// Time from submission until its batch started executing.
    pub queue: Duration,
    /// Time the batch took to execute.
    pub compute: Duration,
    /// Rows in the batch this job ran in.
    pub batch_rows: usize,
}

/// Why a job produced no output.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError<E> {
    #[error("queue is full ({capacity} requests waiting at priority level {level})")]
    QueueFull { level: u32, capacity: usize },
    #[error("request timed out after waiting {waited:?} in the queue")]
    TimedOut { waited: Duration },
    #[error("priority {priority} is out of range: the model has priority levels 1..={levels}")]
    InvalidPriority { priority: u32, levels: u32 },
    #[error("request has {rows} rows but the model accepts at most {max} per batch")]
    TooManyRows { rows: usize, max: usize },
    #[error("request has no rows")]
    NoRows,
    #[error("the model is shutting down")]
    Shutdown,
    #[error("{0}")]
    Executor(E),
    #[error("the backend failed: {0}")]
    Internal(String),
}

/// What a submission resolves to.
pub type Outcome<X> =
    Result<Completed<<X as Executor>::Output>, BatchError<<X as Executor>::Error>>;

/// Who decides a job with a deadline: the instance that starts it, or its caller whose timeout
/// fired first. Exactly one of them wins, so a job never both runs and times out: a timeout bounds
/// the wait in the queue, and a job whose batch started gets its answer (as in Triton).
struct Ticket(AtomicU8);

impl Ticket {
    const QUEUED: u8 = 0;
    const STARTED: u8 = 1;
    const ABANDONED: u8 = 2;

    fn new() -> Self {
        Self(AtomicU8::new(Self::QUEUED))
    }

    /// The instance claims the job for a batch; false when its caller gave up first.
    fn start(&self) -> bool {
        self.swap_from_queued(Self::STARTED)
    }

    /// The caller's timeout fired; false when the job already started and its answer will come.
    fn abandon(&self) -> bool {
        self.swap_from_queued(Self::ABANDONED)
    }

    /// Whether the caller's timeout fired before the job started.
    fn abandoned(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::ABANDONED
    }

    fn swap_from_queued(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Self::QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A job waiting in the queue, with the channel its result goes back on.
struct Pending<X: Executor> {
    job: X::Job,
    rows: usize,
    level: u32,
    enqueued: Instant,
    deadline: Option<Instant>,
    /// Present exactly when `deadline` is.
    ticket: Option<Arc<Ticket>>,
    reply: Reply<X>,
}

/// Where a job's outcome goes back to its caller.
type Reply<X> = oneshot::Sender<Outcome<X>>;

impl<X: Executor> Pending<X> {
    /// The caller stopped waiting (client went away): the job need not run.
    fn departed(&self) -> bool {
        self.reply.is_closed()
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// Whether the job missed its deadline in the queue: its caller gave up at the deadline, or
    /// is still waiting past it (a caller that left earlier, for its own reasons, did not).
    fn timed_out(&self, now: Instant) -> bool {
        self.ticket.as_ref().is_some_and(|t| t.abandoned())
            || (self.expired(now) && !self.departed())
    }

    /// Claims the job for a batch that starts now; false when its caller already timed out.
    fn start(&self) -> bool {
        self.ticket.as_ref().is_none_or(|t| t.start())
    }

    fn fail(self, error: BatchError<X::Error>) {
        let _ = self.reply.send(Err(error));
    }
}

/// The handle to one model version's batching queue. Dropping it stops the instances once they
/// finish what they are running; jobs still queued are answered with [`BatchError::Shutdown`].
pub struct Batcher<X: Executor> {
    shared: Arc<Shared<X>>,
}

impl<X: Executor> Batcher<X> {
    /// Starts one thread per executor. `name` labels the threads.
    pub fn start(
        name: &str,
        policy: BatchPolicy,
        executors: Vec<X>,
        observer: Arc<dyn BatchObserver>,
    ) -> std::io::Result<Self> {
        assert!(
            !executors.is_empty(),
            "a batcher needs at least one executor"
        );
        let shared = Arc::new(Shared::new(policy, observer));
        for (index, executor) in executors.into_iter().enumerate() {
            instance::spawn(name, index, executor, shared.clone())?;
        }
        Ok(Self { shared })
    }

    /// The policy this batcher runs with.
    pub fn policy(&self) -> &BatchPolicy {
        &self.shared.policy
    }

    /// The queue delay batch formation uses now: the fixed `max_queue_delay`, or under a latency
    /// budget the adaptive one.
    pub fn queue_delay(&self) -> Duration {
        self.shared.queue_delay()
    }

    /// Jobs waiting in the queue now, all priority levels together.
    pub fn queue_depth(&self) -> usize {
        self.shared.depth()
    }

    /// Queues `job` and waits for its output. Rejects at once, without queueing, when the job's
    /// priority level is full. A timeout bounds the wait in the queue only: once the job's batch has
    /// started, its answer is awaited. Dropping the returned future withdraws the job if it has not
    /// started.
    pub async fn submit(&self, job: X::Job, options: SubmitOptions) -> Outcome<X> {
        let Enqueued {
            mut receiver,
            deadline,
            enqueued,
        } = self.enqueue(job, options)?;
        let answer = match deadline {
            // The deadline is kept here, not by the instances, so it fires while they are all busy.
            Some((deadline, ticket)) => {
                match tokio::time::timeout_at(deadline.into(), &mut receiver).await {
                    Ok(answer) => answer,
                    Err(_) if ticket.abandon() => {
                        return Err(BatchError::TimedOut {
                            waited: enqueued.elapsed(),
                        });
                    }
                    Err(_) => receiver.await,
                }
            }
            None => receiver.await,
        };
        answer.unwrap_or(Err(BatchError::Shutdown))
    }

    fn enqueue(
        &self,
        job: X::Job,
        options: SubmitOptions,
    ) -> Result<Enqueued<X>, BatchError<X::Error>> {
        let policy = &self.shared.policy;
        let rows = job.rows();
        if rows == 0 {
            return Err(BatchError::NoRows);
        }
        if policy.max_batch_size > 0 && rows > policy.max_batch_size {
            return Err(BatchError::TooManyRows {
                rows,
                max: policy.max_batch_size,
            });
        }
        let level =
            policy
                .level_for(options.priority)
                .map_err(|levels| BatchError::InvalidPriority {
                    priority: options.priority.unwrap_or(0),
                    levels,
                })?;
        let enqueued = Instant::now();
        let deadline = policy
            .queue_policy(level)
            .effective_timeout(options.timeout)
            .map(|t| enqueued + t);
        let ticket = deadline.map(|_| Arc::new(Ticket::new()));
        let (reply, receiver) = oneshot::channel();
        self.shared.push(Pending {
            job,
            rows,
            level,
            enqueued,
            deadline,
            ticket: ticket.clone(),
            reply,
        })?;
        Ok(Enqueued {
            receiver,
            deadline: deadline.zip(ticket),
            enqueued,
        })
    }
}

/// A queued job as its caller sees it.
struct Enqueued<X: Executor> {
    receiver: oneshot::Receiver<Outcome<X>>,
    deadline: Option<(Instant, Arc<Ticket>)>,
    enqueued: Instant,
}

impl<X: Executor> Drop for Batcher<X> {
    fn drop(&mut self) {
        self.shared.shut_down();
    }
}
