//! Property tests: whatever the policy and the mix of jobs, every job gets exactly its own rows
//! back, no batch breaks the policy, and nothing is lost or run twice; and under hostile timing
//! (timeouts, priorities, callers leaving at random points, concurrent submitters) no batch breaks
//! the policy, no timed-out job runs, and every job that stays gets exactly one answer.

#[allow(dead_code)] // the gate and failure hooks serve semantics.rs
mod fake;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::{FakeExecutor, FakeJob, Gate, Record, row_value};
use marquee_batcher::{BatchError, BatchPolicy, Batcher, NoObserver, QueuePolicy, SubmitOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    max_batch_size: usize,
    preferred: Vec<usize>,
    delay_us: u64,
    instances: usize,
    levels: u32,
    jobs: Vec<(usize, u32, u32)>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=8, 0u64..=2_000, 1usize..=3, 1u32..=3).prop_flat_map(
        |(max_batch_size, delay_us, instances, levels)| {
            (
                proptest::collection::vec(1..=max_batch_size, 0..=2),
                proptest::collection::vec((1..=max_batch_size, 0u32..=1, 0..=levels), 1..60),
            )
                .prop_map(move |(preferred, jobs)| Case {
                    max_batch_size,
                    preferred,
                    delay_us,
                    instances,
                    levels,
                    jobs,
                })
        },
    )
}

/// A batcher over `instances` fake executors that each spend `work` per batch, the record of
/// what they ran, and a two-thread runtime to submit from.
fn start(
    name: &str,
    policy: BatchPolicy,
    instances: usize,
    work: Duration,
) -> (
    tokio::runtime::Runtime,
    Arc<Batcher<FakeExecutor>>,
    Arc<Mutex<Record>>,
) {
    let record = Arc::new(Mutex::new(Record::default()));
    let gate = Gate::opened();
    let executors = (0..instances)
        .map(|_| {
            let mut executor = FakeExecutor::new(&record, &gate);
            executor.work = work;
            executor
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Started inside the runtime, as the server starts it: instances answer batches through it.
    let batcher = {
        let _inside = runtime.enter();
        Arc::new(Batcher::start(name, policy, executors, Arc::new(NoObserver)).unwrap())
    };
    (runtime, batcher, record)
}

fn run_case(case: &Case) -> (Vec<Vec<u64>>, Vec<Vec<FakeJob>>) {
    let mut policy = BatchPolicy::new(case.max_batch_size, 1_000);
    policy.preferred_batch_sizes = case.preferred.clone();
    policy.max_queue_delay = Duration::from_micros(case.delay_us);
    policy.priority_levels = case.levels;
    policy.default_queue_policy = QueuePolicy::bounded(1_000);
    policy.validate().unwrap();
    let (runtime, batcher, record) = start("prop", policy, case.instances, Duration::ZERO);
    let outputs = runtime.block_on(async {
        let handles: Vec<_> = case
            .jobs
            .iter()
            .enumerate()
            .map(|(id, &(rows, shape, priority))| {
                let batcher = batcher.clone();
                let job = FakeJob {
                    id: id as u64,
                    rows,
                    shape,
                };
                let options = SubmitOptions {
                    priority: Some(priority),
                    timeout: None,
                };
                tokio::spawn(async move { batcher.submit(job, options).await })
            })
            .collect();
        let mut outputs = Vec::new();
        for handle in handles {
            outputs.push(handle.await.unwrap().unwrap().output);
        }
        outputs
    });
    let batches = std::mem::take(&mut record.lock().unwrap().batches);
    (outputs, batches)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_job_gets_its_own_rows_and_batches_respect_the_policy(case in case()) {
        let (outputs, batches) = run_case(&case);
        for (id, output) in outputs.iter().enumerate() {
            let rows = case.jobs[id].0;
            let expected: Vec<u64> = (0..rows).map(|r| row_value(id as u64, r)).collect();
            prop_assert_eq!(output, &expected);
        }
        let mut seen = HashSet::new();
        for batch in &batches {
            prop_assert!(!batch.is_empty());
            let rows: usize = batch.iter().map(|j| j.rows).sum();
            prop_assert!(rows <= case.max_batch_size, "batch of {} rows > max {}", rows, case.max_batch_size);
            prop_assert!(batch.iter().all(|j| j.shape == batch[0].shape));
            for job in batch {
                prop_assert!(seen.insert(job.id), "job {} executed twice", job.id);
            }
        }
        prop_assert_eq!(seen.len(), case.jobs.len());
    }
}

/// One job of a hostile case: rows, shape, priority, a queue timeout, when its caller leaves, and
/// when it is submitted (all in microseconds).
#[derive(Debug, Clone)]
struct HostileJob {
    rows: usize,
    shape: u32,
    priority: u32,
    timeout_us: Option<u64>,
    leave_after_us: Option<u64>,
    submit_after_us: u64,
}

#[derive(Debug, Clone)]
struct HostileCase {
    max_batch_size: usize,
    delay_us: u64,
    budget_ms: Option<u64>,
    wait_only_for_company: bool,
    work_us: u64,
    instances: usize,
    levels: u32,
    jobs: Vec<HostileJob>,
}

fn hostile_case() -> impl Strategy<Value = HostileCase> {
    (
        1usize..=8,
        0u64..=3_000,
        proptest::option::of(1u64..=20),
        0u64..=3_000,
        1usize..=3,
        1u32..=3,
    )
        .prop_flat_map(
            |(max_batch_size, delay_us, budget_ms, work_us, instances, levels)| {
                let job = (
                    1..=max_batch_size,
                    0u32..=1,
                    0..=levels,
                    proptest::option::of(0u64..=6_000),
                    proptest::option::weighted(0.3, 0u64..=6_000),
                    0u64..=4_000,
                )
                    .prop_map(
                        |(rows, shape, priority, timeout_us, leave_after_us, submit_after_us)| {
                            HostileJob {
                                rows,
                                shape,
                                priority,
                                timeout_us,
                                leave_after_us,
                                submit_after_us,
                            }
                        },
                    );
                proptest::collection::vec(job, 1..80).prop_map(move |jobs| HostileCase {
                    max_batch_size,
                    delay_us,
                    budget_ms,
                    // Derived, not drawn, so the recorded regressions replay unchanged.
                    wait_only_for_company: delay_us % 2 == 1,
                    work_us,
                    instances,
                    levels,
                    jobs,
                })
            },
        )
}

/// How a hostile job ended, as its caller saw it.
#[derive(Debug)]
enum Answer {
    Rows(Vec<u64>),
    TimedOut,
    Left,
    Failed(BatchError<String>),
}

fn run_hostile(case: &HostileCase) -> (Vec<Answer>, Vec<Vec<FakeJob>>) {
    let mut policy = BatchPolicy::new(case.max_batch_size, 1_000);
    policy.max_queue_delay = Duration::from_micros(case.delay_us);
    policy.latency_budget = case.budget_ms.map(Duration::from_millis);
    policy.wait_only_for_company = case.wait_only_for_company;
    policy.priority_levels = case.levels;
    policy.default_queue_policy = QueuePolicy::bounded(1_000);
    policy.validate().unwrap();
    let (runtime, batcher, record) = start(
        "hostile",
        policy,
        case.instances,
        Duration::from_micros(case.work_us),
    );
    let answers = runtime.block_on(async {
        let handles: Vec<_> = case
            .jobs
            .iter()
            .enumerate()
            .map(|(id, spec)| {
                let batcher = batcher.clone();
                let spec = spec.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(spec.submit_after_us)).await;
                    let job = FakeJob {
                        id: id as u64,
                        rows: spec.rows,
                        shape: spec.shape,
                    };
                    let options = SubmitOptions {
                        priority: Some(spec.priority),
                        timeout: spec.timeout_us.map(Duration::from_micros),
                    };
                    let submitted = batcher.submit(job, options);
                    let outcome = match spec.leave_after_us {
                        Some(us) => {
                            match tokio::time::timeout(Duration::from_micros(us), submitted).await {
                                Ok(outcome) => outcome,
                                Err(_) => return Answer::Left,
                            }
                        }
                        None => submitted.await,
                    };
                    match outcome {
                        Ok(done) => Answer::Rows(done.output),
                        Err(BatchError::TimedOut { .. }) => Answer::TimedOut,
                        Err(other) => Answer::Failed(other),
                    }
                })
            })
            .collect();
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    });
    let batches = std::mem::take(&mut record.lock().unwrap().batches);
    (answers, batches)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn hostile_timing_never_breaks_a_batch_or_runs_a_timed_out_job(case in hostile_case()) {
        let (answers, batches) = run_hostile(&case);
        let mut executions: HashMap<u64, usize> = HashMap::new();
        for batch in &batches {
            prop_assert!(!batch.is_empty());
            let rows: usize = batch.iter().map(|j| j.rows).sum();
            prop_assert!(rows <= case.max_batch_size, "batch of {} rows > max {}", rows, case.max_batch_size);
            prop_assert!(batch.iter().all(|j| j.shape == batch[0].shape), "mixed shapes in {:?}", batch);
            for job in batch {
                *executions.entry(job.id).or_default() += 1;
            }
        }
        prop_assert!(executions.values().all(|&n| n == 1), "a job ran twice: {:?}", executions);
        for (id, answer) in answers.iter().enumerate() {
            let spec = &case.jobs[id];
            let ran = executions.contains_key(&(id as u64));
            match answer {
                Answer::Rows(rows) => {
                    let expected: Vec<u64> = (0..spec.rows).map(|r| row_value(id as u64, r)).collect();
                    prop_assert_eq!(rows, &expected);
                    prop_assert!(ran, "job {} answered without running", id);
                }
                Answer::TimedOut => {
                    prop_assert!(spec.timeout_us.is_some(), "job {} without a timeout timed out", id);
                    prop_assert!(!ran, "job {} timed out but ran", id);
                }
                Answer::Left => prop_assert!(spec.leave_after_us.is_some()),
                Answer::Failed(error) => prop_assert!(false, "job {} failed: {}", id, error),
            }
        }
    }
}
