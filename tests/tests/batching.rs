//! Dynamic batching through the real server: concurrent clients are batched and each gets exactly
//! its own answer; a full queue, a queue timeout and a departed client behave as Triton's do.

use std::time::{Duration, Instant};

use marquee_proto::inference as pb;
use marquee_proto::inference::infer_parameter::ParameterChoice;
use marquee_tests::{Repository, TestServer, f32_bytes, f32_values};
use serde_json::{Value, json};

const SLOW_QUEUE: &str = r#"
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 1500000
  default_queue_policy { max_queue_size: 2 }
}
"#;

fn row(seed: usize) -> Vec<f32> {
    (0..10)
        .map(|i| ((seed * 31 + i * 7) % 97) as f32 / 13.0 - 3.0)
        .collect()
}

fn grpc_request(model: &str, rows: &[Vec<f32>]) -> pb::ModelInferRequest {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, 10],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&flat).into()],
        ..Default::default()
    }
}

fn json_request(rows: usize, parameters: Value) -> Value {
    json!({"parameters": parameters, "inputs": [{"name": "X", "shape": [rows, 10], "datatype": "FP32", "data": vec![0.5; rows * 10]}]})
}

async fn counts(server: &TestServer, model: &str) -> (u64, u64) {
    let (_, stats) = server.get(&format!("/v2/models/{model}/stats")).await;
    let s = &stats["model_stats"][0];
    (
        s["inference_count"].as_u64().unwrap(),
        s["execution_count"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_are_batched_and_get_their_own_rows() {
    let config = "max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 3000 }\n";
    let server = TestServer::start(Repository::new().add("gbr", "gbr", Some(config))).await;
    let client = server.grpc_client().await;

    // Each row's answer on its own, one request at a time.
    let mut alone = Vec::new();
    for seed in 0..150 {
        let response = client
            .clone()
            .model_infer(grpc_request("gbr", &[row(seed)]))
            .await
            .unwrap()
            .into_inner();
        alone.push(f32_values(&response.raw_output_contents[0]));
    }
    let (rows_before, executions_before) = counts(&server, "gbr").await;
    assert_eq!(executions_before, 150);

    // The same rows from 150 concurrent clients, plus multi-row requests mixed in.
    let singles = (0..150).map(|seed| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let response = client
                .model_infer(grpc_request("gbr", &[row(seed)]))
                .await
                .unwrap()
                .into_inner();
            (vec![seed], f32_values(&response.raw_output_contents[0]))
        })
    });
    let multis = (0..20).map(|k| {
        let mut client = client.clone();
        let seeds: Vec<usize> = (0..1 + k % 4).map(|j| (k * 5 + j) % 150).collect();
        tokio::spawn(async move {
            let rows: Vec<Vec<f32>> = seeds.iter().map(|&s| row(s)).collect();
            let response = client
                .model_infer(grpc_request("gbr", &rows))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.outputs[0].shape, vec![seeds.len() as i64, 1]);
            (seeds, f32_values(&response.raw_output_contents[0]))
        })
    });
    let handles: Vec<_> = singles.chain(multis).collect();
    let mut rows_sent = 0;
    for handle in handles {
        let (seeds, values) = handle.await.unwrap();
        rows_sent += seeds.len() as u64;
        // ONNX Runtime may sum the trees in another order for a batch: equal to 1e-5 relative.
        for (&seed, &value) in seeds.iter().zip(&values) {
            let want = alone[seed][0];
            assert!(
                (value - want).abs() <= 1e-5 * want.abs().max(1.0),
                "row {seed} got {value}, alone it gives {want}"
            );
        }
        assert_eq!(values.len(), seeds.len());
    }
    let (rows_after, executions_after) = counts(&server, "gbr").await;
    assert_eq!(rows_after - rows_before, rows_sent);
    let executions = executions_after - executions_before;
    assert!(
        executions < 170 / 2,
        "170 concurrent requests ran in {executions} executions: no batching happened"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_503_and_unavailable_without_losing_queued_requests() {
    let server = TestServer::start(Repository::new().add("slow", "gbr", Some(SLOW_QUEUE))).await;
    let url = format!("{}/v2/models/slow/infer", server.http);
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let request = server.client.post(&url).json(&json_request(1, json!({})));
            tokio::spawn(async move { request.send().await.unwrap().status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, answer) = server
        .post("/v2/models/slow/infer", json_request(1, json!({})))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("holds 2 requests"),
        "{answer}"
    );
    let mut client = server.grpc_client().await;
    let status = client
        .model_infer(grpc_request("slow", &[row(1)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "rejections must not wait"
    );
    for handle in queued {
        assert_eq!(handle.await.unwrap(), 200, "queued requests still complete");
    }
    assert_eq!(
        counts(&server, "slow").await,
        (2, 1),
        "the two queued requests ran as one batch"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_is_504_and_deadline_exceeded_and_never_executes() {
    let server = TestServer::start(Repository::new().add("slow", "gbr", Some(SLOW_QUEUE))).await;
    let started = Instant::now();
    let (status, answer) = server
        .post(
            "/v2/models/slow/infer",
            json_request(1, json!({"timeout": 50_000})),
        )
        .await;
    assert_eq!(status, 504, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("timed out after waiting"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the timeout fires before the queue delay"
    );

    let mut client = server.grpc_client().await;
    let mut request = grpc_request("slow", &[row(2)]);
    request.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(50_000)),
        },
    );
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(
        counts(&server, "slow").await,
        (0, 0),
        "timed-out requests never run"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_clients_are_dropped_before_execution() {
    let server = TestServer::start(Repository::new().add("slow", "gbr", Some(SLOW_QUEUE))).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let result = impatient
        .post(format!("{}/v2/models/slow/infer", server.http))
        .json(&json_request(1, json!({})))
        .send()
        .await;
    assert!(
        result.unwrap_err().is_timeout(),
        "the client gives up before the queue delay ends"
    );
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        counts(&server, "slow").await,
        (0, 0),
        "nobody was waiting, so nothing ran"
    );
    let (status, _) = server
        .post("/v2/models/slow/infer", json_request(8, json!({})))
        .await;
    assert_eq!(status, 200, "a full batch runs at once");
    assert_eq!(counts(&server, "slow").await, (8, 1));
    server.stop().await;
}
