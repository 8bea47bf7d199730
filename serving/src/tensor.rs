//! Tensors as the server carries them between the wire and the backend: a data type, a shape and
//! the elements in the little-endian layout that both the binary HTTP extension and gRPC's raw
//! contents use, so the common fast paths copy bytes and never parse numbers.

use bytes::Bytes;
use half::{bf16, f16};

/// A tensor that does not hold together (shape, size, element values); always the client's
/// mistake, so callers map it to invalid input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

/// The tensor element types of the KServe v2 protocol (Triton's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol's name: `FP32`, `BYTES`, …
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element, `None` for variable-length `BYTES`.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tensor elements: fixed-size types as little-endian bytes, `BYTES` as one buffer per element.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fixed(Bytes),
    Strings(Vec<Bytes>),
}

/// A named tensor with a concrete shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Number of elements a shape holds; `None` when a dimension is negative or it overflows.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

impl Tensor {
    /// Builds a tensor and checks that the data holds exactly what the shape says.
    pub fn new(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<i64>,
        data: TensorData,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let count = element_count(&shape).ok_or_else(|| {
            TensorError(format!("tensor '{name}' has an invalid shape {shape:?}"))
        })?;
        match (&data, dtype.size()) {
            (TensorData::Fixed(bytes), Some(size)) => {
                let needed = count.checked_mul(size).ok_or_else(|| {
                    TensorError(format!("tensor '{name}' shape {shape:?} is too large"))
                })?;
                if bytes.len() != needed {
                    return Err(TensorError(format!(
                        "tensor '{name}' of shape {shape:?} and type {dtype} needs {needed} bytes, got {}",
                        bytes.len()
                    )));
                }
            }
            (TensorData::Strings(items), None) => {
                if items.len() != count {
                    return Err(TensorError(format!(
                        "tensor '{name}' of shape {shape:?} needs {count} BYTES elements, got {}",
                        items.len()
                    )));
                }
            }
            _ => {
                return Err(TensorError(format!(
                    "tensor '{name}': data does not match type {dtype}"
                )));
            }
        }
        Ok(Self {
            name,
            dtype,
            shape,
            data,
        })
    }

    /// Elements in the tensor.
    pub fn len(&self) -> usize {
        element_count(&self.shape).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor's elements in the wire's raw layout: little-endian values, or for `BYTES` each
    /// element as a 4-byte little-endian length followed by its bytes.
    pub fn to_raw(&self) -> Bytes {
        match &self.data {
            TensorData::Fixed(bytes) => bytes.clone(),
            TensorData::Strings(items) => {
                let total = items.iter().map(|i| 4 + i.len()).sum();
                let mut raw = Vec::with_capacity(total);
                for item in items {
                    raw.extend_from_slice(&(item.len() as u32).to_le_bytes());
                    raw.extend_from_slice(item);
                }
                raw.into()
            }
        }
    }

    /// Reads elements from the wire's raw layout (see [`Tensor::to_raw`]).
    pub fn from_raw(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<i64>,
        raw: Bytes,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let data = if dtype == DataType::Bytes {
            TensorData::Strings(
                split_length_prefixed(&raw)
                    .map_err(|e| TensorError(format!("tensor '{name}': {e}")))?,
            )
        } else {
            TensorData::Fixed(raw)
        };
        Tensor::new(name, dtype, shape, data)
    }

    /// The bytes of a fixed-size tensor; `None` for `BYTES`.
    pub fn fixed_bytes(&self) -> Option<&Bytes> {
        match &self.data {
            TensorData::Fixed(b) => Some(b),
            TensorData::Strings(_) => None,
        }
    }

    /// Elements as JSON values, flat in row-major order, as the v2 REST protocol writes them.
    pub fn to_json_values(&self) -> Result<Vec<serde_json::Value>, TensorError> {
        match serde_json::to_value(self.json_data()) {
            Ok(serde_json::Value::Array(values)) => Ok(values),
            Ok(_) => unreachable!("tensor data serializes as a sequence"),
            Err(e) => Err(TensorError(e.to_string())),
        }
    }

    /// A view that serializes the elements as a flat JSON array, each in its own type (an FP32
    /// prints as the shortest text that reads back as the same FP32).
    pub fn json_data(&self) -> JsonData<'_> {
        JsonData(self)
    }

    /// Builds a tensor from a JSON `data` array, nested or flat, as the v2 REST protocol sends it.
    pub fn from_json(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<i64>,
        data: &serde_json::Value,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let mut flat = Vec::new();
        flatten_json(data, &mut flat);
        let bad = |index: usize, value: &serde_json::Value| {
            TensorError(format!(
                "input '{name}': element {index} ({value}) is not a valid {dtype}"
            ))
        };
        let tensor_data = if dtype == DataType::Bytes {
            let items = flat
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    serde_json::Value::String(s) => Ok(Bytes::from(s.clone().into_bytes())),
                    other => Err(bad(i, other)),
                })
                .collect::<Result<_, _>>()?;
            TensorData::Strings(items)
        } else {
            let size = dtype.size().expect("fixed-size type");
            let mut out = Vec::with_capacity(flat.len() * size);
            for (i, v) in flat.iter().enumerate() {
                encode_json_number(dtype, v, &mut out).ok_or_else(|| bad(i, v))?;
            }
            TensorData::Fixed(out.into())
        };
        Tensor::new(name, dtype, shape, tensor_data)
    }
}

/// See [`Tensor::json_data`].
pub struct JsonData<'a>(&'a Tensor);

impl serde::Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let tensor = self.0;
        let mut seq = serializer.serialize_seq(Some(tensor.len()))?;
        let bytes = match &tensor.data {
            TensorData::Strings(items) => {
                for item in items {
                    let text = std::str::from_utf8(item).map_err(|_| {
                        S::Error::custom(format!(
                            "output '{}' holds bytes that are not UTF-8 and cannot be JSON: request it with binary_data",
                            tensor.name
                        ))
                    })?;
                    seq.serialize_element(text)?;
                }
                return seq.end();
            }
            TensorData::Fixed(bytes) => bytes,
        };
        macro_rules! each {
            ($t:ty, $n:literal, $conv:expr) => {
                for c in bytes.chunks_exact($n) {
                    let v = <$t>::from_le_bytes(c.try_into().expect("chunk size"));
                    #[allow(clippy::redundant_closure_call)]
                    seq.serialize_element(&($conv)(v))?;
                }
            };
        }
        match tensor.dtype {
            DataType::Bool => each!(u8, 1, |b: u8| b != 0),
            DataType::Uint8 => each!(u8, 1, |v| v),
            DataType::Int8 => each!(i8, 1, |v| v),
            DataType::Uint16 => each!(u16, 2, |v| v),
            DataType::Int16 => each!(i16, 2, |v| v),
            DataType::Uint32 => each!(u32, 4, |v| v),
            DataType::Int32 => each!(i32, 4, |v| v),
            DataType::Uint64 => each!(u64, 8, |v| v),
            DataType::Int64 => each!(i64, 8, |v| v),
            DataType::Fp16 => each!(u16, 2, |b| f16::from_bits(b).to_f32()),
            DataType::Bf16 => each!(u16, 2, |b| bf16::from_bits(b).to_f32()),
            DataType::Fp32 => each!(f32, 4, |v| v),
            DataType::Fp64 => each!(f64, 8, |v| v),
            DataType::Bytes => unreachable!("BYTES is stored as strings"),
        }
        seq.end()
    }
}

fn flatten_json<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|v| flatten_json(v, out)),
        other => out.push(other),
    }
}

/// Appends one JSON element in little-endian form; `None` when it is not a valid `dtype` value.
fn encode_json_number(dtype: DataType, v: &serde_json::Value, out: &mut Vec<u8>) -> Option<()> {
    macro_rules! int {
        ($t:ty) => {{
            let n: $t = if let Some(i) = v.as_i64() {
                <$t>::try_from(i).ok()?
            } else {
                <$t>::try_from(v.as_u64()?).ok()?
            };
            out.extend_from_slice(&n.to_le_bytes());
        }};
    }
    match dtype {
        DataType::Bool => out.push(match v {
            serde_json::Value::Bool(b) => *b as u8,
            _ => return None,
        }),
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Fp16 => out.extend_from_slice(&f16::from_f64(v.as_f64()?).to_le_bytes()),
        DataType::Bf16 => out.extend_from_slice(&bf16::from_f64(v.as_f64()?).to_le_bytes()),
        DataType::Fp32 => out.extend_from_slice(&(v.as_f64()? as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&v.as_f64()?.to_le_bytes()),
        DataType::Bytes => return None,
    }
    Some(())
}

/// Splits the raw `BYTES` layout: 4-byte little-endian length, then that many bytes, repeated.
pub fn split_length_prefixed(raw: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut items = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let Some(prefix) = raw.get(at..at + 4) else {
            return Err(format!(
                "BYTES data is truncated: {} stray bytes where a 4-byte length was expected",
                raw.len() - at
            ));
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= raw.len())
            .ok_or_else(|| {
                format!(
                    "BYTES element {} claims {len} bytes but only {} remain",
                    items.len(),
                    raw.len() - start
                )
            })?;
        items.push(raw.slice(start..end));
        at = end;
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip_for_every_fixed_type() {
        for dtype in DataType::ALL {
            let data = match dtype {
                DataType::Bool => json!([[true, false], [false, true]]),
                DataType::Bytes => json!(["a", "bc", "", "d"]),
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                    json!([[-1, 2], [3, -4]])
                }
                DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                    json!([[0.5, -1.5], [2.0, 3.25]])
                }
                _ => json!([[1, 2], [3, 4]]),
            };
            let tensor = Tensor::from_json("x", dtype, vec![2, 2], &data).unwrap();
            let flat: Vec<serde_json::Value> = data
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]))
                .collect();
            assert_eq!(tensor.to_json_values().unwrap(), flat, "{dtype}");
            let raw = Tensor::from_raw("x", dtype, vec![2, 2], tensor.to_raw()).unwrap();
            assert_eq!(raw, tensor, "{dtype} raw round trip");
        }
    }

    #[test]
    fn fp32_prints_in_its_shortest_form() {
        let tensor =
            Tensor::from_json("x", DataType::Fp32, vec![2], &json!([0.1, 4.479113])).unwrap();
        assert_eq!(
            serde_json::to_string(&tensor.json_data()).unwrap(),
            "[0.1,4.479113]"
        );
    }

    #[test]
    fn out_of_range_and_wrong_kind_values_are_named() {
        let err = Tensor::from_json("x", DataType::Uint8, vec![2], &json!([1, 256])).unwrap_err();
        assert!(
            err.to_string()
                .contains("element 1 (256) is not a valid UINT8"),
            "{err}"
        );
        let err = Tensor::from_json("x", DataType::Fp32, vec![1], &json!(["a"])).unwrap_err();
        assert!(err.to_string().contains("is not a valid FP32"), "{err}");
        let err = Tensor::from_json("x", DataType::Int32, vec![3], &json!([1, 2])).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes, got 8"), "{err}");
    }

    #[test]
    fn truncated_bytes_are_rejected() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&5u32.to_le_bytes());
        raw.extend_from_slice(b"abc");
        let err = Tensor::from_raw("s", DataType::Bytes, vec![1], raw.into()).unwrap_err();
        assert!(
            err.to_string().contains("claims 5 bytes but only 3 remain"),
            "{err}"
        );
        let err = split_length_prefixed(&Bytes::from_static(&[1, 0])).unwrap_err();
        assert!(err.contains("truncated"));
    }

    #[test]
    fn negative_or_huge_shapes_are_invalid() {
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
        assert_eq!(element_count(&[]), Some(1));
        assert!(
            Tensor::new(
                "x",
                DataType::Fp32,
                vec![-2],
                TensorData::Fixed(Bytes::new())
            )
            .is_err()
        );
    }
}
