//! `POST /v1/embeddings`, OpenAI's embeddings API, so code written for OpenAI's clients embeds
//! text with a model served here by changing only the base URL. It is a thin shape over
//! `/v1/predict`: the named model's pipeline (text in, `embedding` out: tokenize, model, pool,
//! normalise) runs every input as one instance of one request, batched like any other.
//! Answers and errors take OpenAI's shapes (`{"object": "list", "data": [...], "usage": ...}`,
//! `{"error": {"message", "type", "param", "code"}}`).

use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ServingError;
use crate::model::PipelineState;
use crate::predict::{Answer, Instance, PredictRequest, Predictor};

/// The request body, as OpenAI defines it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    pub input: Value,
    pub model: String,
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Accepted only as the model's own width: these models cannot shorten their vectors.
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// OpenAI's end-user id: accepted and not used.
    #[serde(default)]
    pub user: Option<String>,
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    /// Little-endian f32 bytes, base64: a quarter of the text of a float list.
    Base64,
}

/// An invalid field, named as OpenAI's `param`.
fn invalid(param: &str, message: impl Into<String>) -> EmbeddingsError {
    EmbeddingsError {
        error: ServingError::InvalidInput(message.into()),
        param: Some(param.to_string()),
    }
}

/// An error with the request field it is about, for OpenAI's `param`.
#[derive(Debug)]
pub struct EmbeddingsError {
    pub error: ServingError,
    pub param: Option<String>,
}

impl From<ServingError> for EmbeddingsError {
    fn from(error: ServingError) -> Self {
        Self { error, param: None }
    }
}

/// Most inputs one request may carry: OpenAI's own limit.
const MAX_INPUTS: usize = 2048;

impl Predictor {
    /// Embeds every input with the model's pipeline; the OpenAI-shaped answer.
    pub async fn embeddings(
        self: &Arc<Self>,
        request: EmbeddingsRequest,
    ) -> Result<Value, EmbeddingsError> {
        let encoding = match request.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(invalid(
                    "encoding_format",
                    format!("encoding_format must be 'float' or 'base64', not '{other}'"),
                ));
            }
        };
        let texts = texts(&request.input)?;
        let model = self.models.get(&request.model, "")?;
        let text_feature = match model.pipeline() {
            PipelineState::Ready(declared) if declared.pipeline.shows("embedding") => declared
                .pipeline
                .text_feature()
                .map(str::to_string),
            _ => None,
        }
        .ok_or_else(|| {
            invalid(
                "model",
                format!(
                    "model '{}' does not make embeddings (its pipeline needs one text feature and an 'embedding' output)",
                    request.model
                ),
            )
        })?;
        // One /v1/predict request per --max-predict-instances texts, all on the same version.
        let mut predictions = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.max_instances.max(1)) {
            let instances = chunk
                .iter()
                .map(|text| {
                    let mut features = Map::new();
                    features.insert(text_feature.clone(), Value::String(text.clone()));
                    Instance {
                        entities: Map::new(),
                        features,
                    }
                })
                .collect();
            let response = self
                .predict(PredictRequest {
                    model: request.model.clone(),
                    version: Some(model.spec().version.into()),
                    entities: Map::new(),
                    features: Map::new(),
                    instances: Some(instances),
                    options: Default::default(),
                })
                .await?;
            match response.answer {
                Answer::Many { predictions: some } => predictions.extend(some),
                Answer::One(one) => predictions.push(one),
            }
        }
        let mut tokens = 0;
        let mut data = Vec::with_capacity(predictions.len());
        for (index, prediction) in predictions.into_iter().enumerate() {
            tokens += prediction.tokens;
            let vector: Vec<f32> = prediction
                .outputs
                .get("embedding")
                .and_then(Value::as_array)
                .and_then(|values| {
                    values
                        .iter()
                        .map(|v| v.as_f64().map(|x| x as f32))
                        .collect::<Option<Vec<f32>>>()
                })
                .ok_or_else(|| {
                    ServingError::Internal(format!(
                        "model '{}' answered 'embedding' with something other than a vector of numbers",
                        request.model
                    ))
                })?;
            if let Some(wanted) = request.dimensions
                && wanted != vector.len() as u64
            {
                return Err(invalid(
                    "dimensions",
                    format!(
                        "model '{}' makes {}-dimensional embeddings and cannot shorten them; leave dimensions out or give {}",
                        request.model,
                        vector.len(),
                        vector.len()
                    ),
                ));
            }
            let embedding = match encoding {
                Encoding::Float => json!(vector),
                Encoding::Base64 => json!(
                    base64::engine::general_purpose::STANDARD
                        .encode(bytemuck::cast_slice::<f32, u8>(&vector))
                ),
            };
            data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
        }
        Ok(json!({
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }
}

/// The texts of `input`: one string or a list of 1 to 2,048 non-empty strings.
fn texts(input: &Value) -> Result<Vec<String>, EmbeddingsError> {
    let texts: Vec<String> = match input {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) if items.is_empty() => {
            return Err(invalid("input", "input is an empty list: give at least one text"));
        }
        Value::Array(items) if items.len() > MAX_INPUTS => {
            return Err(invalid(
                "input",
                format!(
                    "input has {} texts; at most {MAX_INPUTS} per request",
                    items.len()
                ),
            ));
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(_) | Value::Array(_) => Err(invalid(
                    "input",
                    format!(
                        "input[{i}] is a token id or token list; this server takes text only: send the strings"
                    ),
                )),
                other => Err(invalid(
                    "input",
                    format!("input[{i}] must be a string, got {other}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(invalid(
                "input",
                format!("input must be a string or a list of strings, got {other}"),
            ));
        }
    };
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(invalid(
            "input",
            format!("input[{i}] is empty: every text needs at least one character"),
        ));
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_a_string_or_a_list_of_strings() {
        assert_eq!(texts(&json!("hi")).unwrap(), ["hi"]);
        assert_eq!(texts(&json!(["a", "b"])).unwrap(), ["a", "b"]);
        for (bad, says) in [
            (json!([]), "empty list"),
            (json!([1, 2]), "token id"),
            (json!([[1, 2]]), "token id"),
            (json!(["a", ""]), "input[1] is empty"),
            (json!(3), "a string or a list"),
            (json!(["a", null]), "input[1] must be a string"),
        ] {
            let error = texts(&bad).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("input"));
            assert!(
                error.error.to_string().contains(says),
                "{bad}: {:?}",
                error.error
            );
        }
        let many = Value::Array(vec![json!("x"); MAX_INPUTS + 1]);
        assert!(texts(&many).is_err());
    }
}
