//! A loaded model version: its spec, its batcher with one backend instance per thread, and its
//! statistics. `LoadedModel::infer` is the middle of every request's path: it checks the
//! request against the spec, hands a job to the batcher, and turns the job's tensors into the
//! response the client asked for.

pub mod spec;
pub mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use marquee_batcher::{BatchError, Batcher, SubmitOptions};
use marquee_proto::inference;

use crate::backend::{
    BackendError, Binding, BoundTensor, GraphTensor, InferJob, Instance, Session, Signature,
};
use crate::error::ServingError;
use crate::infer::{InferRequest, InferResponse, RequestedOutput};
use crate::metrics::ModelMetrics;
use crate::predict::ModelPipeline;
use crate::tensor::{DataType, Tensor, TensorData};
pub use spec::{ModelDefaults, ModelSpec, TensorSpec};
use stats::ModelStats;

/// One model version, ready to serve.
pub struct LoadedModel {
    spec: ModelSpec,
    batcher: Batcher<Instance>,
    stats: Arc<ModelStats>,
    pipeline: PipelineState,
}

/// The `/v1/predict` pipeline of a version.
pub enum PipelineState {
    /// The version declares none: it serves `/v2` only.
    Undeclared,
    Ready(Box<ModelPipeline>),
    /// Declared but refused at load, for this reason; the model still serves `/v2`.
    Unusable(String),
}

impl LoadedModel {
    /// Binds one session per instance to the spec (checked against `signature`) and starts the
    /// batcher.
    pub fn start(
        spec: ModelSpec,
        signature: &Signature,
        sessions: Vec<Box<dyn Session>>,
        metrics: ModelMetrics,
    ) -> Result<Self, ServingError> {
        let stats = Arc::new(ModelStats::new(metrics));
        // Each tensor's place in the signature the spec was checked against (the spec keeps the
        // configuration's order, which may list a subset or another order).
        let bound = |tensors: &[TensorSpec], signature: &[GraphTensor]| {
            tensors
                .iter()
                .enumerate()
                .map(|(index, t)| BoundTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    position: signature
                        .iter()
                        .position(|g| g.name == t.name)
                        .unwrap_or(index),
                })
                .collect()
        };
        let binding = Binding {
            inputs: bound(&spec.inputs, &signature.0),
            outputs: bound(&spec.outputs, &signature.1),
            batched: spec.max_batch_size > 0,
        };
        let instances = sessions
            .into_iter()
            .map(|session| session.bind(&binding, stats.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                ServingError::LoadFailed(format!(
                    "model '{}' version {}: {e}",
                    spec.name, spec.version
                ))
            })?;
        let thread_name = format!("{}-v{}", spec.name, spec.version);
        let batcher = Batcher::start(
            &thread_name,
            spec.batching.clone(),
            instances,
            stats.clone(),
        )
        .map_err(|e| ServingError::Internal(format!("cannot start model threads: {e}")))?;
        Ok(Self {
            spec,
            batcher,
            stats,
            pipeline: PipelineState::Undeclared,
        })
    }

    /// Attaches the version's `/v1/predict` pipeline (or the reason it is unusable).
    pub fn with_pipeline(mut self, pipeline: PipelineState) -> Self {
        self.pipeline = pipeline;
        self
    }

    pub fn pipeline(&self) -> &PipelineState {
        &self.pipeline
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn statistics(&self) -> inference::ModelStatistics {
        self.stats.snapshot(&self.spec.name, self.spec.version)
    }

    /// Runs one batch of zeros (empty strings for BYTES) through the model before it takes
    /// traffic, so a version that cannot answer is refused and the first caller pays no warm-up.
    /// The warm-up batch is not counted in the version's statistics.
    pub async fn warm_up(&self) -> Result<(), ServingError> {
        let inputs = self
            .spec
            .inputs
            .iter()
            .map(|input| {
                let shape: Vec<i64> = self
                    .spec
                    .client_shape(input)
                    .iter()
                    .map(|&d| d.max(1))
                    .collect();
                let count = crate::tensor::element_count(&shape).unwrap_or(0);
                let data = match input.dtype.size() {
                    Some(size) => TensorData::Fixed(vec![0u8; count * size].into()),
                    None => TensorData::Strings(vec![bytes::Bytes::new(); count]),
                };
                Tensor::new(input.name.clone(), input.dtype, shape, data)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request = InferRequest {
            id: "warm-up".into(),
            inputs,
            ..Default::default()
        };
        let _unrecorded = self.stats.unrecorded();
        self.run(request).await.map(|_| ())
    }

    /// Runs one request through validation, the batcher and the backend.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, ServingError> {
        let started = Instant::now();
        let result = self.run(request).await;
        match &result {
            Ok((_, queue)) => self.stats.request_succeeded(started.elapsed(), *queue),
            Err(e) => self.stats.request_failed(started.elapsed(), e.reason()),
        }
        result.map(|(response, _)| response)
    }

    async fn run(&self, request: InferRequest) -> Result<(InferResponse, Duration), ServingError> {
        let InferRequest {
            id,
            inputs,
            outputs: requested,
            priority,
            timeout,
            routing_key: _,
        } = request;
        let selected = self.select_outputs(&requested)?;
        let job = self.job(inputs)?;
        let options = SubmitOptions { priority, timeout };
        let done = self
            .batcher
            .submit(job, options)
            .await
            .map_err(|e| self.batch_error(e))?;
        let mut produced: Vec<Option<Tensor>> = done.output.into_iter().map(Some).collect();
        let mut outputs = Vec::with_capacity(selected.len());
        for (index, classification) in selected {
            let tensor = produced[index].take().ok_or_else(|| {
                ServingError::Internal(format!("output {index} was requested twice"))
            })?;
            outputs.push(match classification {
                Some(k) => classify(&tensor, k, self.spec.max_batch_size > 0)?,
                None => tensor,
            });
        }
        let response = InferResponse {
            model_name: self.spec.name.clone(),
            model_version: self.spec.version,
            id,
            outputs,
            variant: None,
        };
        Ok((response, done.queue))
    }

    /// Indices (into the spec's outputs) of the outputs to return, with classification counts.
    fn select_outputs(
        &self,
        requested: &[RequestedOutput],
    ) -> Result<Vec<(usize, Option<usize>)>, ServingError> {
        if requested.is_empty() {
            return Ok((0..self.spec.outputs.len()).map(|i| (i, None)).collect());
        }
        let mut selected: Vec<(usize, Option<usize>)> = Vec::with_capacity(requested.len());
        for output in requested {
            let (index, _) = self.spec.output(&output.name).ok_or_else(|| {
                ServingError::InvalidInput(format!(
                    "model '{}' has no output '{}' (outputs: {})",
                    self.spec.name,
                    output.name,
                    names(&self.spec.outputs)
                ))
            })?;
            if selected.iter().any(|(i, _)| *i == index) {
                return Err(ServingError::InvalidInput(format!(
                    "output '{}' is requested twice",
                    output.name
                )));
            }
            selected.push((index, output.classification));
        }
        Ok(selected)
    }

    /// Checks the inputs against the spec and orders them as the spec lists them.
    fn job(&self, inputs: Vec<Tensor>) -> Result<InferJob, ServingError> {
        let spec = &self.spec;
        let invalid = |message: String| ServingError::InvalidInput(message);
        let mut slots: Vec<Option<Tensor>> = vec![None; spec.inputs.len()];
        let mut rows: Option<(usize, String)> = None;
        for tensor in inputs {
            let (index, expected) = spec.input(&tensor.name).ok_or_else(|| {
                invalid(format!(
                    "model '{}' has no input '{}' (inputs: {})",
                    spec.name,
                    tensor.name,
                    names(&spec.inputs)
                ))
            })?;
            if slots[index].is_some() {
                return Err(invalid(format!("input '{}' is given twice", tensor.name)));
            }
            if tensor.dtype != expected.dtype {
                return Err(invalid(format!(
                    "input '{}' has datatype {}, model '{}' expects {}",
                    tensor.name, tensor.dtype, spec.name, expected.dtype
                )));
            }
            let client_shape = spec.client_shape(expected);
            let shape_ok = tensor.shape.len() == client_shape.len()
                && tensor
                    .shape
                    .iter()
                    .zip(&client_shape)
                    .all(|(&got, &want)| want == -1 || got == want);
            if !shape_ok {
                return Err(invalid(format!(
                    "input '{}' has shape {:?}, model '{}' expects {:?} (-1: any size)",
                    tensor.name, tensor.shape, spec.name, client_shape
                )));
            }
            if spec.max_batch_size > 0 {
                let batch = tensor.shape[0] as usize;
                if batch == 0 || batch > spec.max_batch_size {
                    return Err(invalid(format!(
                        "input '{}' has batch size {batch}, model '{}' accepts 1 to {}",
                        tensor.name, spec.name, spec.max_batch_size
                    )));
                }
                match &rows {
                    Some((first, first_name)) if *first != batch => {
                        return Err(invalid(format!(
                            "inputs disagree on the batch size: '{first_name}' has {first}, '{}' has {batch}",
                            tensor.name
                        )));
                    }
                    Some(_) => {}
                    None => rows = Some((batch, tensor.name.clone())),
                }
            }
            slots[index] = Some(tensor);
        }
        let inputs = slots
            .into_iter()
            .zip(&spec.inputs)
            .map(|(slot, expected)| {
                slot.ok_or_else(|| {
                    invalid(format!(
                        "missing input '{}' for model '{}' (inputs: {})",
                        expected.name,
                        spec.name,
                        names(&spec.inputs)
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InferJob {
            inputs,
            rows: rows.map_or(1, |(r, _)| r),
        })
    }

    fn batch_error(&self, error: BatchError<BackendError>) -> ServingError {
        let model = &self.spec.name;
        match error {
            BatchError::QueueFull { level, capacity } => ServingError::Overloaded {
                cause: crate::error::Overload::QueueFull,
                message: format!(
                    "model '{model}' is overloaded: its queue (priority level {level}) holds {capacity} requests; retry later"
                ),
            },
            BatchError::TimedOut { waited } => ServingError::Timeout(format!(
                "request for model '{model}' timed out after waiting {:.3} ms in the queue",
                waited.as_secs_f64() * 1e3
            )),
            BatchError::InvalidPriority { priority, levels } => {
                ServingError::InvalidInput(format!(
                    "priority {priority} is out of range: model '{model}' has priority levels 1 to {levels}"
                ))
            }
            e @ (BatchError::TooManyRows { .. } | BatchError::NoRows) => {
                ServingError::InvalidInput(e.to_string())
            }
            BatchError::Shutdown => {
                ServingError::Unavailable(format!("model '{model}' is being unloaded"))
            }
            BatchError::Executor(BackendError::InvalidInput(message)) => {
                ServingError::InvalidInput(message)
            }
            BatchError::Executor(e) => ServingError::Internal(format!("model '{model}': {e}")),
            BatchError::Internal(message) => {
                ServingError::Internal(format!("model '{model}': {message}"))
            }
        }
    }
}

fn names(tensors: &[TensorSpec]) -> String {
    let list: Vec<String> = tensors.iter().map(|t| format!("'{}'", t.name)).collect();
    list.join(", ")
}

/// Triton's classification extension: the top `k` entries of each batch item as
/// `"<value>:<index>"` strings, highest first.
fn classify(tensor: &Tensor, k: usize, batched: bool) -> Result<Tensor, ServingError> {
    if matches!(tensor.dtype, DataType::Bytes | DataType::Bool) {
        return Err(ServingError::InvalidInput(format!(
            "output '{}' of type {} cannot be classified; classification needs a numeric output",
            tensor.name, tensor.dtype
        )));
    }
    let values = tensor.to_json_values()?;
    let items = if batched {
        tensor.shape.first().copied().unwrap_or(1).max(1) as usize
    } else {
        1
    };
    let per_item = values.len() / items;
    let k = k.min(per_item);
    let mut classes = Vec::with_capacity(items * k);
    for item in values.chunks(per_item.max(1)).take(items) {
        let mut ranked: Vec<(usize, &serde_json::Value)> = item.iter().enumerate().collect();
        let number = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        ranked.sort_by(|a, b| number(b.1).total_cmp(&number(a.1)));
        for (index, value) in ranked.into_iter().take(k) {
            let text = if value.is_f64() {
                format!("{:.6}:{index}", number(value))
            } else {
                format!("{value}:{index}")
            };
            classes.push(bytes::Bytes::from(text.into_bytes()));
        }
    }
    let shape = if batched {
        vec![items as i64, k as i64]
    } else {
        vec![k as i64]
    };
    Ok(Tensor::new(
        tensor.name.clone(),
        DataType::Bytes,
        shape,
        TensorData::Strings(classes),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_ranks_each_batch_item() {
        let values: Vec<u8> = [0.1f32, 0.7, 0.2, 0.9, 0.05, 0.05]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = Tensor::new(
            "probs",
            DataType::Fp32,
            vec![2, 3],
            TensorData::Fixed(values.into()),
        )
        .unwrap();
        let c = classify(&t, 2, true).unwrap();
        assert_eq!(c.shape, vec![2, 2]);
        let TensorData::Strings(items) = c.data else {
            panic!()
        };
        let items: Vec<&[u8]> = items.iter().map(|b| b.as_ref()).collect();
        assert_eq!(
            items,
            vec![
                &b"0.700000:1"[..],
                b"0.200000:2",
                b"0.900000:0",
                b"0.050000:1"
            ]
        );
    }

    #[test]
    fn classification_of_integers_and_unbatched() {
        let values: Vec<u8> = [3i64, 9, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new(
            "s",
            DataType::Int64,
            vec![3],
            TensorData::Fixed(values.into()),
        )
        .unwrap();
        let c = classify(&t, 5, false).unwrap();
        assert_eq!(c.shape, vec![3]);
        let TensorData::Strings(items) = c.data else {
            panic!()
        };
        assert_eq!(items[0].as_ref(), b"9:1");
    }
}
