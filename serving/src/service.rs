//! The transport-neutral service: every operation REST and gRPC offer, answered once. Transports
//! decode their wire types into the types here and encode the answers back; what a request means
//! (which versions statistics cover, which load parameters exist, which output parameters are
//! refused, when the server is too busy) is decided only here, so both transports always give the
//! same answer and the same error for the same request. It plays the role `Infer` plays in
//! text-embeddings-inference.
//!
//! It is also where admission control lives: a global limit on requests in flight, so a flood of
//! clients gets fast 503 / UNAVAILABLE answers (with a retry hint) instead of unbounded queues and
//! memory.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use marquee_events::{Record, now_ms};
use marquee_proto::inference::{ModelConfig, ModelStatistics};
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::deploy::{Action, DeployRequest, Deployment, Deployments};
use crate::drift::VersionDriftView;
use crate::embeddings::{EmbeddingsError, EmbeddingsRequest};
use crate::error::{Overload, ServingError};
use crate::experiments::{FeedbackRequest, FeedbackResponse, Readout};
use crate::infer::{InferRequest, InferResponse};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, TensorSpec};
use crate::models::{IndexEntry, ModelManager};
use crate::predict::{PredictRequest, PredictResponse, Predictor};
use crate::prediction_log::InferenceAnswered;
use crate::server::ServerInfo;
use crate::traffic::{Feedback, Outcome, Policy, REMEMBERED_PREDICTIONS, Router};

/// A model's metadata (KServe v2 `ModelMetadataResponse`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// One input's or output's metadata, with the shape a client sends (batch dimension included).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// A repository-load parameter's value as a transport received it.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadParameter {
    String(String),
    /// Any other type (number, boolean, bytes); named for the error message.
    Other(&'static str),
}

/// Limits that keep one client from hurting the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Inference and prediction requests in flight at once, all clients together.
    pub max_concurrent_requests: usize,
}

/// The most requests in flight a server can be configured for (tokio's semaphore bound).
const MAX_IN_FLIGHT: usize = Semaphore::MAX_PERMITS;

/// A request's place among those in flight; the place is freed when this is dropped.
pub struct Admitted {
    _place: OwnedSemaphorePermit,
}

/// The service both transports call.
pub struct Service {
    models: Arc<ModelManager>,
    predictor: Arc<Predictor>,
    info: Arc<ServerInfo>,
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
    limits: Limits,
    deployments: Arc<Deployments>,
}

impl Service {
    pub fn new(
        models: Arc<ModelManager>,
        predictor: Arc<Predictor>,
        info: Arc<ServerInfo>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        Self {
            deployments: Arc::new(Deployments::new(
                models.clone(),
                predictor.router.clone(),
                predictor.log.as_ref().map(|log| log.events().clone()),
            )),
            in_flight: Arc::new(Semaphore::new(
                limits.max_concurrent_requests.clamp(1, MAX_IN_FLIGHT),
            )),
            models,
            predictor,
            info,
            metrics,
            limits,
        }
    }

    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Triton's strict readiness: every model the source serves loaded.
    pub fn ready(&self) -> bool {
        self.models.all_ready()
    }

    /// The model version a request names; its error says why it cannot serve.
    pub fn model(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, ServingError> {
        self.models.get(name, version)
    }

    pub fn model_metadata(&self, name: &str, version: &str) -> Result<ModelMetadata, ServingError> {
        let model = self.models.get(name, version)?;
        let spec = model.spec();
        let describe = |tensors: &[TensorSpec]| {
            tensors
                .iter()
                .map(|t| TensorMetadata {
                    name: t.name.clone(),
                    datatype: t.dtype.name(),
                    shape: spec.client_shape(t),
                })
                .collect()
        };
        Ok(ModelMetadata {
            name: spec.name.clone(),
            versions: self
                .models
                .versions(name)
                .iter()
                .map(u64::to_string)
                .collect(),
            platform: spec.config.platform.clone(),
            inputs: describe(&spec.inputs),
            outputs: describe(&spec.outputs),
        })
    }

    pub fn model_config(&self, name: &str, version: &str) -> Result<ModelConfig, ServingError> {
        Ok(self.models.get(name, version)?.spec().config.clone())
    }

    /// Statistics of every loaded version (empty `name`), of one model's ready versions (empty
    /// `version`), or of one version. A version unloaded while the answer is assembled is left
    /// out rather than failing the request.
    pub fn statistics(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Vec<ModelStatistics>, ServingError> {
        if name.is_empty() {
            return Ok(self
                .models
                .loaded()
                .iter()
                .map(|m| m.statistics())
                .collect());
        }
        if !version.is_empty() {
            return Ok(vec![self.models.get(name, version)?.statistics()]);
        }
        self.models.get(name, "")?;
        Ok(self
            .models
            .versions(name)
            .into_iter()
            .filter_map(|v| self.models.get(name, &v.to_string()).ok())
            .map(|m| m.statistics())
            .collect())
    }

    pub async fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, ServingError> {
        self.models.index(ready_only).await
    }

    /// Loads (or reloads) a model. The one parameter understood is `config`, a configuration
    /// as JSON that overrides the repository's; Triton's `file:` parameters are refused.
    pub async fn load(
        &self,
        name: &str,
        parameters: impl IntoIterator<Item = (String, LoadParameter)>,
    ) -> Result<(), ServingError> {
        let mut config = None;
        for (key, value) in parameters {
            match (key.as_str(), value) {
                ("config", LoadParameter::String(json)) => {
                    config = Some(marquee_proto::parse_config_json(&json).map_err(|e| {
                        ServingError::InvalidInput(format!("load parameter 'config': {e}"))
                    })?);
                }
                ("config", LoadParameter::Other(kind)) => {
                    return Err(ServingError::InvalidInput(format!(
                        "load parameter 'config' must be a string holding the configuration as JSON, not {kind}"
                    )));
                }
                (k, _) if k.starts_with("file:") => {
                    return Err(ServingError::Unsupported(
                        "loading model files from the request is not supported; put them in the repository".into(),
                    ));
                }
                (k, _) => {
                    return Err(ServingError::InvalidInput(format!(
                        "unknown load parameter '{k}' (the one understood is 'config')"
                    )));
                }
            }
        }
        self.models.load(name, config).await
    }

    pub async fn unload(&self, name: &str) -> Result<(), ServingError> {
        self.models.unload(name).await
    }

    /// Runs a v2 inference request admitted by [`Service::admit`] on the version
    /// [`Service::model`] found for `version` (transports look it up first, so an unknown model
    /// is reported before a malformed request, as Triton does). A request that names no version
    /// goes where the model's traffic policy routes it (by its `routing_key`), and its answer
    /// names the variant. With an event sink, an answered request is logged (sampled,
    /// `prediction_log.rs`).
    pub async fn infer(
        &self,
        _admitted: &Admitted,
        model: &Arc<LoadedModel>,
        version: &str,
        request: InferRequest,
    ) -> Result<InferResponse, ServingError> {
        let router = &self.predictor.router;
        let name = &model.spec().name;
        let route = if version.is_empty() {
            router.route(name, |_| request.routing_key.as_deref().map(Cow::Borrowed))
        } else {
            None
        };
        // What the log needs of a sampled request once it is answered (tensors share their
        // bytes, so this copies no data).
        let logged = self
            .predictor
            .log
            .as_ref()
            .filter(|log| log.inference_sampled())
            .map(|log| (log, request.inputs.clone()));
        let started = (route.is_some() || logged.is_some()).then(Instant::now);
        let result = match &route {
            None => model.infer(request).await,
            Some(route) => match self.models.get(name, &route.version.to_string()) {
                Ok(routed) => routed.infer(request).await.map(|mut response| {
                    response.variant = Some(route.variant().to_string());
                    response
                }),
                Err(error) => Err(error),
            },
        };
        let elapsed = started.map(|started| started.elapsed()).unwrap_or_default();
        if let Some(route) = &route {
            router.finished(route, Outcome::of(&result), elapsed, &[]);
        }
        if let (Some((log, inputs)), Ok(response)) = (logged, &result) {
            let answered = InferenceAnswered {
                model: name,
                version: response.model_version,
                variant: response.variant.as_deref(),
                request_id: &response.id,
                latency_ms: elapsed.as_secs_f64() * 1e3,
            };
            log.inference(&answered, &inputs, &response.outputs);
        }
        self.count_rejection(result)
    }

    /// Installs a model's traffic policy; every version it names must be loaded.
    pub fn set_traffic(&self, name: &str, policy: Policy) -> Result<Policy, ServingError> {
        let loaded = self.models.versions(name);
        if loaded.is_empty() {
            self.models.get(name, "")?;
        }
        for version in policy.versions() {
            if !loaded.contains(&version) {
                let loaded: Vec<String> = loaded.iter().map(u64::to_string).collect();
                return Err(ServingError::InvalidInput(format!(
                    "traffic policy: model '{name}' version {version} is not loaded (loaded: {}); a registry model serves the versions an alias, stage or --pin names",
                    loaded.join(", ")
                )));
            }
        }
        self.predictor.router.set(name, policy.clone())?;
        tracing::info!(model = name, ?policy, "traffic policy set");
        Ok(policy)
    }

    /// A model's traffic policy.
    pub fn traffic(&self, name: &str) -> Result<Policy, ServingError> {
        self.predictor
            .router
            .policy(name)
            .ok_or_else(|| no_policy(name))
    }

    /// Removes a model's traffic policy (requests go to its default version again).
    pub fn clear_traffic(&self, name: &str) -> Result<Policy, ServingError> {
        let removed = self
            .predictor
            .router
            .clear(name)
            .ok_or_else(|| no_policy(name))?;
        tracing::info!(model = name, "traffic policy removed");
        Ok(removed)
    }

    /// What the drift monitor holds of a model's versions (`drift.rs`).
    pub fn drift(&self, name: &str) -> Result<Vec<VersionDriftView>, ServingError> {
        if self.models.versions(name).is_empty() {
            self.models.get(name, "")?;
        }
        let monitor = self.predictor.drift.as_ref().ok_or_else(|| {
            ServingError::NotFound("the drift monitor is off (--drift-window-rows 0)".into())
        })?;
        Ok(monitor.view(name))
    }

    /// The A/B readout of a model's traffic policy (`experiments.rs`).
    pub fn experiment(&self, name: &str) -> Result<Readout, ServingError> {
        if self.models.versions(name).is_empty() {
            self.models.get(name, "")?;
        }
        let (policy, windows) = self
            .predictor
            .router
            .snapshot(name)
            .ok_or_else(|| no_policy(name))?;
        Ok(crate::experiments::readout(name, &policy, &windows))
    }

    /// Counts the outcome of a recent answer in its variant's readout and logs it as a
    /// `prediction.feedback` event (where an event sink is configured).
    pub fn feedback(&self, request: FeedbackRequest) -> Result<FeedbackResponse, ServingError> {
        let outcome = request.value().map_err(ServingError::InvalidInput)?;
        let id = request.prediction_id;
        let (counted, model, variant, version, reason) = match self
            .predictor
            .router
            .feedback(&id, outcome)
        {
            Feedback::AlreadyCounted => {
                return Err(ServingError::Conflict(format!(
                    "prediction '{id}' has an outcome already; an answer takes one"
                )));
            }
            Feedback::Counted {
                model,
                variant,
                version,
            } => (true, Some(model), Some(variant), Some(version), None),
            Feedback::PolicyChanged {
                model,
                variant,
                version,
            } => {
                let reason = format!(
                    "model '{model}' no longer has variant '{variant}' on version {version} in its traffic policy"
                );
                (
                    false,
                    Some(model),
                    Some(variant),
                    Some(version),
                    Some(reason),
                )
            }
            Feedback::Unknown => {
                let reason = format!(
                    "prediction '{id}' is not among the last {REMEMBERED_PREDICTIONS} answers this server gave under a traffic policy"
                );
                (false, None, None, None, Some(reason))
            }
        };
        let logged = self.predictor.log.as_ref().is_some_and(|log| {
            let mut fields = Map::new();
            fields.insert("prediction_id".into(), id.clone().into());
            fields.insert("outcome".into(), outcome.into());
            fields.insert("model".into(), model.clone().into());
            fields.insert("variant".into(), variant.clone().into());
            fields.insert("version".into(), version.into());
            fields.insert("counted".into(), counted.into());
            let key = model.as_deref().unwrap_or(&id);
            log.events()
                .log(Record::event("prediction.feedback", key, now_ms(), fields))
        });
        if !counted && !logged && model.is_none() {
            let kept = if self.predictor.log.is_some() {
                "and the event log is full, so it was not logged either"
            } else {
                "and no event sink is configured to keep it (--event-sink)"
            };
            return Err(ServingError::NotFound(format!(
                "{}, {kept}",
                reason.unwrap_or_default()
            )));
        }
        Ok(FeedbackResponse {
            prediction_id: id,
            counted,
            logged,
            model,
            variant,
            version,
            reason,
        })
    }

    /// Starts a canary deployment of one of the model's registry versions.
    pub async fn deploy(
        &self,
        model: &str,
        request: DeployRequest,
    ) -> Result<Deployment, ServingError> {
        self.deployments.start(model, request).await
    }

    /// A deployment and this server's live windows of its variants.
    pub async fn deployment(&self, id: &str) -> Result<(Deployment, Value), ServingError> {
        self.deployments.get(id).await
    }

    pub async fn deployments(&self) -> Result<Vec<Deployment>, ServingError> {
        self.deployments.list().await
    }

    /// An operator's decision on a deployment (promote, rollback, pause, resume).
    pub async fn decide(
        &self,
        id: &str,
        action: Action,
        by: &str,
        reason: &str,
    ) -> Result<Deployment, ServingError> {
        self.deployments.act(id, action, by, reason).await
    }

    /// The deployment controller, for the server's loop.
    pub fn deployment_controller(&self) -> Arc<Deployments> {
        self.deployments.clone()
    }

    /// The traffic router both `/v1/predict` and `/v2` requests go through.
    pub fn router(&self) -> &Arc<Router> {
        &self.predictor.router
    }

    /// Runs a `/v1/predict` request admitted by [`Service::admit`].
    pub async fn predict(
        &self,
        _admitted: &Admitted,
        request: PredictRequest,
    ) -> Result<PredictResponse, ServingError> {
        let result = self.predictor.predict(request).await;
        self.count_rejection(result)
    }

    pub async fn embeddings(
        &self,
        _admitted: &Admitted,
        request: EmbeddingsRequest,
    ) -> Result<Value, EmbeddingsError> {
        self.predictor.embeddings(request).await.inspect_err(|e| {
            self.count_rejected(&e.error);
        })
    }

    /// A place among the requests in flight, or an immediate overload answer. Transports take it
    /// before they read or decode a request body and hold it until the answer is encoded, so the
    /// limit bounds the memory and CPU of requests in flight, not only their inference.
    pub fn admit(&self) -> Result<Admitted, ServingError> {
        self.in_flight.clone().try_acquire_owned().map(|place| Admitted { _place: place }).map_err(|_| {
            let error = ServingError::Overloaded {
                cause: Overload::ConcurrencyLimit,
                message: format!(
                    "the server is at its limit of {} requests in flight (--max-concurrent-requests); retry later",
                    self.limits.max_concurrent_requests.clamp(1, MAX_IN_FLIGHT)
                ),
            };
            self.metrics.rejected(error.reason());
            error
        })
    }

    fn count_rejection<T>(&self, result: Result<T, ServingError>) -> Result<T, ServingError> {
        if let Err(error) = &result {
            self.count_rejected(error);
        }
        result
    }

    /// Counts a request turned away for load or size (not one that failed on its own input).
    fn count_rejected(&self, error: &ServingError) {
        if matches!(
            error,
            ServingError::Overloaded { .. } | ServingError::PayloadTooLarge(_)
        ) {
            self.metrics.rejected(error.reason());
        }
    }
}

fn no_policy(name: &str) -> ServingError {
    ServingError::NotFound(format!("model '{name}' has no traffic policy"))
}
