//! TorchScript through libtorch (`tch`, cargo feature `torch`), with Triton's PyTorch-backend
//! conventions: platform `pytorch_libtorch` (or backend `pytorch`), `model.pt`, tensors declared in
//! the configuration. `forward` takes the inputs by position: inputs named `<name>__<n>`
//! (`INPUT__0`, …) go to argument n, others in the order the configuration lists them (tch
//! exposes no argument names, so Triton's matching by `forward`'s parameter names is not done).
//! `forward` may return one tensor, a tuple or a list of tensors; outputs named `<name>__<n>`
//! (`OUTPUT__0`, …) take element n, others the configuration's order.
//!
//! One module per instance, on its own batcher thread, on the CPU or one CUDA device; a batch is
//! the jobs' inputs concatenated along the first dimension, run once without autograd, and cut
//! back into each job's rows, exactly as the ONNX backend does.
//!
//! Tensors go through tch's safe API; the module itself through `script::Module`, a small
//! wrapper over torch-sys's C functions, because tch 0.26's `CModule::forward_is` leaks its
//! argument values (and with them the whole input batch) whenever `forward` throws, which any
//! client could make happen.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Kind};

use super::{
    Backend, BackendError, Binding, BoundTensor, ComputeRecorder, ComputeTimes, Execute, InferJob,
    Instance, Session, SessionConfig, Signature, batch_shape, split_rows,
};
use crate::tensor::{DataType, Tensor, TensorData};

/// libtorch, as one process uses it.
pub struct TorchBackend {
    /// The CUDA devices libtorch sees, or why it sees none.
    cuda: Result<i64, String>,
}

impl TorchBackend {
    /// Makes libtorch's CUDA support ready, where this libtorch has one.
    ///
    /// A binary linked with `--as-needed` (Rust's default) drops `libtorch_cuda.so`, since no
    /// symbol of it is called by name, and libtorch then reports no CUDA. It is loaded here, from
    /// beside the `libtorch_cpu.so` this process runs, before the first TorchScript model loads
    /// (`Backends` starts this backend then): its start-up registers kernels with libtorch's
    /// dispatcher, which must not happen while TorchScript models run, and libtorch remembers
    /// the first answer to "is there CUDA?".
    pub fn start() -> Self {
        let cuda = load_libtorch_cuda().and_then(|()| match tch::Cuda::device_count() {
            0 => Err("libtorch sees no CUDA device".to_string()),
            n => Ok(n),
        });
        Self { cuda }
    }
}

impl Backend for TorchBackend {
    fn session(
        &self,
        artifact: &[u8],
        config: &SessionConfig,
    ) -> Result<Box<dyn Session>, BackendError> {
        let device = match config.gpu {
            None => Device::Cpu,
            Some(gpu) => {
                let devices = self.cuda.clone().map_err(BackendError::Runtime)?;
                if gpu < 0 || i64::from(gpu) >= devices {
                    return Err(BackendError::Model(format!(
                        "the configuration asks for GPU {gpu} but libtorch sees {devices} CUDA device(s)"
                    )));
                }
                Device::Cuda(gpu as usize)
            }
        };
        let intra_op_threads = i32::try_from(config.intra_op_threads).map_err(|_| {
            BackendError::Model(format!(
                "intra-op thread count {} is too large",
                config.intra_op_threads
            ))
        })?;
        let module = script::Module::load(artifact, device).map_err(|e| {
            BackendError::Model(format!("libtorch cannot load the TorchScript model: {e}"))
        })?;
        Ok(Box::new(TorchSession {
            module,
            device,
            intra_op_threads,
        }))
    }
}

struct TorchSession {
    module: script::Module,
    device: Device,
    intra_op_threads: i32,
}

impl Session for TorchSession {
    /// TorchScript modules carry no signature tch can read: the configuration declares it.
    fn signature(&self) -> Option<Signature> {
        None
    }

    fn bind(
        self: Box<Self>,
        binding: &Binding,
        recorder: Arc<dyn ComputeRecorder>,
    ) -> Result<Instance, BackendError> {
        for tensor in binding.inputs.iter().chain(&binding.outputs) {
            kind(tensor.dtype).ok_or_else(|| {
                BackendError::Model(format!(
                    "'{}' is declared {}, which libtorch has no tensor type for",
                    tensor.name, tensor.dtype
                ))
            })?;
        }
        Ok(Instance::new(TorchInstance {
            module: self.module,
            device: self.device,
            threads: ThreadSetting::Pending(self.intra_op_threads),
            arguments: positions(Role::Argument, &binding.inputs)?,
            results: positions(Role::Result, &binding.outputs)?,
            inputs: binding.inputs.clone(),
            outputs: binding.outputs.clone(),
            batched: binding.batched,
            recorder,
        }))
    }
}

/// Inputs are `forward`'s arguments (all of them, each once); outputs pick from its results (any
/// of them, each once).
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Argument,
    Result,
}

/// Where each tensor goes among `forward`'s arguments or results: index n for names
/// `<name>__<n>` when every tensor is so named (Triton's convention), else its place in the
/// model's signature (the manifest's, or the configuration's order).
fn positions(role: Role, tensors: &[BoundTensor]) -> Result<Vec<usize>, BackendError> {
    let suffixes: Option<Vec<usize>> = tensors
        .iter()
        .map(|t| t.name.rsplit_once("__").and_then(|(_, n)| n.parse().ok()))
        .collect();
    let positions = suffixes.unwrap_or_else(|| tensors.iter().map(|t| t.position).collect());
    let limit = match role {
        Role::Argument => tensors.len(),
        Role::Result => usize::MAX,
    };
    let mut seen = std::collections::HashSet::new();
    for (tensor, &n) in tensors.iter().zip(&positions) {
        if n >= limit || !seen.insert(n) {
            return Err(BackendError::Model(match role {
                Role::Argument => format!(
                    "input '{}' takes argument {n}, but the {limit} inputs must take forward()'s arguments 0..{} once each",
                    tensor.name,
                    limit - 1
                ),
                Role::Result => format!(
                    "output '{}' takes result {n}, which another output takes too",
                    tensor.name
                ),
            }));
        }
    }
    Ok(positions)
}

/// libtorch's intra-op thread count belongs to the thread that runs the module, so an instance
/// sets it on its own thread before its first batch.
enum ThreadSetting {
    Pending(i32),
    Done,
}

struct TorchInstance {
    module: script::Module,
    device: Device,
    threads: ThreadSetting,
    /// For each configured input (job order), its position among `forward`'s arguments.
    arguments: Vec<usize>,
    /// For each configured output, its position among `forward`'s results.
    results: Vec<usize>,
    inputs: Vec<BoundTensor>,
    outputs: Vec<BoundTensor>,
    batched: bool,
    recorder: Arc<dyn ComputeRecorder>,
}

impl Execute for TorchInstance {
    fn execute(&mut self, jobs: &[InferJob]) -> Result<Vec<Vec<Tensor>>, BackendError> {
        if let ThreadSetting::Pending(threads) = self.threads {
            if threads > 0 {
                // libtorch sets a thread's count from a process-wide default the first time the
                // thread asks; asking first keeps another instance's later setting from
                // replacing this one.
                let _ = tch::get_num_threads();
                tch::set_num_threads(threads);
            }
            self.threads = ThreadSetting::Done;
        }
        let _no_autograd = tch::no_grad_guard();
        let started = Instant::now();
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        let mut arguments: Vec<Option<tch::Tensor>> =
            (0..self.inputs.len()).map(|_| None).collect();
        for (slot, &position) in self.arguments.iter().enumerate() {
            arguments[position] = Some(self.batch_input(jobs, slot)?);
        }
        let arguments: Vec<tch::Tensor> = arguments.into_iter().flatten().collect();
        let inputs_ready = Instant::now();
        let mut produced: Vec<Option<tch::Tensor>> = self
            .module
            .forward(&arguments)
            .map_err(BackendError::Inference)?
            .into_iter()
            .map(Some)
            .collect();
        let inferred = Instant::now();
        let mut per_job: Vec<Vec<Tensor>> = jobs
            .iter()
            .map(|_| Vec::with_capacity(self.outputs.len()))
            .collect();
        for (output, &position) in self.outputs.iter().zip(&self.results) {
            let tensor = produced.get_mut(position).and_then(Option::take).ok_or_else(|| {
                BackendError::Inference(format!(
                    "output '{}' is result {position} of forward(), which returned fewer results",
                    output.name
                ))
            })?;
            let (shape, data) = read_output(output, &tensor)?;
            if self.batched {
                split_rows(
                    &output.name,
                    output.dtype,
                    &shape,
                    data,
                    jobs,
                    rows,
                    &mut per_job,
                )?;
            } else {
                per_job[0].push(Tensor {
                    name: output.name.clone(),
                    dtype: output.dtype,
                    shape,
                    data,
                });
            }
        }
        self.recorder.record(
            jobs.len(),
            rows,
            ComputeTimes::since(started, inputs_ready, inferred),
        );
        Ok(per_job)
    }
}

impl TorchInstance {
    /// Input `slot` of every job, concatenated along the batch dimension, on the instance's
    /// device.
    fn batch_input(&self, jobs: &[InferJob], slot: usize) -> Result<tch::Tensor, BackendError> {
        let declared = &self.inputs[slot];
        let shape = batch_shape(jobs, slot, self.batched);
        let size = declared.dtype.size().unwrap_or(0);
        let mut length = 0;
        for job in jobs {
            let TensorData::Fixed(part) = &job.inputs[slot].data else {
                return Err(wrong_kind(&declared.name));
            };
            length += part.len();
        }
        // libtorch copies as many bytes as the shape asks for: the length must be checked here.
        let expected = crate::tensor::element_count(&shape).and_then(|n| n.checked_mul(size));
        if expected != Some(length) {
            return Err(wrong_kind(&declared.name));
        }
        let mut bytes = Vec::with_capacity(length);
        for job in jobs {
            if let TensorData::Fixed(part) = &job.inputs[slot].data {
                bytes.extend_from_slice(part);
            }
        }
        if declared.dtype == DataType::Bool {
            bytes.iter_mut().for_each(|b| *b = u8::from(*b != 0));
        }
        let kind = kind(declared.dtype).ok_or_else(|| wrong_kind(&declared.name))?;
        let tensor = tch::Tensor::f_from_data_size(&bytes, &shape, kind)
            .map_err(|e| BackendError::Inference(torch_message(&e)))?;
        match self.device {
            Device::Cpu => Ok(tensor),
            device => tensor
                .f_to_device(device)
                .map_err(|e| BackendError::Inference(torch_message(&e))),
        }
    }
}

fn wrong_kind(name: &str) -> BackendError {
    BackendError::InvalidInput(format!(
        "input '{name}' has data of the wrong kind or size for its type"
    ))
}

/// Copies a result to the CPU in the server's tensor representation; its type must be the one
/// the configuration declares (libtorch would otherwise answer clients in another type).
fn read_output(
    output: &BoundTensor,
    tensor: &tch::Tensor,
) -> Result<(Vec<i64>, TensorData), BackendError> {
    let failed = |e: tch::TchError| {
        BackendError::Inference(format!(
            "cannot read output '{}': {}",
            output.name,
            torch_message(&e)
        ))
    };
    let produced = tensor.f_kind().map_err(failed)?;
    if Some(produced) != kind(output.dtype) {
        return Err(BackendError::Inference(format!(
            "output '{}' is declared {} but forward() returned a {produced:?} tensor",
            output.name, output.dtype
        )));
    }
    let shape = tensor.size();
    let count = crate::tensor::element_count(&shape).unwrap_or(0);
    let size = output.dtype.size().unwrap_or(0);
    let mut data = vec![0u8; count * size];
    if count > 0 {
        tensor.f_copy_data_u8(&mut data, count).map_err(failed)?;
    }
    Ok((shape, TensorData::Fixed(Bytes::from(data))))
}

/// The libtorch element type of a protocol type; `None` for types libtorch has no tensors of.
fn kind(dtype: DataType) -> Option<Kind> {
    Some(match dtype {
        DataType::Bool => Kind::Bool,
        DataType::Uint8 => Kind::Uint8,
        DataType::Int8 => Kind::Int8,
        DataType::Int16 => Kind::Int16,
        DataType::Int32 => Kind::Int,
        DataType::Int64 => Kind::Int64,
        DataType::Fp16 => Kind::Half,
        DataType::Bf16 => Kind::BFloat16,
        DataType::Fp32 => Kind::Float,
        DataType::Fp64 => Kind::Double,
        DataType::Uint16 | DataType::Uint32 | DataType::Uint64 | DataType::Bytes => return None,
    })
}

/// A tch error's message, trimmed as `trim_backtrace` does.
fn torch_message(error: &tch::TchError) -> String {
    trim_backtrace(&error.to_string())
}

/// libtorch's message without what only its developers read: the C++ backtrace it appends, and
/// for errors inside TorchScript the interpreter's traceback (the last line is the error).
fn trim_backtrace(text: &str) -> String {
    let text = text.split("\nException raised from").next().unwrap_or(text);
    if text.contains("Traceback of TorchScript")
        && let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty())
    {
        return last.trim().to_string();
    }
    text.trim().to_string()
}

/// Loads `libtorch_cuda.so` from the folder of the `libtorch_cpu.so` this process runs.
fn load_libtorch_cuda() -> Result<(), String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps to find libtorch: {e}"))?;
    // Each line: address, permissions, offset, device, inode, then the path (which may hold
    // spaces).
    let cpu = maps
        .lines()
        .filter_map(|line| line.splitn(6, ' ').nth(5).map(str::trim))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .ok_or("libtorch_cpu.so is not loaded in this process")?;
    let cuda = std::path::Path::new(cpu).with_file_name("libtorch_cuda.so");
    if !cuda.is_file() {
        return Err(format!(
            "{} is absent: this libtorch has no CUDA",
            cuda.display()
        ));
    }
    let path = std::ffi::CString::new(cuda.as_os_str().as_encoded_bytes())
        .map_err(|_| "the libtorch path holds a NUL byte".to_string())?;
    // SAFETY: `path` is a valid C string; the library stays loaded for the life of the process
    // (the handle is never closed), as libtorch's CUDA registration requires.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let reason = unsafe { libc::dlerror() };
        let reason = if reason.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null dlerror results are NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(reason) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("cannot load {}: {reason}", cuda.display()));
    }
    Ok(())
}

/// A TorchScript module through torch-sys's C functions, freeing every value it creates on
/// every path (see the module comment for why not tch's `CModule`).
mod script {
    use std::ffi::{CStr, c_char, c_int};

    use tch::{Device, Tensor};
    use torch_sys::{C_tensor, CIValue, CModule_};

    /// `ati_tag` values (torch-sys's torch_api.cpp).
    const TAG_TENSOR: c_int = 1;
    const TAG_TUPLE: c_int = 5;
    const TAG_TENSOR_LIST: c_int = 10;
    const TAG_LIST: c_int = 12;

    pub struct Module(*mut CModule_);

    // SAFETY: a torch::jit::Module may move between threads; each `Module` is used by one
    // instance thread at a time (`forward` takes `&mut self`).
    unsafe impl Send for Module {}

    impl Drop for Module {
        fn drop(&mut self) {
            // SAFETY: the pointer came from atm_load_str_on_device and is freed once.
            unsafe { torch_sys::atm_free(self.0) }
        }
    }

    /// libtorch's last error on this thread, without the C++ backtrace it appends.
    fn last_error() -> Option<String> {
        // SAFETY: returns a strdup'ed C string (ours to free) or null.
        let raw = unsafe { torch_sys::get_and_reset_last_err() };
        if raw.is_null() {
            return None;
        }
        // SAFETY: non-null errors are NUL-terminated, allocated with malloc.
        let text = unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned();
        unsafe { libc::free(raw.cast()) };
        Some(super::trim_backtrace(&text))
    }

    fn checked<T>(value: T) -> Result<T, String> {
        match last_error() {
            Some(error) => Err(error),
            None => Ok(value),
        }
    }

    /// Values this call created, freed when it returns, whatever the path.
    struct Owned(Vec<*mut CIValue>);

    impl Drop for Owned {
        fn drop(&mut self) {
            for value in self.0.drain(..) {
                if !value.is_null() {
                    // SAFETY: each pointer was made by torch-sys for this call and is freed once.
                    unsafe { torch_sys::ati_free(value) }
                }
            }
        }
    }

    impl Module {
        /// Loads a saved TorchScript module onto `device`, in evaluation mode.
        pub fn load(artifact: &[u8], device: Device) -> Result<Self, String> {
            let device = match device {
                Device::Cpu => -1,
                Device::Cuda(index) => index as c_int,
                other => return Err(format!("device {other:?} is not served")),
            };
            // SAFETY: the bytes outlive the call, which copies them.
            let raw = unsafe {
                torch_sys::atm_load_str_on_device(
                    artifact.as_ptr() as *const c_char,
                    artifact.len(),
                    device,
                )
            };
            let raw = checked(raw)?;
            if raw.is_null() {
                return Err("libtorch returned no module".into());
            }
            let module = Self(raw);
            // SAFETY: a live module pointer.
            unsafe { torch_sys::atm_eval(module.0) };
            checked(module)
        }

        /// Runs `forward` on `arguments`; its result as tensors (one tensor, or each element
        /// of a tuple or list, which must all be tensors).
        pub fn forward(&mut self, arguments: &[Tensor]) -> Result<Vec<Tensor>, String> {
            let mut owned = Owned(Vec::with_capacity(arguments.len() + 1));
            for argument in arguments {
                // SAFETY: the tensor outlives the call; the value made holds its own reference.
                let value = unsafe { torch_sys::ati_tensor(argument.as_ptr() as *mut C_tensor) };
                owned.0.push(value);
                checked(())?;
            }
            let count = c_int::try_from(arguments.len()).map_err(|_| "too many arguments")?;
            // SAFETY: a live module and `count` live argument values.
            let result = unsafe { torch_sys::atm_forward_(self.0, owned.0.as_ptr(), count) };
            owned.0.push(result);
            checked(())?;
            tensors(result, &mut owned)
        }
    }

    fn tensor(value: *mut CIValue) -> Result<Tensor, String> {
        // SAFETY: a live value; the tensor made is owned by the returned `Tensor`.
        let raw = unsafe { torch_sys::ati_to_tensor(value) };
        let raw = checked(raw)?;
        // SAFETY: a new tensor pointer, owned from here on.
        Ok(unsafe { Tensor::from_ptr(raw) })
    }

    fn tag(value: *mut CIValue) -> Result<c_int, String> {
        // SAFETY: a live value.
        checked(unsafe { torch_sys::ati_tag(value) })
    }

    fn tensors(result: *mut CIValue, owned: &mut Owned) -> Result<Vec<Tensor>, String> {
        let length = |value| {
            // SAFETY: a live tuple or list value.
            checked(unsafe { torch_sys::ati_length(value) }).and_then(|n| {
                usize::try_from(n).map_err(|_| "libtorch gave a negative length".to_string())
            })
        };
        match tag(result)? {
            TAG_TENSOR => Ok(vec![tensor(result)?]),
            TAG_TENSOR_LIST => {
                let n = length(result)?;
                let mut raw: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); n];
                // SAFETY: `raw` has room for the list's `n` tensors.
                unsafe { torch_sys::ati_to_tensor_list(result, raw.as_mut_ptr(), n as c_int) };
                checked(())?;
                // SAFETY: each pointer is a new tensor, owned from here on.
                Ok(raw
                    .into_iter()
                    .map(|t| unsafe { Tensor::from_ptr(t) })
                    .collect())
            }
            kind @ (TAG_TUPLE | TAG_LIST) => {
                let n = length(result)?;
                let mut items: Vec<*mut CIValue> = vec![std::ptr::null_mut(); n];
                // SAFETY: `items` has room for the `n` elements.
                unsafe {
                    if kind == TAG_TUPLE {
                        torch_sys::ati_to_tuple(result, items.as_mut_ptr(), n as c_int)
                    } else {
                        torch_sys::ati_to_generic_list(result, items.as_mut_ptr(), n as c_int)
                    }
                };
                owned.0.extend_from_slice(&items);
                checked(())?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, &item)| match tag(item)? {
                        TAG_TENSOR => tensor(item),
                        _ => Err(format!("result {i} of forward() is not a tensor")),
                    })
                    .collect()
            }
            _ => Err("forward() returned neither a tensor nor a tuple or list of tensors".into()),
        }
    }
}
