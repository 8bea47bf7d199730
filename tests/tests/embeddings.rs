//! Text embedding through a step pipeline (deploy/models/minilm/pipeline.json: tokenize, the
//! int8 MiniLM, mean pooling, L2 normalisation, all in the server): `/v1/predict` with text and
//! OpenAI's `/v1/embeddings` give the vectors Python's tokenizers + onnxruntime make of the same
//! sentences (tests/fixtures/make_fixtures.py), batched or one at a time, with OpenAI's answer
//! and error shapes. The `openai` client itself is tested in tests/python.

use base64::Engine;
use marquee_tests::{Repository, TestServer, fixtures, root};
use serde_json::{Value, json};

fn references() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("embeddings.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a vector: {value}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_same_vector(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let cosine: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        cosine > 0.99999 && worst < 1e-4,
        "{what}: cosine {cosine}, max difference {worst}"
    );
}

fn repository() -> Repository {
    let pipeline = std::fs::read(root().join("deploy/models/minilm/pipeline.json")).unwrap();
    Repository::new()
        .add("embedding", "minilm", None)
        .write("embedding/pipeline.json", &pipeline)
}

async fn server() -> TestServer {
    TestServer::start(repository()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_in_openai_shape() {
    let server = TestServer::start_with(repository(), |c| c.max_request_bytes = 4096).await;
    let (status, refused) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": "x".repeat(8192)}),
        )
        .await;
    assert_eq!(status, 413, "{refused}");
    assert_eq!(
        refused["error"]["type"], "invalid_request_error",
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than the server's limit of 4096 bytes"),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_embeds_text_as_python_does() {
    let server = server().await;
    let references = references();
    // One at a time.
    for reference in &references {
        let (status, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "embedding", "features": {"text": reference["text"]}}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let vector = floats(&answer["outputs"]["embedding"]);
        assert_same_vector(&vector, &floats(&reference["embedding"]), "single");
        assert_eq!(answer["prediction"], answer["outputs"]["embedding"]);
    }
    // All in one request: one padded batch, the same vectors.
    let instances: Vec<Value> = references
        .iter()
        .map(|r| json!({"features": {"text": r["text"]}}))
        .collect();
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "embedding", "instances": instances}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for (prediction, reference) in answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&references)
    {
        assert_same_vector(
            &floats(&prediction["outputs"]["embedding"]),
            &floats(&reference["embedding"]),
            reference["text"].as_str().unwrap(),
        );
    }
    // Text is required and must be text.
    for (body, says) in [
        (
            json!({"model": "embedding", "features": {}}),
            "features.text is required",
        ),
        (
            json!({"model": "embedding", "features": {"text": 5}}),
            "features.text",
        ),
    ] {
        let (status, refused) = server.post("/v1/predict", body).await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"].as_str().unwrap().contains(says),
            "{refused}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_take_a_string_or_a_list_and_count_tokens() {
    let server = server().await;
    let references = references();
    let texts: Vec<&Value> = references.iter().map(|r| &r["text"]).collect();
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": texts}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "embedding");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), references.len());
    let mut tokens = 0;
    for (i, (item, reference)) in data.iter().zip(&references).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_same_vector(
            &floats(&item["embedding"]),
            &floats(&reference["embedding"]),
            "list",
        );
        tokens += reference["tokens"].as_u64().unwrap();
    }
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    assert_eq!(answer["usage"]["total_tokens"], tokens);

    // One string, base64: little-endian f32 bytes.
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": references[0]["text"], "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(answer["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let vector: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_same_vector(&vector, &floats(&references[0]["embedding"]), "base64");

    // More texts than one batch (max_batch_size 32), of mixed lengths: three chunks, each padded
    // to its own longest, every vector still its sentence's.
    let many: Vec<&Value> = (0..70).map(|i| texts[i % texts.len()]).collect();
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": many}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for (i, item) in answer["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_same_vector(
            &floats(&item["embedding"]),
            &floats(&references[i % references.len()]["embedding"]),
            "many",
        );
    }

    // OpenAI's error shape, naming the field.

    for (body, status, param, says) in [
        (
            json!({"model": "embedding", "input": []}),
            400,
            "input",
            "empty list",
        ),
        (
            json!({"model": "embedding", "input": [[101, 2000]]}),
            400,
            "input",
            "text only",
        ),
        (
            json!({"model": "embedding", "input": "hi", "encoding_format": "hex"}),
            400,
            "encoding_format",
            "'float' or 'base64'",
        ),
        (
            json!({"model": "embedding", "input": "hi", "dimensions": 128}),
            400,
            "dimensions",
            "384-dimensional",
        ),
    ] {
        let (got, refused) = server.post("/v1/embeddings", body.clone()).await;
        assert_eq!(got, status, "{body}: {refused}");
        assert_eq!(
            refused["error"]["type"], "invalid_request_error",
            "{refused}"
        );
        assert_eq!(refused["error"]["param"], param, "{refused}");
        assert!(
            refused["error"]["message"].as_str().unwrap().contains(says),
            "{refused}"
        );
    }
    let (status, refused) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": "x".repeat(70_000)}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 65536"),
        "{refused}"
    );
    let (status, refused) = server
        .post("/v1/embeddings", json!({"model": "nope", "input": "hi"}))
        .await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(refused["error"]["code"], "model_not_found");
    let (status, refused) = server.post("/v1/embeddings", json!({"input": "hi"})).await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model"),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_pipeline_that_cannot_run_is_refused_when_the_version_loads() {
    let broken = [
        (
            json!({"features": [{"name": "text", "dtype": "string"}],
                   "steps": [{"op": "mean_pool", "of": "hidden", "mask": "text", "into": "v"}],
                   "outputs": {"v": "v"}}),
            "reads 'hidden', which no feature or earlier step provides",
        ),
        (
            json!({"features": [{"name": "text", "dtype": "string"}],
                   "steps": [{"op": "tokenize", "text": "text", "tokenizer": "vocab.json", "into": "t"}],
                   "outputs": {"ids": "t.input_ids"}}),
            "'vocab.json'",
        ),
        (
            json!({"features": [{"name": "text", "dtype": "string"}],
                   "steps": [{"op": "tokenize", "text": "text", "tokenizer": "tokenizer.json", "into": "t"},
                             {"op": "model", "inputs": {"input_ids": "t.input_ids"}, "outputs": {"last_hidden_state": "h"}}],
                   "outputs": {"h": "h"}}),
            "its input 'attention_mask' is not given",
        ),
        (
            json!({"features": [{"name": "text", "dtype": "string", "transform": {"hash_buckets": 4}}],
                   "steps": [{"op": "l2_normalize", "of": "text", "into": "v"}],
                   "outputs": {"v": "v"}}),
            "a step pipeline reads features as they are",
        ),
    ];
    for (pipeline, says) in broken {
        let repository = Repository::new()
            .add("embedding", "minilm", None)
            .write("embedding/pipeline.json", pipeline.to_string().as_bytes());
        let server = TestServer::start(repository).await;
        let (status, refused) = server
            .post(
                "/v1/predict",
                json!({"model": "embedding", "features": {"text": "hi"}}),
            )
            .await;
        assert_eq!(status, 503, "{pipeline}: {refused}");
        assert!(
            refused["error"].as_str().unwrap().contains(says),
            "{pipeline}: {refused}"
        );
        // /v2 serves on.
        let (status, _) = server.get("/v2/models/embedding/ready").await;
        assert_eq!(status, 200);
        server.stop().await;
    }
}
