//! Serving from the registry: a data scientist pushes and promotes, serving follows without a
//! restart and without failing or mixing a single request; broken versions are refused while the
//! old one keeps serving; the previous production version stays warm for rollback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use marquee_proto::inference as pb;
use marquee_registry::{Manifest, PushFile, Quiet, Registry, Stage};
use marquee_tests::{TestServer, f32_bytes, f32_values, fixtures};
use serde_json::json;

fn manifest() -> Manifest {
    marquee_tests::manifest(
        json!({"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_microseconds": 500}}),
    )
}

async fn push(registry: &Registry, model: &str, fixture: &str) -> u64 {
    let bytes =
        std::fs::read(fixtures().join("models").join(fixture).join("1/model.onnx")).unwrap();
    let file = PushFile {
        path: "model.onnx".into(),
        contents: Bytes::from(bytes),
    };
    registry
        .push(model, vec![file], manifest(), &Quiet)
        .await
        .unwrap()
        .version
}

async fn to_production(registry: &Registry, model: &str, version: u64) {
    registry
        .promote(model, version, Stage::Staging, None, "tests", "")
        .await
        .unwrap();
    registry
        .promote(
            model,
            version,
            Stage::Production,
            Some("reviewer"),
            "tests",
            "",
        )
        .await
        .unwrap();
}

fn request(version: &str) -> pb::ModelInferRequest {
    let x: Vec<f32> = (0..10).map(|i| i as f32 * 0.3 - 1.0).collect();
    pb::ModelInferRequest {
        model_name: "pricing".into(),
        model_version: version.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 10],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x).into()],
        ..Default::default()
    }
}

/// The answer and the version that gave it.
async fn ask(server: &TestServer, version: &str) -> (String, f32) {
    let response = server
        .grpc_client()
        .await
        .model_infer(request(version))
        .await
        .unwrap()
        .into_inner();
    (
        response.model_version,
        f32_values(&response.raw_output_contents[0])[0],
    )
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_swaps_under_load_with_no_failed_and_no_mixed_answer() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    let v1 = push(&registry, "pricing", "gbr").await;
    to_production(&registry, "pricing", v1).await;
    let server = TestServer::start_registry(dir.path()).await;
    let (version, y1) = ask(&server, "").await;
    assert_eq!(
        version, "1",
        "production answers requests that name no version"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            let url = server.grpc.clone();
            tokio::spawn(async move {
                let mut client =
                    pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                        .await
                        .unwrap();
                let mut answers = Vec::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.model_infer(request("")).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            answers
                                .push((r.model_version, f32_values(&r.raw_output_contents[0])[0]));
                        }
                        Err(status) => failures.push(status.to_string()),
                    }
                }
                (answers, failures)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = push(&registry, "pricing", "gbr_alt").await;
    to_production(&registry, "pricing", v2).await;
    until("the swap to version 2", async || {
        ask(&server, "").await.0 == "2"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (_, y2) = ask(&server, "2").await;
    assert_ne!(
        y1, y2,
        "the two versions must answer differently for this test to see mixing"
    );

    let (mut total, mut by_version) = (0, [0usize; 2]);
    for client in clients {
        let (answers, failures) = client.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during the swap: {failures:?}"
        );
        for (version, y) in answers {
            total += 1;
            match version.as_str() {
                "1" => {
                    assert_eq!(y, y1, "version 1 answered with another version's output");
                    by_version[0] += 1;
                }
                "2" => {
                    assert_eq!(y, y2, "version 2 answered with another version's output");
                    by_version[1] += 1;
                }
                other => panic!("answer from unexpected version {other}"),
            }
        }
    }
    assert!(
        by_version[0] > 0 && by_version[1] > 0,
        "both versions served during the run: {by_version:?}"
    );
    assert!(total > 100, "the load was sustained ({total} requests)");

    // The previous production version stays warm for rollback, and answers by number.
    let (_, metadata) = server.get("/v2/models/pricing").await;
    assert_eq!(metadata["versions"], json!(["1", "2"]));
    assert_eq!(ask(&server, "1").await, ("1".to_string(), y1));
    assert_eq!(
        ask(&server, "production").await.0,
        "2",
        "aliases name versions too"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_refused_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    let v1 = push(&registry, "pricing", "gbr").await;
    to_production(&registry, "pricing", v1).await;
    let server = TestServer::start_registry(dir.path()).await;
    let (_, y1) = ask(&server, "").await;

    // A version whose artifact changed on the store after it was pushed.
    let v2 = push(&registry, "pricing", "gbr_alt").await;
    std::fs::write(
        dir.path().join(format!("pricing/{v2}/model.onnx")),
        b"tampered",
    )
    .unwrap();
    to_production(&registry, "pricing", v2).await;
    until("version 2 refused", async || {
        let (_, index) = server.post("/v2/repository/index", json!({})).await;
        index
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["version"] == "2" && e["state"] == "UNAVAILABLE")
    })
    .await;
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let refused = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["version"] == "2")
        .unwrap();
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("the manifest says"),
        "{refused}"
    );
    assert_eq!(
        ask(&server, "").await,
        ("1".to_string(), y1),
        "version 1 keeps answering"
    );
    assert_eq!(
        server.get("/v2/health/ready").await.0,
        200,
        "a refused version does not take the server down"
    );

    // A file that is not a model at all, behind another alias.
    let v3 = registry
        .push(
            "pricing",
            vec![PushFile {
                path: "model.onnx".into(),
                contents: Bytes::from_static(b"not onnx"),
            }],
            manifest(),
            &Quiet,
        )
        .await
        .unwrap()
        .version;
    registry
        .set_alias("pricing", "canary", v3, "tests", "")
        .await
        .unwrap();
    until("version 3 refused", async || {
        let (_, index) = server.post("/v2/repository/index", json!({})).await;
        index
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["version"] == "3" && e["state"] == "UNAVAILABLE")
    })
    .await;
    let (status, answer) = server
        .post(
            "/v2/models/pricing/versions/canary/infer",
            json!({"inputs": []}),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(ask(&server, "").await.0, "1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_appear_when_aliased_and_pinned_versions_stay() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    push(&registry, "pricing", "gbr").await;
    let server = TestServer::start_registry(dir.path()).await;
    assert_eq!(
        server.get("/v2/health/ready").await.0,
        200,
        "an unaliased model is not served, not an error"
    );
    assert_eq!(server.get("/v2/models/pricing").await.0, 404);
    registry
        .set_alias("pricing", "shadow", 1, "tests", "")
        .await
        .unwrap();
    until("the aliased model to load", async || {
        server.get("/v2/models/pricing/ready").await.0 == 200
    })
    .await;
    let (_, metadata) = server.get("/v2/models/pricing/versions/shadow").await;
    assert_eq!(metadata["versions"], json!(["1"]));
    registry
        .remove_alias("pricing", "shadow", "tests", "")
        .await
        .unwrap();
    registry
        .set_alias("pricing", "other", 1, "tests", "")
        .await
        .unwrap();
    until("the alias move", async || {
        server
            .get("/v2/models/pricing/versions/other/ready")
            .await
            .0
            == 200
    })
    .await;
    assert_eq!(
        server
            .get("/v2/models/pricing/versions/shadow/ready")
            .await
            .0,
        404
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_extension_works_on_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    let v1 = push(&registry, "pricing", "gbr").await;
    to_production(&registry, "pricing", v1).await;
    push(&registry, "fraud", "iforest").await;
    let server = TestServer::start_registry(dir.path()).await;

    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    assert_eq!(
        index,
        json!([{"name": "fraud"}, {"name": "pricing", "state": "READY", "version": "1"}]),
        "every registry model is listed; only served ones have a state"
    );

    let (status, body) = server
        .post("/v2/repository/models/pricing/unload", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = server.get("/v2/models/pricing/ready").await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (503, "model 'pricing' is not available: unloaded"),
        "an unloaded model stays unloaded while the registry is polled"
    );

    let (status, body) = server
        .post("/v2/repository/models/fraud/load", json!({}))
        .await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("promote or alias a version"),
        "{body}"
    );
    let (status, body) = server
        .post("/v2/repository/models/pricing/load", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ask(&server, "").await.0, "1", "production serves again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_rolls_production_back_and_serving_follows_within_a_poll() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("registry");
    let registry = Registry::open(location.to_str().unwrap()).unwrap();
    let v1 = push(&registry, "pricing", "gbr").await;
    let v2 = push(&registry, "pricing", "gbr_alt").await;
    let v3 = push(&registry, "pricing", "gbr").await;
    to_production(&registry, "pricing", v1).await;
    to_production(&registry, "pricing", v2).await;
    let server = TestServer::start_registry(&location).await;
    assert_eq!(ask(&server, "").await.0, v2.to_string());

    let cli = |args: &[&str]| {
        let mut all = vec![
            "registry",
            "--registry",
            location.to_str().unwrap(),
            "--json",
        ];
        all.extend_from_slice(args);
        marquee_tests::run_marquee(&all, &[("USER", "oncall")])
    };
    let refs = cli(&["rollback", "pricing", "--reason", "v2 overprices"]).json();
    assert_eq!(refs["aliases"]["production"], v1);
    assert_eq!(refs["change"]["action"], "rollback");
    assert_eq!(refs["change"]["by"], "oncall");
    assert_eq!(refs["change"]["reason"], "v2 overprices");
    assert_eq!(refs["change"]["previous"], v2);
    // No new approval: v1 keeps the one it had; v2 goes back to staging, not to dev.
    assert_eq!(refs["stages"][v1.to_string()]["approved_by"], "reviewer");
    assert_eq!(refs["stages"][v2.to_string()]["stage"], "staging");
    let started = Instant::now();
    until("serving follows the rollback", async || {
        ask(&server, "").await.0 == v1.to_string()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // Forward again to a named earlier production version; a version never in production is refused.
    let refs = cli(&["rollback", "pricing", "--to", &v2.to_string()]).json();
    assert_eq!(refs["aliases"]["production"], v2);
    let refused = cli(&["rollback", "pricing", "--to", &v3.to_string()]);
    assert_eq!(refused.code, 5, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("never in production"),
        "{}",
        refused.stderr
    );
    let history = registry.history("pricing").await.unwrap();
    let rollbacks: Vec<u64> = history
        .iter()
        .filter_map(|r| r.change.as_ref())
        .filter(|c| c.action == marquee_registry::refs::Action::Rollback)
        .filter_map(|c| c.version)
        .collect();
    assert_eq!(rollbacks, vec![v1, v2]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_references_cannot_be_read_does_not_stop_the_others_from_following() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    // "broken" sorts before "pricing", so a poll that stopped at the first failure would never
    // look at pricing.
    let broken = push(&registry, "broken", "gbr").await;
    to_production(&registry, "broken", broken).await;
    let v1 = push(&registry, "pricing", "gbr").await;
    let v2 = push(&registry, "pricing", "gbr_alt").await;
    to_production(&registry, "pricing", v1).await;
    let server = TestServer::start_registry(dir.path()).await;
    assert_eq!(ask(&server, "").await.0, v1.to_string());

    // A revision that does not parse: every poll fails to read broken's references.
    let refs = dir.path().join("broken/refs");
    let next = std::fs::read_dir(&refs).unwrap().count() + 1;
    std::fs::write(refs.join(format!("{next:012}.json")), b"{ not json").unwrap();
    to_production(&registry, "pricing", v2).await;
    until(
        "pricing follows its promotion past the broken model",
        async || ask(&server, "").await.0 == v2.to_string(),
    )
    .await;
    server.stop().await;
}
