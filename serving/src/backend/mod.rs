//! Backends run models. They see jobs made of tensors and return tensors; they know nothing of
//! HTTP, gRPC or model configuration files. Each backend is a module behind one trait
//! (`Backend`: an artifact and an instance's placement in, a `Session` out; a session bound to
//! the tensors a spec names becomes an `Instance` the batcher runs). The model manager picks the
//! backend by the model's `Platform`: ONNX Runtime (`onnx.rs`) always, TorchScript through
//! libtorch (`torch.rs`) in builds with the `torch` feature.

pub mod onnx;
#[cfg(feature = "torch")]
pub mod torch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tensor::{DataType, Tensor, TensorData};

/// The model formats Marquee serves, named as Triton names their platforms and backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// ONNX through ONNX Runtime: platform `onnxruntime_onnx`, backend `onnxruntime`, `model.onnx`.
    Onnx,
    /// TorchScript through libtorch: platform `pytorch_libtorch`, backend `pytorch`, `model.pt`.
    Torch,
}

impl Platform {
    /// The platform a configuration names (by `platform` or `backend`). When it names neither,
    /// the model file's extension decides (`.pt`: TorchScript), else ONNX, as Marquee's own
    /// models and the registry's ONNX versions leave both out.
    pub fn of(platform: &str, backend: &str, model_filename: &str) -> Result<Self, String> {
        let known = [Self::Onnx, Self::Torch];
        let by_platform = known.iter().find(|p| p.platform_name() == platform);
        let by_backend = known.iter().find(|p| p.backend_name() == backend);
        match (platform, backend, by_platform, by_backend) {
            ("", "", _, _) if model_filename.ends_with(".pt") => Ok(Self::Torch),
            ("", "", _, _) => Ok(Self::Onnx),
            (_, "", Some(p), _) | ("", _, _, Some(p)) => Ok(*p),
            (_, _, Some(p), Some(b)) if p == b => Ok(*p),
            _ => Err(format!(
                "platform '{platform}' / backend '{backend}' is not served: Marquee serves ONNX (platform '{}', backend '{}') and TorchScript (platform '{}', backend '{}') models",
                Self::Onnx.platform_name(),
                Self::Onnx.backend_name(),
                Self::Torch.platform_name(),
                Self::Torch.backend_name(),
            )),
        }
    }

    /// The registry manifest's `framework` for this platform's artifacts.
    pub fn of_framework(framework: &str) -> Option<Self> {
        match framework {
            "onnx" => Some(Self::Onnx),
            "torchscript" => Some(Self::Torch),
            _ => None,
        }
    }

    pub fn platform_name(self) -> &'static str {
        match self {
            Self::Onnx => "onnxruntime_onnx",
            Self::Torch => "pytorch_libtorch",
        }
    }

    pub fn backend_name(self) -> &'static str {
        match self {
            Self::Onnx => "onnxruntime",
            Self::Torch => "pytorch",
        }
    }

    /// Triton's file name for a version's model when the configuration names none.
    pub fn default_model_filename(self) -> &'static str {
        match self {
            Self::Onnx => "model.onnx",
            Self::Torch => "model.pt",
        }
    }
}

/// A model's inputs and outputs, as its backend (or a manifest, or a configuration) gives them.
pub type Signature = (Vec<GraphTensor>, Vec<GraphTensor>);

/// A model runtime: makes one session per model instance from a version's artifact.
pub trait Backend: Send + Sync {
    fn session(
        &self,
        artifact: &[u8],
        config: &SessionConfig,
    ) -> Result<Box<dyn Session>, BackendError>;
}

/// A model loaded for one instance, not yet bound to a model specification.
pub trait Session: Send {
    /// The artifact's own inputs and outputs, for Triton-style auto-complete and validation;
    /// `None` where the format carries none (TorchScript): the configuration then declares them.
    fn signature(&self) -> Option<Signature>;

    /// Binds the session to the tensors the specification names, making it an instance.
    fn bind(
        self: Box<Self>,
        binding: &Binding,
        recorder: Arc<dyn ComputeRecorder>,
    ) -> Result<Instance, BackendError>;
}

/// Runs batches of jobs for one model instance, on the instance's own thread.
pub trait Execute: Send {
    /// Runs `jobs` as one batch and returns exactly one set of outputs per job, in order.
    fn execute(&mut self, jobs: &[InferJob]) -> Result<Vec<Vec<Tensor>>, BackendError>;
}

/// One model instance of any backend, as the batcher runs it. A concrete type (not a boxed
/// `Executor`), so futures that hold a `Batcher<Instance>` stay `Send`.
pub struct Instance(Box<dyn Execute>);

impl Instance {
    pub fn new(execute: impl Execute + 'static) -> Self {
        Self(Box::new(execute))
    }
}

impl marquee_batcher::Executor for Instance {
    type Job = InferJob;
    type Output = Vec<Tensor>;
    type Error = BackendError;

    fn execute(&mut self, jobs: &[InferJob]) -> Result<Vec<Vec<Tensor>>, BackendError> {
        self.0.execute(jobs)
    }
}

/// The backends of this process, one per platform it can serve.
pub struct Backends {
    onnx: onnx::OnnxRuntime,
    /// Started by the first TorchScript model: starting loads libtorch's CUDA libraries (about
    /// 150 MB resident), which a server without such models should not carry.
    #[cfg(feature = "torch")]
    torch: std::sync::OnceLock<torch::TorchBackend>,
}

impl Backends {
    pub fn new(onnx: onnx::OnnxRuntime) -> Self {
        Self {
            onnx,
            #[cfg(feature = "torch")]
            torch: std::sync::OnceLock::new(),
        }
    }

    /// The backend that runs `platform`'s models, or why this build has none.
    pub fn get(&self, platform: Platform) -> Result<&dyn Backend, BackendError> {
        match platform {
            Platform::Onnx => Ok(&self.onnx),
            #[cfg(feature = "torch")]
            Platform::Torch => Ok(self.torch.get_or_init(torch::TorchBackend::start)),
            #[cfg(not(feature = "torch"))]
            Platform::Torch => Err(BackendError::Runtime(
                "TorchScript models (platform 'pytorch_libtorch') need a build with the torch backend: cargo build --release --features marquee-serving/torch (deploy/setup.sh --torch installs libtorch)".into(),
            )),
        }
    }
}

/// One request's inputs, ordered as the model configuration lists them, ready for batching.
#[derive(Debug)]
pub struct InferJob {
    pub inputs: Vec<Tensor>,
    /// Rows this job adds to a batch (its first dimension; 1 for models that do not batch).
    pub rows: usize,
}

impl marquee_batcher::Job for InferJob {
    fn rows(&self) -> usize {
        self.rows
    }

    /// Requests batch together only when every input agrees beyond the batch dimension.
    fn can_batch_with(&self, first: &Self) -> bool {
        self.inputs
            .iter()
            .zip(&first.inputs)
            .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

/// A tensor of the model graph, as the backend reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphTensor {
    pub name: String,
    /// `None` when the graph's type is one the protocol cannot carry (maps, sequences, …).
    pub dtype: Option<DataType>,
    /// Dimensions; -1 where the graph leaves a dimension free.
    pub shape: Vec<i64>,
}

/// Where and how a session runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// CUDA device to run on; `None` for CPU.
    pub gpu: Option<i32>,
    /// Intra-op threads (ONNX Runtime's, or libtorch's); 0 lets the runtime choose.
    pub intra_op_threads: usize,
    /// Inter-op threads; 0 lets the runtime choose.
    pub inter_op_threads: usize,
    /// Whether ONNX Runtime's intra-op threads spin while they wait for work (its default: yes).
    /// Spinning cuts a small batch's wake-up latency and burns a core per waiting thread, which
    /// on cores the clients or the transports share is CPU taken from them. libtorch has no
    /// such setting.
    pub intra_op_spinning: Option<bool>,
}

/// Which tensors an instance exchanges with jobs, in the order jobs carry them.
#[derive(Debug, Clone)]
pub struct Binding {
    pub inputs: Vec<BoundTensor>,
    pub outputs: Vec<BoundTensor>,
    /// Whether the first dimension of inputs and outputs is the batch.
    pub batched: bool,
}

/// A tensor as the specification names and types it.
#[derive(Debug, Clone)]
pub struct BoundTensor {
    pub name: String,
    pub dtype: DataType,
    /// Its place in the model's signature (the artifact's, the manifest's or the declared
    /// one): backends that pass tensors by position (TorchScript) use it.
    pub position: usize,
}

/// Where a batch's compute time went, as Triton's statistics split it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ComputeTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

impl ComputeTimes {
    /// The split of a batch that started at `started`, had its inputs ready at `inputs_ready`
    /// and its outputs computed at `inferred`; the outputs are read until now.
    pub fn since(started: Instant, inputs_ready: Instant, inferred: Instant) -> Self {
        Self {
            input: inputs_ready - started,
            infer: inferred - inputs_ready,
            output: inferred.elapsed(),
        }
    }
}

/// Receives per-batch compute times from instances (for statistics and metrics).
pub trait ComputeRecorder: Send + Sync + 'static {
    fn record(&self, jobs: usize, rows: usize, times: ComputeTimes);
}

/// A backend failure, typed by whose fault it is.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// The runtime library could not be loaded or started.
    #[error("{0}")]
    Runtime(String),
    /// The model cannot be loaded or does not match its configuration.
    #[error("{0}")]
    Model(String),
    /// A request's data cannot be given to the model.
    #[error("{0}")]
    InvalidInput(String),
    /// Running the model failed.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// The shape of input `slot` of a batch of `jobs`: the jobs' rows summed in the first dimension.
pub(crate) fn batch_shape(jobs: &[InferJob], slot: usize, batched: bool) -> Vec<i64> {
    let mut shape = jobs[0].inputs[slot].shape.clone();
    if batched {
        shape[0] = jobs.iter().map(|j| j.inputs[slot].shape[0]).sum();
    }
    shape
}

/// Cuts a batched output into each job's rows; slices of one buffer, no copies.
pub(crate) fn split_rows(
    name: &str,
    dtype: DataType,
    shape: &[i64],
    data: TensorData,
    jobs: &[InferJob],
    rows: usize,
    per_job: &mut [Vec<Tensor>],
) -> Result<(), BackendError> {
    if shape.first().copied() != Some(rows as i64) {
        return Err(BackendError::Inference(format!(
            "output '{name}' has shape {shape:?}; a batching model must return {rows} rows first"
        )));
    }
    let row_elements: usize = shape[1..].iter().map(|&d| d as usize).product();
    let mut start_row = 0;
    for (job, out) in jobs.iter().zip(per_job.iter_mut()) {
        let (from, to) = (
            start_row * row_elements,
            (start_row + job.rows) * row_elements,
        );
        let part = match &data {
            TensorData::Fixed(bytes) => {
                let size = dtype.size().expect("fixed-size type");
                TensorData::Fixed(bytes.slice(from * size..to * size))
            }
            TensorData::Strings(items) => TensorData::Strings(items[from..to].to_vec()),
        };
        let mut job_shape = shape.to_vec();
        job_shape[0] = job.rows as i64;
        out.push(Tensor {
            name: name.to_string(),
            dtype,
            shape: job_shape,
            data: part,
        });
        start_row += job.rows;
    }
    Ok(())
}
