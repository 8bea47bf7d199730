//! `marquee train recommendation`: which movies to show a user, in two stages. Retrieval finds
//! the movies nearest the user's taste among movie vectors learnt from who booked what (a
//! collaborative factorisation; a user's vector is folded in from the movies they booked, which
//! the `user_history` view holds); ranking scores those candidates as one batch with a LightGBM
//! LambdaRank model over each candidate's similarity, popularity and the user's share of
//! bookings in its genre; serving leaves out what the user already booked and shows at most
//! [`MAX_PER_GENRE`] movies of one genre in the top [`RESULTS`]. A user with no history gets the
//! most popular movies, flagged `cold_start`.
//!
//! The split is leave-last-out: each user's last new movie is their test; the ranker learns from
//! each user's second-to-last; the factorisation from everything else (it must not have fitted
//! a pair the ranker learns from, or the ranker would trust similarity more than it deserves). Histories come
//! from the feature store's point-in-time join at each booking's moment, as serving reads them.
//! The evaluation runs the served pipeline: HR@10 and NDCG@10 with each test movie among 99
//! sampled movies the user never booked (the `candidates` feature scores exactly those), and
//! recall@20 over the whole catalogue; the popularity ranking is the baseline on both. A
//! train/serve parity check compares the served ranker scores with the trainer's own for the
//! same users and candidates. Pushed only if it beats popularity on all three and keeps parity.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int64Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Float32Array, Int64Array, RecordBatch, StringArray};
use arrow_array::{TimestampMillisecondArray, types::Float32Type};
use bytes::Bytes;
use marquee_registry::PushFile;
use marquee_registry::manifest::GateOp;
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::{Value, json};

use super::{Candidate, ServedVersion, TrainOptions, Trained, column};
use crate::TrainingError;
use crate::data::catalog::GENRES;
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};

const TRAINER: &str = include_str!("../../trainers/recommendation.py");

/// The movie vectors' length.
pub const DIMENSION: usize = 32;
/// Candidates retrieval hands the ranker: the nearest by taste, and the most popular besides.
pub const NEAREST: usize = 50;
pub const POPULAR: usize = 50;
pub const RETRIEVED: usize = NEAREST + POPULAR;
/// Movies an answer shows by default.
pub const RESULTS: usize = 10;
/// The diversity rule: at most this many of one genre while other genres remain.
pub const MAX_PER_GENRE: usize = 4;
/// Sampled movies each test movie is ranked among.
const NEGATIVES: usize = 99;
/// The cut-off of the full-catalogue recall.
const RECALL_AT: usize = 20;
/// Test users whose served ranker scores are compared with the trainer's.
const CHECKED: usize = 64;
/// How far a served ranker score may be from the trainer's (f32 arithmetic in two orders).
const PARITY_TOLERANCE: f64 = 1e-4;

/// The feature view the pipeline reads, and its two features.
const HISTORY_VIEW: &str = "user_history";
const STORED: [&str; 2] = ["user_history:booked_movies", "user_history:genre_shares"];

pub async fn train(options: &TrainOptions) -> Result<Trained, TrainingError> {
    let catalog = Catalog::read(options).await?;
    let split = Split::read(options, &catalog).await?;
    if split.tests.len() < 20 || split.fits.is_empty() {
        return Err(TrainingError::Data(format!(
            "{} users booked two movies or more and {} three or more: too few to test on (20) and train a ranker on (1)",
            split.tests.len(),
            split.fits.len()
        )));
    }
    let popularity = catalog.popularity(&split.train);
    let test_histories = histories(options, &split.tests, &catalog).await?;
    let fit_histories = histories(options, &split.fits, &catalog).await?;

    // Each test movie among 99 the user never booked, drawn once from the seed.
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(options.seed);
    let sampled: Vec<Vec<usize>> = split
        .tests
        .iter()
        .map(|test| {
            let booked = &split.booked[&test.user];
            let open: Vec<usize> = (0..catalog.len()).filter(|m| !booked.contains(m)).collect();
            let mut candidates = vec![test.positive];
            candidates.extend(open.sample(&mut rng, NEGATIVES).copied());
            // In no telling order: a tie must not favour the test movie, for the model or the
            // baseline (unbooked movies of a genre share a vector and tie).
            candidates.shuffle(&mut rng);
            candidates
        })
        .collect();

    let work = &options.work;
    let paths = [
        "recommendation-interactions.parquet",
        "recommendation-movies.parquet",
        "recommendation-queries.parquet",
        "recommendation-check.parquet",
    ]
    .map(|name| work.join(name));
    write_batch(&paths[0], interactions_batch(&split.train)?)?;
    write_batch(&paths[1], movies_batch(&catalog, &popularity)?)?;
    let positives: Vec<usize> = split.fits.iter().map(|q| q.positive).collect();
    write_batch(
        &paths[2],
        queries_batch(&fit_histories, Some(&positives), None)?,
    )?;
    let checked = split.tests.len().min(CHECKED);
    write_batch(
        &paths[3],
        queries_batch(&test_histories[..checked], None, Some(&sampled[..checked]))?,
    )?;
    let out = work.join("recommendation");
    std::fs::create_dir_all(&out)
        .map_err(|e| TrainingError::Output(format!("{}: {e}", out.display())))?;
    let seed = options.seed.to_string();
    let dimension = DIMENSION.to_string();
    let report = super::run_trainer(
        options,
        "recommendation.py",
        TRAINER,
        &[
            "--interactions",
            super::path_text(&paths[0])?,
            "--movies",
            super::path_text(&paths[1])?,
            "--queries",
            super::path_text(&paths[2])?,
            "--check",
            super::path_text(&paths[3])?,
            "--dimension",
            &dimension,
            "--seed",
            &seed,
            "--out",
            super::path_text(&out)?,
        ],
    )?;
    let vectors = read_vectors(
        &super::read_trainer_output(&out.join("vectors.f32"))?,
        &catalog,
    )?;
    let ranker = super::read_trainer_output(&out.join("ranker.onnx"))?;
    let expected: Vec<Vec<f64>> =
        serde_json::from_slice(&super::read_trainer_output(&out.join("check.json"))?)
            .map_err(|e| TrainingError::Trainer(format!("check.json: {e}")))?;
    let signature = marquee_registry::onnx::signature(&ranker).map_err(TrainingError::Trainer)?;
    let index = index_file(&catalog, &popularity, &vectors)?;
    let files = vec![
        PushFile {
            path: "model.onnx".into(),
            contents: ranker,
        },
        PushFile {
            path: "movies.json".into(),
            contents: index,
        },
    ];
    let manifest = |metrics: &BTreeMap<String, f64>, gates: Value, baseline: Value| {
        json!({
            "schema_version": marquee_registry::manifest::SCHEMA_VERSION,
            "name": "recommendation",
            "version": 0,
            "framework": "onnx",
            "created_at": marquee_registry::now(),
            "created_by": options.by,
            "description": "Movies for a user: collaborative retrieval through an HNSW index, LightGBM LambdaRank ranking, booked movies left out, at most 4 of a genre in the top 10, popularity for new users (marquee train recommendation)",
            "files": [],
            "signature": signature,
            "config": {
                "max_batch_size": 4096,
                "dynamic_batching": {"max_queue_delay_microseconds": 200},
                "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
                "parameters": {"intra_op_thread_count": {"string_value": "1"}, "wait_only_for_company": {"string_value": "1"}}
            },
            "metrics": metrics,
            "gates": gates,
            "tags": {"task": "recommendation", "trainer": "trainers/recommendation.py"},
            "lineage": {
                "dataset_uri": options.data,
                "code_version": concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
                "parameters": {
                    "seed": options.seed,
                    "split": "leave-last-out: each user's last new movie tests, the one before it trains the ranker",
                    "dimension": DIMENSION,
                    "retrieved": {"nearest": NEAREST, "popular": POPULAR},
                    "max_per_genre": MAX_PER_GENRE,
                    "trainer": report,
                }
            },
            "pipeline": pipeline(),
            "drift_baseline": baseline,
        })
    };

    let candidate = Candidate::start(
        options,
        vec![ServedVersion {
            model: "recommendation".into(),
            files: files.clone(),
            manifest: manifest(&BTreeMap::new(), json!([]), Value::Null),
        }],
    )
    .await?;
    let served = evaluate_served(&candidate, &catalog, &split, &test_histories, &sampled).await;
    candidate.stop().await;
    let served = served?;

    let parity = parity_error(
        &served.checked,
        &expected[..],
        &sampled[..checked],
        &catalog,
    )?;
    let baseline_ranks = popularity_ranks(&split, &sampled, &test_histories, &catalog, &popularity);
    let (hr, ndcg) = sampled_measures(&served.sampled_ranks);
    let (popular_hr, popular_ndcg) = sampled_measures(&baseline_ranks.sampled);
    let recall = share(&served.full_hits);
    let popular_recall = share(&baseline_ranks.full);
    let mut metrics = BTreeMap::from([
        (format!("hr_at_{RESULTS}"), hr),
        (format!("ndcg_at_{RESULTS}"), ndcg),
        (format!("recall_at_{RECALL_AT}"), recall),
        (format!("popularity_hr_at_{RESULTS}"), popular_hr),
        (format!("popularity_ndcg_at_{RESULTS}"), popular_ndcg),
        (format!("popularity_recall_at_{RECALL_AT}"), popular_recall),
        ("ranker_parity_max_abs_error".to_string(), parity),
        ("test_users".to_string(), split.tests.len() as f64),
        ("ranker_queries".to_string(), split.fits.len() as f64),
        ("train_interactions".to_string(), split.train.len() as f64),
        ("catalog_movies".to_string(), catalog.len() as f64),
        (
            "most_of_one_genre_in_top_10".to_string(),
            served.most_of_one_genre as f64,
        ),
    ]);
    if let Some(error) = report["export_max_abs_error"].as_f64() {
        metrics.insert("export_max_abs_error".into(), error);
    }
    let gates = vec![
        super::gate(&format!("hr_at_{RESULTS}"), GateOp::Gt, popular_hr),
        super::gate(&format!("ndcg_at_{RESULTS}"), GateOp::Gt, popular_ndcg),
        super::gate(
            &format!("recall_at_{RECALL_AT}"),
            GateOp::Gt,
            popular_recall,
        ),
        super::gate("ranker_parity_max_abs_error", GateOp::Lt, PARITY_TOLERANCE),
    ];
    let judged = super::judge("recommendation", &gates, &metrics)?;

    let history_lengths: Vec<f64> = test_histories
        .iter()
        .map(|h| h.booked.len() as f64)
        .collect();
    let baseline = DriftBaseline {
        rows: served.top_scores.len() as u64,
        inputs: vec![ColumnBaseline::numeric("booked_movies", &history_lengths)],
        prediction: ColumnBaseline::numeric("top_score", &served.top_scores),
    };
    let pushed = super::push(
        options,
        "recommendation",
        files,
        manifest(
            &metrics,
            json!(gates),
            serde_json::to_value(&baseline).map_err(|e| TrainingError::Output(e.to_string()))?,
        ),
    )
    .await?;
    Ok(Trained {
        model: "recommendation".into(),
        version: pushed.version,
        metrics,
        gates: judged,
    })
}

/// The `/v1/predict` pipeline: the user's booked movies and genre shares from the store (by
/// `user_id`), retrieval through the index (or exactly the `candidates` a caller gives), the
/// ranker over every candidate at once, and the diverse top `count`.
pub fn pipeline() -> Value {
    json!({
        "features": [
            {"name": "booked_movies", "view": HISTORY_VIEW},
            {"name": "genre_shares", "view": HISTORY_VIEW},
            {"name": "candidates", "dtype": "list<string>", "default": []},
            {"name": "count", "dtype": "int64", "default": RESULTS, "range": [1, RETRIEVED]}
        ],
        "steps": [
            {"op": "nearest", "index": "movies.json", "key": "movie_id", "popularity": "popularity",
             "history": "booked_movies", "among": "candidates", "k": NEAREST, "popular": POPULAR,
             "into": "retrieved"},
            {"op": "item_values", "items": "retrieved", "field": "similarity", "into": "similarity"},
            {"op": "item_values", "items": "retrieved", "field": "popularity", "into": "movie_popularity"},
            {"op": "item_values", "items": "retrieved", "field": "genre_index", "into": "genre_index"},
            {"op": "take", "of": "genre_shares", "at": "genre_index", "into": "affinity"},
            {"op": "stack", "columns": ["similarity", "movie_popularity", "affinity"], "into": "rows"},
            {"op": "model", "inputs": {"X": "rows"}, "outputs": {"score": "scores"}},
            {"op": "rank", "items": "retrieved", "scores": "scores", "k": "count",
             "at_most": {"field": "genre", "count": MAX_PER_GENRE, "within": RESULTS},
             "keep_order_if": "retrieved.cold_start", "into": "movies"}
        ],
        "outputs": {"movies": "movies", "cold_start": "retrieved.cold_start"},
        "prediction": "movies"
    })
}

/// The world's movies.
struct Catalog {
    ids: Vec<String>,
    titles: Vec<String>,
    genres: Vec<Vec<String>>,
    /// The primary genre's index into [`GENRES`].
    primary: Vec<usize>,
    positions: HashMap<String, usize>,
}

impl Catalog {
    async fn read(options: &TrainOptions) -> Result<Self, TrainingError> {
        let table = "movies.parquet";
        let movies = super::read_table(&options.data, table).await?;
        let ids = super::text_column(&movies, "movie_id", table)?;
        let titles = super::text_column(&movies, "title", table)?;
        let primary_names = super::text_column(&movies, "primary_genre", table)?;
        let primary = primary_names
            .iter()
            .map(|name| {
                GENRES
                    .iter()
                    .position(|g| g == name)
                    .ok_or_else(|| TrainingError::Data(format!("{table}: unknown genre '{name}'")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lists = column(&movies, "genres", table)?
            .as_list_opt::<i32>()
            .ok_or_else(|| TrainingError::Data(format!("{table}: genres is not a list")))?;
        let genres = (0..lists.len())
            .map(|i| {
                let values = lists.value(i);
                values
                    .as_string_opt::<i32>()
                    .map(|names| names.iter().flatten().map(str::to_string).collect())
                    .ok_or_else(|| TrainingError::Data(format!("{table}: genres is not text")))
            })
            .collect::<Result<Vec<Vec<String>>, _>>()?;
        let positions = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Ok(Self {
            ids,
            titles,
            genres,
            primary,
            positions,
        })
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Each movie's training bookings, as log(1 + count) over the largest: 0 to 1.
    fn popularity(&self, train: &[(usize, usize)]) -> Vec<f32> {
        let mut counts = vec![0u32; self.len()];
        for &(_, movie) in train {
            counts[movie] += 1;
        }
        let top = f64::from(counts.iter().copied().max().unwrap_or(0))
            .ln_1p()
            .max(1e-9);
        counts
            .iter()
            .map(|&c| (f64::from(c).ln_1p() / top) as f32)
            .collect()
    }
}

/// A user at a moment, and the movie they booked then.
struct Query {
    user: String,
    at_ms: i64,
    positive: usize,
}

/// Who booked what, split leave-last-out.
struct Split {
    /// (user, movie) pairs the factorisation learns from: all but the tests and the ranker's
    /// positives.
    train: Vec<(usize, usize)>,
    tests: Vec<Query>,
    /// The ranker's queries: each user's second-to-last new movie.
    fits: Vec<Query>,
    /// Every movie each user ever booked: what a test never samples as a negative.
    booked: HashMap<String, HashSet<usize>>,
}

impl Split {
    async fn read(options: &TrainOptions, catalog: &Catalog) -> Result<Self, TrainingError> {
        let table = "bookings.parquet";
        let bookings = super::read_table(&options.data, table).await?;
        let users = super::text_column(&bookings, "user_id", table)?;
        let movies = super::text_column(&bookings, "movie_id", table)?;
        let times = super::times_ms(column(&bookings, "booked_at", table)?, "booked_at")?;
        // Each user's movies in the order they first booked them.
        let mut firsts: BTreeMap<&str, Vec<(i64, usize)>> = BTreeMap::new();
        for ((user, movie), &at) in users.iter().zip(&movies).zip(&times) {
            let movie = *catalog
                .positions
                .get(movie)
                .ok_or_else(|| TrainingError::Data(format!("{table}: unknown movie '{movie}'")))?;
            firsts.entry(user).or_default().push((at, movie));
        }
        let mut split = Split {
            train: Vec::new(),
            tests: Vec::new(),
            fits: Vec::new(),
            booked: HashMap::with_capacity(firsts.len()),
        };
        for (u, (user, mut seen)) in firsts.into_iter().enumerate() {
            seen.sort_unstable();
            let mut distinct: Vec<(i64, usize)> = Vec::with_capacity(seen.len());
            let mut known = HashSet::new();
            for (at, movie) in seen {
                if known.insert(movie) {
                    distinct.push((at, movie));
                }
            }
            // The factorisation never sees a movie the ranker learns from or a test asks for:
            // a similarity it had fitted would look better than any it is later asked for.
            let n = distinct.len();
            let kept = match n {
                0 | 1 => n,
                2 => 1,
                _ => n - 2,
            };
            split
                .train
                .extend(distinct[..kept].iter().map(|&(_, movie)| (u, movie)));
            let query = |(at_ms, positive): (i64, usize)| Query {
                user: user.to_string(),
                at_ms,
                positive,
            };
            if n >= 2 {
                split.tests.push(query(distinct[n - 1]));
            }
            if n >= 3 {
                split.fits.push(query(distinct[n - 2]));
            }
            split.booked.insert(user.to_string(), known);
        }
        Ok(split)
    }
}

/// A user's history as the feature store held it at a query's moment.
struct History {
    /// Positions of the movies booked before, oldest first (ids the catalogue lacks left out).
    booked: Vec<usize>,
    booked_ids: Vec<String>,
    genre_shares: Vec<f32>,
}

/// The point-in-time join of the user's history at each query's moment.
async fn histories(
    options: &TrainOptions,
    queries: &[Query],
    catalog: &Catalog,
) -> Result<Vec<History>, TrainingError> {
    let entities = RecordBatch::try_from_iter([
        (
            "user_id",
            Arc::new(StringArray::from_iter_values(
                queries.iter().map(|q| q.user.as_str()),
            )) as ArrayRef,
        ),
        (
            "asked_at",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                queries.iter().map(|q| q.at_ms),
            )),
        ),
    ])
    .map_err(|e| TrainingError::Data(e.to_string()))?;
    let set = super::point_in_time(options, &entities, "asked_at", &STORED).await?;
    let name = "the training set";
    let booked = column(&set, "booked_movies", name)?
        .as_list_opt::<i32>()
        .ok_or_else(|| TrainingError::Data("booked_movies is not a list".into()))?;
    let shares = column(&set, "genre_shares", name)?
        .as_list_opt::<i32>()
        .ok_or_else(|| TrainingError::Data("genre_shares is not a list".into()))?;
    (0..set.num_rows())
        .map(|row| {
            let ids: Vec<String> = if booked.is_null(row) {
                Vec::new()
            } else {
                booked
                    .value(row)
                    .as_string_opt::<i32>()
                    .ok_or_else(|| TrainingError::Data("booked_movies is not text".into()))?
                    .iter()
                    .flatten()
                    .map(str::to_string)
                    .collect()
            };
            let genre_shares = if shares.is_null(row) {
                Vec::new()
            } else {
                shares
                    .value(row)
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(|| TrainingError::Data("genre_shares is not float32".into()))?
                    .iter()
                    .map(|v| v.unwrap_or(0.0))
                    .collect()
            };
            Ok(History {
                booked: ids
                    .iter()
                    .filter_map(|id| catalog.positions.get(id).copied())
                    .collect(),
                booked_ids: ids,
                genre_shares,
            })
        })
        .collect()
}

fn write_batch(path: &std::path::Path, batch: RecordBatch) -> Result<(), TrainingError> {
    super::write_file(path, &crate::data::write::parquet(&batch)?)
}

fn interactions_batch(train: &[(usize, usize)]) -> Result<RecordBatch, TrainingError> {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(Int64Array::from_iter_values(
                train.iter().map(|p| p.0 as i64),
            )) as ArrayRef,
        ),
        (
            "movie",
            Arc::new(Int64Array::from_iter_values(
                train.iter().map(|p| p.1 as i64),
            )),
        ),
    ])
    .map_err(|e| TrainingError::Output(e.to_string()))
}

fn movies_batch(catalog: &Catalog, popularity: &[f32]) -> Result<RecordBatch, TrainingError> {
    RecordBatch::try_from_iter([
        (
            "popularity",
            Arc::new(Float32Array::from(popularity.to_vec())) as ArrayRef,
        ),
        (
            "genre",
            Arc::new(Int64Array::from_iter_values(
                catalog.primary.iter().map(|&g| g as i64),
            )),
        ),
    ])
    .map_err(|e| TrainingError::Output(e.to_string()))
}

/// The trainer's queries: history (movie positions), genre shares, and the positive (ranker
/// queries) or the candidates to score (parity queries).
fn queries_batch(
    histories: &[History],
    positives: Option<&[usize]>,
    candidates: Option<&[Vec<usize>]>,
) -> Result<RecordBatch, TrainingError> {
    let ints = |lists: &mut dyn Iterator<Item = &[usize]>| -> ArrayRef {
        let mut builder = ListBuilder::new(Int64Builder::new());
        for list in lists {
            builder
                .values()
                .append_slice(&list.iter().map(|&v| v as i64).collect::<Vec<_>>());
            builder.append(true);
        }
        Arc::new(builder.finish())
    };
    let mut shares = ListBuilder::new(Float32Builder::new());
    for history in histories {
        shares.values().append_slice(&history.genre_shares);
        shares.append(true);
    }
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        (
            "history",
            ints(&mut histories.iter().map(|h| h.booked.as_slice())),
        ),
        ("genre_shares", Arc::new(shares.finish())),
    ];
    if let Some(positives) = positives {
        columns.push((
            "positive",
            Arc::new(Int64Array::from_iter_values(
                positives.iter().map(|&p| p as i64),
            )),
        ));
    }
    if let Some(candidates) = candidates {
        columns.push((
            "candidates",
            ints(&mut candidates.iter().map(Vec::as_slice)),
        ));
    }
    RecordBatch::try_from_iter(columns).map_err(|e| TrainingError::Output(e.to_string()))
}

/// The trainer's movie vectors, one row per movie.
fn read_vectors(bytes: &Bytes, catalog: &Catalog) -> Result<Vec<Vec<f32>>, TrainingError> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if catalog.len() == 0 || values.is_empty() || !values.len().is_multiple_of(catalog.len()) {
        return Err(TrainingError::Trainer(format!(
            "vectors.f32 holds {} numbers for {} movies",
            values.len(),
            catalog.len()
        )));
    }
    let dimension = values.len() / catalog.len();
    Ok(values.chunks(dimension).map(<[f32]>::to_vec).collect())
}

/// The version's `movies.json`: every movie with what answers show of it and its vector.
fn index_file(
    catalog: &Catalog,
    popularity: &[f32],
    vectors: &[Vec<f32>],
) -> Result<Bytes, TrainingError> {
    let items: Vec<Value> = (0..catalog.len())
        .map(|m| {
            json!({
                "movie_id": catalog.ids[m],
                "title": catalog.titles[m],
                "genre": GENRES[catalog.primary[m]],
                "genres": catalog.genres[m],
                "genre_index": catalog.primary[m],
                "popularity": popularity[m],
                "vector": vectors[m],
            })
        })
        .collect();
    serde_json::to_vec(&items)
        .map(Bytes::from)
        .map_err(|e| TrainingError::Output(e.to_string()))
}

/// What the served pipeline answered for the test users.
struct Served {
    /// The test movie's 1-based place in the top [`RESULTS`] of its sampled candidates.
    sampled_ranks: Vec<Option<usize>>,
    /// Whether the test movie is in the top [`RECALL_AT`] of the whole catalogue.
    full_hits: Vec<bool>,
    /// The served ranker score of every candidate of the first [`CHECKED`] users, by movie id.
    checked: Vec<HashMap<String, f64>>,
    /// Each full-catalogue answer's best score.
    top_scores: Vec<f64>,
    most_of_one_genre: usize,
}

async fn evaluate_served(
    candidate: &Candidate,
    catalog: &Catalog,
    split: &Split,
    histories: &[History],
    sampled: &[Vec<usize>],
) -> Result<Served, TrainingError> {
    let instance = |t: usize, candidates: &[usize], count: usize| {
        json!({
            "entities": {"user_id": split.tests[t].user},
            "features": {
                "booked_movies": histories[t].booked_ids,
                "genre_shares": histories[t].genre_shares,
                "candidates": candidates.iter().map(|&m| catalog.ids[m].as_str()).collect::<Vec<_>>(),
                "count": count,
            }
        })
    };
    let tests = split.tests.len();
    let movies_of = |answer: &Value| -> Result<Vec<Value>, TrainingError> {
        answer["outputs"]["movies"]
            .as_array()
            .cloned()
            .ok_or_else(|| TrainingError::Evaluation(format!("an answer has no movies: {answer}")))
    };
    let id_of = |movie: &Value| movie["movie_id"].as_str().unwrap_or_default().to_string();

    let asked: Vec<Value> = (0..tests)
        .map(|t| instance(t, &sampled[t], RESULTS))
        .collect();
    let answers = candidate.predict("recommendation", &asked).await?;
    let mut sampled_ranks = Vec::with_capacity(tests);
    let mut most_of_one_genre = 0;
    for (t, answer) in answers.iter().enumerate() {
        let movies = movies_of(answer)?;
        let positive = &catalog.ids[split.tests[t].positive];
        sampled_ranks.push(
            movies
                .iter()
                .position(|m| id_of(m) == *positive)
                .map(|r| r + 1),
        );
        let mut per_genre: HashMap<String, usize> = HashMap::new();
        for movie in &movies {
            *per_genre
                .entry(movie["genre"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        most_of_one_genre = most_of_one_genre.max(per_genre.values().copied().max().unwrap_or(0));
    }

    let asked: Vec<Value> = (0..tests).map(|t| instance(t, &[], RECALL_AT)).collect();
    let answers = candidate.predict("recommendation", &asked).await?;
    let mut full_hits = Vec::with_capacity(tests);
    let mut top_scores = Vec::with_capacity(tests);
    for (t, answer) in answers.iter().enumerate() {
        let movies = movies_of(answer)?;
        let positive = &catalog.ids[split.tests[t].positive];
        full_hits.push(movies.iter().any(|m| id_of(m) == *positive));
        if let Some(score) = movies.first().and_then(|m| m["score"].as_f64()) {
            top_scores.push(score);
        }
    }

    let checked = tests.min(CHECKED);
    let asked: Vec<Value> = (0..checked)
        .map(|t| instance(t, &sampled[t], RETRIEVED))
        .collect();
    let answers = candidate.predict("recommendation", &asked).await?;
    let checked = answers
        .iter()
        .map(|answer| {
            Ok(movies_of(answer)?
                .iter()
                .map(|m| (id_of(m), m["score"].as_f64().unwrap_or(f64::NAN)))
                .collect())
        })
        .collect::<Result<Vec<HashMap<String, f64>>, TrainingError>>()?;
    Ok(Served {
        sampled_ranks,
        full_hits,
        checked,
        top_scores,
        most_of_one_genre,
    })
}

/// The largest gap between a served ranker score and the trainer's for the same user and
/// candidate; a candidate the server did not score counts as an infinite gap.
fn parity_error(
    served: &[HashMap<String, f64>],
    expected: &[Vec<f64>],
    sampled: &[Vec<usize>],
    catalog: &Catalog,
) -> Result<f64, TrainingError> {
    if expected.len() != served.len() {
        return Err(TrainingError::Trainer(format!(
            "check.json scores {} users; {} were checked",
            expected.len(),
            served.len()
        )));
    }
    let mut worst = 0f64;
    for ((scores, wanted), candidates) in served.iter().zip(expected).zip(sampled) {
        for (&movie, &want) in candidates.iter().zip(wanted) {
            let gap = scores
                .get(&catalog.ids[movie])
                .map_or(f64::INFINITY, |&got| (got - want).abs());
            worst = worst.max(if gap.is_nan() { f64::INFINITY } else { gap });
        }
    }
    Ok(worst)
}

/// The popularity ranking's answers to the same tests: the sampled candidates by popularity,
/// and the most popular movies the user has not booked.
struct BaselineRanks {
    sampled: Vec<Option<usize>>,
    full: Vec<bool>,
}

fn popularity_ranks(
    split: &Split,
    sampled: &[Vec<usize>],
    histories: &[History],
    catalog: &Catalog,
    popularity: &[f32],
) -> BaselineRanks {
    let mut by_popularity: Vec<usize> = (0..catalog.len()).collect();
    by_popularity.sort_by(|&a, &b| popularity[b].total_cmp(&popularity[a]).then(a.cmp(&b)));
    let mut ranks = BaselineRanks {
        sampled: Vec::with_capacity(split.tests.len()),
        full: Vec::with_capacity(split.tests.len()),
    };
    for ((test, candidates), history) in split.tests.iter().zip(sampled).zip(histories) {
        let mut ordered = candidates.clone();
        ordered.sort_by(|&a, &b| popularity[b].total_cmp(&popularity[a]).then(a.cmp(&b)));
        ranks.sampled.push(
            ordered
                .iter()
                .take(RESULTS)
                .position(|&m| m == test.positive)
                .map(|r| r + 1),
        );
        let seen: HashSet<usize> = history.booked.iter().copied().collect();
        ranks.full.push(
            by_popularity
                .iter()
                .filter(|m| !seen.contains(m))
                .take(RECALL_AT)
                .any(|&m| m == test.positive),
        );
    }
    ranks
}

/// HR and NDCG at [`RESULTS`] from 1-based ranks (a miss counts 0).
fn sampled_measures(ranks: &[Option<usize>]) -> (f64, f64) {
    let n = ranks.len().max(1) as f64;
    let hits = ranks.iter().flatten().count() as f64 / n;
    let gain = ranks
        .iter()
        .flatten()
        .map(|&r| 1.0 / ((r + 1) as f64).log2())
        .sum::<f64>()
        / n;
    (hits, gain)
}

fn share(hits: &[bool]) -> f64 {
    hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_counts_a_first_place_as_one() {
        let (hr, ndcg) = sampled_measures(&[Some(1), Some(3), None, None]);
        assert!((hr - 0.5).abs() < 1e-12);
        assert!((ndcg - (1.0 + 0.5) / 4.0).abs() < 1e-12);
    }
}
