//! KServe v2 over REST (axum), with Triton's extensions: binary tensor data, model configuration,
//! statistics, repository index/load/unload, classification and schedule-policy parameters.
//!
//! This module only translates: JSON and binary bodies to [`InferRequest`], [`InferResponse`] back
//! to JSON and binary, errors to `{"error": …}` with the status from [`ServingError`]. What a
//! request means is the [`Service`]'s business. Two layers harden every route: answers that axum
//! or tower produce themselves (an oversized body, a bad path) get the same JSON error body, and a
//! panicking handler becomes a 500 with a message (and a metric) instead of a dropped connection.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::deploy::{Action, DeployRequest, Deployment};
use crate::embeddings::{EmbeddingsError, EmbeddingsRequest};
use crate::error::ServingError;
use crate::experiments::{FeedbackRequest, FeedbackResponse, Readout};
use crate::infer::{InferRequest, InferResponse, ParameterValue, RequestedOutput, input_datatype};
use crate::metrics::Metrics;
use crate::models::IndexEntry;
use crate::predict::{PredictRequest, PredictResponse};
use crate::service::{Admitted, LoadParameter, Service};
use crate::tensor::Tensor;
use crate::traffic::Policy;

/// The header that splits a binary-extension body into its JSON part and its tensor bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Clone)]
struct AppState {
    service: Arc<Service>,
    /// `--max-request-bytes`, for the routes that word their own errors.
    max_body: usize,
}

/// The operator's routes: canary deployments and traffic policies.
const ADMIN_PATHS: [&str; 5] = [
    "/v1/models/{model}/deploy",
    "/v1/deployments",
    "/v1/deployments/{id}",
    "/v1/deployments/{id}/{action}",
    "/v1/models/{model}/traffic",
];

/// Where the operator's routes listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRoutes {
    /// Beside the others, on the main port.
    Here,
    /// On their own address (`--admin-port`): the main port answers 404 saying so.
    Elsewhere,
}

/// The operator's routes alone, hardened, for the admin address.
pub fn admin_router(service: Arc<Service>, max_body: usize) -> Router {
    finish(admin_routes(), service, max_body)
}

fn admin_routes() -> Router<AppState> {
    Router::new()
        .route(ADMIN_PATHS[0], post(deploy))
        .route(ADMIN_PATHS[1], get(deployments))
        .route(ADMIN_PATHS[2], get(deployment))
        .route(ADMIN_PATHS[3], post(decide))
        .route(
            ADMIN_PATHS[4],
            get(traffic).put(set_traffic).delete(clear_traffic),
        )
}

/// All v2 and v1 routes, hardened (see the module comment); the operator's among them or not.
pub fn router(service: Arc<Service>, max_body: usize, admin: AdminRoutes) -> Router {
    let admin_routes = match admin {
        AdminRoutes::Here => admin_routes(),
        AdminRoutes::Elsewhere => ADMIN_PATHS.iter().fold(Router::new(), |routes, path| {
            routes.route(
                path,
                axum::routing::any(|| async {
                    ServingError::NotFound(
                        "deployments and traffic policies are served on the admin address (--admin-port), not here".into(),
                    )
                }),
            )
        }),
    };
    let routes = Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/{model}/stats", get(model_statistics))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_statistics),
        )
        .route(
            "/v2/models/{model}/infer",
            post(infer).route_layer(axum::middleware::from_fn_with_state(service.clone(), admit)),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer).route_layer(axum::middleware::from_fn_with_state(service.clone(), admit)),
        )
        .route(
            "/v1/predict",
            post(predict).route_layer(axum::middleware::from_fn_with_state(service.clone(), admit)),
        )
        .route(
            "/v1/embeddings",
            post(embeddings).route_layer(axum::middleware::from_fn_with_state(
                service.clone(),
                admit_openai,
            )),
        )
        .merge(admin_routes)
        .route("/v1/experiments/{model}", get(experiment))
        .route("/v1/models/{model}/drift", get(drift))
        .route("/v1/feedback", post(feedback))
        .route("/v1/openapi.json", get(openapi))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        );
    finish(routes, service, max_body)
}

/// The fallback, body limits, decompression and hardening every listener's routes get.
fn finish(routes: Router<AppState>, service: Arc<Service>, max_body: usize) -> Router {
    let metrics = service.metrics_handle();
    let routes = routes
        .fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ServingError::NotFound(format!("no route for {method} {uri}"))
            },
        )
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .with_state(AppState { service, max_body });
    harden(routes, metrics, max_body)
}

/// Takes the request's place among those in flight before its body is read, and holds it until
/// the answer is encoded; the handler finds it in the request's extensions.
async fn admit(
    State(service): State<Arc<Service>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    admit_or(&service, request, next, ServingError::into_response).await
}

/// [`admit`] for OpenAI's routes: an overloaded server answers in OpenAI's error shape.
async fn admit_openai(
    State(service): State<Arc<Service>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    admit_or(&service, request, next, |e| e.openai_response(None)).await
}

async fn admit_or(
    service: &Service,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
    refuse: impl FnOnce(ServingError) -> Response,
) -> Response {
    match service.admit() {
        Ok(admitted) => {
            request.extensions_mut().insert(Arc::new(admitted));
            next.run(request).await
        }
        Err(e) => refuse(e),
    }
}

/// The layers every route gets: JSON error bodies everywhere, and panics answered with a 500.
fn harden(routes: Router, metrics: Arc<Metrics>, max_body: usize) -> Router {
    let errors_metrics = metrics.clone();
    routes
        .layer(axum::middleware::map_response(move |response: Response| {
            let metrics = errors_metrics.clone();
            async move { json_error_body(response, &metrics, max_body).await }
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            move |panic: Box<dyn std::any::Any + Send>| {
                metrics.handler_panicked();
                ServingError::from_panic(panic.as_ref()).into_response()
            },
        ))
}

/// Rewrites an error answer that is not JSON (axum's and tower's own plain-text rejections) into
/// `{"error": …}` with the same status; an oversized body is counted and names the limit.
async fn json_error_body(response: Response, metrics: &Metrics, max_body: usize) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        body_over_limit(metrics, max_body).to_string()
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| b"{\"error\":\"request failed\"}".to_vec());
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// A body over `--max-request-bytes`, counted as rejected, in the words every route uses.
fn body_over_limit(metrics: &Metrics, max_body: usize) -> ServingError {
    let error = ServingError::over_request_limit("body", max_body);
    metrics.rejected(error.reason());
    error
}

#[derive(Deserialize)]
struct ModelPath {
    model: String,
    #[serde(default)]
    version: String,
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<AppState>) -> StatusCode {
    if s.service.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata(State(s): State<AppState>) -> Json<Value> {
    let info = s.service.info();
    Json(serde_json::json!({
        "name": info.name,
        "version": info.version,
        "extensions": info.extensions,
    }))
}

async fn model_metadata(
    State(s): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ServingError> {
    let metadata = s.service.model_metadata(&p.model, &p.version)?;
    let describe = |tensors: &[crate::service::TensorMetadata]| -> Vec<Value> {
        tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    Ok(Json(serde_json::json!({
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": describe(&metadata.inputs),
        "outputs": describe(&metadata.outputs),
    })))
}

async fn model_ready(
    State(s): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<StatusCode, ServingError> {
    s.service.model(&p.model, &p.version)?;
    Ok(StatusCode::OK)
}

async fn model_config(
    State(s): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ServingError> {
    let config = s.service.model_config(&p.model, &p.version)?;
    Ok(Json(marquee_proto::config_to_json(&config)))
}

async fn all_statistics(State(s): State<AppState>) -> Result<Json<Value>, ServingError> {
    statistics(&s, "", "")
}

async fn model_statistics(
    State(s): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ServingError> {
    statistics(&s, &p.model, &p.version)
}

fn statistics(s: &AppState, model: &str, version: &str) -> Result<Json<Value>, ServingError> {
    let model_stats = s.service.statistics(model, version)?;
    Ok(Json(marquee_proto::statistics_to_json(
        &marquee_proto::inference::ModelStatisticsResponse { model_stats },
    )))
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ServingError> {
    let request: IndexRequest = if body.is_empty() {
        IndexRequest::default()
    } else {
        parse_json(&body)?
    };
    let entries = s.service.index(request.ready).await?;
    Ok(Json(Value::Array(
        entries
            .into_iter()
            .map(|e: IndexEntry| {
                let mut entry = serde_json::Map::new();
                entry.insert("name".into(), e.name.into());
                if let Some(v) = e.version {
                    entry.insert("version".into(), v.to_string().into());
                }
                if let Some(state) = e.state {
                    entry.insert("state".into(), state.as_str().into());
                }
                if let Some(reason) = e.reason {
                    entry.insert("reason".into(), reason.into());
                }
                Value::Object(entry)
            })
            .collect(),
    )))
}

#[derive(Deserialize, Default)]
struct RepositoryRequest {
    #[serde(default)]
    parameters: HashMap<String, Value>,
}

async fn repository_load(
    State(s): State<AppState>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ServingError> {
    let request: RepositoryRequest = if body.is_empty() {
        RepositoryRequest::default()
    } else {
        parse_json(&body)?
    };
    let parameters = request.parameters.into_iter().map(|(key, value)| {
        let value = match value {
            Value::String(text) => LoadParameter::String(text),
            Value::Bool(_) => LoadParameter::Other("a boolean"),
            Value::Number(_) => LoadParameter::Other("a number"),
            Value::Null => LoadParameter::Other("null"),
            Value::Array(_) => LoadParameter::Other("an array"),
            Value::Object(_) => LoadParameter::Other("an object"),
        };
        (key, value)
    });
    s.service.load(&model, parameters).await?;
    Ok(Json(serde_json::json!({})))
}

/// `/v1`'s OpenAPI document, built from the request and response types themselves.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Marquee /v1",
        description = "Predictions with feature enrichment"
    ),
    paths(predict),
    components(schemas(ErrorBody))
)]
struct V1Api;

/// Every error answer: what was wrong, naming the field where there is one.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorBody {
    error: String,
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<V1Api as utoipa::OpenApi>::openapi())
}

/// Predicts from entity ids and request features: the model's pipeline fetches the rest.
#[utoipa::path(
    post,
    path = "/v1/predict",
    request_body = PredictRequest,
    responses(
        (status = 200, description = "The prediction(s)", body = PredictResponse),
        (status = 400, description = "Bad input; the message names the field", body = ErrorBody),
        (status = 404, description = "Unknown model or version", body = ErrorBody),
        (status = 503, description = "The model or its pipeline is unavailable", body = ErrorBody),
        (status = 504, description = "The time budget ran out with no cached answer or fallback", body = ErrorBody),
    )
)]
async fn predict(
    State(s): State<AppState>,
    Extension(admitted): Extension<Arc<Admitted>>,
    body: Bytes,
) -> Result<Json<Value>, ServingError> {
    let request: PredictRequest = parse_json(&body)?;
    let response = s.service.predict(&admitted, request).await?;
    Ok(Json(
        serde_json::to_value(response).map_err(|e| ServingError::Internal(e.to_string()))?,
    ))
}

/// Starts a canary deployment (`deploy/mod.rs`); 201 with the platform API's fields.
async fn deploy(
    State(s): State<AppState>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<Response, ServingError> {
    let request: DeployRequest = parse_json(&body)?;
    let deployment = s.service.deploy(&model, request).await?;
    let body = json!({
        "deployment_id": deployment.id,
        "status": deployment.status,
        "endpoint": format!("/v2/models/{}/versions/{}", deployment.model, deployment.version),
        "status_url": format!("/v1/deployments/{}", deployment.id),
        "not_applied": deployment.not_applied.keys().map(|field| (field.clone(), Value::String(
            "recorded for the cluster's deployer; this server does not apply it".into()))).collect::<Map<String, Value>>(),
        "deployment": deployment,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn deployments(State(s): State<AppState>) -> Result<Json<Value>, ServingError> {
    Ok(Json(json!({"deployments": s.service.deployments().await?})))
}

async fn deployment(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServingError> {
    let (deployment, live) = s.service.deployment(&id).await?;
    let mut body =
        serde_json::to_value(deployment).map_err(|e| ServingError::Internal(e.to_string()))?;
    body["live_windows"] = live;
    Ok(Json(body))
}

/// The optional body of an operator's decision.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn decide(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Deployment>, ServingError> {
    let action = match action.as_str() {
        "promote" => Action::Promoted,
        "rollback" => Action::RolledBack,
        "pause" => Action::Paused,
        "resume" => Action::Resumed,
        other => {
            return Err(ServingError::NotFound(format!(
                "no deployment action '{other}' (promote, rollback, pause, resume)"
            )));
        }
    };
    let decision: DecisionBody = if body.is_empty() {
        DecisionBody::default()
    } else {
        parse_json(&body)?
    };
    let by = decision.by.unwrap_or_else(|| "deploy-api".into());
    let reason = decision
        .reason
        .unwrap_or_else(|| format!("{action:?} by hand"));
    Ok(Json(s.service.decide(&id, action, &by, &reason).await?))
}

/// What the drift monitor holds of a model's versions (`drift.rs`).
async fn drift(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ServingError> {
    let versions = s.service.drift(&model)?;
    Ok(Json(json!({"model": model, "versions": versions})))
}

/// The A/B readout of a model's traffic policy (`experiments.rs`).
async fn experiment(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Readout>, ServingError> {
    Ok(Json(s.service.experiment(&model)?))
}

/// An outcome for one `/v1/predict` answer.
async fn feedback(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<Json<FeedbackResponse>, ServingError> {
    let request: FeedbackRequest = parse_json(&body)?;
    Ok(Json(s.service.feedback(request)?))
}

/// A model's traffic policy (`traffic.rs`): which versions answer requests that name none.
async fn traffic(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Policy>, ServingError> {
    Ok(Json(s.service.traffic(&model)?))
}

async fn set_traffic(
    State(s): State<AppState>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<Json<Policy>, ServingError> {
    let policy: Policy = parse_json(&body)?;
    Ok(Json(s.service.set_traffic(&model, policy)?))
}

async fn clear_traffic(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Policy>, ServingError> {
    Ok(Json(s.service.clear_traffic(&model)?))
}

/// OpenAI's embeddings API over a served embedding model (see `embeddings.rs`); errors in
/// OpenAI's shape.
async fn embeddings(
    State(s): State<AppState>,
    Extension(admitted): Extension<Arc<Admitted>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return body_over_limit(&s.service.metrics_handle(), s.max_body).openai_response(None);
        }
        Err(e) => {
            return ServingError::InvalidInput(format!("cannot read the request body: {e}"))
                .openai_response(None);
        }
    };
    let answer = match serde_json::from_slice::<EmbeddingsRequest>(&body) {
        Ok(request) => s.service.embeddings(&admitted, request).await,
        Err(e) => Err(EmbeddingsError {
            error: ServingError::InvalidInput(format!("invalid JSON body: {e}")),
            param: None,
        }),
    };
    match answer {
        Ok(answer) => Json(answer).into_response(),
        Err(EmbeddingsError { error, param }) => error.openai_response(param.as_deref()),
    }
}

async fn repository_unload(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ServingError> {
    s.service.unload(&model).await?;
    Ok(Json(serde_json::json!({})))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ServingError> {
    serde_json::from_slice(body)
        .map_err(|e| ServingError::InvalidInput(format!("invalid JSON body: {e}")))
}

// ---- inference -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: HashMap<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputRequestJson>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: HashMap<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputRequestJson {
    name: String,
    #[serde(default)]
    parameters: HashMap<String, Value>,
}

#[derive(Serialize)]
struct InferResponseJson<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<ResponseParameters<'a>>,
    outputs: Vec<OutputJson<'a>>,
}

/// The response parameters this server sets.
#[derive(Serialize)]
struct ResponseParameters<'a> {
    variant: &'a str,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<crate::tensor::JsonData<'a>>,
}

#[derive(Serialize)]
struct BinaryParameters {
    binary_data_size: usize,
}

async fn infer(
    State(s): State<AppState>,
    Path(p): Path<ModelPath>,
    Extension(admitted): Extension<Arc<Admitted>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ServingError> {
    let body = match body {
        Ok(body) => body,
        // Answered with the limit (and counted) by `json_error_body`, like every route's.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Ok(e.into_response()),
        Err(e) => {
            return Err(ServingError::InvalidInput(format!(
                "cannot read the request body: {e}"
            )));
        }
    };
    // An unknown model is reported before a malformed body, as Triton does.
    let model = s.service.model(&p.model, &p.version)?;
    let (request, binary_default) = decode_infer(&headers, body)?;
    let binary_outputs = BinaryOutputs::of(&request, binary_default);
    let response = s
        .service
        .infer(&admitted, &model, &p.version, request)
        .await?;
    encode_infer(&response, &binary_outputs)
}

/// Which outputs the client wants as binary data: per-output flags and the request's default.
#[derive(Debug)]
struct BinaryOutputs {
    default: bool,
    per_output: HashMap<String, bool>,
}

impl BinaryOutputs {
    fn of(request: &InferRequest, default: bool) -> Self {
        let per_output = request
            .outputs
            .iter()
            .filter_map(|o| Some((o.name.clone(), o.binary_data?)))
            .collect();
        Self {
            default,
            per_output,
        }
    }

    fn is_binary(&self, name: &str) -> bool {
        self.per_output.get(name).copied().unwrap_or(self.default)
    }
}

/// Decodes a request body (JSON, or a JSON header followed by binary tensors); also gives the
/// request's default for binary outputs. Public for the fuzz targets (`serving/fuzz`).
pub fn decode_infer(
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(InferRequest, bool), ServingError> {
    let header_length = headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ServingError::InvalidInput(
                        "Inference-Header-Content-Length must be a whole number".into(),
                    )
                })
        })
        .transpose()?;
    let (json, mut binary) = match header_length {
        Some(0) => {
            return Err(ServingError::Unsupported(
                "requests without a JSON header (Inference-Header-Content-Length: 0) are not supported; send the JSON header".into(),
            ));
        }
        Some(n) if n > body.len() => {
            return Err(ServingError::InvalidInput(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    let parsed: InferRequestJson = parse_json(&json)?;
    let mut request = InferRequest {
        id: parsed.id,
        ..Default::default()
    };
    let mut binary_default = false;
    for (key, value) in &parsed.parameters {
        if key == "binary_data_output" {
            binary_default = value.as_bool().ok_or_else(|| {
                ServingError::InvalidInput(
                    "parameter 'binary_data_output' must be a boolean".into(),
                )
            })?;
        } else {
            if let Some(value) = parameter(key, value)? {
                request.apply_parameter(key, &value)?;
            }
        }
    }
    for input in parsed.inputs {
        let dtype = input_datatype(
            &input.name,
            &input.datatype,
            input.parameters.contains_key("shared_memory_region"),
        )?;
        let tensor = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size.as_u64().ok_or_else(|| {
                    ServingError::InvalidInput(format!(
                        "input '{}': binary_data_size must be a whole number",
                        input.name
                    ))
                })? as usize;
                if size > binary.len() {
                    return Err(ServingError::InvalidInput(format!(
                        "input '{}' declares {size} bytes of binary data but only {} remain in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let raw = binary.split_to(size);
                Tensor::from_raw(input.name, dtype, input.shape, raw)?
            }
            None => {
                let data = input.data.as_ref().ok_or_else(|| {
                    ServingError::InvalidInput(format!(
                        "input '{}' has neither 'data' nor a binary_data_size parameter",
                        input.name
                    ))
                })?;
                Tensor::from_json(input.name, dtype, input.shape, data)?
            }
        };
        request.inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(ServingError::InvalidInput(format!(
            "{} bytes of binary data follow the inputs but no input claims them (check binary_data_size)",
            binary.len()
        )));
    }
    for output in parsed.outputs {
        let mut requested = RequestedOutput::named(output.name);
        for (key, value) in &output.parameters {
            if let Some(value) = parameter(key, value)? {
                requested.apply_parameter(key, &value)?;
            }
        }
        request.outputs.push(requested);
    }
    Ok((request, binary_default))
}

/// A JSON parameter as the protocol types it; `null` is an unset parameter (as a gRPC parameter
/// with no value), skipped.
fn parameter(key: &str, value: &Value) -> Result<Option<ParameterValue>, ServingError> {
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Bool(b) => ParameterValue::Bool(*b),
        Value::String(s) => ParameterValue::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ParameterValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ParameterValue::Uint(u)
            } else {
                ParameterValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        other => {
            return Err(ServingError::InvalidInput(format!(
                "parameter '{key}' must be a string, number or boolean, got {other}"
            )));
        }
    }))
}

fn encode_infer(
    response: &InferResponse,
    binary: &BinaryOutputs,
) -> Result<Response, ServingError> {
    let mut raw_parts = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for tensor in &response.outputs {
        if binary.is_binary(&tensor.name) {
            let raw = tensor.to_raw();
            outputs.push(OutputJson {
                name: &tensor.name,
                datatype: tensor.dtype.name(),
                shape: &tensor.shape,
                parameters: Some(BinaryParameters {
                    binary_data_size: raw.len(),
                }),
                data: None,
            });
            raw_parts.push(raw);
        } else {
            outputs.push(OutputJson {
                name: &tensor.name,
                datatype: tensor.dtype.name(),
                shape: &tensor.shape,
                parameters: None,
                data: Some(tensor.json_data()),
            });
        }
    }
    let json = serde_json::to_vec(&InferResponseJson {
        id: &response.id,
        model_name: &response.model_name,
        model_version: response.model_version.to_string(),
        parameters: response
            .variant
            .as_deref()
            .map(|variant| ResponseParameters { variant }),
        outputs,
    })
    .map_err(|e| ServingError::InvalidInput(format!("cannot encode the response as JSON: {e}")))?;
    if raw_parts.is_empty() {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response());
    }
    let header_length = json.len();
    let mut body = json;
    body.reserve(raw_parts.iter().map(Bytes::len).sum());
    for part in &raw_parts {
        body.extend_from_slice(part);
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_length),
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(length: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = length {
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        h
    }

    #[test]
    fn binary_inputs_are_taken_in_order_and_outputs_flagged() {
        let json = br#"{"id":"r1","parameters":{"binary_data_output":true,"priority":1},
            "inputs":[{"name":"a","shape":[1,2],"datatype":"INT32","parameters":{"binary_data_size":8}},
                      {"name":"b","shape":[2],"datatype":"FP32","data":[1.5,2.5]}],
            "outputs":[{"name":"y","parameters":{"binary_data":false}},{"name":"z","parameters":{"classification":3}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-3i32).to_le_bytes());
        let (request, default) = decode_infer(&headers(Some(json.len())), body.into()).unwrap();
        let binary = BinaryOutputs::of(&request, default);
        assert_eq!(request.id, "r1");
        assert_eq!(request.priority, Some(1));
        assert_eq!(
            request.inputs[0].to_json_values().unwrap(),
            vec![Value::from(7), Value::from(-3)]
        );
        assert_eq!(request.inputs[1].shape, vec![2]);
        assert!(!binary.is_binary("y"));
        assert!(binary.is_binary("z"));
        assert_eq!(request.outputs[1].classification, Some(3));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_an_incident_id_and_is_counted() {
        use tower::ServiceExt;
        let metrics = Arc::new(Metrics::new());
        let routes = Router::new().route(
            "/boom",
            get(|| async {
                if true {
                    panic!("the handler broke");
                }
                StatusCode::OK
            }),
        );
        let response = harden(routes, metrics.clone(), 1024)
            .oneshot(
                axum::http::Request::get("/boom")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("incident "), "{body}");
        assert!(
            !error.contains("the handler broke"),
            "the panic's message stays in the log: {body}"
        );
        assert!(metrics.render().contains("marquee_handler_panics_total 1"));
    }

    #[test]
    fn binary_size_mismatches_are_reported() {
        let json = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0u8; 4]);
        let err = decode_infer(&headers(Some(json.len())), body.into()).unwrap_err();
        assert!(
            err.to_string()
                .contains("declares 8 bytes of binary data but only 4 remain"),
            "{err}"
        );
        let mut body = json.to_vec();
        body.extend_from_slice(&[0u8; 12]);
        let err = decode_infer(&headers(Some(json.len())), body.into()).unwrap_err();
        assert!(
            err.to_string()
                .contains("4 bytes of binary data follow the inputs"),
            "{err}"
        );
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let cases: [(&[u8], &str); 4] = [
            (
                br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FLOAT","data":[1]}]}"#,
                "unknown datatype 'FLOAT'",
            ),
            (
                br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}"#,
                "neither 'data' nor a binary_data_size",
            ),
            (br#"{"inputs":"#, "invalid JSON body"),
            (
                br#"{"inputs":[],"outputs":[{"name":"y","parameters":{"classification":-1}}]}"#,
                "must be a positive integer",
            ),
        ];
        for (body, expected) in cases {
            let err = decode_infer(&headers(None), Bytes::from_static(body)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should mention {expected}"
            );
        }
    }

    #[test]
    fn binary_response_puts_json_length_in_the_header() {
        let tensor = Tensor::from_json(
            "y",
            crate::tensor::DataType::Fp32,
            vec![2],
            &serde_json::json!([1.0, 2.0]),
        )
        .unwrap();
        let response = InferResponse {
            model_name: "m".into(),
            model_version: 2,
            id: String::new(),
            outputs: vec![tensor],
            variant: None,
        };
        let binary = BinaryOutputs {
            default: true,
            per_output: HashMap::new(),
        };
        let encoded = encode_infer(&response, &binary).unwrap();
        let length: usize = encoded.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            encoded.headers()[header::CONTENT_TYPE],
            "application/octet-stream"
        );
        assert!(length > 0);
    }
}
