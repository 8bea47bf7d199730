//! Each of Triton's dynamic-batching rules, checked one at a time against a fake executor.

mod fake;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake::{FakeExecutor, FakeJob, Gate, Record, row_value};
use futures::FutureExt;
use marquee_batcher::{
    BatchError, BatchObserver, BatchPolicy, Batcher, NoObserver, QueuePolicy, SubmitOptions,
};

type Fixture = (Arc<Batcher<FakeExecutor>>, Arc<Mutex<Record>>, Arc<Gate>);

fn start_with(policy: BatchPolicy, instances: usize, gate: Arc<Gate>, work: Duration) -> Fixture {
    policy.validate().expect("test policy is valid");
    let record = Arc::new(Mutex::new(Record::default()));
    let executors = (0..instances)
        .map(|_| {
            let mut e = FakeExecutor::new(&record, &gate);
            e.work = work;
            e
        })
        .collect();
    let batcher = Batcher::start("test", policy, executors, Arc::new(NoObserver)).unwrap();
    (Arc::new(batcher), record, gate)
}

fn start(policy: BatchPolicy, instances: usize, gate: Arc<Gate>) -> Fixture {
    start_with(policy, instances, gate, Duration::ZERO)
}

fn job(id: u64, rows: usize) -> FakeJob {
    FakeJob { id, rows, shape: 0 }
}

fn spawn_submit(
    batcher: &Arc<Batcher<FakeExecutor>>,
    job: FakeJob,
    options: SubmitOptions,
) -> tokio::task::JoinHandle<Result<marquee_batcher::Completed<Vec<u64>>, BatchError<String>>> {
    let batcher = batcher.clone();
    tokio::spawn(async move { batcher.submit(job, options).await })
}

/// Submits and waits until the job is queued, so jobs enter the queue in call order.
async fn submit_queued(
    batcher: &Arc<Batcher<FakeExecutor>>,
    job: FakeJob,
    options: SubmitOptions,
) -> tokio::task::JoinHandle<Result<marquee_batcher::Completed<Vec<u64>>, BatchError<String>>> {
    let before = batcher.queue_depth();
    let handle = spawn_submit(batcher, job, options);
    let start = Instant::now();
    while batcher.queue_depth() == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "job never queued"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    handle
}

/// Waits (bounded) until `f` holds for the record.
async fn until(record: &Arc<Mutex<Record>>, f: impl Fn(&Record) -> bool) {
    let start = Instant::now();
    while !f(&record.lock().unwrap()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn executed_ids(record: &Arc<Mutex<Record>>) -> Vec<u64> {
    let record = record.lock().unwrap();
    record.batches.iter().flatten().map(|j| j.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_gets_exactly_its_own_rows() {
    let (batcher, record, _) = start(BatchPolicy::new(8, 1_000), 3, Gate::opened());
    let handles: Vec<_> = (0..300u64)
        .map(|id| spawn_submit(&batcher, job(id, 1 + (id % 4) as usize), Default::default()))
        .collect();
    for (id, handle) in handles.into_iter().enumerate() {
        let done = handle.await.unwrap().unwrap();
        let rows = 1 + id % 4;
        let expected: Vec<u64> = (0..rows).map(|r| row_value(id as u64, r)).collect();
        assert_eq!(done.output, expected, "job {id} got someone else's rows");
        assert!(done.batch_rows <= 8 && done.batch_rows >= rows);
    }
    let record = record.lock().unwrap();
    assert!(
        record
            .batches
            .iter()
            .all(|b| b.iter().map(|j| j.rows).sum::<usize>() <= 8)
    );
    assert_eq!(record.batches.iter().map(Vec::len).sum::<usize>(), 300);
}

/// Many callers, several instances, no delay: every job completes (no lost wake-up leaves one
/// waiting) and is executed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_loses_no_job() {
    for (instances, delay_us) in [(1, 0), (3, 0), (2, 50)] {
        let mut policy = BatchPolicy::new(16, 100_000);
        policy.max_queue_delay = Duration::from_micros(delay_us);
        let (batcher, record, _) = start(policy, instances, Gate::opened());
        let callers = (0..64u64).map(|caller| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                for n in 0..300u64 {
                    let id = caller * 1_000 + n;
                    let done = batcher
                        .submit(job(id, 1), Default::default())
                        .await
                        .unwrap();
                    assert_eq!(done.output, vec![row_value(id, 0)]);
                }
            })
        });
        let all = futures::future::join_all(callers);
        let finished = tokio::time::timeout(Duration::from_secs(60), all).await;
        for caller in finished.expect("every job completes: none is stuck in the queue") {
            caller.unwrap();
        }
        let executed = executed_ids(&record);
        assert_eq!(executed.len(), 64 * 300);
        assert_eq!(
            executed
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            64 * 300
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_at_once_and_loses_nothing_queued() {
    let (batcher, record, gate) = start(BatchPolicy::new(1, 4), 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let mut queued = Vec::new();
    for id in 1..=4 {
        queued.push(submit_queued(&batcher, job(id, 1), Default::default()).await);
    }
    let rejected = batcher
        .submit(job(5, 1), Default::default())
        .now_or_never()
        .expect("a full queue answers without waiting");
    assert_eq!(
        rejected.unwrap_err(),
        BatchError::QueueFull {
            level: 1,
            capacity: 4
        }
    );
    gate.open();
    first.await.unwrap().unwrap();
    for handle in queued {
        handle.await.unwrap().unwrap();
    }
    assert_eq!(executed_ids(&record), vec![0, 1, 2, 3, 4]);
    assert_eq!(batcher.queue_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_are_rejected_on_time_and_never_executed() {
    let (batcher, record, gate) = start(BatchPolicy::new(1, 16), 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let timeout = Duration::from_millis(20);
    let started = Instant::now();
    let expiring = spawn_submit(
        &batcher,
        job(1, 1),
        SubmitOptions {
            timeout: Some(timeout),
            priority: None,
        },
    );
    let patient = spawn_submit(&batcher, job(2, 1), Default::default());
    // Rejected while the instance is still busy: the caller does not wait for a free instance.
    match expiring.await.unwrap() {
        Err(BatchError::TimedOut { waited }) => assert!(waited >= timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= timeout);
    gate.open();
    first.await.unwrap().unwrap();
    patient.await.unwrap().unwrap();
    assert_eq!(executed_ids(&record), vec![0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_batch_started_gets_its_answer_after_its_timeout() {
    // The timeout bounds the queue, not execution (Triton): 60 ms of work, a 10 ms timeout.
    let (batcher, record, _) = start_with(
        BatchPolicy::new(4, 16),
        1,
        Gate::opened(),
        Duration::from_millis(60),
    );
    let options = SubmitOptions {
        timeout: Some(Duration::from_millis(10)),
        priority: None,
    };
    let done = batcher.submit(job(7, 2), options).await.unwrap();
    assert_eq!(done.output, vec![row_value(7, 0), row_value(7, 1)]);
    assert!(done.compute >= Duration::from_millis(60));
    assert_eq!(executed_ids(&record), vec![7]);
}

/// Batches of up to 8 rows under a 20 ms latency budget, the delay capped at 5 ms.
fn budget_policy() -> BatchPolicy {
    let mut policy = BatchPolicy::new(8, 1_024);
    policy.latency_budget = Some(Duration::from_millis(20));
    policy.max_queue_delay = Duration::from_millis(5);
    policy
}

/// 800 single-row jobs, four at a time, on a fast model: latency far under the budget.
async fn steady_fast_load(batcher: &Arc<Batcher<FakeExecutor>>) {
    for round in 0..200u64 {
        let handles: Vec<_> = (0..4)
            .map(|i| spawn_submit(batcher, job(round * 4 + i, 1), Default::default()))
            .collect();
        for h in handles {
            h.await.unwrap().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_budget_grows_the_delay_with_headroom_and_drops_it_without() {
    let policy = budget_policy();
    let (batcher, _, _) = start(policy.clone(), 1, Gate::opened());
    assert_eq!(batcher.queue_delay(), Duration::ZERO);
    // Fast model, steady load: latency sits far under the budget, so the delay climbs (a noisy
    // window may halve it on the way), never past its cap.
    steady_fast_load(&batcher).await;
    let grown = batcher.queue_delay();
    assert!(
        grown > Duration::ZERO && grown <= Duration::from_millis(5),
        "{grown:?}"
    );

    // A model slower than the budget: every window is over it, so the delay stays at zero.
    let (slow, _, _) = start_with(policy, 1, Gate::opened(), Duration::from_millis(25));
    let handles: Vec<_> = (0..160)
        .map(|i| spawn_submit(&slow, job(i, 1), Default::default()))
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(slow.queue_delay(), Duration::ZERO);
}

/// Jobs that time out in the queue count against the budget as executed ones do: a delay that
/// learned only from the jobs fast enough to run would keep growing while requests expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_time_out_count_against_the_latency_budget() {
    let policy = budget_policy();
    let gate = Gate::opened();
    let (batcher, record, _) = start(policy, 1, gate.clone());
    steady_fast_load(&batcher).await;
    let grown = batcher.queue_delay();
    assert!(grown > Duration::ZERO, "{grown:?}");

    // The instance is held on one job while a window's worth of requests with a 30 ms timeout
    // (over the 20 ms budget) expire behind it.
    gate.close();
    let running = record.lock().unwrap().batches.len();
    let blocker = spawn_submit(&batcher, job(10_000, 1), Default::default());
    until(&record, |r| r.running == 1 && r.batches.len() == running).await;
    let timeout = SubmitOptions {
        priority: None,
        timeout: Some(Duration::from_millis(30)),
    };
    let expiring: Vec<_> = (0..130)
        .map(|i| spawn_submit(&batcher, job(20_000 + i, 1), timeout))
        .collect();
    for h in expiring {
        assert!(matches!(h.await.unwrap(), Err(BatchError::TimedOut { .. })));
    }
    gate.open();
    blocker.await.unwrap().unwrap();
    let start = Instant::now();
    while batcher.queue_depth() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "expired jobs never dismissed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        batcher.queue_delay() < grown,
        "the delay {:?} did not come down from {grown:?} after a window of timeouts",
        batcher.queue_delay()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_callers_are_dropped_before_execution() {
    let (batcher, record, gate) = start(BatchPolicy::new(1, 16), 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let departing = submit_queued(&batcher, job(1, 1), Default::default()).await;
    let staying = submit_queued(&batcher, job(2, 1), Default::default()).await;
    departing.abort();
    assert!(departing.await.unwrap_err().is_cancelled());
    gate.open();
    first.await.unwrap().unwrap();
    staying.await.unwrap().unwrap();
    assert_eq!(executed_ids(&record), vec![0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_levels_run_first() {
    let mut policy = BatchPolicy::new(1, 16);
    policy.priority_levels = 3;
    policy.default_priority_level = 2;
    let (batcher, record, gate) = start(policy, 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let at = |p: u32| SubmitOptions {
        priority: Some(p),
        timeout: None,
    };
    let handles = vec![
        submit_queued(&batcher, job(1, 1), at(3)).await,
        submit_queued(&batcher, job(2, 1), Default::default()).await,
        submit_queued(&batcher, job(3, 1), at(3)).await,
        submit_queued(&batcher, job(4, 1), at(1)).await,
    ];
    gate.open();
    first.await.unwrap().unwrap();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(executed_ids(&record), vec![0, 4, 2, 1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delay_gathers_a_batch_and_holds_a_lone_job() {
    let mut policy = BatchPolicy::new(8, 64);
    policy.max_queue_delay = Duration::from_millis(30);
    let (batcher, record, _) = start(policy, 1, Gate::opened());
    let lone = batcher.submit(job(0, 1), Default::default()).await.unwrap();
    assert!(
        lone.queue >= Duration::from_millis(30),
        "a lone job waits the queue delay for company, waited {:?}",
        lone.queue
    );
    let handles: Vec<_> = (1..=3)
        .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap().batch_rows, 3);
    }
    assert_eq!(record.lock().unwrap().batches.len(), 2);
}

/// With `wait_only_for_company`, a caller alone is not held for the delay once the batcher has
/// seen that nobody else sends, while concurrent callers still get batched by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_caller_is_not_held_for_company_that_never_comes() {
    let mut policy = BatchPolicy::new(8, 64);
    policy.max_queue_delay = Duration::from_millis(100);
    policy.wait_only_for_company = true;
    let (batcher, record, _) = start_with(policy, 1, Gate::opened(), Duration::from_millis(2));
    // Nothing is known before the first batch: it waits, as Triton's rule does.
    let first = batcher.submit(job(0, 1), Default::default()).await.unwrap();
    assert!(
        first.queue >= Duration::from_millis(100),
        "{:?}",
        first.queue
    );
    // Nothing arrived while it executed: the next lone jobs go at once.
    let started = Instant::now();
    for id in 1..=10 {
        let lone = batcher
            .submit(job(id, 1), Default::default())
            .await
            .unwrap();
        assert_eq!(lone.batch_rows, 1);
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "ten lone jobs took {:?}; each would wait 100 ms under the fixed delay",
        started.elapsed()
    );

    // Eight callers in closed loops, each thinking 1-3 ms between requests: the ones arriving
    // while a batch executes raise the rate, and the delay gathers them into full batches again
    // (without it, each batch would be whoever came back during the last one).
    let batches_before = record.lock().unwrap().batches.len();
    let callers: Vec<_> = (0..8u64)
        .map(|caller| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                for round in 0..20u64 {
                    let id = 1_000 + caller * 100 + round;
                    batcher
                        .submit(job(id, 1), Default::default())
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(1 + caller % 3)).await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let record = record.lock().unwrap();
    let batches = &record.batches[batches_before..];
    let jobs: usize = batches.iter().map(Vec::len).sum();
    assert_eq!(jobs, 160);
    assert!(
        batches.len() <= 40,
        "160 jobs of 8 concurrent callers ran in {} batches",
        batches.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_size_and_full_batches_go_without_the_delay() {
    let long_delay = |preferred: Vec<usize>| {
        let mut policy = BatchPolicy::new(8, 64);
        policy.max_queue_delay = Duration::from_secs(30);
        policy.preferred_batch_sizes = preferred;
        policy
    };
    let started = Instant::now();
    let (batcher, _, _) = start(long_delay(vec![4]), 1, Gate::opened());
    let preferred: Vec<_> = (0..4)
        .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
        .collect();
    for h in preferred {
        assert_eq!(h.await.unwrap().unwrap().batch_rows, 4);
    }
    let (batcher, _, _) = start(long_delay(vec![]), 1, Gate::opened());
    let full: Vec<_> = (10..12)
        .map(|id| spawn_submit(&batcher, job(id, 4), Default::default()))
        .collect();
    for h in full {
        assert_eq!(h.await.unwrap().unwrap().batch_rows, 8);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_execute_concurrently() {
    let (batcher, record, _) = start_with(
        BatchPolicy::new(1, 64),
        3,
        Gate::opened(),
        Duration::from_millis(40),
    );
    let handles: Vec<_> = (0..6)
        .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(record.lock().unwrap().max_running, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_different_shapes_never_share_a_batch() {
    let (batcher, record, gate) = start(BatchPolicy::new(8, 64), 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let mut handles = Vec::new();
    for id in 1..=6 {
        let j = FakeJob {
            id,
            rows: 1,
            shape: (id % 2) as u32,
        };
        handles.push(submit_queued(&batcher, j, Default::default()).await);
    }
    gate.open();
    first.await.unwrap().unwrap();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let record = record.lock().unwrap();
    for batch in &record.batches {
        assert!(batch.iter().all(|j| j.shape == batch[0].shape));
    }
    // Queued 1..=6 alternate shapes, so FIFO batching cannot merge any two of them.
    assert_eq!(record.batches.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_batching_model_runs_each_job_alone() {
    let (batcher, record, _) = start(BatchPolicy::new(0, 64), 1, Gate::opened());
    let handles: Vec<_> = (0..20)
        .map(|id| spawn_submit(&batcher, job(id, 3), Default::default()))
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap().output.len(), 3);
    }
    assert!(record.lock().unwrap().batches.iter().all(|b| b.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dynamic_batching_jobs_run_alone_up_to_the_row_limit() {
    let mut policy = BatchPolicy::new(4, 64);
    policy.dynamic_batching = false;
    let (batcher, record, gate) = start(policy, 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 4), Default::default());
    until(&record, |r| r.running == 1).await;
    let mut handles = Vec::new();
    for id in 1..=3 {
        handles.push(submit_queued(&batcher, job(id, 1), Default::default()).await);
    }
    gate.open();
    first.await.unwrap().unwrap();
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap().batch_rows, 1);
    }
    assert_eq!(record.lock().unwrap().batches.len(), 4);
    assert_eq!(
        batcher
            .submit(job(9, 5), Default::default())
            .await
            .unwrap_err(),
        BatchError::TooManyRows { rows: 5, max: 4 }
    );
}

#[tokio::test]
async fn bad_submissions_are_rejected_with_reasons() {
    let (batcher, _, _) = start(BatchPolicy::new(4, 8), 1, Gate::opened());
    assert_eq!(
        batcher
            .submit(job(0, 5), Default::default())
            .await
            .unwrap_err(),
        BatchError::TooManyRows { rows: 5, max: 4 }
    );
    assert_eq!(
        batcher
            .submit(job(0, 0), Default::default())
            .await
            .unwrap_err(),
        BatchError::NoRows
    );
    let options = SubmitOptions {
        priority: Some(2),
        timeout: None,
    };
    assert_eq!(
        batcher.submit(job(0, 1), options).await.unwrap_err(),
        BatchError::InvalidPriority {
            priority: 2,
            levels: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_errors_and_panics_fail_the_batch_not_the_instance() {
    let record = Arc::new(Mutex::new(Record::default()));
    let gate = Gate::opened();
    let mut failing = FakeExecutor::new(&record, &gate);
    failing.panic_on = Some(7);
    let batcher = Batcher::start(
        "panics",
        BatchPolicy::new(1, 8),
        vec![failing],
        Arc::new(NoObserver),
    )
    .unwrap();
    match batcher.submit(job(7, 1), Default::default()).await {
        Err(BatchError::Internal(message)) => {
            assert!(message.contains("incident batch-"), "{message}");
            assert!(
                !message.contains("job 7"),
                "the panic's message stays in the log: {message}"
            );
        }
        other => panic!("expected the panic as an error, got {other:?}"),
    }
    let after = batcher.submit(job(8, 1), Default::default()).await.unwrap();
    assert_eq!(after.output, vec![row_value(8, 0)]);

    let mut erroring = FakeExecutor::new(&record, &gate);
    erroring.fail_with = Some("model exploded".into());
    let batcher = Batcher::start(
        "errors",
        BatchPolicy::new(1, 8),
        vec![erroring],
        Arc::new(NoObserver),
    )
    .unwrap();
    assert_eq!(
        batcher
            .submit(job(1, 1), Default::default())
            .await
            .unwrap_err(),
        BatchError::Executor("model exploded".into())
    );
}

#[derive(Default)]
struct CountingObserver {
    batches: Mutex<Vec<(usize, usize)>>,
    max_depth: Mutex<usize>,
}

impl BatchObserver for CountingObserver {
    fn batch_executed(&self, jobs: usize, rows: usize, _compute: Duration) {
        self.batches.lock().unwrap().push((jobs, rows));
    }
    fn queue_depth(&self, depth: usize) {
        let mut max = self.max_depth.lock().unwrap();
        *max = (*max).max(depth);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observer_sees_batches_and_queue_depth() {
    let record = Arc::new(Mutex::new(Record::default()));
    let gate = Gate::closed();
    let observer = Arc::new(CountingObserver::default());
    let batcher = Arc::new(
        Batcher::start(
            "observed",
            BatchPolicy::new(4, 64),
            vec![FakeExecutor::new(&record, &gate)],
            observer.clone(),
        )
        .unwrap(),
    );
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let rest: Vec<_> = (1..=4)
        .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
        .collect();
    while batcher.queue_depth() < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.open();
    first.await.unwrap().unwrap();
    for h in rest {
        h.await.unwrap().unwrap();
    }
    assert_eq!(*observer.batches.lock().unwrap(), vec![(1, 1), (4, 4)]);
    assert!(*observer.max_depth.lock().unwrap() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_priority_level_has_its_own_bound() {
    let mut policy = BatchPolicy::new(1, 8);
    policy.priority_levels = 2;
    policy
        .priority_queue_policy
        .insert(2, QueuePolicy::bounded(1));
    let (batcher, record, gate) = start(policy, 1, Gate::closed());
    let first = spawn_submit(&batcher, job(0, 1), Default::default());
    until(&record, |r| r.running == 1).await;
    let low = SubmitOptions {
        priority: Some(2),
        timeout: None,
    };
    let queued_low = submit_queued(&batcher, job(1, 1), low).await;
    let rejected = batcher.submit(job(2, 1), low).now_or_never().unwrap();
    assert_eq!(
        rejected.unwrap_err(),
        BatchError::QueueFull {
            level: 2,
            capacity: 1
        }
    );
    let high = submit_queued(&batcher, job(3, 1), Default::default()).await;
    gate.open();
    for h in [first, queued_low, high] {
        h.await.unwrap().unwrap();
    }
    assert_eq!(executed_ids(&record), vec![0, 3, 1]);
}

/// Jobs pushed by tasks that run back to back on the runtime (requests read in one burst) wake
/// an idle instance once, after the burst, and form one batch even with no queue delay.
#[test]
fn jobs_submitted_in_one_burst_form_one_batch() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (batcher, record, _) = start(BatchPolicy::new(16, 1_000), 1, Gate::opened());
        // Let the instance find the queue empty and go to sleep.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let handles: Vec<_> = (0..8u64)
            .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
            .collect();
        for handle in handles {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("answered")
                .unwrap()
                .unwrap();
        }
        let record = record.lock().unwrap();
        let sizes: Vec<usize> = record.batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![8], "one batch of the whole burst");
    });
}

/// A deferred wake-up held back by a busy runtime does not hold back later jobs: an arrival
/// after `MAX_DEFERRAL` wakes the instance itself.
#[test]
fn a_late_deferred_wake_up_does_not_hold_back_later_jobs() {
    let (batcher, record, _) = start(BatchPolicy::new(16, 1_000), 1, Gate::opened());
    std::thread::sleep(Duration::from_millis(50));
    let pushing = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first_batcher = batcher.clone();
    pushing.block_on(async move {
        // Queues job 1 and defers the wake-up to a task behind `busy`.
        let first =
            tokio::spawn(async move { first_batcher.submit(job(1, 1), Default::default()).await });
        let busy = tokio::spawn(async move {
            // Blocks the runtime's only thread past the deferral bound, then waits for job 2,
            // submitted from outside any runtime, while the deferred wake-up cannot run.
            std::thread::sleep(Duration::from_millis(5));
            let (sender, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _ =
                    sender.send(runtime.block_on(batcher.submit(job(2, 1), Default::default())));
            });
            receiver
                .recv_timeout(Duration::from_secs(10))
                .expect("job 2 answered while the deferred wake-up was held back")
        });
        let second = busy.await.unwrap().unwrap();
        assert_eq!(second.output, vec![row_value(2, 0)]);
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.output, vec![row_value(1, 0)]);
    });
    let executed: usize = record.lock().unwrap().batches.iter().map(Vec::len).sum();
    assert_eq!(executed, 2);
}

/// A batch answered through the runtime the batcher was started on still reaches its callers
/// when that runtime is gone (the task that would deliver it is dropped unrun).
#[test]
fn answers_reach_callers_after_the_batchers_runtime_is_gone() {
    let setup = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (batcher, record, _) = {
        let _inside = setup.enter();
        start(BatchPolicy::new(16, 1_000), 1, Gate::opened())
    };
    drop(setup);
    std::thread::sleep(Duration::from_millis(50));
    let callers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    callers.block_on(async {
        // Submitted in one burst, so they form one batch of two.
        let handles: Vec<_> = (0..2u64)
            .map(|id| spawn_submit(&batcher, job(id, 1), Default::default()))
            .collect();
        for (id, handle) in handles.into_iter().enumerate() {
            let done = tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("answered")
                .unwrap()
                .unwrap();
            assert_eq!(done.output, vec![row_value(id as u64, 0)]);
        }
    });
    let sizes: Vec<usize> = record
        .lock()
        .unwrap()
        .batches
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![2]);
}
