//! The prediction log and domain events on a real Kafka-protocol broker (tansu, started here on
//! loopback; the clients are librdkafka's, as against Apache Kafka) and in local Parquet files:
//! records arrive with their fields, a broker that dies and comes back empty loses none of the
//! records logged meanwhile (spilled and replayed, counted exactly), serving never fails for it,
//! and domain events on Kafka feed the feature store's streaming aggregates; `/v2` inferences
//! (REST and gRPC) are logged with their tensors on a stream of their own. The Parquet log is an
//! offline source `marquee features dataset` builds a training set from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use marquee_events::{EventLog, KafkaConfig, KafkaEventSource, KafkaSink, LogConfig, event_record};
use marquee_feature_store::memory::MemoryStore;
use marquee_feature_store::{Aggregator, Definitions, Event, FeatureValue, Lookup, OnlineStore};
use marquee_serving::config::EventSinkKind;
use marquee_tests::{
    KafkaBroker, Repository, TestServer, read_parquet_tree, request_only_pipeline, string_column,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use serde_json::{Value, json};

fn consumer(broker: &KafkaBroker, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Reads JSON bodies until `done` says enough, within 60 s.
async fn consume(consumer: &StreamConsumer, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let started = Instant::now();
    let mut bodies = Vec::new();
    while !done(&bodies) {
        let left = Duration::from_secs(60).saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "only {} records arrived", bodies.len());
        if let Ok(Ok(message)) = tokio::time::timeout(left, consumer.recv()).await {
            let body: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            assert_eq!(message.key(), Some(&b"pricing"[..]), "keyed by model");
            bodies.push(body);
        }
    }
    bodies
}

fn ids(bodies: &[Value]) -> BTreeSet<String> {
    bodies
        .iter()
        .map(|b| b["prediction_id"].as_str().unwrap().to_string())
        .collect()
}

async fn predict(server: &TestServer, i: usize) -> String {
    let (status, body) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "features": {"f3": i}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["prediction_id"].as_str().unwrap().to_string()
}

async fn until_metric(server: &TestServer, series: &str, at_least: f64) -> f64 {
    let started = Instant::now();
    loop {
        let value = server.metric(series).await;
        if value >= at_least {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{series} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pricing() -> Repository {
    Repository::new()
        .add("pricing", "gbr", None)
        .write("pricing/pipeline.json", &request_only_pipeline())
}

/// The pricing model, logging to Parquet files under `dir`.
async fn logged_to_parquet(dir: &std::path::Path) -> TestServer {
    let dir = dir.to_path_buf();
    TestServer::start_with(pricing(), move |c| {
        c.event_sink = EventSinkKind::Parquet;
        c.events_dir = dir;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_reach_kafka_and_none_is_lost_while_the_broker_is_down() {
    let mut broker = KafkaBroker::start().await;
    let events = tempfile::tempdir().unwrap();
    let brokers = broker.brokers();
    let server = TestServer::start_with(pricing(), |c| {
        c.event_sink = EventSinkKind::Kafka;
        c.event_brokers = Some(brokers);
        c.events_dir = events.path().to_path_buf();
        // Deliveries to a dead broker fail after 2 s instead of 5: a shorter test.
        c.event_kafka_options = vec!["message.timeout.ms=2000".into()];
    })
    .await;

    let mut before = BTreeSet::new();
    for i in 0..200 {
        before.insert(predict(&server, i).await);
    }
    let first = consumer(&broker, "check-1", "marquee.predictions");
    let bodies = consume(&first, |b| ids(b).len() >= 200).await;
    assert_eq!(ids(&bodies), before);
    let body = bodies.iter().find(|b| b["features"]["f3"] == 7.0).unwrap();
    assert_eq!(body["entities"], json!({}));
    assert_eq!(body["model"], "pricing");
    assert_eq!(body["version"], 1);
    assert_eq!(body["variant"], Value::Null);
    assert_eq!(body["features"]["f0"], 0.0, "the default");
    assert_eq!(body["cache_hit"], false);
    assert!(body["prediction"].is_number() && body["latency_ms"].is_number());
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    drop(first);

    broker.kill();
    let mut during = BTreeSet::new();
    for i in 200..500 {
        during.insert(predict(&server, i).await);
    }
    let spilled = "marquee_event_log_records_total{outcome=\"spilled\",sink=\"kafka\"}";
    until_metric(&server, spilled, 300.0).await;

    broker.restart().await;
    let replayed = "marquee_event_log_records_total{outcome=\"replayed\",sink=\"kafka\"}";
    until_metric(&server, replayed, 300.0).await;
    // The broker came back empty: what it holds now is exactly what was logged while it was down.
    let second = consumer(&broker, "check-2", "marquee.predictions");
    let bodies = consume(&second, |b| ids(b).len() >= 300).await;
    assert_eq!(ids(&bodies), during);
    let counted = |outcome: &str| {
        format!("marquee_event_log_records_total{{outcome=\"{outcome}\",sink=\"kafka\"}}")
    };
    assert_eq!(server.metric(&counted("written")).await, 200.0);
    assert_eq!(server.metric(&counted("spilled")).await, 300.0);
    assert_eq!(server.metric(&counted("replayed")).await, 300.0);
    assert_eq!(server.metric(&counted("dropped")).await, 0.0);
    assert_eq!(
        server
            .metric("marquee_event_log_spill_bytes{sink=\"kafka\"}")
            .await,
        0.0
    );
    // A /v2 inference goes to its own topic, keyed by model too.
    let row: Vec<f64> = (0..10).map(f64::from).collect();
    let (status, body) = server
        .post(
            "/v2/models/pricing/infer",
            json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 10], "data": row}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let inferences = consumer(&broker, "check-3", "marquee.inferences");
    let bodies = consume(&inferences, |b| !b.is_empty()).await;
    assert_eq!(bodies[0]["inputs"]["X"]["data"], json!(row));
    assert_eq!(bodies[0]["request_id"], Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parquet_log_keeps_every_prediction_as_columns() {
    let events = tempfile::tempdir().unwrap();
    let server = logged_to_parquet(events.path()).await;
    let mut sent = BTreeSet::new();
    for i in 0..40 {
        sent.insert(predict(&server, i).await);
    }
    let (status, body) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "instances": [{"features": {"f1": 1.5}}, {"features": {"f1": 2.5}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for prediction in body["predictions"].as_array().unwrap() {
        sent.insert(prediction["prediction_id"].as_str().unwrap().to_string());
    }
    // An outcome for an answer no traffic policy routed is not counted, but it is logged.
    let fed = sent.first().unwrap().clone();
    let (status, receipt) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": fed, "outcome": 2.5}),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(
        (&receipt["counted"], &receipt["logged"]),
        (&json!(false), &json!(true))
    );
    server.stop().await;

    let feedback = read_parquet_tree(&events.path().join("events/prediction"));
    assert_eq!(feedback.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    assert_eq!(string_column(&feedback[0], "prediction_id"), [fed]);
    assert_eq!(string_column(&feedback[0], "kind"), ["prediction.feedback"]);

    let batches = read_parquet_tree(&events.path().join("predictions/model=pricing"));
    assert!(!batches.is_empty());
    let mut logged = BTreeSet::new();
    for batch in &batches {
        for column in [
            "timestamp",
            "prediction_id",
            "version",
            "f0",
            "f9",
            "prediction",
            "latency_ms",
        ] {
            assert!(
                batch.column_by_name(column).is_some(),
                "{column} in {:?}",
                batch.schema()
            );
        }
        logged.extend(string_column(batch, "prediction_id"));
    }
    assert_eq!(logged, sent, "one row per answered instance");
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, sent.len(), "no row twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_inferences_are_logged_with_their_tensors() {
    let events = tempfile::tempdir().unwrap();
    let server = logged_to_parquet(events.path()).await;
    let values: Vec<f64> = (0..20).map(|i| f64::from(i) / 4.0).collect();
    let (status, rest) = server
        .post(
            "/v2/models/pricing/infer",
            json!({"id": "rest-1", "inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 10], "data": values}]}),
        )
        .await;
    assert_eq!(status, 200, "{rest}");
    let mut client = server.grpc_client().await;
    let mut request = marquee_tests::gbr_grpc_request("pricing", 3);
    request.id = "grpc-1".into();
    let grpc = client.model_infer(request).await.unwrap().into_inner();
    // A request that fails is not a prediction: nothing is logged for it.
    let (status, _) = server
        .post(
            "/v2/models/pricing/infer",
            json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
        )
        .await;
    assert_eq!(status, 400);
    server.stop().await;

    let batches = read_parquet_tree(&events.path().join("inferences/model=pricing"));
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2, "one row per answered request");
    let mut logged = BTreeMap::new();
    for batch in &batches {
        let ids = string_column(batch, "request_id");
        let inputs = string_column(batch, "inputs");
        let outputs = string_column(batch, "outputs");
        for (i, id) in ids.into_iter().enumerate() {
            let input: Value = serde_json::from_str(&inputs[i]).unwrap();
            let output: Value = serde_json::from_str(&outputs[i]).unwrap();
            logged.insert(id, (input, output));
        }
        assert!(string_column(batch, "model").iter().all(|m| m == "pricing"));
        let versions = batch.column_by_name("version").unwrap();
        let versions = versions.as_primitive::<arrow_array::types::Int64Type>();
        assert!(versions.iter().all(|v| v == Some(1)));
        for column in ["prediction_id", "latency_ms", "timestamp", "variant"] {
            assert!(batch.column_by_name(column).is_some(), "{column}");
        }
    }
    let (input, output) = &logged["rest-1"];
    assert_eq!(input["X"]["datatype"], "FP32");
    assert_eq!(input["X"]["shape"], json!([2, 10]));
    assert_eq!(input["X"]["data"], json!(values));
    let name = rest["outputs"][0]["name"].as_str().unwrap();
    assert_eq!(output[name]["data"], rest["outputs"][0]["data"]);
    assert_eq!(output[name]["shape"], rest["outputs"][0]["shape"]);

    let (input, output) = &logged["grpc-1"];
    assert_eq!(input["X"]["shape"], json!([3, 10]));
    // The FP32 values exactly, written as the shortest text that reads back as them (as v2 JSON
    // writes them), not widened to f64 digits.
    let as_f32 = |data: &Value| -> Vec<f32> {
        data.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let sent: Vec<f32> = (0..30).map(|i| i as f32 / 7.0).collect();
    assert_eq!(as_f32(&input["X"]["data"]), sent);
    assert_eq!(input["X"]["data"][1], json!(0.14285715));
    let answered = marquee_tests::f32_values(&grpc.raw_output_contents[0]);
    assert_eq!(as_f32(&output[&grpc.outputs[0].name]["data"]), answered);
    assert!(
        !events.path().join("predictions").exists(),
        "no /v1/predict record for a /v2 request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parquet_log_is_an_offline_source_for_training_sets() {
    let events = tempfile::tempdir().unwrap();
    let server = logged_to_parquet(events.path()).await;
    // Each user's last answer (u0 is answered twice: its training row must get the second).
    let mut last: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (user, f0) in [("u0", 1.0), ("u1", 2.0), ("u2", 3.0), ("u0", 4.0)] {
        let (status, body) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing", "entities": {"user_id": user}, "features": {"f0": f0}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        last.insert(user.into(), (body["prediction"].as_f64().unwrap(), f0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.stop().await;

    // A feature view over the log folder, as a retraining job would define it.
    let definitions = r#"
[[entity]]
name = "user"

[[feature_view]]
name = "pricing_log"
entities = ["user"]
ttl = "30days"
source = { path = "predictions/model=pricing", timestamp_column = "timestamp" }
feature = [
  { name = "prediction", dtype = "float64", default = -1.0 },
  { name = "f0", dtype = "float64", default = -1.0 },
]
"#;
    std::fs::write(events.path().join("features.toml"), definitions).unwrap();
    let later = marquee_events::rfc3339(marquee_events::now_ms() + 3_600_000);
    let rows = [
        format!("u0,{later}"),
        format!("u1,{later}"),
        "u2,2020-01-01T00:00:00Z".to_string(), // before anything was logged: defaults
        format!("u9,{later}"),                 // never answered: defaults
    ];
    std::fs::write(
        events.path().join("entities.csv"),
        format!("user_id,event_timestamp\n{}\n", rows.join("\n")),
    )
    .unwrap();
    let output = events.path().join("train.parquet");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let ran = marquee_tests::run_marquee(
        &[
            "features",
            "--definitions",
            &path(&events.path().join("features.toml")),
            "--online",
            "memory",
            "dataset",
            "--entities",
            &path(&events.path().join("entities.csv")),
            "--features",
            "pricing_log",
            "--output",
            &path(&output),
            "--json",
        ],
        &[],
    );
    assert_eq!(ran.json()["rows"], 4);
    let file = std::fs::File::open(&output).unwrap();
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let column = |name: &str| -> Vec<f64> {
        batch
            .column_by_name(name)
            .unwrap()
            .as_primitive::<arrow_array::types::Float64Type>()
            .values()
            .to_vec()
    };
    assert_eq!(
        column("prediction"),
        [last["u0"].0, last["u1"].0, -1.0, -1.0]
    );
    assert_eq!(column("f0"), [4.0, 2.0, -1.0, -1.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_events_on_kafka_feed_the_streaming_aggregates() {
    let broker = KafkaBroker::start().await;
    let spill = tempfile::tempdir().unwrap();
    let config = KafkaConfig::new(broker.brokers());
    let log = EventLog::start(
        Arc::new(KafkaSink::new(config.clone()).unwrap()),
        LogConfig::new(spill.path()),
        None,
    )
    .unwrap();
    let now = marquee_feature_store::online::now_ms();
    let booking = |user: &str| Event {
        kind: "booking.created".into(),
        entities: [("user_id".to_string(), user.to_string())].into(),
        time_ms: now - 60_000,
    };
    for user in ["u1", "u1", "u1", "u2"] {
        log.log(event_record(&booking(user), serde_json::Map::new()));
    }
    let started = Instant::now();
    while log.stats().written < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            log.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let definitions = Definitions::from_toml(
        r#"
[[entity]]
name = "user"

[[feature_view]]
name = "user_counters"
entities = ["user"]
ttl = "1day"
feature = [{ name = "bookings_1h", dtype = "int64", aggregate = { event = "booking.created", window = "1h" } }]
"#,
    )
    .unwrap();
    let store: Arc<dyn OnlineStore> = Arc::new(MemoryStore::new());
    let source =
        KafkaEventSource::new(&config, "aggregates", &[config.topic("events.booking")]).unwrap();
    let aggregator = tokio::spawn(Aggregator::new(&definitions, store.clone()).run(source));
    let view = definitions.view("user_counters").unwrap();
    let started = Instant::now();
    loop {
        let rows = store
            .read(&[
                Lookup {
                    view,
                    entity_key: "u1",
                },
                Lookup {
                    view,
                    entity_key: "u2",
                },
            ])
            .await
            .unwrap();
        let counts: Vec<Option<FeatureValue>> = rows
            .into_iter()
            .map(|row| row.unwrap().values[0].clone())
            .collect();
        if counts == [Some(FeatureValue::Int(3)), Some(FeatureValue::Int(1))] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "counts from Kafka: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    aggregator.abort();
    log.close(Duration::from_secs(5)).await;
}
