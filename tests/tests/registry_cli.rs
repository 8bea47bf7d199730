//! The `marquee registry` CLI as data scientists and scripts use it: the real binary, run as a
//! process against a local folder and against a real S3-compatible server, checked through its
//! `--json` output, its text output and the exit codes scripts rely on.

use std::path::{Path, PathBuf};

use marquee_tests::{CliRun, S3Server, fixtures, run_marquee};
use serde_json::Value;

/// Runs `marquee registry ARGS` with the registry given by `MARQUEE_REGISTRY`, as scripts do.
fn registry(location: &str, extra: &[String], args: &[&str]) -> CliRun {
    let mut all = vec!["registry"];
    all.extend(extra.iter().map(String::as_str));
    all.extend(args);
    run_marquee(&all, &[("MARQUEE_REGISTRY", location), ("USER", "alice")])
}

fn model_file(fixture: &str) -> PathBuf {
    fixtures().join("models").join(fixture).join("1/model.onnx")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary paths")
}

#[test]
fn a_model_goes_from_push_to_production_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let location = path(dir.path());
    let cli = |args: &[&str]| registry(location, &[], args);
    let gbr = model_file("gbr");

    let pushed = cli(&[
        "push",
        "pricing",
        path(&gbr),
        "--metric",
        "rmse=0.31",
        "--gate",
        "rmse<=0.25",
        "--tag",
        "team=pricing",
        "--dataset",
        "s3://data/pricing.parquet",
        "--json",
    ])
    .json();
    assert_eq!(pushed["version"], 1);
    assert_eq!(pushed["created_by"], "alice");
    assert_eq!(pushed["tags"]["team"], "pricing");
    assert_eq!(
        pushed["lineage"]["dataset_uri"],
        "s3://data/pricing.parquet"
    );
    let inputs = &pushed["signature"]["inputs"];
    assert_eq!(inputs[0]["name"], "X", "signature read from the ONNX graph");
    assert_eq!(inputs[0]["datatype"], "FP32");

    // The text form says what happened in one line.
    let second = cli(&[
        "push",
        "pricing",
        path(&model_file("gbr_alt")),
        "--metric",
        "rmse=0.2",
        "--gate",
        "rmse<=0.25",
    ]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stdout.starts_with("pricing version 2 pushed"),
        "{}",
        second.stdout
    );

    let models = cli(&["list", "--json"]).json();
    assert_eq!(models[0]["model"], "pricing");
    assert_eq!(models[0]["versions"], serde_json::json!([1, 2]));
    let listed = cli(&["list"]);
    assert!(
        listed.stdout.contains("MODEL") && listed.stdout.contains("pricing"),
        "{}",
        listed.stdout
    );

    // Stages move one step at a time; production needs an approver and the gates.
    let skipped = cli(&[
        "promote",
        "pricing",
        "2",
        "--to",
        "production",
        "--approved-by",
        "bob",
    ]);
    assert_eq!(skipped.code, 5, "{}", skipped.stderr);
    assert!(
        skipped.stderr.contains("one step at a time"),
        "{}",
        skipped.stderr
    );
    assert_eq!(cli(&["promote", "pricing", "1", "--to", "staging"]).code, 0);
    assert_eq!(cli(&["promote", "pricing", "2", "--to", "staging"]).code, 0);
    let unapproved = cli(&["promote", "pricing", "2", "--to", "production"]);
    assert_eq!(unapproved.code, 5);
    assert!(
        unapproved.stderr.contains("needs --approved-by"),
        "{}",
        unapproved.stderr
    );
    let failing_gate = cli(&[
        "promote",
        "pricing",
        "1",
        "--to",
        "production",
        "--approved-by",
        "bob",
    ]);
    assert_eq!(failing_gate.code, 5);
    assert!(
        failing_gate.stderr.contains("rmse"),
        "the failing gate is named: {}",
        failing_gate.stderr
    );
    let promoted = cli(&[
        "promote",
        "pricing",
        "2",
        "--to",
        "production",
        "--approved-by",
        "bob",
        "--reason",
        "better rmse",
        "--json",
    ])
    .json();
    assert_eq!(promoted["stages"]["2"]["stage"], "production");

    let shown = cli(&["show", "pricing", "production", "--json"]).json();
    assert_eq!(shown["version"], 2, "a stage resolves like an alias");
    assert_eq!(shown["stage"], "production");
    assert_eq!(shown["approved_by"], "bob");

    let diff = cli(&["diff", "pricing", "1", "2", "--json"]).json();
    let rmse = diff["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["field"] == "metrics.rmse")
        .unwrap_or_else(|| panic!("the metric change is listed: {diff}"));
    assert_eq!(
        (rmse["a"].as_f64(), rmse["b"].as_f64()),
        (Some(0.31), Some(0.2))
    );

    // Aliases, and archive refused while one points at the version.
    assert_eq!(cli(&["alias", "set", "pricing", "champion", "1"]).code, 0);
    let archive = cli(&["archive", "pricing", "1"]);
    assert_eq!(archive.code, 5);
    assert!(archive.stderr.contains("champion"), "{}", archive.stderr);
    assert_eq!(cli(&["alias", "rm", "pricing", "champion"]).code, 0);
    assert_eq!(cli(&["archive", "pricing", "1"]).code, 0);
    let archived = cli(&["alias", "set", "pricing", "champion", "1"]);
    assert_eq!(archived.code, 5, "{}", archived.stderr);

    let history = cli(&["history", "pricing", "--json"]).json();
    let actions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["change"]["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "promote",
            "promote",
            "promote",
            "alias_set",
            "alias_remove",
            "archive"
        ],
        "{history}"
    );
    let reasons: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["change"]["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"better rmse"), "{history}");

    // Pull what production runs and check it is byte for byte what was pushed.
    let into = tempfile::tempdir().unwrap();
    let pulled = cli(&["pull", "pricing", "production", path(into.path())]);
    assert_eq!(pulled.code, 0, "{}", pulled.stderr);
    assert_eq!(
        std::fs::read(into.path().join("model.onnx")).unwrap(),
        std::fs::read(model_file("gbr_alt")).unwrap()
    );
    assert_eq!(cli(&["verify", "pricing", "2"]).code, 0);
}

#[test]
fn failures_have_exit_codes_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let location = path(dir.path());
    let cli = |args: &[&str]| registry(location, &[], args);
    assert_eq!(
        cli(&["push", "fraud", path(&model_file("iforest"))]).code,
        0
    );

    let unknown = cli(&["show", "nobody"]);
    assert_eq!(unknown.code, 3);
    assert!(
        unknown.stderr.contains("'nobody' is not found"),
        "{}",
        unknown.stderr
    );
    let no_version = cli(&["show", "fraud", "7"]);
    assert_eq!(no_version.code, 3);
    assert!(
        no_version.stderr.contains("versions: [1]"),
        "{}",
        no_version.stderr
    );

    let bad_metric = cli(&[
        "push",
        "fraud",
        path(&model_file("iforest")),
        "--metric",
        "auc",
    ]);
    assert_eq!(bad_metric.code, 2, "{}", bad_metric.stderr);
    assert!(bad_metric.stderr.contains("auc"), "{}", bad_metric.stderr);
    let missing_file = cli(&["push", "fraud", "/nonexistent/model.onnx"]);
    assert_ne!(missing_file.code, 0);
    assert!(
        missing_file.stderr.contains("/nonexistent/model.onnx"),
        "{}",
        missing_file.stderr
    );
    let not_a_model = dir.path().join("junk.onnx");
    std::fs::write(&not_a_model, b"junk").unwrap();
    let junk = cli(&["push", "fraud", path(&not_a_model)]);
    assert_eq!(junk.code, 2, "{}", junk.stderr);
    assert_eq!(
        cli(&["list", "fraud", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "failed pushes leave no version behind"
    );

    // A file changed on the store after the push: verify names it and exits 6.
    std::fs::write(dir.path().join("fraud/1/model.onnx"), b"tampered").unwrap();
    let verify = cli(&["verify", "fraud", "1"]);
    assert_eq!(verify.code, 6, "{}", verify.stderr);
    assert!(verify.stdout.contains("MISMATCH"), "{}", verify.stdout);
    let into = tempfile::tempdir().unwrap();
    let pull = cli(&["pull", "fraud", "1", path(into.path())]);
    assert_eq!(pull.code, 6, "a corrupted pull is refused: {}", pull.stderr);
    let left: Vec<_> = std::fs::read_dir(into.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "a refused pull leaves no file behind: {left:?}"
    );

    let bad_location = registry("ftp://example.com/x", &[], &["list"]);
    assert_eq!(bad_location.code, 2, "{}", bad_location.stderr);
    assert!(
        bad_location.stderr.contains("ftp"),
        "{}",
        bad_location.stderr
    );
}

#[test]
fn a_triton_repository_is_imported_as_registry_versions() {
    let dir = tempfile::tempdir().unwrap();
    let location = path(dir.path());
    // The ONNX models of the fixture repository (it may also hold TorchScript ones).
    let pipeline = std::fs::read(fixtures().join("models/gbr/pipeline.json")).unwrap();
    let triton = marquee_tests::Repository::new()
        .add("add_sub", "add_sub", None)
        .add("gbr", "gbr", None)
        .write("gbr/pipeline.json", &pipeline)
        .add("iforest", "iforest", None)
        .add("identity_all", "identity_all", None);
    let imported = registry(
        location,
        &[],
        &["import-triton", path(triton.path()), "--json"],
    )
    .json();
    let names: Vec<&str> = imported
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["model"].as_str())
        .collect();
    for model in ["add_sub", "gbr", "iforest", "identity_all"] {
        assert!(names.contains(&model), "{model} imported: {imported}");
    }
    let add_sub = registry(location, &[], &["show", "add_sub", "--json"]).json();
    assert_eq!(
        add_sub["config"]["platform"], "onnxruntime_onnx",
        "config.pbtxt became the manifest's config: {add_sub}"
    );
    assert_eq!(registry(location, &[], &["verify", "add_sub", "1"]).code, 0);
    let gbr = registry(location, &[], &["show", "gbr", "--json"]).json();
    assert_eq!(
        gbr["pipeline"]["input"], "X",
        "pipeline.json became the manifest's pipeline: {gbr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_on_s3() {
    let s3 = S3Server::start().await;
    let options: Vec<String> = s3
        .options()
        .into_iter()
        .flat_map(|(k, v)| ["--registry-option".to_string(), format!("{k}={v}")])
        .collect();
    let location = s3.url("cli");
    let gbr = model_file("gbr");
    let pushed = registry(
        &location,
        &options,
        &["push", "pricing", path(&gbr), "--json"],
    )
    .json();
    assert_eq!(pushed["version"], 1);
    assert_eq!(
        registry(
            &location,
            &options,
            &["alias", "set", "pricing", "champion", "1"]
        )
        .code,
        0
    );
    let listed = registry(&location, &options, &["list", "--json"]).json();
    assert_eq!(listed[0]["aliases"]["champion"], 1, "{listed}");
    let into = tempfile::tempdir().unwrap();
    let pulled = registry(
        &location,
        &options,
        &["pull", "pricing", "champion", path(into.path())],
    );
    assert_eq!(pulled.code, 0, "{}", pulled.stderr);
    assert_eq!(
        std::fs::read(into.path().join("model.onnx")).unwrap(),
        std::fs::read(&gbr).unwrap()
    );
}

/// The whole data-scientist loop: one command to push, two to promote, and serving picks the
/// version up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_picks_up_what_the_cli_promotes() {
    let dir = tempfile::tempdir().unwrap();
    let location = path(dir.path()).to_string();
    let cli = |args: &[&str]| registry(&location, &[], args);
    // Any local file name: the registry stores it as model.onnx.
    let artifact = dir.path().join("pricing-2026-11.onnx");
    std::fs::copy(model_file("gbr"), &artifact).unwrap();
    let server = marquee_tests::TestServer::start_registry(dir.path()).await;

    let config = dir.path().join("config.pbtxt");
    std::fs::write(&config, "max_batch_size: 32\ndynamic_batching { }\n").unwrap();
    let pushed = cli(&[
        "push",
        "pricing",
        path(&artifact),
        "--config",
        path(&config),
    ]);
    assert_eq!(pushed.code, 0, "{}", pushed.stderr);
    assert_eq!(cli(&["promote", "pricing", "1", "--to", "staging"]).code, 0);
    let promoted = cli(&[
        "promote",
        "pricing",
        "1",
        "--to",
        "production",
        "--approved-by",
        "bob",
    ]);
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);

    let started = std::time::Instant::now();
    while server.get("/v2/models/pricing/ready").await.0 != 200 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "serving never loaded the promoted version"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let reference = &marquee_tests::reference()["gbr"];
    let mut input = reference["inputs"]["X"].clone();
    input["name"] = "X".into();
    let (status, answer) = server
        .post(
            "/v2/models/pricing/infer",
            serde_json::json!({"inputs": [input]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_version"], "1");
    let got: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let want: Vec<f64> = reference["outputs"]["variable"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    marquee_tests::assert_close(&got, &want, 1e-5, "gbr pushed and promoted by the CLI");
    server.stop().await;
}
