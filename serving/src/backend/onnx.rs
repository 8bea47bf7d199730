//! ONNX Runtime through `ort`, loaded at run time from the library the setup script installed.
//!
//! One `Session` per model instance: `Session::run` takes `&mut self`, and each instance lives on
//! its own batcher thread, so sessions are never shared. A batch is built by concatenating the
//! jobs' inputs along the batch dimension; outputs are cut back into each job's rows.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use half::{bf16, f16};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::{
    Backend, BackendError, Binding, ComputeRecorder, ComputeTimes, Execute, GraphTensor, InferJob,
    Instance, SessionConfig, Signature, batch_shape, split_rows,
};
use crate::tensor::{DataType, Tensor, TensorData};

/// The process-wide ONNX Runtime environment (one per process, as ONNX Runtime requires).
#[derive(Clone)]
pub struct OnnxRuntime {
    environment: ort::environment::Environment,
}

/// The environment of this process, once started; ONNX Runtime allows one per process.
static PROCESS_RUNTIME: std::sync::Mutex<Option<(std::path::PathBuf, OnnxRuntime)>> =
    std::sync::Mutex::new(None);

impl OnnxRuntime {
    /// Loads `libonnxruntime.so` from `library` and starts the environment; later calls in the
    /// same process share it (and must name the same library).
    pub fn load(library: &Path) -> Result<Self, BackendError> {
        let mut process = PROCESS_RUNTIME
            .lock()
            .map_err(|_| BackendError::Runtime("ONNX Runtime start-up panicked earlier".into()))?;
        if let Some((loaded, runtime)) = process.as_ref() {
            return if loaded == library {
                Ok(runtime.clone())
            } else {
                Err(BackendError::Runtime(format!(
                    "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
                    loaded.display(),
                    library.display()
                )))
            };
        }
        let runtime = Self::start(library)?;
        *process = Some((library.to_path_buf(), runtime.clone()));
        Ok(runtime)
    }

    fn start(library: &Path) -> Result<Self, BackendError> {
        let builder = ort::init_from(library).map_err(|e| {
            BackendError::Runtime(format!(
                "cannot load ONNX Runtime from {}: {e}",
                library.display()
            ))
        })?;
        let environment = builder
            .with_name("marquee")
            .build()
            .map_err(|e| BackendError::Runtime(format!("cannot start ONNX Runtime: {e}")))?;
        Ok(Self { environment })
    }
}

impl Backend for OnnxRuntime {
    /// Creates a session for one instance, on its device with its threads. The first session of
    /// a model also tells its signature, so a model is read once per instance, never more.
    fn session(
        &self,
        model: &[u8],
        config: &SessionConfig,
    ) -> Result<Box<dyn super::Session>, BackendError> {
        let failed = |e: String| {
            BackendError::Model(format!("ONNX Runtime cannot load the model: {}", e.trim()))
        };
        let mut builder = Session::builder(&self.environment).map_err(|e| failed(e.to_string()))?;
        if config.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(config.intra_op_threads)
                .map_err(|e| failed(e.to_string()))?;
        }
        if config.inter_op_threads > 0 {
            builder = builder
                .with_inter_threads(config.inter_op_threads)
                .map_err(|e| failed(e.to_string()))?;
        }
        if let Some(spinning) = config.intra_op_spinning {
            builder = builder
                .with_intra_op_spinning(spinning)
                .map_err(|e| failed(e.to_string()))?;
        }
        if let Some(device) = config.gpu {
            builder = with_cuda(builder, device)?;
        }
        let session = builder
            .commit_from_memory(model)
            .map_err(|e| failed(e.to_string()))?;
        Ok(Box::new(OnnxSession { session }))
    }
}

/// A session not yet bound to a model specification.
struct OnnxSession {
    session: Session,
}

impl super::Session for OnnxSession {
    /// The graph's inputs and outputs.
    fn signature(&self) -> Option<Signature> {
        let describe = |outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|o| GraphTensor {
                    name: o.name().to_string(),
                    dtype: o.dtype().tensor_type().and_then(data_type),
                    shape: o
                        .dtype()
                        .tensor_shape()
                        .map(|s| s.to_vec())
                        .unwrap_or_default(),
                })
                .collect()
        };
        Some((
            describe(self.session.inputs()),
            describe(self.session.outputs()),
        ))
    }

    fn bind(
        self: Box<Self>,
        binding: &Binding,
        recorder: Arc<dyn ComputeRecorder>,
    ) -> Result<Instance, BackendError> {
        let session = self.session;
        let input_slots =
            session
                .inputs()
                .iter()
                .map(|input| {
                    binding.inputs.iter().position(|t| t.name == input.name()).ok_or_else(|| {
                    BackendError::Model(format!(
                        "the model needs input '{}' but the configuration does not declare it",
                        input.name()
                    ))
                })
                })
                .collect::<Result<Vec<_>, _>>()?;
        for name in binding.outputs.iter().map(|t| &t.name) {
            if !session.outputs().iter().any(|o| o.name() == name) {
                return Err(BackendError::Model(format!(
                    "the configuration declares output '{name}' but the model has no such output"
                )));
            }
        }
        Ok(Instance::new(OnnxInstance {
            session,
            input_slots,
            outputs: binding.outputs.iter().map(|t| t.name.clone()).collect(),
            batched: binding.batched,
            recorder,
        }))
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    device: i32,
) -> Result<ort::session::builder::SessionBuilder, BackendError> {
    let cuda = ort::ep::CUDA::default()
        .with_device_id(device)
        .build()
        .error_on_failure();
    builder.with_execution_providers([cuda]).map_err(|e| {
        BackendError::Model(format!(
            "CUDA execution provider unavailable on GPU {device}: {e}"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _builder: ort::session::builder::SessionBuilder,
    device: i32,
) -> Result<ort::session::builder::SessionBuilder, BackendError> {
    Err(BackendError::Model(format!(
        "the configuration asks for GPU {device} but this build has no CUDA support (build with --features cuda)"
    )))
}

/// One model instance: a session and the mapping from configured tensors to the graph's.
struct OnnxInstance {
    session: Session,
    /// For each session input (graph order), its index in the job's inputs (configuration order).
    input_slots: Vec<usize>,
    /// Output names in configuration order; each job gets these back.
    outputs: Vec<String>,
    /// Whether the first dimension is the batch dimension (max_batch_size > 0).
    batched: bool,
    recorder: Arc<dyn ComputeRecorder>,
}

impl Execute for OnnxInstance {
    fn execute(&mut self, jobs: &[InferJob]) -> Result<Vec<Vec<Tensor>>, BackendError> {
        let started = Instant::now();
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        let values = self
            .input_slots
            .iter()
            .map(|&slot| batch_input(jobs, slot, self.batched))
            .collect::<Result<Vec<SessionInputValue<'static>>, _>>()?;
        let inputs_ready = Instant::now();
        let outputs = self
            .session
            .run(values.as_slice())
            .map_err(|e| BackendError::Inference(e.to_string().trim().to_string()))?;
        let inferred = Instant::now();
        let mut per_job: Vec<Vec<Tensor>> = jobs
            .iter()
            .map(|_| Vec::with_capacity(self.outputs.len()))
            .collect();
        for name in &self.outputs {
            let value = outputs.get(name).ok_or_else(|| {
                BackendError::Inference(format!("the model produced no output '{name}'"))
            })?;
            let (dtype, shape, data) = read_output(name, value)?;
            if self.batched {
                split_rows(name, dtype, &shape, data, jobs, rows, &mut per_job)?;
            } else {
                per_job[0].push(Tensor {
                    name: name.clone(),
                    dtype,
                    shape,
                    data,
                });
            }
        }
        drop(outputs);
        self.recorder.record(
            jobs.len(),
            rows,
            ComputeTimes::since(started, inputs_ready, inferred),
        );
        Ok(per_job)
    }
}

/// Concatenates input `slot` of every job along the batch dimension into one ONNX Runtime value.
fn batch_input(
    jobs: &[InferJob],
    slot: usize,
    batched: bool,
) -> Result<SessionInputValue<'static>, BackendError> {
    let first = &jobs[0].inputs[slot];
    let shape = batch_shape(jobs, slot, batched);
    let parts = jobs.iter().map(|j| &j.inputs[slot].data);
    let value = match first.dtype {
        DataType::Bytes => {
            let mut items = Vec::new();
            for part in parts {
                let TensorData::Strings(strings) = part else {
                    return Err(mismatch(&first.name));
                };
                for s in strings {
                    let text = std::str::from_utf8(s).map_err(|_| {
                        BackendError::InvalidInput(format!(
                            "input '{}' holds bytes that are not UTF-8; ONNX string tensors need UTF-8 text",
                            first.name
                        ))
                    })?;
                    items.push(text.to_string());
                }
            }
            OrtTensor::from_string_array((shape, items.as_slice()))
                .map(|t| t.into_dyn())
                .map_err(|e| BackendError::Inference(e.to_string()))?
        }
        DataType::Bool => {
            let mut items = Vec::new();
            for part in parts {
                let TensorData::Fixed(bytes) = part else {
                    return Err(mismatch(&first.name));
                };
                items.extend(bytes.iter().map(|&b| b != 0));
            }
            ort_value(shape, items)?
        }
        DataType::Uint8 => ort_value(shape, concat::<u8>(parts, &first.name)?)?,
        DataType::Uint16 => ort_value(shape, concat::<u16>(parts, &first.name)?)?,
        DataType::Uint32 => ort_value(shape, concat::<u32>(parts, &first.name)?)?,
        DataType::Uint64 => ort_value(shape, concat::<u64>(parts, &first.name)?)?,
        DataType::Int8 => ort_value(shape, concat::<i8>(parts, &first.name)?)?,
        DataType::Int16 => ort_value(shape, concat::<i16>(parts, &first.name)?)?,
        DataType::Int32 => ort_value(shape, concat::<i32>(parts, &first.name)?)?,
        DataType::Int64 => ort_value(shape, concat::<i64>(parts, &first.name)?)?,
        DataType::Fp16 => ort_value(shape, concat::<f16>(parts, &first.name)?)?,
        DataType::Bf16 => ort_value(shape, concat::<bf16>(parts, &first.name)?)?,
        DataType::Fp32 => ort_value(shape, concat::<f32>(parts, &first.name)?)?,
        DataType::Fp64 => ort_value(shape, concat::<f64>(parts, &first.name)?)?,
    };
    Ok(SessionInputValue::Owned(value))
}

fn mismatch(name: &str) -> BackendError {
    BackendError::InvalidInput(format!(
        "input '{name}' has data of the wrong kind for its type"
    ))
}

/// Copies the little-endian bytes of every part into one typed vector.
fn concat<'a, T: bytemuck::Pod>(
    parts: impl Iterator<Item = &'a TensorData> + Clone,
    name: &str,
) -> Result<Vec<T>, BackendError> {
    let mut total = 0;
    for part in parts.clone() {
        let TensorData::Fixed(bytes) = part else {
            return Err(mismatch(name));
        };
        total += bytes.len();
    }
    let size = std::mem::size_of::<T>();
    let mut values = vec![T::zeroed(); total / size];
    let target: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
    let mut at = 0;
    for part in parts {
        if let TensorData::Fixed(bytes) = part {
            target[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        }
    }
    Ok(values)
}

fn ort_value<T>(shape: Vec<i64>, values: Vec<T>) -> Result<DynValue, BackendError>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
{
    OrtTensor::from_array((shape, values))
        .map(|t| t.into_dyn())
        .map_err(|e| BackendError::Inference(e.to_string()))
}

/// Reads an output value into the server's tensor representation.
fn read_output(
    name: &str,
    value: &DynValue,
) -> Result<(DataType, Vec<i64>, TensorData), BackendError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(BackendError::Inference(format!(
            "output '{name}' is not a tensor ({}); only tensor outputs can be served",
            value.dtype()
        )));
    };
    let dtype = data_type(*ty).ok_or_else(|| {
        BackendError::Inference(format!(
            "output '{name}' has element type {ty}, which the protocol cannot carry"
        ))
    })?;
    let failed =
        |e: ort::Error| BackendError::Inference(format!("cannot read output '{name}': {e}"));
    macro_rules! fixed {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(failed)?;
            (
                shape.to_vec(),
                TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(data))),
            )
        }};
    }
    let (shape, data) = match dtype {
        DataType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(failed)?;
            let bytes: Vec<u8> = data.iter().map(|&b| b as u8).collect();
            (shape.to_vec(), TensorData::Fixed(bytes.into()))
        }
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(failed)?;
            (
                shape.to_vec(),
                TensorData::Strings(
                    strings
                        .into_iter()
                        .map(|s| Bytes::from(s.into_bytes()))
                        .collect(),
                ),
            )
        }
        DataType::Uint8 => fixed!(u8),
        DataType::Uint16 => fixed!(u16),
        DataType::Uint32 => fixed!(u32),
        DataType::Uint64 => fixed!(u64),
        DataType::Int8 => fixed!(i8),
        DataType::Int16 => fixed!(i16),
        DataType::Int32 => fixed!(i32),
        DataType::Int64 => fixed!(i64),
        DataType::Fp16 => fixed!(f16),
        DataType::Bf16 => fixed!(bf16),
        DataType::Fp32 => fixed!(f32),
        DataType::Fp64 => fixed!(f64),
    };
    Ok((dtype, shape, data))
}

/// The protocol type of an ONNX element type; `None` for types the protocol cannot carry.
fn data_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}
