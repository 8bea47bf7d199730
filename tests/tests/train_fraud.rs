//! `marquee train fraud` end to end at small scale: generate a world, train (point-in-time join,
//! fit, evaluation through the serving backend, gates), find the version in the registry with its
//! metrics, lineage and drift baseline, serve it, and check that `/v1/predict` gives the test rows
//! the scores the offline evaluation saved (train/serve parity) and rejects bad input by name.

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use marquee_tests::{TestServer, TrainingRun, read_parquet};
use serde_json::{Value, json};

const COLUMNS: [&str; 8] = [
    "booking_velocity_1h",
    "failed_payments_24h",
    "account_age_days",
    "distance_from_home_km",
    "seats",
    "amount",
    "hour_of_day",
    "new_device",
];

/// The request features of test row `i`, as a service would send them.
fn features_of(rows: &RecordBatch, i: usize) -> Value {
    let mut features = serde_json::Map::new();
    for name in COLUMNS {
        let value = rows
            .column_by_name(name)
            .unwrap()
            .as_primitive::<Float32Type>()
            .value(i);
        features.insert(
            name.to_string(),
            match name {
                "new_device" => json!(value > 0.5),
                // Counts are int64 in the feature views.
                "booking_velocity_1h" | "failed_payments_24h" => json!(value as i64),
                _ => json!(value),
            },
        );
    }
    Value::Object(features)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_fraud_model_is_registered_served_and_scores_as_evaluated() {
    let run = TrainingRun::small_world(3);
    let (world, registry, work) = (&run.world, &run.registry, &run.work);
    let report = run.train("fraud", &["--seed", "3"]);
    assert_eq!(report["model"], "fraud");
    assert_eq!(report["version"], 1);
    let metrics = &report["metrics"];
    let number = |name: &str| metrics[name].as_f64().unwrap_or_else(|| panic!("{name}"));
    assert!(number("roc_auc") > number("rules_roc_auc"), "{metrics}");
    assert!(
        number("recall_at_2pct_fpr") > number("rules_recall_at_2pct_fpr"),
        "{metrics}"
    );
    assert!(number("test_positives") > 10.0, "{metrics}");

    // The registry holds what the job measured, where it came from and what drift is judged by.
    let manifest = run.show("fraud", "1");
    assert_eq!(manifest["metrics"]["roc_auc"], metrics["roc_auc"]);
    assert_eq!(manifest["lineage"]["parameters"]["seed"], 3);
    assert_eq!(manifest["lineage"]["dataset_uri"], world.to_str().unwrap());
    let baseline = &manifest["drift_baseline"];
    let names: Vec<&str> = baseline["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|input| input["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, COLUMNS, "{baseline}");
    let counted: u64 = baseline["prediction"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(Some(counted), baseline["rows"].as_u64(), "{baseline}");
    let usable = marquee_registry::baseline::DriftBaseline::from_manifest(baseline)
        .expect("a baseline the drift monitor can test against");
    assert_eq!(usable.prediction.name, "prediction");
    assert!(
        usable
            .inputs
            .iter()
            .all(|c| !c.values.is_empty() && c.values.len() <= 1000)
    );

    // Served from the registry, the test rows get the scores the evaluation computed.
    let scored = read_parquet(&work.join("fraud-test-scores.parquet"));
    let server = TestServer::start_with_config(|config| {
        config.registry = Some(registry.to_string_lossy().into_owned());
        config.pins = vec!["fraud:1".into()];
        config.features = Some(world.join("features.toml"));
    })
    .await;
    let offline = scored
        .column_by_name("fraud_probability")
        .unwrap()
        .as_primitive::<Float64Type>();
    let is_fraud = scored.column_by_name("is_fraud").unwrap().as_boolean();
    // Every fraudulent test row and as many legitimate ones.
    let frauds: Vec<usize> = (0..scored.num_rows())
        .filter(|&i| is_fraud.value(i))
        .collect();
    let chosen: Vec<usize> = frauds
        .iter()
        .copied()
        .chain(
            (0..scored.num_rows())
                .filter(|&i| !is_fraud.value(i))
                .take(frauds.len()),
        )
        .take(256)
        .collect();
    let instances: Vec<Value> = chosen
        .iter()
        .map(
            |&i| json!({"entities": {"user_id": "u-unknown"}, "features": features_of(&scored, i)}),
        )
        .collect();
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "fraud", "version": 1, "instances": instances}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), chosen.len());
    let mut blocked_fraud = 0;
    for (&i, prediction) in chosen.iter().zip(predictions) {
        let served = prediction["outputs"]["fraud_probability"]
            .as_f64()
            .unwrap_or_else(|| panic!("{prediction}"));
        assert!(
            (served - offline.value(i)).abs() < 1e-5,
            "row {i}: served {served}, evaluated {}",
            offline.value(i)
        );
        let label = prediction["outputs"]["label"].as_str().unwrap();
        let expected = match served {
            s if s >= 0.8 => "block",
            s if s >= 0.5 => "verify",
            _ => "allow",
        };
        assert_eq!(label, expected, "row {i}: {served}");
        // The platform API's top-level fields repeat the score and the decision.
        assert_eq!(
            prediction["prediction"],
            prediction["outputs"]["fraud_probability"]
        );
        assert_eq!(prediction["label"], label);
        blocked_fraud += usize::from(is_fraud.value(i) && label == "block");
    }
    assert!(blocked_fraud > 0, "no fraudulent test booking was blocked");

    // Bad input is refused by name.
    let (status, refused) = server
        .post(
            "/v1/predict",
            json!({"model": "fraud", "entities": {"user_id": "u1"}, "features": {"seats": "many"}}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("seats"),
        "{refused}"
    );
    server.stop().await;
}
