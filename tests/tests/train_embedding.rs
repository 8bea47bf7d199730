//! `marquee train embedding` end to end at small scale: the int8 MiniLM and its tokenizer are
//! measured as served against the fp32 weights on the world's descriptions and queries, pushed
//! with the text pipeline, and the registry version answers `/v1/embeddings` with the vectors
//! Python makes of the same sentences.

use marquee_tests::{TestServer, TrainingRun, fixtures};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedding_model_is_measured_registered_and_served() {
    let run = TrainingRun::small_world(42);
    let report = run.train("embedding", &[]);
    assert_eq!(report["model"], "embedding");
    let metrics = &report["metrics"];
    assert!(
        metrics["min_cosine_vs_fp32"].as_f64().unwrap() >= 0.99,
        "{metrics}"
    );
    // 150 descriptions and 75 queries in the small world.
    assert_eq!(metrics["sentences"], 225.0, "{metrics}");
    assert_eq!(metrics["dimension"], 384.0, "{metrics}");

    let manifest = run.show("embedding", "1");
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"model.onnx") && files.contains(&"tokenizer.json"),
        "{files:?}"
    );
    assert_eq!(manifest["pipeline"]["steps"][0]["op"], "tokenize");
    assert_eq!(manifest["drift_baseline"]["inputs"][0]["name"], "tokens");

    let server = TestServer::start_with_config(|config| {
        config.registry = Some(run.registry.to_string_lossy().into_owned());
        config.pins = vec!["embedding:1".into()];
    })
    .await;
    let references: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("embeddings.json")).unwrap())
            .unwrap();
    let texts: Vec<&Value> = references.iter().map(|r| &r["text"]).collect();
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            json!({"model": "embedding", "input": texts}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for (item, reference) in answer["data"].as_array().unwrap().iter().zip(&references) {
        let cosine: f64 = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["embedding"].as_array().unwrap())
            .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
            .sum();
        assert!(cosine > 0.99999, "{}: cosine {cosine}", reference["text"]);
    }
    server.stop().await;
}
