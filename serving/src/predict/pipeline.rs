//! A model's `/v1/predict` pipeline, declared with the model (`pipeline.json` in a repository,
//! `pipeline` in a registry manifest) rather than written in code per model: which named
//! features make up the input row (from the feature store or the request), how each is encoded
//! (standardise, clip, one-hot, hash buckets), and how the output becomes an answer (labels by
//! threshold, top-k classes). Checked against the model's signature and the feature definitions
//! when the version loads, so a request never meets a pipeline that cannot run.

use std::collections::BTreeSet;

use marquee_feature_store::{DType, Definitions, FeatureValue, FeatureView};
use serde::Deserialize;
use serde_json::Value;

use crate::model::ModelSpec;
use crate::tensor::DataType;

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The FP32 model input the encoded row goes into.
    pub input: String,
    pub features: Vec<PipelineFeature>,
    /// Feature views read, in order (their join keys name the entities a request must carry).
    pub views: Vec<FeatureView>,
    /// Encoded row width (the input's last dimension).
    pub width: usize,
    pub output: OutputSpec,
    pub cache: Option<CacheSpec>,
    /// Rules that answer when the time budget runs out and nothing is cached.
    pub fallback: Option<Fallback>,
}

/// One named feature of the row.
#[derive(Debug, Clone)]
pub struct PipelineFeature {
    pub name: String,
    /// The view it comes from (else only from the request) and its position there.
    pub view: Option<(usize, usize)>,
    pub dtype: DType,
    pub default: FeatureValue,
    pub transform: Transform,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// The number as it is (booleans as 0/1).
    Identity,
    Standardize {
        mean: f64,
        std: f64,
    },
    Clip {
        min: f64,
        max: f64,
    },
    /// One column per category; an unknown category sets none.
    OneHot(Vec<String>),
    /// One column per bucket; the value's FNV-1a hash picks the bucket.
    HashBuckets(usize),
}

impl Transform {
    fn width(&self) -> usize {
        match self {
            Transform::OneHot(categories) => categories.len(),
            Transform::HashBuckets(buckets) => *buckets,
            _ => 1,
        }
    }
}

/// How the output tensor becomes the answer.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub tensor: String,
    /// (minimum score, label), highest minimum first; the last may have no minimum.
    pub thresholds: Vec<(Option<f64>, String)>,
    pub top_k: Option<(usize, Vec<String>)>,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSpec {
    pub ttl: std::time::Duration,
    pub max_entries: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    input: String,
    features: Vec<FeatureFile>,
    output: OutputFile,
    cache: Option<CacheFile>,
    fallback: Option<FallbackFile>,
}

/// `{"outputs": {...}}` (one fixed answer) or `{"rules": [{"when": {...}, "outputs": {...}}]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackFile {
    outputs: Option<serde_json::Map<String, Value>>,
    rules: Option<Vec<RuleFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// Feature name -> a value it must equal, or `{"min": x, "max": y}` (either may be left out).
    #[serde(default)]
    when: serde_json::Map<String, Value>,
    outputs: serde_json::Map<String, Value>,
}

/// Answers without the model or the store, from the request's own values: the first rule whose
/// conditions all hold (a rule without conditions always does).
#[derive(Debug, Clone)]
pub struct Fallback {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// (feature position, condition)
    conditions: Vec<(usize, Condition)>,
    outputs: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone)]
enum Condition {
    Equals(FeatureValue),
    Range { min: Option<f64>, max: Option<f64> },
}

impl Fallback {
    /// The answer for one instance's feature values (in pipeline order); `None` if no rule holds.
    pub fn answer(&self, values: &[FeatureValue]) -> Option<serde_json::Map<String, Value>> {
        self.rules
            .iter()
            .find(|rule| {
                rule.conditions.iter().all(|(position, condition)| {
                    let value = &values[*position];
                    match condition {
                        Condition::Equals(expected) => value == expected,
                        Condition::Range { min, max } => {
                            let x = number(value);
                            min.is_none_or(|m| x >= m) && max.is_none_or(|m| x <= m)
                        }
                    }
                })
            })
            .map(|rule| rule.outputs.clone())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureFile {
    name: String,
    view: Option<String>,
    dtype: Option<String>,
    default: Option<Value>,
    #[serde(default)]
    transform: Option<TransformFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum TransformFile {
    Standardize { mean: f64, std: f64 },
    Clip([f64; 2]),
    OneHot(Vec<String>),
    HashBuckets(usize),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputFile {
    tensor: String,
    #[serde(default)]
    thresholds: Vec<ThresholdFile>,
    top_k: Option<TopKFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdFile {
    min: Option<f64>,
    label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopKFile {
    k: usize,
    labels: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    ttl_ms: u64,
    #[serde(default = "default_cache_entries")]
    max_entries: usize,
}

fn default_cache_entries() -> usize {
    10_000
}

impl Pipeline {
    /// Parses and checks a declared pipeline against the model and the feature definitions.
    pub fn parse(
        declared: &Value,
        spec: &ModelSpec,
        definitions: &Definitions,
    ) -> Result<Self, String> {
        let file: PipelineFile =
            serde_json::from_value(declared.clone()).map_err(|e| e.to_string())?;
        let (_, input) = spec.input(&file.input).ok_or_else(|| {
            format!(
                "input '{}' is not a model input (inputs: {})",
                file.input,
                names(spec.inputs.iter().map(|t| &t.name))
            )
        })?;
        if spec.inputs.len() != 1 {
            return Err("a pipeline feeds models with exactly one input".into());
        }
        if input.dtype != DataType::Fp32 || input.dims.len() != 1 || spec.max_batch_size == 0 {
            return Err(format!(
                "input '{}' must be a batched FP32 vector ([-1, n]) to take encoded features",
                file.input
            ));
        }
        let mut views: Vec<FeatureView> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut features = Vec::new();
        for feature in file.features {
            if !seen.insert(feature.name.clone()) {
                return Err(format!("feature '{}' is listed twice", feature.name));
            }
            let built = build_feature(feature, definitions, &mut views)?;
            features.push(built);
        }
        let width: usize = features.iter().map(|f| f.transform.width()).sum();
        if width == 0 {
            return Err("the pipeline declares no features".into());
        }
        if input.dims[0] >= 0 && input.dims[0] as usize != width {
            return Err(format!(
                "the features encode to {width} columns but input '{}' takes {}",
                file.input, input.dims[0]
            ));
        }
        if spec.output(&file.output.tensor).is_none() {
            return Err(format!(
                "output '{}' is not a model output (outputs: {})",
                file.output.tensor,
                names(spec.outputs.iter().map(|t| &t.name))
            ));
        }
        let mut thresholds: Vec<(Option<f64>, String)> = file
            .output
            .thresholds
            .into_iter()
            .map(|t| (t.min, t.label))
            .collect();
        thresholds.sort_by(|a, b| {
            b.0.unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&a.0.unwrap_or(f64::NEG_INFINITY))
        });
        let named = |key: &str| {
            (file.output.tensor == key)
                .then(|| format!("output '{key}' would be hidden by the answer's own '{key}'"))
        };
        if let Some(clash) = (!thresholds.is_empty())
            .then(|| named("label"))
            .flatten()
            .or_else(|| file.output.top_k.as_ref().and_then(|_| named("top_k")))
        {
            return Err(clash);
        }
        let top_k = match file.output.top_k {
            Some(top) if top.k == 0 || top.labels.is_empty() => {
                return Err("top_k needs k >= 1 and the class labels".into());
            }
            Some(top) => Some((top.k, top.labels)),
            None => None,
        };
        let fallback = file
            .fallback
            .map(|f| parse_fallback(f, &features))
            .transpose()?;
        Ok(Self {
            input: file.input,
            features,
            views,
            width,
            output: OutputSpec {
                tensor: file.output.tensor,
                thresholds,
                top_k,
            },
            cache: file.cache.map(|c| CacheSpec {
                ttl: std::time::Duration::from_millis(c.ttl_ms),
                max_entries: c.max_entries.max(1),
            }),
            fallback,
        })
    }

    /// Encodes one row of feature values (in `features` order) into `row`.
    pub fn encode(&self, values: &[FeatureValue], row: &mut Vec<f32>) {
        for (feature, value) in self.features.iter().zip(values) {
            match (&feature.transform, value) {
                (Transform::OneHot(categories), v) => {
                    let text = v.to_string();
                    row.extend(
                        categories
                            .iter()
                            .map(|c| if *c == text { 1.0 } else { 0.0 }),
                    );
                }
                (Transform::HashBuckets(buckets), v) => {
                    let hit = (fnv1a(v.to_string().as_bytes()) % *buckets as u64) as usize;
                    row.extend((0..*buckets).map(|b| if b == hit { 1.0 } else { 0.0 }));
                }
                (transform, v) => {
                    let x = number(v);
                    row.push(match transform {
                        Transform::Standardize { mean, std } => ((x - mean) / std) as f32,
                        Transform::Clip { min, max } => x.clamp(*min, *max) as f32,
                        _ => x as f32,
                    });
                }
            }
        }
    }

    /// The answer for one row of the output tensor.
    pub fn answer(&self, row: &[f64]) -> serde_json::Map<String, Value> {
        let mut outputs = serde_json::Map::new();
        let value = match row {
            [single] => json_number(*single),
            many => Value::Array(many.iter().map(|v| json_number(*v)).collect()),
        };
        outputs.insert(self.output.tensor.clone(), value);
        if let (Some(&score), false) = (row.first(), self.output.thresholds.is_empty()) {
            let label = self
                .output
                .thresholds
                .iter()
                .find(|(min, _)| min.is_none_or(|m| score >= m))
                .map(|(_, label)| label.clone());
            outputs.insert("label".into(), label.map_or(Value::Null, Value::String));
        }
        if let Some((k, labels)) = &self.output.top_k {
            let mut ranked: Vec<(usize, f64)> = row.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<Value> = ranked
                .into_iter()
                .take(*k)
                .map(|(i, score)| {
                    serde_json::json!({"label": labels.get(i).cloned().unwrap_or_else(|| i.to_string()), "score": json_number(score)})
                })
                .collect();
            outputs.insert("top_k".into(), Value::Array(top));
        }
        outputs
    }
}

fn build_feature(
    feature: FeatureFile,
    definitions: &Definitions,
    views: &mut Vec<FeatureView>,
) -> Result<PipelineFeature, String> {
    let at = |e: String| format!("feature '{}': {e}", feature.name);
    let (view, dtype, default) = match &feature.view {
        Some(view_name) => {
            let view = definitions.view(view_name).map_err(|e| at(e.to_string()))?;
            let (position, declared) = view
                .feature(&feature.name)
                .ok_or_else(|| at(format!("feature view '{view_name}' has no such feature")))?;
            if feature.dtype.is_some() || feature.default.is_some() {
                return Err(at(
                    "dtype and default come from the feature view; do not repeat them".into(),
                ));
            }
            let index = match views.iter().position(|v| v.name == *view_name) {
                Some(index) => index,
                None => {
                    views.push(view.clone());
                    views.len() - 1
                }
            };
            (
                Some((index, position)),
                declared.dtype,
                declared.default.clone(),
            )
        }
        None => {
            let dtype = DType::parse(feature.dtype.as_deref().unwrap_or("float64")).map_err(at)?;
            let default = match &feature.default {
                Some(value) => FeatureValue::from_json(dtype, value)
                    .map_err(|e| at(format!("default: {e}")))?,
                None => dtype.zero(),
            };
            (None, dtype, default)
        }
    };
    let transform = match feature.transform {
        None => Transform::Identity,
        Some(TransformFile::Standardize { mean, std }) if std > 0.0 => {
            Transform::Standardize { mean, std }
        }
        Some(TransformFile::Standardize { .. }) => {
            return Err(at("standardize needs std > 0".into()));
        }
        Some(TransformFile::Clip([min, max])) if min <= max => Transform::Clip { min, max },
        Some(TransformFile::Clip(_)) => {
            return Err(at("clip needs [min, max] with min <= max".into()));
        }
        Some(TransformFile::OneHot(categories)) if !categories.is_empty() => {
            Transform::OneHot(categories)
        }
        Some(TransformFile::HashBuckets(buckets)) if buckets > 0 => Transform::HashBuckets(buckets),
        Some(_) => {
            return Err(at(
                "one_hot needs categories and hash_buckets at least 1".into()
            ));
        }
    };
    let categorical = matches!(transform, Transform::OneHot(_) | Transform::HashBuckets(_));
    if dtype == DType::String && !categorical {
        return Err(at(
            "a string feature needs one_hot or hash_buckets to become numbers".into(),
        ));
    }
    Ok(PipelineFeature {
        name: feature.name,
        view,
        dtype,
        default,
        transform,
    })
}

fn parse_fallback(file: FallbackFile, features: &[PipelineFeature]) -> Result<Fallback, String> {
    let rules = match (file.outputs, file.rules) {
        (Some(outputs), None) => vec![RuleFile {
            when: serde_json::Map::new(),
            outputs,
        }],
        (None, Some(rules)) if !rules.is_empty() => rules,
        _ => return Err("fallback needs either outputs or a non-empty rules list".into()),
    };
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let conditions = rule
                .when
                .iter()
                .map(|(name, wanted)| {
                    let at = |e: String| format!("fallback rule {i}: '{name}': {e}");
                    let (position, feature) = features
                        .iter()
                        .enumerate()
                        .find(|(_, f)| f.name == *name)
                        .ok_or_else(|| at("not a feature of the pipeline".into()))?;
                    let condition = match wanted {
                        Value::Object(range) if range.keys().all(|k| k == "min" || k == "max") => {
                            let bound = |k: &str| range.get(k).and_then(Value::as_f64);
                            Condition::Range {
                                min: bound("min"),
                                max: bound("max"),
                            }
                        }
                        value => Condition::Equals(
                            FeatureValue::from_json(feature.dtype, value).map_err(at)?,
                        ),
                    };
                    Ok((position, condition))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Rule {
                conditions,
                outputs: rule.outputs,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Fallback { rules })
}

fn number(value: &FeatureValue) -> f64 {
    match value {
        FeatureValue::Int(v) => *v as f64,
        FeatureValue::Float(v) => *v,
        FeatureValue::Bool(v) => f64::from(u8::from(*v)),
        FeatureValue::String(_) => 0.0,
    }
}

fn json_number(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

fn names<'a>(items: impl Iterator<Item = &'a String>) -> String {
    items.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// 64-bit FNV-1a: a stable hash, so a category lands in the same bucket in training and serving.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
