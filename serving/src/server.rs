//! Starts the three listeners (REST, gRPC, metrics) over one model manager, and stops them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::collections::BTreeMap;
use std::time::Duration;

use marquee_registry::{ModelRepository, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::backend::Backends;
use crate::backend::onnx::OnnxRuntime;
use crate::config::{EventSinkKind, ServeConfig};
use crate::drift::{DriftConfig, DriftMonitor};
use crate::error::ServingError;
use crate::grpc::InferenceService;
use crate::http::AdminRoutes;
use crate::metrics::Metrics;
use crate::models::ModelManager;
use crate::predict::Predictor;
use crate::prediction_log::PredictionLog;
use crate::service::{Limits, Service};
use crate::source::ModelSource;
use marquee_events::{EventLog, KafkaConfig, KafkaSink, LogConfig, ParquetSink, Sink};
use marquee_feature_store::{Definitions, OnlineStore, open_online};

/// What `/v2` and gRPC `ServerMetadata` report.
pub struct ServerInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: &'static [&'static str],
}

impl ServerInfo {
    pub fn marquee() -> Self {
        Self {
            name: "marquee",
            version: env!("CARGO_PKG_VERSION"),
            extensions: &[
                "classification",
                "model_repository",
                "schedule_policy",
                "model_configuration",
                "binary_tensor_data",
                "parameters",
                "statistics",
            ],
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
    #[error("model repository: {0}")]
    Repository(#[from] marquee_registry::RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Models(ServingError),
}

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// The operator's routes' own address, with `--admin-port`.
    admin_addr: Option<SocketAddr>,
    models: Arc<ModelManager>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    events: Option<EventLog>,
}

impl Server {
    /// Loads the repository's models and starts listening. Models that fail to load are reported
    /// and leave the server not ready; the others serve.
    pub async fn start(config: &ServeConfig) -> Result<Self, StartError> {
        let library = locate_onnxruntime(config.ort_library.as_deref())?;
        let runtime =
            OnnxRuntime::load(&library).map_err(|e| StartError::Runtime(e.to_string()))?;
        let source = model_source(config)?;
        let polls = source.is_registry();
        let metrics = Arc::new(Metrics::new());
        let (features, online) = feature_store(config).await?;
        let models = Arc::new(ModelManager::new(
            source,
            Backends::new(runtime),
            config.model_defaults(),
            metrics.clone(),
            features,
        ));
        let failures = models.load_all().await.map_err(StartError::Models)?;
        for (name, error) in &failures {
            tracing::error!(model = %name, %error, "model not loaded; the server is not ready");
        }
        let info = Arc::new(ServerInfo::marquee());
        let bind = |port: u16| async move {
            let addr = SocketAddr::new(config.host, port);
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let http_listener = bind(config.http_port).await?;
        let grpc_listener = bind(config.grpc_port).await?;
        let metrics_listener = bind(config.metrics_port).await?;
        let admin_listener = match config.admin_port {
            Some(port) => Some(bind(port).await?),
            None => None,
        };
        let local = |l: &TcpListener| l.local_addr().expect("bound socket has an address");
        let admin_addr = admin_listener.as_ref().map(local);
        let (http_addr, grpc_addr, metrics_addr) = (
            local(&http_listener),
            local(&grpc_listener),
            local(&metrics_listener),
        );

        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let events = event_log(config, &metrics)?;
        let predictor = Arc::new(Predictor {
            models: models.clone(),
            online,
            metrics: metrics.clone(),
            router: Arc::new(crate::traffic::Router::new(metrics.clone())),
            max_instances: config.max_predict_instances.max(1),
            log: events.clone().map(|events| {
                PredictionLog::new(
                    events,
                    config.prediction_log_sample,
                    config.inference_log_sample,
                )
            }),
            drift: drift_monitor(config, events.clone(), &metrics)?,
        });
        if let Some(drift) = &predictor.drift {
            // Weak: the model manager holds the monitor (through `on_retired`).
            let served = Arc::downgrade(&models);
            drift.set_serving(Box::new(move |model, version| {
                served
                    .upgrade()
                    .is_some_and(|models| models.versions(model).contains(&version))
            }));
            let drift = drift.clone();
            models.on_retired(Box::new(move |model, versions| {
                drift.forget(model, versions)
            }));
        }
        let service = Arc::new(Service::new(
            models.clone(),
            predictor,
            info,
            metrics.clone(),
            Limits {
                max_concurrent_requests: config.max_concurrent_requests,
            },
        ));
        let deployments = service.deployment_controller();
        // Deployments in progress are picked up before the first request: their traffic (and the
        // entity it is split by) holds from the start.
        if polls {
            deployments.tick(true).await;
        }
        let admin = match admin_listener {
            Some(listener) => {
                let routes = crate::http::admin_router(service.clone(), config.max_request_bytes);
                tasks.spawn(serve_http(listener, routes, stopped.clone()));
                AdminRoutes::Elsewhere
            }
            None => AdminRoutes::Here,
        };
        let http = crate::http::router(service.clone(), config.max_request_bytes, admin);
        tasks.spawn(serve_http(http_listener, http, stopped.clone()));
        let metrics_router = Router::new().route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            }),
        );
        tasks.spawn(serve_http(
            metrics_listener,
            metrics_router,
            stopped.clone(),
        ));
        let grpc_metrics = service.metrics_handle();
        let grpc = GrpcInferenceServiceServer::new(InferenceService::new(
            service,
            config.grpc_stream_window,
        ))
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let mut grpc_stopped = stopped;
        let max_request_bytes = config.max_request_bytes;
        tasks.spawn(async move {
            // Small writes (headers, data, trailers) must not wait for the client's delayed ACK.
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            let oversized_metrics = grpc_metrics.clone();
            let result = tonic::transport::Server::builder()
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                    move |panic: Box<dyn std::any::Any + Send>| grpc_panic(&grpc_metrics, panic),
                ))
                .layer(tower::util::MapResponseLayer::new(move |response| {
                    oversized_is_resource_exhausted(response, max_request_bytes, &oversized_metrics)
                }))
                .add_service(grpc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        if polls {
            let interval = Duration::from_secs_f64(config.registry_poll_seconds.max(0.05));
            tasks.spawn(poll_registry(models.clone(), interval, stop.subscribe()));
            tasks.spawn(drive_deployments(deployments, interval, stop.subscribe()));
        }
        tracing::info!(%http_addr, %grpc_addr, %metrics_addr, ?admin_addr, "marquee is serving");
        Ok(Self {
            http_addr,
            grpc_addr,
            metrics_addr,
            admin_addr,
            models,
            stop,
            tasks,
            events,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    /// The prediction log and event sink, when one is configured.
    pub fn events(&self) -> Option<&EventLog> {
        self.events.as_ref()
    }

    /// Stops accepting requests, lets those in flight finish, and returns when all listeners
    /// have closed and the event log has handed its records to the sink (or to the spill
    /// folder, when the sink does not take them within seconds).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        if let Some(events) = &self.events {
            events.close(EVENT_CLOSE_WITHIN).await;
        }
    }
}

/// How long shutdown gives the event sink to take what is buffered.
const EVENT_CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The event log `--event-sink` asks for, its series on the server's metrics.
fn event_log(config: &ServeConfig, metrics: &Metrics) -> Result<Option<EventLog>, StartError> {
    for (flag, sample) in [
        ("--prediction-log-sample", config.prediction_log_sample),
        ("--inference-log-sample", config.inference_log_sample),
    ] {
        if !(0.0..=1.0).contains(&sample) {
            return Err(StartError::Config(format!(
                "{flag} must be within [0, 1], not {sample}"
            )));
        }
    }
    let sink: Arc<dyn Sink> = match config.event_sink {
        EventSinkKind::None => return Ok(None),
        EventSinkKind::Parquet => Arc::new(
            ParquetSink::new(
                &config.events_dir,
                Duration::from_secs_f64(config.event_file_roll_seconds.max(1.0)),
            )
            .map_err(|e| StartError::Config(e.to_string()))?,
        ),
        EventSinkKind::Kafka => {
            let brokers = config.event_brokers.clone().ok_or_else(|| {
                StartError::Config("--event-sink kafka needs --event-brokers host:port".into())
            })?;
            let options = marquee_registry::cli::parse_options(&config.event_kafka_options)
                .map_err(|e| StartError::Config(format!("--event-kafka-option: {e}")))?;
            let kafka = KafkaConfig {
                topic_prefix: config.event_topic_prefix.clone(),
                options,
                ..KafkaConfig::new(brokers)
            };
            Arc::new(KafkaSink::new(kafka).map_err(|e| StartError::Config(e.to_string()))?)
        }
    };
    let log_config = LogConfig {
        buffer: config.event_buffer.max(1),
        spill_max_bytes: config.event_spill_max_mb.saturating_mul(1 << 20),
        ..LogConfig::new(config.events_dir.join("spill"))
    };
    EventLog::start(sink, log_config, Some(metrics.registry()))
        .map(Some)
        .map_err(|e| StartError::Config(e.to_string()))
}

/// The drift monitor `--drift-*` asks for; `None` with `--drift-window-rows 0`.
fn drift_monitor(
    config: &ServeConfig,
    events: Option<EventLog>,
    metrics: &Metrics,
) -> Result<Option<Arc<DriftMonitor>>, StartError> {
    if config.drift_window_rows == 0 {
        return Ok(None);
    }
    let commands = config
        .drift_commands
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((model, command)) if !model.is_empty() && !command.trim().is_empty() => {
                Ok((model.to_string(), command.to_string()))
            }
            _ => Err(StartError::Config(format!(
                "--drift-command takes model=command, not '{entry}'"
            ))),
        })
        .collect::<Result<_, _>>()?;
    let drift = DriftConfig {
        window_rows: config.drift_window_rows,
        window_seconds: config.drift_window_seconds.max(0.0),
        min_window_rows: config.drift_min_window_rows,
        reference_rows: config.drift_reference_rows,
        drift_share: config.drift_share,
        commands,
    };
    DriftMonitor::new(drift, events, Some(metrics.registry()))
        .map(|monitor| Some(Arc::new(monitor)))
        .map_err(StartError::Config)
}

/// The feature definitions and the online store `/v1/predict` reads, materialised first when
/// `--materialize` asks.
async fn feature_store(
    config: &ServeConfig,
) -> Result<(Arc<Definitions>, Arc<dyn OnlineStore>), StartError> {
    let definitions = match &config.features {
        None => Definitions::default(),
        Some(path) => {
            Definitions::load(path).map_err(|e| StartError::Config(format!("--features: {e}")))?
        }
    };
    let online = open_online(&config.online_store, config.online_timeout_ms)
        .map_err(|e| StartError::Config(format!("--online-store: {e}")))?;
    if config.materialize {
        materialize(config, &definitions, online.as_ref()).await?;
    }
    Ok((Arc::new(definitions), online))
}

/// Copies every sourced view's latest offline values (up to now) into `online`.
async fn materialize(
    config: &ServeConfig,
    definitions: &Definitions,
    online: &dyn OnlineStore,
) -> Result<(), StartError> {
    let Some(path) = &config.features else {
        return Err(StartError::Config(
            "--materialize needs --features (the views to copy)".into(),
        ));
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let options = marquee_registry::cli::parse_options(&config.store_options)
        .map_err(|e| StartError::Config(format!("--store-option: {e}")))?;
    let now = marquee_feature_store::online::now_ms();
    for view in definitions.views() {
        let Some(source) = &view.source else {
            continue;
        };
        let failed = |e: marquee_feature_store::FeatureStoreError| {
            StartError::Config(format!("--materialize: feature view '{}': {e}", view.name))
        };
        let store = marquee_feature_store::offline::StorePath::open(&source.path, &base, &options)
            .map_err(failed)?;
        let report =
            marquee_feature_store::jobs::materialize(view, &store, online, None, now, &|_, _| {})
                .await
                .map_err(failed)?;
        tracing::info!(view = %view.name, entities = report.entities_written, "materialised");
    }
    Ok(())
}

fn model_source(config: &ServeConfig) -> Result<ModelSource, StartError> {
    let options = marquee_registry::cli::parse_options(&config.store_options)
        .map_err(|e| StartError::Config(format!("--store-option: {e}")))?;
    match (&config.model_repository, &config.registry) {
        (Some(repository), None) => Ok(ModelSource::Repository(ModelRepository::open_with(
            repository, &options,
        )?)),
        (None, Some(registry)) => {
            let mut pinned: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
            for pin in &config.pins {
                let (model, version) = pin
                    .split_once(':')
                    .and_then(|(m, v)| Some((m, v.parse::<u64>().ok()?)))
                    .ok_or_else(|| {
                        StartError::Config(format!("--pin '{pin}' must look like MODEL:VERSION"))
                    })?;
                pinned.entry(model.to_string()).or_default().insert(version);
            }
            Ok(ModelSource::Registry {
                registry: Registry::open_with(registry, &options)?,
                pinned,
            })
        }
        _ => Err(StartError::Config(
            "give exactly one of --model-repository or --registry".into(),
        )),
    }
}

/// Follows the registry: every `interval`, loads what changed (new models, moved aliases).
async fn poll_registry(
    models: Arc<ModelManager>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if let Err(e) = models.refresh().await {
            tracing::warn!(error = %e, "cannot read the registry; serving what is loaded");
        }
    }
}

/// How often active canary deployments are judged: a broken canary is rolled back within this.
const DEPLOYMENT_TICK: Duration = Duration::from_millis(100);

/// Drives canary deployments: judges the active ones every tick, and looks for deployments
/// started on other servers at every registry poll.
async fn drive_deployments(
    deployments: Arc<crate::deploy::Deployments>,
    poll: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last_discovery = tokio::time::Instant::now() - poll;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DEPLOYMENT_TICK) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let discover = last_discovery.elapsed() >= poll;
        if discover {
            last_discovery = tokio::time::Instant::now();
        }
        deployments.tick(discover).await;
    }
}

/// tonic reports a request over the size limit as OUT_OF_RANGE; gRPC's own servers (and this
/// server's REST side, with 413) call it RESOURCE_EXHAUSTED, which is what clients handle. The
/// message names the limit and its flag, in the REST answer's words.
fn oversized_is_resource_exhausted<B>(
    mut response: axum::http::Response<B>,
    max_request_bytes: usize,
    metrics: &Metrics,
) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s == "11");
    let oversized = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.contains("message%20length%20too%20large") || m.contains("message length too large")
        });
    if out_of_range && oversized {
        let error = ServingError::over_request_limit("message", max_request_bytes);
        metrics.rejected(error.reason());
        if let Err(e) = tonic::Status::from(error).add_header(headers) {
            tracing::error!(error = %e, "cannot encode the oversized request's gRPC status");
        }
    }
    response
}

/// A panicking gRPC handler answers INTERNAL with an incident id, as a trailers-only gRPC
/// response, instead of resetting the stream.
fn grpc_panic(
    metrics: &Metrics,
    panic: Box<dyn std::any::Any + Send>,
) -> axum::http::Response<String> {
    metrics.handler_panicked();
    let status = tonic::Status::from(ServingError::from_panic(panic.as_ref()));
    let mut response = axum::http::Response::new(String::new());
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/grpc"),
    );
    if let Err(e) = status.add_header(response.headers_mut()) {
        tracing::error!(error = %e, "cannot encode the panic's gRPC status");
    }
    response
}

async fn serve_http(listener: TcpListener, router: Router, mut stopped: watch::Receiver<bool>) {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// `.marquee/<relative>` of this checkout (where deploy/setup.sh installs), looked for above the
/// executable and the working directory.
pub fn in_checkout(relative: &str) -> Option<PathBuf> {
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    starts
        .iter()
        .flatten()
        .flat_map(|start| start.ancestors())
        .map(|dir| dir.join(".marquee").join(relative))
        .find(|candidate| candidate.is_file())
}

/// The ONNX Runtime library: the one given, else the one deploy/setup.sh installed into
/// `.marquee/lib` of this checkout (found from the executable's or the working directory's path).
pub fn locate_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf, StartError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(StartError::Runtime(format!(
                "ONNX Runtime library {} does not exist (from --ort-library or ORT_DYLIB_PATH)",
                path.display()
            )))
        };
    }
    in_checkout("lib/libonnxruntime.so").ok_or_else(|| {
            StartError::Runtime(
                "ONNX Runtime library not found: run deploy/setup.sh (it installs .marquee/lib/libonnxruntime.so), or point ORT_DYLIB_PATH / --ort-library at libonnxruntime.so".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_panic_is_an_internal_status_with_an_incident_id() {
        let metrics = Metrics::new();
        let response = grpc_panic(&metrics, Box::new("the handler broke"));
        let headers = response.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "13");
        let message = headers["grpc-message"].to_str().unwrap();
        assert!(message.contains("incident%20"), "{message}");
        assert!(!message.contains("handler%20broke"), "{message}");
        assert!(metrics.render().contains("marquee_handler_panics_total 1"));
    }
}
