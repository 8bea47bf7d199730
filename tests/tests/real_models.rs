//! Real models no one here wrote (MiniLM int8 from PyPI) and scikit-learn models exported with
//! skl2onnx (ai.onnx.ml operators), served over REST and gRPC: answers must equal what Python
//! onnxruntime computes for the same inputs (reference.json).
//!
//! Tolerances: the tree models run the same ONNX Runtime build on the same inputs, so they must
//! agree to 1e-6; MiniLM's int8 matrix products may be split differently across threads, so its
//! hidden states must agree to 1e-4.

use marquee_proto::inference as pb;
use marquee_tests::{
    Repository, TestServer, assert_close, assert_reference_outputs, f32_bytes, f32_values,
    json_numbers, reference, reference_request,
};

fn repository() -> Repository {
    Repository::new()
        .add("gbr", "gbr", None)
        .add("iforest", "iforest", None)
        .add("minilm", "minilm", None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_json_answers_match_python_onnxruntime() {
    let server = TestServer::start(repository()).await;
    let reference = reference();
    for (model, tolerance) in [("gbr", 1e-6), ("iforest", 1e-6), ("minilm", 1e-4)] {
        let case = &reference[model];
        let (status, body) = server
            .post(
                &format!("/v2/models/{model}/infer"),
                reference_request(case),
            )
            .await;
        assert_eq!(status, 200, "{model}: {body}");
        assert_reference_outputs(&body, case, tolerance, model);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_raw_answers_match_python_onnxruntime() {
    let server = TestServer::start(repository()).await;
    let mut client = server.grpc_client().await;
    let reference = reference();
    for (model, tolerance) in [("gbr", 1e-6), ("iforest", 1e-6), ("minilm", 1e-4)] {
        let case = &reference[model];
        let mut request = pb::ModelInferRequest {
            model_name: model.into(),
            id: format!("{model}-1"),
            ..Default::default()
        };
        for (name, t) in case["inputs"].as_object().unwrap() {
            let shape: Vec<i64> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            let raw: Vec<u8> = match t["datatype"].as_str().unwrap() {
                "FP32" => f32_bytes(
                    &json_numbers(&t["data"])
                        .iter()
                        .map(|&v| v as f32)
                        .collect::<Vec<_>>(),
                ),
                "INT64" => t["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.as_i64().unwrap().to_le_bytes())
                    .collect(),
                other => panic!("unexpected reference type {other}"),
            };
            request
                .inputs
                .push(pb::model_infer_request::InferInputTensor {
                    name: name.clone(),
                    datatype: t["datatype"].as_str().unwrap().into(),
                    shape,
                    ..Default::default()
                });
            request.raw_input_contents.push(raw.into());
        }
        let response = client
            .model_infer(request)
            .await
            .expect("inference succeeds")
            .into_inner();
        assert_eq!(response.id, format!("{model}-1"));
        assert_eq!(response.model_version, "1");
        for (output, raw) in response.outputs.iter().zip(&response.raw_output_contents) {
            let want = &case["outputs"][&output.name];
            let got: Vec<f64> = match output.datatype.as_str() {
                "FP32" => f32_values(raw).into_iter().map(f64::from).collect(),
                "INT64" => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected output type {other}"),
            };
            assert_close(
                &got,
                &json_numbers(&want["data"]),
                tolerance,
                &format!("{model}/{}", output.name),
            );
        }
        assert_eq!(
            response.outputs.len(),
            case["outputs"].as_object().unwrap().len()
        );
    }
    server.stop().await;
}

/// The sentence vectors, mean-pooled from the served hidden states, keep their meaning: the two
/// phrasings of "action movie tonight" are close, the refund request is far (FACTS.md: 0.80, 0.05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_separate_meanings() {
    let server = TestServer::start(repository()).await;
    let case = &reference()["minilm"];
    let (status, body) = server
        .post("/v2/models/minilm/infer", reference_request(case))
        .await;
    assert_eq!(status, 200, "{body}");
    let hidden = json_numbers(&body["outputs"][0]["data"]);
    let mask = json_numbers(&case["inputs"]["attention_mask"]["data"]);
    let shape = &case["inputs"]["input_ids"]["shape"];
    let (sentences, tokens) = (
        shape[0].as_u64().unwrap() as usize,
        shape[1].as_u64().unwrap() as usize,
    );
    let vectors: Vec<Vec<f64>> = (0..sentences)
        .map(|s| {
            let mut v = vec![0.0; 384];
            let mut count = 0.0;
            for t in 0..tokens {
                if mask[s * tokens + t] > 0.0 {
                    count += 1.0;
                    for (d, value) in v.iter_mut().enumerate() {
                        *value += hidden[(s * tokens + t) * 384 + d];
                    }
                }
            }
            let norm = v.iter().map(|x| (x / count).powi(2)).sum::<f64>().sqrt();
            v.iter().map(|x| x / count / norm).collect()
        })
        .collect();
    let cosine = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let similar = cosine(&vectors[0], &vectors[1]);
    let unrelated = cosine(&vectors[0], &vectors[2]);
    assert!(
        similar > 0.7,
        "paraphrases should be close, cosine {similar}"
    );
    assert!(
        unrelated < 0.2,
        "unrelated sentences should be far, cosine {unrelated}"
    );
    server.stop().await;
}
