//! Per-model-version statistics in Triton's shape (`/v2/models/{m}/stats`, gRPC
//! `ModelStatistics`), which perf_analyzer reads to split latency into queue and compute, and the
//! matching Prometheus series. One value per loaded version, updated lock-free on the hot path
//! except for the per-batch-size table.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use marquee_proto::inference;

use crate::backend::{ComputeRecorder, ComputeTimes};
use crate::metrics::ModelMetrics;

/// A count and a total duration, as Triton's `StatisticDuration`.
#[derive(Default)]
struct DurationStat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationStat {
    fn add(&self, count: u64, duration: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.ns
            .fetch_add(duration.as_nanos() as u64 * count, Ordering::Relaxed);
    }

    fn snapshot(&self) -> inference::StatisticDuration {
        inference::StatisticDuration {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct BatchSizeStat {
    count: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
}

/// Statistics of one model version.
pub struct ModelStats {
    last_inference_ms: AtomicU64,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    success: DurationStat,
    fail: DurationStat,
    queue: DurationStat,
    compute_input: DurationStat,
    compute_infer: DurationStat,
    compute_output: DurationStat,
    batch_sizes: Mutex<BTreeMap<u64, BatchSizeStat>>,
    metrics: ModelMetrics,
    /// Off while the version warms up: warm-up batches are not traffic and must not show in
    /// the counts clients and perf_analyzer read.
    recording: AtomicBool,
}

/// Keeps a version's statistics from recording executions until dropped.
pub struct Unrecorded<'a>(&'a ModelStats);

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        self.0.recording.store(true, Ordering::Relaxed);
    }
}

impl ModelStats {
    pub fn new(metrics: ModelMetrics) -> Self {
        Self {
            last_inference_ms: AtomicU64::new(0),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            success: DurationStat::default(),
            fail: DurationStat::default(),
            queue: DurationStat::default(),
            compute_input: DurationStat::default(),
            compute_infer: DurationStat::default(),
            compute_output: DurationStat::default(),
            batch_sizes: Mutex::new(BTreeMap::new()),
            metrics,
            recording: AtomicBool::new(true),
        }
    }

    /// Stops recording executions until the returned guard is dropped (used by warm-up).
    pub fn unrecorded(&self) -> Unrecorded<'_> {
        self.recording.store(false, Ordering::Relaxed);
        Unrecorded(self)
    }

    pub fn metrics(&self) -> &ModelMetrics {
        &self.metrics
    }

    /// A request finished successfully after `total`, of which `queue` was spent waiting.
    pub fn request_succeeded(&self, total: Duration, queue: Duration) {
        self.success.add(1, total);
        self.queue.add(1, queue);
        self.last_inference_ms.store(now_ms(), Ordering::Relaxed);
        self.metrics.request_succeeded(total, queue);
    }

    /// A request failed for `reason` after `total`.
    pub fn request_failed(&self, total: Duration, reason: &'static str) {
        self.fail.add(1, total);
        self.metrics.request_failed(reason);
    }

    /// Triton's statistics message for this version.
    pub fn snapshot(&self, name: &str, version: u64) -> inference::ModelStatistics {
        let batch_stats = self
            .batch_sizes
            .lock()
            .expect("statistics lock")
            .iter()
            .map(|(&size, s)| inference::InferBatchStatistics {
                batch_size: size,
                compute_input: Some(duration(s.count, s.input_ns)),
                compute_infer: Some(duration(s.count, s.infer_ns)),
                compute_output: Some(duration(s.count, s.output_ns)),
            })
            .collect();
        inference::ModelStatistics {
            name: name.to_string(),
            version: version.to_string(),
            last_inference: self.last_inference_ms.load(Ordering::Relaxed),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            inference_stats: Some(inference::InferStatistics {
                success: Some(self.success.snapshot()),
                fail: Some(self.fail.snapshot()),
                queue: Some(self.queue.snapshot()),
                compute_input: Some(self.compute_input.snapshot()),
                compute_infer: Some(self.compute_infer.snapshot()),
                compute_output: Some(self.compute_output.snapshot()),
                cache_hit: Some(Default::default()),
                cache_miss: Some(Default::default()),
            }),
            batch_stats,
            memory_usage: Vec::new(),
            response_stats: Default::default(),
        }
    }
}

fn duration(count: u64, ns: u64) -> inference::StatisticDuration {
    inference::StatisticDuration { count, ns }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ComputeRecorder for ModelStats {
    /// Batch-level compute times; per-request compute statistics count each job in the batch, as
    /// Triton does.
    fn record(&self, jobs: usize, rows: usize, times: ComputeTimes) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let jobs = jobs as u64;
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.inference_count
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.compute_input.add(jobs, times.input);
        self.compute_infer.add(jobs, times.infer);
        self.compute_output.add(jobs, times.output);
        {
            let mut sizes = self.batch_sizes.lock().expect("statistics lock");
            let entry = sizes.entry(rows as u64).or_default();
            entry.count += 1;
            entry.input_ns += times.input.as_nanos() as u64;
            entry.infer_ns += times.infer.as_nanos() as u64;
            entry.output_ns += times.output.as_nanos() as u64;
        }
        self.metrics
            .batch_executed(rows, times.input + times.infer + times.output);
    }
}

impl marquee_batcher::BatchObserver for ModelStats {
    fn queue_depth(&self, depth: usize) {
        self.metrics.queue_depth(depth);
    }
}
