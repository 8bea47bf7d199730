//! `marquee train recommendation` end to end at small scale: generate a world, train (leave-last-
//! out split, point-in-time histories, SVD and LambdaRank, evaluation through the served
//! pipeline, gates), materialise the users' histories (a list and a vector feature) into a real
//! Redis, serve the version from the registry, and check what a client relies on: answers read
//! the history from the store exactly as a request that carries it, leave out what the user
//! booked, keep the genre rule, flag new users and show them popular movies, score exactly the
//! candidates a caller gives, and refuse bad input by name.

use std::collections::{HashMap, HashSet};

use arrow_array::cast::AsArray;
use marquee_tests::{RedisServer, TrainingRun, run_marquee};
use serde_json::{Value, json};

/// Users of the world with at least `least` movies in their latest history row.
fn users_with_history(run: &TrainingRun, least: usize) -> Vec<String> {
    let file = std::fs::File::open(run.world.join("features/user_history.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut longest: HashMap<String, usize> = HashMap::new();
    for batch in reader {
        let batch = batch.unwrap();
        let users = batch.column_by_name("user_id").unwrap().as_string::<i32>();
        let booked = batch
            .column_by_name("booked_movies")
            .unwrap()
            .as_list::<i32>();
        for row in 0..batch.num_rows() {
            let entry = longest.entry(users.value(row).to_string()).or_default();
            *entry = (*entry).max(booked.value(row).len());
        }
    }
    let mut chosen: Vec<String> = longest
        .into_iter()
        .filter(|(_, n)| *n >= least)
        .map(|(user, _)| user)
        .collect();
    chosen.sort();
    chosen
}

fn ids(movies: &Value) -> Vec<String> {
    movies
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["movie_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_trained_recommender_beats_popularity_and_serves_from_the_feature_store() {
    let run = TrainingRun::small_world(42);
    let report = run.train("recommendation", &["--seed", "42"]);
    assert_eq!(report["model"], "recommendation");
    let metrics = &report["metrics"];
    let number = |name: &str| metrics[name].as_f64().unwrap_or_else(|| panic!("{name}"));
    assert!(
        number("hr_at_10") > number("popularity_hr_at_10"),
        "{metrics}"
    );
    assert!(
        number("ndcg_at_10") > number("popularity_ndcg_at_10"),
        "{metrics}"
    );
    assert!(
        number("recall_at_20") > number("popularity_recall_at_20"),
        "{metrics}"
    );
    assert!(number("ranker_parity_max_abs_error") < 1e-4, "{metrics}");
    assert!(number("most_of_one_genre_in_top_10") <= 4.0, "{metrics}");
    assert!(number("test_users") >= 100.0, "{metrics}");

    let manifest = run.show("recommendation", "1");
    assert_eq!(manifest["metrics"]["hr_at_10"], metrics["hr_at_10"]);
    assert_eq!(manifest["lineage"]["parameters"]["seed"], 42);
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"movies.json") && files.contains(&"model.onnx"),
        "{files:?}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = runtime.block_on(RedisServer::start());
    let definitions = run.world.join("features.toml");
    let online = redis.url();
    let features = |args: &[&str]| {
        let mut all = vec![
            "features",
            "--definitions",
            definitions.to_str().unwrap(),
            "--online",
            &online,
        ];
        all.extend_from_slice(args);
        let ran = run_marquee(&all, &[]);
        assert_eq!(ran.code, 0, "{}", ran.stderr);
        ran.json()
    };
    let materialised = features(&["materialize", "--view", "user_history", "--json"]);
    assert!(
        materialised[0]["entities_written"].as_u64().unwrap() > 100,
        "{materialised}"
    );

    let registry = run.registry.to_string_lossy().into_owned();
    let server = runtime.block_on(marquee_tests::TestServer::start_with_config(|config| {
        config.registry = Some(registry);
        config.pins = vec!["recommendation:1".into()];
        config.features = Some(definitions.clone());
        config.online_store = online.clone();
    }));
    let post = |body: Value| runtime.block_on(server.post("/v1/predict", body));
    let ask = |user: &str, features: Value| {
        post(
            json!({"model": "recommendation", "entities": {"user_id": user}, "features": features}),
        )
    };

    let users = users_with_history(&run, 3);
    assert!(users.len() >= 30, "{} users with a history", users.len());
    for user in users.iter().take(30) {
        let stored = features(&["get", "user_history", &format!("user_id={user}"), "--json"]);
        let booked: HashSet<String> = stored["values"]["booked_movies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect();
        assert!(!booked.is_empty(), "{stored}");

        let (status, answer) = ask(user, json!({}));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outputs"]["cold_start"], 0.0, "{answer}");
        assert_eq!(answer["prediction"], answer["outputs"]["movies"]);
        let movies = answer["outputs"]["movies"].as_array().unwrap();
        assert_eq!(movies.len(), 10, "{answer}");
        let shown = ids(&answer["outputs"]["movies"]);
        assert_eq!(shown.iter().collect::<HashSet<_>>().len(), 10, "{shown:?}");
        assert!(
            shown.iter().all(|m| !booked.contains(m)),
            "{user} booked one of {shown:?}"
        );
        let mut per_genre: HashMap<&str, usize> = HashMap::new();
        for movie in movies {
            *per_genre
                .entry(movie["genre"].as_str().unwrap())
                .or_default() += 1;
            assert!(movie["score"].is_number() && movie["similarity"].is_number());
            assert!(
                movie.get("vector").is_none(),
                "the index's vectors stay inside"
            );
        }
        assert!(per_genre.values().all(|&n| n <= 4), "{per_genre:?}");

        // Read from the store or carried by the request: the same answer.
        let carried = json!({
            "booked_movies": stored["values"]["booked_movies"],
            "genre_shares": stored["values"]["genre_shares"],
        });
        let (status, again) = ask(user, carried);
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["outputs"], answer["outputs"]);
    }

    // A user without history: the most popular movies, flagged, under the same genre rule.
    let (status, cold) = ask("u-new", json!({"count": 12}));
    assert_eq!(status, 200, "{cold}");
    assert_eq!(cold["outputs"]["cold_start"], 1.0, "{cold}");
    let movies = cold["outputs"]["movies"].as_array().unwrap();
    assert_eq!(movies.len(), 12);
    let popularity: Vec<f64> = movies
        .iter()
        .map(|m| m["popularity"].as_f64().unwrap())
        .collect();
    assert!(
        popularity.iter().all(|&p| p <= popularity[0]),
        "{popularity:?}"
    );
    assert!(
        movies
            .iter()
            .all(|m| m.get("score").is_none() && m["similarity"] == 0.0)
    );

    // Given candidates, exactly those are ranked: less what the user booked and ids the index
    // does not hold.
    let user = &users[0];
    let (_, answer) = ask(user, json!({"count": 100}));
    let mut candidates = ids(&answer["outputs"]["movies"])[..12].to_vec();
    let stored = features(&["get", "user_history", &format!("user_id={user}"), "--json"]);
    let one_booked = stored["values"]["booked_movies"][0]
        .as_str()
        .unwrap()
        .to_string();
    candidates.push(one_booked.clone());
    candidates.push("m-not-in-the-catalogue".into());
    let (status, ranked) = ask(user, json!({"candidates": candidates, "count": 100}));
    assert_eq!(status, 200, "{ranked}");
    let got: HashSet<String> = ids(&ranked["outputs"]["movies"]).into_iter().collect();
    let want: HashSet<String> = candidates[..12].iter().cloned().collect();
    assert_eq!(got, want);

    // Bad input is refused by name.
    let refusals = [
        (json!({"count": 0}), "count"),
        (json!({"count": "ten"}), "count"),
        (json!({"candidates": "m1"}), "candidates"),
        (json!({"booked_movies": [1, 2]}), "booked_movies"),
        (json!({"genre_shares": ["a"]}), "genre_shares"),
    ];
    for (features, named) in refusals {
        let (status, refused) = ask(user, features.clone());
        assert_eq!(status, 400, "{features}: {refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap_or_default()
                .contains(named),
            "{refused}"
        );
    }
    // Lists are bounded: all given candidates are ranked (at most what retrieval gives), and a
    // history longer than any the store keeps would only cost everyone time.
    for (feature, items, limit) in [
        ("candidates", 101, "at most 100"),
        ("booked_movies", 1001, "at most 1000"),
    ] {
        let long: Vec<String> = (0..items).map(|i| format!("m{i}")).collect();
        let (status, refused) = ask(user, json!({feature: long}));
        assert_eq!(status, 400, "{refused}");
        let error = refused["error"].as_str().unwrap();
        assert!(
            error.contains(limit) && error.contains(feature),
            "{refused}"
        );
    }
    let (status, refused) = ask(user, json!({"genre_shares": [1e300]}));
    assert_eq!(status, 400, "{refused}");
    let (status, refused) = post(json!({"model": "recommendation", "features": {}}));
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("user_id"),
        "{refused}"
    );
    runtime.block_on(server.stop());
}
