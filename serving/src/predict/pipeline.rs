//! A model's `/v1/predict` pipeline, declared with the model (`pipeline.json` in a repository,
//! `pipeline` in a registry manifest) rather than written in code per model: which named
//! features an instance has (from the feature store or the request), and what becomes of them.
//! Two forms: a row pipeline encodes the features into one FP32 row (standardise, clip, one-hot,
//! hash buckets) for the model's one input and turns its output into an answer (labels by
//! threshold, top-k classes); a step pipeline runs declared steps (`steps.rs`: tokenize, model
//! calls, pooling...) and shows the values its `outputs` name. Checked against the model's
//! signature, the feature definitions and the version's files when the version loads, so a
//! request never meets a pipeline that cannot run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use marquee_feature_store::{DType, Definitions, FeatureValue, FeatureView};
use serde::Deserialize;
use serde_json::Value;

use super::expression::Expression;
use super::steps::{Kind, StepFile, Steps};
use crate::model::ModelSpec;
use crate::tensor::DataType;

/// A validated pipeline.
#[derive(Debug)]
pub struct Pipeline {
    pub features: Vec<PipelineFeature>,
    /// Feature views read, in order (their join keys name the entities a request must carry).
    pub views: Vec<FeatureView>,
    pub body: Body,
    /// The answer field shown again as the answer's top-level `prediction`.
    pub prediction: Option<String>,
    pub cache: Option<CacheSpec>,
    /// Rules that answer when the time budget runs out and nothing is cached.
    pub fallback: Option<Fallback>,
}

/// What a pipeline does with an instance's features.
#[derive(Debug)]
pub enum Body {
    Row(RowModel),
    Steps(Steps),
}

/// One encoded FP32 row into the model's one input, one output tensor out.
#[derive(Debug)]
pub struct RowModel {
    /// The FP32 model input the encoded row goes into.
    pub input: String,
    /// Encoded row width (the input's last dimension).
    pub width: usize,
    pub output: OutputSpec,
    /// The encoding of each feature, in feature order.
    pub transforms: Vec<Transform>,
}

/// The answer's top-level summary fields, from its outputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// The pipeline's main value (a score, a price, a vector).
    pub prediction: Option<Value>,
    pub label: Option<String>,
}

/// One named feature of an instance.
#[derive(Debug, Clone)]
pub struct PipelineFeature {
    pub name: String,
    /// The view it comes from (else only from the request) and its position there.
    pub view: Option<(usize, usize)>,
    pub dtype: DType,
    pub default: FeatureValue,
    /// The request must give it (a text to embed has no sensible default).
    pub required: bool,
    /// The values a request may give, inclusive (a weekday is 0 to 6).
    pub range: Option<(f64, f64)>,
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
    /// Row pipelines: the model input the row goes into, and what its output becomes.
    input: Option<String>,
    output: Option<OutputFile>,
    features: Vec<FeatureFile>,
    /// Step pipelines: the steps, and answer field -> value name.
    steps: Option<Vec<StepFile>>,
    outputs: Option<BTreeMap<String, String>>,
    /// The answer field repeated as the top-level `prediction` (row pipelines: the output tensor).
    prediction: Option<String>,
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
    /// Answer field -> a fixed value, or `{"expr": "..."}` computed from the features
    /// (`expression.rs`: a rule table's price is arithmetic on the base price).
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
    outputs: Vec<(String, RuleOutput)>,
}

#[derive(Debug, Clone)]
enum RuleOutput {
    Fixed(Value),
    /// An expression and the feature positions of the names it reads.
    Computed(Expression, Vec<usize>),
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
            .map(|rule| {
                rule.outputs
                    .iter()
                    .map(|(field, output)| {
                        let value = match output {
                            RuleOutput::Fixed(value) => value.clone(),
                            RuleOutput::Computed(expression, positions) => {
                                let operands: Vec<f64> =
                                    positions.iter().map(|&p| number(&values[p])).collect();
                                expression
                                    .eval(&operands)
                                    .map_or(Value::Null, super::steps::json_number)
                            }
                        };
                        (field.clone(), value)
                    })
                    .collect()
            })
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
    required: bool,
    /// [min, max]: what a request may give, inclusive.
    range: Option<[f64; 2]>,
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

/// The version files a declared pipeline needs (a tokenizer, an index), to be fetched before it
/// is parsed; none for a declaration that does not parse (parsing says why).
pub fn asset_names(declared: &Value) -> Vec<String> {
    let Some(steps) = declared.get("steps").and_then(Value::as_array) else {
        return Vec::new();
    };
    steps
        .iter()
        .filter_map(|step| serde_json::from_value::<StepFile>(step.clone()).ok())
        .filter_map(|step| step.assets().map(str::to_string))
        .collect()
}

impl Pipeline {
    /// Parses and checks a declared pipeline against the model, the feature definitions and the
    /// version files it names (`assets`).
    pub fn parse(
        declared: &Value,
        spec: &ModelSpec,
        definitions: &Definitions,
        assets: &HashMap<String, Bytes>,
    ) -> Result<Self, String> {
        let file: PipelineFile =
            serde_json::from_value(declared.clone()).map_err(|e| e.to_string())?;
        let mut views: Vec<FeatureView> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut features = Vec::new();
        let mut transforms = Vec::new();
        for feature in file.features {
            if !seen.insert(feature.name.clone()) {
                return Err(format!("feature '{}' is listed twice", feature.name));
            }
            let (built, transform) = build_feature(feature, definitions, &mut views)?;
            features.push(built);
            transforms.push(transform);
        }
        let (body, prediction) = match (file.steps, file.input, file.output) {
            (Some(steps), None, None) => {
                if transforms.iter().any(|t| t.is_some()) {
                    return Err(
                        "feature transforms encode a row pipeline's row; a step pipeline reads features as they are".into(),
                    );
                }
                let given: Vec<(String, Kind)> = features
                    .iter()
                    .map(|f| (f.name.clone(), Kind::of(f.dtype)))
                    .collect();
                let outputs = file.outputs.unwrap_or_default();
                if let Some(field) = &file.prediction
                    && !outputs.contains_key(field)
                {
                    return Err(format!("prediction '{field}' is not one of the outputs"));
                }
                let steps = Steps::parse(steps, outputs, &given, spec, assets)?;
                (Body::Steps(steps), file.prediction)
            }
            (None, Some(input), Some(output)) => {
                if file.outputs.is_some() {
                    return Err(
                        "outputs belongs to step pipelines; a row pipeline has output".into(),
                    );
                }
                let transforms = features
                    .iter()
                    .zip(transforms)
                    .map(|(feature, transform)| check_transform(feature, transform))
                    .collect::<Result<Vec<_>, _>>()?;
                let row = RowModel::parse(input, output, transforms, spec)?;
                if file.prediction.is_some() {
                    return Err(
                        "a row pipeline's prediction is its output tensor; leave prediction out"
                            .into(),
                    );
                }
                let prediction = Some(row.output.tensor.clone());
                (Body::Row(row), prediction)
            }
            (Some(_), _, _) => {
                return Err("a step pipeline has steps and outputs, not input and output".into());
            }
            _ => {
                return Err(
                    "a pipeline needs input and output (one encoded row for the model) or steps and outputs".into(),
                );
            }
        };
        let fallback = file
            .fallback
            .map(|f| parse_fallback(f, &features))
            .transpose()?;
        Ok(Self {
            features,
            views,
            body,
            prediction,
            cache: file.cache.map(|c| CacheSpec {
                ttl: std::time::Duration::from_millis(c.ttl_ms),
                max_entries: c.max_entries.max(1),
            }),
            fallback,
        })
    }

    /// The summary fields of an answer with these outputs.
    pub fn summary(&self, outputs: &serde_json::Map<String, Value>) -> Summary {
        Summary {
            prediction: self
                .prediction
                .as_ref()
                .and_then(|field| outputs.get(field))
                .cloned(),
            label: outputs
                .get("label")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// Whether a step pipeline's answer has the field `field`.
    pub fn shows(&self, field: &str) -> bool {
        match &self.body {
            Body::Steps(steps) => steps.outputs.iter().any(|(name, _)| name == field),
            Body::Row(_) => false,
        }
    }

    /// The one text feature a request gives (what `/v1/embeddings` fills), if the pipeline has
    /// exactly one.
    pub fn text_feature(&self) -> Option<&str> {
        let mut texts = self
            .features
            .iter()
            .filter(|f| f.dtype == DType::String && f.view.is_none());
        match (texts.next(), texts.next()) {
            (Some(only), None) => Some(&only.name),
            _ => None,
        }
    }
}

impl RowModel {
    fn parse(
        input_name: String,
        output: OutputFile,
        transforms: Vec<Transform>,
        spec: &ModelSpec,
    ) -> Result<Self, String> {
        let (_, input) = spec.input(&input_name).ok_or_else(|| {
            format!(
                "input '{}' is not a model input (inputs: {})",
                input_name,
                names(spec.inputs.iter().map(|t| &t.name))
            )
        })?;
        if spec.inputs.len() != 1 {
            return Err("a row pipeline feeds models with exactly one input".into());
        }
        if input.dtype != DataType::Fp32 || input.dims.len() != 1 || spec.max_batch_size == 0 {
            return Err(format!(
                "input '{}' must be a batched FP32 vector ([-1, n]) to take encoded features",
                input_name
            ));
        }
        let width: usize = transforms.iter().map(Transform::width).sum();
        if width == 0 {
            return Err("the pipeline declares no features".into());
        }
        if input.dims[0] >= 0 && input.dims[0] as usize != width {
            return Err(format!(
                "the features encode to {width} columns but input '{}' takes {}",
                input_name, input.dims[0]
            ));
        }
        if spec.output(&output.tensor).is_none() {
            return Err(format!(
                "output '{}' is not a model output (outputs: {})",
                output.tensor,
                names(spec.outputs.iter().map(|t| &t.name))
            ));
        }
        let mut thresholds: Vec<(Option<f64>, String)> = output
            .thresholds
            .into_iter()
            .map(|t| (t.min, t.label))
            .collect();
        thresholds.sort_by(|a, b| {
            b.0.unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&a.0.unwrap_or(f64::NEG_INFINITY))
        });
        let named = |key: &str| {
            (output.tensor == key)
                .then(|| format!("output '{key}' would be hidden by the answer's own '{key}'"))
        };
        if let Some(clash) = (!thresholds.is_empty())
            .then(|| named("label"))
            .flatten()
            .or_else(|| output.top_k.as_ref().and_then(|_| named("top_k")))
        {
            return Err(clash);
        }
        let top_k = match output.top_k {
            Some(top) if top.k == 0 || top.labels.is_empty() => {
                return Err("top_k needs k >= 1 and the class labels".into());
            }
            Some(top) => Some((top.k, top.labels)),
            None => None,
        };
        Ok(Self {
            input: input_name,
            width,
            output: OutputSpec {
                tensor: output.tensor,
                thresholds,
                top_k,
            },
            transforms,
        })
    }

    /// Encodes one row of feature values (in `features` order) into `row`.
    pub fn encode(&self, values: &[FeatureValue], row: &mut Vec<f32>) {
        for (transform, value) in self.transforms.iter().zip(values) {
            match (transform, value) {
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
) -> Result<(PipelineFeature, Option<TransformFile>), String> {
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
    if feature.required && (view.is_some() || feature.default.is_some()) {
        return Err(at(
            "a required feature comes from the request only: no view, no default".into(),
        ));
    }
    let range = match feature.range {
        Some(_) if !dtype.is_number() => {
            return Err(at(format!(
                "range bounds numbers; this feature is {}",
                dtype.name()
            )));
        }
        Some([min, max]) if min <= max => Some((min, max)),
        Some(_) => return Err(at("range needs [min, max] with min <= max".into())),
        None => None,
    };
    Ok((
        PipelineFeature {
            name: feature.name,
            view,
            dtype,
            default,
            required: feature.required,
            range,
        },
        feature.transform,
    ))
}

/// A row pipeline's encoding of `feature`.
fn check_transform(
    feature: &PipelineFeature,
    transform: Option<TransformFile>,
) -> Result<Transform, String> {
    let at = |e: &str| format!("feature '{}': {e}", feature.name);
    let transform = match transform {
        None => Transform::Identity,
        Some(TransformFile::Standardize { mean, std }) if std > 0.0 => {
            Transform::Standardize { mean, std }
        }
        Some(TransformFile::Standardize { .. }) => return Err(at("standardize needs std > 0")),
        Some(TransformFile::Clip([min, max])) if min <= max => Transform::Clip { min, max },
        Some(TransformFile::Clip(_)) => return Err(at("clip needs [min, max] with min <= max")),
        Some(TransformFile::OneHot(categories)) if !categories.is_empty() => {
            Transform::OneHot(categories)
        }
        Some(TransformFile::HashBuckets(buckets)) if buckets > 0 => Transform::HashBuckets(buckets),
        Some(_) => return Err(at("one_hot needs categories and hash_buckets at least 1")),
    };
    if feature.dtype.is_list() {
        return Err(at(
            "a list feature is read by steps; a row pipeline encodes single values",
        ));
    }
    let categorical = matches!(transform, Transform::OneHot(_) | Transform::HashBuckets(_));
    if feature.dtype == DType::String && !categorical {
        return Err(at(
            "a string feature needs one_hot or hash_buckets to become numbers",
        ));
    }
    Ok(transform)
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
            let outputs = rule
                .outputs
                .into_iter()
                .map(|(field, value)| {
                    let at = |e: String| format!("fallback rule {i}: output '{field}': {e}");
                    let output = match value {
                        Value::Object(object) if object.contains_key("expr") => {
                            let text = match (object.get("expr"), object.len()) {
                                (Some(Value::String(text)), 1) => text,
                                _ => {
                                    return Err(at(
                                        "a computed output is {\"expr\": \"...\"} alone".into(),
                                    ));
                                }
                            };
                            let expression = Expression::parse(text).map_err(at)?;
                            let positions = expression
                                .names()
                                .iter()
                                .map(|name| {
                                    features
                                        .iter()
                                        .position(|f| f.name == *name && f.dtype.is_number())
                                        .ok_or_else(|| {
                                            at(format!(
                                                "'{name}' is not a numeric feature of the pipeline"
                                            ))
                                        })
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            RuleOutput::Computed(expression, positions)
                        }
                        value => RuleOutput::Fixed(value),
                    };
                    Ok((field, output))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Rule {
                conditions,
                outputs,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Fallback { rules })
}

/// A feature value as a number (booleans 0/1; text and lists, which no step reads as a number, 0).
pub(crate) fn number(value: &FeatureValue) -> f64 {
    match value {
        FeatureValue::Int(v) => *v as f64,
        FeatureValue::Float(v) => *v,
        FeatureValue::Bool(v) => f64::from(u8::from(*v)),
        FeatureValue::String(_)
        | FeatureValue::Ints(_)
        | FeatureValue::Floats(_)
        | FeatureValue::Strings(_) => 0.0,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &str, dtype: DType) -> PipelineFeature {
        PipelineFeature {
            name: name.into(),
            view: None,
            dtype,
            default: dtype.zero(),
            required: false,
            range: None,
        }
    }

    fn fallback(declared: Value, features: &[PipelineFeature]) -> Result<Fallback, String> {
        parse_fallback(serde_json::from_value(declared).unwrap(), features)
    }

    #[test]
    fn a_fallback_output_may_be_computed_from_the_features() {
        let features = [
            feature("base_price", DType::Float64),
            feature("weekday", DType::Int64),
            feature("city", DType::String),
        ];
        let rules = fallback(
            serde_json::json!({"rules": [
                {"when": {"weekday": {"min": 5}}, "outputs": {"price": {"expr": "base_price * 1.15"}, "rule": "weekend"}},
                {"outputs": {"price": {"expr": "base_price"}, "rule": "weekday"}}
            ]}),
            &features,
        )
        .unwrap();
        let answer = |weekday| {
            rules
                .answer(&[
                    FeatureValue::Float(10.0),
                    FeatureValue::Int(weekday),
                    FeatureValue::String("x".into()),
                ])
                .unwrap()
        };
        assert_eq!(answer(6)["price"], serde_json::json!(11.5));
        assert_eq!(answer(6)["rule"], "weekend");
        assert_eq!(answer(1)["price"], serde_json::json!(10.0));
        for (declared, says) in [
            (
                serde_json::json!({"outputs": {"price": {"expr": "city * 2"}}}),
                "not a numeric feature",
            ),
            (
                serde_json::json!({"outputs": {"price": {"expr": "nothing + 1"}}}),
                "'nothing'",
            ),
            (
                serde_json::json!({"outputs": {"price": {"expr": "base_price", "unit": "EUR"}}}),
                "alone",
            ),
            (
                serde_json::json!({"outputs": {"price": {"expr": "base_price +"}}}),
                "expression",
            ),
        ] {
            let error = fallback(declared.clone(), &features).unwrap_err();
            assert!(error.contains(says), "{declared}: {error}");
        }
    }
}
