//! The drift monitor end to end (`serving/src/drift.rs`): a version pushed without a baseline
//! takes its first rows as one (flagged), an unshifted window raises nothing, a window with two
//! shifted features drifts on exactly those features, and the verdicts agree with scipy's
//! `ks_2samp` on the same values. A drifting window is a metric, a `drift.detected` event and
//! one run of the model's drift command.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use marquee_serving::config::EventSinkKind;
use marquee_tests::{
    Repository, TestServer, read_parquet_tree, request_only_pipeline, string_column,
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

/// Sends one window of rows; returns every column's values as the server saw them.
async fn send(server: &TestServer, seed: u64, shift: bool) -> BTreeMap<String, Vec<f64>> {
    let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for row in 0..ROWS as u64 {
        let mut features = serde_json::Map::new();
        for k in 0..10u64 {
            let name = format!("f{k}");
            let mut value = uniform(seed, row * 10 + k);
            if shift && SHIFTED.contains(&name.as_str()) {
                value = value * 1.2 + 0.25;
            }
            columns.entry(name.clone()).or_default().push(value);
            features.insert(name, value.into());
        }
        let (status, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing", "features": features}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
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
    let python = marquee_tests::root().join(".marquee/venv/bin/python");
    let script = "import json, sys\nfrom scipy import stats\nd = json.load(sys.stdin)\n\
        print(json.dumps({c: list(stats.ks_2samp(d['reference'][c], d['current'][c])[:2]) for c in d['reference']}))";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the test venv's python");
    let input = json!({"reference": reference, "current": current}).to_string();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
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
    server.stop().await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "pricing 1\n");
    let detected = read_parquet_tree(&events.path().join("events/drift"));
    assert_eq!(detected.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    assert_eq!(string_column(&detected[0], "kind"), ["drift.detected"]);
    assert_eq!(string_column(&detected[0], "model"), ["pricing"]);
}
