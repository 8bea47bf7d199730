//! Canary deployments end to end (`serving/src/deploy/`), on a registry in a local folder and real
//! models: a healthy version ramps through every step and is promoted in the registry, surviving a
//! server restart in the middle; a version that fails on a slice of inputs (a data-dependent
//! Reshape) is rolled back within its guardrail window while no request of a control user fails;
//! a version that answers everything but a few times slower is rolled back by the comparison
//! with the control (Mann-Whitney on latencies); a shadow phase judges a version on mirrored
//! answers, rolling a broken one back before any client sees it; two servers on one registry
//! share one deployment, one history and each user's variant;
//! the platform API's request shape holds a canary until an operator promotes it; bad requests
//! are refused with what is wrong. Decisions are announced as events, predictions logged with
//! their variant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use marquee_registry::{PushFile, Quiet, Registry, Stage};
use marquee_serving::config::EventSinkKind;
use marquee_tests::{Repository, TestServer, fixtures, read_parquet_tree, string_column};
use serde_json::{Value, json};

fn pipeline() -> Value {
    let features: Vec<Value> = (0..10)
        .map(|i| json!({"name": format!("f{i}"), "default": 1}))
        .collect();
    json!({"input": "X", "features": features, "output": {"tensor": "variable"}})
}

async fn push(registry: &Registry, fixture: &str) -> u64 {
    let bytes =
        std::fs::read(fixtures().join("models").join(fixture).join("1/model.onnx")).unwrap();
    let mut manifest = marquee_tests::manifest(
        json!({"max_batch_size": 16, "dynamic_batching": {"max_queue_delay_microseconds": 200}}),
    );
    manifest.pipeline = pipeline();
    registry
        .push(
            "pricing",
            vec![PushFile {
                path: "model.onnx".into(),
                contents: Bytes::from(bytes),
            }],
            manifest,
            &Quiet,
        )
        .await
        .unwrap()
        .version
}

/// A registry with pricing v1 (gbr) in production and the given fixtures pushed after it.
async fn registry(dir: &Path, canaries: &[&str]) -> Registry {
    let registry = Registry::open(dir.to_str().unwrap()).unwrap();
    let v1 = push(&registry, "gbr").await;
    registry
        .promote("pricing", v1, Stage::Staging, None, "tests", "")
        .await
        .unwrap();
    registry
        .promote(
            "pricing",
            v1,
            Stage::Production,
            Some("reviewer"),
            "tests",
            "",
        )
        .await
        .unwrap();
    for fixture in canaries {
        push(&registry, fixture).await;
    }
    registry
}

/// One prediction for `user`; `large` makes the first feature 9 (what breaks fails_on_large).
async fn predict(server: &TestServer, user: &str, large: bool) -> (u16, Value) {
    let features = if large { json!({"f0": 9}) } else { json!({}) };
    server
        .post(
            "/v1/predict",
            json!({"model": "pricing", "entities": {"user_id": user}, "features": features}),
        )
        .await
}

async fn status(server: &TestServer, id: &str) -> Value {
    let (code, body) = server.get(&format!("/v1/deployments/{id}")).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Starts a deployment of pricing on `server`; its id.
async fn deploy(server: &TestServer, request: Value) -> String {
    let (code, answer) = server.post("/v1/models/pricing/deploy", request).await;
    assert_eq!(code, 201, "{answer}");
    answer["deployment_id"].as_str().unwrap().to_string()
}

/// What a run of traffic saw, per user: the variants in the order they answered.
#[derive(Default)]
struct Seen {
    variants: BTreeMap<String, Vec<String>>,
    failed_control: usize,
    failed_canary: usize,
    requests: usize,
}

impl Seen {
    /// A user never goes back to the control once the canary answered them.
    fn assert_sticky(&self) {
        for (user, variants) in &self.variants {
            if let Some(first) = variants.iter().position(|v| v == "canary") {
                assert!(
                    variants[first..].iter().all(|v| v != "control"),
                    "{user} went back to the control: {variants:?}"
                );
            }
        }
    }
}

/// Sends requests from 60 users in turn until `done` says so (checked every 20 requests) or
/// `limit` passes; returns the last deployment state.
async fn drive(
    server: &TestServer,
    id: &str,
    seen: &mut Seen,
    large: impl Fn(usize) -> bool,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        for _ in 0..20 {
            let i = seen.requests % 60;
            let user = format!("u{i}");
            let (code, answer) = predict(server, &user, large(i)).await;
            let variant = answer["variant"].as_str().unwrap_or("none").to_string();
            if code != 200 {
                if variant == "canary" || answer.to_string().contains("Reshape") {
                    seen.failed_canary += 1;
                } else {
                    seen.failed_control += 1;
                }
            } else {
                seen.variants.entry(user).or_default().push(variant);
            }
            seen.requests += 1;
        }
        let state = status(server, id).await;
        if done(&state) || started.elapsed() > limit {
            return state;
        }
    }
}

/// The `canary` alias once the server that decided has tidied up (it removes the alias right
/// after recording the decision).
async fn canary_alias_after_the_decision(registry: &Registry) -> Option<u64> {
    let mut alias = None;
    for _ in 0..50 {
        alias = registry
            .refs("pricing")
            .await
            .unwrap()
            .aliases
            .get("canary")
            .copied();
        if alias.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alias
}

/// A deployment's latest decision.
fn last_decision(state: &Value) -> Value {
    state["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone()
}

fn actions(state: &Value) -> Vec<String> {
    state["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_ramps_through_every_step_and_is_promoted_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &["gbr_alt"]).await;
    let server = TestServer::start_registry(dir.path()).await;
    let (code, answer) = server
        .post(
            "/v1/models/pricing/deploy",
            json!({"version": 2, "steps": [20, 50, 100], "step_requests": 30,
                   "guardrails": {"min_requests": 20}, "by": "ops"}),
        )
        .await;
    assert_eq!(code, 201, "{answer}");
    let id = answer["deployment_id"].as_str().unwrap().to_string();
    assert_eq!(id, "pricing-1");
    assert_eq!(answer["status"], "starting");
    assert_eq!(answer["status_url"], "/v1/deployments/pricing-1");

    // A second deployment while this one runs is a conflict.
    let (code, body) = server
        .post("/v1/models/pricing/deploy", json!({"version": 2}))
        .await;
    assert_eq!(code, 409, "{body}");

    let mut seen = Seen::default();
    let state = drive(
        &server,
        &id,
        &mut seen,
        |_| false,
        Duration::from_secs(60),
        |s| s["step"].as_u64() >= Some(1),
    )
    .await;
    assert_eq!(state["status"], "progressing", "{state}");

    // A new server on the same registry picks the deployment up where it was.
    server.stop().await;
    let server = TestServer::start_registry(dir.path()).await;
    let resumed = status(&server, &id).await;
    assert_eq!(resumed["step"], state["step"]);
    let state = drive(
        &server,
        &id,
        &mut seen,
        |_| false,
        Duration::from_secs(90),
        |s| s["status"] == "promoted",
    )
    .await;
    assert_eq!(state["status"], "promoted", "{state}");
    let steps = actions(&state);
    assert_eq!(
        steps,
        ["started", "loaded", "advanced", "advanced", "promoted"],
        "{state}"
    );
    assert_eq!(seen.failed_control + seen.failed_canary, 0);
    seen.assert_sticky();
    // Every decision says why, with the windows it saw.
    for decision in &state["decisions"].as_array().unwrap()[2..] {
        assert!(!decision["reason"].as_str().unwrap().is_empty());
        assert!(
            decision["windows"]["canary"]["requests"].as_u64().unwrap() >= 20,
            "{decision}"
        );
    }
    let refs = registry.refs("pricing").await.unwrap();
    assert_eq!(refs.aliases.get("production"), Some(&2));
    assert_eq!(canary_alias_after_the_decision(&registry).await, None);
    // Serving follows: version 2 answers without a policy once production moved.
    let mut last = Value::Null;
    for _ in 0..100 {
        let (_, answer) = predict(&server, "u1", false).await;
        if answer["model_version"] == "2" && answer["variant"].is_null() {
            last = answer;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["model_version"], "2", "production never moved to v2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_on_some_inputs_is_rolled_back_and_control_users_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &["fails_on_large"]).await;
    let events = tempfile::tempdir().unwrap();
    let (registry_url, events_dir) = (dir.path().to_path_buf(), events.path().to_path_buf());
    let server = TestServer::start_with_config(move |c| {
        c.registry = Some(registry_url.to_string_lossy().into_owned());
        c.registry_poll_seconds = 0.1;
        c.event_sink = EventSinkKind::Parquet;
        c.events_dir = events_dir;
    })
    .await;
    let id = deploy(
        &server,
        json!({"version": 2, "steps": [50, 100], "step_requests": 100000}),
    )
    .await;
    let mut seen = Seen::default();
    let started = Instant::now();
    // A third of the users send what the canary cannot take.
    let state = drive(
        &server,
        &id,
        &mut seen,
        |i| i % 3 == 0,
        Duration::from_secs(60),
        |s| s["status"] == "rolled_back",
    )
    .await;
    assert_eq!(state["status"], "rolled_back", "{state}");
    let decision = last_decision(&state);
    assert_eq!(decision["action"], "rolled_back");
    assert!(
        decision["reason"].as_str().unwrap().contains("error rate"),
        "{decision}"
    );
    assert_eq!(seen.failed_control, 0, "a control user's request failed");
    assert!(seen.failed_canary > 0);
    // The guardrail broke early: its error-rate limit (2% of 100 requests) was past after a
    // handful of failures, at the next judgement (every 100 ms: how many requests that is
    // depends on the machine), far inside the 100,000-request step it would otherwise wait for.
    let judged = decision["windows"]["canary"]["requests"].as_u64().unwrap();
    assert!(
        judged < 1_000 && seen.failed_canary < 200,
        "rolled back after {judged} canary requests, {} failed",
        seen.failed_canary
    );
    println!(
        "rolled back after {} requests ({} failed on the canary), {:.2} s after the deployment started",
        seen.requests,
        seen.failed_canary,
        started.elapsed().as_secs_f64()
    );
    // Everyone is back on production; the canary alias is gone; nobody fails any more.
    for i in 0..60 {
        let (code, answer) = predict(&server, &format!("u{i}"), i % 3 == 0).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["model_version"], "1");
    }
    let refs = registry.refs("pricing").await.unwrap();
    assert_eq!(refs.aliases.get("production"), Some(&1));
    assert_eq!(canary_alias_after_the_decision(&registry).await, None);
    server.stop().await;

    // Each decision was announced, the rollback last; every logged prediction names its variant.
    let announced: Vec<(String, String)> = read_parquet_tree(&events.path().join("events/model"))
        .iter()
        .flat_map(|b| {
            string_column(b, "kind")
                .into_iter()
                .zip(string_column(b, "deployment_id"))
        })
        .collect();
    assert_eq!(
        announced.first(),
        Some(&("model.deployed".to_string(), id.clone())),
        "{announced:?}"
    );
    assert_eq!(
        announced.last(),
        Some(&("model.rolled_back".to_string(), id.clone())),
        "{announced:?}"
    );
    let variants: BTreeSet<String> =
        read_parquet_tree(&events.path().join("predictions/model=pricing"))
            .iter()
            .flat_map(|b| string_column(b, "variant"))
            .collect();
    // (null, read as "", once the rollback removed the policy)
    assert!(
        variants.contains("canary") && variants.contains("control"),
        "{variants:?}"
    );
    assert!(
        variants
            .iter()
            .all(|v| ["canary", "control", ""].contains(&v.as_str())),
        "{variants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_canary_is_rolled_back_by_the_comparison_with_the_control() {
    let dir = tempfile::tempdir().unwrap();
    // `slow` answers every request, a few times slower than gbr (256 dense layers it discards).
    let registry = registry(dir.path(), &["slow"]).await;
    let server = TestServer::start_registry(dir.path()).await;
    let id = deploy(
        &server,
        json!({"version": 2, "steps": [50, 100], "step_requests": 100000,
               "guardrails": {"min_requests": 100}}),
    )
    .await;
    let mut seen = Seen::default();
    let state = drive(
        &server,
        &id,
        &mut seen,
        |_| false,
        Duration::from_secs(60),
        |s| s["status"] == "rolled_back",
    )
    .await;
    assert_eq!(state["status"], "rolled_back", "{state}");
    let decision = last_decision(&state);
    let reason = decision["reason"].as_str().unwrap();
    assert!(
        reason.contains("median latency") && reason.contains("Mann-Whitney"),
        "{decision}"
    );
    // Nothing failed: only the comparison with the control could catch this canary.
    assert_eq!(seen.failed_control + seen.failed_canary, 0);
    seen.assert_sticky();
    let windows = &decision["windows"];
    let (canary, control) = (&windows["canary"], &windows["control"]);
    let slower = canary["p50_ms"].as_f64().unwrap() / control["p50_ms"].as_f64().unwrap();
    // About 3x here; what the judge needs is more than its 25% margin.
    assert!(
        slower > 1.25,
        "the canary was only {slower:.2}x slower: {windows}"
    );
    // Judged at its first chance (100 requests, every 100 ms), far inside its step.
    let judged = canary["requests"].as_u64().unwrap();
    assert!((100..=2_000).contains(&judged), "{windows}");
    println!(
        "a canary {slower:.1}x slower than the control rolled back after {judged} canary requests: {reason}"
    );
    for i in 0..20 {
        let (code, answer) = predict(&server, &format!("u{i}"), false).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["model_version"], "1");
    }
    assert_eq!(canary_alias_after_the_decision(&registry).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_phase_judges_a_version_on_mirrored_traffic_before_any_user_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &["fails_on_large", "gbr_alt"]).await;
    let server = TestServer::start_registry(dir.path()).await;

    // A broken version in shadow: judged on the mirrored answers and rolled back, while every
    // client is answered by production and none fails.
    let id = deploy(
        &server,
        json!({"version": 2, "shadow": true, "steps": [50, 100], "step_requests": 100000}),
    )
    .await;
    let mut seen = Seen::default();
    let state = drive(
        &server,
        &id,
        &mut seen,
        |i| i % 3 == 0,
        Duration::from_secs(60),
        |s| s["status"] == "rolled_back",
    )
    .await;
    assert_eq!(state["status"], "rolled_back", "{state}");
    assert_eq!(
        actions(&state),
        ["started", "loaded", "rolled_back"],
        "{state}"
    );
    let decision = last_decision(&state);
    assert!(
        decision["reason"].as_str().unwrap().contains("error rate"),
        "{decision}"
    );
    assert!(
        decision["windows"]["shadow"]["server_errors"]
            .as_u64()
            .unwrap()
            > 0,
        "{decision}"
    );
    assert_eq!(
        seen.failed_control + seen.failed_canary,
        0,
        "a client saw the shadow fail"
    );
    assert!(
        seen.variants
            .values()
            .flatten()
            .all(|v| v == "control" || v == "none"),
        "only production answers during a shadow phase (and, once rolled back, with no policy)"
    );

    // A healthy version passes its shadow phase, then ramps and is promoted.
    let id = deploy(
        &server,
        // (Mirrored requests run after the answer, competing with the next one on a busy
        // machine: their latency is not this test's subject.)
        json!({"version": 3, "shadow": true, "steps": [50, 100], "step_requests": 30,
               "guardrails": {"min_requests": 20, "max_latency_increase": 100.0}}),
    )
    .await;
    let mut seen = Seen::default();
    let state = drive(
        &server,
        &id,
        &mut seen,
        |_| false,
        Duration::from_secs(90),
        |s| s["status"] == "promoted",
    )
    .await;
    assert_eq!(state["status"], "promoted", "{state}");
    assert_eq!(
        actions(&state),
        ["started", "loaded", "shadow_passed", "advanced", "promoted"],
        "{state}"
    );
    assert_eq!(seen.failed_control + seen.failed_canary, 0);
    seen.assert_sticky();
    assert_eq!(
        registry
            .refs("pricing")
            .await
            .unwrap()
            .aliases
            .get("production"),
        Some(&3)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_registry_agree_on_a_deployment_and_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &["gbr_alt"]).await;
    let servers = [
        TestServer::start_registry(dir.path()).await,
        TestServer::start_registry(dir.path()).await,
    ];
    let id = deploy(
        &servers[0],
        json!({"version": 2, "steps": [50, 100], "step_requests": 200,
               "guardrails": {"min_requests": 20}}),
    )
    .await;
    // The second server finds it in the registry; a deployment on it is refused as a conflict.
    let started = Instant::now();
    while servers[1].get(&format!("/v1/deployments/{id}")).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "server 2 never saw {id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = servers[1]
        .post("/v1/models/pricing/deploy", json!({"version": 2}))
        .await;
    assert_eq!(code, 409, "{body}");

    // Users alternate between the servers, as behind one Service. While both servers route by
    // the same policy (read before and after a run of requests: a server routes once it has
    // loaded the canary itself, and takes each decision up at its next registry poll), each user
    // gets the same variant from both.
    let policies = async || {
        let mut both = Vec::new();
        for server in &servers {
            let (code, policy) = server.get("/v1/models/pricing/traffic").await;
            both.push((code == 200).then_some(policy));
        }
        both
    };
    let mut seen = [Seen::default(), Seen::default()];
    let mut steady_at_half = 0;
    let state = loop {
        let states = [
            status(&servers[0], &id).await,
            status(&servers[1], &id).await,
        ];
        if states.iter().all(|s| s["status"] == "promoted") {
            break states;
        }
        let before = policies().await;
        let mut differed = false;
        for _ in 0..20 {
            let i = seen[0].requests % 60;
            let user = format!("u{i}");
            let mut answered = Vec::new();
            for (server, seen) in servers.iter().zip(&mut seen) {
                let (code, answer) = predict(server, &user, false).await;
                assert_eq!(code, 200, "{answer}");
                let variant = answer["variant"].as_str().unwrap_or("none").to_string();
                seen.variants
                    .entry(user.clone())
                    .or_default()
                    .push(variant.clone());
                seen.requests += 1;
                answered.push(variant);
            }
            differed |= answered[0] != answered[1];
        }
        let after = policies().await;
        if before == after && before[0].is_some() && before[0] == before[1] {
            assert!(
                !differed,
                "a user got two variants under one policy {before:?}"
            );
            if before[0].as_ref().unwrap()["variants"][0]["share"] == 50.0 {
                steady_at_half += 1;
            }
        }
        assert!(seen[0].requests < 20_000, "{states:?}");
    };
    seen.iter().for_each(Seen::assert_sticky);
    assert!(
        steady_at_half > 0,
        "never compared the servers at the 50% step"
    );
    // One history: the same decisions in the same order on both, none taken twice.
    assert_eq!(state[0]["decisions"], state[1]["decisions"]);
    assert_eq!(
        actions(&state[0]),
        ["started", "loaded", "advanced", "promoted"],
        "{}",
        state[0]
    );
    assert_eq!(
        registry
            .refs("pricing")
            .await
            .unwrap()
            .aliases
            .get("production"),
        Some(&2)
    );
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_shape_holds_a_canary_until_an_operator_promotes_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &["gbr_alt"]).await;
    let server = TestServer::start_registry(dir.path()).await;
    let (code, answer) = server
        .post(
            "/v1/models/pricing/deploy",
            json!({"version": 2, "traffic_percentage": 30, "replicas": 3, "instance_type": "gpu-small",
                   "guardrails": {"min_requests": 10}, "step_seconds": 0.2}),
        )
        .await;
    assert_eq!(code, 201, "{answer}");
    assert_eq!(answer["endpoint"], "/v2/models/pricing/versions/2");
    assert!(answer["not_applied"]["replicas"].is_string(), "{answer}");
    assert!(
        answer["not_applied"]["instance_type"].is_string(),
        "{answer}"
    );
    let id = answer["deployment_id"].as_str().unwrap().to_string();
    let mut seen = Seen::default();
    let state = drive(
        &server,
        &id,
        &mut seen,
        |_| false,
        Duration::from_secs(60),
        |s| s["status"] == "holding",
    )
    .await;
    assert_eq!(state["status"], "holding", "{state}");
    assert!(
        state["live_windows"]["canary"]["requests"]
            .as_u64()
            .unwrap()
            > 0
    );

    let (code, body) = server
        .post(&format!("/v1/deployments/{id}/pause"), json!({}))
        .await;
    assert_eq!(
        (code, body["status"].clone()),
        (200, json!("paused")),
        "{body}"
    );
    let (code, body) = server
        .post(
            &format!("/v1/deployments/{id}/promote"),
            json!({"by": "alice", "reason": "looks good"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "promoted");
    let last = body["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (last["by"].clone(), last["reason"].clone()),
        (json!("alice"), json!("looks good"))
    );
    assert_eq!(
        registry
            .refs("pricing")
            .await
            .unwrap()
            .aliases
            .get("production"),
        Some(&2)
    );
    let (code, body) = server
        .post(&format!("/v1/deployments/{id}/rollback"), json!({}))
        .await;
    assert_eq!(code, 409, "{body}");
    let (code, list) = server.get("/v1/deployments").await;
    assert_eq!(code, 200);
    assert_eq!(list["deployments"][0]["id"], id.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployments_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    registry(dir.path(), &["gbr_alt"]).await;
    let server = TestServer::start_registry(dir.path()).await;
    let cases = [
        (json!({"version": 9}), 404, "9"),
        (json!({"version": 1}), 400, "already in production"),
        (json!({"version": 2, "steps": [50, 20]}), 400, "steps[1]"),
        (json!({"version": 2, "steps": [5, 150]}), 400, "steps[1]"),
        (
            json!({"version": 2, "steps": [5], "traffic_percentage": 5}),
            400,
            "not both",
        ),
        (
            json!({"version": 2, "guardrails": {"max_error_rate": 2}}),
            400,
            "guardrails.max_error_rate",
        ),
        (
            json!({"version": 2, "step_seconds": -1}),
            400,
            "step_seconds",
        ),
        (
            json!({"version": 2, "canary": true}),
            400,
            "unknown field `canary`",
        ),
    ];
    for (request, expected_code, expected) in cases {
        let (code, answer) = server
            .post("/v1/models/pricing/deploy", request.clone())
            .await;
        assert_eq!(code, expected_code, "{request} -> {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{request}: {message}");
    }
    let (code, _) = server.get("/v1/deployments/pricing-7").await;
    assert_eq!(code, 404);
    let (code, _) = server
        .post("/v1/deployments/pricing-1/explode", json!({}))
        .await;
    assert_eq!(code, 404);
    server.stop().await;

    // A server on a Triton repository has no registry to keep deployments in.
    let repository = Repository::new().add("pricing", "gbr", None);
    let server = TestServer::start(repository).await;
    let (code, answer) = server
        .post("/v1/models/pricing/deploy", json!({"version": 2}))
        .await;
    assert_eq!(code, 501, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("--registry"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_keeps_the_operator_routes_off_the_client_address() {
    let dir = tempfile::tempdir().unwrap();
    registry(dir.path(), &["gbr_alt"]).await;
    let registry_url = dir.path().to_string_lossy().into_owned();
    let server = TestServer::start_with_config(move |c| {
        c.registry = Some(registry_url);
        c.registry_poll_seconds = 0.1;
        c.admin_port = Some(0);
    })
    .await;
    let admin = server.admin.clone().expect("an admin address");
    let deploy = json!({"version": 2, "traffic_percentage": 10});
    let (code, answer) = server
        .post("/v1/models/pricing/deploy", deploy.clone())
        .await;
    assert_eq!(code, 404, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("--admin-port"),
        "{answer}"
    );
    let (code, _) = server.get("/v1/models/pricing/traffic").await;
    assert_eq!(code, 404);

    let response = server
        .client
        .post(format!("{admin}/v1/models/pricing/deploy"))
        .json(&deploy)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let listed: Value = server
        .client
        .get(format!("{admin}/v1/deployments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["deployments"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    // Clients' routes stay where clients are.
    let response = server
        .client
        .post(format!("{admin}/v1/predict"))
        .json(&json!({"model": "pricing"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let (code, answer) = predict(&server, "u1", false).await;
    assert_eq!(code, 200, "{answer}");
    server.stop().await;
}
