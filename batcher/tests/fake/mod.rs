//! A fake executor for batcher tests: it echoes each job's rows tagged with the job id, records
//! every batch it runs, and can be held shut to let queues build up.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use marquee_batcher::{Executor, Job};

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub rows: usize,
    /// Jobs batch together only when their shapes agree.
    pub shape: u32,
}

impl Job for FakeJob {
    fn rows(&self) -> usize {
        self.rows
    }
    fn can_batch_with(&self, first: &Self) -> bool {
        self.shape == first.shape
    }
}

/// The value a job must get back for its row `r`.
pub fn row_value(id: u64, r: usize) -> u64 {
    id * 1_000 + r as u64
}

#[derive(Default)]
pub struct Record {
    /// Job ids of every executed batch, in execution order.
    pub batches: Vec<Vec<FakeJob>>,
    pub running: usize,
    pub max_running: usize,
}

/// A gate that blocks executions while closed.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    pub fn closed() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn opened() -> Arc<Self> {
        let gate = Self::default();
        *gate.open.lock().unwrap() = true;
        Arc::new(gate)
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }
    /// Executions that start from now on block until the gate opens again.
    pub fn close(&self) {
        *self.open.lock().unwrap() = false;
    }
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
    }
}

pub struct FakeExecutor {
    pub record: Arc<Mutex<Record>>,
    pub gate: Arc<Gate>,
    pub work: Duration,
    pub fail_with: Option<String>,
    pub panic_on: Option<u64>,
}

impl FakeExecutor {
    pub fn new(record: &Arc<Mutex<Record>>, gate: &Arc<Gate>) -> Self {
        Self {
            record: record.clone(),
            gate: gate.clone(),
            work: Duration::ZERO,
            fail_with: None,
            panic_on: None,
        }
    }
}

impl Executor for FakeExecutor {
    type Job = FakeJob;
    type Output = Vec<u64>;
    type Error = String;

    fn execute(&mut self, jobs: &[FakeJob]) -> Result<Vec<Vec<u64>>, String> {
        {
            let mut record = self.record.lock().unwrap();
            record.running += 1;
            record.max_running = record.max_running.max(record.running);
        }
        self.gate.wait();
        if !self.work.is_zero() {
            std::thread::sleep(self.work);
        }
        let mut record = self.record.lock().unwrap();
        record.running -= 1;
        record.batches.push(jobs.to_vec());
        drop(record);
        if let Some(id) = self.panic_on
            && jobs.iter().any(|j| j.id == id)
        {
            panic!("job {id} makes the executor panic");
        }
        if let Some(message) = &self.fail_with {
            return Err(message.clone());
        }
        Ok(jobs
            .iter()
            .map(|j| (0..j.rows).map(|r| row_value(j.id, r)).collect())
            .collect())
    }
}
