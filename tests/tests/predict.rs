//! `POST /v1/predict` end to end: a real ONNX model whose input row is filled partly from a real
//! Redis and partly from the request, encoded by the pipeline declared with the model; the same
//! answer as the bare model given that row over /v2; named 400s for bad input; the response
//! cache; Redis killed or frozen mid-test (defaults, flagged, never a failed prediction); time
//! budgets answered from the cache or the declared fallback.

use marquee_feature_store::{
    Definitions, FeatureValue, OnlineRow, OnlineStore, RedisConfig, RedisStore, entity_key,
};
use marquee_tests::{RedisServer, Repository, TestServer};
use serde_json::{Value, json};

const DEFINITIONS: &str = r#"
[[entity]]
name = "user"

[[entity]]
name = "show"

[[feature_view]]
name = "user_activity"
entities = ["user"]
ttl = "1h"
feature = [
  { name = "bookings_7d", dtype = "int64", default = 0 },
  { name = "avg_ticket_price", dtype = "float64", default = 10.0 },
]

[[feature_view]]
name = "show_demand"
entities = ["show"]
ttl = "1h"
feature = [{ name = "occupancy", dtype = "float32", default = 0.5 }]
"#;

/// Ten columns for gbr's X: three from the store, the rest from the request.
fn pipeline(extra: Value) -> Value {
    let mut pipeline = json!({
        "input": "X",
        "features": [
            {"name": "bookings_7d", "view": "user_activity"},
            {"name": "avg_ticket_price", "view": "user_activity"},
            {"name": "occupancy", "view": "show_demand"},
            {"name": "hours_to_show", "default": 48, "transform": {"clip": [0, 240]}},
            {"name": "price", "default": 12, "transform": {"standardize": {"mean": 12, "std": 3}}},
            {"name": "is_member", "dtype": "bool"},
            {"name": "device", "dtype": "string", "default": "web", "transform": {"one_hot": ["web", "app", "kiosk", "box"]}}
        ],
        "output": {"tensor": "variable", "thresholds": [{"min": 1.0, "label": "high"}, {"label": "low"}]}
    });
    for (k, v) in extra.as_object().unwrap() {
        pipeline[k] = v.clone();
    }
    pipeline
}

const CONFIG: &str = "max_batch_size: 16\ndynamic_batching { }\n";

async fn start(redis: &RedisServer) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let definitions = dir.path().join("features.toml");
    std::fs::write(&definitions, DEFINITIONS).unwrap();
    let repository = Repository::new()
        .add("pricing", "gbr", Some(CONFIG))
        .write(
            "pricing/pipeline.json",
            pipeline(json!({"cache": {"ttl_ms": 60000}}))
                .to_string()
                .as_bytes(),
        )
        .add("pricing_fallback", "gbr", Some(CONFIG))
        .write(
            "pricing_fallback/pipeline.json",
            pipeline(json!({"fallback": {"rules": [
                {"when": {"is_member": true}, "outputs": {"variable": 1.2, "label": "member rules"}},
                {"when": {"hours_to_show": {"max": 2}}, "outputs": {"variable": 2.0, "label": "last minute"}},
                {"outputs": {"variable": 1.5, "label": "rules"}}
            ]}}))
                .to_string()
                .as_bytes(),
        )
        .add("bare", "gbr", Some(CONFIG));
    let url = redis.url();
    let server = TestServer::start_with(repository, |config| {
        config.features = Some(definitions.clone());
        config.online_store = url;
        config.online_timeout_ms = 200;
    })
    .await;
    (server, dir)
}

async fn fill(redis: &RedisServer) {
    let definitions = Definitions::from_toml(DEFINITIONS).unwrap();
    // Setting up, not under test: a loaded CI machine may take longer than the serving default.
    let config = RedisConfig {
        timeout_ms: 5_000,
        ..RedisConfig::new(redis.url())
    };
    let store = RedisStore::new(&config).unwrap();
    let now = marquee_feature_store::online::now_ms();
    store
        .write(
            definitions.view("user_activity").unwrap(),
            &[OnlineRow {
                entity_key: entity_key(&["u1"]),
                values: vec![Some(FeatureValue::Int(4)), Some(FeatureValue::Float(18.5))],
                event_time_ms: now,
            }],
        )
        .await
        .unwrap();
    store
        .write(
            definitions.view("show_demand").unwrap(),
            &[OnlineRow {
                entity_key: entity_key(&["s1"]),
                values: vec![Some(FeatureValue::Float(0.75))],
                event_time_ms: now,
            }],
        )
        .await
        .unwrap();
}

/// What the bare model says for one encoded row.
async fn bare(server: &TestServer, row: [f32; 10]) -> f64 {
    let (status, answer) = server
        .post(
            "/v2/models/bare/infer",
            json!({"inputs": [{"name": "X", "shape": [1, 10], "datatype": "FP32", "data": row}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["outputs"][0]["data"][0].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_use_store_and_request_features_and_match_the_bare_model() {
    let redis = RedisServer::start().await;
    fill(&redis).await;
    let (server, _dir) = start(&redis).await;

    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"user_id": "u1", "show_id": "s1"},
                   "features": {"hours_to_show": 300, "price": 15, "device": "app"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // bookings 4 and price 18.5 (user), occupancy 0.75 (show), hours clipped to 240,
    // price standardised to 1, is_member defaulted to false, device one-hot "app".
    let expected = bare(
        &server,
        [4.0, 18.5, 0.75, 240.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
    )
    .await;
    assert_eq!(answer["outputs"]["variable"].as_f64().unwrap(), expected);
    let label = if expected >= 1.0 { "high" } else { "low" };
    assert_eq!(answer["outputs"]["label"], label);
    assert_eq!(answer["model"], "pricing");
    assert_eq!(answer["model_version"], "1");
    assert_eq!(answer["degraded"], json!([]));
    assert_eq!(answer["cache_hit"], false);
    assert_eq!(
        answer["prediction_id"].as_str().unwrap().len(),
        36,
        "a UUID"
    );
    assert!(answer["latency_ms"].as_f64().unwrap() > 0.0);

    // The same inputs again (keys in another order): from the cache.
    let (_, again) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "features": {"device": "app", "price": 15, "hours_to_show": 300},
                   "entities": {"show_id": "s1", "user_id": "u1"}}),
        )
        .await;
    assert_eq!(again["cache_hit"], true, "{again}");
    assert_eq!(again["outputs"], answer["outputs"]);
    let metrics = reqwest::get(&server.metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("marquee_predict_cache_total{model=\"pricing\",result=\"hit\"} 1"),
        "{metrics}"
    );

    // Several instances at once; an unknown user gets the defaults; a request value wins over
    // the store's.
    let (status, batch) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "instances": [
                {"entities": {"user_id": "nobody", "show_id": "s1"}},
                {"entities": {"user_id": "u1", "show_id": "s1"}, "features": {"avg_ticket_price": 9.0, "is_member": true}}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    let first = bare(
        &server,
        [0.0, 10.0, 0.75, 48.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    )
    .await;
    let second = bare(
        &server,
        [4.0, 9.0, 0.75, 48.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    )
    .await;
    assert_eq!(
        batch["predictions"][0]["outputs"]["variable"]
            .as_f64()
            .unwrap(),
        first
    );
    assert_eq!(
        batch["predictions"][1]["outputs"]["variable"]
            .as_f64()
            .unwrap(),
        second
    );

    // More instances than the model's max_batch_size (16): split, run, and answered in order.
    let many: Vec<Value> = (0..40)
        .map(|i| json!({"entities": {"user_id": format!("nobody-{i}"), "show_id": "s1"}}))
        .collect();
    let (status, large) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "instances": many}),
        )
        .await;
    assert_eq!(status, 200, "{large}");
    let predictions = large["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 40);
    assert!(
        predictions
            .iter()
            .all(|p| p["outputs"]["variable"].as_f64() == Some(first)),
        "{large}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_that_names_the_field() {
    let redis = RedisServer::start().await;
    let (server, _dir) = start(&redis).await;
    let entities = json!({"user_id": "u1", "show_id": "s1"});
    for (body, status, message) in [
        (
            json!({"model": "pricing", "entities": entities, "features": {"colour": 1}}),
            400,
            "features.colour is not a feature of model 'pricing'",
        ),
        (
            json!({"model": "pricing", "entities": entities, "features": {"price": "cheap"}}),
            400,
            "features.price: expected a number, got \"cheap\"",
        ),
        (
            json!({"model": "pricing", "entities": {"user_id": "u1"}}),
            400,
            "entities.show_id is required (feature view 'show_demand' of model 'pricing')",
        ),
        (
            json!({"model": "pricing", "entities": {"user_id": "u1", "show_id": "s1", "seat_id": "a1"}}),
            400,
            "entities.seat_id is not an entity model 'pricing' uses",
        ),
        (
            json!({"model": "pricing", "entities": {"user_id": 1.5, "show_id": "s1"}}),
            400,
            "entities.user_id must be a string or an integer, got 1.5",
        ),
        (
            json!({"model": "pricing", "instances": [{"entities": {"user_id": ["u1"], "show_id": "s1"}}]}),
            400,
            "instances[0].entities.user_id must be a string or an integer",
        ),
        (
            json!({"model": "pricing", "entities": entities, "extra": 1}),
            400,
            "unknown field `extra`",
        ),
        (
            json!({"model": "bare", "features": {}}),
            400,
            "declares no /v1/predict pipeline",
        ),
        (json!({"model": "ghost"}), 404, "model 'ghost' is not found"),
    ] {
        let (got, answer) = server.post("/v1/predict", body.clone()).await;
        assert_eq!(got, status, "{body} -> {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{body}: {error}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_degrades_predictions_and_they_recover() {
    let mut redis = RedisServer::start().await;
    fill(&redis).await;
    let (server, _dir) = start(&redis).await;
    let request =
        json!({"model": "pricing_fallback", "entities": {"user_id": "u1", "show_id": "s1"}});
    let (_, healthy) = server.post("/v1/predict", request.clone()).await;
    assert_eq!(healthy["degraded"], json!([]), "{healthy}");
    let with_store = bare(
        &server,
        [4.0, 18.5, 0.75, 48.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    )
    .await;
    assert_eq!(healthy["outputs"]["variable"].as_f64().unwrap(), with_store);

    redis.kill();
    let defaults = bare(
        &server,
        [0.0, 10.0, 0.5, 48.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    )
    .await;
    for _ in 0..10 {
        let (status, answer) = server.post("/v1/predict", request.clone()).await;
        assert_eq!(status, 200, "never a failed prediction: {answer}");
        assert_eq!(answer["degraded"], json!(["features"]));
        assert_eq!(answer["outputs"]["variable"].as_f64().unwrap(), defaults);
    }
    let metrics = reqwest::get(&server.metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "marquee_predict_degraded_total{model=\"pricing_fallback\",reason=\"features\"}"
        ),
        "{metrics}"
    );

    redis.restart().await;
    fill(&redis).await;
    let started = std::time::Instant::now();
    loop {
        let (_, answer) = server.post("/v1/predict", request.clone()).await;
        if answer["degraded"] == json!([]) {
            assert_eq!(answer["outputs"]["variable"].as_f64().unwrap(), with_store);
            break;
        }
        assert!(
            started.elapsed().as_secs() < 10,
            "predictions never recovered: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_is_outwaited_by_the_time_budget() {
    let redis = RedisServer::start().await;
    fill(&redis).await;
    let (server, _dir) = start(&redis).await;
    let entities = json!({"user_id": "u1", "show_id": "s1"});
    let (_, fresh) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": entities}),
        )
        .await;
    assert_eq!(fresh["cache_hit"], false);

    // Redis stops answering; the store gives up after --online-timeout-ms (200 ms here).
    redis.pause();
    let started = std::time::Instant::now();
    let (status, slow) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing_fallback", "entities": entities}),
        )
        .await;
    assert_eq!(status, 200, "{slow}");
    assert_eq!(slow["degraded"], json!(["features"]));
    assert!(
        started.elapsed().as_millis() < 2000,
        "took {:?}",
        started.elapsed()
    );

    // A 50 ms budget runs out first: the declared fallback, the cached answer, or 504.
    let budget = json!({"timeout_ms": 50});
    let (_, fallback) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing_fallback", "entities": entities, "options": budget}),
        )
        .await;
    assert_eq!(
        fallback["outputs"],
        json!({"variable": 1.5, "label": "rules"}),
        "{fallback}"
    );
    assert_eq!(fallback["degraded"], json!(["timeout"]));
    // The first rule that holds for the request's own values answers.
    for (features, label) in [
        (json!({"is_member": true}), "member rules"),
        (json!({"hours_to_show": 1}), "last minute"),
        (json!({"hours_to_show": 3}), "rules"),
    ] {
        let (_, ruled) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing_fallback", "entities": entities, "features": features, "options": budget}),
            )
            .await;
        assert_eq!(ruled["outputs"]["label"], label, "{features}: {ruled}");
    }
    let (status, cached) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": entities, "features": {}, "options": budget}),
        )
        .await;
    assert_eq!(status, 200, "{cached}");
    assert_eq!(cached["outputs"], fresh["outputs"]);
    assert_eq!(cached["cache_hit"], true);
    let (status, nothing) = server
        .post("/v1/predict", json!({"model": "pricing", "entities": {"user_id": "u2", "show_id": "s1"}, "options": budget}))
        .await;
    assert_eq!(status, 504, "no cache entry and no fallback: {nothing}");
    assert!(
        nothing["error"]
            .as_str()
            .unwrap()
            .contains("no fallback of model 'pricing' applies"),
        "{nothing}"
    );
    redis.resume();
    server.stop().await;
}

/// The pipelines shipped in deploy/models load against deploy/features.toml and answer with the
/// embedded in-process store (every feature at its default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_pipelines_answer_on_embedded_defaults() {
    let deploy = marquee_tests::root().join("deploy");
    let file = |path: &str| std::fs::read_to_string(deploy.join(path)).unwrap();
    let repository = Repository::new()
        .add("gbr", "gbr", Some(&file("models/gbr/config.pbtxt")))
        .write(
            "gbr/pipeline.json",
            file("models/gbr/pipeline.json").as_bytes(),
        )
        .add(
            "iforest",
            "iforest",
            Some(&file("models/iforest/config.pbtxt")),
        )
        .write(
            "iforest/pipeline.json",
            file("models/iforest/pipeline.json").as_bytes(),
        );
    let server = TestServer::start_with(repository, |config| {
        config.features = Some(deploy.join("features.toml"));
    })
    .await;
    let (status, price) = server
        .post(
            "/v1/predict",
            json!({"model": "gbr", "entities": {"user_id": "u1", "show_id": "s1"},
                   "features": {"hours_to_show": 3, "is_peak_hour": true}}),
        )
        .await;
    assert_eq!(status, 200, "{price}");
    assert!(price["outputs"]["variable"].is_number(), "{price}");
    let (status, fraud) = server
        .post(
            "/v1/predict",
            json!({"model": "iforest", "entities": {"user_id": "u1"},
                   "features": {"amount": 900, "new_device": true, "location_distance_km": 4000}}),
        )
        .await;
    assert_eq!(status, 200, "{fraud}");
    assert_eq!(
        fraud["outputs"]["label"], "verify",
        "an outlying booking is sent to verification: {fraud}"
    );
    assert!(
        fraud["outputs"]["scores"].as_f64().unwrap() < 0.0,
        "{fraud}"
    );
    let (_, usual) = server
        .post(
            "/v1/predict",
            json!({"model": "iforest", "entities": {"user_id": "u2"}}),
        )
        .await;
    assert_eq!(usual["outputs"]["label"], "allow", "{usual}");
    server.stop().await;
}

/// A pipeline that cannot run (here: no feature definitions given) costs the model its
/// /v1/predict, with the reason, but not its /v2 serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_cannot_run_leaves_v2_serving() {
    let repository = Repository::new().add("pricing", "gbr", Some(CONFIG)).write(
        "pricing/pipeline.json",
        pipeline(json!({})).to_string().as_bytes(),
    );
    let server = TestServer::start(repository).await;
    assert_eq!(server.get("/v2/health/ready").await.0, 200);
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"user_id": "u1", "show_id": "s1"}}),
        )
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("feature view 'user_activity' is not defined"),
        "{answer}"
    );
    server.stop().await;
}

/// `/v1/openapi.json` describes `/v1/predict` from the types the server itself parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_predict() {
    let server = TestServer::start(Repository::new()).await;
    let (status, document) = server.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{document}"
    );
    let predict = &document["paths"]["/v1/predict"]["post"];
    for code in ["200", "400", "404", "503", "504"] {
        assert!(
            predict["responses"][code].is_object(),
            "response {code}: {predict}"
        );
    }
    let request = &document["components"]["schemas"]["PredictRequest"];
    assert_eq!(request["required"], json!(["model"]), "{request}");
    for field in [
        "model",
        "version",
        "entities",
        "features",
        "instances",
        "options",
    ] {
        assert!(
            request["properties"][field].is_object(),
            "{field}: {request}"
        );
    }
    for field in ["degraded", "prediction", "label", "outputs"] {
        assert!(
            document["components"]["schemas"]["Prediction"]["properties"][field].is_object(),
            "Prediction.{field}"
        );
    }
    server.stop().await;
}
