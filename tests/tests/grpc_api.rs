//! The KServe v2 gRPC service end to end: health, metadata, configuration, statistics, typed and
//! raw tensor contents, streaming, the repository extension, and the status code of each error.

use std::collections::HashMap;

use futures::StreamExt;
use marquee_proto::inference as pb;
use marquee_proto::inference::infer_parameter::ParameterChoice;
use marquee_tests::{Repository, TestServer, f32_values, gbr_grpc_request};
use tonic::Code;

fn repository() -> Repository {
    Repository::new()
        .add("gbr", "gbr", None)
        .add("add_sub", "add_sub", None)
}

fn add_sub_request(id: &str, a: [f32; 4], b: [f32; 4]) -> pb::ModelInferRequest {
    let tensor = |name: &str, values: [f32; 4]| pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![4],
        contents: Some(pb::InferTensorContents {
            fp32_contents: values.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    pb::ModelInferRequest {
        model_name: "add_sub".into(),
        id: id.into(),
        inputs: vec![tensor("INPUT0", a), tensor("INPUT1", b)],
        ..Default::default()
    }
}

fn gbr_request(rows: usize) -> pb::ModelInferRequest {
    gbr_grpc_request("gbr", rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_config_and_statistics() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    assert!(
        client
            .server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| pb::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        client
            .model_ready(ready("gbr", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        client
            .model_ready(ready("gbr", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("gbr", "2"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("nope", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let meta = client
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "marquee");
    assert!(meta.extensions.contains(&"binary_tensor_data".to_string()));

    let model = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "gbr".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.versions, vec!["1"]);
    assert_eq!(model.inputs[0].shape, vec![-1, 10]);
    assert_eq!(model.outputs[0].name, "variable");

    let config = client
        .model_config(pb::ModelConfigRequest {
            name: "gbr".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 64);
    assert_eq!(config.input[0].dims, vec![10]);

    client.model_infer(gbr_request(3)).await.unwrap();
    let stats = client
        .model_statistics(pb::ModelStatisticsRequest {
            name: "gbr".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1);
    assert_eq!(stats.model_stats[0].inference_count, 3);
    assert_eq!(stats.model_stats[0].execution_count, 1);
    let all = client
        .model_statistics(pb::ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.model_stats.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_raw_contents() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    let response = client
        .model_infer(add_sub_request(
            "t1",
            [1.0, 2.0, 3.0, 4.0],
            [1.0, 1.0, 1.0, 1.0],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.id, "t1");
    assert_eq!(response.model_name, "add_sub");
    assert_eq!(response.outputs.len(), 2);
    assert_eq!(response.outputs[0].name, "OUTPUT0");
    assert_eq!(response.outputs[0].shape, vec![4]);
    assert_eq!(
        f32_values(&response.raw_output_contents[0]),
        vec![2.0, 3.0, 4.0, 5.0]
    );
    assert_eq!(
        f32_values(&response.raw_output_contents[1]),
        vec![0.0, 1.0, 2.0, 3.0]
    );

    let mut request = gbr_request(4);
    request
        .outputs
        .push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "variable".into(),
            parameters: HashMap::new(),
        });
    let response = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(response.outputs[0].shape, vec![4, 1]);
    assert_eq!(response.raw_output_contents[0].len(), 16);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_matching_status_codes() {
    let server = TestServer::start_with(repository(), |c| c.max_request_bytes = 64 * 1024).await;
    let mut client = server.grpc_client().await;
    let code = |result: Result<tonic::Response<pb::ModelInferResponse>, tonic::Status>| {
        let status = result.expect_err("the request must fail");
        (status.code(), status.message().to_string())
    };

    let mut unknown = gbr_request(1);
    unknown.model_name = "nope".into();
    let (c, m) = code(client.model_infer(unknown).await);
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("model 'nope' is not found"), "{m}");

    let mut wrong_type = gbr_request(1);
    wrong_type.inputs[0].datatype = "FP64".into();
    wrong_type.raw_input_contents = vec![vec![0u8; 80].into()];
    let (c, m) = code(client.model_infer(wrong_type).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("datatype FP64, model 'gbr' expects FP32"), "{m}");

    let mut short = gbr_request(1);
    short.raw_input_contents = vec![vec![0u8; 12].into()];
    let (c, m) = code(client.model_infer(short).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("needs 40 bytes, got 12"), "{m}");

    let mut missing = gbr_request(1);
    missing.inputs.clear();
    missing.raw_input_contents.clear();
    let (c, m) = code(client.model_infer(missing).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("missing input 'X'"), "{m}");

    let mut sequence = gbr_request(1);
    sequence.parameters.insert(
        "sequence_id".into(),
        pb::InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(4)),
        },
    );
    assert_eq!(
        code(client.model_infer(sequence).await).0,
        Code::Unimplemented
    );

    let (c, m) = code(client.model_infer(gbr_request(2000)).await);
    assert_eq!(c, Code::ResourceExhausted, "a message over the size limit");
    assert!(
        m.contains("server's limit of") && m.contains("--max-request-bytes"),
        "{m}"
    );

    let unknown_version = client
        .model_config(pb::ModelConfigRequest {
            name: "gbr".into(),
            version: "2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_version.code(), Code::NotFound);
    // Still serving.
    client.model_infer(gbr_request(1)).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_answers_every_request_and_reports_errors_in_band() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    let mut bad = add_sub_request("bad", [0.0; 4], [0.0; 4]);
    bad.inputs.pop();
    let requests = vec![
        add_sub_request("a", [1.0; 4], [1.0; 4]),
        bad,
        add_sub_request("b", [2.0; 4], [1.0; 4]),
    ];
    let mut responses = client
        .model_stream_infer(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = HashMap::new();
    while let Some(item) = responses.next().await {
        let item = item.unwrap();
        let response = item.infer_response.unwrap();
        seen.insert(
            response.id.clone(),
            (item.error_message, response.raw_output_contents),
        );
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(f32_values(&seen["a"].1[0]), vec![2.0; 4]);
    assert_eq!(f32_values(&seen["b"].1[1]), vec![1.0; 4]);
    assert!(
        seen["bad"].0.contains("missing input 'INPUT1'"),
        "{}",
        seen["bad"].0
    );
    assert!(seen["a"].0.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_over_grpc() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    client
        .repository_model_unload(pb::RepositoryModelUnloadRequest {
            model_name: "add_sub".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let index = client
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let add_sub = index
        .models
        .iter()
        .find(|m| m.name == "add_sub")
        .unwrap_or_else(|| panic!("{index:?}"));
    assert_eq!(
        (add_sub.state.as_str(), add_sub.reason.as_str()),
        ("UNAVAILABLE", "unloaded")
    );
    let status = client
        .model_infer(add_sub_request("x", [0.0; 4], [0.0; 4]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    client
        .repository_model_load(pb::RepositoryModelLoadRequest {
            model_name: "add_sub".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .model_infer(add_sub_request("y", [0.0; 4], [0.0; 4]))
        .await
        .unwrap();
    server.stop().await;
}

/// The server on tokio's single-threaded runtime, as `--worker-threads 1` runs it (a plain
/// `#[tokio::test]` is one): concurrent requests are batched together (idle instances are woken
/// after the burst being read, answers go back from one task per batch) and each gets the answer
/// its own row gets alone.
#[tokio::test]
async fn a_single_threaded_runtime_batches_and_answers_each_request_its_own() {
    let config = "max_batch_size: 64\ndynamic_batching { }\n";
    let server = TestServer::start(Repository::new().add("gbr", "gbr", Some(config))).await;
    let client = server.grpc_client().await;
    let request = |i: usize| {
        let mut request = gbr_grpc_request("gbr", 1);
        let values: Vec<f32> = (0..10).map(|k| (i * 10 + k) as f32 / 9.0).collect();
        request.raw_input_contents = vec![marquee_tests::f32_bytes(&values).into()];
        request
    };
    let answer = |response: pb::ModelInferResponse| f32_values(&response.raw_output_contents[0]);
    let mut alone = Vec::new();
    for i in 0..64 {
        let mut client = client.clone();
        alone.push(answer(
            client.model_infer(request(i)).await.unwrap().into_inner(),
        ));
    }
    let batches_before = server
        .metric(r#"marquee_batch_size_count{model="gbr",version="1"}"#)
        .await;
    let together = futures::future::join_all((0..64).map(|i| {
        let mut client = client.clone();
        async move { answer(client.model_infer(request(i)).await.unwrap().into_inner()) }
    }))
    .await;
    for (i, (together, alone)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(together.len(), alone.len());
        for (a, b) in together.iter().zip(alone) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "request {i}: {a} vs {b} alone"
            );
        }
    }
    let batches = server
        .metric(r#"marquee_batch_size_count{model="gbr",version="1"}"#)
        .await
        - batches_before;
    assert!(
        (1.0..64.0).contains(&batches),
        "64 concurrent requests ran in {batches} batches"
    );
    server.stop().await;
}
