//! The server under hostile traffic, and the one service layer behind both transports: each limit
//! (requests in flight, instances per /v1/predict request, body size, gRPC stream window) holds
//! and answers with a clear error while other clients keep being served; REST and gRPC give the
//! same answer and the same code for the same request.

use std::time::{Duration, Instant};

use futures::StreamExt;
use marquee_proto::inference as pb;
use marquee_tests::{Repository, TestServer, gbr_grpc_request, request_only_pipeline};
use serde_json::{Value, json};
use tonic::Code;

/// A model whose lone request waits `delay_ms` in the queue for company: a request held in
/// flight for a known time, without a slow model.
fn held(delay_ms: u64) -> String {
    format!(
        "max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {} }}\n",
        delay_ms * 1000
    )
}

fn gbr_body(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows * 10).map(|i| i as f32 / 10.0).collect();
    json!({"inputs": [{"name": "X", "shape": [rows, 10], "datatype": "FP32", "data": data}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_limit_requests_get_503_with_retry_after_on_both_transports() {
    let repository = Repository::new().add("slow", "gbr", Some(&held(1500)));
    let server = TestServer::start_with(repository, |c| c.max_concurrent_requests = 1).await;
    let url = format!("{}/v2/models/slow/infer", server.http);
    let holder = tokio::spawn({
        let client = server.client.clone();
        let url = url.clone();
        async move {
            client
                .post(&url)
                .json(&gbr_body(1))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let refused = server
        .client
        .post(&url)
        .json(&gbr_body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-concurrent-requests"),
        "{body}"
    );
    // OpenAI's route refuses in OpenAI's error shape, which its clients read.
    let refused = server
        .client
        .post(format!("{}/v1/embeddings", server.http))
        .json(&json!({"model": "embedding", "input": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-concurrent-requests"),
        "{body}"
    );
    let mut grpc = server.grpc_client().await;
    let status = grpc
        .model_infer(gbr_grpc_request("slow", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    // A stream cannot end with one message's status: its answer says when to retry instead.
    let mut replies = grpc
        .model_stream_infer(futures::stream::iter([pb::ModelInferRequest {
            id: "streamed".into(),
            ..gbr_grpc_request("slow", 1)
        }]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(
        reply.error_message.contains("retry after 1 s"),
        "{}",
        reply.error_message
    );
    let answer = reply.infer_response.unwrap();
    assert_eq!(answer.id, "streamed");
    assert_eq!(
        answer.parameters["retry_after_seconds"].parameter_choice,
        Some(pb::infer_parameter::ParameterChoice::Int64Param(1))
    );
    // Health and metadata are not inference: they still answer.
    assert_eq!(server.get("/v2/models/slow").await.0, 200);

    assert_eq!(
        holder.await.unwrap(),
        200,
        "the request in flight is answered"
    );
    assert!(
        server
            .metric(r#"marquee_rejected_requests_total{reason="concurrency_limit"}"#)
            .await
            >= 3.0
    );
    // With the place free again, requests go through.
    let (status, _) = server.post("/v2/models/slow/infer", gbr_body(64)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A `/v1/predict` pipeline for gbr from request features only (ten columns, defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_predict_request_neither_fills_the_queue_nor_passes_its_instance_limit() {
    // Queue of 8 requests, 4 rows each: a 200-instance request is 50 chunks, which submitted at
    // once would fill the queue and be refused (and refuse everyone else meanwhile).
    let config =
        "max_batch_size: 4\ndynamic_batching { default_queue_policy { max_queue_size: 8 } }\n";
    let repository = Repository::new()
        .add("pricing", "gbr", Some(config))
        .write("pricing/pipeline.json", &request_only_pipeline());
    let server = TestServer::start_with(repository, |c| c.max_predict_instances = 300).await;
    let instances: Vec<Value> = (0..200).map(|i| json!({"features": {"f0": i}})).collect();
    // Three other clients and the request's four chunks in flight fit the queue together.
    let others: Vec<_> = (0..3)
        .map(|_| {
            let client = server.client.clone();
            let url = format!("{}/v2/models/pricing/infer", server.http);
            tokio::spawn(async move {
                client
                    .post(&url)
                    .json(&gbr_body(1))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let (status, body) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "instances": instances}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().unwrap().len(), 200);
    for other in others {
        assert_eq!(other.await.unwrap(), 200, "another client was refused");
    }

    let too_many: Vec<Value> = (0..301).map(|_| json!({})).collect();
    let (status, body) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "instances": too_many}),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("301") && message.contains("at most 300"),
        "{message}"
    );
    assert!(
        server
            .metric(r#"marquee_rejected_requests_total{reason="too_large"}"#)
            .await
            >= 1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_a_json_413_on_every_route() {
    let repository = Repository::new().add("gbr", "gbr", None);
    let server = TestServer::start_with(repository, |c| c.max_request_bytes = 2048).await;
    let big = json!({"padding": "x".repeat(4096)});
    for path in [
        "/v2/models/gbr/infer",
        "/v1/predict",
        "/v2/repository/index",
        "/v2/repository/models/gbr/load",
    ] {
        let response = server
            .client
            .post(format!("{}{path}", server.http))
            .json(&big)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("2048 bytes") && message.contains("--max-request-bytes"),
            "{path}: {message}"
        );
    }
    // Other errors axum produces itself are JSON too.
    let response = server
        .client
        .post(format!("{}/v2/repository/index", server.http))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    assert!(
        server
            .metric(r#"marquee_rejected_requests_total{reason="too_large"}"#)
            .await
            >= 4.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_keeps_at_most_its_window_in_flight() {
    let repository = Repository::new().add("slow", "gbr", Some(&held(150)));
    let server = TestServer::start_with(repository, |c| c.grpc_stream_window = 2).await;
    let mut grpc = server.grpc_client().await;
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let mut r = gbr_grpc_request("slow", 1);
            r.id = format!("r{i}");
            r
        })
        .collect();
    let started = Instant::now();
    let mut responses = grpc
        .model_stream_infer(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let depth = r#"marquee_queue_depth{model="slow",version="1"}"#;
    let mut ids = Vec::new();
    let mut deepest = 0.0f64;
    loop {
        tokio::select! {
            next = responses.next() => match next {
                Some(reply) => {
                    let reply = reply.unwrap();
                    assert_eq!(reply.error_message, "");
                    ids.push(reply.infer_response.unwrap().id);
                }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                deepest = deepest.max(server.metric(depth).await);
            }
        }
        if ids.len() == 8 {
            break;
        }
    }
    ids.sort();
    assert_eq!(ids, (0..8).map(|i| format!("r{i}")).collect::<Vec<_>>());
    assert!(
        deepest <= 2.0,
        "queue held {deepest} requests of one stream with a window of 2"
    );
    assert!(deepest >= 1.0, "the sampler never saw the queue");
    // Two at a time, each pair held 150 ms: four rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// A case run through both transports: REST (method, path, body) and the gRPC call.
struct Case {
    what: &'static str,
    rest: (&'static str, String, Option<Value>),
    grpc: fn(
        marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
            tonic::transport::Channel,
        >,
    ) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>>,
}

/// A gRPC repository load of gbr with one parameter.
fn load_gbr(
    mut client: marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    key: &'static str,
    choice: pb::model_repository_parameter::ParameterChoice,
) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>> {
    Box::pin(async move {
        let parameters = std::collections::HashMap::from([(
            key.to_string(),
            pb::ModelRepositoryParameter {
                parameter_choice: Some(choice),
            },
        )]);
        client
            .repository_model_load(pb::RepositoryModelLoadRequest {
                model_name: "gbr".into(),
                parameters,
                ..Default::default()
            })
            .await
            .map(|_| ())
    })
}

fn http_code(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument => 400,
        Code::NotFound => 404,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::ResourceExhausted => 413,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_give_the_same_answers_and_codes() {
    let repository = Repository::new()
        .add_version("gbr", "gbr", 1, None)
        .add_version(
            "gbr",
            "gbr",
            2,
            Some("version_policy { all { } }\nmax_batch_size: 4\n"),
        );
    let server = TestServer::start(repository).await;
    let cases = vec![
        Case {
            what: "metadata of an unknown model",
            rest: ("GET", "/v2/models/nope".into(), None),
            grpc: |mut c| {
                Box::pin(async move {
                    c.model_metadata(pb::ModelMetadataRequest {
                        name: "nope".into(),
                        version: String::new(),
                    })
                    .await
                    .map(|_| ())
                })
            },
        },
        Case {
            what: "config of an unknown version",
            rest: ("GET", "/v2/models/gbr/versions/9/config".into(), None),
            grpc: |mut c| {
                Box::pin(async move {
                    c.model_config(pb::ModelConfigRequest {
                        name: "gbr".into(),
                        version: "9".into(),
                    })
                    .await
                    .map(|_| ())
                })
            },
        },
        Case {
            what: "statistics of an unknown model",
            rest: ("GET", "/v2/models/nope/stats".into(), None),
            grpc: |mut c| {
                Box::pin(async move {
                    c.model_statistics(pb::ModelStatisticsRequest {
                        name: "nope".into(),
                        version: String::new(),
                    })
                    .await
                    .map(|_| ())
                })
            },
        },
        Case {
            what: "a load parameter that does not exist",
            rest: (
                "POST",
                "/v2/repository/models/gbr/load".into(),
                Some(json!({"parameters": {"colour": "red"}})),
            ),
            grpc: |c| {
                load_gbr(
                    c,
                    "colour",
                    pb::model_repository_parameter::ParameterChoice::StringParam("red".into()),
                )
            },
        },
        Case {
            what: "a config load parameter that is not a string",
            rest: (
                "POST",
                "/v2/repository/models/gbr/load".into(),
                Some(json!({"parameters": {"config": true}})),
            ),
            grpc: |c| {
                load_gbr(
                    c,
                    "config",
                    pb::model_repository_parameter::ParameterChoice::BoolParam(true),
                )
            },
        },
        Case {
            what: "a config load parameter that does not parse",
            rest: (
                "POST",
                "/v2/repository/models/gbr/load".into(),
                Some(json!({"parameters": {"config": "{not json"}})),
            ),
            grpc: |c| {
                load_gbr(
                    c,
                    "config",
                    pb::model_repository_parameter::ParameterChoice::StringParam(
                        "{not json".into(),
                    ),
                )
            },
        },
        Case {
            what: "model files in the load request",
            rest: (
                "POST",
                "/v2/repository/models/gbr/load".into(),
                Some(json!({"parameters": {"file:1/model.onnx": "AAAA"}})),
            ),
            grpc: |c| {
                load_gbr(
                    c,
                    "file:1/model.onnx",
                    pb::model_repository_parameter::ParameterChoice::BytesParam(vec![0]),
                )
            },
        },
        Case {
            what: "an output into shared memory",
            rest: (
                "POST",
                "/v2/models/gbr/infer".into(),
                Some({
                    let mut body = gbr_body(1);
                    body["outputs"] = json!([{"name": "variable", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 4}}]);
                    body
                }),
            ),
            grpc: |mut c| {
                Box::pin(async move {
                    let mut request = gbr_grpc_request("gbr", 1);
                    let mut parameters = std::collections::HashMap::new();
                    parameters.insert(
                        "shared_memory_region".to_string(),
                        pb::InferParameter {
                            parameter_choice: Some(
                                pb::infer_parameter::ParameterChoice::StringParam("out".into()),
                            ),
                        },
                    );
                    request
                        .outputs
                        .push(pb::model_infer_request::InferRequestedOutputTensor {
                            name: "variable".into(),
                            parameters,
                        });
                    c.model_infer(request).await.map(|_| ())
                })
            },
        },
        Case {
            what: "inference on an unknown model",
            rest: ("POST", "/v2/models/nope/infer".into(), Some(gbr_body(1))),
            grpc: |mut c| {
                Box::pin(
                    async move { c.model_infer(gbr_grpc_request("nope", 1)).await.map(|_| ()) },
                )
            },
        },
        Case {
            what: "a good inference",
            rest: ("POST", "/v2/models/gbr/infer".into(), Some(gbr_body(2))),
            grpc: |mut c| {
                Box::pin(async move { c.model_infer(gbr_grpc_request("gbr", 2)).await.map(|_| ()) })
            },
        },
    ];
    for case in cases {
        let (method, path, body) = &case.rest;
        let request = match *method {
            "GET" => server.client.get(format!("{}{path}", server.http)),
            _ => server
                .client
                .post(format!("{}{path}", server.http))
                .json(body.as_ref().unwrap()),
        };
        let response = request.send().await.unwrap();
        let rest_status = response.status().as_u16();
        let rest_body: Value = response.json().await.unwrap_or(Value::Null);
        let grpc = (case.grpc)(server.grpc_client().await).await;
        let (grpc_status, grpc_message) = match &grpc {
            Ok(()) => (200, String::new()),
            Err(status) => (http_code(status.code()), status.message().to_string()),
        };
        assert_eq!(
            rest_status, grpc_status,
            "{}: REST {rest_body}, gRPC {grpc:?}",
            case.what
        );
        if rest_status != 200 {
            assert_eq!(
                rest_body["error"].as_str().unwrap(),
                grpc_message,
                "{}",
                case.what
            );
        }
    }

    // Answers, not only errors, agree: metadata and statistics of both versions.
    let (_, rest) = server.get("/v2/models/gbr").await;
    let mut grpc = server.grpc_client().await;
    let metadata = grpc
        .model_metadata(pb::ModelMetadataRequest {
            name: "gbr".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest["versions"], json!(metadata.versions));
    assert_eq!(rest["platform"], json!(metadata.platform));
    assert_eq!(rest["inputs"][0]["shape"], json!(metadata.inputs[0].shape));
    let (_, rest) = server.get("/v2/models/gbr/stats").await;
    let stats = grpc
        .model_statistics(pb::ModelStatisticsRequest {
            name: "gbr".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest["model_stats"].as_array().unwrap().len(),
        stats.model_stats.len()
    );
    assert_eq!(stats.model_stats.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_over_the_limit_ends_the_stream_with_an_error_not_ok() {
    let repository = Repository::new().add("gbr", "gbr", None);
    let server = TestServer::start_with(repository, |c| c.max_request_bytes = 4096).await;
    let mut grpc = server.grpc_client().await;
    let requests = vec![gbr_grpc_request("gbr", 1), gbr_grpc_request("gbr", 200)];
    let mut responses = grpc
        .model_stream_infer(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    let mut ended_with = None;
    while let Some(next) = responses.next().await {
        match next {
            Ok(reply) => {
                assert_eq!(reply.error_message, "");
                answered += 1;
            }
            Err(status) => {
                ended_with = Some(status);
                break;
            }
        }
    }
    assert_eq!(answered, 1, "the small request is answered");
    let status = ended_with.expect("the stream reports why it stopped reading");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );
    server.stop().await;
}
