//! Backends run models. They see jobs made of tensors and return tensors; they know nothing of
//! HTTP, gRPC or model configuration files. ONNX Runtime is the one backend today.

pub mod onnx;

use std::time::Duration;

use crate::tensor::{DataType, Tensor};

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
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose.
    pub intra_op_threads: usize,
    /// ONNX Runtime inter-op threads; 0 lets ONNX Runtime choose.
    pub inter_op_threads: usize,
}

/// Which tensors an instance exchanges with jobs, in the order jobs carry them.
#[derive(Debug, Clone)]
pub struct Binding {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Whether the first dimension of inputs and outputs is the batch.
    pub batched: bool,
}

/// Where a batch's compute time went, as Triton's statistics split it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ComputeTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
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
