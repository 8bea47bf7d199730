//! Feature values and their types. One small closed set (integers, floats, booleans, strings, and
//! lists of integers, float32s or strings: a user's vector, the movies they booked) covers what
//! the platform's models read; its JSON form is what requests carry and what the Redis store
//! keeps, so a value reads back exactly as it was written.

use std::fmt;

/// A feature's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Int64,
    Float32,
    Float64,
    Bool,
    String,
    Int64List,
    /// A vector (an embedding).
    Float32List,
    StringList,
}

impl DType {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "int64" => DType::Int64,
            "float32" => DType::Float32,
            "float64" => DType::Float64,
            "bool" => DType::Bool,
            "string" => DType::String,
            "list<int64>" => DType::Int64List,
            "list<float32>" => DType::Float32List,
            "list<string>" => DType::StringList,
            other => {
                return Err(format!(
                    "unknown dtype '{other}' (int64, float32, float64, bool, string, list<int64>, list<float32>, list<string>)"
                ));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Int64 => "int64",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Bool => "bool",
            DType::String => "string",
            DType::Int64List => "list<int64>",
            DType::Float32List => "list<float32>",
            DType::StringList => "list<string>",
        }
    }

    /// Whether a value of this type is one number (booleans count: 0 or 1).
    pub fn is_number(self) -> bool {
        matches!(
            self,
            DType::Int64 | DType::Float32 | DType::Float64 | DType::Bool
        )
    }

    pub fn is_list(self) -> bool {
        matches!(
            self,
            DType::Int64List | DType::Float32List | DType::StringList
        )
    }

    /// The default of a feature that declares none.
    pub fn zero(self) -> FeatureValue {
        match self {
            DType::Int64 => FeatureValue::Int(0),
            DType::Float32 | DType::Float64 => FeatureValue::Float(0.0),
            DType::Bool => FeatureValue::Bool(false),
            DType::String => FeatureValue::String(String::new()),
            DType::Int64List => FeatureValue::Ints(Vec::new()),
            DType::Float32List => FeatureValue::Floats(Vec::new()),
            DType::StringList => FeatureValue::Strings(Vec::new()),
        }
    }
}

/// One feature value. Floats of both widths are held as f64; float32 features are rounded to
/// f32 when stored, so what is read back is what a float32 model input would see.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strings(Vec<String>),
}

impl FeatureValue {
    /// A TOML value as `dtype` (an integer is accepted for a float).
    pub fn from_toml(dtype: DType, value: &toml::Value) -> Result<Self, String> {
        let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
        Self::from_json(dtype, &json)
    }

    /// A JSON value as `dtype`: how request features and materialised rows arrive.
    pub fn from_json(dtype: DType, value: &serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        match (dtype, value) {
            (DType::Int64, Value::Number(n)) => n
                .as_i64()
                .map(FeatureValue::Int)
                .ok_or_else(|| "expected an integer".to_string()),
            (DType::Float32, Value::Number(n)) => Ok(FeatureValue::Float(
                n.as_f64().unwrap_or(f64::NAN) as f32 as f64,
            )),
            (DType::Float64, Value::Number(n)) => {
                Ok(FeatureValue::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
            (DType::Bool, Value::Bool(b)) => Ok(FeatureValue::Bool(*b)),
            (DType::String, Value::String(s)) => Ok(FeatureValue::String(s.clone())),
            (DType::Int64List, Value::Array(items)) => {
                list(items, |item| item.as_i64(), "an integer").map(FeatureValue::Ints)
            }
            (DType::Float32List, Value::Array(items)) => list(
                items,
                |item| item.as_f64().map(|v| v as f32).filter(|v| v.is_finite()),
                "a number within float32's range",
            )
            .map(FeatureValue::Floats),
            (DType::StringList, Value::Array(items)) => {
                list(items, |item| item.as_str().map(str::to_string), "a string")
                    .map(FeatureValue::Strings)
            }
            (DType::Int64, _) => Err("expected an integer".into()),
            (DType::Float32 | DType::Float64, _) => Err("expected a number".into()),
            (DType::Bool, _) => Err("expected true or false".into()),
            (DType::String, _) => Err("expected a string".into()),
            (DType::Int64List, _) => Err("expected a list of integers".into()),
            (DType::Float32List, _) => Err("expected a list of numbers".into()),
            (DType::StringList, _) => Err("expected a list of strings".into()),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FeatureValue::Int(v) => (*v).into(),
            FeatureValue::Float(v) => serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            FeatureValue::Bool(v) => (*v).into(),
            FeatureValue::String(v) => v.clone().into(),
            FeatureValue::Ints(v) => v.clone().into(),
            FeatureValue::Floats(v) => v
                .iter()
                .map(|&x| {
                    serde_json::Number::from_f64(f64::from(x))
                        .map_or(serde_json::Value::Null, serde_json::Value::Number)
                })
                .collect(),
            FeatureValue::Strings(v) => v.clone().into(),
        }
    }
}

/// The items of a JSON list, each read by `item` (`what` names what it must be).
fn list<T>(
    items: &[serde_json::Value],
    item: impl Fn(&serde_json::Value) -> Option<T>,
    what: &str,
) -> Result<Vec<T>, String> {
    items
        .iter()
        .enumerate()
        .map(|(i, value)| item(value).ok_or_else(|| format!("item {i}: expected {what}")))
        .collect()
}

impl fmt::Display for FeatureValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureValue::Int(v) => write!(f, "{v}"),
            // Rust prints the shortest text that parses back to the same f64.
            FeatureValue::Float(v) => write!(f, "{v}"),
            FeatureValue::Bool(v) => write!(f, "{v}"),
            FeatureValue::String(v) => f.write_str(v),
            FeatureValue::Ints(_) | FeatureValue::Floats(_) | FeatureValue::Strings(_) => {
                write!(f, "{}", self.to_json())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn json_forms_read_back_as_the_same_value(i in any::<i64>(), x in -1e300..1e300f64, y in -1e30..1e30f32, s in ".*", b in any::<bool>()) {
            for (dtype, value) in [
                (DType::Int64, FeatureValue::Int(i)),
                (DType::Float64, FeatureValue::Float(x)),
                (DType::String, FeatureValue::String(s.clone())),
                (DType::Bool, FeatureValue::Bool(b)),
                (DType::Int64List, FeatureValue::Ints(vec![i, 0, -1])),
                (DType::Float32List, FeatureValue::Floats(vec![y, 0.1, -2.5e-30])),
                (DType::StringList, FeatureValue::Strings(vec![s.clone(), String::new()])),
            ] {
                let text = value.to_json().to_string();
                let back: serde_json::Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(FeatureValue::from_json(dtype, &back).unwrap(), value);
            }
        }
    }

    #[test]
    fn json_values_are_checked_against_the_dtype() {
        use serde_json::json;
        assert_eq!(
            FeatureValue::from_json(DType::Float32, &json!(0.1)).unwrap(),
            FeatureValue::Float(0.1f32 as f64)
        );
        assert_eq!(
            FeatureValue::from_json(DType::Int64, &json!(2.5)).unwrap_err(),
            "expected an integer"
        );
        assert_eq!(
            FeatureValue::from_json(DType::Bool, &json!("yes")).unwrap_err(),
            "expected true or false"
        );
        assert_eq!(
            FeatureValue::from_json(DType::StringList, &json!(["m1", 2])).unwrap_err(),
            "item 1: expected a string"
        );
        assert_eq!(
            FeatureValue::from_json(DType::Float32List, &json!("0.5")).unwrap_err(),
            "expected a list of numbers"
        );
        assert_eq!(
            DType::parse("list<float32>").unwrap().zero(),
            FeatureValue::Floats(Vec::new())
        );
    }
}
