//! Kafka, through librdkafka (`rdkafka`): the sink for the prediction log and events, and the
//! source the feature store's streaming aggregates count from. Nothing here assumes a particular
//! broker: the same settings work on Apache Kafka, Redpanda or tansu, and any librdkafka
//! property (security, acks, compression) passes through `options`.
//!
//! Topics are `PREFIX` + `predictions` and `PREFIX` + `events.FAMILY` (one per event family:
//! `events.model`, `events.booking`, …), keyed by model (predictions) or by the event's subject;
//! a message's value is the record's JSON body and its timestamp the record's time. Missing topics
//! are created (when allowed) before the first write and again after a failed one: a broker that
//! lost its topics gets them back when it returns.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use marquee_feature_store::{Event, EventSource};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde_json::{Map, Value};

use crate::background::Background;
use crate::{EventError, Record, Sink, SinkFailure, topic_of};

/// Where the brokers are and how topics are named and made.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Put before every topic name, e.g. `marquee.`.
    pub topic_prefix: String,
    /// Partitions and replication factor of topics the sink creates.
    pub partitions: i32,
    pub replication: i32,
    /// Create missing topics (off where topics are managed elsewhere).
    pub create_topics: bool,
    /// librdkafka properties, applied after Marquee's own (so they win).
    pub options: Vec<(String, String)>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "marquee.".into(),
            partitions: 3,
            replication: 1,
            create_topics: true,
            options: Vec::new(),
        }
    }

    /// The full name of a record's topic.
    pub fn topic(&self, relative: &str) -> String {
        format!("{}{relative}", self.topic_prefix)
    }

    fn client(&self, own: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in own {
            config.set(*key, *value);
        }
        for (key, value) in &self.options {
            config.set(key, value);
        }
        config
    }
}

fn kafka_error(e: impl std::fmt::Display) -> EventError {
    EventError::Kafka(e.to_string())
}

pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    config: KafkaConfig,
    /// Topics known to exist since the last failure.
    ensured: Mutex<HashSet<String>>,
    /// Where records are encoded and handed to librdkafka (see `background.rs`).
    background: Background,
}

impl KafkaSink {
    pub fn new(config: KafkaConfig) -> Result<Self, EventError> {
        // A delivery that cannot happen fails within seconds (librdkafka would retry for five
        // minutes), so its records reach the spill instead of waiting in librdkafka's queue.
        let producer = config
            .client(&[
                ("message.timeout.ms", "5000"),
                ("linger.ms", "5"),
                ("acks", "all"),
            ])
            .create()
            .map_err(kafka_error)?;
        let admin = config.client(&[]).create().map_err(kafka_error)?;
        Ok(Self {
            producer,
            admin,
            config,
            ensured: Mutex::new(HashSet::new()),
            background: Background::spawn("kafka-sink")?,
        })
    }

    async fn ensure_topics(&self, topics: &[String]) {
        let missing: Vec<String> = {
            let ensured = self.ensured.lock().unwrap_or_else(|p| p.into_inner());
            topics
                .iter()
                .filter(|t| !ensured.contains(*t))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(5)))
            .operation_timeout(Some(Duration::from_secs(5)));
        match self.admin.create_topics(&new, &options).await {
            Ok(results) => {
                let mut ensured = self.ensured.lock().unwrap_or_else(|p| p.into_inner());
                for result in results {
                    match result {
                        Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            ensured.insert(topic);
                        }
                        Err((topic, code)) => {
                            tracing::warn!(topic, error = %code, "kafka topic not created");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "kafka topics not created"),
        }
    }
}

/// Whether the broker (or librdkafka) will never take this record, however often it is sent.
fn refused_for_good(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn write(&self, records: Arc<Vec<Record>>) -> Result<(), SinkFailure> {
        // Each record's topic, by its place in `topics`.
        let mut families = Vec::new();
        let topic_of_record: Vec<usize> = records
            .iter()
            .map(|record| {
                let family = record.family();
                families
                    .iter()
                    .position(|f| *f == family)
                    .unwrap_or_else(|| {
                        families.push(family);
                        families.len() - 1
                    })
            })
            .collect();
        let topics: Vec<String> = families
            .into_iter()
            .map(|family| self.config.topic(&topic_of(family)))
            .collect();
        if self.config.create_topics {
            self.ensure_topics(&topics).await;
        }
        let producer = self.producer.clone();
        let batch = records.clone();
        let sent = self
            .background
            .run(move || {
                let mut deliveries = Vec::with_capacity(batch.len());
                let mut unsent = Vec::new();
                for (i, record) in batch.iter().enumerate() {
                    let topic = &topics[topic_of_record[i]];
                    let payload = record.body_json();
                    let message = FutureRecord::to(topic)
                        .key(&record.key)
                        .payload(&payload)
                        .timestamp(record.time_ms);
                    match producer.send_result(message) {
                        Ok(delivery) => deliveries.push((i, delivery)),
                        Err((e, _)) => unsent.push((i, e)),
                    }
                }
                (deliveries, unsent)
            })
            .await;
        let (deliveries, unsent) = match sent {
            Ok(sent) => sent,
            Err(panic) => {
                return Err(SinkFailure::refused(
                    records.len(),
                    format!("kafka writer: {panic}"),
                ));
            }
        };
        let (mut failed, mut rejected) = (Vec::new(), Vec::new());
        let mut reason = String::new();
        let mut fail = |i: usize, e: &KafkaError| {
            reason = e.to_string();
            if refused_for_good(e) {
                rejected.push(i);
            } else {
                failed.push(i);
            }
        };
        for (i, e) in &unsent {
            fail(*i, e);
        }
        let outcomes =
            futures::future::join_all(deliveries.into_iter().map(|(i, d)| d.map(move |r| (i, r))))
                .await;
        for (i, outcome) in outcomes {
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => fail(i, &e),
                Err(_) => fail(i, &KafkaError::Canceled),
            }
        }
        if failed.is_empty() && rejected.is_empty() {
            return Ok(());
        }
        if !failed.is_empty() {
            self.ensured
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        failed.sort_unstable();
        rejected.sort_unstable();
        Err(SinkFailure {
            failed,
            rejected,
            reason,
        })
    }

    async fn flush(&self) -> Result<(), EventError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(Duration::from_secs(10))))
            .await
            .map_err(kafka_error)?
            .map_err(kafka_error)
    }
}

/// Domain events from Kafka for the feature store's aggregates: one consumer group, offsets
/// committed only once the events before them were counted in the store, so a process that stops
/// between reading and storing leaves them to the next one. (A batch the store refuses is logged
/// and passed over, as with the in-process source: the aggregates keep going.)
pub struct KafkaEventSource {
    consumer: StreamConsumer,
}

impl KafkaEventSource {
    /// Reads `topics` (full names) as member of `group`, from the earliest offset the group has
    /// not committed.
    pub fn new(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<Self, EventError> {
        let consumer: StreamConsumer = config
            .client(&[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "earliest"),
            ])
            .create()
            .map_err(kafka_error)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(kafka_error)?;
        Ok(Self { consumer })
    }

    fn decode(message: &impl Message) -> Option<Event> {
        let body: Map<String, Value> = serde_json::from_slice(message.payload()?).ok()?;
        let kind = body.get("kind")?.as_str()?.to_string();
        let entities = body
            .get("entities")
            .and_then(Value::as_object)
            .map(|e| {
                e.iter()
                    .filter_map(|(k, v)| {
                        let id = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            _ => return None,
                        };
                        Some((k.clone(), id))
                    })
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let time_ms = body
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .or_else(|| message.timestamp().to_millis())?;
        Some(Event {
            kind,
            entities,
            time_ms,
        })
    }
}

#[async_trait]
impl EventSource for KafkaEventSource {
    async fn next(&mut self) -> Option<Event> {
        loop {
            match self.consumer.recv().await {
                Ok(message) => match Self::decode(&message) {
                    Some(event) => return Some(event),
                    None => tracing::warn!(
                        topic = message.topic(),
                        offset = message.offset(),
                        "a message that is not an event was skipped"
                    ),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "kafka event source");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn ready(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while events.len() < 1024 {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => events.extend(Self::decode(&message)),
                _ => break,
            }
        }
        events
    }

    fn counted(&mut self) {
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async) {
            tracing::warn!(error = %e, "kafka offsets not committed");
        }
    }
}

/// A feature-store event as a domain event record, in the shape [`KafkaEventSource`] reads.
pub fn event_record(event: &Event, mut fields: Map<String, Value>) -> Record {
    let entities: Map<String, Value> = event
        .entities
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let key = event.entities.values().next().cloned().unwrap_or_default();
    fields.insert("entities".into(), Value::Object(entities));
    Record::event(&event.kind, &key, event.time_ms, fields)
}
