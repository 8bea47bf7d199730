//! The drift monitor end to end (`serving/src/drift.rs`): a version pushed without a baseline
//! takes its first rows as one (flagged), an unshifted window raises nothing, a window with two
//! shifted features drifts on exactly those features, and the verdicts agree with scipy's
//! `ks_2samp` on the same values. A drifting window is a metric, a `drift.detected` event and
//! one run of the model's drift command; unloading the model drops its state and series. Every
//! kind of column (continuous, two values, a few values; against a small and a large baseline)
//! is judged as Evidently's data drift report judges the same windows: the same test, score and
//! verdict. A version served from the registry with its manifest's baseline is judged against it
//! from its first window.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};
use marquee_registry::{PushFile, Quiet, Registry, Stage};
use marquee_serving::config::EventSinkKind;
use marquee_tests::{
    Repository, TestServer, fixtures, read_parquet_tree, request_only_pipeline, string_column,
};
use serde_json::{Value, json};

const ROWS: usize = 300;
const SHIFTED: [&str; 2] = ["f2", "f5"];

/// Uniform values in [0, 1) from SplitMix64: the same stream for the same seed everywhere.
fn uniform(seed: u64, n: u64) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(n.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One window of rows, each uniform with `f2` and `f5` shifted when `shift`.
fn window(seed: u64, shift: bool) -> Vec<[f64; 10]> {
    (0..ROWS as u64)
        .map(|row| {
            let mut values = [0.0; 10];
            for (k, value) in values.iter_mut().enumerate() {
                *value = uniform(seed, row * 10 + k as u64);
                if shift && SHIFTED.contains(&format!("f{k}").as_str()) {
                    *value = *value * 1.2 + 0.25;
                }
            }
            values
        })
        .collect()
}

/// Sends one [`window`]; returns every column's values as the server saw them.
async fn send(server: &TestServer, seed: u64, shift: bool) -> BTreeMap<String, Vec<f64>> {
    send_rows(server, window(seed, shift)).await
}

/// Sends each row as `f0`-`f9` of one request; returns every column's values (and the
/// prediction) as the server saw them.
async fn send_rows(
    server: &TestServer,
    rows: impl IntoIterator<Item = [f64; 10]>,
) -> BTreeMap<String, Vec<f64>> {
    let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for values in rows {
        let features: serde_json::Map<String, Value> = values
            .iter()
            .enumerate()
            .map(|(k, v)| (format!("f{k}"), json!(v)))
            .collect();
        let (status, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing", "features": features}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        for (k, v) in values.iter().enumerate() {
            columns.entry(format!("f{k}")).or_default().push(*v);
        }
        columns
            .entry("prediction".into())
            .or_default()
            .push(answer["prediction"].as_f64().unwrap());
    }
    columns
}

async fn drift(server: &TestServer) -> Value {
    let (status, body) = server.get("/v1/models/pricing/drift").await;
    assert_eq!(status, 200, "{body}");
    body["versions"][0].clone()
}

async fn until_judged(server: &TestServer, windows: u64) -> Value {
    let started = Instant::now();
    loop {
        let view = drift(server).await;
        if view["windows_judged"] == windows {
            return view;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// scipy's `ks_2samp` of every column, `{column: [statistic, pvalue]}`.
fn scipy_ks(reference: &BTreeMap<String, Vec<f64>>, current: &BTreeMap<String, Vec<f64>>) -> Value {
    let script = "import json, sys\nfrom scipy import stats\nd = json.load(sys.stdin)\n\
        print(json.dumps({c: list(stats.ks_2samp(d['reference'][c], d['current'][c])[:2]) for c in d['reference']}))";
    windows_through_python(script, reference, current)
}

/// What the test venv's python prints (JSON) for `script` given both windows on its stdin, as
/// `{"reference": {column: values}, "current": …}`.
fn windows_through_python(
    script: &str,
    reference: &BTreeMap<String, Vec<f64>>,
    current: &BTreeMap<String, Vec<f64>>,
) -> Value {
    let python = marquee_tests::root().join(".marquee/venv/bin/python");
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the test venv's python");
    let input = json!({"reference": reference, "current": current}).to_string();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{script}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn drifted_features(report: &Value) -> BTreeSet<String> {
    report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["drifted"] == true && c["column"] != "prediction")
        .map(|c| c["column"].as_str().unwrap().to_string())
        .collect()
}

fn agrees_with_scipy(report: &Value, scipy: &Value) {
    for column in report["columns"].as_array().unwrap() {
        let name = column["column"].as_str().unwrap();
        if column["skipped"].is_string() && scipy.get(name).is_none() {
            continue;
        }
        assert_eq!(column["test"], "ks", "{column}");
        let (statistic, p) = (&scipy[name][0], &scipy[name][1]);
        let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-6;
        assert!(
            close(&column["statistic"], statistic),
            "{name}: {column} against scipy {statistic}"
        );
        assert!(
            close(&column["p_value"], p),
            "{name}: {column} against scipy p {p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_features_drift_and_nothing_else_does() {
    let events = tempfile::tempdir().unwrap();
    let marker = events.path().join("drift-commands.txt");
    let (dir, command) = (
        events.path().to_path_buf(),
        format!(
            "pricing=echo \"$MARQUEE_DRIFT_MODEL $MARQUEE_DRIFT_VERSION\" >> {}",
            marker.display()
        ),
    );
    let repository = Repository::new()
        .add("pricing", "gbr", None)
        .write("pricing/pipeline.json", &request_only_pipeline());
    let server = TestServer::start_with(repository, move |c| {
        c.event_sink = EventSinkKind::Parquet;
        c.events_dir = dir;
        c.drift_window_rows = ROWS;
        c.drift_reference_rows = ROWS;
        c.drift_window_seconds = 3600.0;
        // Two shifted columns of eleven are enough to call the dataset drifting.
        c.drift_share = 0.15;
        c.drift_commands = vec![command];
    })
    .await;
    let (status, body) = server.get("/v1/models/nope/drift").await;
    assert_eq!(status, 404, "{body}");

    let reference = send(&server, 11, false).await;
    let view = drift(&server).await;
    assert_eq!(
        view["baseline"], "first_requests",
        "no manifest baseline: {view}"
    );
    assert_eq!(view["windows_judged"], 0);

    let calm = send(&server, 12, false).await;
    let view = until_judged(&server, 1).await;
    let report = &view["reports"][0];
    assert_eq!(report["dataset_drift"], false, "{report}");
    assert_eq!(drifted_features(report), BTreeSet::new(), "{report}");
    assert_eq!(report["window_rows"], ROWS);
    agrees_with_scipy(report, &scipy_ks(&reference, &calm));

    // Each unshifted column alarms with probability 0.05 in a window (the KS test's level; the
    // false-alarm rate is measured in drift.rs's unit tests): these seeds are a draw where none
    // of the eighteen unshifted comparisons does, so the test states exactly what drifted.
    let shifted = send(&server, 14, true).await;
    let view = until_judged(&server, 2).await;
    let report = &view["reports"][0];
    assert_eq!(report["dataset_drift"], true, "{report}");
    let expected: BTreeSet<String> = SHIFTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(drifted_features(report), expected, "{report}");
    agrees_with_scipy(report, &scipy_ks(&reference, &shifted));
    assert_eq!(view["windows_drifted"], 1);

    let series = |result: &str| {
        format!(
            "marquee_drift_windows_total{{model=\"pricing\",result=\"{result}\",version=\"1\"}}"
        )
    };
    assert_eq!(server.metric(&series("drift")).await, 1.0);
    assert_eq!(server.metric(&series("no_drift")).await, 1.0);
    let column = |name: &str| {
        format!("marquee_drift_column_drifted{{column=\"{name}\",model=\"pricing\",version=\"1\"}}")
    };
    assert_eq!(server.metric(&column("f2")).await, 1.0);
    assert_eq!(server.metric(&column("f0")).await, 0.0);

    // The command ran once, for the window that started the drift.
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the drift command never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Unloading the model drops its versions' drift state and series.
    let (status, body) = server
        .post("/v2/repository/models/pricing/unload", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let text = server.metrics_text().await;
    assert!(
        !text.contains("marquee_drift_windows_total{")
            && !text.contains("marquee_drift_column_drifted{"),
        "series of an unloaded version stayed"
    );
    // Loaded again, the version starts over: no reports, a new baseline from its first rows.
    let (status, body) = server
        .post("/v2/repository/models/pricing/load", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    send(&server, 15, false).await;
    let view = drift(&server).await;
    assert_eq!(
        (&view["windows_judged"], &view["reports"], &view["baseline"]),
        (&json!(0), &json!([]), &json!("first_requests")),
        "{view}"
    );
    server.stop().await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "pricing 1\n");
    let detected = read_parquet_tree(&events.path().join("events/drift"));
    assert_eq!(detected.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    assert_eq!(string_column(&detected[0], "kind"), ["drift.detected"]);
    assert_eq!(string_column(&detected[0], "model"), ["pricing"]);
}

/// A version whose manifest carries a drift baseline (as `marquee train` writes it) is judged
/// against it from its first window: nothing is spent collecting one, and the view says where
/// the baseline came from. The baseline holds the same values the test above sent first, so the
/// verdicts are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_baseline_judges_from_the_first_window() {
    let reference = columns(&window(11, false));
    let baseline = DriftBaseline {
        rows: ROWS as u64,
        inputs: reference
            .iter()
            .map(|(name, values)| ColumnBaseline::numeric(name, values))
            .collect(),
        // Named for what it is, not `prediction`: kept, not judged (the test computes no
        // answers for the reference rows).
        prediction: ColumnBaseline::numeric("model_output", &reference["f0"]),
    };
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(registry_dir.path().to_str().unwrap()).unwrap();
    let model = std::fs::read(fixtures().join("models/gbr/1/model.onnx")).unwrap();
    let mut manifest = marquee_tests::manifest(json!({"max_batch_size": 16}));
    manifest.pipeline = serde_json::from_slice(&request_only_pipeline()).unwrap();
    manifest.drift_baseline = serde_json::to_value(&baseline).unwrap();
    let pushed = registry
        .push(
            "pricing",
            vec![PushFile {
                path: "model.onnx".into(),
                contents: model.into(),
            }],
            manifest,
            &Quiet,
        )
        .await
        .unwrap();
    registry
        .promote("pricing", pushed.version, Stage::Staging, None, "tests", "")
        .await
        .unwrap();
    let location = registry_dir.path().to_string_lossy().into_owned();
    let server = TestServer::start_with_config(move |c| {
        c.registry = Some(location);
        c.drift_window_rows = ROWS;
        c.drift_reference_rows = ROWS;
        c.drift_window_seconds = 3600.0;
        c.drift_share = 0.15;
    })
    .await;

    let calm = send(&server, 12, false).await;
    let view = until_judged(&server, 1).await;
    assert_eq!(view["baseline"], "manifest", "{view}");
    assert_eq!(view["baseline_rows_collected"], 0, "{view}");
    let report = &view["reports"][0];
    assert_eq!(report["dataset_drift"], false, "{report}");
    assert_eq!(drifted_features(report), BTreeSet::new(), "{report}");
    let prediction = report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["column"] == "prediction")
        .unwrap();
    assert_eq!(prediction["skipped"], "not in the baseline", "{prediction}");
    agrees_with_scipy(report, &scipy_ks(&reference, &calm));

    let shifted = send(&server, 14, true).await;
    let view = until_judged(&server, 2).await;
    let report = &view["reports"][0];
    let expected: BTreeSet<String> = SHIFTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(drifted_features(report), expected, "{report}");
    assert_eq!(report["dataset_drift"], true, "{report}");
    agrees_with_scipy(report, &scipy_ks(&reference, &shifted));
    server.stop().await;
}

/// Rows as columns `f0`-`f9`.
fn columns(rows: &[[f64; 10]]) -> BTreeMap<String, Vec<f64>> {
    (0..10)
        .map(|k| (format!("f{k}"), rows.iter().map(|row| row[k]).collect()))
        .collect()
}

/// Kinds of column Evidently tells apart: f0-f5 continuous (f0 shifted), f6 two values (its share
/// shifted), f7 four values (tilted), f8-f9 continuous.
fn mixed_row(seed: u64, row: u64, shift: bool) -> [f64; 10] {
    let u = |k: u64| uniform(seed, row * 10 + k);
    let mut values = [0.0; 10];
    for (k, value) in values.iter_mut().enumerate() {
        *value = u(k as u64);
    }
    if shift {
        values[0] = values[0] * 1.2 + 0.25;
    }
    values[6] = f64::from(u(6) < if shift { 0.7 } else { 0.5 });
    values[7] = (if shift { u(7).powi(2) } else { u(7) } * 4.0).floor();
    values
}

async fn send_mixed(
    server: &TestServer,
    seed: u64,
    rows: u64,
    shift: bool,
) -> BTreeMap<String, Vec<f64>> {
    send_rows(server, (0..rows).map(|row| mixed_row(seed, row, shift))).await
}

/// Evidently's data drift report (its default test per column) on the same windows:
/// `{column: [test name, score, drifted]}`.
fn evidently(
    reference: &BTreeMap<String, Vec<f64>>,
    current: &BTreeMap<String, Vec<f64>>,
) -> Value {
    let script = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import pandas as pd
from evidently.legacy.metric_preset import DataDriftPreset
from evidently.legacy.pipeline.column_mapping import ColumnMapping
from evidently.legacy.report import Report
d = json.load(sys.stdin)
# "prediction" is a feature here, not Evidently's prediction column.
frame = lambda columns: pd.DataFrame({("answer" if c == "prediction" else c): v for c, v in columns.items()})
reference, current = frame(d["reference"]), frame(d["current"])
report = Report(metrics=[DataDriftPreset()])
report.run(reference_data=reference, current_data=current,
           column_mapping=ColumnMapping(target=None, prediction=None, numerical_features=list(reference.columns)))
out = {}
for metric in report.as_dict()["metrics"]:
    for column, r in metric["result"].get("drift_by_columns", {}).items():
        out["prediction" if column == "answer" else column] = [r["stattest_name"], r["drift_score"], r["drift_detected"]]
print(json.dumps(out))
"#;
    windows_through_python(script, reference, current)
}

/// Same test, same verdict, and the score within `tolerance` (p-values, or the distance).
fn agrees_with_evidently(report: &Value, evidently: &Value, tolerance: f64) -> BTreeSet<String> {
    let names = BTreeMap::from([
        ("ks", "K-S p_value"),
        ("z_test", "Z-test p_value"),
        ("chi_square", "chi-square p_value"),
        ("wasserstein", "Wasserstein distance (normed)"),
        ("jensen_shannon", "Jensen-Shannon distance"),
    ]);
    let mut tests = BTreeSet::new();
    for column in report["columns"].as_array().unwrap() {
        let name = column["column"].as_str().unwrap();
        let test = column["test"].as_str().unwrap();
        let theirs = &evidently[name];
        assert_eq!(
            names[test], theirs[0],
            "{name}: {column} against Evidently {theirs}"
        );
        let score = column["p_value"]
            .as_f64()
            .or(column["statistic"].as_f64())
            .unwrap();
        let their_score = theirs[1].as_f64().unwrap();
        assert!(
            (score - their_score).abs() <= tolerance.max(their_score.abs() * 1e-6),
            "{name}: {column} against Evidently {theirs}"
        );
        assert_eq!(
            column["drifted"], theirs[2],
            "{name}: {column} against Evidently {theirs}"
        );
        println!(
            "{name}: {test} {score:.6} (Evidently {their_score:.6}), drifted {}",
            column["drifted"]
        );
        tests.insert(test.to_string());
    }
    tests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_column_is_judged_as_evidently_judges_it() {
    // (baseline rows, tests Evidently picks for these columns, score tolerance): a baseline of
    // more than 1000 rows is kept as 1000 quantiles, so its distances are close, not equal.
    let cases: [(usize, &[&str], f64); 2] = [
        (ROWS, &["chi_square", "ks", "z_test"], 1e-9),
        (1_500, &["jensen_shannon", "wasserstein"], 2e-3),
    ];
    for (seed, (reference_rows, expected_tests, tolerance)) in (20..).zip(cases) {
        let repository = Repository::new()
            .add("pricing", "gbr", None)
            .write("pricing/pipeline.json", &request_only_pipeline());
        let server = TestServer::start_with(repository, move |c| {
            c.drift_window_rows = ROWS;
            c.drift_reference_rows = reference_rows;
            c.drift_window_seconds = 3600.0;
        })
        .await;
        let reference = send_mixed(&server, seed, reference_rows as u64, false).await;
        let current = send_mixed(&server, seed + 100, ROWS as u64, true).await;
        let view = until_judged(&server, 1).await;
        let report = &view["reports"][0];
        let theirs = evidently(&reference, &current);
        let tests = agrees_with_evidently(report, &theirs, tolerance);
        let expected: BTreeSet<String> = expected_tests.iter().map(|t| t.to_string()).collect();
        assert_eq!(tests, expected, "{report}");
        // The shifted columns drift in both.
        for shifted in ["f0", "f6", "f7"] {
            assert_eq!(theirs[shifted][2], true, "{shifted}: {theirs}");
        }
        server.stop().await;
    }
}
