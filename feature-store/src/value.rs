//! Feature values and their types. One small closed set (integers, floats, booleans, strings)
//! covers what the platform's models read; its JSON form is what requests carry and what the
//! Redis store keeps, so a value reads back exactly as it was written.

use std::fmt;

/// A feature's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Int64,
    Float32,
    Float64,
    Bool,
    String,
}

impl DType {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "int64" => DType::Int64,
            "float32" => DType::Float32,
            "float64" => DType::Float64,
            "bool" => DType::Bool,
            "string" => DType::String,
            other => {
                return Err(format!(
                    "unknown dtype '{other}' (int64, float32, float64, bool, string)"
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
        }
    }

    /// The default of a feature that declares none.
    pub fn zero(self) -> FeatureValue {
        match self {
            DType::Int64 => FeatureValue::Int(0),
            DType::Float32 | DType::Float64 => FeatureValue::Float(0.0),
            DType::Bool => FeatureValue::Bool(false),
            DType::String => FeatureValue::String(String::new()),
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
            (DType::Int64, _) => Err("expected an integer".into()),
            (DType::Float32 | DType::Float64, _) => Err("expected a number".into()),
            (DType::Bool, _) => Err("expected true or false".into()),
            (DType::String, _) => Err("expected a string".into()),
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
        }
    }
}

impl fmt::Display for FeatureValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureValue::Int(v) => write!(f, "{v}"),
            // Rust prints the shortest text that parses back to the same f64.
            FeatureValue::Float(v) => write!(f, "{v}"),
            FeatureValue::Bool(v) => write!(f, "{v}"),
            FeatureValue::String(v) => f.write_str(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn json_forms_read_back_as_the_same_value(i in any::<i64>(), x in -1e300..1e300f64, s in ".*", b in any::<bool>()) {
            for (dtype, value) in [
                (DType::Int64, FeatureValue::Int(i)),
                (DType::Float64, FeatureValue::Float(x)),
                (DType::String, FeatureValue::String(s.clone())),
                (DType::Bool, FeatureValue::Bool(b)),
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
    }
}
