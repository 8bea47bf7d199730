//! The prediction log as `/v1/predict` writes it: one record per answered instance (sampled by
//! `--prediction-log-sample`), with the values the model actually saw, for monitoring, drift and
//! retraining. Building a record is the only work on the request path; the event log
//! (`marquee-events`) takes it from there and never makes a prediction wait.
//!
//! Record fields (JSON on Kafka, columns in the Parquet files): `prediction_id`, `model`,
//! `version`, `variant` (null without a traffic policy; `shadow` for mirrored requests),
//! `entities`, `features` (merged request + store + defaults; a cached answer carries the
//! request's own), `prediction`, `label`, `cache_hit`, `degraded`, `latency_ms`, `timestamp`.

use std::sync::atomic::{AtomicU64, Ordering};

use marquee_events::{EventLog, Record, now_ms};
use serde_json::{Map, Value};

use crate::predict::pipeline::Pipeline;
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

    /// Logs one request's answers, instance by instance.
    pub fn predictions(
        &self,
        answered: Answered<'_>,
        instances: &[Instance],
        predictions: &[Prediction],
    ) {
        let time_ms = now_ms();
        for (instance, prediction) in instances.iter().zip(predictions) {
            let features = match &prediction.inputs {
                Some(values) => answered
                    .pipeline
                    .features
                    .iter()
                    .zip(values)
                    .map(|(feature, value)| (feature.name.clone(), value.to_json()))
                    .collect(),
                None => instance.features.clone(),
            };
            let mut fields = Map::new();
            fields.insert(
                "prediction_id".into(),
                prediction.prediction_id.clone().into(),
            );
            fields.insert("model".into(), answered.model.into());
            fields.insert("version".into(), answered.version.into());
            fields.insert(
                "variant".into(),
                answered.variant.map_or(Value::Null, Value::from),
            );
            fields.insert("entities".into(), Value::Object(instance.entities.clone()));
            fields.insert("features".into(), Value::Object(features));
            fields.insert(
                "prediction".into(),
                prediction.prediction.clone().unwrap_or(Value::Null),
            );
            fields.insert(
                "label".into(),
                prediction.label.clone().map_or(Value::Null, Value::from),
            );
            fields.insert("cache_hit".into(), prediction.cache_hit.into());
            fields.insert(
                "degraded".into(),
                Value::from(
                    prediction
                        .degraded
                        .iter()
                        .map(|d| Value::from(*d))
                        .collect::<Vec<_>>(),
                ),
            );
            fields.insert("latency_ms".into(), answered.latency_ms.into());
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
    pub pipeline: &'a Pipeline,
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
