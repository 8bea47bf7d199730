//! The log's buffer and its writer task. [`EventLog::log`] only takes a lock and pushes: it never
//! waits for the sink. The writer hands batches to the sink one at a time; while a write is in
//! flight or the sink is resting after a failure, records that pile up past half the buffer (or
//! all of them, while it rests) go to the spill folder, and the spill is replayed, oldest first,
//! whenever the sink is idle and the buffer empty. A record is lost only when the buffer is full
//! and the spill at its bound, when the sink refuses it for good (e.g. past Kafka's message
//! size), or when a spill file is damaged; each is counted as dropped. Closing stops at its
//! deadline: a write still in flight is called off and its records spilled for the next start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::background::Background;
use crate::spill::{Segment, Spill, Spilled};
use crate::{EventError, Record, Sink, SinkFailure};

/// How often the writer looks at the buffer and the spill without being woken.
const TICK: Duration = Duration::from_millis(50);

/// How long fresh records wait for a batch to fill before they are written anyway. Each sink
/// write has a fixed cost (a task and a job on the sink's thread, a record batch for the Parquet
/// writer, a round of Kafka deliveries), so a busy log writes whole batches; a quiet one is at
/// most this late (plus the write).
const LINGER: Duration = Duration::from_millis(50);

/// After this long without records written, the sink flushes (Parquet files close and become
/// readable).
const IDLE_FLUSH: Duration = Duration::from_secs(1);

/// How the log buffers, batches and spills.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Records that may wait in memory; past it, records are dropped (and counted).
    pub buffer: usize,
    /// Most records per sink write (and per spill segment); a sink's `most_per_write` may
    /// lower it.
    pub batch: usize,
    pub spill_dir: std::path::PathBuf,
    /// Bound of the spill folder, in bytes.
    pub spill_max_bytes: u64,
    /// How long the sink rests after a failed write before it is tried again.
    pub retry: Duration,
    /// A write that takes longer counts as failed (its records are spilled).
    pub write_timeout: Duration,
}

impl LogConfig {
    pub fn new(spill_dir: impl Into<std::path::PathBuf>) -> Self {
        Self {
            buffer: 65_536,
            batch: 2_048,
            spill_dir: spill_dir.into(),
            spill_max_bytes: 1 << 30,
            retry: Duration::from_secs(1),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What the log has done with the records it was given. Once the buffer and the spill are empty,
/// `written + replayed + dropped` is every record logged (a record replayed was spilled first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Taken by the sink on the first try.
    pub written: u64,
    /// Put in the spill folder.
    pub spilled: u64,
    /// Taken by the sink out of the spill folder.
    pub replayed: u64,
    /// Lost: the buffer was full and the spill at its bound, the sink refused them for good, or
    /// a spill file was damaged.
    pub dropped: u64,
    pub buffered: u64,
    pub spill_bytes: u64,
}

struct Counters {
    written: IntCounter,
    spilled: IntCounter,
    replayed: IntCounter,
    dropped: IntCounter,
    buffered: IntGauge,
    spill_bytes: IntGauge,
}

impl Counters {
    fn new(sink: &str, registry: Option<&Registry>) -> Result<Self, EventError> {
        let records = IntCounterVec::new(
            Opts::new(
                "marquee_event_log_records_total",
                "Prediction log and event records by what happened to them: written (first try), spilled (to local disk), replayed (from disk), dropped",
            ),
            &["sink", "outcome"],
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["sink"]).expect("valid metric")
        };
        let buffered = gauge(
            "marquee_event_log_buffered",
            "Records waiting in memory for the event sink",
        );
        let spill_bytes = gauge(
            "marquee_event_log_spill_bytes",
            "Bytes of records in the spill folder, waiting to be replayed",
        );
        if let Some(registry) = registry {
            for collector in [
                Box::new(records.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(buffered.clone()),
                Box::new(spill_bytes.clone()),
            ] {
                registry
                    .register(collector)
                    .map_err(|e| EventError::Config(format!("event log metrics: {e}")))?;
            }
        }
        Ok(Self {
            written: records.with_label_values(&[sink, "written"]),
            spilled: records.with_label_values(&[sink, "spilled"]),
            replayed: records.with_label_values(&[sink, "replayed"]),
            dropped: records.with_label_values(&[sink, "dropped"]),
            buffered: buffered.with_label_values(&[sink]),
            spill_bytes: spill_bytes.with_label_values(&[sink]),
        })
    }
}

struct Shared {
    queue: Mutex<VecDeque<Record>>,
    capacity: usize,
    /// Most records per sink write and per spill segment: the config's, or the sink's
    /// `most_per_write` where that is lower.
    batch: usize,
    wake: Notify,
    closing: AtomicBool,
    /// When closing must be over; set by `close`.
    deadline: Mutex<Option<Instant>>,
    /// Calls off the write in flight when closing reaches its deadline.
    call_off: Notify,
    counters: Counters,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    /// Records that make a batch worth writing at once: a whole batch, or half the buffer when
    /// that is smaller (so a small buffer never fills while its records linger).
    fn full(&self) -> usize {
        self.batch.min(self.capacity / 2).max(1)
    }

    fn take(&self, most: usize) -> Vec<Record> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = queue.len().min(most);
        let records = queue.drain(..n).collect();
        self.counters.buffered.set(queue.len() as i64);
        records
    }

    fn waiting(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The handle every producer of records holds; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl EventLog {
    /// Starts the writer task for `sink` on the current tokio runtime. What an earlier process
    /// left in the spill folder is replayed first.
    pub fn start(
        sink: Arc<dyn Sink>,
        config: LogConfig,
        registry: Option<&Registry>,
    ) -> Result<Self, EventError> {
        let spill = Spill::open(&config.spill_dir, config.spill_max_bytes)?;
        let counters = Counters::new(sink.name(), registry)?;
        counters.spill_bytes.set(spill.bytes() as i64);
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            capacity: config.buffer.max(1),
            batch: sink
                .most_per_write()
                .map_or(config.batch, |most| most.min(config.batch))
                .max(1),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            deadline: Mutex::new(None),
            call_off: Notify::new(),
            counters,
            writer: Mutex::new(None),
        });
        let writer = Writer {
            shared: shared.clone(),
            sink,
            config,
            spill: Some(spill),
            resting_until: None,
            last_write: None,
            last_fresh: None,
            in_flight_records: 0,
            background: Background::spawn("event-log")?,
        };
        let task = tokio::spawn(writer.run());
        *shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(Self { shared })
    }

    /// Hands a record to the log; `false` when the buffer was full and it was dropped.
    pub fn log(&self, record: Record) -> bool {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= self.shared.capacity {
            drop(queue);
            self.shared.counters.dropped.inc();
            return false;
        }
        queue.push_back(record);
        let waiting = queue.len();
        drop(queue);
        self.shared.counters.buffered.set(waiting as i64);
        if waiting == 1 || waiting.is_multiple_of(self.shared.full()) {
            self.shared.wake.notify_one();
        }
        true
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            written: c.written.get(),
            spilled: c.spilled.get(),
            replayed: c.replayed.get(),
            dropped: c.dropped.get(),
            buffered: self.shared.waiting() as u64,
            spill_bytes: c.spill_bytes.get().max(0) as u64,
        }
    }

    /// Writes what is buffered to the sink and flushes it, within `within`; what the sink cannot
    /// take by then stays in the spill folder for the next start. Records logged afterwards
    /// stay in memory.
    pub async fn close(&self, within: Duration) {
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + within);
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let task = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the event log's writer failed");
        }
    }
}

/// A batch on its way to the sink: fresh from the buffer, or out of a spill segment. The sink
/// shares the records (a blocking writer keeps them without a copy); the writer takes back
/// those the sink could not take.
enum Batch {
    Fresh(Arc<Vec<Record>>),
    Replay(Segment, Arc<Vec<Record>>),
}

impl Batch {
    fn records(&self) -> &Arc<Vec<Record>> {
        match self {
            Batch::Fresh(records) | Batch::Replay(_, records) => records,
        }
    }
}

type Attempt = (Batch, Result<(), SinkFailure>);

struct Writer {
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    config: LogConfig,
    /// Taken out while a blocking task works on it.
    spill: Option<Spill>,
    resting_until: Option<Instant>,
    /// When the sink last took records it has not flushed yet.
    last_write: Option<Instant>,
    /// When fresh records last went to the sink (see [`LINGER`]).
    last_fresh: Option<Instant>,
    /// Records of the write in flight (counted as dropped should it panic).
    in_flight_records: usize,
    /// Frees written batches off the runtime's threads.
    background: Background,
}

/// One sink write, failed when it takes longer than `timeout` or is called off.
async fn attempt(
    sink: Arc<dyn Sink>,
    batch: Batch,
    timeout: Duration,
    shared: Arc<Shared>,
) -> Attempt {
    let records = batch.records().clone();
    let failed = |why: String| Err(SinkFailure::all(batch.records().len(), why));
    let called_off = shared.call_off.notified();
    let result = tokio::select! {
        written = tokio::time::timeout(timeout, sink.write(records)) => match written {
            Ok(result) => result,
            Err(_) => failed(format!("no answer within {timeout:?}")),
        },
        _ = called_off => failed("called off: the log is closing".into()),
    };
    (batch, result)
}

impl Writer {
    async fn run(mut self) {
        let mut in_flight: Option<JoinHandle<Attempt>> = None;
        let mut called_off_at: Option<Instant> = None;
        loop {
            let closing = self.shared.closing.load(Ordering::Acquire);
            if closing && in_flight.is_none() {
                self.finish().await;
                return;
            }
            // Past the deadline, the write in flight is called off (again each tick, in case
            // it had not begun to listen).
            let call_off = self
                .deadline()
                .map(|deadline| called_off_at.map_or(deadline, |at| at + TICK));
            let pause = self.pause(in_flight.is_some());
            tokio::select! {
                finished = async { in_flight.as_mut().expect("guarded by the condition").await },
                    if in_flight.is_some() =>
                {
                    in_flight = None;
                    match finished {
                        Ok((batch, result)) => self.settle(batch, result).await,
                        Err(e) => {
                            tracing::error!(error = %e, sink = self.sink.name(), records = self.in_flight_records, "an event sink write panicked; its batch is lost");
                            self.shared.counters.dropped.inc_by(self.in_flight_records as u64);
                            self.rest();
                        }
                    }
                }
                _ = tokio::time::sleep_until(call_off.unwrap_or_else(Instant::now).into()),
                    if closing && call_off.is_some() =>
                {
                    self.shared.call_off.notify_waiters();
                    called_off_at = Some(Instant::now());
                }
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            if closing {
                continue;
            }
            if in_flight.is_none() && !self.resting() {
                match self.next_batch().await {
                    Some(batch) => {
                        self.in_flight_records = batch.records().len();
                        in_flight = Some(tokio::spawn(attempt(
                            self.sink.clone(),
                            batch,
                            self.config.write_timeout,
                            self.shared.clone(),
                        )))
                    }
                    None => self.flush_when_idle().await,
                }
            } else {
                let waiting = self.shared.waiting();
                if (self.resting() && waiting > 0) || waiting >= self.shared.capacity / 2 {
                    let records = self.shared.take(usize::MAX);
                    self.spill(records).await;
                }
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn flush_when_idle(&mut self) {
        if self.last_write.is_some_and(|at| at.elapsed() >= IDLE_FLUSH) {
            self.last_write = None;
            if let Err(e) = self.sink.flush().await {
                tracing::warn!(error = %e, sink = self.sink.name(), "event sink flush");
            }
        }
    }

    fn resting(&self) -> bool {
        self.resting_until.is_some_and(|t| Instant::now() < t)
    }

    fn rest(&mut self) {
        self.resting_until = Some(Instant::now() + self.config.retry);
    }

    /// How long the writer sleeps unless woken: a tick, or what is left of the linger of
    /// records waiting for a sink that is free.
    fn pause(&self, writing: bool) -> Duration {
        if writing || self.resting() || self.shared.waiting() == 0 {
            return TICK;
        }
        self.linger_left().clamp(Duration::from_millis(1), TICK)
    }

    fn linger_left(&self) -> Duration {
        self.last_fresh
            .map_or(Duration::ZERO, |at| LINGER.saturating_sub(at.elapsed()))
    }

    /// The buffer first (a whole batch, or what waited out the linger); otherwise the oldest
    /// spill segment (while fresh records linger too: the sink is free meanwhile).
    async fn next_batch(&mut self) -> Option<Batch> {
        let waiting = self.shared.waiting();
        if waiting > 0 {
            if waiting >= self.shared.full() || self.linger_left().is_zero() {
                self.last_fresh = Some(Instant::now());
                return Some(Batch::Fresh(Arc::new(self.shared.take(self.shared.batch))));
            }
            if self.spill.as_ref().is_none_or(|spill| spill.bytes() == 0) {
                return None;
            }
        }
        loop {
            let read = self.with_spill(|spill| spill.oldest()).await;
            match read {
                Ok(None) => return None,
                Ok(Some((segment, records, damaged))) => {
                    if damaged > 0 {
                        tracing::error!(damaged, "damaged lines in an event spill file are lost");
                        self.shared.counters.dropped.inc_by(damaged as u64);
                    }
                    if !records.is_empty() {
                        return Some(Batch::Replay(segment, Arc::new(records)));
                    }
                    self.spill_op(move |spill| spill.remove(&segment)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the event spill folder cannot be read");
                    return None;
                }
            }
        }
    }

    async fn settle(&mut self, batch: Batch, result: Result<(), SinkFailure>) {
        let failure = result.err();
        let total = batch.records().len();
        let failed = failure.as_ref().map_or(0, |f| f.failed.len().min(total));
        let rejected = failure
            .as_ref()
            .map_or(0, |f| f.rejected.len().min(total - failed));
        if rejected > 0 {
            tracing::error!(sink = self.sink.name(), reason = %failure.as_ref().map_or("", |f| f.reason.as_str()), rejected, "the event sink refused records for good; dropped");
            self.shared.counters.dropped.inc_by(rejected as u64);
        }
        let done = (total - failed - rejected) as u64;
        if done > 0 {
            self.last_write = Some(Instant::now());
        }
        let left = |records: Arc<Vec<Record>>| -> Vec<Record> {
            let Some(failure) = &failure else {
                self.background.discard(records);
                return Vec::new();
            };
            let records = Arc::try_unwrap(records).unwrap_or_else(|shared| (*shared).clone());
            let mut keep = vec![false; records.len()];
            for &i in &failure.failed {
                if let Some(k) = keep.get_mut(i) {
                    *k = true;
                }
            }
            records
                .into_iter()
                .zip(keep)
                .filter_map(|(r, k)| k.then_some(r))
                .collect()
        };
        match batch {
            Batch::Fresh(records) => {
                self.shared.counters.written.inc_by(done);
                let left = left(records);
                if !left.is_empty() {
                    self.spill(left).await;
                }
            }
            Batch::Replay(segment, records) => {
                self.shared.counters.replayed.inc_by(done);
                let left = left(records);
                if left.is_empty() {
                    self.spill_op(move |spill| spill.remove(&segment)).await;
                } else if done > 0 {
                    self.spill_op(move |spill| spill.narrow(&segment, &left))
                        .await;
                }
            }
        }
        if let Some(failure) = failure.filter(|f| !f.failed.is_empty()) {
            if !self.resting() {
                tracing::warn!(sink = self.sink.name(), reason = %failure.reason, failed, "event sink write failed; records spilled, retrying");
            }
            self.rest();
        }
    }

    /// Spills records in segments of at most one batch, so each replays as one sink write.
    async fn spill(&mut self, records: Vec<Record>) {
        let batch = self.shared.batch;
        let outcomes = self
            .with_spill(move |spill| {
                records
                    .chunks(batch)
                    .map(|chunk| (chunk.len() as u64, spill.keep(chunk)))
                    .collect::<Vec<_>>()
            })
            .await;
        for (n, outcome) in outcomes {
            match outcome {
                Ok(Spilled::Kept) => self.shared.counters.spilled.inc_by(n),
                Ok(Spilled::Full) => {
                    tracing::error!(
                        records = n,
                        "the event spill folder is full; records dropped"
                    );
                    self.shared.counters.dropped.inc_by(n);
                }
                Err(e) => {
                    tracing::error!(error = %e, records = n, "records could not be spilled; dropped");
                    self.shared.counters.dropped.inc_by(n);
                }
            }
        }
    }

    async fn spill_op(
        &mut self,
        op: impl FnOnce(&mut Spill) -> Result<(), EventError> + Send + 'static,
    ) {
        if let Err(e) = self.with_spill(op).await {
            tracing::error!(error = %e, "event spill folder");
        }
    }

    /// Runs `op` on the spill off the runtime's threads (it touches the disk).
    async fn with_spill<R: Send + 'static>(
        &mut self,
        op: impl FnOnce(&mut Spill) -> R + Send + 'static,
    ) -> R {
        let mut spill = self.spill.take().expect("the spill is back after each use");
        let (spill, result) = tokio::task::spawn_blocking(move || {
            let result = op(&mut spill);
            (spill, result)
        })
        .await
        .expect("spill operations do not panic");
        self.shared.counters.spill_bytes.set(spill.bytes() as i64);
        self.spill = Some(spill);
        result
    }

    /// Closing: the buffer goes to the sink while there is time (to the spill after), then the
    /// sink flushes.
    async fn finish(&mut self) {
        let deadline = self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(Instant::now);
        loop {
            let records = self.shared.take(self.shared.batch);
            if records.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.resting() || left.is_zero() {
                self.spill(records).await;
                continue;
            }
            let timeout = left.min(self.config.write_timeout);
            let (batch, result) = attempt(
                self.sink.clone(),
                Batch::Fresh(Arc::new(records)),
                timeout,
                self.shared.clone(),
            )
            .await;
            self.settle(batch, result).await;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the event sink did not flush"),
            Err(_) => tracing::error!("the event sink did not flush in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use serde_json::Map;

    /// A sink that refuses everything while it is down and remembers what it took.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        taken: Mutex<Vec<i64>>,
        writes: std::sync::atomic::AtomicUsize,
        /// What it asks for as its `most_per_write`.
        most: Option<usize>,
        /// The most records one write brought.
        largest_write: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Sink for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }

        async fn write(&self, records: Arc<Vec<Record>>) -> Result<(), SinkFailure> {
            if self.down.load(Ordering::SeqCst) {
                return Err(SinkFailure::all(records.len(), "down"));
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.largest_write
                .fetch_max(records.len(), Ordering::SeqCst);
            let mut taken = self.taken.lock().unwrap();
            taken.extend(records.iter().map(|r| r.time_ms));
            Ok(())
        }

        async fn flush(&self) -> Result<(), EventError> {
            Ok(())
        }

        fn most_per_write(&self) -> Option<usize> {
            self.most
        }
    }

    fn record(i: i64) -> Record {
        Record::prediction("m", i, Map::new())
    }

    fn config(dir: &std::path::Path) -> LogConfig {
        LogConfig {
            retry: Duration::from_millis(20),
            ..LogConfig::new(dir)
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "waited for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_logged_while_the_sink_is_down_are_spilled_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Flaky::default());
        sink.down.store(true, Ordering::SeqCst);
        let log = EventLog::start(sink.clone(), config(dir.path()), None).unwrap();
        for i in 0..5_000 {
            assert!(log.log(record(i)));
        }
        until("the spill", || log.stats().spilled == 5_000).await;
        assert!(sink.taken.lock().unwrap().is_empty());
        sink.down.store(false, Ordering::SeqCst);
        until("the replay", || log.stats().replayed == 5_000).await;
        for i in 5_000..6_000 {
            log.log(record(i));
        }
        log.close(Duration::from_secs(5)).await;
        let stats = log.stats();
        assert_eq!(
            (stats.written, stats.spilled, stats.replayed, stats.dropped),
            (1_000, 5_000, 5_000, 0)
        );
        assert_eq!((stats.buffered, stats.spill_bytes), (0, 0));
        let mut taken = sink.taken.lock().unwrap().clone();
        taken.sort_unstable();
        assert_eq!(taken, (0..6_000).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_that_asks_for_smaller_writes_gets_them_live_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Flaky {
            most: Some(100),
            ..Flaky::default()
        });
        sink.down.store(true, Ordering::SeqCst);
        let log = EventLog::start(sink.clone(), config(dir.path()), None).unwrap();
        for i in 0..1_000 {
            assert!(log.log(record(i)));
        }
        until("the spill", || log.stats().spilled == 1_000).await;
        sink.down.store(false, Ordering::SeqCst);
        until("the replay", || log.stats().replayed == 1_000).await;
        for i in 1_000..5_000 {
            assert!(log.log(record(i)));
        }
        log.close(Duration::from_secs(5)).await;
        let mut taken = sink.taken.lock().unwrap().clone();
        taken.sort_unstable();
        assert_eq!(taken, (0..5_000).collect::<Vec<_>>());
        assert_eq!(sink.largest_write.load(Ordering::SeqCst), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_closed_log_left_spilled_is_replayed_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(Flaky::default());
        down.down.store(true, Ordering::SeqCst);
        let log = EventLog::start(down, config(dir.path()), None).unwrap();
        for i in 0..300 {
            log.log(record(i));
        }
        log.close(Duration::from_millis(500)).await;
        assert_eq!(log.stats().spilled, 300);

        let sink = Arc::new(Flaky::default());
        let next = EventLog::start(sink.clone(), config(dir.path()), None).unwrap();
        until("the replay", || next.stats().replayed == 300).await;
        next.close(Duration::from_secs(5)).await;
        assert_eq!(sink.taken.lock().unwrap().len(), 300);
        assert_eq!(next.stats().spill_bytes, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_buffer_drops_and_counts_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Flaky::default());
        let log = EventLog::start(
            sink.clone(),
            LogConfig {
                buffer: 10,
                ..config(dir.path())
            },
            None,
        )
        .unwrap();
        // The writer cannot run between these calls (one thread, no await): the buffer fills.
        let kept = (0..25).filter(|&i| log.log(record(i))).count();
        assert_eq!((kept, log.stats().dropped), (10, 15));
        log.close(Duration::from_secs(5)).await;
        assert_eq!(sink.taken.lock().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn busy_logs_write_whole_batches_and_small_buffers_do_not_wait_to_fill() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Flaky::default());
        let log = EventLog::start(sink.clone(), config(dir.path()), None).unwrap();
        // Many records at once: written as whole batches, not one by one.
        for i in 0..5_000 {
            assert!(log.log(record(i)));
        }
        until("5000 written", || sink.taken.lock().unwrap().len() == 5_000).await;
        assert_eq!(sink.writes.load(Ordering::SeqCst), 3, "2048 + 2048 + 904");
        log.close(Duration::from_secs(5)).await;

        // A buffer of 8 is written at 4 waiting, so a steady trickle never fills it.
        let sink = Arc::new(Flaky::default());
        let small = LogConfig {
            buffer: 8,
            ..config(&dir.path().join("small"))
        };
        let log = EventLog::start(sink.clone(), small, None).unwrap();
        for i in 0..200 {
            log.log(record(i));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        until("200 written", || sink.taken.lock().unwrap().len() == 200).await;
        assert_eq!(log.stats().dropped, 0);
        log.close(Duration::from_secs(5)).await;
    }

    /// A sink that never answers, or refuses odd-numbered records for good.
    struct Stubborn {
        hangs: bool,
        taken: Mutex<Vec<i64>>,
    }

    #[async_trait]
    impl Sink for Stubborn {
        fn name(&self) -> &'static str {
            "stubborn"
        }

        async fn write(&self, records: Arc<Vec<Record>>) -> Result<(), SinkFailure> {
            if self.hangs {
                std::future::pending::<()>().await;
            }
            let (odd, even): (Vec<usize>, Vec<usize>) =
                (0..records.len()).partition(|&i| records[i].time_ms % 2 == 1);
            let mut taken = self.taken.lock().unwrap();
            taken.extend(even.iter().map(|&i| records[i].time_ms));
            if odd.is_empty() {
                return Ok(());
            }
            Err(SinkFailure {
                failed: Vec::new(),
                rejected: odd,
                reason: "too large".into(),
            })
        }

        async fn flush(&self) -> Result<(), EventError> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_keeps_its_deadline_and_leaves_a_hung_write_in_the_spill() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Stubborn {
            hangs: true,
            taken: Mutex::default(),
        });
        let log = EventLog::start(sink, config(dir.path()), None).unwrap();
        for i in 0..100 {
            log.log(record(i));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        log.close(Duration::from_millis(300)).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closing took {:?}",
            started.elapsed()
        );
        assert_eq!(log.stats().spilled, 100, "{:?}", log.stats());
        let next = Arc::new(Flaky::default());
        let replay = EventLog::start(next.clone(), config(dir.path()), None).unwrap();
        until("the replay", || replay.stats().replayed == 100).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_the_sink_refuses_for_good_are_dropped_and_counted_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(Stubborn {
            hangs: false,
            taken: Mutex::default(),
        });
        let log = EventLog::start(sink.clone(), config(dir.path()), None).unwrap();
        for i in 0..1_000 {
            log.log(record(i));
        }
        log.close(Duration::from_secs(5)).await;
        let stats = log.stats();
        assert_eq!(
            (stats.written, stats.spilled, stats.dropped),
            (500, 0, 500),
            "{stats:?}"
        );
        assert_eq!(sink.taken.lock().unwrap().len(), 500);
    }
}
