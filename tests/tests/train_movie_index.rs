//! `marquee train movie-index` end to end at small scale: the world's descriptions are embedded
//! by the registry's `embedding`, indexed, measured on the labelled queries against keyword
//! search and pushed as `movie_search`, whose pipeline pins the embedding version it indexed
//! with. Served from the registry, the search answers the queries as the job's evaluation did
//! (train/serve parity), filters by genre, and names bad input.

use marquee_registry::{PushFile, Quiet, Registry};
use marquee_tests::{TestServer, TrainingRun};
use serde_json::{Value, json};

/// Pushes a copy of `model` version `version` as its next version.
async fn copy_version(registry: &std::path::Path, model: &str, version: u64) {
    let registry = Registry::open(registry.to_str().unwrap()).unwrap();
    let mut manifest = registry.manifest(model, version).await.unwrap();
    let mut files = Vec::new();
    for entry in &manifest.files {
        files.push(PushFile {
            path: entry.path.clone(),
            contents: registry.file(&manifest, entry).await.unwrap(),
        });
    }
    manifest.files.clear();
    registry.push(model, files, manifest, &Quiet).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_movie_index_is_measured_registered_and_served_as_evaluated() {
    let run = TrainingRun::small_world(42);

    let refused = run.run_job("movie-index", &[]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("run `marquee train embedding` first"),
        "{}",
        refused.stderr
    );

    run.train("embedding", &[]);
    // The index is made with, and pinned to, the newest embedding: 2, not the scratch copy's 1.
    copy_version(&run.registry, "embedding", 1).await;
    let report = run.train("movie-index", &[]);
    assert_eq!(report["model"], "movie_search");
    assert_eq!(report["version"], 1);
    let metrics = &report["metrics"];
    let number = |name: &str| metrics[name].as_f64().unwrap_or_else(|| panic!("{name}"));
    assert!(number("hit_at_3") > number("keyword_hit_at_3"), "{metrics}");
    assert!(number("hit_at_1") <= number("hit_at_3"), "{metrics}");
    assert!(number("hit_at_3") <= number("hit_at_10"), "{metrics}");
    // Keeping only the movie's own genre can only help its rank.
    assert!(
        number("hit_at_3_in_genre") >= number("hit_at_3"),
        "{metrics}"
    );
    assert_eq!(number("movies"), 150.0, "{metrics}");
    assert_eq!(number("queries"), 75.0, "{metrics}");

    let manifest = run.show("movie_search", "1");
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"model.onnx") && files.contains(&"movies.json"),
        "{files:?}"
    );
    assert_eq!(
        manifest["lineage"]["parameters"]["embedding"],
        json!({"model": "embedding", "version": 2})
    );
    let step = &manifest["pipeline"]["steps"][0];
    assert_eq!(
        (&step["op"], &step["model"], &step["version"]),
        (&json!("predict"), &json!("embedding"), &json!(2))
    );
    assert_eq!(manifest["gates"][0]["metric"], "hit_at_3");
    assert_eq!(
        manifest["gates"][1],
        json!({"metric": "hit_at_3", "op": ">=", "value": 0.5})
    );
    assert_eq!(manifest["drift_baseline"]["inputs"][0]["name"], "tokens");

    let server = TestServer::start_with_config(|config| {
        config.registry = Some(run.registry.to_string_lossy().into_owned());
        config.pins = vec!["embedding:2".into(), "movie_search:1".into()];
    })
    .await;
    let evaluated: Vec<Value> =
        serde_json::from_slice(&std::fs::read(run.work.join("movie-search-answers.json")).unwrap())
            .unwrap();
    assert_eq!(evaluated.len(), 75);
    let instances: Vec<Value> = evaluated
        .iter()
        .map(|e| json!({"features": {"query": e["query"]}}))
        .collect();
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "movie_search", "instances": instances}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), evaluated.len());
    for (prediction, evaluated) in predictions.iter().zip(&evaluated) {
        let (served, offline) = (
            prediction["outputs"]["movies"].as_array().unwrap(),
            evaluated["movies"].as_array().unwrap(),
        );
        assert_eq!(
            (served.len(), offline.len()),
            (10, 10),
            "{}",
            evaluated["query"]
        );
        for (a, b) in served.iter().zip(offline) {
            assert_eq!(a["id"], b["id"], "{}", evaluated["query"]);
            let (a, b) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", evaluated["query"]);
        }
    }

    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "movie_search", "features": {"query": "a heist in the city", "genre": "comedy"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let movies = answer["outputs"]["movies"].as_array().unwrap();
    assert!(!movies.is_empty(), "{answer}");
    for movie in movies {
        assert!(
            movie["genres"]
                .as_array()
                .unwrap()
                .contains(&json!("comedy")),
            "{movie}"
        );
        assert!(
            movie["title"].is_string() && movie["released_on"].is_string(),
            "{movie}"
        );
    }

    for (features, says) in [
        (json!({"genre": "comedy"}), "features.query is required"),
        (json!({"query": 7}), "features.query"),
        (
            json!({"query": "dogs", "genre": ["comedy"]}),
            "features.genre",
        ),
    ] {
        let (status, refused) = server
            .post(
                "/v1/predict",
                json!({"model": "movie_search", "features": features}),
            )
            .await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"].as_str().unwrap().contains(says),
            "{refused}"
        );
    }
    server.stop().await;
}
