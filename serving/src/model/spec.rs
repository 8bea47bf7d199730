//! From a Triton model configuration and the model's signature to the typed `ModelSpec` serving
//! runs on.
//!
//! Completion follows Triton's ONNX auto-complete: what the configuration leaves out (inputs,
//! outputs, dims, `max_batch_size` for graphs whose first dimension is free) is filled from the
//! graph; what it states is checked against the graph. A TorchScript model carries no signature,
//! so, as for Triton's PyTorch backend, its configuration (or its registry manifest) declares the
//! tensors. Fields Marquee does not act on produce a warning and are otherwise ignored; fields
//! that would change results if ignored are refused.

use std::collections::HashMap;
use std::time::Duration;

use marquee_batcher::{BatchPolicy, QueuePolicy};
use marquee_proto::ModelConfig;
use marquee_proto::inference::model_config::SchedulingChoice;
use marquee_proto::inference::model_instance_group::Kind;
use marquee_proto::inference::model_queue_policy::TimeoutAction;
use marquee_proto::inference::{
    self, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOutput, ModelQueuePolicy,
};

use crate::backend::{GraphTensor, Platform, SessionConfig, Signature};
use crate::tensor::DataType;

/// Server-wide defaults that apply where a model configuration says nothing.
#[derive(Debug, Clone)]
pub struct ModelDefaults {
    /// `max_batch_size` given to a graph that can batch when its configuration sets none.
    pub max_batch_size: i32,
    /// Queue bound used when a configuration leaves `max_queue_size` at 0 (Triton: unbounded).
    pub max_queue_size: usize,
    /// Intra-op threads (ONNX Runtime's, libtorch's) when the configuration sets none.
    pub intra_op_threads: usize,
    /// Whether ONNX Runtime's intra-op threads spin, when the configuration does not say
    /// (`None`: ONNX Runtime's default).
    pub intra_op_spinning: Option<bool>,
}

/// One input or output as clients must send or will receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    /// Dimensions without the batch dimension; -1 accepts any size.
    pub dims: Vec<i64>,
}

/// Everything serving needs to run one model version.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    /// 0 means the model does not batch: requests carry full shapes.
    pub max_batch_size: usize,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub batching: BatchPolicy,
    /// One entry per instance to start.
    pub instances: Vec<SessionConfig>,
    /// The completed configuration, as `/v2/models/{m}/config` reports it.
    pub config: ModelConfig,
}

impl ModelSpec {
    pub fn input(&self, name: &str) -> Option<(usize, &TensorSpec)> {
        self.inputs.iter().enumerate().find(|(_, t)| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<(usize, &TensorSpec)> {
        self.outputs
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
    }

    /// Whether an input leaves a dimension (beyond the batch) to the request.
    pub fn has_free_dims(&self) -> bool {
        self.inputs.iter().any(|t| t.dims.contains(&-1))
    }

    /// The shape clients see: dims with a leading -1 when the model batches.
    pub fn client_shape(&self, tensor: &TensorSpec) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1)
                .chain(tensor.dims.iter().copied())
                .collect()
        } else {
            tensor.dims.clone()
        }
    }
}

/// The platform that serves a configuration's model.
pub fn platform(config: &ModelConfig) -> Result<Platform, String> {
    Platform::of(
        &config.platform,
        &config.backend,
        &config.default_model_filename,
    )
}

/// The file that holds a version's model (the platform's default unless the configuration
/// names one).
pub fn model_filename(config: &ModelConfig) -> &str {
    if config.default_model_filename.is_empty() {
        platform(config)
            .unwrap_or(Platform::Onnx)
            .default_model_filename()
    } else {
        &config.default_model_filename
    }
}

/// The signature a configuration declares, for models whose artifact carries none: every input
/// and output with its data type and dims (the batch dimension added when the model batches).
pub fn declared_signature(config: &ModelConfig) -> Result<Signature, String> {
    if config.input.is_empty() || config.output.is_empty() {
        return Err(
            "a TorchScript model carries no signature: declare every input and output (name, data_type, dims) in its configuration".into(),
        );
    }
    let batch: &[i64] = if config.max_batch_size > 0 {
        &[-1]
    } else {
        &[]
    };
    let tensor = |role: &str, name: &str, data_type: i32, dims: &[i64]| {
        let dtype = data_type_from_config(data_type).ok_or_else(|| {
            format!("{role} '{name}' needs a data_type (TYPE_FP32, TYPE_INT64, …)")
        })?;
        if dims.is_empty() {
            return Err(format!("{role} '{name}' needs dims"));
        }
        Ok(GraphTensor {
            name: name.to_string(),
            dtype: Some(dtype),
            shape: batch.iter().chain(dims).copied().collect(),
        })
    };
    let inputs = config
        .input
        .iter()
        .map(|t| tensor("input", &t.name, t.data_type, &t.dims))
        .collect::<Result<_, _>>()?;
    let outputs = config
        .output
        .iter()
        .map(|t| tensor("output", &t.name, t.data_type, &t.dims))
        .collect::<Result<_, _>>()?;
    Ok((inputs, outputs))
}

/// Checks what can be checked before the artifact is read: backend, scheduling, name.
pub fn check_config(name: &str, config: &ModelConfig) -> Result<(), String> {
    if !config.name.is_empty() && config.name != name {
        return Err(format!(
            "configuration name '{}' does not match the model folder '{name}'",
            config.name
        ));
    }
    platform(config)?;
    match &config.scheduling_choice {
        Some(SchedulingChoice::SequenceBatching(_)) => {
            return Err("sequence batching (stateful models) is not supported".into());
        }
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err("ensemble models are not supported".into());
        }
        _ => {}
    }
    if config
        .model_transaction_policy
        .as_ref()
        .is_some_and(|p| p.decoupled)
    {
        return Err("decoupled models (several responses per request) are not supported".into());
    }
    if config.max_batch_size < 0 {
        return Err(format!(
            "max_batch_size {} is negative",
            config.max_batch_size
        ));
    }
    Ok(())
}

/// The versions to serve among those present, by the configuration's version policy
/// (Triton's default: the latest one).
pub fn select_versions(config: &ModelConfig, present: &[u64]) -> Vec<u64> {
    use inference::model_version_policy::PolicyChoice;
    match config
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
    {
        Some(PolicyChoice::All(_)) => present.to_vec(),
        Some(PolicyChoice::Specific(s)) => present
            .iter()
            .copied()
            .filter(|v| s.versions.contains(&(*v as i64)))
            .collect(),
        Some(PolicyChoice::Latest(l)) => {
            let n = (l.num_versions.max(1)) as usize;
            present[present.len().saturating_sub(n)..].to_vec()
        }
        None => present.last().copied().into_iter().collect(),
    }
}

/// Completes `config` from the graph and builds the spec. Returns warnings about fields that are
/// ignored.
pub fn build_spec(
    name: &str,
    version: u64,
    mut config: ModelConfig,
    graph_inputs: &[GraphTensor],
    graph_outputs: &[GraphTensor],
    defaults: &ModelDefaults,
) -> Result<(ModelSpec, Vec<String>), String> {
    check_config(name, &config)?;
    let mut warnings = ignored_fields(&config);
    config.name = name.to_string();
    let platform = platform(&config)?;
    if platform == Platform::Torch {
        torch_checks(&config, &mut warnings)?;
    }
    config.platform = platform.platform_name().to_string();
    config.backend = platform.backend_name().to_string();
    if config.default_model_filename.is_empty() {
        config.default_model_filename = platform.default_model_filename().to_string();
    }

    let graph_can_batch = graph_inputs
        .iter()
        .chain(graph_outputs)
        .all(|t| t.shape.first() == Some(&-1));
    if config.max_batch_size == 0
        && config.input.is_empty()
        && config.output.is_empty()
        && graph_can_batch
        && defaults.max_batch_size > 0
    {
        config.max_batch_size = defaults.max_batch_size;
        if config.scheduling_choice.is_none() {
            config.scheduling_choice = Some(SchedulingChoice::DynamicBatching(
                ModelDynamicBatching::default(),
            ));
        }
    }
    let batched = config.max_batch_size > 0;
    if batched && !graph_can_batch {
        let fixed = graph_inputs
            .iter()
            .chain(graph_outputs)
            .find(|t| t.shape.first() != Some(&-1))
            .map(|t| t.name.clone())
            .unwrap_or_default();
        return Err(format!(
            "max_batch_size is {} but the graph's '{fixed}' has no free first dimension to batch on; set max_batch_size: 0",
            config.max_batch_size
        ));
    }

    let inputs = complete_tensors("input", &mut config.input, graph_inputs, batched)?;
    let outputs = complete_tensors("output", &mut config.output, graph_outputs, batched)?;

    let instances = complete_instances(name, &mut config, defaults)?;
    for key in config.parameters.keys() {
        let known = [
            INTRA_OP_THREADS,
            INTER_OP_THREADS,
            INTRA_OP_SPINNING,
            LATENCY_BUDGET,
            WAIT_ONLY_FOR_COMPANY,
        ];
        if !known.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            warnings.push(format!("parameter '{key}' is ignored"));
        }
    }
    let batching = batch_policy(&config, defaults, &mut warnings)?;
    let spec = ModelSpec {
        name: name.to_string(),
        version,
        max_batch_size: config.max_batch_size as usize,
        inputs,
        outputs,
        batching,
        instances,
        config,
    };
    Ok((spec, warnings))
}

/// The model parameters that set thread counts: Triton's ONNX Runtime backend names them in lower
/// case, its PyTorch backend in upper case (`INTRA_OP_THREAD_COUNT`); either spelling is taken.
const INTRA_OP_THREADS: &str = "intra_op_thread_count";
const INTER_OP_THREADS: &str = "inter_op_thread_count";
/// Whether ONNX Runtime's intra-op threads spin while waiting: its own session option's name,
/// `0` or `1` (also `false` / `true`).
const INTRA_OP_SPINNING: &str = "session.intra_op.allow_spinning";
/// At most this many instances per model: each is a thread with its own copy of the model.
const MAX_INSTANCES: usize = 256;
/// Beyond Triton: a p99 latency target (queue wait plus compute, milliseconds) that makes the
/// queue delay adaptive, between zero and `max_queue_delay_microseconds`.
const LATENCY_BUDGET: &str = "latency_budget_ms";
/// Beyond Triton: `1` waits out the queue delay only while another request is likely to arrive in
/// it, so a lone caller is not kept waiting for company that never comes.
const WAIT_ONLY_FOR_COMPANY: &str = "wait_only_for_company";

/// What a TorchScript configuration cannot ask for. Nothing checks a TorchScript model's dims
/// against a graph, so `reshape` would silently feed the model other shapes: refused. libtorch's
/// inter-op thread count is one per process and fixed once used: not applied, said so.
fn torch_checks(config: &ModelConfig, warnings: &mut Vec<String>) -> Result<(), String> {
    if config.input.iter().any(|i| i.reshape.is_some())
        || config.output.iter().any(|o| o.reshape.is_some())
    {
        return Err("reshape is not supported for TorchScript models: declare the dims forward() takes and returns".into());
    }
    let not_applied = [
        (
            INTER_OP_THREADS,
            "libtorch has one inter-op pool per process",
        ),
        (INTRA_OP_SPINNING, "an ONNX Runtime setting"),
    ];
    for (key, why) in not_applied {
        if parameter(config, key).is_some() {
            warnings.push(format!(
                "parameter {key} is not applied to TorchScript models ({why})"
            ));
        }
    }
    Ok(())
}

/// The text of the model parameter `key`, its name in either case.
fn parameter<'a>(config: &'a ModelConfig, key: &str) -> Option<&'a str> {
    config
        .parameters
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, p)| p.string_value.as_str())
}

/// A switch given as a model parameter: `0` or `1`, also `false` or `true`.
fn boolean_parameter(key: &str, text: &str) -> Result<bool, String> {
    match text.trim() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        other => Err(format!("parameter {key} must be 0 or 1, got '{other}'")),
    }
}

/// The sessions to create for a model, one per instance, from its `instance_group` and thread
/// parameters. Needs no artifact, so sessions can be made before the graph is inspected.
pub fn session_configs(
    name: &str,
    config: &ModelConfig,
    defaults: &ModelDefaults,
) -> Result<Vec<SessionConfig>, String> {
    complete_instances(name, &mut config.clone(), defaults)
}

/// Fills the defaults of `instance_group` in place and returns one session per instance.
fn complete_instances(
    name: &str,
    config: &mut ModelConfig,
    defaults: &ModelDefaults,
) -> Result<Vec<SessionConfig>, String> {
    let thread_parameter = |key: &str| -> Result<Option<usize>, String> {
        parameter(config, key)
            .map(|text| {
                text.trim()
                    .parse()
                    .map_err(|_| format!("parameter {key} must be a whole number, got '{text}'"))
            })
            .transpose()
    };
    let intra_op_threads = thread_parameter(INTRA_OP_THREADS)?.unwrap_or(defaults.intra_op_threads);
    let inter_op_threads = thread_parameter(INTER_OP_THREADS)?.unwrap_or(0);
    let intra_op_spinning = parameter(config, INTRA_OP_SPINNING)
        .map(|text| boolean_parameter(INTRA_OP_SPINNING, text))
        .transpose()?
        .or(defaults.intra_op_spinning);
    let session = |gpu: Option<i32>| SessionConfig {
        gpu,
        intra_op_threads,
        inter_op_threads,
        intra_op_spinning,
    };
    if config.instance_group.is_empty() {
        config.instance_group.push(ModelInstanceGroup {
            kind: default_kind() as i32,
            count: 1,
            ..Default::default()
        });
    }
    let mut instances = Vec::new();
    for group in &mut config.instance_group {
        if group.name.is_empty() {
            group.name = name.to_string();
        }
        if group.count == 0 {
            group.count = 1;
        }
        if group.count < 0 {
            return Err(format!("instance_group count {} is negative", group.count));
        }
        let kind = Kind::try_from(group.kind).unwrap_or(Kind::Auto);
        let kind = if kind == Kind::Auto {
            default_kind()
        } else {
            kind
        };
        group.kind = kind as i32;
        let devices = if kind == Kind::Gpu {
            group.gpus.len().max(1)
        } else {
            1
        };
        let group_instances = group.count as usize * devices;
        if instances.len() + group_instances > MAX_INSTANCES {
            return Err(format!(
                "instance_group asks for more than {MAX_INSTANCES} instances (each one a thread with its own copy of the model)"
            ));
        }
        match kind {
            Kind::Cpu => instances.extend((0..group.count).map(|_| session(None))),
            Kind::Gpu => {
                if group.gpus.is_empty() {
                    group.gpus.push(0);
                }
                for &gpu in &group.gpus {
                    instances.extend((0..group.count).map(|_| session(Some(gpu))));
                }
            }
            Kind::Model | Kind::Auto => {
                return Err(
                    "instance_group kind KIND_MODEL is not supported; use KIND_CPU or KIND_GPU"
                        .into(),
                );
            }
        }
    }
    Ok(instances)
}

fn default_kind() -> Kind {
    if cfg!(feature = "cuda") {
        Kind::Gpu
    } else {
        Kind::Cpu
    }
}

/// Graph dims as clients see them: the batch dimension removed when the model batches.
fn client_dims(graph: &GraphTensor, batched: bool) -> Vec<i64> {
    let dims = if batched {
        &graph.shape[1..]
    } else {
        &graph.shape[..]
    };
    dims.iter().map(|&d| if d < 0 { -1 } else { d }).collect()
}

fn graph_dtype(graph: &GraphTensor, role: &str) -> Result<DataType, String> {
    graph.dtype.ok_or_else(|| {
        format!(
            "{role} '{}' is not a tensor type the protocol can carry (maps and sequences are not served)",
            graph.name
        )
    })
}

/// What input and output declarations share, so one function completes and checks both.
trait Declared: Default {
    fn new(name: &str, data_type: inference::DataType, dims: Vec<i64>) -> Self;
    fn name(&self) -> &str;
    fn data_type(&self) -> i32;
    fn dims_mut(&mut self) -> &mut Vec<i64>;
}

/// `ModelInput` and `ModelOutput` carry the same three fields under the same names.
macro_rules! declared {
    ($message:ty) => {
        impl Declared for $message {
            fn new(name: &str, data_type: inference::DataType, dims: Vec<i64>) -> Self {
                Self {
                    name: name.to_string(),
                    data_type: data_type as i32,
                    dims,
                    ..Default::default()
                }
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn data_type(&self) -> i32 {
                self.data_type
            }
            fn dims_mut(&mut self) -> &mut Vec<i64> {
                &mut self.dims
            }
        }
    };
}
declared!(ModelInput);
declared!(ModelOutput);

/// Fills the declarations from the graph when there are none, else checks each against the graph.
/// Inputs must all be declared; outputs may be a subset.
fn complete_tensors<T: Declared>(
    role: &str,
    declared: &mut Vec<T>,
    graph: &[GraphTensor],
    batched: bool,
) -> Result<Vec<TensorSpec>, String> {
    if declared.is_empty() {
        for g in graph {
            let dtype = config_data_type(graph_dtype(g, role)?);
            declared.push(T::new(&g.name, dtype, client_dims(g, batched)));
        }
    }
    let mut specs = Vec::with_capacity(declared.len());
    for tensor in declared.iter_mut() {
        let name = tensor.name().to_string();
        let g = graph.iter().find(|g| g.name == name).ok_or_else(|| {
            format!(
                "{role} '{name}' is not in the model; the graph has {}",
                names(graph)
            )
        })?;
        let data_type = tensor.data_type();
        let dtype = check_tensor(role, &name, data_type, tensor.dims_mut(), g, batched)?;
        specs.push(TensorSpec {
            name,
            dtype,
            dims: tensor.dims_mut().clone(),
        });
    }
    if role == "input"
        && let Some(missing) = graph
            .iter()
            .find(|g| !declared.iter().any(|d| d.name() == g.name))
    {
        return Err(format!(
            "the model needs input '{}' but the configuration does not declare it",
            missing.name
        ));
    }
    Ok(specs)
}

/// Checks one declared tensor against the graph; fills dims when the configuration gives none.
fn check_tensor(
    role: &str,
    name: &str,
    data_type: i32,
    dims: &mut Vec<i64>,
    graph: &GraphTensor,
    batched: bool,
) -> Result<DataType, String> {
    let graph_type = graph_dtype(graph, role)?;
    let declared = if data_type == inference::DataType::TypeInvalid as i32 {
        graph_type
    } else {
        data_type_from_config(data_type)
            .ok_or_else(|| format!("{role} '{name}' has an unknown data_type {data_type}"))?
    };
    if declared != graph_type {
        return Err(format!(
            "{role} '{name}' is declared {} but the model has {}",
            config_type_name(declared),
            config_type_name(graph_type)
        ));
    }
    let graph_dims = client_dims(graph, batched);
    if dims.is_empty() {
        dims.clone_from(&graph_dims);
    }
    let compatible = dims.len() == graph_dims.len()
        && dims
            .iter()
            .zip(&graph_dims)
            .all(|(&d, &g)| g == -1 || d == g);
    if !compatible {
        return Err(format!(
            "{role} '{name}' is declared with dims {dims:?} but the model has {graph_dims:?}{}",
            if batched {
                " (batch dimension excluded)"
            } else {
                ""
            }
        ));
    }
    Ok(declared)
}

fn names(graph: &[GraphTensor]) -> String {
    let list: Vec<String> = graph.iter().map(|g| format!("'{}'", g.name)).collect();
    list.join(", ")
}

fn batch_policy(
    config: &ModelConfig,
    defaults: &ModelDefaults,
    warnings: &mut Vec<String>,
) -> Result<BatchPolicy, String> {
    let max_batch_size = config.max_batch_size as usize;
    let Some(SchedulingChoice::DynamicBatching(dynamic)) = &config.scheduling_choice else {
        // Triton's default scheduler: each request executes alone.
        let mut policy = BatchPolicy::new(max_batch_size, defaults.max_queue_size);
        policy.dynamic_batching = false;
        for key in [LATENCY_BUDGET, WAIT_ONLY_FOR_COMPANY] {
            if parameter(config, key).is_some() {
                warnings.push(format!(
                    "parameter {key} is ignored: the model does not batch dynamically"
                ));
            }
        }
        return Ok(policy);
    };
    let mut policy = BatchPolicy::new(max_batch_size, defaults.max_queue_size);
    policy.dynamic_batching = max_batch_size > 0;
    policy.preferred_batch_sizes = dynamic
        .preferred_batch_size
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| format!("preferred_batch_size {s} is negative")))
        .collect::<Result<_, _>>()?;
    policy.max_queue_delay = Duration::from_micros(dynamic.max_queue_delay_microseconds);
    policy.priority_levels = u32::try_from(dynamic.priority_levels.max(1))
        .map_err(|_| format!("priority_levels {} is too large", dynamic.priority_levels))?;
    policy.default_priority_level = if dynamic.default_priority_level == 0 {
        policy.priority_levels
    } else {
        u32::try_from(dynamic.default_priority_level).map_err(|_| {
            format!(
                "default_priority_level {} is too large",
                dynamic.default_priority_level
            )
        })?
    };
    if let Some(queue) = &dynamic.default_queue_policy {
        policy.default_queue_policy = queue_policy(queue, defaults, warnings);
    }
    policy.priority_queue_policy = dynamic
        .priority_queue_policy
        .iter()
        .map(|(&level, queue)| {
            let level =
                u32::try_from(level).map_err(|_| format!("priority level {level} is too large"))?;
            Ok((level, queue_policy(queue, defaults, warnings)))
        })
        .collect::<Result<HashMap<_, _>, String>>()?;
    if let Some(budget) = parameter(config, LATENCY_BUDGET) {
        let ms: f64 = budget
            .trim()
            .parse()
            .ok()
            .filter(|ms: &f64| ms.is_finite() && *ms > 0.0 && *ms <= 3_600_000.0)
            .ok_or_else(|| {
                format!(
                    "parameter {LATENCY_BUDGET} must be a positive number of milliseconds, got '{budget}'"
                )
            })?;
        if policy.dynamic_batching {
            policy.latency_budget = Some(Duration::from_secs_f64(ms / 1_000.0));
        } else {
            warnings.push(format!(
                "parameter {LATENCY_BUDGET} is ignored: the model does not batch dynamically"
            ));
        }
    }
    if let Some(text) = parameter(config, WAIT_ONLY_FOR_COMPANY) {
        let on = boolean_parameter(WAIT_ONLY_FOR_COMPANY, text)?;
        if policy.dynamic_batching {
            policy.wait_only_for_company = on;
        } else if on {
            warnings.push(format!(
                "parameter {WAIT_ONLY_FOR_COMPANY} is ignored: the model does not batch dynamically"
            ));
        }
    }
    if dynamic.preserve_ordering {
        warnings.push(
            "dynamic_batching.preserve_ordering is ignored: each response goes to its own caller"
                .into(),
        );
    }
    policy
        .validate()
        .map_err(|e| format!("dynamic_batching: {e}"))?;
    Ok(policy)
}

fn queue_policy(
    queue: &ModelQueuePolicy,
    defaults: &ModelDefaults,
    warnings: &mut Vec<String>,
) -> QueuePolicy {
    if queue.timeout_action == TimeoutAction::Delay as i32 {
        warnings.push(
            "queue policy timeout_action DELAY is not supported; timed-out requests are rejected"
                .into(),
        );
    }
    QueuePolicy {
        max_queue_size: if queue.max_queue_size == 0 {
            defaults.max_queue_size
        } else {
            queue.max_queue_size as usize
        },
        default_timeout: (queue.default_timeout_microseconds > 0)
            .then(|| Duration::from_micros(queue.default_timeout_microseconds)),
        allow_timeout_override: queue.allow_timeout_override,
    }
}

/// Fields that are parsed but not acted on, named so users know.
fn ignored_fields(config: &ModelConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut ignored = |set: bool, what: &str| {
        if set {
            warnings.push(format!("{what} is not supported and is ignored"));
        }
    };
    ignored(config.optimization.is_some(), "optimization");
    ignored(!config.model_warmup.is_empty(), "model_warmup");
    ignored(
        config.response_cache.is_some_and(|c| c.enable),
        "response_cache",
    );
    ignored(!config.batch_input.is_empty(), "batch_input");
    ignored(!config.batch_output.is_empty(), "batch_output");
    ignored(!config.cc_model_filenames.is_empty(), "cc_model_filenames");
    ignored(!config.metric_tags.is_empty(), "metric_tags");
    ignored(config.model_operations.is_some(), "model_operations");
    ignored(
        config.model_repository_agents.is_some(),
        "model_repository_agents",
    );
    ignored(config.model_metrics.is_some(), "model_metrics");
    ignored(!config.runtime.is_empty(), "runtime");
    ignored(
        config.input.iter().any(|i| i.reshape.is_some())
            || config.output.iter().any(|o| o.reshape.is_some()),
        "reshape",
    );
    ignored(
        config.input.iter().any(|i| i.optional),
        "optional inputs (every input is required)",
    );
    ignored(
        config.input.iter().any(|i| i.allow_ragged_batch),
        "allow_ragged_batch",
    );
    ignored(
        config
            .instance_group
            .iter()
            .any(|g| g.rate_limiter.is_some()),
        "instance_group rate_limiter",
    );
    ignored(
        config.output.iter().any(|o| !o.label_filename.is_empty()),
        "label_filename",
    );
    warnings
}

pub fn data_type_from_config(value: i32) -> Option<DataType> {
    use inference::DataType as C;
    Some(match C::try_from(value).ok()? {
        C::TypeBool => DataType::Bool,
        C::TypeUint8 => DataType::Uint8,
        C::TypeUint16 => DataType::Uint16,
        C::TypeUint32 => DataType::Uint32,
        C::TypeUint64 => DataType::Uint64,
        C::TypeInt8 => DataType::Int8,
        C::TypeInt16 => DataType::Int16,
        C::TypeInt32 => DataType::Int32,
        C::TypeInt64 => DataType::Int64,
        C::TypeFp16 => DataType::Fp16,
        C::TypeFp32 => DataType::Fp32,
        C::TypeFp64 => DataType::Fp64,
        C::TypeString => DataType::Bytes,
        C::TypeBf16 => DataType::Bf16,
        C::TypeInvalid => return None,
    })
}

pub fn config_data_type(dtype: DataType) -> inference::DataType {
    use inference::DataType as C;
    match dtype {
        DataType::Bool => C::TypeBool,
        DataType::Uint8 => C::TypeUint8,
        DataType::Uint16 => C::TypeUint16,
        DataType::Uint32 => C::TypeUint32,
        DataType::Uint64 => C::TypeUint64,
        DataType::Int8 => C::TypeInt8,
        DataType::Int16 => C::TypeInt16,
        DataType::Int32 => C::TypeInt32,
        DataType::Int64 => C::TypeInt64,
        DataType::Fp16 => C::TypeFp16,
        DataType::Fp32 => C::TypeFp32,
        DataType::Fp64 => C::TypeFp64,
        DataType::Bytes => C::TypeString,
        DataType::Bf16 => C::TypeBf16,
    }
}

fn config_type_name(dtype: DataType) -> &'static str {
    config_data_type(dtype).as_str_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ModelDefaults {
        ModelDefaults {
            max_batch_size: 4,
            max_queue_size: 100,
            intra_op_threads: 0,
            intra_op_spinning: None,
        }
    }

    fn graph(name: &str, dtype: DataType, shape: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            dtype: Some(dtype),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn no_config_completes_like_triton_autocomplete() {
        let inputs = [graph("X", DataType::Fp32, &[-1, 10])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let (spec, warnings) = build_spec(
            "m",
            1,
            ModelConfig::default(),
            &inputs,
            &outputs,
            &defaults(),
        )
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(spec.max_batch_size, 4);
        assert!(spec.batching.dynamic_batching);
        assert_eq!(spec.inputs[0].dims, vec![10]);
        assert_eq!(spec.client_shape(&spec.inputs[0]), vec![-1, 10]);
        assert_eq!(spec.instances.len(), 1);
        assert_eq!(spec.instances[0].gpu, None);
        assert_eq!(spec.config.platform, "onnxruntime_onnx");
        assert_eq!(spec.batching.default_queue_policy.max_queue_size, 100);
    }

    #[test]
    fn fixed_first_dimension_means_no_batching() {
        let inputs = [graph("X", DataType::Int64, &[1, 3])];
        let outputs = [graph("y", DataType::Fp32, &[1])];
        let (spec, _) = build_spec(
            "m",
            1,
            ModelConfig::default(),
            &inputs,
            &outputs,
            &defaults(),
        )
        .unwrap();
        assert_eq!(spec.max_batch_size, 0);
        assert_eq!(spec.inputs[0].dims, vec![1, 3]);
        assert!(!spec.batching.dynamic_batching);
    }

    #[test]
    fn declared_tensors_are_checked_against_the_graph() {
        let inputs = [graph("X", DataType::Fp32, &[-1, 10])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let mut config = marquee_proto::parse_config_text(
            "max_batch_size: 8\ninput [ { name: \"X\", data_type: TYPE_FP64, dims: [ 10 ] } ]",
        )
        .unwrap();
        let err = build_spec("m", 1, config.clone(), &inputs, &outputs, &defaults()).unwrap_err();
        assert!(
            err.contains("declared TYPE_FP64 but the model has TYPE_FP32"),
            "{err}"
        );
        config.input[0].data_type = inference::DataType::TypeFp32 as i32;
        config.input[0].dims = vec![9];
        let err = build_spec("m", 1, config.clone(), &inputs, &outputs, &defaults()).unwrap_err();
        assert!(err.contains("dims [9] but the model has [10]"), "{err}");
        config.input[0].name = "Z".into();
        let err = build_spec("m", 1, config, &inputs, &outputs, &defaults()).unwrap_err();
        assert!(
            err.contains("input 'Z' is not in the model; the graph has 'X'"),
            "{err}"
        );
    }

    #[test]
    fn a_latency_budget_parameter_makes_the_delay_adaptive() {
        let inputs = [graph("X", DataType::Fp32, &[-1, 10])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let with = |budget: &str| {
            let text = format!(
                "max_batch_size: 8\ndynamic_batching {{ max_queue_delay_microseconds: 4000 }}\nparameters {{ key: \"latency_budget_ms\" value {{ string_value: \"{budget}\" }} }}"
            );
            let config = marquee_proto::parse_config_text(&text).unwrap();
            build_spec("m", 1, config, &inputs, &outputs, &defaults())
        };
        let (spec, warnings) = with("12.5").unwrap();
        assert_eq!(
            spec.batching.latency_budget,
            Some(Duration::from_micros(12_500))
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        for bad in ["0", "-3", "soon", "NaN"] {
            let err = with(bad).unwrap_err();
            assert!(
                err.contains("latency_budget_ms must be a positive number"),
                "{err}"
            );
        }
    }

    #[test]
    fn wait_only_for_company_is_a_switch_of_dynamic_batching() {
        let inputs = [graph("X", DataType::Fp32, &[-1, 10])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let with = |batching: &str, value: &str| {
            let text = format!(
                "max_batch_size: 8\n{batching}\nparameters {{ key: \"wait_only_for_company\" value {{ string_value: \"{value}\" }} }}"
            );
            let config = marquee_proto::parse_config_text(&text).unwrap();
            build_spec("m", 1, config, &inputs, &outputs, &defaults())
        };
        let dynamic = "dynamic_batching { max_queue_delay_microseconds: 2000 }";
        for (value, on) in [("1", true), ("true", true), ("0", false), ("false", false)] {
            let (spec, warnings) = with(dynamic, value).unwrap();
            assert_eq!(spec.batching.wait_only_for_company, on, "{value}");
            assert!(warnings.is_empty(), "{warnings:?}");
        }
        let err = with(dynamic, "sometimes").unwrap_err();
        assert!(
            err.contains("wait_only_for_company must be 0 or 1, got 'sometimes'"),
            "{err}"
        );
        let (spec, warnings) = with("", "1").unwrap();
        assert!(!spec.batching.wait_only_for_company);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("wait_only_for_company is ignored")),
            "{warnings:?}"
        );
    }

    #[test]
    fn batching_config_becomes_the_batch_policy() {
        let inputs = [graph("X", DataType::Fp32, &[-1, 10])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let config = marquee_proto::parse_config_text(
            r#"
            max_batch_size: 32
            dynamic_batching {
              preferred_batch_size: [ 8, 16 ]
              max_queue_delay_microseconds: 250
              priority_levels: 2
              default_queue_policy { default_timeout_microseconds: 5000 allow_timeout_override: true }
              priority_queue_policy { key: 1 value { max_queue_size: 7 } }
              preserve_ordering: true
            }
            instance_group [ { count: 2 kind: KIND_CPU } ]
            parameters { key: "intra_op_thread_count" value { string_value: "1" } }
            optimization { graph { level: 1 } }
            "#,
        )
        .unwrap();
        let (spec, warnings) = build_spec("m", 3, config, &inputs, &outputs, &defaults()).unwrap();
        let b = &spec.batching;
        assert_eq!(b.max_batch_size, 32);
        assert_eq!(b.preferred_batch_sizes, vec![8, 16]);
        assert_eq!(b.max_queue_delay, Duration::from_micros(250));
        assert_eq!(b.priority_levels, 2);
        assert_eq!(b.default_priority_level, 2);
        assert_eq!(
            b.default_queue_policy.default_timeout,
            Some(Duration::from_millis(5))
        );
        assert_eq!(b.default_queue_policy.max_queue_size, 100);
        assert_eq!(b.priority_queue_policy[&1].max_queue_size, 7);
        let cpu_one_thread = SessionConfig {
            gpu: None,
            intra_op_threads: 1,
            inter_op_threads: 0,
            intra_op_spinning: None,
        };
        assert_eq!(spec.instances, vec![cpu_one_thread.clone(), cpu_one_thread]);
        assert!(warnings.iter().any(|w| w.contains("optimization")));
        assert!(warnings.iter().any(|w| w.contains("preserve_ordering")));
    }

    /// ONNX Runtime's spinning is the model's to set, else the server's, else ONNX Runtime's.
    #[test]
    fn intra_op_spinning_comes_from_the_model_then_the_server() {
        let config = |parameters: &str| {
            marquee_proto::parse_config_text(&format!(
                "instance_group [ {{ count: 1 kind: KIND_CPU }} ] {parameters}"
            ))
            .unwrap()
        };
        let spinning = |config: &ModelConfig, server: Option<bool>| {
            let defaults = ModelDefaults {
                intra_op_spinning: server,
                ..defaults()
            };
            session_configs("m", config, &defaults).map(|s| s[0].intra_op_spinning)
        };
        let off = config(
            r#"parameters { key: "session.intra_op.allow_spinning" value { string_value: "0" } }"#,
        );
        assert_eq!(spinning(&off, None), Ok(Some(false)));
        assert_eq!(
            spinning(&off, Some(true)),
            Ok(Some(false)),
            "the model's word first"
        );
        assert_eq!(spinning(&config(""), Some(false)), Ok(Some(false)));
        assert_eq!(spinning(&config(""), None), Ok(None));
        let bad = config(
            r#"parameters { key: "session.intra_op.allow_spinning" value { string_value: "maybe" } }"#,
        );
        assert!(
            spinning(&bad, None)
                .unwrap_err()
                .contains("must be 0 or 1, got 'maybe'")
        );
        let inputs = [graph("x", DataType::Fp32, &[-1, 2])];
        let outputs = [graph("y", DataType::Fp32, &[-1, 1])];
        let (_, warnings) = build_spec("m", 1, off, &inputs, &outputs, &defaults()).unwrap();
        assert!(
            warnings.iter().all(|w| !w.contains("allow_spinning")),
            "{warnings:?}"
        );
    }

    #[test]
    fn unsupported_schedulers_and_backends_are_refused() {
        let seq = marquee_proto::parse_config_text("sequence_batching { }").unwrap();
        assert!(
            check_config("m", &seq)
                .unwrap_err()
                .contains("sequence batching")
        );
        let tf = marquee_proto::parse_config_text("platform: \"tensorflow_savedmodel\"").unwrap();
        assert!(check_config("m", &tf).unwrap_err().contains("ONNX"));
        let torch = marquee_proto::parse_config_text("backend: \"pytorch\"").unwrap();
        assert_eq!(platform(&torch), Ok(Platform::Torch));
        assert_eq!(model_filename(&torch), "model.pt");
        let mixed = marquee_proto::parse_config_text(
            "platform: \"pytorch_libtorch\" backend: \"onnxruntime\"",
        )
        .unwrap();
        assert!(check_config("m", &mixed).is_err());
        let named = marquee_proto::parse_config_text("name: \"other\"").unwrap();
        assert!(
            check_config("m", &named)
                .unwrap_err()
                .contains("does not match")
        );
    }

    #[test]
    fn version_policies_pick_versions() {
        let present = [1, 2, 5];
        let latest2 =
            marquee_proto::parse_config_text("version_policy { latest { num_versions: 2 } }")
                .unwrap();
        assert_eq!(select_versions(&latest2, &present), vec![2, 5]);
        let all = marquee_proto::parse_config_text("version_policy { all { } }").unwrap();
        assert_eq!(select_versions(&all, &present), vec![1, 2, 5]);
        let specific =
            marquee_proto::parse_config_text("version_policy { specific { versions: [1, 4] } }")
                .unwrap();
        assert_eq!(select_versions(&specific, &present), vec![1]);
        assert_eq!(select_versions(&ModelConfig::default(), &present), vec![5]);
    }
}
