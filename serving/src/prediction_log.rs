//! The prediction log as `/v1/predict` writes it: one record per answered instance (sampled by
//! `--prediction-log-sample`), with the values the model actually saw, for monitoring, drift and
//! retraining. Building a record is the only work on the request path; the event log
//! (`marquee-events`) takes it from there and never makes a prediction wait.
//!
//! Record fields (JSON on Kafka, columns in the Parquet files): `prediction_id`, `model`,
//! `version`, `variant` (null without a traffic policy; `shadow` for mirrored requests),
//! `entities`, `features` (merged request + store + defaults; a cached answer carries the
//! request's own), `prediction`, `label`, `cache_hit`, `degraded`, `latency_ms`, `timestamp`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use marquee_events::{EventLog, Features, PredictionFields, Record, now_ms};
use marquee_feature_store::FeatureValue;
use serde_json::Value;

use crate::predict::{Instance, Prediction};

pub struct PredictionLog {
    events: EventLog,
    /// Share of requests logged, in (0, 1].
    sample: f64,
    /// Requests seen, clients' and mirrored ones apart, so each is sampled at its share.
    requests: AtomicU64,
    mirrored: AtomicU64,
}

impl PredictionLog {
    pub fn new(events: EventLog, sample: f64) -> Self {
        Self {
            events,
            sample: sample.clamp(0.0, 1.0),
            requests: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
        }
    }

    /// The event log domain events share with predictions.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Whether this request is logged: exactly `sample` of all requests (and of all mirrored
    /// ones), spread evenly (the n-th is logged when n × sample passes a whole number).
    pub fn sampled(&self, mirrored: bool) -> bool {
        let counter = if mirrored {
            &self.mirrored
        } else {
            &self.requests
        };
        self.sample >= 1.0 || takes(counter.fetch_add(1, Ordering::Relaxed), self.sample)
    }

    /// Logs one request's answers, instance by instance (their entities and request features
    /// move into the records).
    pub fn predictions(
        &self,
        answered: Answered<'_>,
        instances: Vec<Instance>,
        predictions: &[Prediction],
    ) {
        let time_ms = now_ms();
        for (instance, prediction) in instances.into_iter().zip(predictions) {
            let features = match &prediction.inputs {
                Some(values) => Features::Named {
                    names: answered.feature_names.clone(),
                    values: values.iter().map(FeatureValue::to_json).collect(),
                },
                None => Features::Json(instance.features),
            };
            let fields = PredictionFields {
                cache_hit: prediction.cache_hit,
                degraded: prediction.degraded.clone(),
                entities: instance.entities,
                features,
                label: prediction.label.clone(),
                latency_ms: answered.latency_ms,
                model: answered.model.to_string(),
                prediction: prediction.prediction.clone().unwrap_or(Value::Null),
                prediction_id: prediction.prediction_id.clone(),
                variant: answered.variant.map(str::to_string),
                version: answered.version,
            };
            self.events
                .log(Record::prediction(answered.model, time_ms, fields));
        }
    }
}

/// Whether the n-th request (from 0) is among a `sample` share spread evenly.
fn takes(n: u64, sample: f64) -> bool {
    let n = n as f64;
    ((n + 1.0) * sample).floor() > (n * sample).floor()
}

/// Who answered a request, and how fast.
#[derive(Clone, Copy)]
pub struct Answered<'a> {
    pub model: &'a str,
    pub version: u64,
    pub variant: Option<&'a str>,
    /// The pipeline's features, in the order of each prediction's `inputs`.
    pub feature_names: &'a Arc<[String]>,
    pub latency_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_takes_exactly_its_share() {
        for (sample, expected) in [(1.0, 1000), (0.25, 250), (0.1, 100), (0.0, 0)] {
            let taken = (0..1000).filter(|&n| takes(n, sample)).count();
            assert_eq!(taken, expected, "sample {sample}");
        }
    }
}
