//! `marquee features` as a person uses it: definitions checked with clear errors, Parquet
//! history materialised into a real Redis incrementally, values looked up, and a training set
//! whose every value is the one valid at its row's time (never one from the future).

use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use marquee_tests::{CliRun, RedisServer, run_marquee};
use serde_json::Value;

const DAY_MS: i64 = 24 * 3600 * 1000;

const DEFINITIONS: &str = r#"
[[entity]]
name = "user"

[[feature_view]]
name = "user_activity"
entities = ["user"]
ttl = "30days"
source = { path = "offline/user_activity", timestamp_column = "event_time" }
feature = [
  { name = "bookings_7d", dtype = "int64", default = -1 },
  { name = "avg_ticket_price", dtype = "float64", default = 10.0 },
]
"#;

/// Writes one Parquet part of the history: (user, event time ms, bookings, price) rows.
fn write_history(dir: &Path, part: &str, rows: &[(&str, i64, i64, f64)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("bookings_7d", DataType::Int64, true),
        Field::new("avg_ticket_price", DataType::Float64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.1),
        )),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.3))),
    ];
    let batch = RecordBatch::try_new(schema, columns).unwrap();
    let folder = dir.join("offline/user_activity");
    std::fs::create_dir_all(&folder).unwrap();
    let file = std::fs::File::create(folder.join(format!("{part}.parquet"))).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn features(dir: &Path, online: &str, args: &[&str]) -> CliRun {
    let definitions = dir.join("features.toml");
    let mut all = vec![
        "features",
        "--definitions",
        definitions.to_str().unwrap(),
        "--online",
        online,
    ];
    all.extend(args);
    run_marquee(&all, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_materialised_incrementally_and_looked_up() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("features.toml"), DEFINITIONS).unwrap();
    let now = marquee_feature_store::online::now_ms();
    let (t0, t1, t2) = (now - 3 * DAY_MS, now - 2 * DAY_MS, now - DAY_MS);
    write_history(
        dir.path(),
        "part-1",
        &[
            ("u1", t0, 1, 11.0),
            ("u1", t0 + 1000, 2, 12.0),
            ("u2", t0, 7, 17.0),
        ],
    );
    let online = redis.url();

    let applied = features(dir.path(), &online, &["apply", "--json"]).json();
    assert_eq!(applied["feature_views"][0]["name"], "user_activity");
    assert_eq!(applied["entities"][0]["join_key"], "user_id");

    let first = features(
        dir.path(),
        &online,
        &["materialize", "--end", &t1.to_string(), "--json"],
    )
    .json();
    assert_eq!(first[0]["entities_written"], 2, "{first}");
    assert_eq!(
        first[0]["start_ms"],
        Value::Null,
        "the first run reads all history"
    );
    let u1 = features(
        dir.path(),
        &online,
        &["get", "user_activity", "user_id=u1", "--json"],
    )
    .json();
    assert_eq!(u1["values"]["bookings_7d"], 2, "the latest row wins: {u1}");
    assert_eq!(u1["values"]["avg_ticket_price"], 12.0);

    // New history arrives; the next run starts at the watermark and writes only what is new.
    write_history(
        dir.path(),
        "part-2",
        &[("u2", t2, 8, 18.0), ("u3", t1 - 1, 99, 99.0)],
    );
    let second = features(
        dir.path(),
        &online,
        &["materialize", "--end", &t2.to_string(), "--json"],
    )
    .json();
    assert_eq!(second[0]["start_ms"], t1, "{second}");
    assert_eq!(
        second[0]["entities_written"], 1,
        "u3's row is before the watermark, so only u2 is new: {second}"
    );
    let u2 = features(
        dir.path(),
        &online,
        &["get", "user_activity", "user_id=u2", "--json"],
    )
    .json();
    assert_eq!(u2["values"]["bookings_7d"], 8);
    let nobody = features(dir.path(), &online, &["get", "user_activity", "user_id=u9"]);
    assert_eq!(nobody.code, 0);
    assert!(nobody.stdout.contains("default -1"), "{}", nobody.stdout);
}

#[test]
fn a_training_set_takes_each_value_as_of_its_row() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("features.toml"), DEFINITIONS).unwrap();
    let base = 1_795_392_000_000; // 2026-11-23T00:00:00Z
    write_history(
        dir.path(),
        "part-1",
        &[
            ("u1", base, 1, 11.0),
            ("u1", base + DAY_MS, 2, 12.0),
            ("u2", base, 7, 17.0),
        ],
    );
    std::fs::write(
        dir.path().join("entities.csv"),
        [
            "user_id,event_timestamp,label",
            "u1,2026-11-22T12:00:00Z,0", // before any history: defaults
            "u1,2026-11-23T00:00:00Z,1", // exactly at the first event
            "u1,2026-11-23T23:59:59Z,0", // the second event is still in the future
            "u1,2026-11-24T00:00:00Z,1",
            "u2,2026-12-24T00:00:00Z,0", // 31 days later: past the 30-day TTL
            "u3,2026-11-24T00:00:00Z,1", // unknown entity
        ]
        .join("\n"),
    )
    .unwrap();
    let output = dir.path().join("train.parquet");
    let ran = features(
        dir.path(),
        "memory",
        &[
            "dataset",
            "--entities",
            dir.path().join("entities.csv").to_str().unwrap(),
            "--features",
            "user_activity",
            "--output",
            output.to_str().unwrap(),
            "--json",
        ],
    );
    let summary = ran.json();
    assert_eq!(summary["rows"], 6);
    let file = std::fs::File::open(&output).unwrap();
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let bookings: Vec<i64> = batch
        .column_by_name("bookings_7d")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(bookings, [-1, 1, 1, 2, -1, -1]);
    let prices: Vec<f64> = batch
        .column_by_name("avg_ticket_price")
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    assert_eq!(prices, [10.0, 11.0, 11.0, 12.0, 10.0, 10.0]);
    assert!(
        batch.column_by_name("label").is_some(),
        "entity columns are kept"
    );

    // Entity rows in Parquet, with a real timestamp column.
    let rows = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new(
                "event_timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(["u1", "u2"])),
            Arc::new(TimestampMillisecondArray::from_iter_values([
                base + DAY_MS,
                base,
            ])),
        ],
    )
    .unwrap();
    let entities = dir.path().join("entities.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&entities).unwrap(),
        rows.schema(),
        None,
    )
    .unwrap();
    writer.write(&rows).unwrap();
    writer.close().unwrap();
    let from_parquet = dir.path().join("train2.parquet");
    let summary = features(
        dir.path(),
        "memory",
        &[
            "dataset",
            "--entities",
            entities.to_str().unwrap(),
            "--features",
            "user_activity:bookings_7d",
            "--output",
            from_parquet.to_str().unwrap(),
            "--json",
        ],
    )
    .json();
    assert_eq!(
        summary["columns"],
        serde_json::json!(["user_id", "event_timestamp", "bookings_7d"])
    );
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&from_parquet).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap()
    .next()
    .unwrap()
    .unwrap();
    let bookings = batch
        .column_by_name("bookings_7d")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(bookings.values().to_vec(), [2, 7]);
}

#[test]
fn mistakes_get_exit_codes_and_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("features.toml"),
        DEFINITIONS.replace(
            "dtype = \"int64\", default = -1",
            "dtype = \"int64\", default = \"none\"",
        ),
    )
    .unwrap();
    let bad = features(dir.path(), "memory", &["apply"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("feature view 'user_activity': feature 'bookings_7d': default \"none\": expected an integer"),
        "{}",
        bad.stderr
    );

    std::fs::write(dir.path().join("features.toml"), DEFINITIONS).unwrap();
    let unknown = features(dir.path(), "memory", &["get", "movies", "movie_id=1"]);
    assert_eq!(unknown.code, 3, "{}", unknown.stderr);
    assert!(
        unknown
            .stderr
            .contains("feature view 'movies' is not defined")
    );
    let missing_key = features(dir.path(), "memory", &["get", "user_activity", "id=1"]);
    assert_eq!(missing_key.code, 2);
    assert!(
        missing_key.stderr.contains("needs user_id=VALUE"),
        "{}",
        missing_key.stderr
    );
    let no_source = features(dir.path(), "memory", &["materialize"]);
    assert_eq!(no_source.code, 2, "{}", no_source.stderr);
    assert!(
        no_source.stderr.contains("offline/user_activity"),
        "{}",
        no_source.stderr
    );
}
