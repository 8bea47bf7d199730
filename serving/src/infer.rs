//! The typed inference request and response. REST and gRPC both decode into [`InferRequest`] and
//! encode from [`InferResponse`]; everything after that is transport-free.

use std::time::Duration;

use crate::error::ServingError;
use crate::tensor::{DataType, Tensor};

/// One inference request, as the model layer takes it.
#[derive(Debug, Default)]
pub struct InferRequest {
    /// Echoed back in the response.
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Outputs to return; empty means all of them.
    pub outputs: Vec<RequestedOutput>,
    /// Triton's `priority` parameter: 1 is highest, 0 or none the model's default.
    pub priority: Option<u32>,
    /// Triton's `timeout` parameter: the longest the request may wait in the queue.
    pub timeout: Option<Duration>,
    /// The `routing_key` parameter: the entity id (e.g. the user's) a user-level traffic split
    /// hashes, so a request naming no version stays on its user's variant.
    pub routing_key: Option<String>,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestedOutput {
    pub name: String,
    /// Triton's classification extension: return the top `k` classes instead of the tensor.
    pub classification: Option<usize>,
    /// The binary tensor extension's per-output choice (REST encodes by it; gRPC is always raw).
    pub binary_data: Option<bool>,
}

impl RequestedOutput {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Applies one output parameter, the same way for every transport. Shared-memory outputs are
    /// refused: the answer would never reach the client's region, and it would read stale memory.
    pub fn apply_parameter(
        &mut self,
        key: &str,
        value: &ParameterValue,
    ) -> Result<(), ServingError> {
        match key {
            "classification" => {
                let k = value.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                    ServingError::InvalidInput(format!(
                        "output '{}': parameter 'classification' must be a positive integer",
                        self.name
                    ))
                })?;
                self.classification = Some(usize::try_from(k).unwrap_or(usize::MAX));
            }
            "binary_data" => match value {
                ParameterValue::Bool(b) => self.binary_data = Some(*b),
                _ => {
                    return Err(ServingError::InvalidInput(format!(
                        "output '{}': parameter 'binary_data' must be a boolean",
                        self.name
                    )));
                }
            },
            "shared_memory_region" | "shared_memory_byte_size" | "shared_memory_offset" => {
                return Err(ServingError::Unsupported(format!(
                    "output '{}': shared-memory outputs are not supported; omit the shared_memory_* parameters to get the tensor in the response",
                    self.name
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// The answer to an [`InferRequest`].
#[derive(Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: u64,
    pub id: String,
    pub outputs: Vec<Tensor>,
    /// The traffic variant that answered, when a traffic policy chose the version; transports
    /// return it as the response parameter `variant`.
    pub variant: Option<String>,
}

/// A request parameter's value, whatever transport it came in on.
#[derive(Debug, Clone, PartialEq)]
pub enum ParameterValue {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(String),
}

impl ParameterValue {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            ParameterValue::Int(i) => u64::try_from(i).ok(),
            ParameterValue::Uint(u) => Some(u),
            _ => None,
        }
    }

    fn is_unset(&self) -> bool {
        match self {
            ParameterValue::Int(0) | ParameterValue::Uint(0) => true,
            ParameterValue::String(s) => s.is_empty(),
            _ => false,
        }
    }
}

impl InferRequest {
    /// Applies one request-level parameter. Scheduling parameters are typed and checked; sequence
    /// parameters are refused (no stateful models); other parameters are accepted and ignored,
    /// as the protocol allows custom ones.
    pub fn apply_parameter(
        &mut self,
        key: &str,
        value: &ParameterValue,
    ) -> Result<(), ServingError> {
        let whole_number = |what: &str| {
            ServingError::InvalidInput(format!(
                "parameter '{key}' must be a non-negative integer ({what}), got {value:?}"
            ))
        };
        match key {
            "priority" => {
                let p = value
                    .as_u64()
                    .ok_or_else(|| whole_number("priority level"))?;
                let p = u32::try_from(p).map_err(|_| whole_number("priority level"))?;
                self.priority = (p > 0).then_some(p);
            }
            "timeout" => {
                let us = value.as_u64().ok_or_else(|| whole_number("microseconds"))?;
                self.timeout = (us > 0).then(|| Duration::from_micros(us));
            }
            "routing_key" => match value {
                ParameterValue::String(id) => self.routing_key = Some(id.clone()),
                ParameterValue::Int(id) => self.routing_key = Some(id.to_string()),
                ParameterValue::Uint(id) => self.routing_key = Some(id.to_string()),
                _ => {
                    return Err(ServingError::InvalidInput(format!(
                        "parameter 'routing_key' must be a string or an integer (the entity id a traffic split hashes), got {value:?}"
                    )));
                }
            },
            "sequence_id" if !value.is_unset() => {
                return Err(ServingError::Unsupported(
                    "sequence requests (sequence_id) are not supported: Marquee serves stateless models".into(),
                ));
            }
            "shared_memory_region" => {
                return Err(ServingError::Unsupported(
                    "shared-memory tensors are not supported; send tensor data in the request"
                        .into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// The datatype of an input as a transport received it; shared-memory inputs are refused.
pub fn input_datatype(
    name: &str,
    datatype: &str,
    shared_memory: bool,
) -> Result<DataType, ServingError> {
    if shared_memory {
        return Err(ServingError::Unsupported(
            "shared-memory tensors are not supported; send tensor data in the request".into(),
        ));
    }
    DataType::from_name(datatype).ok_or_else(|| {
        ServingError::InvalidInput(format!("input '{name}' has unknown datatype '{datatype}'"))
    })
}

/// Parses a model version as the protocol carries it (a string; empty means "let the server choose").
pub fn parse_version(version: &str) -> Result<Option<u64>, ServingError> {
    if version.is_empty() {
        return Ok(None);
    }
    version.parse().map(Some).map_err(|_| {
        ServingError::InvalidInput(format!("model version '{version}' is not a whole number"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_parameters_are_typed() {
        let mut r = InferRequest::default();
        r.apply_parameter("priority", &ParameterValue::Int(2))
            .unwrap();
        r.apply_parameter("timeout", &ParameterValue::Uint(1500))
            .unwrap();
        r.apply_parameter("my_custom", &ParameterValue::String("x".into()))
            .unwrap();
        assert_eq!(r.priority, Some(2));
        assert_eq!(r.timeout, Some(Duration::from_micros(1500)));
        r.apply_parameter("priority", &ParameterValue::Int(0))
            .unwrap();
        assert_eq!(r.priority, None);
        let err = r
            .apply_parameter("timeout", &ParameterValue::Int(-1))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("'timeout' must be a non-negative integer")
        );
        let err = r
            .apply_parameter("sequence_id", &ParameterValue::Int(7))
            .unwrap_err();
        assert!(matches!(err, ServingError::Unsupported(_)));
        r.apply_parameter("sequence_id", &ParameterValue::Int(0))
            .unwrap();
    }

    #[test]
    fn output_parameters_are_typed_and_shared_memory_refused() {
        let mut out = RequestedOutput::named("y");
        out.apply_parameter("classification", &ParameterValue::Uint(3))
            .unwrap();
        out.apply_parameter("binary_data", &ParameterValue::Bool(true))
            .unwrap();
        assert_eq!(out.classification, Some(3));
        assert_eq!(out.binary_data, Some(true));
        let err = out
            .apply_parameter("classification", &ParameterValue::Int(0))
            .unwrap_err();
        assert!(
            err.to_string().contains("must be a positive integer"),
            "{err}"
        );
        let err = out
            .apply_parameter("shared_memory_region", &ParameterValue::String("r".into()))
            .unwrap_err();
        assert!(matches!(err, ServingError::Unsupported(_)), "{err}");
    }

    #[test]
    fn versions_parse_or_say_why_not() {
        assert_eq!(parse_version("").unwrap(), None);
        assert_eq!(parse_version("3").unwrap(), Some(3));
        assert!(
            parse_version("latest")
                .unwrap_err()
                .to_string()
                .contains("'latest'")
        );
    }
}
