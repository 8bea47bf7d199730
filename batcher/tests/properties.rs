//! Property tests: whatever the policy and the mix of jobs, every job gets exactly its own rows
//! back, no batch breaks the policy, and nothing is lost or run twice.

#[allow(dead_code)] // the gate and failure hooks serve semantics.rs
mod fake;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::{FakeExecutor, FakeJob, Gate, Record, row_value};
use marquee_batcher::{BatchPolicy, Batcher, NoObserver, QueuePolicy, SubmitOptions};
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

fn run_case(case: &Case) -> (Vec<Vec<u64>>, Vec<Vec<FakeJob>>) {
    let mut policy = BatchPolicy::new(case.max_batch_size, 1_000);
    policy.preferred_batch_sizes = case.preferred.clone();
    policy.max_queue_delay = Duration::from_micros(case.delay_us);
    policy.priority_levels = case.levels;
    policy.default_queue_policy = QueuePolicy::bounded(1_000);
    policy.validate().unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let gate = Gate::opened();
    let executors = (0..case.instances)
        .map(|_| FakeExecutor::new(&record, &gate))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outputs = runtime.block_on(async {
        let batcher =
            Arc::new(Batcher::start("prop", policy, executors, Arc::new(NoObserver)).unwrap());
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
