//! The knobs of dynamic batching, with Triton's names and meanings, validated once at start-up so
//! batch formation can trust them.

use std::collections::HashMap;
use std::time::Duration;

/// How one model version batches. Field names follow Triton's `dynamic_batching` block.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    /// Most rows in one batch; 0 means the model does not batch: each job runs alone.
    pub max_batch_size: usize,
    /// Whether jobs are combined into batches. Off is Triton's default scheduler: each job
    /// executes alone, with up to `max_batch_size` rows of its own.
    pub dynamic_batching: bool,
    /// Batch sizes worth executing at once, without waiting for the queue delay.
    pub preferred_batch_sizes: Vec<usize>,
    /// Longest the oldest queued job waits for others to join its batch.
    pub max_queue_delay: Duration,
    /// Beyond Triton: a p99 target for queue wait plus compute. When set, the queue delay adapts
    /// between zero and `max_queue_delay` (or the budget, when that is zero) to keep the p99 within
    /// it while batches grow as large as it allows.
    pub latency_budget: Option<Duration>,
    /// Beyond Triton: wait out the queue delay only while another job is likely to arrive in it
    /// (from the rate of arrivals while instances execute), so a lone caller is not kept waiting
    /// for a batch that stays at one job. Off is Triton's rule: the delay is always waited.
    pub wait_only_for_company: bool,
    /// Number of priority levels; level 1 is served first.
    pub priority_levels: u32,
    /// Level for jobs that name none.
    pub default_priority_level: u32,
    /// Queue policy of every level not listed in `priority_queue_policy`.
    pub default_queue_policy: QueuePolicy,
    /// Per-level overrides of the queue policy.
    pub priority_queue_policy: HashMap<u32, QueuePolicy>,
}

/// Limits of one priority level's queue (Triton's `ModelQueuePolicy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueuePolicy {
    /// Jobs that may wait at this level; one more is rejected at once. Always bounded.
    pub max_queue_size: usize,
    /// Queue timeout applied to jobs that bring none.
    pub default_timeout: Option<Duration>,
    /// Whether a job's own timeout may exceed `default_timeout` (a shorter one always applies).
    pub allow_timeout_override: bool,
}

/// A policy that cannot work, found at start-up.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("priority_levels must be at least 1")]
    NoPriorityLevels,
    #[error("default_priority_level {level} is outside 1..={levels}")]
    DefaultLevelOutOfRange { level: u32, levels: u32 },
    #[error("priority_queue_policy names level {level}, outside 1..={levels}")]
    QueuePolicyLevelOutOfRange { level: u32, levels: u32 },
    #[error("max_queue_size must be at least 1")]
    ZeroQueueSize,
    #[error("preferred batch size {size} must be between 1 and max_batch_size {max}")]
    PreferredSizeOutOfRange { size: usize, max: usize },
    #[error("latency_budget_ms must be greater than zero")]
    ZeroLatencyBudget,
}

impl QueuePolicy {
    /// A bounded queue with no timeout.
    pub fn bounded(max_queue_size: usize) -> Self {
        Self {
            max_queue_size,
            default_timeout: None,
            allow_timeout_override: true,
        }
    }

    /// The queue timeout for a job that asked for `requested`.
    pub fn effective_timeout(&self, requested: Option<Duration>) -> Option<Duration> {
        match (requested, self.default_timeout) {
            (Some(r), Some(_)) if self.allow_timeout_override => Some(r),
            (Some(r), Some(d)) => Some(r.min(d)),
            (r, d) => r.or(d),
        }
    }
}

impl BatchPolicy {
    /// A policy with one priority level and no delay: the batch is whatever is queued when an
    /// instance becomes free, up to `max_batch_size` rows.
    pub fn new(max_batch_size: usize, max_queue_size: usize) -> Self {
        Self {
            max_batch_size,
            dynamic_batching: true,
            preferred_batch_sizes: Vec::new(),
            max_queue_delay: Duration::ZERO,
            latency_budget: None,
            wait_only_for_company: false,
            priority_levels: 1,
            default_priority_level: 1,
            default_queue_policy: QueuePolicy::bounded(max_queue_size),
            priority_queue_policy: HashMap::new(),
        }
    }

    /// Checks that the policy is usable; the batcher assumes it is.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let levels = self.priority_levels;
        if levels == 0 {
            return Err(PolicyError::NoPriorityLevels);
        }
        if !(1..=levels).contains(&self.default_priority_level) {
            return Err(PolicyError::DefaultLevelOutOfRange {
                level: self.default_priority_level,
                levels,
            });
        }
        for (&level, policy) in &self.priority_queue_policy {
            if !(1..=levels).contains(&level) {
                return Err(PolicyError::QueuePolicyLevelOutOfRange { level, levels });
            }
            if policy.max_queue_size == 0 {
                return Err(PolicyError::ZeroQueueSize);
            }
        }
        if self.default_queue_policy.max_queue_size == 0 {
            return Err(PolicyError::ZeroQueueSize);
        }
        if self.latency_budget.is_some_and(|b| b.is_zero()) {
            return Err(PolicyError::ZeroLatencyBudget);
        }
        for &size in &self.preferred_batch_sizes {
            if size == 0 || (self.max_batch_size > 0 && size > self.max_batch_size) {
                return Err(PolicyError::PreferredSizeOutOfRange {
                    size,
                    max: self.max_batch_size,
                });
            }
        }
        Ok(())
    }

    /// The level a job asking for `priority` goes to, or `Err(levels)` when it is out of range.
    pub(crate) fn level_for(&self, priority: Option<u32>) -> Result<u32, u32> {
        match priority {
            None | Some(0) => Ok(self.default_priority_level),
            Some(p) if p <= self.priority_levels => Ok(p),
            Some(_) => Err(self.priority_levels),
        }
    }

    /// The longest queue delay the adaptive delay may reach.
    pub(crate) fn delay_ceiling(&self) -> Duration {
        match self.latency_budget {
            Some(budget) if self.max_queue_delay.is_zero() => budget,
            _ => self.max_queue_delay,
        }
    }

    pub(crate) fn queue_policy(&self, level: u32) -> &QueuePolicy {
        self.priority_queue_policy
            .get(&level)
            .unwrap_or(&self.default_queue_policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_shortens_but_does_not_lengthen_without_override() {
        let mut policy = QueuePolicy::bounded(8);
        policy.default_timeout = Some(Duration::from_millis(100));
        policy.allow_timeout_override = false;
        let short = Some(Duration::from_millis(10));
        let long = Some(Duration::from_millis(500));
        assert_eq!(policy.effective_timeout(short), short);
        assert_eq!(
            policy.effective_timeout(long),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            policy.effective_timeout(None),
            Some(Duration::from_millis(100))
        );
        policy.allow_timeout_override = true;
        assert_eq!(policy.effective_timeout(long), long);
    }

    #[test]
    fn request_timeout_applies_when_no_default() {
        let policy = QueuePolicy::bounded(8);
        assert_eq!(policy.effective_timeout(None), None);
        let t = Some(Duration::from_millis(3));
        assert_eq!(policy.effective_timeout(t), t);
    }

    #[test]
    fn validation_catches_bad_levels_and_sizes() {
        let mut p = BatchPolicy::new(8, 16);
        assert_eq!(p.validate(), Ok(()));
        p.preferred_batch_sizes = vec![4, 16];
        assert_eq!(
            p.validate(),
            Err(PolicyError::PreferredSizeOutOfRange { size: 16, max: 8 })
        );
        p.preferred_batch_sizes = vec![4];
        p.default_priority_level = 2;
        assert_eq!(
            p.validate(),
            Err(PolicyError::DefaultLevelOutOfRange {
                level: 2,
                levels: 1
            })
        );
        p.priority_levels = 3;
        assert_eq!(p.validate(), Ok(()));
        p.priority_queue_policy.insert(4, QueuePolicy::bounded(1));
        assert_eq!(
            p.validate(),
            Err(PolicyError::QueuePolicyLevelOutOfRange {
                level: 4,
                levels: 3
            })
        );
    }

    #[test]
    fn priority_zero_means_default_level() {
        let mut p = BatchPolicy::new(8, 16);
        p.priority_levels = 3;
        p.default_priority_level = 2;
        assert_eq!(p.level_for(None), Ok(2));
        assert_eq!(p.level_for(Some(0)), Ok(2));
        assert_eq!(p.level_for(Some(3)), Ok(3));
        assert_eq!(p.level_for(Some(4)), Err(3));
    }
}
