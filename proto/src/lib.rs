//! The wire and configuration schema shared by every part of Marquee that speaks Triton's
//! language: the KServe v2 gRPC service (`inference.GRPCInferenceService`) and the Triton model
//! configuration (`ModelConfig`), plus the two textual forms of a configuration that Triton users
//! meet: `config.pbtxt` (protobuf text format) and the JSON that `/v2/models/{m}/config` returns.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Generated messages, the gRPC server trait and a client (tests and tools use the client).
pub mod inference {
    tonic::include_proto!("inference");
}

pub use inference::ModelConfig;

static DESCRIPTORS: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin")).as_ref())
        .expect("descriptor set compiled by build.rs is valid")
});

fn model_config_descriptor() -> prost_reflect::MessageDescriptor {
    DESCRIPTORS
        .get_message_by_name("inference.ModelConfig")
        .expect("ModelConfig is in the descriptor set")
}

/// A configuration text that is not a valid `ModelConfig`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigTextError {
    #[error("invalid model configuration: {0}")]
    Text(String),
    #[error("invalid model configuration JSON: {0}")]
    Json(String),
}

/// Parses a `config.pbtxt` (protobuf text format), rejecting unknown fields as Triton does.
pub fn parse_config_text(text: &str) -> Result<ModelConfig, ConfigTextError> {
    let text = colon_before_lists(text);
    let message = DynamicMessage::parse_text_format(model_config_descriptor(), &text)
        .map_err(|e| ConfigTextError::Text(e.to_string()))?;
    ModelConfig::decode(message.encode_to_vec().as_slice())
        .map_err(|e| ConfigTextError::Text(e.to_string()))
}

/// Protobuf's text format lets a message-typed field omit the colon before a list
/// (`input [ { … } ]`), and Triton configurations nearly always do; the parser we use wants
/// `input: [ … ]`. This inserts the colon, leaving strings and comments untouched.
fn colon_before_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    // Whether the last significant token was an identifier (a field name awaiting its value).
    let mut after_identifier = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(s) = chars.next() {
                    out.push(s);
                    if s == '\\' {
                        if let Some(escaped) = chars.next() {
                            out.push(escaped);
                        }
                    } else if s == c {
                        break;
                    }
                }
                after_identifier = false;
            }
            '#' => {
                out.push(c);
                for s in chars.by_ref() {
                    out.push(s);
                    if s == '\n' {
                        break;
                    }
                }
            }
            '[' if after_identifier => {
                out.push_str(":[");
                after_identifier = false;
            }
            c if c.is_whitespace() => out.push(c),
            c if c.is_ascii_alphanumeric() || c == '_' => {
                out.push(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' || n == '.' || n == '-' {
                        out.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                after_identifier = c.is_ascii_alphabetic() || c == '_';
            }
            c => {
                out.push(c);
                after_identifier = false;
            }
        }
    }
    out
}

/// Parses a configuration given as JSON (Triton's `config` load parameter).
pub fn parse_config_json(json: &str) -> Result<ModelConfig, ConfigTextError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(model_config_descriptor(), &mut deserializer)
        .map_err(|e| ConfigTextError::Json(e.to_string()))?;
    ModelConfig::decode(message.encode_to_vec().as_slice())
        .map_err(|e| ConfigTextError::Json(e.to_string()))
}

/// Renders a configuration as Triton's HTTP API does: proto field names, enum names, default
/// values included, 64-bit integers as JSON numbers.
pub fn config_to_json(config: &ModelConfig) -> serde_json::Value {
    message_to_json(config, "inference.ModelConfig", false)
}

/// The same JSON without fields left at their defaults: what a person wrote, for manifests.
pub fn config_to_compact_json(config: &ModelConfig) -> serde_json::Value {
    message_to_json(config, "inference.ModelConfig", true)
}

/// Renders statistics as Triton's HTTP statistics extension does (same conventions).
pub fn statistics_to_json(stats: &inference::ModelStatisticsResponse) -> serde_json::Value {
    message_to_json(stats, "inference.ModelStatisticsResponse", false)
}

fn message_to_json(
    message: &impl Message,
    type_name: &str,
    skip_defaults: bool,
) -> serde_json::Value {
    let descriptor = DESCRIPTORS
        .get_message_by_name(type_name)
        .expect("message type is in the descriptor set");
    let message = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message re-decodes with its own descriptor");
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_enum_numbers(false)
        .use_proto_field_name(true)
        .skip_default_fields(skip_defaults);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a protobuf message always serializes to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRITON_STYLE: &str = r#"
        # a comment, as Triton configs often have
        name: "gbr"
        platform: "onnxruntime_onnx"
        max_batch_size: 64
        input [
          { name: "X", data_type: TYPE_FP32, dims: [ 10 ] }
        ]
        output [ { name: "variable", data_type: TYPE_FP32, dims: [ 1 ] } ]
        dynamic_batching {
          preferred_batch_size: [ 16, 32 ]
          max_queue_delay_microseconds: 500
          priority_levels: 2
          default_priority_level: 2
          default_queue_policy { max_queue_size: 128 default_timeout_microseconds: 1000 }
          priority_queue_policy { key: 1 value: { max_queue_size: 8 } }
        }
        instance_group [ { count: 2, kind: KIND_CPU } ]
        version_policy: { latest { num_versions: 2 } }
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    "#;

    #[test]
    fn parses_a_triton_config_text() {
        let config = parse_config_text(TRITON_STYLE).unwrap();
        assert_eq!(config.name, "gbr");
        assert_eq!(config.max_batch_size, 64);
        assert_eq!(config.input[0].dims, vec![10]);
        assert_eq!(
            config.input[0].data_type,
            inference::DataType::TypeFp32 as i32
        );
        let Some(inference::model_config::SchedulingChoice::DynamicBatching(batching)) =
            &config.scheduling_choice
        else {
            panic!("dynamic batching expected");
        };
        assert_eq!(batching.preferred_batch_size, vec![16, 32]);
        assert_eq!(batching.priority_queue_policy[&1].max_queue_size, 8);
        assert_eq!(config.instance_group[0].count, 2);
        assert_eq!(config.parameters["intra_op_thread_count"].string_value, "1");
    }

    #[test]
    fn colon_is_added_only_before_lists_outside_strings_and_comments() {
        assert_eq!(
            colon_before_lists("input [ { dims: [ 1 ] } ] # input [x]\nname: \"a [b]\""),
            "input :[ { dims: [ 1 ] } ] # input [x]\nname: \"a [b]\""
        );
    }

    #[test]
    fn statistics_render_with_numbers_and_string_versions() {
        let stats = inference::ModelStatisticsResponse {
            model_stats: vec![inference::ModelStatistics {
                name: "m".into(),
                version: "1".into(),
                inference_count: 5,
                inference_stats: Some(inference::InferStatistics {
                    success: Some(inference::StatisticDuration { count: 5, ns: 1000 }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let json = statistics_to_json(&stats);
        let m = &json["model_stats"][0];
        assert_eq!(m["version"], "1");
        assert_eq!(m["inference_count"], 5);
        assert_eq!(m["inference_stats"]["success"]["ns"], 1000);
        assert_eq!(m["batch_stats"], serde_json::json!([]));
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = parse_config_text("name: \"m\"\nmax_batch: 4").unwrap_err();
        assert!(err.to_string().contains("max_batch"), "{err}");
    }

    #[test]
    fn json_uses_proto_names_enum_names_and_numbers() {
        let config = parse_config_text(TRITON_STYLE).unwrap();
        let json = config_to_json(&config);
        assert_eq!(json["max_batch_size"], 64);
        assert_eq!(json["input"][0]["data_type"], "TYPE_FP32");
        assert_eq!(json["input"][0]["dims"], serde_json::json!([10]));
        assert_eq!(
            json["dynamic_batching"]["max_queue_delay_microseconds"],
            500
        );
        assert_eq!(json["instance_group"][0]["kind"], "KIND_CPU");
        assert!(json.get("sequence_batching").is_none());
        let back = parse_config_json(&json.to_string()).unwrap();
        assert_eq!(back, config);
        let compact = config_to_compact_json(&config);
        assert!(
            compact.get("batch_input").is_none(),
            "defaults are left out"
        );
        assert_eq!(parse_config_json(&compact.to_string()).unwrap(), config);
    }
}
