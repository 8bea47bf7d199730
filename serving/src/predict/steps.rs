//! Multi-stage pipelines: what a model needs around it when "one row of numbers in, one tensor
//! out" is not enough. A pipeline with `steps` runs them in order over every instance of a
//! request at once: each step reads named values (the pipeline's features to begin with) and
//! writes new ones, and `outputs` names which become the answer. Steps are few and general
//! (tokenize text, call a model, pool, normalise, rank, make a grid of candidates, stack values
//! into rows, compute, pick the best) so a new model is a new declaration, not new code. Every
//! name a step reads is checked when the version loads: a pipeline that could not run is refused
//! then, never met by a request. Model calls go through the called model's own batcher, exactly
//! as `/v2` requests do; an instance may bring several rows to a call (the candidates a search
//! scores), and they are batched with everyone else's.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::expression::Expression;
use super::items::{Cap, ItemIndex, diverse_order};
use super::pipeline::Body;
use crate::error::ServingError;
use crate::infer::{InferRequest, RequestedOutput};
use crate::model::{LoadedModel, ModelSpec, PipelineState};
use crate::models::ModelManager;
use crate::tensor::{DataType, Tensor, TensorData};
use marquee_feature_store::{DType, FeatureValue};

use super::CHUNKS_IN_FLIGHT;

/// The longest text a tokenize step takes, in bytes: the tokenizer reads a text whole before
/// truncating it, so a longer one would only cost time.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// What a named value holds for each instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Number,
    Text,
    /// A list of texts (the ids of the movies a user booked).
    Texts,
    /// A variable-length integer sequence (token ids, an attention mask).
    Ints,
    /// A float array with a shape (a model output, a pooled vector).
    Array,
    /// A ranked list of items (JSON objects: a top-k's result).
    Items,
}

impl Kind {
    /// How a feature of `dtype` enters the steps: text as text, a vector as a 1-d array, an
    /// integer list as a sequence, a text list as texts, everything else as a number.
    pub(crate) fn of(dtype: DType) -> Self {
        match dtype {
            DType::String => Kind::Text,
            DType::StringList => Kind::Texts,
            DType::Int64List => Kind::Ints,
            DType::Float32List => Kind::Array,
            DType::Int64 | DType::Float32 | DType::Float64 | DType::Bool => Kind::Number,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Number => "a number",
            Kind::Text => "text",
            Kind::Texts => "a list of texts",
            Kind::Ints => "an integer sequence",
            Kind::Array => "an array",
            Kind::Items => "a list of items",
        }
    }
}

/// A float array of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One named value across the instances of a request, one entry per instance.
#[derive(Debug, Clone)]
pub enum Column {
    Number(Vec<f64>),
    Text(Vec<String>),
    Texts(Vec<Vec<String>>),
    Ints(Vec<Vec<i64>>),
    Array(Vec<Array>),
    Items(Vec<Vec<Value>>),
}

impl Column {
    /// A feature of `dtype` with these values, one per instance, as the steps read it.
    pub(crate) fn of_feature<'a>(
        dtype: DType,
        values: impl Iterator<Item = &'a FeatureValue>,
    ) -> Column {
        let lists = |value: &FeatureValue| match value {
            FeatureValue::Strings(texts) => texts.clone(),
            _ => Vec::new(),
        };
        match Kind::of(dtype) {
            Kind::Text => Column::Text(values.map(ToString::to_string).collect()),
            Kind::Texts => Column::Texts(values.map(lists).collect()),
            Kind::Ints => Column::Ints(
                values
                    .map(|value| match value {
                        FeatureValue::Ints(ints) => ints.clone(),
                        _ => Vec::new(),
                    })
                    .collect(),
            ),
            Kind::Array => Column::Array(
                values
                    .map(|value| {
                        let data = match value {
                            FeatureValue::Floats(floats) => floats.clone(),
                            _ => Vec::new(),
                        };
                        Array {
                            shape: vec![data.len()],
                            data,
                        }
                    })
                    .collect(),
            ),
            Kind::Number | Kind::Items => {
                Column::Number(values.map(super::pipeline::number).collect())
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::Number(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::Texts(v) => v.len(),
            Column::Ints(v) => v.len(),
            Column::Array(v) => v.len(),
            Column::Items(v) => v.len(),
        }
    }

    /// Instances `range` only.
    fn slice(&self, range: std::ops::Range<usize>) -> Column {
        match self {
            Column::Number(v) => Column::Number(v[range].to_vec()),
            Column::Text(v) => Column::Text(v[range].to_vec()),
            Column::Texts(v) => Column::Texts(v[range].to_vec()),
            Column::Ints(v) => Column::Ints(v[range].to_vec()),
            Column::Array(v) => Column::Array(v[range].to_vec()),
            Column::Items(v) => Column::Items(v[range].to_vec()),
        }
    }

    /// Each instance's value `counts[i]` times over (its rows of a several-row model call).
    fn repeat(&self, counts: &[usize]) -> Column {
        fn each<T: Clone>(values: &[T], counts: &[usize]) -> Vec<T> {
            values
                .iter()
                .zip(counts)
                .flat_map(|(value, &count)| std::iter::repeat_n(value.clone(), count))
                .collect()
        }
        match self {
            Column::Number(v) => Column::Number(each(v, counts)),
            Column::Text(v) => Column::Text(each(v, counts)),
            Column::Texts(v) => Column::Texts(each(v, counts)),
            Column::Ints(v) => Column::Ints(each(v, counts)),
            Column::Array(v) => Column::Array(each(v, counts)),
            Column::Items(v) => Column::Items(each(v, counts)),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Column::Number(_) => Kind::Number,
            Column::Text(_) => Kind::Text,
            Column::Texts(_) => Kind::Texts,
            Column::Ints(_) => Kind::Ints,
            Column::Array(_) => Kind::Array,
            Column::Items(_) => Kind::Items,
        }
    }

    /// Instance `i`'s value as JSON (arrays nested by their shape).
    fn json(&self, i: usize) -> Value {
        match self {
            Column::Number(values) => json_number(values[i]),
            Column::Text(values) => Value::String(values[i].clone()),
            Column::Texts(values) => {
                Value::Array(values[i].iter().map(|t| Value::String(t.clone())).collect())
            }
            Column::Ints(values) => Value::Array(values[i].iter().map(|&v| v.into()).collect()),
            Column::Array(values) => nested(&values[i].shape, &values[i].data),
            Column::Items(values) => Value::Array(values[i].clone()),
        }
    }
}

/// A loaded tokenizer: the version's `tokenizer.json`, truncating at `max_length` and padding
/// nothing (a model call pads its batch to the longest instance).
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextTokenizer")
    }
}

impl TextTokenizer {
    pub fn from_bytes(bytes: &[u8], max_length: usize) -> Result<Self, String> {
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| e.to_string())?;
        Ok(Self { tokenizer })
    }

    /// Token ids, attention mask and token type ids of `text`.
    pub fn encode(&self, text: &str) -> Result<[Vec<i64>; 3], String> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| e.to_string())?;
        let widen = |values: &[u32]| values.iter().map(|&v| i64::from(v)).collect();
        Ok([
            widen(encoding.get_ids()),
            widen(encoding.get_attention_mask()),
            widen(encoding.get_type_ids()),
        ])
    }
}

/// One step, checked.
#[derive(Debug)]
pub enum Step {
    /// Text to `into.input_ids`, `into.attention_mask` and `into.token_type_ids`.
    Tokenize {
        text: String,
        tokenizer: Arc<TextTokenizer>,
        into: String,
    },
    /// A model call, batched: the model's inputs from named values, its outputs to new names.
    /// `model` is another served model, or `None` for this version.
    Model {
        model: Option<Called>,
        inputs: Vec<(String, String)>,
        outputs: Vec<(String, String)>,
    },
    /// The mean of `of`'s rows ([tokens, d]) where `mask` is 1: a sentence vector [d].
    MeanPool {
        of: String,
        mask: String,
        into: String,
    },
    /// `of` divided by its Euclidean norm.
    L2Normalize { of: String, into: String },
    /// Another served model's step pipeline: its features from named values (the rest take
    /// their defaults), its answer fields (numeric arrays) to new names.
    Predict {
        model: Called,
        inputs: Vec<(String, String)>,
        outputs: Vec<(String, String)>,
    },
    /// The `k` best-scoring items of a version file (`scores` holds one score per item, in the
    /// file's order), each shown with its score; `filter` keeps only items whose field equals the
    /// named text value (or, for a list field, contains it; an empty value filters nothing).
    TopK {
        scores: String,
        items: Arc<Vec<Map<String, Value>>>,
        k: usize,
        filter: Vec<(String, String)>,
        into: String,
    },
    /// `count` evenly spaced numbers from `from` to `to`, both included: the candidates a search
    /// scores (prices, say).
    Grid {
        from: String,
        to: String,
        count: usize,
        into: String,
    },
    /// Named values side by side as the columns of a matrix [rows, columns]: an array gives one
    /// element per row (all of one length), a number repeats on every row. What a model scores
    /// as several rows of one instance.
    Stack { columns: Vec<String>, into: String },
    /// An expression over named numbers and arrays, element by element over arrays: a number,
    /// or an array shaped as the first array it reads.
    Arithmetic {
        expression: Expression,
        into: String,
    },
    /// Where `of` is largest: the element of `pick` there, or the position without `pick`.
    Argmax {
        of: String,
        pick: Option<String>,
        into: String,
    },
    /// The `k` items of a version's item index most similar to what `history` (item keys) stands
    /// for, and the `popular` most popular besides, the history left out; exactly the items
    /// `among` lists where it lists any; the most popular where the history says nothing. Each
    /// item shows its `similarity`, and `into.cold_start` is 1 where the history said nothing.
    Nearest {
        index: Arc<ItemIndex>,
        history: String,
        among: Option<String>,
        k: usize,
        popular: usize,
        into: String,
    },
    /// A numeric field of every item, as an array.
    ItemValues {
        items: String,
        field: String,
        into: String,
    },
    /// The elements of `of` at the positions `at` holds (0 where a position is outside `of`).
    Take {
        of: String,
        at: String,
        into: String,
    },
    /// `items` by `scores`, highest first, the best `k`, with at most `at_most` of one field value
    /// in its first places while others remain; where `keep_order_if` is not 0, the items keep
    /// their order instead.
    Rank {
        items: String,
        scores: String,
        k: Count,
        at_most: Option<(String, Cap)>,
        keep_order_if: Option<String>,
        into: String,
    },
}

/// A count a step takes: fixed in the declaration, or a named number of each instance (how many
/// results a caller asks for).
#[derive(Debug, Clone)]
pub enum Count {
    Fixed(usize),
    Named(String),
}

/// Another served model a step calls, at a version reference (a number or an alias; empty for
/// its default version). A pipeline whose values depend on one version of another model (an
/// index of its vectors) pins that version, so a new default cannot silently change them.
#[derive(Debug, Clone)]
pub struct Called {
    pub name: String,
    pub version: String,
}

impl Called {
    fn new(step: usize, name: String, version: Option<Value>) -> Result<Self, String> {
        let version = match version {
            None => String::new(),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= 1) => n.to_string(),
            Some(Value::String(alias)) if !alias.is_empty() => alias,
            Some(other) => {
                return Err(format!(
                    "step {step}: version must be a version number (from 1) or an alias, not {other}"
                ));
            }
        };
        Ok(Self { name, version })
    }
}

impl std::fmt::Display for Called {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.version.is_empty() {
            write!(f, "model '{}'", self.name)
        } else {
            write!(f, "model '{}' version {}", self.name, self.version)
        }
    }
}

/// The steps of a pipeline and what its answer shows.
#[derive(Debug)]
pub struct Steps {
    pub steps: Vec<Step>,
    /// (answer field, value name), in declaration order.
    pub outputs: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StepFile {
    Tokenize {
        text: String,
        /// A file of the version (a Hugging Face `tokenizer.json`).
        tokenizer: String,
        #[serde(default = "default_max_length")]
        max_length: usize,
        into: String,
    },
    Model {
        #[serde(default)]
        model: Option<String>,
        /// With `model`: which of its versions (a number or an alias; default: its default).
        #[serde(default)]
        version: Option<Value>,
        inputs: BTreeMap<String, String>,
        outputs: BTreeMap<String, String>,
    },
    MeanPool {
        of: String,
        mask: String,
        into: String,
    },
    L2Normalize {
        of: String,
        into: String,
    },
    Predict {
        model: String,
        #[serde(default)]
        version: Option<Value>,
        inputs: BTreeMap<String, String>,
        outputs: BTreeMap<String, String>,
    },
    TopK {
        scores: String,
        /// A file of the version: a JSON list of objects, one per score.
        items: String,
        k: usize,
        #[serde(default)]
        filter: BTreeMap<String, String>,
        into: String,
    },
    Grid {
        from: String,
        to: String,
        count: usize,
        into: String,
    },
    Stack {
        columns: Vec<String>,
        into: String,
    },
    Arithmetic {
        expr: String,
        into: String,
    },
    Argmax {
        of: String,
        #[serde(default)]
        pick: Option<String>,
        into: String,
    },
    Nearest {
        /// A file of the version: a JSON list of items, each with a text `key`, a numeric
        /// `popularity` and a `vector`.
        index: String,
        key: String,
        popularity: String,
        history: String,
        #[serde(default)]
        among: Option<String>,
        k: usize,
        /// Also the most popular items, this many (a second source of candidates).
        #[serde(default)]
        popular: usize,
        /// How many candidates a graph search keeps (HNSW's ef; at least `k`): larger catalogues
        /// need more for the same recall.
        #[serde(default)]
        breadth: Option<usize>,
        into: String,
    },
    ItemValues {
        items: String,
        field: String,
        into: String,
    },
    Take {
        of: String,
        at: String,
        into: String,
    },
    Rank {
        items: String,
        scores: String,
        /// A number, or the name of a number.
        k: Value,
        #[serde(default)]
        at_most: Option<AtMostFile>,
        #[serde(default)]
        keep_order_if: Option<String>,
        into: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AtMostFile {
    field: String,
    count: usize,
    /// How many first places the cap holds in (default: all).
    #[serde(default)]
    within: Option<usize>,
}

/// The longest history a nearest step reads per instance (a user's bookings; the feature store
/// keeps 50): a longer one would only cost every other request time.
pub const MAX_HISTORY_ITEMS: usize = 1_000;

/// How many more candidates than `k` a nearest step's graph search keeps unless the step says
/// (`breadth`): recall@10 0.96-0.97 at 20,000 items (bench/ann.py).
const SEARCH_SLACK: usize = 64;

/// The most candidates a grid step makes per instance.
const MAX_GRID: usize = 4096;

/// How deep pipelines may call each other's (a cycle stops here instead of recursing forever).
const MAX_PIPELINE_DEPTH: usize = 4;

fn default_max_length() -> usize {
    256
}

impl StepFile {
    /// The version files this step needs loaded before it can be checked.
    pub(crate) fn assets(&self) -> Option<&str> {
        match self {
            StepFile::Tokenize { tokenizer, .. } => Some(tokenizer),
            StepFile::TopK { items, .. } => Some(items),
            StepFile::Nearest { index, .. } => Some(index),
            _ => None,
        }
    }
}

/// The kinds of the values named so far, for checking each step's reads and writes.
struct Names(HashMap<String, Kind>);

impl Names {
    fn read(&self, step: usize, name: &str, want: Kind) -> Result<(), String> {
        match self.0.get(name) {
            Some(&kind) if kind == want => Ok(()),
            Some(&kind) => Err(format!(
                "step {step} reads '{name}' as {}, but it is {}",
                want.name(),
                kind.name()
            )),
            None => Err(format!(
                "step {step} reads '{name}', which no feature or earlier step provides"
            )),
        }
    }

    /// Reads `name` as a number or an array; which it is.
    fn numeric(&self, step: usize, name: &str) -> Result<Kind, String> {
        match self.0.get(name) {
            Some(&kind @ (Kind::Number | Kind::Array)) => Ok(kind),
            Some(&kind) => Err(format!(
                "step {step} reads '{name}' as a number or an array, but it is {}",
                kind.name()
            )),
            None => Err(format!(
                "step {step} reads '{name}', which no feature or earlier step provides"
            )),
        }
    }

    fn write(&mut self, step: usize, name: &str, kind: Kind) -> Result<(), String> {
        if self.0.insert(name.to_string(), kind).is_some() {
            return Err(format!("step {step} writes '{name}', which already exists"));
        }
        Ok(())
    }
}

impl Steps {
    /// Checks `files` against the values the features provide (`given`) and this version's
    /// model; `assets` holds the version files the steps name.
    pub(crate) fn parse(
        files: Vec<StepFile>,
        outputs: BTreeMap<String, String>,
        given: &[(String, Kind)],
        own: &ModelSpec,
        assets: &HashMap<String, Bytes>,
    ) -> Result<Self, String> {
        if files.is_empty() {
            return Err("steps is empty".into());
        }
        let mut names = Names(given.iter().cloned().collect());
        let mut steps = Vec::with_capacity(files.len());
        for (i, file) in files.into_iter().enumerate() {
            let step = match file {
                StepFile::Tokenize {
                    text,
                    tokenizer,
                    max_length,
                    into,
                } => {
                    names.read(i, &text, Kind::Text)?;
                    let bytes = assets.get(&tokenizer).ok_or_else(|| {
                        format!("step {i}: the version has no file '{tokenizer}'")
                    })?;
                    if max_length == 0 {
                        return Err(format!("step {i}: max_length must be at least 1"));
                    }
                    let loaded = TextTokenizer::from_bytes(bytes, max_length)
                        .map_err(|e| format!("step {i}: tokenizer '{tokenizer}': {e}"))?;
                    for part in TOKEN_PARTS {
                        names.write(i, &format!("{into}.{part}"), Kind::Ints)?;
                    }
                    Step::Tokenize {
                        text,
                        tokenizer: Arc::new(loaded),
                        into,
                    }
                }
                StepFile::Model {
                    model,
                    version,
                    inputs,
                    outputs,
                } => {
                    let model = match (model, version) {
                        (Some(name), version) => Some(Called::new(i, name, version)?),
                        (None, None) => None,
                        (None, Some(_)) => {
                            return Err(format!(
                                "step {i}: version names a version of another model: give model too"
                            ));
                        }
                    };
                    let inputs: Vec<(String, String)> = inputs.into_iter().collect();
                    let outputs: Vec<(String, String)> = outputs.into_iter().collect();
                    if outputs.is_empty() {
                        return Err(format!("step {i}: a model step names the outputs it keeps"));
                    }
                    let mut kinds = Vec::with_capacity(inputs.len());
                    for (_, value) in &inputs {
                        let kind = names.0.get(value).copied().ok_or_else(|| {
                            format!("step {i} reads '{value}', which no feature or earlier step provides")
                        })?;
                        kinds.push(kind);
                    }
                    if model.is_none() {
                        check_call(own, &inputs, &kinds, &outputs)
                            .map_err(|e| format!("step {i} (model '{}'): {e}", own.name))?;
                    }
                    for (_, value) in &outputs {
                        names.write(i, value, Kind::Array)?;
                    }
                    Step::Model {
                        model,
                        inputs,
                        outputs,
                    }
                }
                StepFile::MeanPool { of, mask, into } => {
                    names.read(i, &of, Kind::Array)?;
                    names.read(i, &mask, Kind::Ints)?;
                    names.write(i, &into, Kind::Array)?;
                    Step::MeanPool { of, mask, into }
                }
                StepFile::L2Normalize { of, into } => {
                    names.read(i, &of, Kind::Array)?;
                    names.write(i, &into, Kind::Array)?;
                    Step::L2Normalize { of, into }
                }
                StepFile::Predict {
                    model,
                    version,
                    inputs,
                    outputs,
                } => {
                    if model == own.name {
                        return Err(format!("step {i}: a pipeline cannot predict with itself"));
                    }
                    for value in inputs.values() {
                        match names.0.get(value) {
                            Some(Kind::Items) => {
                                return Err(format!(
                                    "step {i} gives '{value}' (a list of items) as a feature; features are numbers, text or lists"
                                ));
                            }
                            Some(_) => {}
                            None => {
                                return Err(format!(
                                    "step {i} reads '{value}', which no feature or earlier step provides"
                                ));
                            }
                        }
                    }
                    if outputs.is_empty() {
                        return Err(format!(
                            "step {i}: a predict step names the outputs it keeps"
                        ));
                    }
                    for value in outputs.values() {
                        names.write(i, value, Kind::Array)?;
                    }
                    Step::Predict {
                        model: Called::new(i, model, version)?,
                        inputs: inputs.into_iter().collect(),
                        outputs: outputs.into_iter().collect(),
                    }
                }
                StepFile::TopK {
                    scores,
                    items,
                    k,
                    filter,
                    into,
                } => {
                    names.read(i, &scores, Kind::Array)?;
                    for value in filter.values() {
                        names.read(i, value, Kind::Text)?;
                    }
                    if k == 0 {
                        return Err(format!("step {i}: k must be at least 1"));
                    }
                    let bytes = assets
                        .get(&items)
                        .ok_or_else(|| format!("step {i}: the version has no file '{items}'"))?;
                    let listed: Vec<Map<String, Value>> =
                        serde_json::from_slice(bytes).map_err(|e| {
                            format!("step {i}: '{items}' must be a JSON list of objects: {e}")
                        })?;
                    if listed.is_empty() {
                        return Err(format!("step {i}: '{items}' lists no items"));
                    }
                    if listed.iter().any(|item| item.contains_key("score")) {
                        return Err(format!(
                            "step {i}: items of '{items}' have a 'score' field, which top_k writes"
                        ));
                    }
                    // A misspelt field would filter every item out, silently.
                    for field in filter.keys() {
                        let usable = |v: &Value| {
                            v.is_string()
                                || v.as_array().is_some_and(|l| l.iter().all(Value::is_string))
                        };
                        if !listed
                            .iter()
                            .any(|item| item.get(field).is_some_and(usable))
                        {
                            return Err(format!(
                                "step {i}: no item of '{items}' has a text or text-list field '{field}' to filter on"
                            ));
                        }
                    }
                    names.write(i, &into, Kind::Items)?;
                    Step::TopK {
                        scores,
                        items: Arc::new(listed),
                        k,
                        filter: filter.into_iter().collect(),
                        into,
                    }
                }
                StepFile::Grid {
                    from,
                    to,
                    count,
                    into,
                } => {
                    names.read(i, &from, Kind::Number)?;
                    names.read(i, &to, Kind::Number)?;
                    if !(2..=MAX_GRID).contains(&count) {
                        return Err(format!(
                            "step {i}: count must be from 2 to {MAX_GRID}, not {count}"
                        ));
                    }
                    names.write(i, &into, Kind::Array)?;
                    Step::Grid {
                        from,
                        to,
                        count,
                        into,
                    }
                }
                StepFile::Stack { columns, into } => {
                    if columns.is_empty() {
                        return Err(format!("step {i}: stack names no columns"));
                    }
                    for column in &columns {
                        names.numeric(i, column)?;
                    }
                    names.write(i, &into, Kind::Array)?;
                    Step::Stack { columns, into }
                }
                StepFile::Arithmetic { expr, into } => {
                    let expression =
                        Expression::parse(&expr).map_err(|e| format!("step {i}: {e}"))?;
                    let mut kind = Kind::Number;
                    for name in expression.names() {
                        if names.numeric(i, name)? == Kind::Array {
                            kind = Kind::Array;
                        }
                    }
                    names.write(i, &into, kind)?;
                    Step::Arithmetic { expression, into }
                }
                StepFile::Argmax { of, pick, into } => {
                    names.read(i, &of, Kind::Array)?;
                    if let Some(pick) = &pick {
                        names.read(i, pick, Kind::Array)?;
                    }
                    names.write(i, &into, Kind::Number)?;
                    Step::Argmax { of, pick, into }
                }
                StepFile::Nearest {
                    index,
                    key,
                    popularity,
                    history,
                    among,
                    k,
                    popular,
                    breadth,
                    into,
                } => {
                    names.read(i, &history, Kind::Texts)?;
                    if let Some(among) = &among {
                        names.read(i, among, Kind::Texts)?;
                    }
                    if k == 0 {
                        return Err(format!("step {i}: k must be at least 1"));
                    }
                    let breadth = breadth.unwrap_or(k.saturating_add(SEARCH_SLACK));
                    if breadth < k {
                        return Err(format!(
                            "step {i}: breadth ({breadth}) must be at least k ({k})"
                        ));
                    }
                    let bytes = assets
                        .get(&index)
                        .ok_or_else(|| format!("step {i}: the version has no file '{index}'"))?;
                    let loaded = ItemIndex::parse(bytes, &key, &popularity, breadth)
                        .map_err(|e| format!("step {i}: '{index}': {e}"))?;
                    if k > loaded.len() || popular > loaded.len() {
                        return Err(format!(
                            "step {i}: k ({k}) and popular ({popular}) must be at most the {} items of '{index}'",
                            loaded.len()
                        ));
                    }
                    if (0..loaded.len()).any(|p| loaded.item(p).contains_key("similarity")) {
                        return Err(format!(
                            "step {i}: items of '{index}' have a 'similarity' field, which nearest writes"
                        ));
                    }
                    names.write(i, &into, Kind::Items)?;
                    names.write(i, &format!("{into}.cold_start"), Kind::Number)?;
                    Step::Nearest {
                        index: Arc::new(loaded),
                        history,
                        among,
                        k,
                        popular,
                        into,
                    }
                }
                StepFile::ItemValues { items, field, into } => {
                    names.read(i, &items, Kind::Items)?;
                    names.write(i, &into, Kind::Array)?;
                    Step::ItemValues { items, field, into }
                }
                StepFile::Take { of, at, into } => {
                    names.read(i, &of, Kind::Array)?;
                    names.read(i, &at, Kind::Array)?;
                    names.write(i, &into, Kind::Array)?;
                    Step::Take { of, at, into }
                }
                StepFile::Rank {
                    items,
                    scores,
                    k,
                    at_most,
                    keep_order_if,
                    into,
                } => {
                    names.read(i, &items, Kind::Items)?;
                    names.read(i, &scores, Kind::Array)?;
                    let k = match k {
                        Value::Number(n) if n.as_u64().is_some_and(|k| k >= 1) => {
                            Count::Fixed(n.as_u64().unwrap_or(1) as usize)
                        }
                        Value::String(name) => {
                            names.read(i, &name, Kind::Number)?;
                            Count::Named(name)
                        }
                        other => {
                            return Err(format!(
                                "step {i}: k is a count of at least 1 or the name of a number, not {other}"
                            ));
                        }
                    };
                    let at_most = match at_most {
                        Some(
                            AtMostFile { count: 0, .. }
                            | AtMostFile {
                                within: Some(0), ..
                            },
                        ) => {
                            return Err(format!(
                                "step {i}: at_most.count and at_most.within must be at least 1"
                            ));
                        }
                        Some(AtMostFile {
                            field,
                            count,
                            within,
                        }) => Some((
                            field,
                            Cap {
                                count,
                                within: within.unwrap_or(usize::MAX),
                            },
                        )),
                        None => None,
                    };
                    if let Some(name) = &keep_order_if {
                        names.read(i, name, Kind::Number)?;
                    }
                    names.write(i, &into, Kind::Items)?;
                    Step::Rank {
                        items,
                        scores,
                        k,
                        at_most,
                        keep_order_if,
                        into,
                    }
                }
            };
            steps.push(step);
        }
        if outputs.is_empty() {
            return Err("outputs is empty: name the values the answer shows".into());
        }
        for (field, value) in &outputs {
            if !names.0.contains_key(value) {
                return Err(format!(
                    "output '{field}' shows '{value}', which no feature or step provides"
                ));
            }
        }
        Ok(Self {
            steps,
            outputs: outputs.into_iter().collect(),
        })
    }

    /// Runs the steps over `n` instances whose features are `columns`; one answer per instance,
    /// and the tokens each instance's text took (0 without a tokenize step). Instances go
    /// through the steps in chunks of this version's `max_batch_size`, a few chunks at a time, so
    /// what a request holds at once (a model's hidden states, say) is bounded by the chunk, not
    /// by how many instances it brought.
    pub async fn run(
        &self,
        own: &Arc<LoadedModel>,
        models: &ModelManager,
        columns: HashMap<String, Column>,
        n: usize,
        request_id: &str,
    ) -> Result<(Vec<Map<String, Value>>, Vec<usize>), ServingError> {
        let chunk = own.spec().max_batch_size.max(1);
        let chunks = (0..n).step_by(chunk).map(|start| {
            let range = start..(start + chunk).min(n);
            let part: HashMap<String, Column> = columns
                .iter()
                .map(|(name, column)| (name.clone(), column.slice(range.clone())))
                .collect();
            let cx = Context {
                own,
                models,
                request_id,
                depth: 0,
            };
            self.answer_chunk(cx, part, range)
        });
        let done: Vec<_> = futures::stream::iter(chunks)
            .buffered(CHUNKS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut answers = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        for (chunk_answers, chunk_tokens) in done {
            answers.extend(chunk_answers);
            tokens.extend(chunk_tokens);
        }
        Ok((answers, tokens))
    }

    /// The answers of the instances `range` of the request (`columns` holds just those).
    async fn answer_chunk(
        &self,
        cx: Context<'_>,
        columns: HashMap<String, Column>,
        range: std::ops::Range<usize>,
    ) -> Result<(Vec<Map<String, Value>>, Vec<usize>), ServingError> {
        let n = range.len();
        let (columns, tokens) = self.run_chunk(cx, columns, range).await?;
        let shown = self
            .outputs
            .iter()
            .map(|(field, value)| {
                columns
                    .get(value)
                    .filter(|column| column.len() == n)
                    .map(|column| (field, column))
                    .ok_or_else(|| {
                        ServingError::Internal(format!("output '{field}': '{value}' is missing"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let answers = (0..n)
            .map(|instance| {
                shown
                    .iter()
                    .map(|(field, column)| ((*field).clone(), column.json(instance)))
                    .collect()
            })
            .collect();
        Ok((answers, tokens))
    }

    /// The steps over the instances `range` (`columns` holds just those): every value they
    /// made, and the tokens each instance took. Boxed: a `predict` step runs another
    /// pipeline's steps through it.
    fn run_chunk<'a>(
        &'a self,
        cx: Context<'a>,
        columns: HashMap<String, Column>,
        range: std::ops::Range<usize>,
    ) -> futures::future::BoxFuture<'a, Result<Computed, ServingError>> {
        Box::pin(self.run_steps(cx, columns, range))
    }

    async fn run_steps(
        &self,
        cx: Context<'_>,
        mut columns: HashMap<String, Column>,
        range: std::ops::Range<usize>,
    ) -> Result<Computed, ServingError> {
        let n = range.len();
        let mut tokens = vec![0usize; n];
        for (i, step) in self.steps.iter().enumerate() {
            let written: Vec<String> = match step {
                Step::Tokenize {
                    text,
                    tokenizer,
                    into,
                } => {
                    let Some(Column::Text(texts)) = columns.get(text) else {
                        return Err(missing(i, text));
                    };
                    if let Some((at, long)) = texts
                        .iter()
                        .enumerate()
                        .find(|(_, t)| t.len() > MAX_TEXT_BYTES)
                    {
                        return Err(ServingError::InvalidInput(format!(
                            "instance {}: '{text}' is {} bytes; texts may be at most {MAX_TEXT_BYTES}",
                            range.start + at,
                            long.len()
                        )));
                    }
                    let (tokenizer, texts, first) = (tokenizer.clone(), texts.clone(), range.start);
                    // Tokenizing is CPU work: off the async runtime, like inference.
                    let parts = tokio::task::spawn_blocking(move || {
                        let mut parts: [Vec<Vec<i64>>; 3] = Default::default();
                        for (at, text) in texts.iter().enumerate() {
                            let encoded = tokenizer.encode(text).map_err(|e| {
                                ServingError::InvalidInput(format!(
                                    "instance {}: cannot tokenize the text: {e}",
                                    first + at
                                ))
                            })?;
                            for (part, values) in parts.iter_mut().zip(encoded) {
                                part.push(values);
                            }
                        }
                        Ok::<_, ServingError>(parts)
                    })
                    .await
                    .map_err(|e| ServingError::Internal(format!("tokenizing failed: {e}")))??;
                    for (count, ids) in tokens.iter_mut().zip(&parts[0]) {
                        *count += ids.len();
                    }
                    TOKEN_PARTS
                        .iter()
                        .zip(parts)
                        .map(|(part, values)| {
                            let name = format!("{into}.{part}");
                            columns.insert(name.clone(), Column::Ints(values));
                            name
                        })
                        .collect()
                }
                Step::Model {
                    model,
                    inputs,
                    outputs,
                } => {
                    let target = match model {
                        None => cx.own.clone(),
                        Some(called) => {
                            let target =
                                cx.models.get(&called.name, &called.version).map_err(|e| {
                                    ServingError::Unavailable(format!(
                                        "pipeline step {i} calls {called}, which is not serving: {e}"
                                    ))
                                })?;
                            let kinds = inputs
                                .iter()
                                .map(|(_, value)| {
                                    columns
                                        .get(value)
                                        .map(Column::kind)
                                        .ok_or_else(|| missing(i, value))
                                })
                                .collect::<Result<Vec<Kind>, _>>()?;
                            check_call(target.spec(), inputs, &kinds, outputs).map_err(|e| {
                                ServingError::Unavailable(format!(
                                    "pipeline step {i} cannot call {called}: {e}"
                                ))
                            })?;
                            target
                        }
                    };
                    let produced =
                        call(&target, inputs, outputs, &columns, n, cx.request_id).await?;
                    keep(&mut columns, outputs, produced)
                }
                Step::MeanPool { of, mask, into } => {
                    let (Some(Column::Array(arrays)), Some(Column::Ints(masks))) =
                        (columns.get(of), columns.get(mask))
                    else {
                        return Err(missing(i, of));
                    };
                    let pooled = arrays
                        .iter()
                        .zip(masks)
                        .map(|(array, mask)| mean_pool(array, mask))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ServingError::Internal(format!("pipeline step {i}: {e}")))?;
                    columns.insert(into.clone(), Column::Array(pooled));
                    vec![into.clone()]
                }
                Step::L2Normalize { of, into } => {
                    let Some(Column::Array(arrays)) = columns.get(of) else {
                        return Err(missing(i, of));
                    };
                    let normalised = arrays.iter().map(l2_normalize).collect();
                    columns.insert(into.clone(), Column::Array(normalised));
                    vec![into.clone()]
                }
                Step::Predict {
                    model,
                    inputs,
                    outputs,
                } => {
                    let (produced, used) =
                        predict_step(cx, i, model, inputs, outputs, &columns, &range).await?;
                    for (count, more) in tokens.iter_mut().zip(used) {
                        *count += more;
                    }
                    keep(&mut columns, outputs, produced)
                }
                Step::TopK {
                    scores,
                    items,
                    k,
                    filter,
                    into,
                } => {
                    let Some(Column::Array(scored)) = columns.get(scores) else {
                        return Err(missing(i, scores));
                    };
                    let mut wanted = Vec::with_capacity(filter.len());
                    for (field, value) in filter {
                        let Some(Column::Text(values)) = columns.get(value) else {
                            return Err(missing(i, value));
                        };
                        wanted.push((field, values));
                    }
                    let mut ranked = Vec::with_capacity(n);
                    for (instance, row) in scored.iter().enumerate() {
                        if row.data.len() != items.len() {
                            return Err(ServingError::Internal(format!(
                                "pipeline step {i}: '{scores}' has {} scores for {} items",
                                row.data.len(),
                                items.len()
                            )));
                        }
                        let conditions: Vec<(&String, &str)> = wanted
                            .iter()
                            .map(|(field, values)| (*field, values[instance].as_str()))
                            .filter(|(_, value)| !value.is_empty())
                            .collect();
                        ranked.push(top_k(items, &row.data, *k, &conditions));
                    }
                    columns.insert(into.clone(), Column::Items(ranked));
                    vec![into.clone()]
                }
                Step::Grid {
                    from,
                    to,
                    count,
                    into,
                } => {
                    let (Some(Column::Number(low)), Some(Column::Number(high))) =
                        (columns.get(from), columns.get(to))
                    else {
                        return Err(missing(i, from));
                    };
                    let grids = low
                        .iter()
                        .zip(high)
                        .map(|(&low, &high)| grid(low, high, *count))
                        .collect();
                    columns.insert(into.clone(), Column::Array(grids));
                    vec![into.clone()]
                }
                Step::Stack {
                    columns: stacked,
                    into,
                } => {
                    let parts = stacked
                        .iter()
                        .map(|name| {
                            columns
                                .get(name)
                                .map(|c| (name, c))
                                .ok_or_else(|| missing(i, name))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let matrices = (0..n)
                        .map(|instance| stack(&parts, instance))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ServingError::Internal(format!("pipeline step {i}: {e}")))?;
                    columns.insert(into.clone(), Column::Array(matrices));
                    vec![into.clone()]
                }
                Step::Arithmetic { expression, into } => {
                    let operands = expression
                        .names()
                        .iter()
                        .map(|name| {
                            columns
                                .get(name)
                                .map(|c| (name, c))
                                .ok_or_else(|| missing(i, name))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let result = evaluate(expression, &operands, n).map_err(|e| {
                        ServingError::Internal(format!(
                            "pipeline step {i} ('{}'): {e}",
                            expression.text()
                        ))
                    })?;
                    columns.insert(into.clone(), result);
                    vec![into.clone()]
                }
                Step::Argmax { of, pick, into } => {
                    let Some(Column::Array(scored)) = columns.get(of) else {
                        return Err(missing(i, of));
                    };
                    let picked = match pick {
                        Some(name) => match columns.get(name) {
                            Some(Column::Array(values)) => Some(values),
                            _ => return Err(missing(i, name)),
                        },
                        None => None,
                    };
                    let best = scored
                        .iter()
                        .enumerate()
                        .map(|(instance, scores)| {
                            argmax(
                                &scores.data,
                                picked.map(|values| &values[instance].data[..]),
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ServingError::Internal(format!("pipeline step {i}: {e}")))?;
                    columns.insert(into.clone(), Column::Number(best));
                    vec![into.clone()]
                }
                Step::Nearest {
                    index,
                    history,
                    among,
                    k,
                    popular,
                    into,
                } => {
                    let Some(Column::Texts(histories)) = columns.get(history) else {
                        return Err(missing(i, history));
                    };
                    let among = match among {
                        Some(name) => match columns.get(name) {
                            Some(Column::Texts(lists)) => Some((name, lists)),
                            _ => return Err(missing(i, name)),
                        },
                        None => None,
                    };
                    // The candidates a caller gives are all ranked, so at most what retrieval
                    // would give.
                    let limits = std::iter::once((history, histories, MAX_HISTORY_ITEMS))
                        .chain(among.map(|(name, lists)| (name, lists, *k + *popular)));
                    for (name, lists, limit) in limits {
                        if let Some((at, long)) = lists
                            .iter()
                            .enumerate()
                            .find(|(_, list)| list.len() > limit)
                        {
                            return Err(ServingError::InvalidInput(format!(
                                "instance {}: features.{name} lists {} items; at most {limit}",
                                range.start + at,
                                long.len()
                            )));
                        }
                    }
                    let (index, histories, among, wanted) = (
                        index.clone(),
                        histories.clone(),
                        among.map(|(_, lists)| lists.clone()),
                        (*k, *popular),
                    );
                    // Searching is CPU work: off the async runtime, like inference.
                    let (found, cold) = tokio::task::spawn_blocking(move || {
                        nearest(&index, &histories, among.as_deref(), wanted)
                    })
                    .await
                    .map_err(|e| ServingError::Internal(format!("the search failed: {e}")))?;
                    let flag = format!("{into}.cold_start");
                    columns.insert(into.clone(), Column::Items(found));
                    columns.insert(flag.clone(), Column::Number(cold));
                    vec![into.clone(), flag]
                }
                Step::ItemValues { items, field, into } => {
                    let Some(Column::Items(lists)) = columns.get(items) else {
                        return Err(missing(i, items));
                    };
                    let values = lists
                        .iter()
                        .map(|list| item_values(list, field))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ServingError::Internal(format!("pipeline step {i}: {e}")))?;
                    columns.insert(into.clone(), Column::Array(values));
                    vec![into.clone()]
                }
                Step::Take { of, at, into } => {
                    let Some(Column::Array(sources)) = columns.get(of) else {
                        return Err(missing(i, of));
                    };
                    let Some(Column::Array(positions)) = columns.get(at) else {
                        return Err(missing(i, at));
                    };
                    let taken = sources
                        .iter()
                        .zip(positions)
                        .map(|(source, positions)| take(&source.data, &positions.data))
                        .collect();
                    columns.insert(into.clone(), Column::Array(taken));
                    vec![into.clone()]
                }
                Step::Rank {
                    items,
                    scores,
                    k,
                    at_most,
                    keep_order_if,
                    into,
                } => {
                    let Some(Column::Items(lists)) = columns.get(items) else {
                        return Err(missing(i, items));
                    };
                    let Some(Column::Array(scored)) = columns.get(scores) else {
                        return Err(missing(i, scores));
                    };
                    let counts: Vec<usize> = match k {
                        Count::Fixed(k) => vec![*k; n],
                        Count::Named(name) => match columns.get(name) {
                            Some(Column::Number(values)) => values
                                .iter()
                                .map(|&v| {
                                    if v.is_finite() && v >= 1.0 {
                                        v as usize
                                    } else {
                                        1
                                    }
                                })
                                .collect(),
                            _ => return Err(missing(i, name)),
                        },
                    };
                    let kept: Vec<bool> = match keep_order_if {
                        Some(name) => match columns.get(name) {
                            Some(Column::Number(values)) => {
                                values.iter().map(|&v| v != 0.0).collect()
                            }
                            _ => return Err(missing(i, name)),
                        },
                        None => vec![false; n],
                    };
                    let ranked = (0..n)
                        .map(|instance| {
                            rank(
                                &lists[instance],
                                &scored[instance].data,
                                counts[instance],
                                at_most.as_ref(),
                                kept[instance],
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| ServingError::Internal(format!("pipeline step {i}: {e}")))?;
                    columns.insert(into.clone(), Column::Items(ranked));
                    vec![into.clone()]
                }
            };
            // Every value holds one entry per instance, or the answers would misalign.
            if let Some(short) = written
                .iter()
                .find(|name| columns.get(*name).map(Column::len) != Some(n))
            {
                return Err(ServingError::Internal(format!(
                    "pipeline step {i} made '{short}' for {} of {n} instances",
                    columns.get(short).map_or(0, Column::len)
                )));
            }
        }
        Ok((columns, tokens))
    }
}

/// Stores what a call produced under the names its `outputs` give; the names written.
fn keep(
    columns: &mut HashMap<String, Column>,
    outputs: &[(String, String)],
    produced: Vec<Column>,
) -> Vec<String> {
    outputs
        .iter()
        .zip(produced)
        .map(|((_, name), column)| {
            columns.insert(name.clone(), column);
            name.clone()
        })
        .collect()
}

/// Where steps run: the version whose pipeline they are, the models they may call, the request
/// they serve, and how many pipelines called this one.
#[derive(Clone, Copy)]
struct Context<'a> {
    own: &'a Arc<LoadedModel>,
    models: &'a ModelManager,
    request_id: &'a str,
    depth: usize,
}

/// Runs another model's step pipeline on these instances: its features from `inputs` (the others
/// at their defaults), its answer fields in `outputs` back as columns, and the tokens it took.
async fn predict_step(
    cx: Context<'_>,
    step: usize,
    model: &Called,
    inputs: &[(String, String)],
    outputs: &[(String, String)],
    columns: &HashMap<String, Column>,
    range: &std::ops::Range<usize>,
) -> Result<(Vec<Column>, Vec<usize>), ServingError> {
    let unavailable = |e: String| {
        ServingError::Unavailable(format!(
            "pipeline step {step} cannot run the pipeline of {model}: {e}"
        ))
    };
    if cx.depth >= MAX_PIPELINE_DEPTH {
        return Err(unavailable(format!(
            "pipelines call each other more than {MAX_PIPELINE_DEPTH} deep"
        )));
    }
    let target = cx
        .models
        .get(&model.name, &model.version)
        .map_err(|e| unavailable(e.to_string()))?;
    let PipelineState::Ready(declared) = target.pipeline() else {
        return Err(unavailable("it has no pipeline that runs".into()));
    };
    let pipeline = &declared.pipeline;
    let Body::Steps(steps) = &pipeline.body else {
        return Err(unavailable("its pipeline has no steps".into()));
    };
    let n = range.len();
    let mut given = HashMap::new();
    for feature in &pipeline.features {
        let source = inputs.iter().find(|(name, _)| *name == feature.name);
        let column = match source {
            Some((_, value)) => {
                let column = columns.get(value).ok_or_else(|| missing(step, value))?;
                let want = Kind::of(feature.dtype);
                if column.kind() != want {
                    return Err(unavailable(format!(
                        "its feature '{}' is {}, and '{value}' is {}",
                        feature.name,
                        want.name(),
                        column.kind().name()
                    )));
                }
                column.clone()
            }
            None if feature.view.is_some() => {
                return Err(unavailable(format!(
                    "its feature '{}' comes from the feature store, which a predict step does not read: give it",
                    feature.name
                )));
            }
            None if feature.required => {
                return Err(unavailable(format!(
                    "its feature '{}' is required and the step does not give it",
                    feature.name
                )));
            }
            None => Column::of_feature(feature.dtype, std::iter::repeat_n(&feature.default, n)),
        };
        given.insert(feature.name.clone(), column);
    }
    if let Some((name, _)) = inputs
        .iter()
        .find(|(name, _)| !pipeline.features.iter().any(|f| f.name == *name))
    {
        return Err(unavailable(format!("it has no feature '{name}'")));
    }
    let nested = Context {
        own: &target,
        depth: cx.depth + 1,
        ..cx
    };
    let (mut made, used) = steps.run_chunk(nested, given, range.clone()).await?;
    let produced = outputs
        .iter()
        .map(|(field, _)| {
            let value = steps
                .outputs
                .iter()
                .find(|(name, _)| name == field)
                .map(|(_, value)| value)
                .ok_or_else(|| unavailable(format!("its answer has no field '{field}'")))?;
            match made.remove(value) {
                Some(column @ Column::Array(_)) => Ok(column),
                _ => Err(unavailable(format!(
                    "its answer field '{field}' is not a numeric array"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((produced, used))
}

/// The `k` best items by `scores` (descending, ties in file order) meeting every `(field,
/// value)` condition, each with its `score`.
fn top_k(
    items: &[Map<String, Value>],
    scores: &[f32],
    k: usize,
    conditions: &[(&String, &str)],
) -> Vec<Value> {
    let holds = |item: &Map<String, Value>| {
        conditions
            .iter()
            .all(|(field, value)| match item.get(*field) {
                Some(Value::String(text)) => text == value,
                Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(*value)),
                _ => false,
            })
    };
    // A NaN score ranks nowhere: it is no evidence for the item.
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&i| !scores[i].is_nan() && holds(&items[i]))
        .collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| {
            let mut item = items[i].clone();
            item.insert("score".into(), json_number(f64::from(scores[i])));
            Value::Object(item)
        })
        .collect()
}

/// What the steps made of some instances: every named value, and the tokens each took.
type Computed = (HashMap<String, Column>, Vec<usize>);

const TOKEN_PARTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// The output types [`floats`] reads.
const READABLE: [DataType; 6] = [
    DataType::Fp32,
    DataType::Fp64,
    DataType::Fp16,
    DataType::Bf16,
    DataType::Int32,
    DataType::Int64,
];

fn missing(step: usize, name: &str) -> ServingError {
    ServingError::Internal(format!("pipeline step {step}: '{name}' is missing"))
}

/// Whether `spec` can take a call with these inputs (value kinds in order) and outputs.
fn check_call(
    spec: &ModelSpec,
    inputs: &[(String, String)],
    kinds: &[Kind],
    outputs: &[(String, String)],
) -> Result<(), String> {
    if spec.max_batch_size == 0 {
        return Err(
            "it does not batch (max_batch_size 0), so instances cannot share a call".into(),
        );
    }
    for tensor in &spec.inputs {
        if !inputs.iter().any(|(name, _)| *name == tensor.name) {
            return Err(format!("its input '{}' is not given", tensor.name));
        }
    }
    for ((tensor, value), kind) in inputs.iter().zip(kinds) {
        let (_, declared) = spec
            .input(tensor)
            .ok_or_else(|| format!("it has no input '{tensor}'"))?;
        let fits = match kind {
            Kind::Items | Kind::Texts => false,
            Kind::Ints => matches!(declared.dtype, DataType::Int64 | DataType::Int32),
            Kind::Number | Kind::Array => declared.dtype == DataType::Fp32,
            Kind::Text => declared.dtype == DataType::Bytes,
        };
        if !fits {
            return Err(format!(
                "input '{tensor}' is {} and cannot take '{value}' ({})",
                declared.dtype,
                kind.name()
            ));
        }
        // Sequences and numbers go in as [batch, length] and [batch, 1].
        let shaped = match kind {
            Kind::Ints => declared.dims.len() == 1 && declared.dims[0] < 0,
            Kind::Number | Kind::Text => matches!(declared.dims[..], [1] | [-1]),
            Kind::Array | Kind::Items | Kind::Texts => true,
        };
        if !shaped {
            return Err(format!(
                "input '{tensor}' has dims {:?}; '{value}' ({}) goes in as {}",
                declared.dims,
                kind.name(),
                if *kind == Kind::Ints {
                    "[-1] (any length)"
                } else {
                    "[1]"
                }
            ));
        }
    }
    for (tensor, _) in outputs {
        let (_, declared) = spec
            .output(tensor)
            .ok_or_else(|| format!("it has no output '{tensor}'"))?;
        if !READABLE.contains(&declared.dtype) {
            return Err(format!(
                "output '{tensor}' is {}; steps read FP32, FP64, FP16, BF16, INT32 and INT64",
                declared.dtype
            ));
        }
    }
    Ok(())
}

/// Calls `model` for all `n` instances in requests of at most its `max_batch_size` rows; one
/// column per output, one array per instance. An instance is one row, or several where an input
/// array has one dimension more than the model input's rows (its first dimension counts them:
/// a grid of candidates to score); then the instance's single-row inputs repeat on each of its
/// rows, and its outputs come back stacked, [rows, ...].
async fn call(
    model: &Arc<LoadedModel>,
    inputs: &[(String, String)],
    outputs: &[(String, String)],
    columns: &HashMap<String, Column>,
    n: usize,
    request_id: &str,
) -> Result<Vec<Column>, ServingError> {
    let mut given = Vec::with_capacity(inputs.len());
    let mut counts: Option<Vec<usize>> = None;
    for (tensor, value) in inputs {
        let (_, declared) = model
            .spec()
            .input(tensor)
            .ok_or_else(|| ServingError::Internal(format!("no input '{tensor}'")))?;
        let column = columns
            .get(value)
            .ok_or_else(|| ServingError::Internal(format!("'{value}' is missing")))?;
        let (rows, per_instance) = model_rows(tensor, declared.dims.len(), column)?;
        let several = per_instance.is_some();
        if let Some(per_instance) = per_instance {
            match &counts {
                Some(known) if *known != per_instance => {
                    return Err(ServingError::Internal(format!(
                        "the inputs of model '{}' give different numbers of rows per instance",
                        model.spec().name
                    )));
                }
                Some(_) => {}
                None => counts = Some(per_instance),
            }
        }
        given.push((tensor, declared.dtype, rows, several));
    }
    if let Some(counts) = &counts {
        for (_, _, rows, several) in &mut given {
            if !*several {
                *rows = Cow::Owned(rows.repeat(counts));
            }
        }
    }
    let total = counts.as_ref().map_or(n, |c| c.iter().sum());
    let chunk = model.spec().max_batch_size.max(1);
    let requests = (0..total)
        .step_by(chunk)
        .map(|start| {
            let rows = start..(start + chunk).min(total);
            let tensors = given
                .iter()
                .map(|(tensor, dtype, column, _)| {
                    input_tensor(tensor, *dtype, column, rows.clone())
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(InferRequest {
                id: request_id.to_string(),
                inputs: tensors,
                outputs: outputs
                    .iter()
                    .map(|(tensor, _)| RequestedOutput::named(tensor.clone()))
                    .collect(),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>, ServingError>>()?;
    let responses: Vec<_> = futures::stream::iter(requests.into_iter().map(|r| model.infer(r)))
        .buffered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut produced: Vec<Vec<Array>> = outputs.iter().map(|_| Vec::with_capacity(total)).collect();
    for response in responses {
        for (column, tensor) in produced.iter_mut().zip(&response.outputs) {
            column.extend(split_rows(tensor)?);
        }
    }
    produced
        .into_iter()
        .map(|rows| match &counts {
            None => Ok(Column::Array(rows)),
            Some(counts) => regroup(rows, counts).map(Column::Array),
        })
        .collect()
}

/// `column` as rows of a model input whose rows have `rank` dimensions, and how many rows each
/// instance gives where an instance's array has one dimension more (several rows); else the
/// column as it is, one row per instance.
fn model_rows<'a>(
    tensor: &str,
    rank: usize,
    column: &'a Column,
) -> Result<(Cow<'a, Column>, Option<Vec<usize>>), ServingError> {
    let Column::Array(arrays) = column else {
        return Ok((Cow::Borrowed(column), None));
    };
    if !arrays.iter().any(|a| a.shape.len() == rank + 1) {
        return Ok((Cow::Borrowed(column), None));
    }
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(arrays.len());
    for (instance, array) in arrays.iter().enumerate() {
        let (count, row_shape) = match array.shape.split_first() {
            Some((&count, row_shape)) if array.shape.len() == rank + 1 => (count, row_shape),
            _ => {
                return Err(ServingError::Internal(format!(
                    "model input '{tensor}' takes rows of {rank} dimensions, several per instance or one; instance {instance} gives shape {:?}",
                    array.shape
                )));
            }
        };
        let size = row_shape.iter().product::<usize>();
        if array.data.len() != count * size {
            return Err(ServingError::Internal(format!(
                "instance {instance}'s '{tensor}' has {} values for shape {:?}",
                array.data.len(),
                array.shape
            )));
        }
        rows.extend((0..count).map(|r| Array {
            shape: row_shape.to_vec(),
            data: array.data[r * size..(r + 1) * size].to_vec(),
        }));
        counts.push(count);
    }
    Ok((Cow::Owned(Column::Array(rows)), Some(counts)))
}

/// One output's rows back into one array per instance, `counts[i]` rows stacked for instance i.
fn regroup(rows: Vec<Array>, counts: &[usize]) -> Result<Vec<Array>, ServingError> {
    let mut rows = rows.into_iter();
    counts
        .iter()
        .map(|&count| {
            let taken: Vec<Array> = rows.by_ref().take(count).collect();
            let row_shape = taken.first().map(|r| r.shape.clone()).unwrap_or_default();
            if taken.len() != count || taken.iter().any(|r| r.shape != row_shape) {
                return Err(ServingError::Internal(
                    "a model's output rows do not stack back into their instances".into(),
                ));
            }
            let mut shape = vec![count];
            shape.extend(row_shape);
            Ok(Array {
                shape,
                data: taken.into_iter().flat_map(|r| r.data).collect(),
            })
        })
        .collect()
}

/// Rows `rows` of `column` as the model input `name` of type `dtype`: integer sequences padded
/// with 0 to the longest, arrays stacked (all of one shape), numbers as one column.
fn input_tensor(
    name: &str,
    dtype: DataType,
    column: &Column,
    rows: std::ops::Range<usize>,
) -> Result<Tensor, ServingError> {
    let count = rows.len() as i64;
    let (shape, bytes): (Vec<i64>, Vec<u8>) = match column {
        Column::Ints(sequences) => {
            let sequences = &sequences[rows];
            let longest = sequences.iter().map(Vec::len).max().unwrap_or(0).max(1);
            let mut bytes = Vec::with_capacity(sequences.len() * longest * 8);
            for sequence in sequences {
                for t in 0..longest {
                    let value = sequence.get(t).copied().unwrap_or(0);
                    if dtype == DataType::Int32 {
                        bytes.extend_from_slice(&(value as i32).to_le_bytes());
                    } else {
                        bytes.extend_from_slice(&value.to_le_bytes());
                    }
                }
            }
            (vec![count, longest as i64], bytes)
        }
        Column::Array(arrays) => {
            let arrays = &arrays[rows];
            let shape = arrays.first().map(|a| a.shape.clone()).unwrap_or_default();
            if arrays.iter().any(|a| a.shape != shape) {
                return Err(ServingError::Internal(format!(
                    "the instances give model input '{name}' arrays of different shapes"
                )));
            }
            let mut full = vec![count];
            full.extend(shape.iter().map(|&d| d as i64));
            let data: Vec<f32> = arrays.iter().flat_map(|a| a.data.iter().copied()).collect();
            (full, bytemuck::cast_slice(&data).to_vec())
        }
        Column::Number(values) => {
            let data: Vec<f32> = values[rows].iter().map(|&v| v as f32).collect();
            (vec![count, 1], bytemuck::cast_slice(&data).to_vec())
        }
        Column::Items(_) | Column::Texts(_) => {
            return Err(ServingError::Internal(format!(
                "model input '{name}' cannot take {}",
                column.kind().name()
            )));
        }
        Column::Text(texts) => {
            let items = texts[rows].iter().map(|t| Bytes::from(t.clone())).collect();
            return Tensor::new(
                name,
                DataType::Bytes,
                vec![count, 1],
                TensorData::Strings(items),
            )
            .map_err(ServingError::from);
        }
    };
    Tensor::new(name, dtype, shape, TensorData::Fixed(Bytes::from(bytes))).map_err(Into::into)
}

/// A batched output split into one float array per row.
fn split_rows(tensor: &Tensor) -> Result<Vec<Array>, ServingError> {
    let floats = floats(tensor)?;
    let rows = tensor.shape.first().copied().unwrap_or(0).max(0) as usize;
    let shape: Vec<usize> = tensor
        .shape
        .get(1..)
        .unwrap_or_default()
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let per_row = shape.iter().product::<usize>();
    if floats.len() != rows * per_row {
        return Err(ServingError::Internal(format!(
            "output '{}' has {} values for shape {:?}",
            tensor.name,
            floats.len(),
            tensor.shape
        )));
    }
    Ok(floats
        .chunks(per_row.max(1))
        .take(rows)
        .map(|row| Array {
            shape: shape.clone(),
            data: row.to_vec(),
        })
        .collect())
}

/// A numeric tensor's elements as f32.
fn floats(tensor: &Tensor) -> Result<Vec<f32>, ServingError> {
    let bytes = tensor.fixed_bytes().ok_or_else(|| {
        ServingError::Internal(format!("output '{}' is not numeric", tensor.name))
    })?;
    let read = |size: usize| bytes.chunks_exact(size);
    Ok(match tensor.dtype {
        DataType::Fp32 => read(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DataType::Fp64 => read(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        DataType::Fp16 => read(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DataType::Bf16 => read(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DataType::Int64 => read(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        DataType::Int32 => read(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        other => {
            return Err(ServingError::Internal(format!(
                "output '{}' is {other}, which pipelines do not read",
                tensor.name
            )));
        }
    })
}

/// The mean over the rows of `array` ([tokens, d]) that `mask` marks 1.
fn mean_pool(array: &Array, mask: &[i64]) -> Result<Array, String> {
    let [tokens, width] = array.shape[..] else {
        return Err(format!(
            "mean_pool needs [tokens, d] per instance, got {:?}",
            array.shape
        ));
    };
    let mut sum = vec![0f32; width];
    let mut weight = 0f32;
    for (t, &m) in mask.iter().enumerate().take(tokens) {
        if m != 0 {
            weight += 1.0;
            for (s, &x) in sum.iter_mut().zip(&array.data[t * width..(t + 1) * width]) {
                *s += x;
            }
        }
    }
    let weight = weight.max(1e-9);
    Ok(Array {
        shape: vec![width],
        data: sum.into_iter().map(|s| s / weight).collect(),
    })
}

fn l2_normalize(array: &Array) -> Array {
    let norm = array
        .data
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(1e-12);
    Array {
        shape: array.shape.clone(),
        data: array.data.iter().map(|x| x / norm).collect(),
    }
}

/// `count` numbers from `low` to `high`, evenly spaced, both ends included.
fn grid(low: f64, high: f64, count: usize) -> Array {
    let step = (high - low) / (count - 1) as f64;
    Array {
        shape: vec![count],
        data: (0..count)
            .map(|i| {
                (if i + 1 == count {
                    high
                } else {
                    low + step * i as f64
                }) as f32
            })
            .collect(),
    }
}

/// One instance's matrix of `parts` as columns: arrays give one element per row, numbers repeat.
fn stack(parts: &[(&String, &Column)], instance: usize) -> Result<Array, String> {
    let rows = common_length(parts, instance)?.unwrap_or(1);
    let mut data = Vec::with_capacity(rows * parts.len());
    for row in 0..rows {
        for (_, column) in parts {
            data.push(element(column, instance, row));
        }
    }
    Ok(Array {
        shape: vec![rows, parts.len()],
        data,
    })
}

/// The element count every array among `parts` has at `instance` (`None` when none is an
/// array), or which two differ.
fn common_length(parts: &[(&String, &Column)], instance: usize) -> Result<Option<usize>, String> {
    let mut common: Option<(&String, usize)> = None;
    for (name, column) in parts {
        if let Column::Array(arrays) = column {
            let length = arrays[instance].data.len();
            match common {
                None => common = Some((name, length)),
                Some((first, expected)) if expected != length => {
                    return Err(format!(
                        "'{first}' has {expected} elements and '{name}' {length}; element by element needs one length"
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(common.map(|(_, length)| length))
}

/// Element `at` of a number or array column at `instance`, as f32 (a number is every element).
fn element(column: &Column, instance: usize, at: usize) -> f32 {
    match column {
        Column::Number(values) => values[instance] as f32,
        Column::Array(arrays) => arrays[instance].data[at],
        _ => f32::NAN,
    }
}

/// `expression` over `operands` for each of `n` instances: numbers for numbers, and element by
/// element over arrays (shaped as the first array read).
fn evaluate(
    expression: &Expression,
    operands: &[(&String, &Column)],
    n: usize,
) -> Result<Column, String> {
    let mut values = vec![0.0; operands.len()];
    let Some(shaper) = operands.iter().find_map(|(_, column)| match column {
        Column::Array(arrays) => Some(arrays),
        _ => None,
    }) else {
        let mut numbers = Vec::with_capacity(n);
        for instance in 0..n {
            for (value, (_, column)) in values.iter_mut().zip(operands) {
                *value = match column {
                    Column::Number(v) => v[instance],
                    _ => f64::NAN,
                };
            }
            numbers.push(expression.eval(&values)?);
        }
        return Ok(Column::Number(numbers));
    };
    let mut arrays = Vec::with_capacity(n);
    for instance in 0..n {
        let length = common_length(operands, instance)?.unwrap_or(0);
        let mut data = Vec::with_capacity(length);
        for at in 0..length {
            for (value, (_, column)) in values.iter_mut().zip(operands) {
                // Numbers stay f64: a price bound keeps its precision.
                *value = match column {
                    Column::Number(v) => v[instance],
                    other => f64::from(element(other, instance, at)),
                };
            }
            data.push(expression.eval(&values)? as f32);
        }
        arrays.push(Array {
            shape: shaper[instance].shape.clone(),
            data,
        });
    }
    Ok(Column::Array(arrays))
}

/// What a nearest step finds for each instance (`wanted`: how many nearest, how many popular
/// besides): its items, and 1 where its history said nothing (no key the index holds), so the
/// most popular stood in.
fn nearest(
    index: &ItemIndex,
    histories: &[Vec<String>],
    among: Option<&[Vec<String>]>,
    (k, popular): (usize, usize),
) -> (Vec<Vec<Value>>, Vec<f64>) {
    let mut found = Vec::with_capacity(histories.len());
    let mut cold = Vec::with_capacity(histories.len());
    for (instance, history) in histories.iter().enumerate() {
        let booked: Vec<usize> = history
            .iter()
            .filter_map(|key| index.position(key))
            .collect();
        let exclude: HashSet<usize> = booked.iter().copied().collect();
        let query = index.fold_in(&booked);
        let given = among
            .map(|lists| &lists[instance])
            .filter(|list| !list.is_empty());
        let items = match (given, &query) {
            (Some(keys), query) => {
                let mut seen = HashSet::new();
                let mut positions: Vec<usize> = keys
                    .iter()
                    .filter_map(|key| index.position(key))
                    .filter(|p| !exclude.contains(p) && seen.insert(*p))
                    .collect();
                if query.is_none() {
                    index.by_popularity(&mut positions);
                }
                let mut scored = index.score(query.as_deref(), &positions);
                if query.is_some() {
                    scored.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
                }
                scored.truncate(k + popular);
                scored
            }
            (None, Some(query)) => {
                let mut found = index.nearest(query, k, &exclude);
                let mut taken = exclude.clone();
                taken.extend(found.iter().map(|f| f.position));
                let extra: Vec<usize> = index
                    .popular(popular, &taken)
                    .iter()
                    .map(|f| f.position)
                    .collect();
                found.extend(index.score(Some(query), &extra));
                found
            }
            (None, None) => index.popular(k + popular, &exclude),
        };
        cold.push(if query.is_none() { 1.0 } else { 0.0 });
        found.push(
            items
                .into_iter()
                .map(|f| {
                    let mut item = index.item(f.position).clone();
                    item.insert("similarity".into(), json_number(f64::from(f.similarity)));
                    Value::Object(item)
                })
                .collect(),
        );
    }
    (found, cold)
}

/// The numeric `field` of every item in `items`, as a 1-d array.
fn item_values(items: &[Value], field: &str) -> Result<Array, String> {
    let data = items
        .iter()
        .enumerate()
        .map(|(at, item)| {
            item.get(field)
                .and_then(Value::as_f64)
                .map(|v| v as f32)
                .ok_or_else(|| format!("item {at} has no numeric field '{field}'"))
        })
        .collect::<Result<Vec<f32>, String>>()?;
    Ok(Array {
        shape: vec![data.len()],
        data,
    })
}

/// `source`'s elements at `positions` (a position that is not a whole number inside `source`
/// takes 0: a genre the user's shares do not cover).
fn take(source: &[f32], positions: &[f32]) -> Array {
    let data: Vec<f32> = positions
        .iter()
        .map(|&p| {
            let whole = p >= 0.0 && p.fract() == 0.0;
            if whole {
                source.get(p as usize).copied().unwrap_or(0.0)
            } else {
                0.0
            }
        })
        .collect();
    Array {
        shape: vec![data.len()],
        data,
    }
}

/// `items` in the order [`diverse_order`] gives for `scores` (their own order where `keep`),
/// the best `k`, each with its `score` unless their order was kept.
fn rank(
    items: &[Value],
    scores: &[f32],
    k: usize,
    at_most: Option<&(String, Cap)>,
    keep: bool,
) -> Result<Vec<Value>, String> {
    if scores.len() != items.len() {
        return Err(format!("{} scores for {} items", scores.len(), items.len()));
    }
    let field = at_most.map(|(field, _)| field.as_str());
    let groups: Vec<Option<&str>> = items
        .iter()
        .map(|item| {
            field
                .and_then(|field| item.get(field))
                .and_then(Value::as_str)
        })
        .collect();
    let order_scores: Vec<f32> = if keep {
        (0..items.len()).map(|i| -(i as f32)).collect()
    } else {
        scores.to_vec()
    };
    Ok(
        diverse_order(&order_scores, &groups, k, at_most.map(|(_, cap)| *cap))
            .into_iter()
            .map(|i| {
                let mut item = items[i].clone();
                if let (false, Value::Object(fields)) = (keep, &mut item) {
                    fields.insert("score".into(), json_number(f64::from(scores[i])));
                }
                item
            })
            .collect(),
    )
}

/// The element of `pick` (or the position) where `scores` is largest, the first on ties; NaN
/// scores are passed over, and NaN is the answer when every score is NaN.
fn argmax(scores: &[f32], pick: Option<&[f32]>) -> Result<f64, String> {
    if let Some(pick) = pick
        && pick.len() != scores.len()
    {
        return Err(format!(
            "argmax has {} scores for {} values to pick from",
            scores.len(),
            pick.len()
        ));
    }
    let best = scores.iter().enumerate().filter(|(_, s)| !s.is_nan()).fold(
        None,
        |best: Option<(usize, f32)>, (i, &s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((i, s)),
        },
    );
    Ok(match (best, pick) {
        (None, _) => f64::NAN,
        (Some((i, _)), Some(pick)) => f64::from(pick[i]),
        (Some((i, _)), None) => i as f64,
    })
}

fn nested(shape: &[usize], data: &[f32]) -> Value {
    match shape {
        [] => data
            .first()
            .map_or(Value::Null, |&v| json_number(f64::from(v))),
        [_] => Value::Array(data.iter().map(|&v| json_number(f64::from(v))).collect()),
        [_, rest @ ..] => {
            let size = rest.iter().product::<usize>().max(1);
            Value::Array(data.chunks(size).map(|c| nested(rest, c)).collect())
        }
    }
}

/// f32 values are shown with f32's shortest text (as `/v2` does), not f64's long one.
pub(crate) fn json_number(value: f64) -> Value {
    let short = (value as f32).to_string().parse().unwrap_or(value);
    serde_json::Number::from_f64(short).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_called_version_is_a_number_from_1_or_an_alias() {
        let called = |v: Option<Value>| Called::new(2, "m".into(), v).map(|c| c.to_string());
        assert_eq!(called(None).unwrap(), "model 'm'");
        assert_eq!(
            called(Some(serde_json::json!(3))).unwrap(),
            "model 'm' version 3"
        );
        assert_eq!(
            called(Some(serde_json::json!("production"))).unwrap(),
            "model 'm' version production"
        );
        for refused in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(""),
            serde_json::json!(null),
            serde_json::json!(["1"]),
        ] {
            let error = called(Some(refused.clone())).unwrap_err();
            assert!(
                error.starts_with("step 2: version must be"),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn top_k_ranks_filters_and_skips_nan() {
        let items: Vec<Map<String, Value>> = [
            serde_json::json!({"id": "a", "genres": ["x", "y"]}),
            serde_json::json!({"id": "b", "genres": "x"}),
            serde_json::json!({"id": "c", "genres": ["y"]}),
            serde_json::json!({"id": "d"}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        let ids = |ranked: Vec<Value>| -> Vec<String> {
            ranked
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect()
        };
        let scores = [0.5, f32::NAN, 0.9, 0.5];
        assert_eq!(ids(top_k(&items, &scores, 10, &[])), ["c", "a", "d"]);
        assert_eq!(ids(top_k(&items, &scores, 1, &[])), ["c"]);
        let genre = "genres".to_string();
        assert_eq!(ids(top_k(&items, &scores, 10, &[(&genre, "x")])), ["a"]);
        assert_eq!(
            ids(top_k(&items, &[0.1, 0.2, 0.3, 0.4], 10, &[(&genre, "x")])),
            ["b", "a"]
        );
        assert_eq!(
            top_k(&items, &scores, 10, &[])[0]["score"],
            serde_json::json!(0.9)
        );
    }

    #[test]
    fn mean_pool_averages_the_masked_rows_only() {
        let array = Array {
            shape: vec![3, 2],
            data: vec![1.0, 2.0, 3.0, 4.0, 100.0, 100.0],
        };
        let pooled = mean_pool(&array, &[1, 1]).unwrap();
        assert_eq!(pooled.shape, [2]);
        assert_eq!(pooled.data, [2.0, 3.0]);
        assert!(mean_pool(&pooled, &[1]).is_err());
    }

    #[test]
    fn l2_normalize_gives_unit_length() {
        let unit = l2_normalize(&Array {
            shape: vec![2],
            data: vec![3.0, 4.0],
        });
        assert_eq!(unit.data, [0.6, 0.8]);
        assert_eq!(
            l2_normalize(&Array {
                shape: vec![2],
                data: vec![0.0, 0.0]
            })
            .data,
            [0.0, 0.0]
        );
    }

    #[test]
    fn integer_sequences_are_padded_to_the_longest() {
        let column = Column::Ints(vec![vec![5, 6, 7], vec![8]]);
        let tensor = input_tensor("ids", DataType::Int64, &column, 0..2).unwrap();
        assert_eq!(tensor.shape, [2, 3]);
        let values: Vec<i64> = tensor
            .fixed_bytes()
            .unwrap()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(values, [5, 6, 7, 8, 0, 0]);
    }

    fn named(columns: &[(&str, Column)]) -> Vec<(String, Column)> {
        columns
            .iter()
            .map(|(name, column)| (name.to_string(), column.clone()))
            .collect()
    }

    fn refs(columns: &[(String, Column)]) -> Vec<(&String, &Column)> {
        columns
            .iter()
            .map(|(name, column)| (name, column))
            .collect()
    }

    #[test]
    fn a_grid_spans_both_ends_evenly() {
        let grid = grid(0.5, 1.5, 5);
        assert_eq!(grid.shape, [5]);
        assert_eq!(grid.data, [0.5, 0.75, 1.0, 1.25, 1.5]);
    }

    #[test]
    fn stack_puts_arrays_in_rows_and_repeats_numbers() {
        let columns = named(&[
            (
                "m",
                Column::Array(vec![Array {
                    shape: vec![3],
                    data: vec![1.0, 2.0, 3.0],
                }]),
            ),
            ("h", Column::Number(vec![9.0])),
        ]);
        let matrix = stack(&refs(&columns), 0).unwrap();
        assert_eq!(matrix.shape, [3, 2]);
        assert_eq!(matrix.data, [1.0, 9.0, 2.0, 9.0, 3.0, 9.0]);
        let uneven = named(&[
            ("m", columns[0].1.clone()),
            (
                "k",
                Column::Array(vec![Array {
                    shape: vec![2],
                    data: vec![1.0, 2.0],
                }]),
            ),
        ]);
        assert!(stack(&refs(&uneven), 0).unwrap_err().contains("one length"));
    }

    #[test]
    fn arithmetic_goes_element_by_element_over_arrays() {
        let columns = named(&[
            (
                "m",
                Column::Array(vec![Array {
                    shape: vec![2],
                    data: vec![1.0, 2.0],
                }]),
            ),
            (
                "d",
                Column::Array(vec![Array {
                    shape: vec![2, 1],
                    data: vec![0.5, 0.25],
                }]),
            ),
            ("base", Column::Number(vec![10.0])),
        ]);
        let expression = Expression::parse("m * d * base").unwrap();
        let operands: Vec<(&String, &Column)> = expression
            .names()
            .iter()
            .map(|name| {
                let (name, column) = columns.iter().find(|(n, _)| n == name).unwrap();
                (name, column)
            })
            .collect();
        let Column::Array(result) = evaluate(&expression, &operands, 1).unwrap() else {
            panic!("an array");
        };
        assert_eq!(result[0].shape, [2]);
        assert_eq!(result[0].data, [5.0, 5.0]);
        let numbers = named(&[("base", Column::Number(vec![10.0, 20.0]))]);
        let halved = Expression::parse("base / 2").unwrap();
        let Column::Number(values) = evaluate(&halved, &refs(&numbers), 2).unwrap() else {
            panic!("numbers");
        };
        assert_eq!(values, [5.0, 10.0]);
    }

    #[test]
    fn argmax_picks_the_first_best_and_passes_over_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0], None).unwrap(), 1.0);
        assert_eq!(
            argmax(&[f32::NAN, 1.0, 0.5], Some(&[7.0, 8.0, 9.0])).unwrap(),
            8.0
        );
        assert!(argmax(&[f32::NAN], None).unwrap().is_nan());
        assert!(argmax(&[1.0], Some(&[1.0, 2.0])).is_err());
    }

    #[test]
    fn an_instance_with_an_extra_dimension_gives_several_rows() {
        let column = Column::Array(vec![
            Array {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
            Array {
                shape: vec![1, 3],
                data: vec![7.0, 8.0, 9.0],
            },
        ]);
        let (rows, counts) = model_rows("X", 1, &column).unwrap();
        assert_eq!(counts, Some(vec![2, 1]));
        let Column::Array(rows) = rows.as_ref() else {
            panic!("rows");
        };
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].data, [4.0, 5.0, 6.0]);
        let regrouped = regroup(rows.clone(), &[2, 1]).unwrap();
        assert_eq!(regrouped[0].shape, [2, 3]);
        assert_eq!(regrouped[1].data, [7.0, 8.0, 9.0]);
        // One row per instance stays as it is; a shape of neither rank is refused.
        let single = Column::Array(vec![Array {
            shape: vec![3],
            data: vec![1.0, 2.0, 3.0],
        }]);
        assert_eq!(model_rows("X", 1, &single).unwrap().1, None);
        let mixed = Column::Array(vec![
            Array {
                shape: vec![1, 3],
                data: vec![1.0, 2.0, 3.0],
            },
            Array {
                shape: vec![3],
                data: vec![1.0, 2.0, 3.0],
            },
        ]);
        assert!(model_rows("X", 1, &mixed).is_err());
        assert_eq!(Column::Number(vec![1.0, 2.0]).repeat(&[2, 1]).len(), 3);
    }

    #[test]
    fn outputs_split_into_rows_and_nest_by_shape() {
        let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let tensor = Tensor::new(
            "y",
            DataType::Fp32,
            vec![2, 2, 2],
            TensorData::Fixed(Bytes::from(bytemuck::cast_slice(&data).to_vec())),
        )
        .unwrap();
        let rows = split_rows(&tensor).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].data, [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(
            nested(&rows[1].shape, &rows[1].data),
            serde_json::json!([[4.0, 5.0], [6.0, 7.0]])
        );
    }
}
