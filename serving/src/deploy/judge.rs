//! The canary judge: what a deployment's guardrails say about the canary's window of requests
//! against the control's window over the same time. Absolute limits (error rate, p99) break at
//! once; comparisons with the control break only when the canary is worse by more than the stated
//! margin and a one-sided test says the difference is not chance (a two-proportion z-test for
//! error rates; Mann–Whitney U on latencies, as Kayenta's judge does for Argo Rollouts).

use serde::{Deserialize, Serialize};

use crate::stats::{mann_whitney_greater, proportion_greater};
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
            ..Window::default()
        }
    }

    fn spread(center: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| center + (i % 10) as f32 * 0.1).collect()
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
