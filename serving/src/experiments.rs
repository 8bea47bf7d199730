//! The A/B readout (`GET /v1/experiments/{model}`): what each variant of a model's traffic
//! policy did since the policy was set, and every variant compared with the control, metric by
//! metric, with the test used, its p-value and a confidence interval. The evidence is the
//! router's windows ([`crate::traffic::Window`]): requests and errors, sampled latencies, the
//! moments and labels of the predictions, and outcomes fed back through `POST /v1/feedback`.
//! This module only reads them; the tests themselves live in [`crate::stats`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::{self, Difference, Moments};
use crate::traffic::{CONTROL, OTHER_LABEL, Policy, Window};

/// The confidence level of every interval in a readout.
pub const CONFIDENCE: f64 = 0.95;

/// A model's experiment as `GET /v1/experiments/{model}` shows it.
#[derive(Debug, Serialize)]
pub struct Readout {
    pub model: String,
    pub policy: Policy,
    /// The level of every `confidence_interval`.
    pub confidence: f64,
    /// p-values under this count as `significant`.
    pub significance: f64,
    pub variants: BTreeMap<String, VariantSummary>,
    /// Every variant against the control, per metric (where both sides have the data).
    pub comparisons: Vec<Comparison>,
}

/// What one variant's requests did.
#[derive(Debug, Serialize)]
pub struct VariantSummary {
    pub version: Option<u64>,
    pub requests: u64,
    pub server_errors: u64,
    pub client_errors: u64,
    pub error_rate: f64,
    pub latency_ms: Option<Quantiles>,
    /// Numeric predictions (scores, prices).
    pub prediction: Option<Summary>,
    /// Labelled predictions, counted per label.
    pub labels: BTreeMap<String, u64>,
    /// Outcomes fed back for this variant's predictions.
    pub outcome: Option<Summary>,
}

#[derive(Debug, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub std: f64,
}

impl Summary {
    fn of(moments: &Moments) -> Option<Self> {
        (moments.count() > 0).then(|| Self {
            count: moments.count(),
            mean: moments.mean(),
            std: moments.variance().sqrt(),
        })
    }
}

/// What a comparison is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Server errors over requests; the difference of the two proportions.
    ErrorRate,
    /// The difference of median latencies, in milliseconds.
    LatencyMs,
    /// The difference of mean predictions.
    Prediction,
    /// Whether the labels are distributed alike (no difference to estimate).
    Label,
    /// The difference of mean outcomes.
    Outcome,
}

/// One variant against the control on one metric.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub variant: String,
    pub metric: Metric,
    pub test: &'static str,
    /// The variant's value minus the control's (error rate, median latency, mean).
    pub difference: Option<f64>,
    pub confidence_interval: Option<[f64; 2]>,
    /// The chi-square statistic and its degrees of freedom, for labels.
    pub statistic: Option<f64>,
    pub degrees_of_freedom: Option<u64>,
    pub p_value: f64,
    pub significant: bool,
}

impl Comparison {
    fn difference(variant: &str, metric: Metric, test: &'static str, d: Difference) -> Self {
        Self {
            variant: variant.to_string(),
            metric,
            test,
            difference: Some(d.estimate),
            confidence_interval: Some([d.low, d.high]),
            statistic: None,
            degrees_of_freedom: None,
            p_value: d.p_value,
            significant: d.p_value < 1.0 - CONFIDENCE,
        }
    }
}

/// `POST /v1/feedback`: the outcome of one `/v1/predict` answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub prediction_id: String,
    /// A number, or a boolean (true counts as 1).
    pub outcome: Value,
}

impl FeedbackRequest {
    /// The outcome as a number, or what is wrong with the request.
    pub fn value(&self) -> Result<f64, String> {
        if self.prediction_id.is_empty() {
            return Err("prediction_id is empty".into());
        }
        match &self.outcome {
            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
            Value::Number(n) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("outcome {n} is not a finite number")),
            other => Err(format!(
                "outcome must be a number or a boolean (true counts as 1), not {other}"
            )),
        }
    }
}

/// What became of an outcome.
#[derive(Debug, Serialize)]
pub struct FeedbackResponse {
    pub prediction_id: String,
    /// Counted in the readout of the variant that answered.
    pub counted: bool,
    /// Handed to the event log as a `prediction.feedback` event.
    pub logged: bool,
    pub model: Option<String>,
    pub variant: Option<String>,
    pub version: Option<u64>,
    /// Why it was not counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The readout of a model's policy over its windows.
pub fn readout(model: &str, policy: &Policy, windows: &BTreeMap<String, Window>) -> Readout {
    let variants = windows
        .iter()
        .map(|(name, w)| {
            let summary = VariantSummary {
                version: policy.version_of(name),
                requests: w.requests,
                server_errors: w.server_errors,
                client_errors: w.client_errors,
                error_rate: w.error_rate(),
                latency_ms: w.quantile_ms(0.5).map(|p50| Quantiles {
                    p50,
                    p95: w.quantile_ms(0.95).unwrap_or(p50),
                    p99: w.quantile_ms(0.99).unwrap_or(p50),
                }),
                prediction: Summary::of(&w.predictions),
                labels: w.labels.clone(),
                outcome: Summary::of(&w.outcomes),
            };
            (name.clone(), summary)
        })
        .collect();
    let mut comparisons = Vec::new();
    if let Some(control) = windows.get(CONTROL) {
        for (name, window) in windows.iter().filter(|(name, _)| *name != CONTROL) {
            comparisons.extend(compare(name, window, control));
        }
    }
    Readout {
        model: model.to_string(),
        policy: policy.clone(),
        confidence: CONFIDENCE,
        significance: 1.0 - CONFIDENCE,
        variants,
        comparisons,
    }
}

/// One variant against the control, on every metric both have data for.
fn compare(name: &str, variant: &Window, control: &Window) -> Vec<Comparison> {
    let mut comparisons = Vec::new();
    if variant.requests > 0 && control.requests > 0 {
        let d = stats::two_proportions(
            variant.server_errors,
            variant.requests,
            control.server_errors,
            control.requests,
            CONFIDENCE,
        );
        comparisons.push(Comparison::difference(
            name,
            Metric::ErrorRate,
            "two-proportion z-test",
            d,
        ));
    }
    if let Some(d) =
        stats::median_difference(&variant.latencies_ms, &control.latencies_ms, CONFIDENCE)
    {
        comparisons.push(Comparison::difference(
            name,
            Metric::LatencyMs,
            "Mann-Whitney U (interval: Price-Bonett, difference of medians)",
            d,
        ));
    }
    if let Some(d) = stats::welch(&variant.predictions, &control.predictions, CONFIDENCE) {
        comparisons.push(Comparison::difference(
            name,
            Metric::Prediction,
            "Welch's t-test",
            d,
        ));
    }
    // A window past its label cap counts new labels under `(other)`: then labels not named
    // on both sides go there on both, so no label is compared with `(other)`.
    let capped =
        variant.labels.contains_key(OTHER_LABEL) || control.labels.contains_key(OTHER_LABEL);
    let label_of = |label: &str| -> String {
        let shared = variant.labels.contains_key(label) && control.labels.contains_key(label);
        if capped && !shared {
            OTHER_LABEL.to_string()
        } else {
            label.to_string()
        }
    };
    let labels: BTreeSet<String> = variant
        .labels
        .keys()
        .chain(control.labels.keys())
        .map(|l| label_of(l))
        .collect();
    let counts = |w: &Window| -> Vec<u64> {
        labels
            .iter()
            .map(|label| {
                w.labels
                    .iter()
                    .filter(|(l, _)| label_of(l) == *label)
                    .map(|(_, n)| n)
                    .sum()
            })
            .collect()
    };
    if let Some((statistic, dof, p_value)) =
        stats::chi_square_homogeneity(&counts(variant), &counts(control))
    {
        comparisons.push(Comparison {
            variant: name.to_string(),
            metric: Metric::Label,
            test: "Pearson's chi-square test of homogeneity",
            difference: None,
            confidence_interval: None,
            statistic: Some(statistic),
            degrees_of_freedom: Some(dof),
            p_value,
            significant: p_value < 1.0 - CONFIDENCE,
        });
    }
    if let Some(d) = stats::welch(&variant.outcomes, &control.outcomes, CONFIDENCE) {
        comparisons.push(Comparison::difference(
            name,
            Metric::Outcome,
            "Welch's t-test",
            d,
        ));
    }
    comparisons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{Share, Split, Variant};

    fn window(requests: u64, labels: &[(&str, u64)], predictions: &[f64]) -> Window {
        let mut window = Window {
            requests,
            labels: labels.iter().map(|(l, n)| (l.to_string(), *n)).collect(),
            ..Window::default()
        };
        predictions.iter().for_each(|&p| window.predictions.push(p));
        window
    }

    #[test]
    fn every_variant_is_compared_with_the_control_on_what_both_have() {
        let policy = Policy {
            control: 1,
            variants: vec![Variant {
                name: "b".into(),
                version: 2,
                share: Share::from_percent(50.0).unwrap(),
            }],
            split: Split::Request,
            salt: String::new(),
            shadow: None,
        };
        let windows = BTreeMap::from([
            (
                CONTROL.to_string(),
                window(100, &[("allow", 30), ("verify", 50), ("block", 20)], &[]),
            ),
            (
                "b".to_string(),
                window(100, &[("allow", 45), ("verify", 40), ("block", 15)], &[1.0]),
            ),
        ]);
        let readout = readout("fraud", &policy, &windows);
        assert_eq!(readout.variants["b"].version, Some(2));
        let metrics: Vec<Metric> = readout.comparisons.iter().map(|c| c.metric).collect();
        // No latencies, and one prediction on one side only: no latency or prediction test.
        assert_eq!(metrics, [Metric::ErrorRate, Metric::Label]);
        let labels = &readout.comparisons[1];
        // scipy.stats.chi2_contingency([[45, 40, 15], [30, 50, 20]]): 4.8254, dof 2, p 0.0896.
        assert!((labels.statistic.unwrap() - 4.825397).abs() < 1e-6);
        assert_eq!(labels.degrees_of_freedom, Some(2));
        assert!(!labels.significant);
    }
}
