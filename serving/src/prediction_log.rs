//! The prediction log: one record per answered `/v1/predict` instance (sampled by
//! `--prediction-log-sample`), with the values the model actually saw, for monitoring, drift and
//! retraining. Building a record is the only work on the request path; the event log
//! (`marquee-events`) takes it from there and never makes a prediction wait.
//!
//! Record fields (JSON on Kafka, columns in the Parquet files): `prediction_id`, `model`,
//! `version`, `variant` (null without a traffic policy; `shadow` for mirrored requests),
//! `entities`, `features` (merged request + store + defaults; a cached answer carries the
//! request's own), `prediction`, `label`, `cache_hit`, `degraded`, `latency_ms`, `timestamp`.
//!
//! A `/v2` inference (REST or gRPC) is logged too, sampled the same way, as one record per
//! request on its own stream (`inferences`: its tensors are not named features, so its columns
//! differ): `prediction_id` (new), `request_id` (the client's `id`, or null), `model`, `version`,
//! `variant`, `inputs` and `outputs` (each `{name: {datatype, shape, data}}` as the v2 REST
//! protocol writes tensors; `data` is null for a tensor over [`LOGGED_ELEMENTS`] elements, so one
//! large request cannot swamp the log), `latency_ms`, `timestamp`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use marquee_events::{EventLog, Features, PredictionFields, Record, now_ms};
use marquee_feature_store::FeatureValue;
use serde_json::{Map, Value, json};

use crate::predict::{Instance, Prediction, new_id};
use crate::tensor::Tensor;

/// Most elements of one tensor an inference record carries the data of.
pub const LOGGED_ELEMENTS: usize = 4096;

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

    /// Logs one answered `/v2` inference.
    pub fn inference(
        &self,
        answered: &InferenceAnswered<'_>,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        let mut fields = Map::new();
        fields.insert("prediction_id".into(), new_id().into());
        fields.insert(
            "request_id".into(),
            Some(answered.request_id).filter(|id| !id.is_empty()).into(),
        );
        fields.insert("model".into(), answered.model.into());
        fields.insert("version".into(), answered.version.into());
        fields.insert("variant".into(), answered.variant.into());
        fields.insert("inputs".into(), tensors_json(inputs));
        fields.insert("outputs".into(), tensors_json(outputs));
        fields.insert("latency_ms".into(), answered.latency_ms.into());
        self.events
            .log(Record::inference(answered.model, now_ms(), fields));
    }
}

/// Who answered a `/v2` inference, and how fast.
pub struct InferenceAnswered<'a> {
    pub model: &'a str,
    pub version: u64,
    pub variant: Option<&'a str>,
    /// The client's `id`; empty when it sent none.
    pub request_id: &'a str,
    pub latency_ms: f64,
}

/// Tensors as `{name: {datatype, shape, data}}`, data only up to [`LOGGED_ELEMENTS`].
fn tensors_json(tensors: &[Tensor]) -> Value {
    let mut object = Map::new();
    for tensor in tensors {
        // Through the text the v2 REST protocol writes: a value built directly would widen each
        // FP32 to the f64 digits of its binary value (0.2615099251270294 for 0.26150993).
        let data = (tensor.len() <= LOGGED_ELEMENTS)
            .then(|| serde_json::to_string(&tensor.json_data()).ok())
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null);
        object.insert(
            tensor.name.clone(),
            json!({"datatype": tensor.dtype.name(), "shape": tensor.shape, "data": data}),
        );
    }
    Value::Object(object)
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
    fn inference_tensors_carry_their_data_up_to_the_bound() {
        use crate::tensor::{DataType, TensorData};
        let tensor = |name: &str, rows: usize| {
            let bytes: Vec<u8> = (0..rows * 4)
                .flat_map(|i| (i as i32).to_le_bytes())
                .collect();
            let data = TensorData::Fixed(bytes.into());
            Tensor::new(name, DataType::Int32, vec![rows as i64, 4], data).unwrap()
        };
        let small = tensor("small", 2);
        let large = tensor("large", LOGGED_ELEMENTS / 4 + 1);
        let text = Tensor::new(
            "text",
            DataType::Bytes,
            vec![1],
            TensorData::Strings(vec![bytes::Bytes::from_static(b"two tickets")]),
        )
        .unwrap();
        let json = tensors_json(&[small, large, text]);
        assert_eq!(
            json["small"],
            serde_json::json!({"datatype": "INT32", "shape": [2, 4], "data": [0, 1, 2, 3, 4, 5, 6, 7]})
        );
        assert_eq!(
            json["large"]["shape"],
            serde_json::json!([LOGGED_ELEMENTS / 4 + 1, 4])
        );
        assert_eq!(
            json["large"]["data"],
            Value::Null,
            "over the bound: shape only"
        );
        assert_eq!(json["text"]["data"], serde_json::json!(["two tickets"]));
    }

    #[test]
    fn sampling_takes_exactly_its_share() {
        for (sample, expected) in [(1.0, 1000), (0.25, 250), (0.1, 100), (0.0, 0)] {
            let taken = (0..1000).filter(|&n| takes(n, sample)).count();
            assert_eq!(taken, expected, "sample {sample}");
        }
    }
}
