//! The KServe v2 REST API end to end: health, metadata, configuration, statistics, the binary
//! tensor extension, the repository extension, metrics, and every class of bad request with the
//! status and message a client needs.

use marquee_tests::{Repository, TestServer, f32_bytes, f32_values};
use serde_json::{Value, json};

fn repository() -> Repository {
    Repository::new()
        .add("gbr", "gbr", None)
        .add("add_sub", "add_sub", None)
        .add("identity_all", "identity_all", None)
}

fn gbr_request(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows * 10).map(|i| i as f32 / 10.0).collect();
    json!({"inputs": [{"name": "X", "shape": [rows, 10], "datatype": "FP32", "data": data}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata() {
    let server = TestServer::start(repository()).await;
    assert_eq!(server.get("/v2/health/live").await.0, 200);
    assert_eq!(server.get("/v2/health/ready").await.0, 200);
    let (status, meta) = server.get("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(meta["name"], "marquee");
    for extension in [
        "binary_tensor_data",
        "model_repository",
        "statistics",
        "model_configuration",
        "schedule_policy",
    ] {
        assert!(
            meta["extensions"]
                .as_array()
                .unwrap()
                .contains(&json!(extension)),
            "{extension} missing"
        );
    }
    for path in ["/v2/models/gbr", "/v2/models/gbr/versions/1"] {
        let (status, model) = server.get(path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(model["platform"], "onnxruntime_onnx");
        assert_eq!(model["versions"], json!(["1"]));
        assert_eq!(
            model["inputs"],
            json!([{"name": "X", "datatype": "FP32", "shape": [-1, 10]}])
        );
        assert_eq!(
            model["outputs"],
            json!([{"name": "variable", "datatype": "FP32", "shape": [-1, 1]}])
        );
    }
    let (_, add_sub) = server.get("/v2/models/add_sub").await;
    assert_eq!(
        add_sub["inputs"][0]["shape"],
        json!([4]),
        "no batch dimension without batching"
    );
    assert_eq!(server.get("/v2/models/gbr/ready").await.0, 200);
    assert_eq!(server.get("/v2/models/gbr/versions/1/ready").await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_is_completed_from_the_graph() {
    let server = TestServer::start(repository()).await;
    let (status, config) = server.get("/v2/models/gbr/config").await;
    assert_eq!(status, 200);
    assert_eq!(config["name"], "gbr");
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(config["backend"], "onnxruntime");
    assert_eq!(config["input"][0]["name"], "X");
    assert_eq!(config["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(config["input"][0]["dims"], json!([10]));
    assert_eq!(config["output"][0]["name"], "variable");
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU");
    assert!(config["dynamic_batching"].is_object());
    assert!(config.get("sequence_batching").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_binary_inference() {
    let server = TestServer::start(repository()).await;
    let body = json!({
        "id": "req-7",
        "inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [[0.5, 0.5], [1, 1]]}
        ],
        "outputs": [{"name": "OUTPUT1"}]
    });
    let (status, answer) = server.post("/v2/models/add_sub/infer", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "req-7");
    assert_eq!(answer["model_version"], "1");
    assert_eq!(
        answer["outputs"],
        json!([{"name": "OUTPUT1", "datatype": "FP32", "shape": [4], "data": [0.5, 1.5, 2.0, 3.0]}])
    );

    // Binary extension: JSON header, then the tensor bytes; output asked for as binary.
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
            {"name": "INPUT1", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}, {"name": "OUTPUT1", "parameters": {"binary_data": false}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
    body.extend(f32_bytes(&[10.0, 20.0, 30.0, 40.0]));
    let response = server
        .client
        .post(format!("{}/v2/models/add_sub/infer", server.http))
        .header("Inference-Header-Content-Length", header.len())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let json_length: usize = response.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let answer: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
    assert_eq!(answer["outputs"][0]["parameters"]["binary_data_size"], 16);
    assert!(answer["outputs"][0].get("data").is_none());
    assert_eq!(
        f32_values(&bytes[json_length..]),
        vec![11.0, 22.0, 33.0, 44.0]
    );
    assert_eq!(
        answer["outputs"][1]["data"],
        json!([-9.0, -18.0, -27.0, -36.0])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_round_trips_through_json_and_binary() {
    let server = TestServer::start(repository()).await;
    let values: Vec<(&str, Value)> = vec![
        ("BOOL", json!([true, false, true, true])),
        ("UINT8", json!([0, 255, 7, 1])),
        ("UINT16", json!([0, 65535, 7, 1])),
        ("UINT32", json!([0, 4294967295u64, 7, 1])),
        ("UINT64", json!([0, 18446744073709551615u64, 7, 1])),
        ("INT8", json!([-128, 127, -1, 0])),
        ("INT16", json!([-32768, 32767, -1, 0])),
        ("INT32", json!([-2147483648i64, 2147483647, -1, 0])),
        (
            "INT64",
            json!([-9223372036854775808i64, 9223372036854775807i64, -1, 0]),
        ),
        ("FP16", json!([0.5, -2.0, 1024.0, 0.0])),
        ("BF16", json!([0.5, -2.0, 1024.0, 0.0])),
        ("FP32", json!([0.1, -3.5, 1e30, 0.0])),
        ("FP64", json!([0.1, -3.5, 1e300, 2.2250738585072014e-308])),
        ("BYTES", json!(["", "marquee", "é", "a b"])),
    ];
    let inputs: Vec<Value> = values
        .iter()
        .map(|(dt, data)| json!({"name": format!("IN_{dt}"), "shape": [2, 2], "datatype": dt, "data": data}))
        .collect();
    let (status, answer) = server
        .post("/v2/models/identity_all/infer", json!({ "inputs": inputs }))
        .await;
    assert_eq!(status, 200, "{answer}");
    for (dt, data) in &values {
        let output = answer["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == format!("OUT_{dt}"))
            .unwrap();
        assert_eq!(output["datatype"], *dt);
        assert_eq!(output["shape"], json!([2, 2]));
        assert_eq!(output["data"], *data, "{dt} changed on the way through");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let server = TestServer::start_with(repository(), |c| c.max_request_bytes = 64 * 1024).await;
    let x = |shape: Value, datatype: &str, n: usize| json!({"inputs": [{"name": "X", "shape": shape, "datatype": datatype, "data": vec![0.0; n]}]});
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v2/models/nope/infer",
            gbr_request(1),
            404,
            "model 'nope' is not found",
        ),
        (
            "/v2/models/gbr/versions/9/infer",
            gbr_request(1),
            404,
            "version 9 is not found",
        ),
        (
            "/v2/models/gbr/versions/x/infer",
            gbr_request(1),
            400,
            "'x' is not a whole number",
        ),
        (
            "/v2/models/gbr/infer",
            x(json!([1, 9]), "FP32", 9),
            400,
            "input 'X' has shape [1, 9], model 'gbr' expects [-1, 10]",
        ),
        (
            "/v2/models/gbr/infer",
            x(json!([1, 10]), "FP64", 10),
            400,
            "input 'X' has datatype FP64, model 'gbr' expects FP32",
        ),
        (
            "/v2/models/gbr/infer",
            x(json!([65, 10]), "FP32", 650),
            400,
            "batch size 65, model 'gbr' accepts 1 to 64",
        ),
        (
            "/v2/models/gbr/infer",
            x(json!([2, 10]), "FP32", 10),
            400,
            "needs 80 bytes, got 40",
        ),
        (
            "/v2/models/gbr/infer",
            json!({"inputs": []}),
            400,
            "missing input 'X'",
        ),
        (
            "/v2/models/gbr/infer",
            json!({"inputs": [{"name": "Y", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            400,
            "model 'gbr' has no input 'Y' (inputs: 'X')",
        ),
        (
            "/v2/models/gbr/infer",
            json!({"inputs": gbr_request(1)["inputs"], "outputs": [{"name": "nope"}]}),
            400,
            "model 'gbr' has no output 'nope'",
        ),
        (
            "/v2/models/gbr/infer",
            json!({"inputs": gbr_request(1)["inputs"], "parameters": {"priority": 5}}),
            400,
            "priority 5 is out of range",
        ),
        (
            "/v2/models/gbr/infer",
            json!({"inputs": gbr_request(1)["inputs"], "parameters": {"sequence_id": 3}}),
            501,
            "sequence requests",
        ),
        (
            "/v2/models/gbr/infer",
            gbr_request(1000),
            413,
            "larger than the server's limit of 65536 bytes",
        ),
    ];
    for (path, body, status, message) in cases {
        let (got, answer) = server.post(path, body).await;
        assert_eq!(got, status, "{path}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {answer}"));
        assert!(
            error.contains(message),
            "{path}: '{error}' should say '{message}'"
        );
    }
    let response = server
        .client
        .post(format!("{}/v2/models/gbr/infer", server.http))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("invalid JSON body")
    );
    let (status, answer) = server.get("/v2/no/such/route").await;
    assert_eq!(status, 404);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no route for GET /v2/no/such/route")
    );
    // The server still answers after all of that.
    assert_eq!(
        server.post("/v2/models/gbr/infer", gbr_request(2)).await.0,
        200
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_and_metrics_count_requests() {
    let server = TestServer::start(repository()).await;
    for _ in 0..3 {
        assert_eq!(
            server.post("/v2/models/gbr/infer", gbr_request(2)).await.0,
            200
        );
    }
    let bad = json!({"inputs": [{"name": "X", "shape": [1, 10], "datatype": "FP64", "data": vec![0.0; 10]}]});
    assert_eq!(server.post("/v2/models/gbr/infer", bad).await.0, 400);
    let (status, stats) = server.get("/v2/models/gbr/stats").await;
    assert_eq!(status, 200);
    let gbr = &stats["model_stats"][0];
    assert_eq!(gbr["name"], "gbr");
    assert_eq!(gbr["version"], "1");
    assert_eq!(gbr["inference_count"], 6);
    assert_eq!(gbr["execution_count"], 3);
    assert_eq!(gbr["inference_stats"]["success"]["count"], 3);
    assert_eq!(gbr["inference_stats"]["fail"]["count"], 1);
    assert_eq!(gbr["inference_stats"]["queue"]["count"], 3);
    assert!(
        gbr["inference_stats"]["compute_infer"]["ns"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(gbr["batch_stats"][0]["batch_size"], 2);
    assert_eq!(gbr["batch_stats"][0]["compute_infer"]["count"], 3);
    assert!(gbr["last_inference"].as_u64().unwrap() > 1_700_000_000_000);
    let (_, all) = server.get("/v2/models/stats").await;
    assert_eq!(all["model_stats"].as_array().unwrap().len(), 3);

    let metrics = server.metrics_text().await;
    for line in [
        r#"marquee_requests_total{model="gbr",outcome="success",version="1"} 3"#,
        r#"marquee_requests_total{model="gbr",outcome="invalid_input",version="1"} 1"#,
        r#"marquee_inferences_total{model="gbr",version="1"} 6"#,
        r#"marquee_executions_total{model="gbr",version="1"} 3"#,
        r#"marquee_batch_size_count{model="gbr",version="1"} 3"#,
        r#"marquee_queue_depth{model="gbr",version="1"} 0"#,
    ] {
        assert!(metrics.contains(line), "metrics lack {line}");
    }
    for family in [
        "marquee_request_duration_seconds_bucket",
        "marquee_queue_duration_seconds_bucket",
        "marquee_compute_duration_seconds_bucket",
        "process_cpu_seconds_total",
    ] {
        assert!(metrics.contains(family), "metrics lack {family}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_index_load_and_unload() {
    let repository = repository().write("broken/1/model.onnx", b"this is not an ONNX model");
    let server = TestServer::start(repository).await;
    assert_eq!(
        server.get("/v2/health/ready").await.0,
        503,
        "a model failed to load"
    );
    let (status, index) = server.post("/v2/repository/index", json!({})).await;
    assert_eq!(status, 200);
    let entries = index.as_array().unwrap();
    let broken = entries.iter().find(|e| e["name"] == "broken").unwrap();
    assert_eq!(broken["state"], "UNAVAILABLE");
    assert!(
        broken["reason"]
            .as_str()
            .unwrap()
            .contains("ONNX Runtime cannot load the model"),
        "{broken}"
    );
    assert!(entries.contains(&json!({"name": "gbr", "version": "1", "state": "READY"})));
    let (_, ready_only) = server
        .post("/v2/repository/index", json!({"ready": true}))
        .await;
    assert_eq!(ready_only.as_array().unwrap().len(), 3);

    let (status, answer) = server.post("/v2/models/broken/infer", gbr_request(1)).await;
    assert_eq!(status, 503);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("model 'broken' is not available")
    );

    assert_eq!(
        server
            .post("/v2/repository/models/gbr/unload", json!({}))
            .await
            .0,
        200
    );
    assert_eq!(server.get("/v2/models/gbr/ready").await.0, 503);
    let (status, answer) = server.post("/v2/models/gbr/infer", gbr_request(1)).await;
    assert_eq!(status, 503);
    assert!(answer["error"].as_str().unwrap().contains("unloaded"));
    let (status, answer) = server
        .post("/v2/repository/models/gbr/unload", json!({}))
        .await;
    assert_eq!(status, 404, "{answer}");

    // Reload with a configuration override, as Triton's load API allows.
    let config = json!({"max_batch_size": 8, "dynamic_batching": {}}).to_string();
    let (status, answer) = server
        .post(
            "/v2/repository/models/gbr/load",
            json!({"parameters": {"config": config}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (_, config) = server.get("/v2/models/gbr/config").await;
    assert_eq!(config["max_batch_size"], 8);
    assert_eq!(
        server.post("/v2/models/gbr/infer", gbr_request(8)).await.0,
        200
    );
    assert_eq!(
        server.post("/v2/models/gbr/infer", gbr_request(9)).await.0,
        400
    );

    let (status, answer) = server
        .post("/v2/repository/models/ghost/load", json!({}))
        .await;
    assert_eq!(status, 404);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not in the model repository")
    );
    let (status, answer) = server
        .post(
            "/v2/repository/models/gbr/load",
            json!({"parameters": {"config": "{\"max_batch\": 1}"}}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("max_batch"),
        "{answer}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_returns_top_classes() {
    let server = TestServer::start(repository()).await;
    let body = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 5, 3, 2]},
            {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [0, 0, 0, 0]}
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}}]
    });
    let (status, answer) = server.post("/v2/models/add_sub/infer", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["datatype"], "BYTES");
    assert_eq!(
        answer["outputs"][0]["data"],
        json!(["5.000000:1", "3.000000:2"])
    );
    server.stop().await;
}

/// On a machine without CUDA, a KIND_GPU model is refused with the reason (it never silently runs
/// on the CPU); the server says so in the repository index and is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_instances_without_cuda_are_refused_with_the_reason() {
    let config = "max_batch_size: 8\ninstance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n";
    let server = TestServer::start(Repository::new().add("gbr_gpu", "gbr", Some(config))).await;
    assert_eq!(server.get("/v2/health/ready").await.0, 503);
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let reason = index[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("no CUDA support")
            || reason.contains("CUDA execution provider unavailable"),
        "{reason}"
    );
    server.stop().await;
}

/// A build without the torch backend refuses a TorchScript model by name and says how to get it;
/// the ONNX model beside it serves.
#[cfg(not(feature = "torch"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_models_need_the_torch_build_and_say_so() {
    let config = "platform: \"pytorch_libtorch\"\nmax_batch_size: 8\n\
        input [ { name: \"INPUT__0\", data_type: TYPE_FP32, dims: [ 8 ] } ]\n\
        output [ { name: \"OUTPUT__0\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n";
    let repository = Repository::new()
        .add("gbr", "gbr", None)
        .write("mlp/config.pbtxt", config.as_bytes())
        .write("mlp/1/model.pt", b"a TorchScript archive");
    let server = TestServer::start(repository).await;
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let mlp = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "mlp")
        .unwrap();
    let reason = mlp["reason"].as_str().unwrap();
    assert!(
        reason.contains("--features marquee-serving/torch"),
        "{reason}"
    );
    let gbr = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "gbr")
        .unwrap();
    assert_eq!(gbr["state"], "READY");
    server.stop().await;
}
