//! `POST /v1/predict`: the platform's own prediction API. A service sends entity ids and a few
//! request-time values; the model's declared pipeline fetches the rest from the feature store (one
//! round trip for the whole request), merges (request values win), imputes defaults, encodes,
//! runs the model through the same batcher as `/v2`, and turns the output into an answer. It never
//! fails because the feature store is slow or down (defaults, flagged in `degraded`), and a
//! request's time budget is honoured with the cached answer or the declared fallback.

pub mod cache;
pub mod expression;
pub mod items;
pub mod pipeline;
pub mod steps;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use marquee_feature_store::{FeatureValue, Lookup, OnlineStore, entity_key};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::drift::{DriftMonitor, ObservedRow};
use crate::error::ServingError;
use crate::infer::{InferRequest, RequestedOutput};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, PipelineState};
use crate::models::ModelManager;
use crate::prediction_log::{Answered, PredictionLog};
use crate::tensor::{DataType, Tensor, TensorData};
use crate::traffic::{AnswerSummary, Outcome, Route, Router, SHADOW, ShadowSlot};
use cache::{CacheKey, ResponseCache};
use pipeline::{Body, Pipeline, RowModel};
use steps::Column;

/// A model version's pipeline and its response cache, built when the version loads.
pub struct ModelPipeline {
    pub pipeline: Pipeline,
    pub cache: Option<ResponseCache>,
    /// The version's manifest `drift_baseline`, for the drift monitor.
    pub drift_baseline: Value,
    /// The pipeline's feature names, the drift monitor's columns.
    pub feature_names: Arc<[String]>,
}

impl ModelPipeline {
    pub fn new(pipeline: Pipeline, drift_baseline: Value) -> Self {
        let cache = pipeline.cache.map(ResponseCache::new);
        let feature_names = pipeline.features.iter().map(|f| f.name.clone()).collect();
        Self {
            pipeline,
            cache,
            drift_baseline,
            feature_names,
        }
    }
}

/// The request body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// The model's name.
    #[schema(example = "gbr")]
    pub model: String,
    /// A version number or alias; default: the model's default version (production).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "production")]
    pub version: Option<Value>,
    /// Entity ids by join key, e.g. `{"user_id": "u1", "show_id": "s1"}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub entities: Map<String, Value>,
    /// Request-time feature values by name; they win over stored ones.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub features: Map<String, Value>,
    /// Several predictions in one request, instead of `entities`/`features`.
    #[serde(default)]
    pub instances: Option<Vec<Instance>>,
    #[serde(default)]
    pub options: PredictOptions,
}

/// One prediction's inputs in a batch request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    #[serde(default)]
    #[schema(value_type = Object)]
    pub entities: Map<String, Value>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub features: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictOptions {
    /// The whole request's time budget; past it, the cached answer or the model's fallback.
    pub timeout_ms: Option<u64>,
}

/// One prediction: the response body, or one element of `predictions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Prediction {
    pub prediction_id: String,
    /// The pipeline's main value again (a score, a price, a vector): the platform API's
    /// top-level field.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub prediction: Option<Value>,
    /// The answer's label, where the pipeline gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The output tensor's value by name, plus `label` and `top_k` where the pipeline asks; or
    /// the values a step pipeline's `outputs` name.
    #[schema(value_type = Object)]
    pub outputs: Map<String, Value>,
    pub cache_hit: bool,
    /// What fell back: `features` (store unavailable: defaults used), `timeout` (budget spent).
    #[schema(value_type = Vec<String>)]
    pub degraded: Vec<&'static str>,
    /// Tokens the instance's text took (step pipelines that tokenize; `/v1/embeddings` usage).
    #[serde(skip)]
    pub tokens: usize,
    /// The values the model saw, one per pipeline feature (computed answers only; for the
    /// prediction log).
    #[serde(skip)]
    pub inputs: Option<Vec<FeatureValue>>,
}

impl Prediction {
    /// A freshly computed answer with these outputs, its summary fields filled by the pipeline.
    fn new(
        pipeline: &Pipeline,
        prediction_id: String,
        outputs: Map<String, Value>,
        tokens: usize,
    ) -> Self {
        let summary = pipeline.summary(&outputs);
        Self {
            prediction_id,
            prediction: summary.prediction,
            label: summary.label,
            outputs,
            cache_hit: false,
            degraded: Vec::new(),
            tokens,
            inputs: None,
        }
    }

    fn cached(self) -> Self {
        Self {
            cache_hit: true,
            ..self
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PredictResponse {
    pub model: String,
    pub model_version: String,
    /// The traffic variant that answered (`control` or a variant's name) when the model has a
    /// traffic policy and the request named no version; `null` otherwise.
    pub variant: Option<String>,
    #[serde(flatten)]
    pub answer: Answer,
    pub latency_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Answer {
    One(Prediction),
    Many { predictions: Vec<Prediction> },
}

impl PredictResponse {
    /// The answers as the traffic router's windows count them.
    fn answered(&self) -> Vec<AnswerSummary<'_>> {
        let predictions = match &self.answer {
            Answer::One(prediction) => std::slice::from_ref(prediction),
            Answer::Many { predictions } => predictions.as_slice(),
        };
        predictions
            .iter()
            .map(|p| AnswerSummary {
                prediction_id: &p.prediction_id,
                value: match &p.prediction {
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(Value::Bool(b)) => Some(f64::from(u8::from(*b))),
                    _ => None,
                },
                label: p.label.as_deref(),
            })
            .collect()
    }
}

/// Runs `/v1/predict` requests.
pub struct Predictor {
    pub models: Arc<ModelManager>,
    pub online: Arc<dyn OnlineStore>,
    pub metrics: Arc<Metrics>,
    /// Which version answers a request that names none.
    pub router: Arc<Router>,
    /// Most instances one request may carry (`--max-predict-instances`).
    pub max_instances: usize,
    /// Where answers are logged; `None` with `--event-sink none`.
    pub log: Option<PredictionLog>,
    /// Judges the inputs and predictions of each version against its baseline.
    pub drift: Option<Arc<DriftMonitor>>,
}

/// Chunks (requests of at most `max_batch_size` rows) one `/v1/predict` request keeps queued at
/// once: enough for the batcher to run them back to back, few enough that one large request
/// cannot fill the model's queue and turn everyone else away.
pub(crate) const CHUNKS_IN_FLIGHT: usize = 4;

/// One instance after validation: its feature values so far and where the store must fill in.
struct Prepared {
    /// Request values (typed) by pipeline feature position; `None` where the request gave none.
    given: Vec<Option<FeatureValue>>,
    /// Entity key per pipeline view.
    keys: Vec<String>,
    cache_key: Option<CacheKey>,
}

impl Predictor {
    /// Answers a request on the version it names, or, naming none, on the version the model's
    /// traffic policy routes it to (mirroring it to the policy's shadow where the policy says).
    pub async fn predict(
        self: &Arc<Self>,
        request: PredictRequest,
    ) -> Result<PredictResponse, ServingError> {
        let started = Instant::now();
        let reference = match &request.version {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(ServingError::InvalidInput(format!(
                    "version must be a number or an alias, not {other}"
                )));
            }
        };
        let route = if reference.is_empty() {
            self.router
                .route(&request.model, |entity| routing_id(&request, entity))
        } else {
            None
        };
        let Some(route) = route else {
            let model = self.models.get(&request.model, &reference)?;
            return self.predict_on(model, request, None, started).await;
        };
        let mirror = route.mirrored().and_then(|mirrored| {
            let slot = self.router.shadow_slot(&request.model)?;
            Some((mirrored, slot, request.clone()))
        });
        let result = self.predict_routed(&route, request, started).await;
        if let Some((mirrored, slot, request)) = mirror {
            self.mirror(mirrored, slot, request);
        }
        result
    }

    /// Runs a copy of a request on the shadow version, after the answer went out: its answer is
    /// counted and dropped, and it holds a shadow place while it runs.
    fn mirror(self: &Arc<Self>, route: Route, slot: ShadowSlot, request: PredictRequest) {
        let predictor = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Counted in the shadow's window by the router; nobody waits for the answer.
            let _ = predictor
                .predict_routed(&route, request, Instant::now())
                .await;
        });
    }

    /// Answers a request on the version its route names, as that variant (`shadow` for a
    /// mirrored copy), and reports how it went to the router.
    async fn predict_routed(
        &self,
        route: &Route,
        request: PredictRequest,
        started: Instant,
    ) -> Result<PredictResponse, ServingError> {
        let result = match self.models.get(&request.model, &route.version.to_string()) {
            Ok(model) => {
                self.predict_on(model, request, Some(route.variant()), started)
                    .await
            }
            Err(error) => Err(error),
        };
        let answers = result.as_ref().map(PredictResponse::answered);
        self.router.finished(
            route,
            Outcome::of(&result),
            started.elapsed(),
            answers.as_deref().unwrap_or_default(),
        );
        result
    }

    /// Answers a request on one version.
    async fn predict_on(
        &self,
        model: Arc<LoadedModel>,
        request: PredictRequest,
        variant: Option<&str>,
        started: Instant,
    ) -> Result<PredictResponse, ServingError> {
        let declared = match model.pipeline() {
            PipelineState::Ready(declared) => declared,
            PipelineState::Unusable(reason) => {
                return Err(ServingError::Unavailable(format!(
                    "model '{}' version {} has a /v1/predict pipeline that cannot run: {reason}",
                    request.model,
                    model.spec().version
                )));
            }
            PipelineState::Undeclared => {
                return Err(ServingError::InvalidInput(format!(
                    "model '{}' version {} declares no /v1/predict pipeline; call /v2/models/{}/infer with tensors",
                    request.model,
                    model.spec().version,
                    request.model
                )));
            }
        };
        let single = request.instances.is_none();
        let instances = match request.instances {
            Some(_) if !request.entities.is_empty() || !request.features.is_empty() => {
                return Err(ServingError::InvalidInput(
                    "give either entities/features or instances, not both".into(),
                ));
            }
            Some(instances) if instances.is_empty() => {
                return Err(ServingError::InvalidInput("instances is empty".into()));
            }
            Some(instances) if instances.len() > self.max_instances => {
                return Err(ServingError::PayloadTooLarge(format!(
                    "instances has {} entries; this server takes at most {} per request (--max-predict-instances): split the request",
                    instances.len(),
                    self.max_instances
                )));
            }
            Some(instances) => instances,
            None => vec![Instance {
                entities: request.entities,
                features: request.features,
            }],
        };
        let prepared = instances
            .iter()
            .enumerate()
            .map(|(i, instance)| {
                let at = if single {
                    String::new()
                } else {
                    format!("instances[{i}].")
                };
                prepare(&request.model, &model, declared, instance, &at, &|entity| {
                    self.router.is_routing_entity(&request.model, entity)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut answers: Vec<Option<Prediction>> = prepared
            .iter()
            .map(|p| {
                let hit = p
                    .cache_key
                    .as_ref()
                    .zip(declared.cache.as_ref())
                    .and_then(|(k, c)| c.fresh(k));
                if declared.cache.is_some() {
                    self.metrics.predict_cache(&request.model, hit.is_some());
                }
                hit.map(|(outputs, tokens)| {
                    Prediction::new(&declared.pipeline, new_id(), outputs, tokens).cached()
                })
            })
            .collect();
        let missing: Vec<usize> = (0..prepared.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        if !missing.is_empty() {
            let work = || self.compute(&model, declared, &prepared, &missing);
            let computed = match request.options.timeout_ms {
                // No time at all: the cache or the fallback, without starting the work.
                Some(0) => self.out_of_time(&request.model, declared, &prepared, &missing, 0)?,
                Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), work()).await {
                    Ok(result) => result?,
                    Err(_) => {
                        self.out_of_time(&request.model, declared, &prepared, &missing, ms)?
                    }
                },
                None => work().await?,
            };
            for (index, prediction) in missing.into_iter().zip(computed) {
                answers[index] = Some(prediction);
            }
        }
        let mut predictions: Vec<Prediction> = answers
            .into_iter()
            .map(|a| a.expect("every instance answered"))
            .collect();
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        if let Some(log) = &self.log
            && log.sampled(variant == Some(SHADOW))
        {
            let answered = Answered {
                model: &request.model,
                version: model.spec().version,
                variant,
                feature_names: &declared.feature_names,
                latency_ms,
            };
            log.predictions(answered, instances, &predictions);
        }
        if let Some(drift) = &self.drift {
            let rows: Vec<ObservedRow<'_>> = predictions
                .iter()
                .filter_map(|p| {
                    Some(ObservedRow {
                        inputs: p.inputs.as_deref()?,
                        prediction: p.prediction.as_ref(),
                        label: p.label.as_deref(),
                    })
                })
                .collect();
            drift.observe(
                &request.model,
                model.spec().version,
                &declared.feature_names,
                &declared.drift_baseline,
                &rows,
            );
        }
        Ok(PredictResponse {
            model: request.model,
            model_version: model.spec().version.to_string(),
            variant: variant.map(str::to_string),
            answer: if single {
                Answer::One(predictions.remove(0))
            } else {
                Answer::Many { predictions }
            },
            latency_ms,
        })
    }

    /// Fetches, merges, and runs the instances at `missing` through the pipeline's body; caches
    /// what it computes.
    async fn compute(
        &self,
        model: &Arc<LoadedModel>,
        declared: &ModelPipeline,
        prepared: &[Prepared],
        missing: &[usize],
    ) -> Result<Vec<Prediction>, ServingError> {
        let pipeline = &declared.pipeline;
        let model_name = &model.spec().name;
        let (stored, features_degraded) = self.fetch(pipeline, prepared, missing, model_name).await;
        let values: Vec<Vec<FeatureValue>> = missing
            .iter()
            .enumerate()
            .map(|(slot, &index)| {
                pipeline
                    .features
                    .iter()
                    .enumerate()
                    .map(|(position, feature)| {
                        prepared[index].given[position]
                            .clone()
                            .or_else(|| {
                                let (view, in_view) = feature.view?;
                                stored
                                    .get(slot * pipeline.views.len() + view)?
                                    .as_ref()?
                                    .values
                                    .get(in_view)?
                                    .clone()
                            })
                            .unwrap_or_else(|| feature.default.clone())
                    })
                    .collect()
            })
            .collect();
        let prediction_ids: Vec<String> = missing.iter().map(|_| new_id()).collect();
        let (answers, tokens) = match &pipeline.body {
            Body::Row(row) => (
                self.run_rows(model, row, &values, &prediction_ids).await?,
                vec![0; missing.len()],
            ),
            Body::Steps(steps) => {
                let columns = pipeline
                    .features
                    .iter()
                    .enumerate()
                    .map(|(position, feature)| {
                        let column =
                            Column::of_feature(feature.dtype, values.iter().map(|v| &v[position]));
                        (feature.name.clone(), column)
                    })
                    .collect();
                steps
                    .run(
                        model,
                        &self.models,
                        columns,
                        missing.len(),
                        &prediction_ids[0],
                    )
                    .await?
            }
        };
        let degraded: Vec<&'static str> = if features_degraded {
            vec!["features"]
        } else {
            Vec::new()
        };
        Ok(missing
            .iter()
            .zip(prediction_ids)
            .zip(answers.into_iter().zip(tokens))
            .zip(values)
            .map(|(((&index, prediction_id), (outputs, tokens)), inputs)| {
                // Answers made from defaults for want of the store are not worth remembering.
                if let (Some(cache), Some(key), false) = (
                    &declared.cache,
                    prepared[index].cache_key,
                    features_degraded,
                ) {
                    cache.insert(key, (outputs.clone(), tokens));
                }
                Prediction {
                    degraded: degraded.clone(),
                    inputs: Some(inputs),
                    ..Prediction::new(pipeline, prediction_id, outputs, tokens)
                }
            })
            .collect())
    }

    /// Encodes each instance's values into a row and runs the rows through the model, in
    /// requests of at most its max_batch_size, a few at a time (see CHUNKS_IN_FLIGHT); one
    /// answer per instance, in order.
    async fn run_rows(
        &self,
        model: &Arc<LoadedModel>,
        row: &RowModel,
        values: &[Vec<FeatureValue>],
        prediction_ids: &[String],
    ) -> Result<Vec<Map<String, Value>>, ServingError> {
        let mut rows = Vec::with_capacity(values.len() * row.width);
        for instance in values {
            row.encode(instance, &mut rows);
        }
        let chunk_rows = model.spec().max_batch_size.max(1);
        let chunks: Vec<_> = rows
            .chunks(chunk_rows * row.width)
            .zip(prediction_ids.chunks(chunk_rows))
            .map(|(chunk, ids)| self.infer_rows(model, row, chunk, &ids[0]))
            .collect();
        let outputs: Vec<f64> = futures::stream::iter(chunks)
            .buffered(CHUNKS_IN_FLIGHT)
            .try_collect::<Vec<Vec<f64>>>()
            .await?
            .into_iter()
            .flatten()
            .collect();
        let per_row = outputs.len() / values.len().max(1);
        Ok((0..values.len())
            .map(|slot| row.answer(&outputs[slot * per_row..(slot + 1) * per_row]))
            .collect())
    }

    /// Runs encoded rows (a multiple of the pipeline's width) through the model; the output
    /// tensor's values, row after row.
    async fn infer_rows(
        &self,
        model: &LoadedModel,
        row: &RowModel,
        rows: &[f32],
        id: &str,
    ) -> Result<Vec<f64>, ServingError> {
        let input = Tensor::new(
            row.input.clone(),
            DataType::Fp32,
            vec![(rows.len() / row.width) as i64, row.width as i64],
            TensorData::Fixed(Bytes::from(bytemuck::cast_slice::<f32, u8>(rows).to_vec())),
        )?;
        let response = model
            .infer(InferRequest {
                id: id.to_string(),
                inputs: vec![input],
                outputs: vec![RequestedOutput::named(row.output.tensor.clone())],
                ..Default::default()
            })
            .await?;
        let output = response
            .outputs
            .into_iter()
            .next()
            .ok_or_else(|| ServingError::Internal("the model returned no output".into()))?;
        // FP32 outputs are reported with f32's shortest text (as /v2 does), not f64's long one.
        let short = output.dtype == DataType::Fp32;
        Ok(output
            .to_json_values()?
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .map(|v| {
                if short {
                    (v as f32).to_string().parse().unwrap_or(v)
                } else {
                    v
                }
            })
            .collect())
    }

    /// One online-store read for every (instance, view); on failure every value is missing and
    /// the answer is flagged, never failed.
    async fn fetch(
        &self,
        pipeline: &Pipeline,
        prepared: &[Prepared],
        missing: &[usize],
        model_name: &str,
    ) -> (Vec<Option<marquee_feature_store::FoundRow>>, bool) {
        if pipeline.views.is_empty() {
            return (Vec::new(), false);
        }
        let lookups: Vec<Lookup> = missing
            .iter()
            .flat_map(|&index| {
                pipeline
                    .views
                    .iter()
                    .zip(&prepared[index].keys)
                    .map(|(view, key)| Lookup {
                        view,
                        entity_key: key,
                    })
            })
            .collect();
        match self.online.read(&lookups).await {
            Ok(found) => (found, false),
            Err(e) => {
                tracing::warn!(model = model_name, error = %e, "feature store unavailable; predicting with defaults");
                self.metrics
                    .predict_degraded(model_name, "features", missing.len());
                (Vec::new(), true)
            }
        }
    }

    /// The time budget ran out: each instance gets its cached answer, however old, or the
    /// declared fallback; without either the request fails with 504.
    fn out_of_time(
        &self,
        model_name: &str,
        declared: &ModelPipeline,
        prepared: &[Prepared],
        missing: &[usize],
        budget_ms: u64,
    ) -> Result<Vec<Prediction>, ServingError> {
        missing
            .iter()
            .map(|&index| {
                let cached = prepared[index]
                    .cache_key
                    .as_ref()
                    .zip(declared.cache.as_ref())
                    .and_then(|(key, cache)| cache.any(key));
                let pipeline = &declared.pipeline;
                let fallback = || {
                    // The request's own values (or defaults): the store and the model are out of time.
                    let values: Vec<FeatureValue> = pipeline
                        .features
                        .iter()
                        .zip(&prepared[index].given)
                        .map(|(feature, given)| given.clone().unwrap_or_else(|| feature.default.clone()))
                        .collect();
                    pipeline.fallback.as_ref()?.answer(&values)
                };
                let ((outputs, tokens), cache_hit) = match cached {
                    Some((_, answer)) => (answer, true),
                    None => match fallback() {
                        Some(outputs) => ((outputs, 0), false),
                        None => {
                            return Err(ServingError::Timeout(format!(
                                "no prediction within timeout_ms {budget_ms}, and no fallback of model '{model_name}' applies"
                            )));
                        }
                    },
                };
                self.metrics.predict_degraded(model_name, "timeout", 1);
                Ok(Prediction {
                    cache_hit,
                    degraded: vec!["timeout"],
                    ..Prediction::new(pipeline, new_id(), outputs, tokens)
                })
            })
            .collect()
    }
}

/// Checks one instance against the pipeline: every entity a view needs, every request feature
/// known and of its type. Errors name the field.
fn prepare(
    model_name: &str,
    model: &LoadedModel,
    declared: &ModelPipeline,
    instance: &Instance,
    at: &str,
    routing_entity: &dyn Fn(&str) -> bool,
) -> Result<Prepared, ServingError> {
    let pipeline = &declared.pipeline;
    let mut given = vec![None; pipeline.features.len()];
    for (name, value) in &instance.features {
        let (position, feature) = pipeline
            .features
            .iter()
            .enumerate()
            .find(|(_, f)| f.name == *name)
            .ok_or_else(|| {
                ServingError::InvalidInput(format!(
                    "{at}features.{name} is not a feature of model '{model_name}' (features: {})",
                    pipeline
                        .features
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let typed = FeatureValue::from_json(feature.dtype, value).map_err(|e| {
            ServingError::InvalidInput(format!("{at}features.{name}: {e}, got {}", shown(value)))
        })?;
        if let Some((min, max)) = feature.range {
            let number = pipeline::number(&typed);
            // NaN is outside every range.
            if !(min..=max).contains(&number) {
                return Err(ServingError::InvalidInput(format!(
                    "{at}features.{name} must be from {min} to {max}, got {value}"
                )));
            }
        }
        given[position] = Some(typed);
    }
    if let Some(absent) = pipeline
        .features
        .iter()
        .zip(&given)
        .find(|(feature, value)| feature.required && value.is_none())
    {
        return Err(ServingError::InvalidInput(format!(
            "{at}features.{} is required by model '{model_name}'",
            absent.0.name
        )));
    }
    let mut keys = Vec::with_capacity(pipeline.views.len());
    for view in &pipeline.views {
        let mut parts = Vec::with_capacity(view.join_keys.len());
        for join_key in &view.join_keys {
            let part = match instance.entities.get(join_key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                Some(other) => {
                    return Err(ServingError::InvalidInput(format!(
                        "{at}entities.{join_key} must be a string or an integer, got {other}"
                    )));
                }
                None => {
                    return Err(ServingError::InvalidInput(format!(
                        "{at}entities.{join_key} is required (feature view '{}' of model '{model_name}')",
                        view.name
                    )));
                }
            };
            parts.push(part);
        }
        keys.push(entity_key(&parts));
    }
    let reads = |name: &str| {
        pipeline
            .views
            .iter()
            .any(|v| v.join_keys.iter().any(|k| k == name))
    };
    for name in instance.entities.keys() {
        // The entity a user-level traffic split hashes may be sent to any model under one
        // (asked only of entities the pipeline does not read: it takes the router's lock).
        if !reads(name) && !routing_entity(name) {
            return Err(ServingError::InvalidInput(format!(
                "{at}entities.{name} is not an entity model '{model_name}' uses (entities: {})",
                pipeline
                    .views
                    .iter()
                    .flat_map(|v| v.join_keys.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let cache_key = declared.cache.as_ref().map(|_| {
        // Only the entities the pipeline reads shape the answer: a split's (`user_id` on a model
        // that does not read it) must not give every user a cache of their own.
        let entities: Cow<'_, serde_json::Map<String, Value>> =
            if instance.entities.keys().all(|name| reads(name)) {
                Cow::Borrowed(&instance.entities)
            } else {
                Cow::Owned(
                    instance
                        .entities
                        .iter()
                        .filter(|(name, _)| reads(name))
                        .map(|(name, value)| (name.clone(), value.clone()))
                        .collect(),
                )
            };
        ResponseCache::key(
            model_name,
            model.spec().version,
            &entities,
            &instance.features,
        )
    });
    Ok(Prepared {
        given,
        keys,
        cache_key,
    })
}

/// The id a user-level split hashes: the request's entity `key` (of its first instance, for a
/// request of several: the whole request goes to one variant).
fn routing_id<'a>(request: &'a PredictRequest, key: &str) -> Option<Cow<'a, str>> {
    let entities = match request.instances.as_deref() {
        Some([first, ..]) => &first.entities,
        _ => &request.entities,
    };
    match entities.get(key)? {
        Value::String(id) => Some(Cow::Borrowed(id)),
        Value::Number(id) => Some(Cow::Owned(id.to_string())),
        _ => None,
    }
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A request value as an error message shows it: whole when short, else its first 80 characters
/// (a 10,000-item list would bury the message).
fn shown(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}… ({} characters)", &text[..cut], text.len()),
        None => text,
    }
}
