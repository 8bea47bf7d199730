//! `marquee train movie-index`: the movie search, registered as `movie_search`. Every movie's
//! description is embedded by the registry's `embedding` model as served, the vectors become an
//! exact index (one ONNX MatMul, `trainers/movie_index.py`) stored with the version beside
//! `movies.json`, and the step pipeline embeds a query with that same embedding version, scores
//! it against every movie and keeps the best ten, optionally of one genre. The measure is the
//! world's labelled queries: is the movie a query was written for among the first three? The
//! version is pushed only if it beats keyword search (TF-IDF) on that and reaches
//! [`MIN_HIT_AT_3`].

use std::collections::BTreeMap;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMillisecondType, UInt32Type};
use bytes::Bytes;
use marquee_registry::manifest::GateOp;
use marquee_registry::{PushFile, Registry, Stage};
use serde_json::{Value, json};

use super::{Candidate, ServedVersion, TrainOptions, Trained};
use crate::TrainingError;
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};

const TRAINER: &str = include_str!("../../trainers/movie_index.py");

/// Movies a search answers with.
const RESULTS: usize = 10;

/// The least share of queries whose movie must come in the first three, whatever keyword search
/// manages: the queries are worded apart from the descriptions, so keyword search scores near 0
/// and would not stop a broken index on its own.
const MIN_HIT_AT_3: f64 = 0.5;

/// The model whose vectors the index holds and whose pipeline embeds the queries.
const EMBEDDING: &str = "embedding";

pub async fn train(options: &TrainOptions) -> Result<Trained, TrainingError> {
    let catalogue = Catalogue::read(options).await?;
    let embedding = RegisteredEmbedding::fetch(options).await?;

    let candidate = Candidate::start(options, vec![embedding.served()]).await?;
    let described: Vec<Value> = catalogue
        .movies
        .iter()
        .map(|movie| json!({"features": {"text": movie.description}}))
        .collect();
    let answers = candidate.predict(EMBEDDING, &described).await;
    candidate.stop().await;
    let vectors = super::embedding::served_vectors(&answers?)?.concat();

    let catalog_path = options.work.join("movie-index-catalog.json");
    let vectors_path = options.work.join("movie-index-vectors.f32");
    let tokenizer_path = options.work.join("movie-index-tokenizer.json");
    let out = options.work.join("movie-index");
    super::write_file(
        &catalog_path,
        &serde_json::to_vec(&json!({
            "descriptions": catalogue.movies.iter().map(|m| &m.description).collect::<Vec<_>>(),
            "queries": catalogue.queries.iter().map(|q| &q.text).collect::<Vec<_>>(),
            "answers": catalogue.queries.iter().map(|q| q.movie).collect::<Vec<_>>(),
        }))
        .map_err(|e| TrainingError::Output(e.to_string()))?,
    )?;
    super::write_file(&vectors_path, bytemuck::cast_slice(&vectors))?;
    super::write_file(&tokenizer_path, &embedding.tokenizer()?)?;
    let max_tokens = embedding.max_tokens().to_string();
    let report = super::run_trainer(
        options,
        "movie_index.py",
        TRAINER,
        &[
            "--catalog",
            super::path_text(&catalog_path)?,
            "--vectors",
            super::path_text(&vectors_path)?,
            "--tokenizer",
            super::path_text(&tokenizer_path)?,
            "--max-tokens",
            &max_tokens,
            "--out",
            super::path_text(&out)?,
        ],
    )?;
    if report["movies"].as_u64() != Some(catalogue.movies.len() as u64)
        || report["dimension"].as_u64() != Some((vectors.len() / catalogue.movies.len()) as u64)
    {
        return Err(TrainingError::Trainer(format!(
            "movie_index.py indexed {} movies of dimension {}, not the {} embedded",
            report["movies"],
            report["dimension"],
            catalogue.movies.len()
        )));
    }
    let model = super::read_trainer_output(&out.join("model.onnx"))?;
    let items = Bytes::from(
        serde_json::to_vec(&catalogue.items()).map_err(|e| TrainingError::Output(e.to_string()))?,
    );
    let signature = marquee_registry::onnx::signature(&model).map_err(TrainingError::Trainer)?;
    let files = vec![
        PushFile {
            path: "model.onnx".into(),
            contents: model,
        },
        PushFile {
            path: "movies.json".into(),
            contents: items,
        },
    ];
    let manifest = |pinned: u64,
                    metrics: &BTreeMap<String, f64>,
                    baseline: Option<&DriftBaseline>| {
        json!({
            "schema_version": marquee_registry::manifest::SCHEMA_VERSION,
            "name": "movie_search",
            "version": 0,
            "framework": "onnx",
            "created_at": marquee_registry::now(),
            "created_by": options.by,
            "description": format!(
                "Movie search: a query embedded by {EMBEDDING} version {} against every description, the best {RESULTS}, optionally of one genre (marquee train movie-index)",
                embedding.version
            ),
            "files": [],
            "signature": signature,
            "config": {
                "max_batch_size": 32,
                "dynamic_batching": {"max_queue_delay_microseconds": 500},
                "parameters": {"wait_only_for_company": {"string_value": "1"}},
                "instance_group": [{"count": 1, "kind": "KIND_CPU"}]
            },
            "metrics": metrics,
            "gates": gates(metrics),
            "tags": {"task": "search", "trainer": "trainers/movie_index.py"},
            "lineage": {
                "dataset_uri": options.data,
                "code_version": concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
                "parameters": {
                    "embedding": {"model": EMBEDDING, "version": embedding.version},
                    "index": "exact (cosine over unit vectors, one MatMul)",
                    "movies": catalogue.movies.len(),
                    "queries": catalogue.queries.len(),
                    "results": RESULTS,
                    "keyword_baseline": report["keyword_method"],
                }
            },
            "pipeline": pipeline(pinned),
            "drift_baseline": baseline,
        })
    };

    // The scratch registry holds the embedding as its version 1, so the candidate's pipeline pins
    // that; the bytes are the registry version's, checked against its checksums on the way.
    let candidate = Candidate::start(
        options,
        vec![
            embedding.served(),
            ServedVersion {
                model: "movie_search".into(),
                files: files.clone(),
                manifest: manifest(1, &BTreeMap::new(), None),
            },
        ],
    )
    .await?;
    let searches = |in_genre: bool| -> Vec<Value> {
        catalogue
            .queries
            .iter()
            .map(|query| {
                let genre = if in_genre {
                    catalogue.movies[query.movie].primary_genre.as_str()
                } else {
                    ""
                };
                json!({"features": {"query": query.text, "genre": genre}})
            })
            .collect()
    };
    let searched = async {
        let plain = candidate.predict("movie_search", &searches(false)).await?;
        let in_genre = candidate.predict("movie_search", &searches(true)).await?;
        Ok::<_, TrainingError>((plain, in_genre))
    }
    .await;
    candidate.stop().await;
    let (plain, in_genre) = searched?;
    // What the candidate answered, for inspection and for checking the registry version answers
    // the same (train/serve parity).
    let answered: Vec<Value> = catalogue
        .queries
        .iter()
        .zip(&plain)
        .map(|(query, answer)| json!({"query": query.text, "movies": answer["outputs"]["movies"]}))
        .collect();
    super::write_file(
        &options.work.join("movie-search-answers.json"),
        &serde_json::to_vec(&answered).map_err(|e| TrainingError::Output(e.to_string()))?,
    )?;
    let served_ranks = catalogue.ranks(&plain)?;
    let genre_ranks = catalogue.ranks(&in_genre)?;
    let keyword_ranks: Vec<Option<usize>> = report["keyword_ranks"]
        .as_array()
        .filter(|ranks| ranks.len() == catalogue.queries.len())
        .ok_or_else(|| {
            TrainingError::Trainer("movie_index.py reported no rank for some queries".into())
        })?
        .iter()
        .map(|rank| match rank {
            Value::Null => Ok(None),
            rank => rank
                .as_u64()
                .map(|r| Some(r as usize).filter(|&r| r <= RESULTS))
                .ok_or_else(|| {
                    TrainingError::Trainer(format!("movie_index.py reported the rank {rank}"))
                }),
        })
        .collect::<Result<_, _>>()?;

    let mut metrics = measures("", &served_ranks);
    metrics.extend(measures("keyword_", &keyword_ranks));
    metrics.insert(
        "hit_at_3_in_genre".into(),
        measures("", &genre_ranks)["hit_at_3"],
    );
    metrics.insert("movies".into(), catalogue.movies.len() as f64);
    metrics.insert("queries".into(), catalogue.queries.len() as f64);
    let judged = super::judge("movie_search", &gates(&metrics), &metrics)?;
    let baseline = baseline(&report, &plain);
    let pushed = super::push(
        options,
        "movie_search",
        files,
        manifest(embedding.version, &metrics, Some(&baseline)),
    )
    .await?;
    Ok(Trained {
        model: "movie_search".into(),
        version: pushed.version,
        metrics,
        gates: judged,
    })
}

/// The search must beat keyword search and reach a floor whatever keyword search does (no gates
/// before the measures exist: the candidate served for measuring has none).
fn gates(metrics: &BTreeMap<String, f64>) -> Vec<marquee_registry::manifest::Gate> {
    metrics
        .get("keyword_hit_at_3")
        .map_or_else(Vec::new, |&keyword| {
            vec![
                super::gate("hit_at_3", GateOp::Gt, keyword),
                super::gate("hit_at_3", GateOp::Ge, MIN_HIT_AT_3),
            ]
        })
}

/// The search pipeline, its query embedded by the `embedding` version `pinned`: the index holds
/// that version's vectors, so a new default embedding must not change what queries are scored
/// with (a new embedding means a new index).
fn pipeline(pinned: u64) -> Value {
    json!({
        "features": [
            {"name": "query", "dtype": "string", "required": true},
            {"name": "genre", "dtype": "string", "default": ""}
        ],
        "steps": [
            {"op": "predict", "model": EMBEDDING, "version": pinned,
             "inputs": {"text": "query"}, "outputs": {"embedding": "query_vector"}},
            {"op": "model", "inputs": {"query": "query_vector"}, "outputs": {"scores": "scores"}},
            {"op": "top_k", "scores": "scores", "items": "movies.json", "k": RESULTS,
             "filter": {"genres": "genre"}, "into": "movies"}
        ],
        "outputs": {"movies": "movies"},
        "prediction": "movies"
    })
}

/// Hit rates at 1, 3 and [`RESULTS`] (all a search answers) and the mean reciprocal rank (a
/// miss counts 0), named with `prefix`.
fn measures(prefix: &str, ranks: &[Option<usize>]) -> BTreeMap<String, f64> {
    let n = ranks.len().max(1) as f64;
    let hit = |k: usize| ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64 / n;
    let mrr = ranks.iter().flatten().map(|&r| 1.0 / r as f64).sum::<f64>() / n;
    BTreeMap::from([
        (format!("{prefix}hit_at_1"), hit(1)),
        (format!("{prefix}hit_at_3"), hit(3)),
        (format!("{prefix}hit_at_{RESULTS}"), hit(RESULTS)),
        (format!("{prefix}mrr_at_{RESULTS}"), mrr),
    ])
}

/// Query lengths in tokens (the input) and the best movie's score (the prediction): queries
/// that stop resembling any description show as the second sinking.
fn baseline(report: &Value, answers: &[Value]) -> DriftBaseline {
    let tokens: Vec<f64> = report["query_tokens"]
        .as_array()
        .map(|counts| counts.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let best: Vec<f64> = answers
        .iter()
        .filter_map(|answer| answer["outputs"]["movies"][0]["score"].as_f64())
        .collect();
    DriftBaseline {
        rows: answers.len() as u64,
        inputs: vec![ColumnBaseline::numeric("tokens", &tokens)],
        prediction: ColumnBaseline::numeric("best_score", &best),
    }
}

/// The registry's `embedding` at its production version, else its newest version not archived,
/// with its files, checked against their checksums.
struct RegisteredEmbedding {
    version: u64,
    manifest: marquee_registry::Manifest,
    files: Vec<PushFile>,
}

impl RegisteredEmbedding {
    async fn fetch(options: &TrainOptions) -> Result<Self, TrainingError> {
        let failed = |e: marquee_registry::RegistryError| TrainingError::Registry(e.to_string());
        let registry = Registry::open(&options.registry).map_err(failed)?;
        let versions = registry.versions(EMBEDDING).await.map_err(failed)?;
        let refs = registry.refs(EMBEDDING).await.map_err(failed)?;
        let Some(version) = refs
            .aliases
            .get(Stage::Production.name())
            .copied()
            .or_else(|| {
                versions
                    .iter()
                    .rev()
                    .find(|v| !refs.archived.contains(v))
                    .copied()
            })
        else {
            return Err(TrainingError::Data(format!(
                "the registry {} has no '{EMBEDDING}' model to embed the movies with: run `marquee train embedding` first",
                options.registry
            )));
        };
        let manifest = registry
            .manifest(EMBEDDING, version)
            .await
            .map_err(failed)?;
        let mut files = Vec::with_capacity(manifest.files.len());
        for entry in &manifest.files {
            files.push(PushFile {
                path: entry.path.clone(),
                contents: registry.file(&manifest, entry).await.map_err(failed)?,
            });
        }
        Ok(Self {
            version,
            manifest,
            files,
        })
    }

    /// This version as a candidate serves it (the registry fills in its number and files).
    fn served(&self) -> ServedVersion {
        let mut manifest = serde_json::to_value(&self.manifest).unwrap_or(Value::Null);
        manifest["files"] = json!([]);
        ServedVersion {
            model: EMBEDDING.into(),
            files: self.files.clone(),
            manifest,
        }
    }

    /// The file its pipeline's tokenize step reads.
    fn tokenizer(&self) -> Result<Bytes, TrainingError> {
        let name = self.tokenize_step()["tokenizer"]
            .as_str()
            .unwrap_or("tokenizer.json");
        self.files
            .iter()
            .find(|file| file.path == name)
            .map(|file| file.contents.clone())
            .ok_or_else(|| {
                TrainingError::Data(format!(
                    "{EMBEDDING} version {} has no tokenizer file '{name}'",
                    self.version
                ))
            })
    }

    /// Where its tokenize step truncates (the serving default when the step does not say).
    fn max_tokens(&self) -> u64 {
        self.tokenize_step()["max_length"].as_u64().unwrap_or(256)
    }

    fn tokenize_step(&self) -> &Value {
        self.manifest.pipeline["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["op"] == "tokenize"))
            .unwrap_or(&Value::Null)
    }
}

/// The movies and the labelled queries, from the world's tables.
struct Catalogue {
    movies: Vec<Movie>,
    queries: Vec<Query>,
}

struct Movie {
    id: String,
    title: String,
    description: String,
    genres: Vec<String>,
    primary_genre: String,
    released_on: String,
    runtime_minutes: u32,
}

struct Query {
    text: String,
    /// Position in [`Catalogue::movies`] of the movie the query was written for.
    movie: usize,
}

impl Catalogue {
    async fn read(options: &TrainOptions) -> Result<Self, TrainingError> {
        let table = super::read_table(&options.data, "movies.parquet").await?;
        let text = |name: &str| super::text_column(&table, name, "movies.parquet");
        let (ids, titles, descriptions, primary) = (
            text("movie_id")?,
            text("title")?,
            text("description")?,
            text("primary_genre")?,
        );
        let genres = table
            .column_by_name("genres")
            .and_then(|c| c.as_list_opt::<i32>())
            .ok_or_else(|| {
                TrainingError::Data("movies.parquet has no text-list column 'genres'".into())
            })?;
        let released = table
            .column_by_name("released_at")
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
            .ok_or_else(|| {
                TrainingError::Data("movies.parquet has no timestamp column 'released_at'".into())
            })?;
        let runtime = table
            .column_by_name("runtime_minutes")
            .and_then(|c| c.as_primitive_opt::<UInt32Type>())
            .ok_or_else(|| {
                TrainingError::Data("movies.parquet has no integer column 'runtime_minutes'".into())
            })?;
        for (name, nulls) in [
            ("genres", genres.null_count()),
            ("released_at", released.null_count()),
            ("runtime_minutes", runtime.null_count()),
        ] {
            if nulls > 0 {
                return Err(TrainingError::Data(format!(
                    "movies.parquet: '{name}' has {nulls} empty rows"
                )));
            }
        }
        let mut movies = Vec::with_capacity(table.num_rows());
        for row in 0..table.num_rows() {
            let listed = genres.value(row);
            let listed = listed.as_string_opt::<i32>().ok_or_else(|| {
                TrainingError::Data("movies.parquet: 'genres' is not a list of text".into())
            })?;
            movies.push(Movie {
                id: ids[row].clone(),
                title: titles[row].clone(),
                description: descriptions[row].clone(),
                genres: listed.iter().flatten().map(str::to_string).collect(),
                primary_genre: primary[row].clone(),
                released_on: date(released.value(row)),
                runtime_minutes: runtime.value(row),
            });
        }
        if movies.is_empty() {
            return Err(TrainingError::Data("movies.parquet lists no movies".into()));
        }
        let mut position: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, movie) in movies.iter().enumerate() {
            if position.insert(movie.id.as_str(), i).is_some() {
                return Err(TrainingError::Data(format!(
                    "movies.parquet lists movie '{}' twice",
                    movie.id
                )));
            }
        }
        let table = super::read_table(&options.data, "labels/search_queries.parquet").await?;
        let texts = super::text_column(&table, "query", "labels/search_queries.parquet")?;
        let targets = super::text_column(&table, "movie_id", "labels/search_queries.parquet")?;
        let queries = texts
            .into_iter()
            .zip(targets)
            .map(|(text, target)| {
                position
                    .get(target.as_str())
                    .map(|&movie| Query { text, movie })
                    .ok_or_else(|| {
                        TrainingError::Data(format!(
                            "the query for movie '{target}' names a movie movies.parquet does not list"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if queries.is_empty() {
            return Err(TrainingError::Data(
                "labels/search_queries.parquet holds no queries to measure the search on".into(),
            ));
        }
        Ok(Self { movies, queries })
    }

    /// What the index's scores are ranked over: one object per movie, in the index's order.
    fn items(&self) -> Vec<Value> {
        self.movies
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "title": m.title,
                    "genres": m.genres,
                    "primary_genre": m.primary_genre,
                    "released_on": m.released_on,
                    "runtime_minutes": m.runtime_minutes,
                })
            })
            .collect()
    }

    /// Where each query's movie came in the search's answers (`None`: not in them).
    fn ranks(&self, answers: &[Value]) -> Result<Vec<Option<usize>>, TrainingError> {
        self.queries
            .iter()
            .zip(answers)
            .map(|(query, answer)| {
                let found = answer["outputs"]["movies"].as_array().ok_or_else(|| {
                    TrainingError::Evaluation(format!(
                        "the search answered without movies: {answer}"
                    ))
                })?;
                let wanted = self.movies[query.movie].id.as_str();
                Ok(found
                    .iter()
                    .position(|movie| movie["id"].as_str() == Some(wanted))
                    .map(|i| i + 1))
            })
            .collect()
    }
}

/// The UTC day, `YYYY-MM-DD`, of milliseconds since the epoch (before 1970 too): the civil
/// calendar from a day count, as in Howard Hinnant's `civil_from_days`.
fn date(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_follow_the_civil_calendar() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(951_782_400_000), "2000-02-29");
        assert_eq!(date(1_767_225_600_000 + 86_399_999), "2026-01-01");
        assert_eq!(date(253_402_300_800_000), "10000-01-01");
    }

    #[test]
    fn measures_count_misses_as_nothing() {
        let ranks = [Some(1), Some(3), Some(4), None];
        let m = measures("x_", &ranks);
        assert_eq!(m["x_hit_at_1"], 0.25);
        assert_eq!(m["x_hit_at_3"], 0.5);
        assert_eq!(m["x_hit_at_10"], 0.75);
        assert!((m["x_mrr_at_10"] - (1.0 + 1.0 / 3.0 + 0.25) / 4.0).abs() < 1e-12);
    }
}
