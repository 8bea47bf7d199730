//! `marquee data generate` as the training jobs will use it: one seed gives byte-identical
//! files, the definitions it writes are valid, and its feature histories join onto its own
//! bookings point in time (a booking never sees itself or anything later), with the fraud labels
//! kept out of the tables models read.

use std::collections::HashMap;
use std::path::Path;

use arrow_array::ArrayRef;
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use marquee_tests::{read_parquet, run_marquee};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn generate(out: &Path, seed: u64) {
    let ran = run_marquee(
        &[
            "data",
            "generate",
            "--scale",
            "small",
            "--seed",
            &seed.to_string(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(ran.json()["manifest"]["seed"], seed);
}

fn files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in walk(dir) {
        found.push(
            entry
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
    }
    found.sort();
    found
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_seed_gives_the_same_files_and_another_seed_another_world() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    generate(&a, 7);
    generate(&b, 7);
    generate(&c, 8);
    let names = files(&a);
    for expected in [
        "bookings.parquet",
        "features.toml",
        "features/user_risk.parquet",
        "labels/fraud.parquet",
        "labels/search_queries.parquet",
        "manifest.json",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} in {names:?}"
        );
    }
    assert_eq!(names, files(&b));
    for name in &names {
        assert_eq!(
            std::fs::read(a.join(name)).unwrap(),
            std::fs::read(b.join(name)).unwrap(),
            "{name} differs between two runs with seed 7"
        );
    }
    assert_ne!(
        std::fs::read(a.join("bookings.parquet")).unwrap(),
        std::fs::read(c.join("bookings.parquet")).unwrap()
    );
}

#[test]
fn its_features_join_onto_its_bookings_as_of_each_booking() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    generate(&world, 11);
    let definitions = world.join("features.toml");
    let definitions = definitions.to_str().unwrap();
    let applied = run_marquee(&["features", "--definitions", definitions, "apply"], &[]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);

    let bookings = read_parquet(&world.join("bookings.parquet"));
    for label in ["is_fraud", "pattern"] {
        assert!(
            bookings.column_by_name(label).is_none(),
            "the bookings table carries the fraud label '{label}'"
        );
    }
    let output = dir.path().join("train.parquet");
    let ran = run_marquee(
        &[
            "features",
            "--definitions",
            definitions,
            "dataset",
            "--entities",
            world.join("bookings.parquet").to_str().unwrap(),
            "--timestamp-column",
            "booked_at",
            "--features",
            "user_activity:bookings_7d,user_risk:failed_payments_24h",
            "--output",
            output.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let set = read_parquet(&output);
    assert_eq!(set.num_rows(), bookings.num_rows());

    // The expected value, from the bookings alone: the user's bookings in the 7 days up to what
    // the feature pipeline had written by this booking's time (1 s behind), this one excluded;
    // the history has a row each time a booking enters that window and each time one leaves.
    let users = set.column_by_name("user_id").unwrap().as_string::<i32>();
    let times = millis(set.column_by_name("booked_at").unwrap());
    let mut by_user: HashMap<&str, Vec<i64>> = HashMap::new();
    for (i, &at) in times.iter().enumerate() {
        by_user.entry(users.value(i)).or_default().push(at);
    }
    by_user.values_mut().for_each(|t| t.sort_unstable());
    let counted = set
        .column_by_name("bookings_7d")
        .unwrap()
        .as_primitive::<Int64Type>();
    let mut with_history = 0;
    for (i, &at) in times.iter().enumerate() {
        let user = users.value(i);
        let seen = at - 1_000;
        let expected = by_user[user]
            .iter()
            .filter(|&&t| t <= seen && t > seen - 7 * DAY_MS)
            .count() as i64;
        with_history += usize::from(expected > 0);
        assert_eq!(
            counted.value(i),
            expected,
            "booking {i} of {user} at {at}: bookings_7d"
        );
    }
    assert!(
        with_history > set.num_rows() / 5,
        "only {with_history} bookings had history"
    );
    let failed = set
        .column_by_name("failed_payments_24h")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert!(
        failed.values().iter().any(|&f| f > 0),
        "no declined payment seen"
    );
}

fn millis(array: &ArrayRef) -> Vec<i64> {
    marquee_feature_store::offline::timestamps_ms(array, "booked_at")
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect()
}
