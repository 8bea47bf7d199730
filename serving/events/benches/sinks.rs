//! What a logged prediction costs once it has left the request path: a batch of records shaped
//! like the prediction log's (ids, variant, 2 entities, 6 features, the answer) into an open
//! Parquet file, and into the JSON a Kafka message carries. bench/traffic.py measures the whole
//! path under load; this says how much of it is the sink's.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use marquee_events::{Features, ParquetSink, PredictionFields, Record, Sink};
use serde_json::{Value, json};

const BATCH: usize = 2_048;

/// A prediction as serving logs it (typed fields, the pipeline's feature names shared).
fn prediction(i: usize, names: &Arc<[String]>) -> Record {
    let Value::Object(entities) = json!({"user_id": format!("user-{i}"), "show_id": "show-7"})
    else {
        unreachable!()
    };
    let values = [i as f64 % 96.0, 40.0, 1.0, 0.61, 2.0, 180.0];
    let fields = PredictionFields {
        cache_hit: false,
        degraded: Vec::new(),
        entities,
        features: Features::Named {
            names: names.clone(),
            values: values.iter().map(|&v| json!(v)).collect(),
        },
        label: None,
        latency_ms: 0.42,
        model: "pricing".into(),
        prediction: json!(11.25 + (i % 7) as f64),
        prediction_id: format!("0190d4c8-7f1e-7a3b-9c2d-{i:012}"),
        variant: Some("canary".into()),
        version: 2,
    };
    Record::prediction("pricing", 1_767_225_600_000 + i as i64, fields)
}

fn sinks(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let names: Arc<[String]> = [
        "hours_to_show",
        "seats_left",
        "is_peak_hour",
        "occupancy_7d",
        "price_band",
        "screen_size",
    ]
    .map(String::from)
    .into();
    let records: Vec<Record> = (0..BATCH).map(|i| prediction(i, &names)).collect();
    let mut group = c.benchmark_group("sinks");
    group.throughput(Throughput::Elements(BATCH as u64));

    let dir = tempfile::tempdir().expect("temp dir");
    let sink = ParquetSink::new(dir.path(), Duration::from_secs(3_600)).expect("sink");
    group.bench_function("parquet_2048_predictions", |b| {
        b.iter_batched(
            || Arc::new(records.clone()),
            |batch| runtime.block_on(sink.write(batch)).expect("written"),
            BatchSize::LargeInput,
        )
    });
    runtime.block_on(sink.flush()).expect("flushed");

    group.bench_function("kafka_json_2048_predictions", |b| {
        b.iter(|| records.iter().map(|r| r.body_json().len()).sum::<usize>())
    });
    group.bench_function("build_and_drop_2048_predictions", |b| {
        b.iter(|| {
            (0..BATCH)
                .map(|i| prediction(i, &names))
                .map(|r| r.key.len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, sinks);
criterion_main!(benches);
