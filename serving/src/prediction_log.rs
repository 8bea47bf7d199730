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
//! An answered `/v2` inference (REST or gRPC) is logged too, sampled apart by
//! `--inference-log-sample`, as one record per request on its own stream (`inferences`: its
//! tensors are not named features, so its columns differ): `prediction_id` (new, for
//! deduplication), `request_id` (the client's `id`, or null), `model`, `version`, `variant`,
//! `inputs` and `outputs` (each `{name: {data, datatype, shape}}` as the v2 REST protocol writes
//! tensors, written as JSON text once, here), `latency_ms`, `timestamp`. A record carries at most
//! [`LOGGED_BYTES`] of tensor data (BYTES counted as their JSON text), inputs first: a tensor past
//! what is left (and a BYTES tensor that is not UTF-8) is logged with `data` null, so a large
//! request cannot swamp the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use marquee_events::{
    EventLog, Features, InferenceFields, PredictionFields, RawValue, Record, now_ms,
};
use marquee_feature_store::FeatureValue;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::predict::{Instance, Prediction, new_id};
use crate::tensor::{Tensor, TensorData};

/// Most bytes of tensor data one inference record carries (as the tensors hold them; BYTES as
/// their JSON text).
pub const LOGGED_BYTES: usize = 16 * 1024;

pub struct PredictionLog {
    events: EventLog,
    /// Clients' `/v1/predict` requests, mirrored ones and `/v2` inferences apart, so each is
    /// sampled at its own share.
    requests: Sampler,
    mirrored: Sampler,
    inferences: Sampler,
}

/// Takes exactly `share` of what it is asked about, spread evenly (the n-th is taken when
/// n × share passes a whole number).
struct Sampler {
    share: f64,
    seen: AtomicU64,
}

impl Sampler {
    fn new(share: f64) -> Self {
        Self {
            share: share.clamp(0.0, 1.0),
            seen: AtomicU64::new(0),
        }
    }

    fn take(&self) -> bool {
        self.share >= 1.0
            || (self.share > 0.0 && takes(self.seen.fetch_add(1, Ordering::Relaxed), self.share))
    }
}

impl PredictionLog {
    pub fn new(events: EventLog, sample: f64, inference_sample: f64) -> Self {
        Self {
            events,
            requests: Sampler::new(sample),
            mirrored: Sampler::new(sample),
            inferences: Sampler::new(inference_sample),
        }
    }

    /// The event log domain events share with predictions.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Whether this `/v1/predict` request is logged: exactly `sample` of all requests (and of
    /// all mirrored ones), spread evenly.
    pub fn sampled(&self, mirrored: bool) -> bool {
        if mirrored {
            self.mirrored.take()
        } else {
            self.requests.take()
        }
    }

    /// Whether this `/v2` inference is logged once answered: exactly `inference_sample` of all.
    pub fn inference_sampled(&self) -> bool {
        self.inferences.take()
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
        let mut budget = LOGGED_BYTES;
        let fields = InferenceFields {
            inputs: tensors_json(inputs, &mut budget),
            latency_ms: answered.latency_ms,
            model: answered.model.to_string(),
            outputs: tensors_json(outputs, &mut budget),
            prediction_id: new_id(),
            request_id: Some(answered.request_id)
                .filter(|id| !id.is_empty())
                .map(str::to_string),
            variant: answered.variant.map(str::to_string),
            version: answered.version,
        };
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

/// Tensors as the JSON text `{name: {"data", "datatype", "shape"}}` (names and keys sorted, as
/// a JSON object read back from the spill holds them), with the data of those whose cost fits in
/// what is left of `budget` (taken from it in turn) and that can be JSON (BYTES must be UTF-8).
fn tensors_json(tensors: &[Tensor], budget: &mut usize) -> Box<RawValue> {
    let mut logged: Vec<LoggedTensor<'_>> = tensors
        .iter()
        .map(|tensor| {
            let cost = data_cost(tensor, *budget).filter(|cost| *cost <= *budget);
            if let Some(cost) = cost {
                *budget -= cost;
            }
            LoggedTensor {
                tensor,
                with_data: cost.is_some(),
            }
        })
        .collect();
    logged.sort_unstable_by_key(|logged| logged.tensor.name.as_str());
    match serde_json::value::to_raw_value(&LoggedTensors(&logged)) {
        Ok(json) => json,
        Err(error) => {
            // Unreachable while data_cost refuses what cannot be JSON; shapes only, then.
            tracing::warn!(%error, "an inference's tensors could not be logged as JSON");
            logged
                .iter_mut()
                .for_each(|logged| logged.with_data = false);
            serde_json::value::to_raw_value(&LoggedTensors(&logged))
                .expect("names, types and shapes are JSON")
        }
    }
}

/// What logging a tensor's data costs of the budget: its bytes as the tensor holds them, and for
/// BYTES what each element costs as JSON text (quotes, separator, escapes: a control byte is six
/// characters); `None` when it cannot be JSON (BYTES that are not UTF-8). Past `budget` already
/// by its cheapest reading, it is not read further.
fn data_cost(tensor: &Tensor, budget: usize) -> Option<usize> {
    let items = match &tensor.data {
        TensorData::Fixed(bytes) => return Some(bytes.len()),
        TensorData::Strings(items) => items,
    };
    let floor: usize = items.iter().map(|item| item.len() + 3).sum();
    if floor > budget {
        return Some(floor);
    }
    let mut cost = 0;
    for item in items {
        std::str::from_utf8(item).ok()?;
        cost += 3 + item
            .iter()
            .map(|&byte| match byte {
                b'"' | b'\\' => 2,
                0..0x20 => 6,
                _ => 1,
            })
            .sum::<usize>();
    }
    Some(cost)
}

struct LoggedTensors<'a>(&'a [LoggedTensor<'a>]);

struct LoggedTensor<'a> {
    tensor: &'a Tensor,
    with_data: bool,
}

impl Serialize for LoggedTensors<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for logged in self.0 {
            map.serialize_entry(&logged.tensor.name, logged)?;
        }
        map.end()
    }
}

impl Serialize for LoggedTensor<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tensor = self.tensor;
        let mut map = serializer.serialize_map(Some(3))?;
        if self.with_data {
            map.serialize_entry("data", &tensor.json_data())?;
        } else {
            map.serialize_entry("data", &())?;
        }
        map.serialize_entry("datatype", tensor.dtype.name())?;
        map.serialize_entry("shape", &tensor.shape)?;
        map.end()
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
    fn inference_tensors_carry_their_data_within_the_budget() {
        use crate::tensor::DataType;
        let ints = |name: &str, rows: usize| {
            let bytes: Vec<u8> = (0..rows * 4)
                .flat_map(|i| (i as i32).to_le_bytes())
                .collect();
            let data = TensorData::Fixed(bytes.into());
            Tensor::new(name, DataType::Int32, vec![rows as i64, 4], data).unwrap()
        };
        let texts = |name: &str, item: &'static [u8]| {
            let data = TensorData::Strings(vec![bytes::Bytes::from_static(item)]);
            Tensor::new(name, DataType::Bytes, vec![1], data).unwrap()
        };
        let fp32 = Tensor::new(
            "score",
            DataType::Fp32,
            vec![1],
            TensorData::Fixed(0.26150993f32.to_le_bytes().to_vec().into()),
        )
        .unwrap();
        let mut budget = LOGGED_BYTES;
        let inputs = [
            ints("small", 2),
            texts("text", b"two tickets"),
            texts("raw", b"\xff\xfe"),
        ];
        let json = tensors_json(&inputs, &mut budget);
        assert!(
            json.get().starts_with(r#"{"raw":{"data":null,"#),
            "sorted: {}",
            json.get()
        );
        let json: Value = serde_json::from_str(json.get()).unwrap();
        assert_eq!(
            json["small"],
            serde_json::json!({"datatype": "INT32", "shape": [2, 4], "data": [0, 1, 2, 3, 4, 5, 6, 7]})
        );
        assert_eq!(json["text"]["data"], serde_json::json!(["two tickets"]));
        assert_eq!(
            json["raw"]["data"],
            Value::Null,
            "not UTF-8: shape and type only"
        );
        assert_eq!(
            budget,
            LOGGED_BYTES - 32 - (11 + 3),
            "BYTES as their JSON text"
        );
        // Empty strings still cost their quotes: many of them are no free ride.
        let empties = Tensor::new(
            "empties",
            DataType::Bytes,
            vec![LOGGED_BYTES as i64],
            TensorData::Strings(vec![bytes::Bytes::new(); LOGGED_BYTES]),
        )
        .unwrap();
        let escaped = texts("escaped", b"\x01\"");
        assert_eq!(data_cost(&escaped, LOGGED_BYTES), Some(3 + 6 + 2));
        let mut fresh = LOGGED_BYTES;
        let json = tensors_json(&[empties], &mut fresh);
        let json: Value = serde_json::from_str(json.get()).unwrap();
        assert_eq!(json["empties"]["data"], Value::Null);
        assert_eq!(fresh, LOGGED_BYTES);
        // The outputs get what the inputs left: a tensor past it is logged without its data.
        let rows = budget / 16 + 1;
        let large = ints("large", rows);
        let json = tensors_json(&[large, fp32], &mut budget);
        assert!(
            json.get().contains(r#""data":[0.26150993]"#),
            "FP32 as written: {}",
            json.get()
        );
        let json: Value = serde_json::from_str(json.get()).unwrap();
        assert_eq!(json["large"]["data"], Value::Null);
        assert_eq!(json["large"]["shape"][0], serde_json::json!(rows));
    }

    #[test]
    fn each_sampler_takes_its_own_share() {
        let none = Sampler::new(0.0);
        assert!((0..100).all(|_| !none.take()));
        assert_eq!(
            none.seen.load(Ordering::Relaxed),
            0,
            "a share of 0 counts nothing"
        );
        let half = Sampler::new(0.5);
        assert_eq!((0..1000).filter(|_| half.take()).count(), 500);
        assert!((0..100).all(|_| Sampler::new(1.0).take()));
    }

    #[test]
    fn sampling_takes_exactly_its_share() {
        for (sample, expected) in [(1.0, 1000), (0.25, 250), (0.1, 100), (0.0, 0)] {
            let taken = (0..1000).filter(|&n| takes(n, sample)).count();
            assert_eq!(taken, expected, "sample {sample}");
        }
    }
}
