//! Search as a step pipeline over another model's pipeline: `movie_search` embeds the query by
//! calling `minilm`'s text pipeline (a `predict` step), scores it against every movie with its
//! own model (an exact index: one MatMul over the description vectors), and keeps the top 3,
//! optionally of one genre (`top_k` over the version's movies.json). The ranking and scores match
//! Python's on the same vectors (tests/fixtures/make_fixtures.py).

use marquee_tests::{Repository, TestServer, fixtures};
use serde_json::{Value, json};

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("models").join(path)).unwrap()
}

/// A server with `movie_search` under `pipeline`, and with `minilm` (text in) if `with_minilm`.
async fn serve(pipeline: &[u8], with_minilm: bool) -> TestServer {
    let mut repository = Repository::new();
    if with_minilm {
        repository = repository
            .add("minilm", "minilm", None)
            .write("minilm/pipeline.json", &fixture("minilm/pipeline.json"));
    }
    let repository = repository
        .add("movie_search", "movie_search", None)
        .write("movie_search/pipeline.json", pipeline);
    TestServer::start(repository).await
}

/// What a search `movie_search` cannot run answers: the status and the error text.
async fn refused_search(server: &TestServer) -> (u16, Value) {
    server
        .post(
            "/v1/predict",
            json!({"model": "movie_search", "features": {"query": "dogs"}}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_ranks_movies_as_python_does_and_filters_by_genre() {
    let server = serve(&fixture("movie_search/pipeline.json"), true).await;
    let references: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("search_reference.json")).unwrap(),
    )
    .unwrap();
    let instances: Vec<Value> = references
        .iter()
        .map(|r| json!({"features": {"query": r["query"], "genre": r["genre"]}}))
        .collect();
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "movie_search", "instances": instances}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["predictions"].as_array().unwrap().len(),
        references.len()
    );
    for (prediction, reference) in answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&references)
    {
        let movies = prediction["outputs"]["movies"].as_array().unwrap();
        let ids: Vec<&Value> = movies.iter().map(|m| &m["id"]).collect();
        let expected: Vec<&Value> = reference["ids"].as_array().unwrap().iter().collect();
        assert_eq!(ids, expected, "{}", reference["query"]);
        for (movie, score) in movies.iter().zip(reference["scores"].as_array().unwrap()) {
            let (got, want) = (movie["score"].as_f64().unwrap(), score.as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-4,
                "{}: {got} vs {want}",
                reference["query"]
            );
            assert!(
                movie["title"].is_string() && movie["genres"].is_array(),
                "{movie}"
            );
            let genre = reference["genre"].as_str().unwrap();
            if !genre.is_empty() {
                assert!(
                    movie["genres"].as_array().unwrap().contains(&json!(genre)),
                    "{movie}"
                );
            }
        }
        assert_eq!(prediction["prediction"], prediction["outputs"]["movies"]);
    }
    for (features, says) in [
        (json!({"genre": "comedy"}), "features.query is required"),
        (json!({"query": "dogs", "genre": 3}), "features.genre"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_whose_embedding_model_is_missing_says_so() {
    let server = serve(&fixture("movie_search/pipeline.json"), false).await;
    let (status, refused) = refused_search(&server).await;
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("model 'minilm'"),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_on_a_field_no_item_has_is_refused_at_load() {
    let pipeline = String::from_utf8(fixture("movie_search/pipeline.json"))
        .unwrap()
        .replace("\"genres\": \"genre\"", "\"genre\": \"genre\"");
    let server = serve(pipeline.as_bytes(), false).await;
    let (status, refused) = refused_search(&server).await;
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("field 'genre' to filter on"),
        "{refused}"
    );
    server.stop().await;
}

/// The fixture's pipeline with its predict step pinned to minilm `version` (JSON text).
fn pinned(version: &str) -> Vec<u8> {
    String::from_utf8(fixture("movie_search/pipeline.json"))
        .unwrap()
        .replace(
            "\"model\": \"minilm\"",
            &format!("\"model\": \"minilm\", \"version\": {version}"),
        )
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_pinned_to_an_embedding_version_uses_that_version_or_says_it_is_missing() {
    let server = serve(&pinned("1"), true).await;
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "movie_search", "features": {"query": "dogs"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"]["movies"].as_array().unwrap().len(), 3);
    server.stop().await;

    let server = serve(&pinned("2"), true).await;
    let (status, refused) = refused_search(&server).await;
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("model 'minilm' version 2"),
        "{refused}"
    );
    server.stop().await;

    let server = serve(&pinned("true"), true).await;
    let (status, refused) = refused_search(&server).await;
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("version must be a version number (from 1) or an alias, not true"),
        "{refused}"
    );
    server.stop().await;
}
