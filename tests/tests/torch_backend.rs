//! The TorchScript backend (libtorch through tch), end to end: the fixture modules that torch
//! saved (make_torch_fixtures.py) served from a Triton repository and from the registry, over
//! REST and gRPC, with answers equal to what torch computes (torch_reference.json); requests
//! batched as for ONNX; configurations that cannot serve refused with the reason.
//!
//! Built only with `--features torch` (tests/run.sh builds it so); a build without the backend
//! refuses TorchScript models, which `rest_api.rs` checks.
#![cfg(feature = "torch")]

use std::time::Duration;

use bytes::Bytes;
use marquee_proto::inference as pb;
use marquee_registry::{PushFile, Quiet, Registry, Stage};
use marquee_tests::{
    Repository, TestServer, assert_close, assert_reference_outputs, fixtures, json_numbers,
    reference_request, torch_reference,
};
use serde_json::{Value, json};

/// The same libtorch on the same inputs; only the thread split of the matrix products may differ.
const TOLERANCE: f64 = 1e-5;

fn repository() -> Repository {
    Repository::new().add("torch_mlp", "torch_mlp", None).add(
        "torch_two_inputs",
        "torch_two_inputs",
        None,
    )
}

/// Little-endian bytes of a reference tensor's values, in its datatype.
fn raw(tensor: &Value) -> Vec<u8> {
    let values = json_numbers(&tensor["data"]);
    match tensor["datatype"].as_str().unwrap() {
        "FP32" => values
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect(),
        "INT64" => values
            .iter()
            .flat_map(|v| (*v as i64).to_le_bytes())
            .collect(),
        other => panic!("reference datatype {other}"),
    }
}

fn from_raw(datatype: &str, bytes: &[u8]) -> Vec<f64> {
    match datatype {
        "FP32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "INT64" => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("output datatype {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_models_answer_as_torch_does_over_rest() {
    let server = TestServer::start(repository()).await;
    let reference = torch_reference();
    for model in ["torch_mlp", "torch_two_inputs"] {
        let case = &reference[model];
        let (status, body) = server
            .post(
                &format!("/v2/models/{model}/infer"),
                reference_request(case),
            )
            .await;
        assert_eq!(status, 200, "{model}: {body}");
        assert_eq!(
            body["outputs"].as_array().unwrap().len(),
            case["outputs"].as_object().unwrap().len()
        );
        assert_reference_outputs(&body, case, TOLERANCE, model);
    }
    let (status, config) = server.get("/v2/models/torch_mlp/config").await;
    assert_eq!(status, 200);
    assert_eq!(config["platform"], "pytorch_libtorch");
    assert_eq!(config["backend"], "pytorch");
    assert_eq!(config["default_model_filename"], "model.pt");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_models_answer_as_torch_does_over_grpc() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    let reference = torch_reference();
    for model in ["torch_mlp", "torch_two_inputs"] {
        let case = &reference[model];
        let mut request = pb::ModelInferRequest {
            model_name: model.into(),
            ..Default::default()
        };
        for (name, tensor) in case["inputs"].as_object().unwrap() {
            request
                .inputs
                .push(pb::model_infer_request::InferInputTensor {
                    name: name.clone(),
                    datatype: tensor["datatype"].as_str().unwrap().into(),
                    shape: tensor["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_i64().unwrap())
                        .collect(),
                    ..Default::default()
                });
            request.raw_input_contents.push(raw(tensor).into());
        }
        let response = client.model_infer(request).await.unwrap().into_inner();
        for (name, want) in case["outputs"].as_object().unwrap() {
            let index = response
                .outputs
                .iter()
                .position(|o| o.name == *name)
                .unwrap_or_else(|| panic!("{model} returned no {name}"));
            let output = &response.outputs[index];
            assert_eq!(output.datatype, want["datatype"].as_str().unwrap());
            assert_close(
                &from_raw(&output.datatype, &response.raw_output_contents[index]),
                &json_numbers(&want["data"]),
                TOLERANCE,
                &format!("{model}/{name} over gRPC"),
            );
        }
    }
    server.stop().await;
}

/// Single-row requests sent together run in shared batches, and each gets its own row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_requests_are_batched_and_each_gets_its_own_rows() {
    let config = std::fs::read_to_string(fixtures().join("models/torch_mlp/config.pbtxt"))
        .unwrap()
        .replace(
            "dynamic_batching { }",
            "dynamic_batching { max_queue_delay_microseconds: 50000 }",
        );
    let server =
        TestServer::start(Repository::new().add("torch_mlp", "torch_mlp", Some(&config))).await;
    let case = &torch_reference()["torch_mlp"];
    let inputs = json_numbers(&case["inputs"]["INPUT__0"]["data"]);
    let outputs = json_numbers(&case["outputs"]["OUTPUT__0"]["data"]);
    let rows = inputs.len() / 8;
    let answers = futures::future::join_all((0..rows).map(|row| {
        let body = json!({"inputs": [{"name": "INPUT__0", "shape": [1, 8], "datatype": "FP32",
            "data": inputs[row * 8..(row + 1) * 8]}]});
        server.post("/v2/models/torch_mlp/infer", body)
    }))
    .await;
    for (row, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "row {row}: {body}");
        assert_close(
            &json_numbers(&body["outputs"][0]["data"]),
            &outputs[row * 4..(row + 1) * 4],
            TOLERANCE,
            &format!("row {row}"),
        );
    }
    let (_, stats) = server.get("/v2/models/torch_mlp/stats").await;
    let stats = &stats["model_stats"][0];
    assert_eq!(stats["inference_count"], rows as u64);
    let executions = stats["execution_count"].as_u64().unwrap();
    assert!(
        executions < rows as u64,
        "{rows} requests ran in {executions} batches: {stats}"
    );
    server.stop().await;
}

/// What a TorchScript model cannot be served with is refused at load, naming the fault, while
/// the well-configured model beside it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_configurations_that_cannot_serve_are_refused_with_the_reason() {
    let undeclared = "platform: \"pytorch_libtorch\"\nmax_batch_size: 8\n";
    let wrong_type = "platform: \"pytorch_libtorch\"\nmax_batch_size: 8\n\
        input [ { name: \"INPUT__0\", data_type: TYPE_FP32, dims: [ 8 ] } ]\n\
        output [ { name: \"OUTPUT__0\", data_type: TYPE_INT64, dims: [ 4 ] } ]\n";
    let strings = "backend: \"pytorch\"\nmax_batch_size: 8\n\
        input [ { name: \"INPUT__0\", data_type: TYPE_STRING, dims: [ 8 ] } ]\n\
        output [ { name: \"OUTPUT__0\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n";
    let gaps = "platform: \"pytorch_libtorch\"\nmax_batch_size: 8\n\
        input [ { name: \"INPUT__1\", data_type: TYPE_FP32, dims: [ 8 ] } ]\n\
        output [ { name: \"OUTPUT__0\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n";
    let repository = Repository::new()
        .add("good", "torch_mlp", None)
        .add("undeclared", "torch_mlp", Some(undeclared))
        .add("wrong_type", "torch_mlp", Some(wrong_type))
        .add("strings", "torch_mlp", Some(strings))
        .add("gaps", "torch_mlp", Some(gaps));
    let server = TestServer::start(repository).await;
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let reason = |name: &str| -> String {
        let entry = index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the index: {index}"));
        entry["reason"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(reason("good"), "");
    for (model, expected) in [
        ("undeclared", "declare every input and output"),
        (
            "wrong_type",
            "declared INT64 but forward() returned a Float tensor",
        ),
        ("strings", "libtorch has no tensor type for"),
        ("gaps", "must take forward()'s arguments 0..0 once each"),
    ] {
        let why = reason(model);
        assert!(why.contains(expected), "{model}: {why}");
    }
    let (status, _) = server
        .post(
            "/v2/models/good/infer",
            json!({"inputs": [{"name": "INPUT__0", "shape": [1, 8], "datatype": "FP32", "data": vec![0.0; 8]}]}),
        )
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A TorchScript version pushed to the registry with its signature in the manifest (and no
/// platform in its serving configuration) is served by libtorch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_versions_from_the_registry_serve_by_their_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().to_string_lossy()).unwrap();
    let mut manifest =
        marquee_tests::manifest(json!({"max_batch_size": 8, "dynamic_batching": {}}));
    manifest.framework = "torchscript".into();
    manifest.signature = serde_json::from_value(json!({
        "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 4]}],
    }))
    .unwrap();
    let bytes = std::fs::read(fixtures().join("models/torch_mlp/1/model.pt")).unwrap();
    let file = PushFile {
        path: "model.pt".into(),
        contents: Bytes::from(bytes),
    };
    let version = registry
        .push("mlp", vec![file], manifest, &Quiet)
        .await
        .unwrap()
        .version;
    registry
        .promote("mlp", version, Stage::Staging, None, "tests", "")
        .await
        .unwrap();
    let server = TestServer::start_registry(dir.path()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let case = &torch_reference()["torch_mlp"];
    loop {
        let (status, body) = server
            .post("/v2/models/mlp/infer", reference_request(case))
            .await;
        if status == 200 {
            assert_close(
                &json_numbers(&body["outputs"][0]["data"]),
                &json_numbers(&case["outputs"]["OUTPUT__0"]["data"]),
                TOLERANCE,
                "mlp from the registry",
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mlp never served: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, config) = server.get("/v2/models/mlp/config").await;
    assert_eq!(config["platform"], "pytorch_libtorch");
    server.stop().await;
}

/// A KIND_GPU TorchScript instance where libtorch sees no GPU is refused with the reason; it
/// never silently runs on the CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_gpu_instances_need_a_gpu_libtorch_sees() {
    let config = std::fs::read_to_string(fixtures().join("models/torch_mlp/config.pbtxt")).unwrap()
        + "instance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n";
    let server =
        TestServer::start(Repository::new().add("torch_mlp", "torch_mlp", Some(&config))).await;
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let reason = index[0]["reason"].as_str().unwrap_or_default();
    if tch_sees_a_gpu() {
        assert_eq!(reason, "", "a GPU is present, the model should load");
    } else {
        assert!(
            reason.contains("CUDA") || reason.contains("libtorch_cuda"),
            "{reason}"
        );
    }
    server.stop().await;
}

/// Whether this machine has an NVIDIA GPU (the device node the driver creates).
fn tch_sees_a_gpu() -> bool {
    std::path::Path::new("/dev/nvidia0").exists()
}

/// Triton's `__n` naming decides `forward`'s argument and result positions whatever order the
/// configuration lists the tensors in, and a configuration may serve a subset of the results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_positions_follow_the_double_underscore_numbers() {
    // torch_two_inputs is forward(x FP32, y INT64) -> (x * 2 + y, y + (x > 0)); here x is
    // INPUT__0 and y is INPUT__1, listed in the other order, and only the second result is served.
    let config = "platform: \"pytorch_libtorch\"\nmax_batch_size: 4\n\
        input [ { name: \"INPUT__1\", data_type: TYPE_INT64, dims: [ 4 ] },\n\
                { name: \"INPUT__0\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n\
        output [ { name: \"OUTPUT__1\", data_type: TYPE_INT64, dims: [ 4 ] } ]\n";
    let server =
        TestServer::start(Repository::new().add("numbered", "torch_two_inputs", Some(config)))
            .await;
    let case = &torch_reference()["torch_two_inputs"];
    let body = json!({"inputs": [
        {"name": "INPUT__1", "shape": case["inputs"]["y"]["shape"], "datatype": "INT64", "data": case["inputs"]["y"]["data"]},
        {"name": "INPUT__0", "shape": case["inputs"]["x"]["shape"], "datatype": "FP32", "data": case["inputs"]["x"]["data"]},
    ]});
    let (status, answer) = server.post("/v2/models/numbered/infer", body).await;
    assert_eq!(status, 200, "{answer}");
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{answer}");
    assert_eq!(outputs[0]["name"], "OUTPUT__1");
    assert_close(
        &json_numbers(&outputs[0]["data"]),
        &json_numbers(&case["outputs"]["OUTPUT__1"]["data"]),
        0.0,
        "the second result, from x and y in their places",
    );
    server.stop().await;
}

/// A TorchScript model that does not batch (max_batch_size 0) takes whole tensors, as declared;
/// one whose forward() throws on a request's data answers that request with libtorch's reason
/// and serves the next (the failed call's values are freed: `script::Module::forward`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_models_without_batching_take_whole_tensors() {
    let config = "platform: \"pytorch_libtorch\"\nmax_batch_size: 0\n\
        input [ { name: \"INPUT__0\", data_type: TYPE_FP32, dims: [ -1, -1 ] } ]\n\
        output [ { name: \"OUTPUT__0\", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]\n";
    let server = TestServer::start(Repository::new().add("whole", "torch_mlp", Some(config))).await;
    let case = &torch_reference()["torch_mlp"];
    let (status, answer) = server
        .post("/v2/models/whole/infer", reference_request(case))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([5, 4]));
    assert_close(
        &json_numbers(&answer["outputs"][0]["data"]),
        &json_numbers(&case["outputs"]["OUTPUT__0"]["data"]),
        TOLERANCE,
        "unbatched MLP",
    );
    for _ in 0..3 {
        let (status, answer) = server
            .post(
                "/v2/models/whole/infer",
                json!({"inputs": [{"name": "INPUT__0", "shape": [2, 3], "datatype": "FP32", "data": vec![0.5; 6]}]}),
            )
            .await;
        assert_eq!(status, 500, "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("mat1 and mat2"), "{error}");
        assert!(
            !error.contains("Exception raised from"),
            "backtrace left in: {error}"
        );
    }
    let (status, _) = server
        .post("/v2/models/whole/infer", reference_request(case))
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// `marquee registry import-triton` takes a Triton repository's TorchScript models as
/// TorchScript versions (their configuration declaring the tensors), and serving runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_repositories_with_torchscript_models_import_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap();
    let triton = repository();
    let env = [("MARQUEE_REGISTRY", location), ("USER", "alice")];
    let imported = marquee_tests::run_marquee(
        &[
            "registry",
            "import-triton",
            triton.path().to_str().unwrap(),
            "--json",
        ],
        &env,
    )
    .json();
    assert_eq!(imported.as_array().unwrap().len(), 2, "{imported}");
    let shown =
        marquee_tests::run_marquee(&["registry", "show", "torch_mlp", "--json"], &env).json();
    assert_eq!(shown["framework"], "torchscript", "{shown}");
    let registry = Registry::open(location).unwrap();
    for model in ["torch_mlp", "torch_two_inputs"] {
        registry
            .promote(model, 1, Stage::Staging, None, "tests", "")
            .await
            .unwrap();
    }
    let server = TestServer::start_registry(dir.path()).await;
    let reference = torch_reference();
    for model in ["torch_mlp", "torch_two_inputs"] {
        let case = &reference[model];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (status, body) = server
                .post(
                    &format!("/v2/models/{model}/infer"),
                    reference_request(case),
                )
                .await;
            if status == 200 {
                break body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{model} never served: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let got = body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "OUTPUT__0")
            .unwrap();
        assert_close(
            &json_numbers(&got["data"]),
            &json_numbers(&case["outputs"]["OUTPUT__0"]["data"]),
            TOLERANCE,
            &format!("{model} imported"),
        );
    }
    server.stop().await;
}
