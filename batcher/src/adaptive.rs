//! The queue delay behind a latency budget. Triton and MLServer wait a fixed `max_queue_delay` for
//! a batch to fill: too short and batches stay small under load, too long and latency is wasted at
//! low load. With `latency_budget` set, the delay instead follows the model's measured latency
//! (queue wait plus compute, per job): it grows while the recent p99 leaves headroom under the
//! budget, so batches get as large as the budget allows, and halves as soon as the p99 passes it.

use std::time::Duration;

/// Jobs measured before each adjustment; the p99 of this many is their second largest.
const WINDOW: usize = 128;
/// The delay grows only while the p99 stays under this share of the budget.
const HEADROOM: f64 = 0.8;

/// Additive-increase, multiplicative-decrease control of the queue delay.
#[derive(Debug)]
pub(crate) struct AdaptiveDelay {
    budget: Duration,
    ceiling: Duration,
    delay: Duration,
    window: Vec<Duration>,
}

impl AdaptiveDelay {
    /// Starts with no delay; `ceiling` is the longest delay it may reach.
    pub(crate) fn new(budget: Duration, ceiling: Duration) -> Self {
        Self {
            budget,
            ceiling: ceiling.min(budget),
            delay: Duration::ZERO,
            window: Vec::with_capacity(WINDOW),
        }
    }

    /// The delay batch formation uses now.
    pub(crate) fn current(&self) -> Duration {
        self.delay
    }

    /// Takes the latencies of the jobs of one finished batch, and adjusts once a window is full.
    pub(crate) fn record(&mut self, latencies: &[Duration]) {
        for &latency in latencies {
            self.push(latency);
        }
    }

    /// Counts `jobs` that timed out in the queue as over the budget, whatever they had waited
    /// when they were found (a job's timeout may be shorter than the budget; it still failed).
    pub(crate) fn record_timeouts(&mut self, jobs: usize) {
        let over = self.budget + Duration::from_nanos(1);
        for _ in 0..jobs {
            self.push(over);
        }
    }

    /// Adds one job's latency to the window, adjusting when it is full.
    fn push(&mut self, latency: Duration) {
        self.window.push(latency);
        if self.window.len() == WINDOW {
            self.adjust();
        }
    }

    fn adjust(&mut self) {
        let index = (WINDOW * 99).div_ceil(100) - 1;
        let p99 = *self.window.select_nth_unstable(index).1;
        self.window.clear();
        if p99 > self.budget {
            self.delay /= 2;
        } else if p99.as_secs_f64() < self.budget.as_secs_f64() * HEADROOM {
            let step = (self.budget / 50).max(self.delay / 4);
            self.delay = (self.delay + step).min(self.ceiling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_of(latency: Duration) -> Vec<Duration> {
        vec![latency; WINDOW]
    }

    #[test]
    fn grows_under_the_budget_up_to_the_ceiling() {
        let budget = Duration::from_millis(10);
        let mut delay = AdaptiveDelay::new(budget, Duration::from_millis(4));
        assert_eq!(delay.current(), Duration::ZERO);
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            delay.record(&window_of(Duration::from_millis(1)));
            assert!(delay.current() >= last);
            last = delay.current();
        }
        assert_eq!(delay.current(), Duration::from_millis(4));
    }

    #[test]
    fn halves_when_the_p99_passes_the_budget() {
        let budget = Duration::from_millis(10);
        let mut delay = AdaptiveDelay::new(budget, Duration::from_millis(8));
        for _ in 0..100 {
            delay.record(&window_of(Duration::from_millis(1)));
        }
        let grown = delay.current();
        // Two slow jobs in a window are above its p99.
        let mut window = window_of(Duration::from_millis(1));
        window[3] = Duration::from_millis(30);
        window[70] = Duration::from_millis(30);
        delay.record(&window);
        assert_eq!(delay.current(), grown / 2);
    }

    #[test]
    fn one_outlier_per_window_is_within_the_p99() {
        let budget = Duration::from_millis(10);
        let mut delay = AdaptiveDelay::new(budget, Duration::from_millis(8));
        delay.record(&window_of(Duration::from_millis(1)));
        let before = delay.current();
        let mut window = window_of(Duration::from_millis(1));
        window[5] = Duration::from_millis(50);
        delay.record(&window);
        assert!(delay.current() > before);
    }

    #[test]
    fn holds_between_headroom_and_budget() {
        let budget = Duration::from_millis(10);
        let mut delay = AdaptiveDelay::new(budget, Duration::from_millis(8));
        delay.record(&window_of(Duration::from_millis(1)));
        let before = delay.current();
        delay.record(&window_of(Duration::from_millis(9)));
        assert_eq!(delay.current(), before);
    }

    #[test]
    fn timeouts_count_as_over_the_budget() {
        let budget = Duration::from_millis(10);
        let mut delay = AdaptiveDelay::new(budget, Duration::from_millis(8));
        for _ in 0..10 {
            delay.record(&window_of(Duration::from_millis(1)));
        }
        let grown = delay.current();
        delay.record(&[Duration::from_millis(1); WINDOW - 2]);
        delay.record_timeouts(2);
        assert_eq!(delay.current(), grown / 2);
    }

    #[test]
    fn the_ceiling_never_exceeds_the_budget() {
        let mut delay = AdaptiveDelay::new(Duration::from_millis(2), Duration::from_secs(1));
        for _ in 0..1_000 {
            delay.record(&window_of(Duration::from_micros(10)));
        }
        assert_eq!(delay.current(), Duration::from_millis(2));
    }
}
