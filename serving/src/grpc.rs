//! KServe v2 over gRPC (`inference.GRPCInferenceService`, tonic), with the Triton extensions its
//! clients call. Translation only, as in `http.rs`: protobuf to [`InferRequest`], [`InferResponse`]
//! to protobuf with `raw_output_contents` (as Triton answers), errors to status codes via
//! [`ServingError`]; what a request means is the [`Service`]'s business. A stream keeps at most
//! its window of requests in flight: past it, the next message is not read until one finishes, so
//! HTTP/2 flow control pushes back on a client that streams faster than the models answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, Stream};
use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use marquee_proto::inference::infer_parameter::ParameterChoice;
use marquee_proto::inference::model_repository_parameter::ParameterChoice as RepositoryChoice;
use marquee_proto::inference::{self as pb, InferParameter, InferTensorContents};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServingError;
use crate::infer::{InferRequest, InferResponse, ParameterValue, RequestedOutput, input_datatype};
use crate::service::{LoadParameter, Service};
use crate::tensor::{DataType, Tensor, TensorData};

/// The largest window a stream may have (a semaphore's and a channel's practical bound).
const MAX_STREAM_WINDOW: usize = 65_536;

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct InferenceService {
    service: Arc<Service>,
    /// Requests one stream may have in flight at once.
    stream_window: usize,
}

impl InferenceService {
    pub fn new(service: Arc<Service>, stream_window: usize) -> Self {
        Self {
            service,
            stream_window: stream_window.clamp(1, MAX_STREAM_WINDOW),
        }
    }

    async fn model_infer(
        &self,
        mut request: pb::ModelInferRequest,
    ) -> Result<pb::ModelInferResponse, ServingError> {
        let admitted = self.service.admit()?;
        let name = std::mem::take(&mut request.model_name);
        let version = std::mem::take(&mut request.model_version);
        // An unknown model is reported before a malformed request, as over REST.
        let model = self.service.model(&name, &version)?;
        let response = self
            .service
            .infer(&admitted, &model, &version, decode_infer(request)?)
            .await?;
        Ok(encode_infer(response))
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.service.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::ModelReadyResponse {
            ready: self.service.model(&r.name, &r.version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let info = self.service.info();
        Ok(Response::new(pb::ServerMetadataResponse {
            name: info.name.to_string(),
            version: info.version.to_string(),
            extensions: info.extensions.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let metadata = self.service.model_metadata(&r.name, &r.version)?;
        let describe = |tensors: Vec<crate::service::TensorMetadata>| {
            tensors
                .into_iter()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t.name,
                    datatype: t.datatype.to_string(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: metadata.name,
            versions: metadata.versions,
            platform: metadata.platform,
            inputs: describe(metadata.inputs),
            outputs: describe(metadata.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        Ok(Response::new(self.model_infer(request.into_inner()).await?))
    }

    type ModelStreamInferStream = ResponseStream;

    /// Requests on the stream run concurrently, up to the stream's window; responses come back
    /// as they finish, and an error answers its own request without closing the stream.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let mut incoming = request.into_inner();
        let window = Arc::new(tokio::sync::Semaphore::new(self.stream_window));
        let (sender, receiver) = tokio::sync::mpsc::channel(self.stream_window);
        let service = self.clone();
        let stream_window = self.stream_window;
        tokio::spawn(async move {
            loop {
                // Read the next message only once the window has room for it.
                let Ok(place) = window.clone().acquire_owned().await else {
                    break;
                };
                let request = match incoming.next().await {
                    Some(Ok(request)) => request,
                    // A message that cannot be decoded (too large, malformed) ends the stream
                    // with its status, so the client learns why its later requests got no reply.
                    Some(Err(status)) => {
                        // After the answers to the requests already running: the status ends
                        // the stream for the client.
                        let others = u32::try_from(stream_window - 1).unwrap_or(u32::MAX);
                        let _all_done = window.acquire_many(others).await;
                        let _ = sender.send(Err(status)).await;
                        break;
                    }
                    None => break,
                };
                let service = service.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _place = place;
                    let id = request.id.clone();
                    // Each message runs in its own task, outside the listener's panic layer.
                    let answered = std::panic::AssertUnwindSafe(service.model_infer(request))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| {
                            service.service.metrics_handle().handler_panicked();
                            Err(ServingError::from_panic(panic.as_ref()))
                        });
                    let reply = match answered {
                        Ok(response) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(e) => stream_error(id, &e),
                    };
                    let _ = sender.send(Ok(reply)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(self.service.model_config(&r.name, &r.version)?),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::ModelStatisticsResponse {
            model_stats: self.service.statistics(&r.name, &r.version)?,
        }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let r = request.into_inner();
        let models = self
            .service
            .index(r.ready)
            .await?
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.map(|v| v.to_string()).unwrap_or_default(),
                state: e.state.map(|s| s.as_str()).unwrap_or_default().to_string(),
                reason: e.reason.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let r = request.into_inner();
        let parameters = r.parameters.into_iter().map(|(key, value)| {
            let value = match value.parameter_choice {
                Some(RepositoryChoice::StringParam(text)) => LoadParameter::String(text),
                Some(RepositoryChoice::BoolParam(_)) => LoadParameter::Other("a boolean"),
                Some(RepositoryChoice::Int64Param(_)) => LoadParameter::Other("a number"),
                Some(RepositoryChoice::BytesParam(_)) => LoadParameter::Other("bytes"),
                None => LoadParameter::Other("empty"),
            };
            (key, value)
        });
        self.service.load(&r.model_name, parameters).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.service
            .unload(&request.into_inner().model_name)
            .await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

fn parameter_value(parameter: &InferParameter) -> Option<ParameterValue> {
    Some(match parameter.parameter_choice.as_ref()? {
        ParameterChoice::BoolParam(b) => ParameterValue::Bool(*b),
        ParameterChoice::Int64Param(i) => ParameterValue::Int(*i),
        ParameterChoice::StringParam(s) => ParameterValue::String(s.clone()),
        ParameterChoice::DoubleParam(d) => ParameterValue::Double(*d),
        ParameterChoice::Uint64Param(u) => ParameterValue::Uint(*u),
    })
}

/// A protobuf request as the transport-neutral request. Public for the fuzz targets
/// (`serving/fuzz`).
pub fn decode_infer(request: pb::ModelInferRequest) -> Result<InferRequest, ServingError> {
    let mut infer = InferRequest {
        id: request.id,
        ..Default::default()
    };
    for (key, value) in &request.parameters {
        if let Some(value) = parameter_value(value) {
            infer.apply_parameter(key, &value)?;
        }
    }
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(ServingError::InvalidInput(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input, in order",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    for input in request.inputs {
        let dtype = input_datatype(
            &input.name,
            &input.datatype,
            input.parameters.contains_key("shared_memory_region"),
        )?;
        let tensor = match (raw.next(), input.contents) {
            (Some(_), Some(_)) => {
                return Err(ServingError::InvalidInput(format!(
                    "input '{}' has both contents and raw_input_contents; use one",
                    input.name
                )));
            }
            (Some(bytes), None) => Tensor::from_raw(input.name, dtype, input.shape, bytes)?,
            (None, Some(contents)) => {
                let data = typed_contents(&input.name, dtype, contents)?;
                Tensor::new(input.name, dtype, input.shape, data)?
            }
            (None, None) => {
                return Err(ServingError::InvalidInput(format!(
                    "input '{}' has no data (neither contents nor raw_input_contents)",
                    input.name
                )));
            }
        };
        infer.inputs.push(tensor);
    }
    for output in request.outputs {
        let mut requested = RequestedOutput::named(output.name);
        for (key, value) in &output.parameters {
            if let Some(value) = parameter_value(value) {
                requested.apply_parameter(key, &value)?;
            }
        }
        infer.outputs.push(requested);
    }
    Ok(infer)
}

/// Turns the typed `contents` fields into little-endian bytes; narrow integer types are range
/// checked because the protocol carries them widened.
fn typed_contents(
    name: &str,
    dtype: DataType,
    c: InferTensorContents,
) -> Result<TensorData, ServingError> {
    let out_of_range = |v: i128| {
        ServingError::InvalidInput(format!("input '{name}': value {v} does not fit {dtype}"))
    };
    macro_rules! narrow {
        ($values:expr, $t:ty) => {{
            let mut out = Vec::with_capacity($values.len() * std::mem::size_of::<$t>());
            for v in $values {
                let n = <$t>::try_from(v).map_err(|_| out_of_range(v as i128))?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            out
        }};
    }
    macro_rules! wide {
        ($values:expr) => {
            $values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
    }
    let bytes = match dtype {
        DataType::Bool => c.bool_contents.iter().map(|&b| b as u8).collect(),
        DataType::Int8 => narrow!(c.int_contents, i8),
        DataType::Int16 => narrow!(c.int_contents, i16),
        DataType::Int32 => wide!(c.int_contents),
        DataType::Int64 => wide!(c.int64_contents),
        DataType::Uint8 => narrow!(c.uint_contents, u8),
        DataType::Uint16 => narrow!(c.uint_contents, u16),
        DataType::Uint32 => wide!(c.uint_contents),
        DataType::Uint64 => wide!(c.uint64_contents),
        DataType::Fp32 => wide!(c.fp32_contents),
        DataType::Fp64 => wide!(c.fp64_contents),
        DataType::Bytes => return Ok(TensorData::Strings(c.bytes_contents)),
        DataType::Fp16 | DataType::Bf16 => {
            return Err(ServingError::InvalidInput(format!(
                "input '{name}': {dtype} has no typed contents field; send it in raw_input_contents"
            )));
        }
    };
    Ok(TensorData::Fixed(Bytes::from(bytes)))
}

fn encode_infer(response: InferResponse) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for tensor in response.outputs {
        raw.push(tensor.to_raw());
        outputs.push(pb::model_infer_response::InferOutputTensor {
            name: tensor.name,
            datatype: tensor.dtype.name().to_string(),
            shape: tensor.shape,
            parameters: HashMap::new(),
            contents: None,
        });
    }
    let mut parameters = HashMap::new();
    if let Some(variant) = response.variant {
        parameters.insert(
            "variant".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(variant)),
            },
        );
    }
    pb::ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version.to_string(),
        id: response.id,
        parameters,
        outputs,
        raw_output_contents: raw,
    }
}

/// A stream message's error answer: its id and the message, since a stream cannot end with one
/// request's status. An overloaded server also says when to retry, as the unary status's
/// `retry-after` metadata does: in the message and as the response parameter
/// `retry_after_seconds`.
fn stream_error(id: String, error: &ServingError) -> pb::ModelStreamInferResponse {
    let mut response = pb::ModelInferResponse {
        id,
        ..Default::default()
    };
    let mut message = error.to_string();
    if matches!(error, ServingError::Overloaded { .. }) {
        let seconds = crate::error::RETRY_AFTER_SECONDS;
        message = format!("{message} (retry after {seconds} s)");
        response.parameters.insert(
            "retry_after_seconds".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(i64::from(seconds))),
            },
        );
    }
    pb::ModelStreamInferResponse {
        error_message: message,
        infer_response: Some(response),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents,
        }
    }

    #[test]
    fn typed_contents_become_little_endian_and_are_range_checked() {
        let contents = InferTensorContents {
            int_contents: vec![1, -2],
            ..Default::default()
        };
        let request = pb::ModelInferRequest {
            inputs: vec![input("a", "INT16", vec![2], Some(contents))],
            ..Default::default()
        };
        let decoded = decode_infer(request).unwrap();
        assert_eq!(
            decoded.inputs[0].to_json_values().unwrap(),
            vec![serde_json::json!(1), serde_json::json!(-2)]
        );
        let contents = InferTensorContents {
            int_contents: vec![300],
            ..Default::default()
        };
        let request = pb::ModelInferRequest {
            inputs: vec![input("a", "INT8", vec![1], Some(contents))],
            ..Default::default()
        };
        let err = decode_infer(request).unwrap_err();
        assert!(
            err.to_string().contains("value 300 does not fit INT8"),
            "{err}"
        );
    }

    #[test]
    fn raw_contents_must_match_the_inputs() {
        let request = pb::ModelInferRequest {
            inputs: vec![
                input("a", "FP32", vec![1], None),
                input("b", "FP32", vec![1], None),
            ],
            raw_input_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        let err = decode_infer(request).unwrap_err();
        assert!(
            err.to_string()
                .contains("raw_input_contents has 1 entries for 2 inputs"),
            "{err}"
        );
        let request = pb::ModelInferRequest {
            inputs: vec![input("a", "FP16", vec![1], Some(Default::default()))],
            ..Default::default()
        };
        let err = decode_infer(request).unwrap_err();
        assert!(
            err.to_string().contains("send it in raw_input_contents"),
            "{err}"
        );
    }

    #[test]
    fn schedule_parameters_come_from_infer_parameters() {
        let mut parameters = HashMap::new();
        parameters.insert(
            "timeout".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(2000)),
            },
        );
        let request = pb::ModelInferRequest {
            parameters,
            inputs: vec![input("a", "FP32", vec![1], None)],
            raw_input_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        let decoded = decode_infer(request).unwrap();
        assert_eq!(decoded.timeout, Some(std::time::Duration::from_millis(2)));
    }
}
