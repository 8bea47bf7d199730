//! Reads an ONNX model's signature (graph inputs and outputs) straight from the protobuf, so the
//! registry CLI fills manifests without loading ONNX Runtime. Only the fields needed are declared;
//! prost skips the rest (weights included) without copying them.

use serde::{Deserialize, Serialize};

/// One graph input or output as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSignature {
    pub name: String,
    /// KServe datatype name (`FP32`, `INT64`, `BYTES`, …).
    pub datatype: String,
    /// Dimensions; -1 where the graph leaves one free (symbolic or unknown).
    pub shape: Vec<i64>,
}

/// A model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<TensorSignature>,
    pub outputs: Vec<TensorSignature>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dimension {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// ONNX `TensorProto.DataType` to the KServe datatype name.
fn datatype(elem_type: i32) -> Option<&'static str> {
    Some(match elem_type {
        1 => "FP32",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "BYTES",
        9 => "BOOL",
        10 => "FP16",
        11 => "FP64",
        12 => "UINT32",
        13 => "UINT64",
        16 => "BF16",
        _ => return None,
    })
}

/// Reads the signature of an ONNX model. Inputs that are initializers (weights given a default
/// value in old IR versions) are not inputs a client sends, so they are left out.
pub fn signature(model: &[u8]) -> Result<Signature, String> {
    let model: ModelProto = prost::Message::decode(model)
        .map_err(|e| format!("not an ONNX model (protobuf decoding failed: {e})"))?;
    let graph = model.graph.ok_or("the ONNX model has no graph")?;
    let describe = |values: &[ValueInfoProto], skip: &[TensorProto]| {
        values
            .iter()
            .filter(|v| !skip.iter().any(|i| i.name == v.name))
            .map(|v| {
                let tensor = v
                    .r#type
                    .as_ref()
                    .and_then(|t| t.tensor_type.as_ref())
                    .ok_or_else(|| {
                        format!(
                            "'{}' is not a tensor (maps and sequences are not served)",
                            v.name
                        )
                    })?;
                let datatype = datatype(tensor.elem_type).ok_or_else(|| {
                    format!(
                        "'{}' has ONNX element type {}, which the protocol cannot carry",
                        v.name, tensor.elem_type
                    )
                })?;
                let shape = tensor
                    .shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| d.dim_value.filter(|&v| v >= 0).unwrap_or(-1))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(TensorSignature {
                    name: v.name.clone(),
                    datatype: datatype.to_string(),
                    shape,
                })
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(Signature {
        inputs: describe(&graph.input, &graph.initializer)?,
        outputs: describe(&graph.output, &[])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn value(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                dim_value: *d,
                                dim_param: d.is_none().then(|| "batch".to_string()),
                            })
                            .collect(),
                    }),
                }),
            }),
        }
    }

    #[test]
    fn reads_inputs_outputs_and_skips_initializers() {
        let model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![TensorProto { name: "W".into() }],
                input: vec![value("X", 1, &[None, Some(10)]), value("W", 1, &[Some(10)])],
                output: vec![value("y", 7, &[None, Some(1)])],
            }),
        };
        let signature = signature(&model.encode_to_vec()).unwrap();
        assert_eq!(
            signature.inputs,
            vec![TensorSignature {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 10]
            }]
        );
        assert_eq!(signature.outputs[0].datatype, "INT64");
        assert_eq!(signature.outputs[0].shape, vec![-1, 1]);
    }

    #[test]
    fn garbage_is_not_a_model() {
        assert!(
            signature(b"certainly not protobuf \xff\xff")
                .unwrap_err()
                .contains("not an ONNX model")
        );
        assert!(signature(&[]).unwrap_err().contains("no graph"));
    }
}
