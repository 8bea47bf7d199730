//! `marquee train fraud`: the booking fraud score. Every booking of the world is a row: what the
//! booking itself says (distance of its device from the user's home, seats, amount, hour, whether
//! the device is new to the user) and, joined point in time, the user's risk features just before
//! it (`user_risk`: bookings in the last hour, declined payments in 24 h; `user_account`: account
//! age). Bookings of
//! the first 70% of the period train, the rest test. The trainer fits an isolation forest and a
//! classifier on top of it (`trainers/fraud.py`); the exported graph is scored on the test rows
//! through the serving backend and must beat the threshold rules, the fallback serving uses, on
//! ROC-AUC and on recall at a 2% false-positive rate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray};
use marquee_feature_store::offline;
use marquee_registry::PushFile;
use marquee_registry::manifest::GateOp;
use serde_json::json;

use super::{Evaluator, TrainOptions, Trained, column, numbers, times_ms};
use crate::TrainingError;
use crate::metrics::{recall_at_fpr, roc_auc};
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};

const TRAINER: &str = include_str!("../../trainers/fraud.py");

/// The model's input columns, in order: the pipeline fills them the same way.
pub const COLUMNS: [&str; 8] = [
    "booking_velocity_1h",
    "failed_payments_24h",
    "account_age_days",
    "distance_from_home_km",
    "seats",
    "amount",
    "hour_of_day",
    "new_device",
];

/// The first three come from the feature store, as `view:feature`.
const STORED: [&str; 3] = [
    "user_risk:booking_velocity_1h",
    "user_risk:failed_payments_24h",
    "user_account:account_age_days",
];

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The false-positive rate recall is measured at.
const MAX_FPR: f64 = 0.02;

pub async fn train(options: &TrainOptions) -> Result<Trained, TrainingError> {
    let bookings = super::read_table(&options.data, "bookings.parquet").await?;
    let labels = super::read_table(&options.data, "labels/fraud.parquet").await?;
    let rows = booking_rows(&bookings, &labels)?;
    let set = with_stored_features(options, &rows).await?;

    let first = *rows.booked_ms.iter().min().unwrap_or(&0);
    let last = *rows.booked_ms.iter().max().unwrap_or(&0);
    let cutoff = first + (last - first) * 7 / 10;
    let train: Vec<usize> = (0..rows.len())
        .filter(|&i| rows.booked_ms[i] < cutoff)
        .collect();
    let test: Vec<usize> = (0..rows.len())
        .filter(|&i| rows.booked_ms[i] >= cutoff)
        .collect();
    let matrix = columns(&set)?;

    let is_fraud = |subset: &[usize]| -> ArrayRef {
        Arc::new(BooleanArray::from_iter(
            subset.iter().map(|&i| Some(rows.is_fraud[i])),
        ))
    };
    let (report, model) = super::fit_table(
        options,
        "fraud",
        TRAINER,
        (&COLUMNS, &matrix, &train),
        ("is_fraud", is_fraud(&train)),
    )?;

    let mut evaluator = Evaluator::onnx(options, &model, "X", "fraud_probability")?;
    let scores = evaluator_scores(&mut evaluator, &matrix, &test)?;
    let truth: Vec<bool> = test.iter().map(|&i| rows.is_fraud[i]).collect();
    let rules: Vec<f64> = test.iter().map(|&i| rule_score(&matrix, i)).collect();
    let measure = |scores: &[f64]| -> Result<(f64, f64), TrainingError> {
        let auc = roc_auc(scores, &truth)
            .ok_or_else(|| TrainingError::Data("the test period has one class only".into()))?;
        let (recall, _) = recall_at_fpr(scores, &truth, MAX_FPR)
            .ok_or_else(|| TrainingError::Data("the test period has one class only".into()))?;
        Ok((auc, recall))
    };
    // The test rows as the served model saw them, with its scores: what serving must reproduce.
    super::write_rows(
        &options.work.join("fraud-test-scores.parquet"),
        &COLUMNS,
        &matrix,
        &test,
        vec![
            (
                "booking_id",
                Arc::new(StringArray::from_iter_values(
                    test.iter().map(|&i| rows.booking_id[i].as_str()),
                )),
            ),
            ("is_fraud", is_fraud(&test)),
            (
                "fraud_probability",
                Arc::new(Float64Array::from(scores.clone())),
            ),
            ("rules_score", Arc::new(Float64Array::from(rules.clone()))),
        ],
    )?;
    let (auc, recall) = measure(&scores)?;
    let (rules_auc, rules_recall) = measure(&rules)?;
    let mut metrics = BTreeMap::from([
        ("roc_auc".to_string(), auc),
        ("recall_at_2pct_fpr".to_string(), recall),
        ("rules_roc_auc".to_string(), rules_auc),
        ("rules_recall_at_2pct_fpr".to_string(), rules_recall),
        ("train_rows".to_string(), train.len() as f64),
        ("test_rows".to_string(), test.len() as f64),
        (
            "test_positives".to_string(),
            truth.iter().filter(|&&t| t).count() as f64,
        ),
    ]);
    if let Some(error) = report["export_max_abs_error"].as_f64() {
        metrics.insert("export_max_abs_error".into(), error);
    }
    let gates = vec![
        super::gate("roc_auc", GateOp::Gt, rules_auc),
        super::gate("recall_at_2pct_fpr", GateOp::Gt, rules_recall),
    ];
    let judged = super::judge("fraud", &gates, &metrics)?;

    let baseline = DriftBaseline {
        rows: train.len() as u64,
        inputs: COLUMNS
            .iter()
            .enumerate()
            .map(|(c, name)| {
                let values: Vec<f64> = train.iter().map(|&i| matrix[c][i] as f64).collect();
                ColumnBaseline::numeric(name, &values)
            })
            .collect(),
        prediction: ColumnBaseline::numeric(
            "prediction",
            &evaluator_scores(&mut evaluator, &matrix, &train)?,
        ),
    };
    let manifest = json!({
        "schema_version": marquee_registry::manifest::SCHEMA_VERSION,
        "name": "fraud",
        "version": 0,
        "framework": "onnx",
        "created_at": marquee_registry::now(),
        "created_by": options.by,
        "description": "Booking fraud score in [0, 1]: isolation forest and gradient-boosted classifier (marquee train fraud)",
        "files": [],
        "signature": marquee_registry::onnx::signature(&model).map_err(TrainingError::Trainer)?,
        "config": {
            "max_batch_size": 256,
            "dynamic_batching": {"max_queue_delay_microseconds": 200},
            "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
            "parameters": {"intra_op_thread_count": {"string_value": "1"}, "wait_only_for_company": {"string_value": "1"}}
        },
        "metrics": metrics,
        "gates": gates,
        "tags": {"task": "fraud", "trainer": "trainers/fraud.py"},
        "lineage": {
            "dataset_uri": options.data,
            "code_version": concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
            "parameters": {
                "seed": options.seed,
                "split": "bookings before 70% of the period train, the rest test",
                "columns": COLUMNS,
                "trainer": report,
            }
        },
        "pipeline": pipeline(),
        "drift_baseline": baseline,
    });
    let pushed = super::push(
        options,
        "fraud",
        vec![PushFile {
            path: "model.onnx".into(),
            contents: model,
        }],
        manifest,
    )
    .await?;
    Ok(Trained {
        model: "fraud".into(),
        version: pushed.version,
        metrics,
        gates: judged,
    })
}

fn evaluator_scores(
    evaluator: &mut Evaluator,
    matrix: &[Vec<f32>],
    rows: &[usize],
) -> Result<Vec<f64>, TrainingError> {
    Ok(evaluator
        .score(&super::row_major(matrix, rows), COLUMNS.len())?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// The `/v1/predict` pipeline: the stored features by user, the booking's own from the request,
/// the score's decision (> 0.8 block, 0.5-0.8 verify, else allow), and the threshold rules as the
/// fallback when the model cannot answer in time.
pub fn pipeline() -> serde_json::Value {
    json!({
        "input": "X",
        "features": [
            {"name": "booking_velocity_1h", "view": "user_risk"},
            {"name": "failed_payments_24h", "view": "user_risk"},
            {"name": "account_age_days", "view": "user_account"},
            {"name": "distance_from_home_km", "default": 0},
            {"name": "seats", "default": 2},
            {"name": "amount", "default": 24},
            {"name": "hour_of_day", "default": 19},
            {"name": "new_device", "dtype": "bool"}
        ],
        "output": {"tensor": "fraud_probability", "thresholds": [
            {"min": 0.8, "label": "block"}, {"min": 0.5, "label": "verify"}, {"label": "allow"}
        ]},
        "fallback": {"rules": [
            {"when": {"booking_velocity_1h": {"min": 4}}, "outputs": {"fraud_probability": 0.9, "label": "block"}},
            {"when": {"failed_payments_24h": {"min": 3}}, "outputs": {"fraud_probability": 0.85, "label": "block"}},
            {"when": {"new_device": true, "distance_from_home_km": {"min": 300}}, "outputs": {"fraud_probability": 0.7, "label": "verify"}},
            {"when": {"hour_of_day": {"min": 2, "max": 5}, "seats": {"min": 4}}, "outputs": {"fraud_probability": 0.6, "label": "verify"}},
            {"outputs": {"fraud_probability": 0.05, "label": "allow"}}
        ]}
    })
}

/// The fallback rules as a score (the pipeline's `fallback`, applied to one row of `matrix`).
fn rule_score(matrix: &[Vec<f32>], i: usize) -> f64 {
    let value = |name: &str| {
        let column = COLUMNS
            .iter()
            .position(|c| *c == name)
            .expect("a model column");
        matrix[column][i] as f64
    };
    if value("booking_velocity_1h") >= 4.0 {
        0.9
    } else if value("failed_payments_24h") >= 3.0 {
        0.85
    } else if value("new_device") == 1.0 && value("distance_from_home_km") >= 300.0 {
        0.7
    } else if (2.0..=5.0).contains(&value("hour_of_day")) && value("seats") >= 4.0 {
        0.6
    } else {
        0.05
    }
}

/// Each booking: who, when, what it says itself, and its label.
struct BookingRows {
    booking_id: Vec<String>,
    user_id: Vec<String>,
    booked_ms: Vec<i64>,
    distance_km: Vec<f64>,
    seats: Vec<f64>,
    amount: Vec<f64>,
    hour_of_day: Vec<f64>,
    new_device: Vec<bool>,
    is_fraud: Vec<bool>,
}

impl BookingRows {
    fn len(&self) -> usize {
        self.user_id.len()
    }
}

/// A text column, nulls as empty (the feature store's reader, which also takes integer ids).
fn strings(array: &ArrayRef, name: &str) -> Result<Vec<String>, TrainingError> {
    Ok(offline::key_strings(array, name)
        .map_err(|e| TrainingError::Data(e.to_string()))?
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect())
}

fn booking_rows(
    bookings: &RecordBatch,
    labels: &RecordBatch,
) -> Result<BookingRows, TrainingError> {
    let table = "bookings.parquet";
    let ids = strings(column(bookings, "booking_id", table)?, "booking_id")?;
    let user_id = strings(column(bookings, "user_id", table)?, "user_id")?;
    let devices = strings(column(bookings, "device_id", table)?, "device_id")?;
    let booked_ms = times_ms(column(bookings, "booked_at", table)?, "booked_at")?;
    let label_ids = strings(
        column(labels, "booking_id", "labels/fraud.parquet")?,
        "booking_id",
    )?;
    let flags = column(labels, "is_fraud", "labels/fraud.parquet")?
        .as_boolean_opt()
        .ok_or_else(|| {
            TrainingError::Data("labels/fraud.parquet: is_fraud is not boolean".into())
        })?;
    let label_of: HashMap<&str, bool> = label_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), flags.value(i)))
        .collect();
    let is_fraud = ids
        .iter()
        .map(|id| {
            label_of.get(id.as_str()).copied().ok_or_else(|| {
                TrainingError::Data(format!("booking {id} has no row in labels/fraud.parquet"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A device is new the first time its user books with it, in time order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (booked_ms[i], i));
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut new_device = vec![false; ids.len()];
    for i in order {
        new_device[i] = seen.insert((user_id[i].as_str(), devices[i].as_str()));
    }
    Ok(BookingRows {
        booking_id: ids,
        distance_km: numbers(
            column(bookings, "distance_from_home_km", table)?,
            "distance_from_home_km",
        )?,
        seats: numbers(column(bookings, "seats", table)?, "seats")?,
        amount: numbers(column(bookings, "amount", table)?, "amount")?,
        hour_of_day: booked_ms
            .iter()
            .map(|ms| ms.rem_euclid(DAY_MS) as f64 / HOUR_MS as f64)
            .collect(),
        user_id,
        booked_ms,
        new_device,
        is_fraud,
    })
}

/// The bookings with the user's risk features as of each booking (the feature store's
/// point-in-time join over the world's own definitions).
async fn with_stored_features(
    options: &TrainOptions,
    rows: &BookingRows,
) -> Result<RecordBatch, TrainingError> {
    let entities = RecordBatch::try_from_iter([
        (
            "user_id",
            Arc::new(StringArray::from_iter_values(rows.user_id.iter())) as ArrayRef,
        ),
        (
            "booked_at",
            Arc::new(arrow_array::TimestampMillisecondArray::from(
                rows.booked_ms.clone(),
            )),
        ),
        (
            "distance_from_home_km",
            Arc::new(Float64Array::from(rows.distance_km.clone())),
        ),
        ("seats", Arc::new(Float64Array::from(rows.seats.clone()))),
        ("amount", Arc::new(Float64Array::from(rows.amount.clone()))),
        (
            "hour_of_day",
            Arc::new(Float64Array::from(rows.hour_of_day.clone())),
        ),
        (
            "new_device",
            Arc::new(BooleanArray::from(rows.new_device.clone())),
        ),
    ])
    .map_err(|e| TrainingError::Data(e.to_string()))?;
    super::point_in_time(options, &entities, "booked_at", &STORED).await
}

/// The model columns of the joined set, as f32 (booleans 0/1), column by column.
fn columns(set: &RecordBatch) -> Result<Vec<Vec<f32>>, TrainingError> {
    COLUMNS
        .iter()
        .map(|name| {
            let array = column(set, name, "the training set")?;
            if let Some(flags) = array.as_boolean_opt() {
                return Ok(flags
                    .iter()
                    .map(|v| f32::from(u8::from(v.unwrap_or(false))))
                    .collect());
            }
            Ok(numbers(array, name)?
                .into_iter()
                .map(|v| v as f32)
                .collect())
        })
        .collect()
}
