//! `marquee train <model>`: the loop every hosted model goes through, in Rust around the fit.
//! Build the training set from a generated world with the feature store's point-in-time join (the
//! definitions serving uses), hand it to a small Python trainer script that fits with the field's
//! libraries and exports ONNX, run the exported artifact through the serving backend itself to
//! measure it (so the registry's numbers are the served model's), refuse it unless it beats its
//! fallback, and push it to the registry with its metrics, lineage, drift baseline and pipeline.
//! The jobs differ in their data and their measures; these steps are shared.

pub mod embedding;
pub mod fraud;
pub mod movie_index;
pub mod pricing;
pub mod recommendation;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use bytes::Bytes;
use marquee_feature_store::Definitions;
use marquee_feature_store::offline::{self, StorePath};
use marquee_registry::manifest::{Gate, GateOp};
use marquee_registry::{Manifest, PushFile, Quiet, Registry};
use marquee_serving::backend::onnx::OnnxRuntime;
use marquee_serving::backend::{
    Backend, Binding, BoundTensor, ComputeRecorder, ComputeTimes, InferJob, Instance, SessionConfig,
};
use marquee_serving::config::ServeConfig;
use marquee_serving::server::Server;
use marquee_serving::tensor::{DataType, Tensor, TensorData};

use crate::TrainingError;

/// Where a job reads, works and writes.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// A world written by `marquee data generate` (folder or object-store URL).
    pub data: String,
    pub registry: String,
    pub seed: u64,
    /// Scratch folder for the training set and the exported artifact (kept for inspection).
    pub work: PathBuf,
    /// The Python with the trainers' libraries (`deploy/setup.sh` makes `.marquee/venv`).
    pub python: PathBuf,
    /// `libonnxruntime.so`, for evaluating through the serving backend.
    pub onnxruntime: PathBuf,
    /// Who pushes (the manifest's `created_by`).
    pub by: String,
}

/// What a job produced.
#[derive(Debug, serde::Serialize)]
pub struct Trained {
    pub model: String,
    pub version: u64,
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Each gate the job checked, as `metric op value` with whether it held.
    pub gates: Vec<(String, bool)>,
}

/// A gate a version must pass before it is pushed: `metric op value`, where the value is usually
/// its fallback's score on the same test.
pub fn gate(metric: &str, op: GateOp, value: f64) -> Gate {
    Gate {
        metric: metric.to_string(),
        op,
        value,
    }
}

/// Judges `gates` on `metrics`, the way the registry judges them again at promotion: each as
/// text with whether it held, or, where one fails, the job's error naming it (nothing is pushed).
pub fn judge(
    model: &str,
    gates: &[Gate],
    metrics: &std::collections::BTreeMap<String, f64>,
) -> Result<Vec<(String, bool)>, TrainingError> {
    if let Some(failure) = gates.iter().find_map(|gate| gate.failure(metrics)) {
        return Err(TrainingError::Gate(format!(
            "{model} does not beat its fallback: {failure}; not pushed"
        )));
    }
    Ok(gates.iter().map(|gate| (gate.to_string(), true)).collect())
}

/// Reads a whole Parquet table of the world (`name` relative to its location).
pub async fn read_table(data: &str, name: &str) -> Result<RecordBatch, TrainingError> {
    let location = source_location(data, name);
    let source = StorePath::open(&location, Path::new("."), &[])
        .map_err(|e| TrainingError::Data(e.to_string()))?;
    let batches = source
        .batches(None)
        .await
        .map_err(|e| TrainingError::Data(e.to_string()))?;
    let Some(first) = batches.first() else {
        return Err(TrainingError::Data(format!("{location} holds no rows")));
    };
    arrow_select::concat::concat_batches(&first.schema(), &batches)
        .map_err(|e| TrainingError::Data(format!("{location}: {e}")))
}

/// A text column of a world table, every row given (a null is bad data, not an empty text).
pub fn text_column(
    batch: &RecordBatch,
    name: &str,
    table: &str,
) -> Result<Vec<String>, TrainingError> {
    let column = batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| TrainingError::Data(format!("{table} has no text column '{name}'")))?;
    if column.null_count() > 0 {
        return Err(TrainingError::Data(format!(
            "{table}: '{name}' has {} empty rows",
            column.null_count()
        )));
    }
    Ok(column.iter().flatten().map(str::to_string).collect())
}

/// A column of a world table, by name.
pub fn column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    table: &str,
) -> Result<&'a ArrayRef, TrainingError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| TrainingError::Data(format!("{table} has no column '{name}'")))
}

/// A numeric column (int64, float32 or float64) as f64, nulls as 0.
pub fn numbers(array: &ArrayRef, name: &str) -> Result<Vec<f64>, TrainingError> {
    if let Some(ints) = array.as_primitive_opt::<Int64Type>() {
        return Ok(ints.iter().map(|v| v.unwrap_or(0) as f64).collect());
    }
    if let Some(floats) = array.as_primitive_opt::<Float32Type>() {
        return Ok(floats.iter().map(|v| f64::from(v.unwrap_or(0.0))).collect());
    }
    let floats = array
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| TrainingError::Data(format!("column '{name}' is not numeric")))?;
    Ok(floats.iter().map(|v| v.unwrap_or(0.0)).collect())
}

/// Event times in ms (the feature store's reader: any timestamp unit, ms integers, RFC 3339).
pub fn times_ms(array: &ArrayRef, name: &str) -> Result<Vec<i64>, TrainingError> {
    offline::timestamps_ms(array, name)
        .map_err(|e| TrainingError::Data(e.to_string()))?
        .into_iter()
        .map(|t| t.ok_or_else(|| TrainingError::Data(format!("column '{name}' has a null time"))))
        .collect()
}

/// `entities` with the stored features `references` (`view:feature`) as of each row's
/// `time_column`: the feature store's point-in-time join over the world's own definitions, the
/// ones serving reads.
pub async fn point_in_time(
    options: &TrainOptions,
    entities: &RecordBatch,
    time_column: &str,
    references: &[&str],
) -> Result<RecordBatch, TrainingError> {
    let definitions_location = source_location(&options.data, "features.toml");
    let definitions = Definitions::load(Path::new(&definitions_location)).map_err(|e| {
        TrainingError::Data(format!("{e} (a world from marquee data generate has one)"))
    })?;
    let references: Vec<String> = references.iter().map(|r| r.to_string()).collect();
    let features = marquee_feature_store::jobs::parse_feature_refs(&definitions, &references)
        .map_err(|e| TrainingError::Data(e.to_string()))?;
    let data = options.data.clone();
    marquee_feature_store::jobs::training_set(entities, time_column, &features, |view| {
        let source = view.source.as_ref().ok_or_else(|| {
            marquee_feature_store::FeatureStoreError::Offline(format!(
                "feature view '{}' has no offline source",
                view.name
            ))
        })?;
        StorePath::open(&source_location(&data, &source.path), Path::new("."), &[])
    })
    .await
    .map_err(|e| TrainingError::Data(e.to_string()))
}

/// `path` inside the world at `data`: joined as a URL for object stores, as a path locally.
pub fn source_location(data: &str, path: &str) -> String {
    if data.contains("://") && !data.starts_with("file://") {
        format!("{}/{path}", data.trim_end_matches('/'))
    } else {
        let local = data.strip_prefix("file://").unwrap_or(data);
        Path::new(local).join(path).to_string_lossy().into_owned()
    }
}

/// Writes a job's file (an input for its trainer, a result kept for inspection).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainingError> {
    std::fs::write(path, bytes)
        .map_err(|e| TrainingError::Output(format!("{}: {e}", path.display())))
}

/// Reads a file a trainer wrote; missing, the trainer failed to make it.
pub fn read_trainer_output(path: &Path) -> Result<Bytes, TrainingError> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| TrainingError::Trainer(format!("{}: {e}", path.display())))
}

/// `rows` of a column-major matrix, row after row (what a model input takes).
pub fn row_major(matrix: &[Vec<f32>], rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * matrix.len());
    for &i in rows {
        out.extend(matrix.iter().map(|column| column[i]));
    }
    out
}

/// Writes `rows` of the matrix's columns (named `names`), then `extra` columns, as Parquet.
pub fn write_rows(
    path: &Path,
    names: &[&str],
    matrix: &[Vec<f32>],
    rows: &[usize],
    extra: Vec<(&str, ArrayRef)>,
) -> Result<(), TrainingError> {
    let mut columns: Vec<(&str, ArrayRef)> = names
        .iter()
        .zip(matrix)
        .map(|(name, column)| {
            (
                *name,
                Arc::new(arrow_array::Float32Array::from_iter_values(
                    rows.iter().map(|&i| column[i]),
                )) as ArrayRef,
            )
        })
        .collect();
    columns.extend(extra);
    let batch =
        RecordBatch::try_from_iter(columns).map_err(|e| TrainingError::Output(e.to_string()))?;
    let bytes = crate::data::write::parquet(&batch)?;
    write_file(path, &bytes)
}

/// A tabular fit: writes `rows` of the matrix (columns `names`) with its `label` column as
/// `{job}-train.parquet`, runs the trainer `script` (`{job}.py`: `--train --columns --label
/// --seed --out`), and returns its JSON report and the ONNX model it exported (`{job}.onnx`).
pub fn fit_table(
    options: &TrainOptions,
    job: &str,
    script: &str,
    (names, matrix, rows): (&[&str], &[Vec<f32>], &[usize]),
    label: (&str, ArrayRef),
) -> Result<(serde_json::Value, Bytes), TrainingError> {
    let train_path = options.work.join(format!("{job}-train.parquet"));
    write_rows(&train_path, names, matrix, rows, vec![(label.0, label.1)])?;
    let model_path = options.work.join(format!("{job}.onnx"));
    let seed = options.seed.to_string();
    let report = run_trainer(
        options,
        &format!("{job}.py"),
        script,
        &[
            "--train",
            path_text(&train_path)?,
            "--columns",
            &names.join(","),
            "--label",
            label.0,
            "--seed",
            &seed,
            "--out",
            path_text(&model_path)?,
        ],
    )?;
    Ok((report, read_trainer_output(&model_path)?))
}

/// A path as the text a trainer's command line takes.
pub fn path_text(path: &Path) -> Result<&str, TrainingError> {
    path.to_str()
        .ok_or_else(|| TrainingError::Invalid(format!("{} is not UTF-8", path.display())))
}

/// Runs a trainer script (embedded in the binary, written to the work folder) and returns the
/// JSON line it prints.
pub fn run_trainer(
    options: &TrainOptions,
    script_name: &str,
    script: &str,
    args: &[&str],
) -> Result<serde_json::Value, TrainingError> {
    let path = options.work.join(script_name);
    write_file(&path, script.as_bytes())?;
    let output = std::process::Command::new(&options.python)
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| {
            TrainingError::Trainer(format!(
                "cannot run {} (set --python, or run deploy/setup.sh): {e}",
                options.python.display()
            ))
        })?;
    if !output.status.success() {
        return Err(TrainingError::Trainer(format!(
            "{script_name} failed ({}):\n{}",
            output.status,
            trainer_failure(&String::from_utf8_lossy(&output.stderr))
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| TrainingError::Trainer(format!("{script_name} printed no JSON report")))?;
    serde_json::from_str(line)
        .map_err(|e| TrainingError::Trainer(format!("{script_name}'s report: {e}")))
}

/// What a failed trainer's standard error says, briefly: each exception of a Python traceback
/// (a chained one names its cause first) with the place it was raised, each line cut (the last
/// one's message can be a whole model's attributes); else its last 12 lines.
fn trainer_failure(stderr: &str) -> String {
    const LINE: usize = 300;
    let cut = |line: &str| match line.char_indices().nth(LINE) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    };
    // `ValueError: …`, `AssertionError`, `SystemExit: 2`, `subprocess.TimeoutExpired: …`.
    let is_exception = |line: &str| {
        let name = line.split_once(": ").map_or(line, |(name, _)| name);
        let last = name.rsplit('.').next().unwrap_or(name);
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            && last.starts_with(|c: char| c.is_ascii_uppercase())
            && (["Error", "Exception", "Exit", "Interrupt", "Expired"]
                .iter()
                .any(|end| last.ends_with(end)))
    };
    let mut told = Vec::new();
    let mut place = None;
    for line in stderr.lines() {
        if line.trim_start().starts_with("File \"") {
            place = Some(line.trim());
        } else if is_exception(line) {
            told.extend(place.take().map(cut));
            told.push(cut(line));
        }
    }
    if !told.is_empty() {
        return told.join("\n");
    }
    let last: Vec<&str> = stderr.lines().rev().take(12).collect();
    last.into_iter()
        .rev()
        .map(cut)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An exported ONNX model loaded the way the server loads it, one instance on this thread.
pub struct Evaluator {
    instance: Instance,
    input: String,
}

struct Unrecorded;

impl ComputeRecorder for Unrecorded {
    fn record(&self, _: usize, _: usize, _: ComputeTimes) {}
}

impl Evaluator {
    /// Loads `model` with one FP32 input and one FP32 output.
    pub fn onnx(
        options: &TrainOptions,
        model: &[u8],
        input: &str,
        output: &str,
    ) -> Result<Self, TrainingError> {
        let failed = |e: marquee_serving::backend::BackendError| {
            TrainingError::Evaluation(format!("the exported model does not load: {e}"))
        };
        let runtime = OnnxRuntime::load(&options.onnxruntime).map_err(failed)?;
        let session = runtime
            .session(
                model,
                &SessionConfig {
                    gpu: None,
                    intra_op_threads: 1,
                    inter_op_threads: 1,
                    intra_op_spinning: None,
                },
            )
            .map_err(failed)?;
        let tensor = |name: &str| BoundTensor {
            name: name.to_string(),
            dtype: DataType::Fp32,
            position: 0,
        };
        let binding = Binding {
            inputs: vec![tensor(input)],
            outputs: vec![tensor(output)],
            batched: true,
        };
        let instance = session
            .bind(&binding, Arc::new(Unrecorded))
            .map_err(failed)?;
        Ok(Self {
            instance,
            input: input.to_string(),
        })
    }

    /// Runs `rows` (row-major, `width` columns) in batches of 1,024; one score per row (the
    /// output's first column).
    pub fn score(&mut self, rows: &[f32], width: usize) -> Result<Vec<f32>, TrainingError> {
        let mut scores = Vec::with_capacity(rows.len() / width.max(1));
        for chunk in rows.chunks(1024 * width) {
            let n = chunk.len() / width;
            let tensor = Tensor::new(
                self.input.clone(),
                DataType::Fp32,
                vec![n as i64, width as i64],
                TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(chunk))),
            )
            .map_err(|e| TrainingError::Evaluation(e.to_string()))?;
            let job = InferJob {
                inputs: vec![tensor],
                rows: n,
            };
            let mut outputs = marquee_batcher::Executor::execute(&mut self.instance, &[job])
                .map_err(|e| TrainingError::Evaluation(e.to_string()))?;
            let output = outputs
                .pop()
                .and_then(|mut o| o.pop())
                .ok_or_else(|| TrainingError::Evaluation("the model returned nothing".into()))?;
            let TensorData::Fixed(bytes) = &output.data else {
                return Err(TrainingError::Evaluation(
                    "the output is not numeric".into(),
                ));
            };
            let values: &[f32] = bytemuck::try_cast_slice(bytes)
                .map_err(|e| TrainingError::Evaluation(format!("the output: {e}")))?;
            let per_row = values.len() / n.max(1);
            scores.extend(values.chunks(per_row.max(1)).map(|row| row[0]));
        }
        Ok(scores)
    }
}

/// Pushes `files` as the next version of `model` with the manifest fields in `manifest` (the
/// registry fills name, version, files and checksums).
pub async fn push(
    options: &TrainOptions,
    model: &str,
    files: Vec<PushFile>,
    manifest: serde_json::Value,
) -> Result<Manifest, TrainingError> {
    push_to(&options.registry, model, files, manifest).await
}

async fn push_to(
    location: &str,
    model: &str,
    files: Vec<PushFile>,
    manifest: serde_json::Value,
) -> Result<Manifest, TrainingError> {
    let registry = Registry::open(location).map_err(|e| TrainingError::Registry(e.to_string()))?;
    let manifest: Manifest = serde_json::from_value(manifest)
        .map_err(|e| TrainingError::Registry(format!("the manifest: {e}")))?;
    registry
        .push(model, files, manifest, &Quiet)
        .await
        .map_err(|e| TrainingError::Registry(e.to_string()))
}

/// A candidate version served in this process exactly as `marquee serve` would serve it (from a
/// scratch registry in the work folder, on loopback), so a job measures its pipeline, not only
/// its bare model: what `/v1/predict` answers is what the metrics are about.
pub struct Candidate {
    server: Server,
    url: String,
    client: reqwest::Client,
}

/// A version a [`Candidate`] serves: version 1 of `model` in the scratch registry.
pub struct ServedVersion {
    pub model: String,
    pub files: Vec<PushFile>,
    /// The manifest fields (the registry fills name, version, files and checksums).
    pub manifest: serde_json::Value,
}

/// Instances sent per `/v1/predict` request while evaluating.
const EVALUATION_CHUNK: usize = 256;

impl Candidate {
    /// Pushes each of `versions` as version 1 of its model to a fresh scratch registry and
    /// serves them together (a pipeline may call another's model); fails with the server's
    /// reason if one does not load.
    pub async fn start(
        options: &TrainOptions,
        versions: Vec<ServedVersion>,
    ) -> Result<Self, TrainingError> {
        let scratch = options.work.join("candidate-registry");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .map_err(|e| TrainingError::Output(format!("{}: {e}", scratch.display())))?;
        }
        let location = scratch.to_string_lossy().into_owned();
        let mut pins: Vec<String> = Vec::with_capacity(versions.len());
        for version in versions {
            if pins.contains(&version.model) {
                return Err(TrainingError::Invalid(format!(
                    "the candidate serves '{}' twice",
                    version.model
                )));
            }
            push_to(&location, &version.model, version.files, version.manifest).await?;
            pins.push(version.model);
        }
        // The world's feature definitions, for pipelines that read feature views.
        let features = PathBuf::from(source_location(&options.data, "features.toml"));
        let config = ServeConfig {
            registry: Some(location),
            pins: pins.iter().map(|model| format!("{model}:1")).collect(),
            features: features.is_file().then_some(features),
            ort_library: Some(options.onnxruntime.clone()),
            host: [127, 0, 0, 1].into(),
            http_port: 0,
            grpc_port: 0,
            metrics_port: 0,
            // The evaluation's rows are the held-out set, not traffic: nothing to watch.
            drift_window_rows: 0,
            ..ServeConfig::default()
        };
        let server = Server::start(&config).await.map_err(|e| {
            TrainingError::Evaluation(format!("the candidate cannot be served: {e}"))
        })?;
        for model in &pins {
            if let Err(e) = server.models().get(model, "1") {
                server.shutdown().await;
                return Err(TrainingError::Evaluation(format!(
                    "the candidate '{model}' does not load: {e}"
                )));
            }
        }
        Ok(Self {
            url: format!("http://{}/v1/predict", server.http_addr()),
            server,
            client: reqwest::Client::new(),
        })
    }

    /// `/v1/predict` answers of `model` for `instances` (`{"entities", "features"}` each), in
    /// order.
    pub async fn predict(
        &self,
        model: &str,
        instances: &[serde_json::Value],
    ) -> Result<Vec<serde_json::Value>, TrainingError> {
        let mut answers = Vec::with_capacity(instances.len());
        for chunk in instances.chunks(EVALUATION_CHUNK) {
            let body = serde_json::json!({"model": model, "version": 1, "instances": chunk});
            let response = self
                .client
                .post(&self.url)
                .json(&body)
                .send()
                .await
                .map_err(|e| TrainingError::Evaluation(format!("/v1/predict: {e}")))?;
            let status = response.status();
            let answer: serde_json::Value = response
                .json()
                .await
                .map_err(|e| TrainingError::Evaluation(format!("/v1/predict answer: {e}")))?;
            if !status.is_success() {
                return Err(TrainingError::Evaluation(format!(
                    "/v1/predict refused the evaluation rows ({status}): {}",
                    answer["error"]
                )));
            }
            match answer["predictions"].as_array() {
                Some(predictions) if predictions.len() == chunk.len() => {
                    answers.extend(predictions.iter().cloned());
                }
                _ => {
                    return Err(TrainingError::Evaluation(format!(
                        "/v1/predict answered {} predictions for {} instances",
                        answer["predictions"].as_array().map_or(0, Vec::len),
                        chunk.len()
                    )));
                }
            }
        }
        Ok(answers)
    }

    pub async fn stop(self) {
        self.server.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::trainer_failure;

    #[test]
    fn a_failed_trainer_is_told_by_its_exceptions() {
        let attributes = format!("{{'nodes_values': [{}]}}", "0, ".repeat(400));
        let stderr = format!(
            "Traceback (most recent call last):\n  File \"x.py\", line 735, in add_node\n    node = make_node(op_type)\nTypeError: Field onnx.AttributeProto.ints: Expected an int, got a boolean.\n\nThe above exception was the direct cause of the following exception:\n\nTraceback (most recent call last):\n  File \"fraud.py\", line 125, in <module>\nValueError: Unable to create node with attributes={attributes}\n   0,\n   0]}}.\n"
        );
        let told = trainer_failure(&stderr);
        let lines: Vec<&str> = told.lines().collect();
        assert_eq!(lines[0], r#"File "x.py", line 735, in add_node"#);
        assert_eq!(
            lines[1],
            "TypeError: Field onnx.AttributeProto.ints: Expected an int, got a boolean."
        );
        assert_eq!(lines[2], r#"File "fraud.py", line 125, in <module>"#);
        assert!(lines[3].starts_with("ValueError: Unable to create node"));
        assert!(lines[3].ends_with('…') && lines[3].chars().count() == 301);
        assert_eq!(lines.len(), 4);
        let bare = "Traceback (most recent call last):\n  File \"t.py\", line 3, in <module>\n    assert ok\nAssertionError\n";
        assert_eq!(
            trainer_failure(bare),
            "File \"t.py\", line 3, in <module>\nAssertionError"
        );
        assert_eq!(trainer_failure("SystemExit: 2\n"), "SystemExit: 2");
        assert_eq!(
            trainer_failure("no module\nnamed x\n"),
            "no module\nnamed x"
        );
    }
}
