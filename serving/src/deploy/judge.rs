//! The canary judge: what a deployment's guardrails say about the canary's window of requests
//! against the control's window over the same time. Absolute limits (error rate, p99) break at
//! once; comparisons with the control break only when the canary is worse by more than the stated
//! margin and a one-sided test says the difference is not chance (a two-proportion z-test for
//! error rates; Mann–Whitney U on latencies, as Kayenta's judge does for Argo Rollouts).

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};

use crate::traffic::Window;

/// A deployment's guardrails. Every field has a default, so `{}` is a sensible set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guardrails {
    /// Largest share of the canary's requests that may fail (server errors).
    pub max_error_rate: f64,
    /// Largest p99 latency of the canary, in milliseconds; none: not limited.
    pub max_p99_ms: Option<f64>,
    /// Canary requests a step needs before it is judged (a failing canary may break its
    /// error-rate limit earlier: when the errors alone already exceed it at this count).
    pub min_requests: u64,
    /// How much higher (in error-rate points) the canary's error rate may be than the control's.
    pub max_error_rate_increase: f64,
    /// How much slower (a ratio of medians minus one) the canary may be than the control.
    pub max_latency_increase: f64,
    /// p-value under which a comparison with the control counts as significant.
    pub significance: f64,
}

impl Default for Guardrails {
    fn default() -> Self {
        Self {
            max_error_rate: 0.02,
            max_p99_ms: None,
            min_requests: 100,
            max_error_rate_increase: 0.01,
            max_latency_increase: 0.25,
            significance: 0.05,
        }
    }
}

impl Guardrails {
    /// Checks the values, naming the field that is wrong.
    pub fn check(&self) -> Result<(), String> {
        let share = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "guardrails.{name} must be between 0 and 1, not {v}"
                ))
            }
        };
        share("max_error_rate", self.max_error_rate)?;
        share("max_error_rate_increase", self.max_error_rate_increase)?;
        if !(self.significance > 0.0 && self.significance < 1.0) {
            return Err(format!(
                "guardrails.significance must be between 0 and 1 (exclusive), not {}",
                self.significance
            ));
        }
        if !(self.max_latency_increase >= 0.0 && self.max_latency_increase.is_finite()) {
            return Err(format!(
                "guardrails.max_latency_increase must be 0 or more, not {}",
                self.max_latency_increase
            ));
        }
        if let Some(p99) = self.max_p99_ms
            && !(p99 > 0.0 && p99.is_finite())
        {
            return Err(format!("guardrails.max_p99_ms must be positive, not {p99}"));
        }
        if self.min_requests == 0 {
            return Err("guardrails.min_requests must be at least 1".into());
        }
        Ok(())
    }
}

/// What the judge made of a step's windows.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few requests to say; the reason says how many are missing.
    Wait(String),
    /// Every guardrail holds; the reason summarises the evidence.
    Pass(String),
    /// A guardrail broke; the reason names it with the numbers.
    Fail(String),
}

/// Judges the canary's window against the control's.
pub fn judge(canary: &Window, control: &Window, guardrails: &Guardrails) -> Verdict {
    let errors = canary.server_errors;
    // Errors alone already past the limit at `min_requests`: no need to wait for the rest.
    let early = errors as f64 > guardrails.max_error_rate * guardrails.min_requests as f64;
    if canary.requests < guardrails.min_requests && !early {
        return Verdict::Wait(format!(
            "{} of {} canary requests",
            canary.requests, guardrails.min_requests
        ));
    }
    let rate = canary.error_rate();
    if rate > guardrails.max_error_rate {
        return Verdict::Fail(format!(
            "canary error rate {:.2}% ({errors} of {}) is over the limit of {:.2}%",
            rate * 100.0,
            canary.requests,
            guardrails.max_error_rate * 100.0
        ));
    }
    let p99 = canary.quantile_ms(0.99);
    if let (Some(limit), Some(p99)) = (guardrails.max_p99_ms, p99)
        && p99 > limit
    {
        return Verdict::Fail(format!(
            "canary p99 {p99:.1} ms is over the limit of {limit:.1} ms"
        ));
    }
    let mut evidence = vec![format!(
        "canary {} requests, error rate {:.2}%, p99 {}",
        canary.requests,
        rate * 100.0,
        p99.map_or("n/a".into(), |p| format!("{p:.1} ms"))
    )];
    if control.requests >= guardrails.min_requests {
        let control_rate = control.error_rate();
        let p = proportion_greater(
            errors,
            canary.requests,
            control.server_errors,
            control.requests,
        );
        if rate - control_rate > guardrails.max_error_rate_increase && p < guardrails.significance {
            return Verdict::Fail(format!(
                "canary error rate {:.2}% is {:.2} points over the control's {:.2}% (more than {:.2}; z-test p = {p:.4})",
                rate * 100.0,
                (rate - control_rate) * 100.0,
                control_rate * 100.0,
                guardrails.max_error_rate_increase * 100.0
            ));
        }
        if let (Some(mine), Some(theirs)) = (canary.quantile_ms(0.5), control.quantile_ms(0.5))
            && theirs > 0.0
        {
            let ratio = mine / theirs;
            let p = mann_whitney_greater(&canary.latencies_ms, &control.latencies_ms);
            if ratio - 1.0 > guardrails.max_latency_increase && p < guardrails.significance {
                return Verdict::Fail(format!(
                    "canary median latency {mine:.2} ms is {:.0}% over the control's {theirs:.2} ms (more than {:.0}%; Mann-Whitney p = {p:.4})",
                    (ratio - 1.0) * 100.0,
                    guardrails.max_latency_increase * 100.0
                ));
            }
            evidence.push(format!(
                "median latency {:.2}x the control's (Mann-Whitney p = {p:.3})",
                ratio
            ));
        }
        evidence.push(format!(
            "control {} requests, error rate {:.2}%",
            control.requests,
            control_rate * 100.0
        ));
    } else {
        evidence.push(format!(
            "control has {} requests, too few to compare",
            control.requests
        ));
    }
    Verdict::Pass(evidence.join("; "))
}

fn standard_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("the standard normal distribution")
}

/// One-sided p-value that the first proportion is greater than the second (pooled z-test).
pub fn proportion_greater(hits_a: u64, n_a: u64, hits_b: u64, n_b: u64) -> f64 {
    if n_a == 0 || n_b == 0 {
        return 1.0;
    }
    let (a, b) = (n_a as f64, n_b as f64);
    let pooled = (hits_a + hits_b) as f64 / (a + b);
    let spread = (pooled * (1.0 - pooled) * (1.0 / a + 1.0 / b)).sqrt();
    if spread == 0.0 {
        return if hits_a as f64 / a > hits_b as f64 / b {
            0.0
        } else {
            1.0
        };
    }
    let z = (hits_a as f64 / a - hits_b as f64 / b) / spread;
    1.0 - standard_normal().cdf(z)
}

/// One-sided p-value that values of `a` tend to be greater than those of `b` (Mann–Whitney U,
/// normal approximation with tie correction and continuity correction, as scipy's
/// `mannwhitneyu(a, b, alternative="greater", method="asymptotic")`).
pub fn mann_whitney_greater(a: &[f32], b: &[f32]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let mut all: Vec<(f32, bool)> = a
        .iter()
        .map(|&v| (v, true))
        .chain(b.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let (mut rank_sum_a, mut ties) = (0.0f64, 0.0f64);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Positions i..=j share the mean of ranks i+1..=j+1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let count = (j - i + 1) as f64;
        ties += count * count * count - count;
        rank_sum_a += rank * all[i..=j].iter().filter(|(_, from_a)| *from_a).count() as f64;
        i = j + 1;
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let total = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    if variance <= 0.0 {
        return if u > mean { 0.0 } else { 1.0 };
    }
    let z = (u - mean - 0.5) / variance.sqrt();
    1.0 - standard_normal().cdf(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: u64, server_errors: u64, latencies_ms: Vec<f32>) -> Window {
        Window {
            requests,
            server_errors,
            client_errors: 0,
            latencies_ms,
            seen_latencies: requests,
        }
    }

    fn spread(center: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| center + (i % 10) as f32 * 0.1).collect()
    }

    #[test]
    fn mann_whitney_matches_scipy() {
        // scipy.stats.mannwhitneyu([3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5], alternative="greater",
        // method="asymptotic") -> pvalue 0.0330 (U = 25.5, with the tie and continuity corrections).
        let p = mann_whitney_greater(&[3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!((p - 0.0330).abs() < 1e-4, "{p}");
        let same = mann_whitney_greater(&spread(1.0, 200), &spread(1.0, 200));
        assert!(same > 0.4, "{same}");
    }

    #[test]
    fn the_proportion_test_matches_the_textbook() {
        // 30 of 1000 against 10 of 1000: z = 3.19, one-sided p = 0.0007.
        let p = proportion_greater(30, 1000, 10, 1000);
        assert!((p - 0.0007).abs() < 2e-4, "{p}");
        assert!(proportion_greater(10, 1000, 30, 1000) > 0.99);
    }

    #[test]
    fn a_healthy_canary_passes_and_waits_for_its_requests() {
        let g = Guardrails::default();
        let control = window(500, 1, spread(2.0, 500));
        assert!(matches!(
            judge(&window(50, 0, spread(2.0, 50)), &control, &g),
            Verdict::Wait(_)
        ));
        assert!(matches!(
            judge(&window(200, 1, spread(2.0, 200)), &control, &g),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn failures_break_the_guardrails_that_they_should() {
        let g = Guardrails {
            max_p99_ms: Some(50.0),
            ..Guardrails::default()
        };
        let control = window(1000, 0, spread(2.0, 1000));
        // Errors past the limit before min_requests: failed at once.
        let Verdict::Fail(reason) = judge(&window(10, 3, spread(2.0, 10)), &control, &g) else {
            panic!("three errors in ten requests must fail the canary");
        };
        assert!(reason.contains("error rate"), "{reason}");
        let Verdict::Fail(reason) = judge(&window(200, 0, spread(60.0, 200)), &control, &g) else {
            panic!("p99 over the limit");
        };
        assert!(reason.contains("p99"), "{reason}");
        // Three times slower than the control: the comparison breaks even within the p99 limit.
        let Verdict::Fail(reason) = judge(&window(200, 0, spread(6.0, 200)), &control, &g) else {
            panic!("3x slower than the control");
        };
        assert!(reason.contains("Mann-Whitney"), "{reason}");
        // 1.5% errors against the control's 0%: within 2% but past the 1-point margin.
        let Verdict::Fail(reason) = judge(&window(1000, 15, spread(2.0, 1000)), &control, &g)
        else {
            panic!("error rate over the control's");
        };
        assert!(reason.contains("z-test"), "{reason}");
    }

    #[test]
    fn guardrails_name_what_is_wrong() {
        let bad = Guardrails {
            max_error_rate: 1.5,
            ..Guardrails::default()
        };
        assert!(bad.check().unwrap_err().contains("max_error_rate"));
        let bad = Guardrails {
            significance: 0.0,
            ..Guardrails::default()
        };
        assert!(bad.check().unwrap_err().contains("significance"));
        assert!(Guardrails::default().check().is_ok());
    }
}
