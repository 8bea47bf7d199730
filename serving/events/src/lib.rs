//! The prediction log and domain events. Every prediction the server answers, and every event the
//! platform raises (`model.deployed`, `drift.detected`, the booking core's `booking.*`), is a
//! [`Record`] handed to one [`EventLog`]. The log never slows or fails its caller: records wait in
//! a bounded buffer, a writer task hands them to the [`Sink`] (Kafka, or Parquet files by hour),
//! and whatever the sink cannot take (down, slow, refusing) goes to a spill folder on local disk
//! and is replayed when the sink takes records again. Nothing here knows about HTTP or models.
//!
//! Delivery is at least once: a record a sink half-accepted before failing may arrive twice, and
//! records replayed from the spill arrive after newer ones.

mod background;
mod kafka;
mod log;
mod parquet_sink;
mod spill;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use kafka::{KafkaConfig, KafkaEventSource, KafkaSink, event_record};
pub use log::{EventLog, LogConfig, LogStats};
pub use parquet_sink::ParquetSink;
pub use serde_json::value::RawValue;

/// Which stream a record belongs to; it names the record's topic and folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stream", rename_all = "snake_case")]
pub enum Stream {
    /// One prediction of one model (its key is the model's name).
    Prediction,
    /// One `/v2` inference request of one model, its tensors as they came and went (its key is
    /// the model's name).
    Inference,
    /// A domain event such as `model.rolled_back` or `booking.created`.
    Event { kind: String },
}

/// One thing to log: a prediction, an inference or an event, with its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub stream: Stream,
    /// The Kafka message key: the model for predictions and inferences, the event's subject for
    /// events.
    pub key: String,
    /// When it happened, in ms since the epoch.
    pub time_ms: i64,
    pub fields: Fields,
}

/// A record's fields: JSON for events (and for any record read back from the spill); typed for a
/// prediction or an inference as serving hands it over, so that logging one builds no map and
/// leaves a handful of allocations to free, not one per field. Each encodes as the same JSON
/// object as its JSON form.
#[derive(Debug, Clone, PartialEq)]
pub enum Fields {
    Json(Map<String, Value>),
    Prediction(Box<PredictionFields>),
    Inference(Box<InferenceFields>),
}

impl From<Map<String, Value>> for Fields {
    fn from(fields: Map<String, Value>) -> Self {
        Fields::Json(fields)
    }
}

impl From<PredictionFields> for Fields {
    fn from(fields: PredictionFields) -> Self {
        Fields::Prediction(Box::new(fields))
    }
}

impl From<InferenceFields> for Fields {
    fn from(fields: InferenceFields) -> Self {
        Fields::Inference(Box::new(fields))
    }
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Fields::Json(fields) => fields.serialize(serializer),
            Fields::Prediction(fields) => fields.serialize(serializer),
            Fields::Inference(fields) => fields.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Fields::Json)
    }
}

/// The prediction log's fields (serving's `prediction_log.rs` says what each holds), in the
/// order a JSON object's keys sort: a prediction read back from the spill writes the same
/// columns, of the same types, in the same order (features too are written sorted by name).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictionFields {
    pub cache_hit: bool,
    pub degraded: Vec<&'static str>,
    pub entities: Map<String, Value>,
    pub features: Features,
    pub label: Option<String>,
    pub latency_ms: f64,
    pub model: String,
    pub prediction: Value,
    pub prediction_id: String,
    pub variant: Option<String>,
    pub version: u64,
}

impl PredictionFields {
    /// The names of the fields other than `entities` and `features`.
    pub const SCALARS: [&'static str; 9] = [
        "cache_hit",
        "degraded",
        "label",
        "latency_ms",
        "model",
        "prediction",
        "prediction_id",
        "variant",
        "version",
    ];
}

/// The inference log's fields (serving's `prediction_log.rs` says what each holds), in the order
/// a JSON object's keys sort, as [`PredictionFields`]. The tensors are JSON text already (an
/// object by tensor name, keys sorted), written once on the request path and kept compact.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceFields {
    pub inputs: Box<RawValue>,
    pub latency_ms: f64,
    pub model: String,
    pub outputs: Box<RawValue>,
    pub prediction_id: String,
    pub request_id: Option<String>,
    pub variant: Option<String>,
    pub version: u64,
}

impl PartialEq for InferenceFields {
    fn eq(&self, other: &Self) -> bool {
        self.inputs.get() == other.inputs.get()
            && self.latency_ms == other.latency_ms
            && self.model == other.model
            && self.outputs.get() == other.outputs.get()
            && self.prediction_id == other.prediction_id
            && self.request_id == other.request_id
            && self.variant == other.variant
            && self.version == other.version
    }
}

/// The features a prediction saw: one value per name, the names shared by every record of a
/// pipeline (computed answers), or the request's own object (cached answers).
#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    Named {
        names: Arc<[String]>,
        values: Vec<Value>,
    },
    Json(Map<String, Value>),
}

impl Features {
    /// The features as (name, value) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &Value)> {
        let (named, json) = match self {
            Features::Named { names, values } => (Some(names.iter().zip(values)), None),
            Features::Json(fields) => (None, Some(fields.iter())),
        };
        let named = named
            .into_iter()
            .flatten()
            .map(|(name, value)| (name.as_str(), value));
        let json = json
            .into_iter()
            .flatten()
            .map(|(name, value)| (name.as_str(), value));
        named.chain(json)
    }
}

impl Serialize for Features {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.pairs())
    }
}

impl Record {
    /// A prediction of `model`, with the prediction log's fields.
    pub fn prediction(model: &str, time_ms: i64, fields: impl Into<Fields>) -> Self {
        Self {
            stream: Stream::Prediction,
            key: model.to_string(),
            time_ms,
            fields: fields.into(),
        }
    }

    /// A `/v2` inference of `model`, with the inference log's fields.
    pub fn inference(model: &str, time_ms: i64, fields: impl Into<Fields>) -> Self {
        Self {
            stream: Stream::Inference,
            key: model.to_string(),
            time_ms,
            fields: fields.into(),
        }
    }

    /// A domain event of `kind` (e.g. `model.deployed`) about `key` (e.g. the model).
    pub fn event(kind: &str, key: &str, time_ms: i64, mut fields: Map<String, Value>) -> Self {
        fields.insert("kind".into(), kind.into());
        Self {
            stream: Stream::Event {
                kind: kind.to_string(),
            },
            key: key.to_string(),
            time_ms,
            fields: Fields::Json(fields),
        }
    }

    /// The record's topic, before the deployment's prefix: `predictions`, `inferences`, or
    /// `events.` and the event kind's family (`events.model` for `model.deployed`).
    pub fn topic(&self) -> String {
        topic_of(self.family())
    }

    /// What names the topic, without building its name.
    fn family(&self) -> Family<'_> {
        match &self.stream {
            Stream::Prediction => Family::Predictions,
            Stream::Inference => Family::Inferences,
            Stream::Event { kind } => Family::Event(kind.split('.').next().unwrap_or(kind)),
        }
    }

    /// What a consumer reads, as JSON: the fields and the time as RFC 3339 (`timestamp`, in
    /// place of a field of that name), encoded without a copy of the fields.
    pub fn body_json(&self) -> Vec<u8> {
        let timestamp = rfc3339(self.time_ms);
        let encoded = match &self.fields {
            Fields::Json(fields) => serde_json::to_vec(&JsonBody(fields, Value::String(timestamp))),
            Fields::Prediction(fields) => serde_json::to_vec(&TypedBody { fields, timestamp }),
            Fields::Inference(fields) => serde_json::to_vec(&TypedBody { fields, timestamp }),
        };
        encoded.expect("records encode as JSON")
    }
}

/// JSON fields and the record's `timestamp` in place of a field of that name.
struct JsonBody<'a>(&'a Map<String, Value>, Value);

impl Serialize for JsonBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.0.iter().filter(|(name, _)| *name != "timestamp");
        serializer.collect_map(
            fields
                .map(|(name, value)| (name.as_str(), value))
                .chain(std::iter::once(("timestamp", &self.1))),
        )
    }
}

/// Typed fields and the record's `timestamp`.
#[derive(Serialize)]
struct TypedBody<'a, F: Serialize> {
    #[serde(flatten)]
    fields: &'a F,
    timestamp: String,
}

/// What a record's topic is named after: its stream, and an event's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family<'a> {
    Predictions,
    Inferences,
    Event(&'a str),
}

/// The topic of records of a `family`.
fn topic_of(family: Family<'_>) -> String {
    match family {
        Family::Predictions => "predictions".into(),
        Family::Inferences => "inferences".into(),
        Family::Event(family) => format!("events.{family}"),
    }
}

/// Milliseconds since the epoch as RFC 3339 with milliseconds, UTC.
pub fn rfc3339(time_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// The time now in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where records end up. A sink may take a batch in part: it names the records it could not take
/// and the log spills those (and only those).
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// For metrics and logs: `kafka`, `parquet`.
    fn name(&self) -> &'static str;

    /// Takes `records` (shared, so a sink that works on another thread keeps them without a
    /// copy), or names those it could not take.
    async fn write(&self, records: Arc<Vec<Record>>) -> Result<(), SinkFailure>;

    /// Most records one write should carry, when the sink wants fewer than the log's batch. It
    /// also bounds the spill's segments, as each replays as one write (a segment an earlier
    /// process spilled with a larger batch still replays whole).
    fn most_per_write(&self) -> Option<usize> {
        None
    }

    /// Makes everything written so far readable (Parquet closes its open files; Kafka waits for
    /// the broker's acknowledgements).
    async fn flush(&self) -> Result<(), EventError>;
}

/// The records of a batch a sink could not take, by position, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkFailure {
    /// Not taken this time: spilled and tried again.
    pub failed: Vec<usize>,
    /// Refused for good (a record the sink can never take, e.g. past Kafka's message size):
    /// dropped and counted, so it cannot hold up the records behind it.
    pub rejected: Vec<usize>,
    pub reason: String,
}

impl SinkFailure {
    /// Every record of a batch of `len` failed for `reason`.
    pub fn all(len: usize, reason: impl Into<String>) -> Self {
        Self {
            failed: (0..len).collect(),
            rejected: Vec::new(),
            reason: reason.into(),
        }
    }

    /// Every record of a batch of `len` refused for good: the sink broke on it (a panic), and
    /// trying it again would break it again.
    pub fn refused(len: usize, reason: impl Into<String>) -> Self {
        Self {
            failed: Vec::new(),
            rejected: (0..len).collect(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event sink configuration: {0}")]
    Config(String),
    #[error("event spill folder {path}: {source}")]
    Spill {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("parquet event files: {0}")]
    Parquet(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topics_follow_the_stream_and_the_event_family() {
        let prediction = Record::prediction("fraud", 0, Map::new());
        assert_eq!(prediction.topic(), "predictions");
        assert_eq!(
            Record::inference("fraud", 0, Map::new()).topic(),
            "inferences"
        );
        let event = Record::event("model.rolled_back", "fraud", 0, Map::new());
        assert_eq!(event.topic(), "events.model");
        let Fields::Json(fields) = &event.fields else {
            panic!("events carry JSON fields");
        };
        assert_eq!(fields["kind"], json!("model.rolled_back"));
    }

    #[test]
    fn records_survive_their_spill_encoding() {
        let mut fields = Map::new();
        fields.insert("score".into(), json!(0.25));
        let record = Record::event("drift.detected", "pricing", 1_767_225_600_000, fields);
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), record);
        let body: Value = serde_json::from_slice(&record.body_json()).unwrap();
        assert_eq!(body["timestamp"], json!("2026-01-01T00:00:00.000Z"));
        assert_eq!(body["score"], json!(0.25));
        let inference = Record::inference("gbr", 1_767_225_600_000, inference_fields());
        let line = serde_json::to_string(&inference).unwrap();
        let replayed = serde_json::from_str::<Record>(&line).unwrap();
        assert_eq!(replayed.stream, Stream::Inference);
        let Fields::Json(fields) = &replayed.fields else {
            panic!("the spill gives JSON back");
        };
        assert_eq!(fields["inputs"]["X"]["data"], json!([0.26150993, 8.5]));
        assert_eq!(fields["request_id"], Value::Null);
        assert_eq!(
            serde_json::from_slice::<Value>(&inference.body_json()).unwrap(),
            serde_json::from_slice::<Value>(&replayed.body_json()).unwrap(),
            "the same body typed and replayed"
        );
    }

    /// An inference as serving logs it.
    pub(crate) fn inference_fields() -> InferenceFields {
        let raw = |text: &str| RawValue::from_string(text.to_string()).unwrap();
        InferenceFields {
            inputs: raw(r#"{"X":{"data":[0.26150993,8.5],"datatype":"FP32","shape":[1,2]}}"#),
            latency_ms: 0.5,
            model: "gbr".into(),
            outputs: raw(r#"{"variable":{"data":[1.25],"datatype":"FP32","shape":[1,1]}}"#),
            prediction_id: "p-1".into(),
            request_id: None,
            variant: Some("b".into()),
            version: 2,
        }
    }
}
