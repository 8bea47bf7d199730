//! Whether waiting out the queue delay can gain a batch company. Triton waits `max_queue_delay`
//! for a batch to fill even when nobody else is sending: a lone caller (a closed loop at
//! concurrency 1, a quiet hour) pays the whole delay on every request for batches that stay at one
//! job. With `wait_only_for_company` the delay is waited only while the recent arrival rate makes
//! another job likely before it runs out; otherwise the batch goes at once.
//!
//! An arrival counts as company when another job is in the system: executing (its caller cannot
//! be the one sending, it is still waiting) or queued. A lone closed-loop caller never has two
//! jobs in at once, so it measures zero; many callers measure their rate, also when they all sit
//! in one executing batch and come back together (the first to return finds nobody, the others
//! find it queued). Counted per executing time, which overstates the rate while jobs wait with no
//! instance busy: the error leans toward waiting, Triton's rule. Nothing decays while instances
//! idle, so after a busy spell a lone caller waits until a few horizons of executing time pass.

use std::time::{Duration, Instant};

/// Executing time over which the count is kept: both are halved whenever it passes this, so
/// older arrivals lose half their weight every half horizon or so.
const HORIZON: Duration = Duration::from_millis(50);
/// Expected arrivals within the remaining delay worth waiting for: at 0.5 a Poisson stream brings
/// at least one job 39% of the time.
const WORTH_WAITING: f64 = 0.5;

/// Arrivals per executing time, decayed.
#[derive(Debug)]
pub(crate) struct CompanyEstimate {
    /// Instances executing a batch now.
    executing: usize,
    /// Since when `executing` time has not been added to `executing_time`.
    since: Instant,
    executing_time: Duration,
    arrivals: f64,
}

impl CompanyEstimate {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            executing: 0,
            since: now,
            executing_time: Duration::ZERO,
            arrivals: 0.0,
        }
    }

    /// A job was queued; `others_queued` says whether jobs were waiting already.
    pub(crate) fn arrived(&mut self, others_queued: bool) {
        if self.executing > 0 || others_queued {
            self.arrivals += 1.0;
        }
    }

    /// An instance took a batch to execute.
    pub(crate) fn started(&mut self, now: Instant) {
        self.account(now);
        self.executing += 1;
    }

    /// An instance finished its batch.
    pub(crate) fn finished(&mut self, now: Instant) {
        self.account(now);
        self.executing = self.executing.saturating_sub(1);
    }

    /// Whether another job is likely to arrive within `remaining`. With nothing measured yet it
    /// is: the delay is waited, as Triton does.
    pub(crate) fn worth_waiting(&self, remaining: Duration, now: Instant) -> bool {
        let mut executing_time = self.executing_time;
        if self.executing > 0 {
            executing_time += now.saturating_duration_since(self.since);
        }
        if executing_time.is_zero() {
            return true;
        }
        let expected = self.arrivals * remaining.as_secs_f64() / executing_time.as_secs_f64();
        expected >= WORTH_WAITING
    }

    fn account(&mut self, now: Instant) {
        if self.executing > 0 {
            self.executing_time += now.saturating_duration_since(self.since);
            while self.executing_time > HORIZON {
                self.executing_time /= 2;
                self.arrivals /= 2.0;
            }
        }
        self.since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_millis(2);

    /// Runs `batches` batches of `compute` each, with `arrivals` jobs arriving during each.
    fn run(
        estimate: &mut CompanyEstimate,
        start: Instant,
        batches: u32,
        compute: Duration,
        arrivals: u32,
    ) -> Instant {
        let mut now = start;
        for _ in 0..batches {
            estimate.started(now);
            for _ in 0..arrivals {
                estimate.arrived(false);
            }
            now += compute;
            estimate.finished(now);
            // A caller's next request after its answer, nothing else in: it does not count.
            estimate.arrived(false);
            now += Duration::from_micros(300);
        }
        now
    }

    #[test]
    fn waits_while_nothing_is_measured() {
        let now = Instant::now();
        assert!(CompanyEstimate::new(now).worth_waiting(DELAY, now));
    }

    #[test]
    fn a_lone_caller_is_not_kept_waiting() {
        let start = Instant::now();
        let mut estimate = CompanyEstimate::new(start);
        let now = run(&mut estimate, start, 20, Duration::from_micros(2_200), 0);
        assert!(!estimate.worth_waiting(DELAY, now));
    }

    #[test]
    fn many_callers_are_worth_waiting_for() {
        let start = Instant::now();
        let mut estimate = CompanyEstimate::new(start);
        // Eight callers: seven arrive while each batch runs.
        let now = run(&mut estimate, start, 20, Duration::from_micros(2_200), 7);
        assert!(estimate.worth_waiting(DELAY, now));
        // Not for a window too short to expect anyone.
        assert!(!estimate.worth_waiting(Duration::from_micros(50), now));
    }

    #[test]
    fn the_estimate_follows_a_change_of_load() {
        let start = Instant::now();
        let mut estimate = CompanyEstimate::new(start);
        let busy = run(&mut estimate, start, 50, Duration::from_micros(2_200), 7);
        assert!(estimate.worth_waiting(DELAY, busy));
        // The other callers leave: within a few horizons of executing time the wait stops.
        let quiet = run(&mut estimate, busy, 200, Duration::from_micros(2_200), 0);
        assert!(!estimate.worth_waiting(DELAY, quiet));
        // And they come back.
        let again = run(&mut estimate, quiet, 50, Duration::from_micros(2_200), 7);
        assert!(estimate.worth_waiting(DELAY, again));
    }

    #[test]
    fn callers_returning_together_count_as_company() {
        let start = Instant::now();
        let mut estimate = CompanyEstimate::new(start);
        let mut now = start;
        for _ in 0..20 {
            // All eight callers were in the last batch: they come back with no instance busy,
            // the first finds the queue empty, the other seven find it queued.
            estimate.arrived(false);
            for _ in 0..7 {
                estimate.arrived(true);
            }
            estimate.started(now);
            now += Duration::from_micros(2_200);
            estimate.finished(now);
        }
        assert!(estimate.worth_waiting(DELAY, now));
    }

    #[test]
    fn concurrent_instances_count_their_time_once() {
        let start = Instant::now();
        let mut estimate = CompanyEstimate::new(start);
        estimate.started(start);
        estimate.started(start);
        estimate.arrived(false);
        let later = start + Duration::from_millis(4);
        estimate.finished(later);
        estimate.finished(later);
        // One arrival in 4 ms of executing time: 0.5 expected in 2 ms.
        assert!(estimate.worth_waiting(DELAY, later));
        assert!(!estimate.worth_waiting(DELAY - Duration::from_micros(100), later));
    }
}
