//! Traffic policies end to end (`serving/src/traffic.rs`): a model with two loaded versions, a
//! policy set over REST, and requests that name no version routed by user over `/v1/predict`,
//! REST `/v2` and gRPC alike (the same user on the same variant everywhere, every answer naming
//! its variant), a request-level split, a shadow version that sees requests without answering
//! them, and bad policies refused with the field named.

use std::collections::BTreeMap;

use marquee_proto::inference as pb;
use marquee_tests::{Repository, TestServer, gbr_grpc_request, request_only_pipeline};
use serde_json::{Value, json};

/// `pricing` with versions 1 and 2 (the same gbr graph), both loaded.
async fn two_versions() -> TestServer {
    let repository = Repository::new()
        .add_version("pricing", "gbr", 1, None)
        .add_version(
            "pricing",
            "gbr",
            2,
            Some("version_policy { all { } }\nmax_batch_size: 8\ndynamic_batching { }\n"),
        )
        .write("pricing/pipeline.json", &request_only_pipeline())
        .add("cached", "gbr", None)
        .write("cached/pipeline.json", &cached_pipeline());
    TestServer::start(repository).await
}

/// The request-only pipeline with a response cache.
fn cached_pipeline() -> Vec<u8> {
    let mut pipeline: Value = serde_json::from_slice(&request_only_pipeline()).unwrap();
    pipeline["cache"] = json!({"ttl_ms": 60000, "max_entries": 100});
    pipeline.to_string().into_bytes()
}

async fn put(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let response = server
        .client
        .put(format!("{}{path}", server.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn canary(share: f64) -> Value {
    json!({
        "control": 1,
        "variants": [{"name": "canary", "version": 2, "share": share}],
        "split": {"by": "user", "entity": "user_id"},
        "salt": "rollout-7"
    })
}

async fn predict_as(server: &TestServer, user: &str) -> (String, String) {
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"user_id": user}, "features": {"f1": 3}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    (
        answer["variant"].as_str().unwrap().to_string(),
        answer["model_version"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_split_keeps_each_user_on_one_variant_over_every_protocol() {
    let server = two_versions().await;
    let (status, policy) = put(&server, "/v1/models/pricing/traffic", canary(30.0)).await;
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy["variants"][0]["share"], 30.0);

    let mut variant_of = BTreeMap::new();
    for i in 0..300 {
        let user = format!("u{i}");
        let (variant, version) = predict_as(&server, &user).await;
        assert_eq!(version, if variant == "canary" { "2" } else { "1" });
        variant_of.insert(user, variant);
    }
    let on_canary = variant_of.values().filter(|v| *v == "canary").count();
    assert!(
        (60..=120).contains(&on_canary),
        "{on_canary} of 300 users on a 30% canary"
    );

    // The same users over REST /v2 (routing_key) and gRPC land on the same variants.
    let mut grpc = server.grpc_client().await;
    for (user, variant) in variant_of.iter().take(60) {
        let body = json!({
            "parameters": {"routing_key": user},
            "inputs": [{"name": "X", "shape": [1, 10], "datatype": "FP32", "data": vec![0.0f32; 10]}]
        });
        let (status, answer) = server.post("/v2/models/pricing/infer", body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["parameters"]["variant"],
            variant.as_str(),
            "REST /v2 for {user}"
        );
        assert_eq!(
            answer["model_version"],
            if variant == "canary" { "2" } else { "1" }
        );

        let mut request = gbr_grpc_request("pricing", 1);
        request.model_version.clear();
        request.parameters.insert(
            "routing_key".into(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                    user.clone(),
                )),
            },
        );
        let answer = grpc.model_infer(request).await.unwrap().into_inner();
        let got = match &answer.parameters["variant"].parameter_choice {
            Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => s.clone(),
            other => panic!("variant parameter {other:?}"),
        };
        assert_eq!(&got, variant, "gRPC for {user}");
    }

    // Growing the canary keeps every user it had.
    put(&server, "/v1/models/pricing/traffic", canary(60.0)).await;
    for (user, variant) in &variant_of {
        let (now, _) = predict_as(&server, user).await;
        if variant == "canary" {
            assert_eq!(now, "canary", "{user} left the canary when it grew");
        }
    }

    // A request naming its version is not routed; nor is one without the split's entity.
    let (_, pinned) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "version": 2, "entities": {"user_id": "u1"}}),
        )
        .await;
    assert_eq!(pinned["variant"], Value::Null);
    assert_eq!(pinned["model_version"], "2");
    let (_, anonymous) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "features": {"f1": 1}}),
        )
        .await;
    assert_eq!(anonymous["variant"], "control");
    assert_eq!(anonymous["model_version"], "1");

    let routed = server
        .metric("marquee_variant_requests_total{model=\"pricing\",outcome=\"success\",variant=\"canary\"}")
        .await;
    assert!(
        routed >= on_canary as f64,
        "{routed} canary requests counted"
    );

    // Removing the policy sends requests to the default version again, unlabelled.
    let response = server
        .client
        .delete(format!("{}/v1/models/pricing/traffic", server.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "features": {"f1": 1}}),
        )
        .await;
    assert_eq!(answer["variant"], Value::Null);
    // Clients that send the split's entity keep working after the policy is gone; an entity
    // no split and no pipeline reads is still refused.
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"user_id": "u1"}}),
        )
        .await;
    assert_eq!(
        (status, answer["variant"].clone()),
        (200, Value::Null),
        "{answer}"
    );
    let (status, answer) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"device_id": "d1"}}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = server.get("/v1/models/pricing/traffic").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_split_and_a_shadow_take_their_shares() {
    let server = two_versions().await;
    let (status, answer) = put(
        &server,
        "/v1/models/pricing/traffic",
        json!({"control": 1, "variants": [{"name": "b", "version": 2, "share": 50}],
               "split": {"by": "request"}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut b = 0;
    for _ in 0..200 {
        let (_, answer) = server
            .post("/v1/predict", json!({"model": "pricing", "features": {}}))
            .await;
        if answer["variant"] == "b" {
            b += 1;
        }
    }
    assert!(
        (95..=105).contains(&b),
        "{b} of 200 requests on a 50% request split"
    );

    // Everyone on version 1, every request mirrored to version 2 and never answered from it.
    put(
        &server,
        "/v1/models/pricing/traffic",
        json!({"control": 1, "variants": [], "split": {"by": "request"},
               "shadow": {"version": 2, "share": 100}}),
    )
    .await;
    for _ in 0..50 {
        let (status, answer) = server
            .post("/v1/predict", json!({"model": "pricing", "features": {}}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(answer["model_version"], "1");
        assert_eq!(answer["variant"], "control");
    }
    let shadowed =
        "marquee_variant_requests_total{model=\"pricing\",outcome=\"success\",variant=\"shadow\"}";
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = server.metric(shadowed).await;
        if seen >= 50.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let dropped = server
        .metric("marquee_shadow_dropped_total{model=\"pricing\"}")
        .await;
    assert_eq!(seen + dropped, 50.0, "mirrored {seen}, dropped {dropped}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_refused_with_what_is_wrong() {
    let server = two_versions().await;
    // With no policy installed, the default split entity is still accepted (clients may always
    // send it), and any other entity the pipeline does not read is not. Not read, it does not
    // shape the cached answer: two users asking the same share it.
    for (entity, status) in [("user_id", 200), ("seat_id", 400)] {
        let (code, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing", "entities": {entity: "a1"}, "features": {}}),
            )
            .await;
        assert_eq!(code, status, "{entity}: {answer}");
    }
    let mut hits = Vec::new();
    for user in ["u1", "u2"] {
        let (code, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "cached", "entities": {"user_id": user}, "features": {"f1": 0.5}}),
            )
            .await;
        assert_eq!(code, 200, "{answer}");
        hits.push(answer["cache_hit"].clone());
    }
    assert_eq!(hits, [json!(false), json!(true)]);
    let cases = [
        (
            json!({"control": 1, "variants": [{"name": "c", "version": 3, "share": 5}], "split": {"by": "request"}}),
            "version 3 is not loaded",
        ),
        (
            json!({"control": 1, "variants": [{"name": "c", "version": 2, "share": 120}], "split": {"by": "request"}}),
            "between 0 and 100 percent",
        ),
        (
            json!({"control": 1, "variants": [{"name": "control", "version": 2, "share": 5}], "split": {"by": "request"}}),
            "reserved",
        ),
        (
            json!({"control": 1, "variants": [], "split": {"by": "user", "entity": ""}}),
            "entity",
        ),
        (
            json!({"control": 1, "variants": [], "split": {"by": "request"}, "weights": [1]}),
            "unknown field `weights`",
        ),
    ];
    for (policy, expected) in cases {
        let (status, answer) = put(&server, "/v1/models/pricing/traffic", policy.clone()).await;
        assert_eq!(status, 400, "{policy} -> {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{policy}: {message}");
    }
    let (status, answer) = put(&server, "/v1/models/nope/traffic", canary(5.0)).await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = server.get("/v1/models/pricing/traffic").await;
    assert_eq!(status, 404);
    // No policy was installed by any of them.
    let (_, answer) = server
        .post("/v1/predict", json!({"model": "pricing", "features": {}}))
        .await;
    assert_eq!(answer["variant"], Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_reads_out_fed_back_outcomes_per_variant_against_the_control() {
    let server = two_versions().await;
    let (status, body) = server.get("/v1/experiments/pricing").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no traffic policy")
    );
    let policy = json!({
        "control": 1,
        "variants": [{"name": "b", "version": 2, "share": 50}],
        "split": {"by": "request"}
    });
    let (status, body) = put(&server, "/v1/models/pricing/traffic", policy).await;
    assert_eq!(status, 200, "{body}");

    // Variant b converts three answers in five, the control one in five; every fourth answer
    // gets no outcome.
    let mut outcomes: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut first_id = String::new();
    for i in 0..400 {
        let (status, answer) = server
            .post(
                "/v1/predict",
                json!({"model": "pricing", "features": {"f1": (i % 7) as f64}}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let variant = answer["variant"].as_str().unwrap().to_string();
        let id = answer["prediction_id"].as_str().unwrap().to_string();
        if i % 4 == 3 {
            continue;
        }
        let converted = if variant == "b" { i % 5 < 3 } else { i % 5 < 1 };
        let (status, receipt) = server
            .post(
                "/v1/feedback",
                json!({"prediction_id": id, "outcome": converted}),
            )
            .await;
        assert_eq!(status, 200, "{receipt}");
        assert_eq!(receipt["counted"], true);
        assert_eq!(receipt["logged"], false, "no event sink");
        assert_eq!(receipt["variant"], variant.as_str());
        assert_eq!(receipt["version"], if variant == "b" { 2 } else { 1 });
        outcomes
            .entry(variant)
            .or_default()
            .push(f64::from(u8::from(converted)));
        if first_id.is_empty() {
            first_id = id;
        }
    }

    // Bad feedback is refused with what is wrong.
    let (status, body) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": first_id, "outcome": 1}),
        )
        .await;
    assert_eq!(status, 409, "a second outcome for one answer: {body}");
    let (status, body) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": "nope", "outcome": 1}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--event-sink"),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": first_id, "outcome": "yes"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("outcome"),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": first_id, "outcome": 1, "extra": 2}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // An answer from a named version was not routed: nothing to count it in.
    let (_, pinned) = server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "version": 2, "features": {"f1": 1.0}}),
        )
        .await;
    let (status, body) = server
        .post(
            "/v1/feedback",
            json!({"prediction_id": pinned["prediction_id"], "outcome": 1}),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    let (status, readout) = server.get("/v1/experiments/pricing").await;
    assert_eq!(status, 200, "{readout}");
    let variants = &readout["variants"];
    assert_eq!(variants["b"]["version"], 2);
    assert_eq!(variants["control"]["version"], 1);
    assert_eq!(
        variants["b"]["requests"].as_u64().unwrap()
            + variants["control"]["requests"].as_u64().unwrap(),
        400
    );
    let on_b = variants["b"]["requests"].as_u64().unwrap();
    assert!(
        (196..=204).contains(&on_b),
        "{on_b} of 400 on a 50% request split"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (variant, values) in &outcomes {
        let outcome = &variants[variant]["outcome"];
        assert_eq!(outcome["count"], values.len(), "{variant}");
        let got = outcome["mean"].as_f64().unwrap();
        assert!((got - mean(values)).abs() < 1e-12, "{variant}: {got}");
        assert_eq!(
            variants[variant]["prediction"]["count"],
            variants[variant]["requests"]
        );
    }
    let comparison = |metric: &str| {
        readout["comparisons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["variant"] == "b" && c["metric"] == metric)
            .unwrap_or_else(|| panic!("no {metric} comparison in {readout}"))
            .clone()
    };
    let outcome = comparison("outcome");
    assert_eq!(outcome["test"], "Welch's t-test");
    let difference = outcome["difference"].as_f64().unwrap();
    let expected = mean(&outcomes["b"]) - mean(&outcomes["control"]);
    assert!((difference - expected).abs() < 1e-12, "{outcome}");
    let [low, high] = [0, 1].map(|i| outcome["confidence_interval"][i].as_f64().unwrap());
    assert!(
        low < difference && difference < high && low > 0.0,
        "{outcome}"
    );
    assert!(outcome["p_value"].as_f64().unwrap() < 1e-6 && outcome["significant"] == true);
    let errors = comparison("error_rate");
    assert_eq!(errors["difference"], 0.0);
    assert_eq!(errors["p_value"], 1.0);
    assert_eq!(errors["significant"], false);
    for metric in ["latency_ms", "prediction"] {
        let p = comparison(metric)["p_value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{metric}: {p}");
    }
    server.stop().await;
}
