//! Per-request overhead of the batcher: the time a job spends in submit → scheduler → instance →
//! reply with an executor that does no work. Sequential (latency) and 64 concurrent callers
//! (throughput, batching at work).

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use marquee_batcher::{BatchPolicy, Batcher, Executor, Job, NoObserver};

struct Row;
impl Job for Row {
    fn rows(&self) -> usize {
        1
    }
}

struct Echo;
impl Executor for Echo {
    type Job = Row;
    type Output = ();
    type Error = String;
    fn execute(&mut self, jobs: &[Row]) -> Result<Vec<()>, String> {
        Ok(vec![(); jobs.len()])
    }
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Started inside the runtime, as the server starts it: instances answer batches through it.
    let batcher = {
        let _inside = runtime.enter();
        Arc::new(
            Batcher::start(
                "bench",
                BatchPolicy::new(64, 10_000),
                vec![Echo],
                Arc::new(NoObserver),
            )
            .unwrap(),
        )
    };
    let mut group = c.benchmark_group("batcher");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sequential_submit", |b| {
        b.to_async(&runtime)
            .iter(|| async { batcher.submit(Row, Default::default()).await.unwrap() })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("concurrent_64_submits", |b| {
        b.to_async(&runtime).iter(|| async {
            let jobs = (0..64).map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(Row, Default::default()).await })
            });
            for job in futures::future::join_all(jobs).await {
                job.unwrap().unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
