//! `marquee serve`'s configuration: one typed struct, filled from flags and environment (clap) or
//! from a file (serde), with Triton's defaults where Triton has one.

use std::net::IpAddr;
use std::path::PathBuf;

use marquee_feature_store::redis_store::DEFAULT_TIMEOUT_MS;
use serde::Deserialize;

use crate::model::ModelDefaults;

/// How to run the server.
#[derive(Debug, Clone, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model_repository", "registry"])))]
pub struct ServeConfig {
    /// Triton model repository, served as it is: a folder or a URL (file://, s3://, gs://).
    #[arg(long, env = "MARQUEE_MODEL_REPOSITORY")]
    pub model_repository: Option<String>,

    /// Marquee registry: serves what the aliases point at (production answers requests that name
    /// no version), reloading as they move.
    #[arg(long, env = "MARQUEE_REGISTRY")]
    pub registry: Option<String>,

    /// Object-store option for the registry or repository, `key=value` with object_store's keys
    /// (e.g. aws_endpoint=http://…); the environment (AWS_*, GOOGLE_*) is read too (repeatable).
    #[arg(long = "store-option")]
    pub store_options: Vec<String>,

    /// How often to look for registry changes, in seconds (one listing per model).
    #[arg(long, default_value_t = 5.0)]
    pub registry_poll_seconds: f64,

    /// Also serve this registry version whatever the aliases say: MODEL:VERSION (repeatable).
    #[arg(long = "pin")]
    pub pins: Vec<String>,

    /// Feature definitions (TOML) that `/v1/predict` pipelines read from; none: pipelines use
    /// request features only.
    #[arg(long, env = "MARQUEE_FEATURES")]
    pub features: Option<PathBuf>,

    /// Online feature store: `memory` (in-process) or `redis://host:port/db`.
    #[arg(long, env = "MARQUEE_ONLINE_STORE", default_value = "memory")]
    pub online_store: String,

    /// Before serving, copy the latest offline values of every feature view with an offline
    /// source into the online store (the in-process store starts empty: how the quick start
    /// serves a generated world's features).
    #[arg(long)]
    pub materialize: bool,

    /// Longest wait for the online store per request, in milliseconds; past it `/v1/predict`
    /// answers with defaults, flagged as degraded.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    pub online_timeout_ms: u64,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// KServe v2 REST port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,

    /// KServe v2 gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,

    /// Prometheus metrics port (0 picks a free one).
    #[arg(long, default_value_t = 8002)]
    pub metrics_port: u16,

    /// Serve the operator's routes (canary deployments, traffic policies) on this port only,
    /// not on the REST port (0 picks a free one); unset, they are on the REST port. Until the
    /// server has authentication, this keeps rollouts off the address clients reach. Model
    /// repository control (`/v2/repository`, gRPC) stays where Triton's clients call it.
    #[arg(long, env = "MARQUEE_ADMIN_PORT")]
    pub admin_port: Option<u16>,

    /// libonnxruntime.so to load; by default the one deploy/setup.sh installed.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,

    /// Largest request body (REST) or message (gRPC) accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Inference and prediction requests in flight at once, all clients together; past it a
    /// request is answered 503 / UNAVAILABLE at once, with a retry hint. The default is the
    /// example models' queue size: at 512 a 30 ms stall of a busy machine (15,000 requests/s)
    /// already turned requests away that the queues would have held (`bench/soak.py`).
    #[arg(long, default_value_t = 4096)]
    pub max_concurrent_requests: usize,

    /// Threads of the async runtime (transports, pre/post-processing); 0: one per core. Model
    /// instances run on threads of their own, so on a small machine fewer runtime threads leave
    /// the instances their cores and cut wake-ups between threads. 1 runs tokio's single-threaded
    /// scheduler (the least CPU per inference, while one core keeps up with the transports); more
    /// run the multi-threaded one without its LIFO slot. Either way the answers of a batch leave
    /// in one write per connection.
    #[arg(long, env = "MARQUEE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Most instances one `/v1/predict` request may carry (413 past it).
    #[arg(long, default_value_t = 1024)]
    pub max_predict_instances: usize,

    /// Requests one gRPC stream may have in flight; further messages wait to be read.
    #[arg(long, default_value_t = 64)]
    pub grpc_stream_window: usize,

    /// max_batch_size given to models that can batch and whose configuration sets none
    /// (Triton's auto-complete default); 0 turns auto-batching off.
    #[arg(long, default_value_t = 4)]
    pub default_max_batch_size: i32,

    /// Queue bound for models whose configuration sets no max_queue_size (Triton would leave
    /// the queue unbounded; Marquee never does).
    #[arg(long, default_value_t = 1024)]
    pub default_max_queue_size: usize,

    /// ONNX Runtime intra-op threads per instance when the model sets none; 0 lets ONNX Runtime
    /// choose.
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Whether ONNX Runtime's intra-op threads spin while they wait for work, where the model
    /// does not say (`session.intra_op.allow_spinning`); unset keeps ONNX Runtime's default
    /// (spin). `false` saves the CPU the spinning burns on cores shared with clients.
    #[arg(long)]
    pub intra_op_spinning: Option<bool>,

    /// Where the prediction log and domain events go: `none`, `parquet` (files by hour under
    /// --events-dir) or `kafka` (--event-brokers).
    #[arg(long, value_enum, env = "MARQUEE_EVENT_SINK", default_value_t = EventSinkKind::None)]
    pub event_sink: EventSinkKind,

    /// Folder of the Parquet event files, and of the spill (records waiting for the sink to
    /// take them) for either sink.
    #[arg(long, default_value = ".marquee/events")]
    pub events_dir: PathBuf,

    /// Kafka brokers for `--event-sink kafka`, `host:port[,host:port…]`.
    #[arg(long, env = "MARQUEE_EVENT_BROKERS")]
    pub event_brokers: Option<String>,

    /// Put before every Kafka topic name (`marquee.predictions`, `marquee.events.model`, …).
    #[arg(long, default_value = "marquee.")]
    pub event_topic_prefix: String,

    /// A librdkafka property for the event sink, `key=value` (repeatable): security, acks,
    /// compression, `message.timeout.ms`…
    #[arg(long = "event-kafka-option")]
    pub event_kafka_options: Vec<String>,

    /// Share of `/v1/predict` requests whose answers are logged, in [0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub prediction_log_sample: f64,

    /// Share of `/v2` inference requests (REST and gRPC) logged with their tensors, in [0, 1];
    /// 0 logs none.
    #[arg(long, default_value_t = 1.0)]
    pub inference_log_sample: f64,

    /// Records the event log holds in memory; while the sink is slow or down they go to the
    /// spill folder, and past both bounds they are dropped (and counted).
    #[arg(long, default_value_t = 65_536)]
    pub event_buffer: usize,

    /// Bound of the spill folder, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub event_spill_max_mb: u64,

    /// Longest a Parquet event file stays open; its records are readable once it closes (and
    /// when the log has been idle for a second).
    #[arg(long, default_value_t = 300.0)]
    pub event_file_roll_seconds: f64,

    /// Rows a drift window closes at (per model version); 0 turns the drift monitor off.
    #[arg(long, env = "MARQUEE_DRIFT_WINDOW_ROWS", default_value_t = 1000)]
    pub drift_window_rows: usize,

    /// Longest a drift window stays open once it has --drift-min-window-rows.
    #[arg(long, default_value_t = 300.0)]
    pub drift_window_seconds: f64,

    /// Rows a drift window needs before time may close it.
    #[arg(long, default_value_t = 100)]
    pub drift_min_window_rows: usize,

    /// First rows that become the baseline of a version whose manifest has none (flagged).
    #[arg(long, default_value_t = 1000)]
    pub drift_reference_rows: usize,

    /// Share of drifting columns from which a window counts as dataset drift, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub drift_share: f64,

    /// `model=command`: a shell command to start when a window of the model drifts after one
    /// that did not (e.g. `pricing=marquee train pricing ...`); repeatable. It gets
    /// MARQUEE_DRIFT_MODEL, MARQUEE_DRIFT_VERSION and MARQUEE_DRIFT_REPORT (JSON).
    #[arg(long = "drift-command")]
    pub drift_commands: Vec<String>,
}

/// The event log's sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSinkKind {
    /// Nothing is logged.
    None,
    /// Parquet files by hour on local disk.
    Parquet,
    Kafka,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_repository: None,
            registry: None,
            store_options: Vec::new(),
            registry_poll_seconds: 5.0,
            pins: Vec::new(),
            features: None,
            online_store: "memory".into(),
            materialize: false,
            online_timeout_ms: DEFAULT_TIMEOUT_MS,
            host: IpAddr::from([0, 0, 0, 0]),
            http_port: 8000,
            grpc_port: 8001,
            metrics_port: 8002,
            admin_port: None,
            ort_library: None,
            max_request_bytes: 64 * 1024 * 1024,
            max_concurrent_requests: 4096,
            worker_threads: 0,
            max_predict_instances: 1024,
            grpc_stream_window: 64,
            default_max_batch_size: 4,
            default_max_queue_size: 1024,
            intra_op_threads: 0,
            intra_op_spinning: None,
            event_sink: EventSinkKind::None,
            events_dir: PathBuf::from(".marquee/events"),
            event_brokers: None,
            event_topic_prefix: "marquee.".into(),
            event_kafka_options: Vec::new(),
            prediction_log_sample: 1.0,
            inference_log_sample: 1.0,
            event_buffer: 65_536,
            event_spill_max_mb: 1024,
            event_file_roll_seconds: 300.0,
            drift_window_rows: 1000,
            drift_window_seconds: 300.0,
            drift_min_window_rows: 100,
            drift_reference_rows: 1000,
            drift_share: 0.5,
            drift_commands: Vec::new(),
        }
    }
}

impl ServeConfig {
    pub fn model_defaults(&self) -> ModelDefaults {
        ModelDefaults {
            max_batch_size: self.default_max_batch_size,
            max_queue_size: self.default_max_queue_size.max(1),
            intra_op_threads: self.intra_op_threads,
            intra_op_spinning: self.intra_op_spinning,
        }
    }
}
