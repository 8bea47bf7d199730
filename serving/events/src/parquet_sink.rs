//! The embedded sink: Parquet files on local disk, by stream and hour, in folders a training job
//! reads like any offline source (`marquee features dataset`):
//!
//! ```text
//! DIR/predictions/model=fraud/date=2025-12-04/hour=17/part-1764867600000-1a2b3c4d.parquet
//! DIR/inferences/model=fraud/date=2025-12-04/hour=17/part-….parquet
//! DIR/events/model/date=2025-12-04/hour=17/part-….parquet
//! ```
//!
//! A record's fields become columns; the `features` and `entities` objects of a prediction open
//! into one column per feature and join key, so the files join with feature definitions as they
//! are. A file is written under a `.partial` name and renamed when it closes (after `roll`, when
//! its columns change, or on flush), so readers never see half a file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde_json::{Map, Value};

use crate::background::Background;
use crate::{
    EventError, Features, Fields, InferenceFields, PredictionFields, Record, Sink, SinkFailure,
    Stream, rfc3339,
};

/// Rows per Parquet row group, at most.
const ROW_GROUP: usize = 65_536;
/// Bytes per Parquet row group, at most.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// Most records one write encodes (the log's batches are 2,048 by default). The encoding is one
/// job on the sink's thread, which shares the cores with requests: a job of 2,048 records
/// (several ms) showed at full load as a p99 spike and as lost throughput. Writes of 256
/// spread the same work evenly over time (cutting a large batch into jobs run back to back did
/// not: the thread stays busy as long). Rows still gather into row groups of [`ROW_GROUP`].
/// README, "Traffic management on the prediction path", has the measurements.
const MOST_PER_WRITE: usize = 256;

/// Objects of a prediction record that open into columns of their own.
const OPENED: [&str; 2] = ["features", "entities"];

/// An hour in milliseconds: files are partitioned by the hour of their records.
const HOUR_MS: i64 = 3_600_000;

pub struct ParquetSink {
    dir: PathBuf,
    roll: Duration,
    open: Arc<Mutex<HashMap<PathBuf, OpenFile>>>,
    /// Where batches are encoded and written (see `background.rs`).
    background: Background,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    schema: SchemaRef,
    opened: Instant,
}

impl ParquetSink {
    /// Files under `dir`, each closed at the latest `roll` after it opened.
    pub fn new(dir: impl Into<PathBuf>, roll: Duration) -> Result<Self, EventError> {
        Ok(Self {
            dir: dir.into(),
            roll,
            open: Arc::new(Mutex::new(HashMap::new())),
            background: Background::spawn("parquet-sink")?,
        })
    }
}

#[async_trait]
impl Sink for ParquetSink {
    fn name(&self) -> &'static str {
        "parquet"
    }

    fn most_per_write(&self) -> Option<usize> {
        Some(MOST_PER_WRITE)
    }

    async fn write(&self, records: Arc<Vec<Record>>) -> Result<(), SinkFailure> {
        let len = records.len();
        let dir = self.dir.clone();
        let roll = self.roll;
        let open = self.open.clone();
        self.background
            .run(move || {
                let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                write_records(&dir, roll, &mut open, &records)
            })
            .await
            .unwrap_or_else(|panic| {
                Err(SinkFailure::refused(
                    len,
                    format!("parquet writer: {panic}"),
                ))
            })
    }

    async fn flush(&self) -> Result<(), EventError> {
        let open = self.open.clone();
        self.background
            .run(move || {
                let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                let mut first_error = None;
                for (_, file) in open.drain() {
                    if let Err(e) = file.close() {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
            .await
            .map_err(|e| EventError::Parquet(format!("flush: {e}")))?
    }
}

/// Writes each group of records (same folder) to its open file (the writer holds rows in memory
/// until a row group fills or the file closes); failures fail that group only.
fn write_records(
    dir: &Path,
    roll: Duration,
    open: &mut HashMap<PathBuf, OpenFile>,
    records: &[Record],
) -> Result<(), SinkFailure> {
    let mut groups: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    // The folder of each (stream, key, hour) met, as a group: formatted once, not per record.
    // An event's folder has no key (events are keyed by subject: as many as records).
    let mut partitions: Vec<((&Stream, &str, i64), usize)> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let key = match record.stream {
            Stream::Event { .. } => "",
            Stream::Prediction | Stream::Inference => record.key.as_str(),
        };
        let partition = (&record.stream, key, record.time_ms.div_euclid(HOUR_MS));
        let group = match partitions.iter().find(|(p, _)| *p == partition) {
            Some(&(_, group)) => group,
            None => {
                let folder = dir.join(folder_of(record));
                let group = match groups.iter().position(|(f, _)| *f == folder) {
                    Some(group) => group,
                    None => {
                        groups.push((folder, Vec::new()));
                        groups.len() - 1
                    }
                };
                partitions.push((partition, group));
                group
            }
        };
        groups[group].1.push(i);
    }
    let mut failed = Vec::new();
    let mut reason = String::new();
    for (folder, members) in groups {
        let rows: Vec<&Record> = members.iter().map(|&i| &records[i]).collect();
        if let Err(e) = write_group(&folder, open, &rows) {
            reason = e.to_string();
            failed.extend(members);
        }
    }
    let expired: Vec<PathBuf> = open
        .iter()
        .filter(|(_, f)| f.opened.elapsed() >= roll)
        .map(|(k, _)| k.clone())
        .collect();
    for folder in expired {
        if let Some(file) = open.remove(&folder)
            && let Err(e) = file.close()
        {
            tracing::error!(error = %e, "a parquet event file did not close");
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        failed.sort_unstable();
        Err(SinkFailure {
            failed,
            rejected: Vec::new(),
            reason,
        })
    }
}

/// `predictions/model=NAME/date=D/hour=H`, `inferences/model=NAME/…` or
/// `events/FAMILY/date=D/hour=H`.
fn folder_of(record: &Record) -> PathBuf {
    let time = rfc3339(record.time_ms);
    let partition = format!("date={}/hour={}", &time[..10], &time[11..13]);
    match &record.stream {
        Stream::Prediction | Stream::Inference => PathBuf::from(format!(
            "{}/model={}/{partition}",
            record.topic(),
            safe(&record.key)
        )),
        Stream::Event { .. } => PathBuf::from(record.topic().replace('.', "/")).join(partition),
    }
}

/// A key as one folder name: nothing that climbs or nests.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

fn write_group(
    folder: &Path,
    open: &mut HashMap<PathBuf, OpenFile>,
    rows: &[&Record],
) -> Result<(), EventError> {
    let batch = to_batch(rows)?;
    if let Some(file) = open.get(folder)
        && file.schema != batch.schema()
    {
        let file = open.remove(folder).expect("present");
        file.close()?;
    }
    if !open.contains_key(folder) {
        open.insert(
            folder.to_path_buf(),
            OpenFile::create(folder, batch.schema())?,
        );
    }
    let file = open.get_mut(folder).expect("opened above");
    file.writer
        .write(&batch)
        .map_err(|e| EventError::Parquet(format!("{}: {e}", file.partial.display())))
}

impl OpenFile {
    fn create(folder: &Path, schema: SchemaRef) -> Result<Self, EventError> {
        std::fs::create_dir_all(folder)
            .map_err(|e| EventError::Parquet(format!("{}: {e}", folder.display())))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = folder.join(format!("part-{}-{}.parquet", crate::now_ms(), &id[..8]));
        let partial = path.with_extension("parquet.partial");
        let file = File::create(&partial)
            .map_err(|e| EventError::Parquet(format!("{}: {e}", partial.display())))?;
        // Row groups of ROW_GROUP rows or ROW_GROUP_BYTES: the writer holds a row group's pages
        // in memory until it fills (a million rows by default, tens of MB per open file, grown
        // by reallocation; an inference's tensors make rows large). Ids and tensors are unique
        // per row: a dictionary would only be hashed and thrown away.
        let mut properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES));
        for unique in ["prediction_id", "inputs", "outputs"] {
            properties = properties.set_column_dictionary_enabled(ColumnPath::from(unique), false);
        }
        let properties = properties.build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))
            .map_err(|e| EventError::Parquet(format!("{}: {e}", partial.display())))?;
        Ok(Self {
            writer,
            partial,
            path,
            schema,
            opened: Instant::now(),
        })
    }

    fn close(self) -> Result<(), EventError> {
        self.writer
            .close()
            .map_err(|e| EventError::Parquet(format!("{}: {e}", self.partial.display())))?;
        std::fs::rename(&self.partial, &self.path)
            .map_err(|e| EventError::Parquet(format!("{}: {e}", self.path.display())))
    }
}

/// A record's columns: its fields, with `features` and `entities` opened into theirs. An opened
/// key that is also a field's name, `timestamp` (the record's time, a column of its own), or a
/// key of an object opened before (an entity named like a feature), becomes `entities.KEY` /
/// `features.KEY`, so no value hides another.
fn columns_of<'a>(record: &'a Record, scratch: &mut Scratch<'a>) {
    scratch.columns.clear();
    match &record.fields {
        Fields::Json(fields) => json_columns(fields, &mut scratch.columns),
        Fields::Prediction(fields) => prediction_columns(fields, scratch),
        Fields::Inference(fields) => inference_columns(fields, &mut scratch.columns),
    }
}

/// One row's (column name, value) pairs.
type Columns<'a> = Vec<(Cow<'a, str>, Cell<'a>)>;

/// What [`to_batch`] reuses from row to row: the row's columns, and the sorted order of the
/// feature names it met last (the rows of one pipeline share one list of names, so it is
/// sorted once a batch, not once a row).
#[derive(Default)]
struct Scratch<'a> {
    columns: Columns<'a>,
    feature_order: Option<(&'a [String], Vec<usize>)>,
}

impl<'a> Scratch<'a> {
    /// The positions of `names` in name order.
    fn feature_order(&mut self, names: &'a [String]) -> &[usize] {
        let known = matches!(self.feature_order, Some((last, _)) if std::ptr::eq(last, names));
        if !known {
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by_key(|&i| &names[i]);
            self.feature_order = Some((names, order));
        }
        self.feature_order.as_ref().map_or(&[], |(_, order)| order)
    }
}

/// `key` of the opened object `object`, prefixed when its name is `taken`.
fn opened_column<'a>(object: &str, key: &'a str, taken: bool) -> Cow<'a, str> {
    if taken || key == "timestamp" {
        Cow::Owned(format!("{object}.{key}"))
    } else {
        Cow::Borrowed(key)
    }
}

fn json_columns<'a>(fields: &'a Map<String, Value>, columns: &mut Columns<'a>) {
    let opened = |name: &str, value: &Value| OPENED.contains(&name) && value.is_object();
    let is_field = |key: &str| fields.get(key).is_some_and(|value| !opened(key, value));
    let mut opened_before: Vec<&Map<String, Value>> = Vec::new();
    for (name, value) in fields {
        match value {
            Value::Object(inner) if opened(name, value) => {
                for (key, value) in inner {
                    let taken = is_field(key)
                        || opened_before.iter().any(|before| before.contains_key(key));
                    columns.push((opened_column(name, key, taken), Cell::Json(value)));
                }
                opened_before.push(inner);
            }
            _ if name == "timestamp" => {}
            _ => columns.push((Cow::Borrowed(name.as_str()), Cell::Json(value))),
        }
    }
}

/// The same columns as [`json_columns`] gives the prediction's JSON object, in the same order
/// (features sorted by name, as the object holds them), read from the typed fields.
fn prediction_columns<'a>(p: &'a PredictionFields, scratch: &mut Scratch<'a>) {
    let is_field = |key: &str| PredictionFields::SCALARS.contains(&key);
    let mut columns = std::mem::take(&mut scratch.columns);
    columns.push(("cache_hit".into(), Cell::Bool(p.cache_hit)));
    columns.push(("degraded".into(), Cell::Texts(&p.degraded)));
    for (key, value) in &p.entities {
        columns.push((
            opened_column("entities", key, is_field(key)),
            Cell::Json(value),
        ));
    }
    let mut feature = |key: &'a str, value: &'a Value| {
        let taken = is_field(key) || p.entities.contains_key(key);
        columns.push((opened_column("features", key, taken), Cell::Json(value)));
    };
    match &p.features {
        Features::Named { names, values } => {
            for &i in scratch.feature_order(names) {
                if let Some(value) = values.get(i) {
                    feature(&names[i], value);
                }
            }
        }
        Features::Json(fields) => {
            let mut sorted: Vec<(&str, &Value)> =
                fields.iter().map(|(k, v)| (k.as_str(), v)).collect();
            sorted.sort_unstable_by_key(|(key, _)| *key);
            sorted
                .into_iter()
                .for_each(|(key, value)| feature(key, value));
        }
    }
    columns.push(("label".into(), optional_text(&p.label)));
    columns.push(("latency_ms".into(), Cell::Float(p.latency_ms)));
    columns.push(("model".into(), Cell::Text(&p.model)));
    columns.push(("prediction".into(), Cell::Json(&p.prediction)));
    columns.push(("prediction_id".into(), Cell::Text(&p.prediction_id)));
    columns.push(("variant".into(), optional_text(&p.variant)));
    columns.push(("version".into(), Cell::Int(p.version as i64)));
    scratch.columns = columns;
}

/// The same columns as [`json_columns`] gives the inference's JSON object, in the same order,
/// read from the typed fields (the tensors as the JSON text they already are).
fn inference_columns<'a>(f: &'a InferenceFields, columns: &mut Columns<'a>) {
    columns.extend([
        ("inputs".into(), Cell::JsonText(f.inputs.get())),
        ("latency_ms".into(), Cell::Float(f.latency_ms)),
        ("model".into(), Cell::Text(&f.model)),
        ("outputs".into(), Cell::JsonText(f.outputs.get())),
        ("prediction_id".into(), Cell::Text(&f.prediction_id)),
        ("request_id".into(), optional_text(&f.request_id)),
        ("variant".into(), optional_text(&f.variant)),
        ("version".into(), Cell::Int(f.version as i64)),
    ]);
}

static NULL: Value = Value::Null;

/// A typed field that may be missing: its text, or null as its JSON form has it.
fn optional_text(value: &Option<String>) -> Cell<'_> {
    value.as_deref().map_or(Cell::Json(&NULL), Cell::Text)
}

/// One value of a column, as the record holds it: JSON, or a typed prediction field.
#[derive(Debug, Clone, Copy)]
enum Cell<'a> {
    Json(&'a Value),
    Text(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Texts(&'a [&'static str]),
    /// A nested value written as JSON already: a JSON text column.
    JsonText(&'a str),
}

impl Cell<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Cell::Json(Value::Null))
    }

    fn kind(&self) -> Option<Kind> {
        Some(match self {
            Cell::Json(value) => return kind_of(value),
            Cell::Text(_) => Kind::Text,
            Cell::Int(_) => Kind::Int,
            Cell::Float(_) => Kind::Float,
            Cell::Bool(_) => Kind::Bool,
            Cell::Texts([]) => Kind::EmptyList,
            Cell::Texts(_) => Kind::TextList,
            Cell::JsonText(_) => Kind::Json,
        })
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Cell::Json(value) => value.as_bool(),
            Cell::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match self {
            Cell::Json(value) => value.as_i64(),
            Cell::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Cell::Json(value) => value.as_f64(),
            Cell::Int(i) => Some(*i as f64),
            Cell::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The value as text: a string as it is, anything else as JSON.
    fn text(&self) -> Cow<'_, str> {
        match self {
            Cell::Json(Value::String(s)) => Cow::Borrowed(s),
            Cell::Json(value) => Cow::Owned(value.to_string()),
            Cell::Text(s) => Cow::Borrowed(s),
            Cell::Int(i) => Cow::Owned(i.to_string()),
            Cell::Float(f) => Cow::Owned(Value::from(*f).to_string()),
            Cell::Bool(b) => Cow::Owned(b.to_string()),
            Cell::Texts(items) => Cow::Owned(Value::from(items.to_vec()).to_string()),
            Cell::JsonText(text) => Cow::Borrowed(text),
        }
    }
}

/// The Arrow type a column's values share.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Int,
    Float,
    Text,
    FloatList,
    TextList,
    /// An empty list: either list, whichever the column's other rows hold (texts when none do,
    /// as an empty `degraded` is a list of none).
    EmptyList,
    /// Mixed or nested: JSON text.
    Json,
}

fn kind_of(value: &Value) -> Option<Kind> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(_) => Kind::Bool,
        Value::Number(n) if n.is_i64() => Kind::Int,
        Value::Number(_) => Kind::Float,
        Value::String(_) => Kind::Text,
        Value::Array(items) if items.is_empty() => Kind::EmptyList,
        Value::Array(items) if items.iter().all(Value::is_number) => Kind::FloatList,
        Value::Array(items) if items.iter().all(Value::is_string) => Kind::TextList,
        _ => Kind::Json,
    })
}

fn unify(a: Kind, b: Kind) -> Kind {
    match (a, b) {
        _ if a == b => a,
        (Kind::Int, Kind::Float) | (Kind::Float, Kind::Int) => Kind::Float,
        (Kind::EmptyList, list @ (Kind::FloatList | Kind::TextList))
        | (list @ (Kind::FloatList | Kind::TextList), Kind::EmptyList) => list,
        _ => Kind::Json,
    }
}

/// One column of a batch as it is gathered: a value (or nothing) per row so far.
struct Gathered<'a> {
    name: Cow<'a, str>,
    kind: Option<Kind>,
    values: Vec<Option<Cell<'a>>>,
}

fn to_batch(rows: &[&Record]) -> Result<RecordBatch, EventError> {
    let mut gathered: Vec<Gathered> = Vec::new();
    let mut index: HashMap<Cow<str>, usize> = HashMap::new();
    // Where the previous row put its n-th column: rows of one model share their layout, so a
    // name is looked up only when it moves.
    let mut previous: Vec<usize> = Vec::new();
    let mut scratch = Scratch::default();
    for (row, record) in rows.iter().enumerate() {
        columns_of(record, &mut scratch);
        for (n, (name, value)) in scratch.columns.drain(..).enumerate() {
            let position = match previous.get(n) {
                Some(&p) if same_name(&gathered[p].name, &name) => p,
                _ => *index.entry(name.clone()).or_insert_with(|| {
                    gathered.push(Gathered {
                        name,
                        kind: None,
                        values: Vec::with_capacity(rows.len()),
                    });
                    gathered.len() - 1
                }),
            };
            match previous.get_mut(n) {
                Some(p) => *p = position,
                None => previous.push(position),
            }
            let column = &mut gathered[position];
            if column.values.len() > row {
                continue;
            }
            column.values.resize(row, None);
            column.values.push(Some(value).filter(|v| !v.is_null()));
            if let Some(kind) = value.kind() {
                column.kind = Some(column.kind.map_or(kind, |k| unify(k, kind)));
            }
        }
    }
    let mut fields = vec![Field::new(
        "timestamp",
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )];
    let mut timestamps =
        TimestampMillisecondBuilder::with_capacity(rows.len()).with_timezone("UTC");
    for record in rows {
        timestamps.append_value(record.time_ms);
    }
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(timestamps.finish())];
    for mut column in gathered {
        column.values.resize(rows.len(), None);
        let (data_type, array) = column_array(column.kind.unwrap_or(Kind::Text), &column.values);
        fields.push(Field::new(column.name, data_type, true));
        arrays.push(array);
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    RecordBatch::try_new(schema, arrays).map_err(|e| EventError::Parquet(e.to_string()))
}

/// Whether two column names are the same; a name borrowed from the same place (a static field
/// name, a feature name of the pipeline's shared list) is told without comparing its bytes.
fn same_name(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

fn column_array(kind: Kind, values: &[Option<Cell<'_>>]) -> (DataType, ArrayRef) {
    let len = values.len();
    match kind {
        Kind::Bool => {
            let mut b = BooleanBuilder::with_capacity(len);
            values
                .iter()
                .for_each(|v| b.append_option(v.and_then(|v| v.as_bool())));
            (DataType::Boolean, Arc::new(b.finish()))
        }
        Kind::Int => {
            let mut b = Int64Builder::with_capacity(len);
            values
                .iter()
                .for_each(|v| b.append_option(v.and_then(|v| v.as_i64())));
            (DataType::Int64, Arc::new(b.finish()))
        }
        Kind::Float => {
            let mut b = Float64Builder::with_capacity(len);
            values
                .iter()
                .for_each(|v| b.append_option(v.and_then(|v| v.as_f64())));
            (DataType::Float64, Arc::new(b.finish()))
        }
        Kind::FloatList => {
            let mut b = ListBuilder::new(Float64Builder::new());
            for value in values {
                match value {
                    Some(Cell::Json(Value::Array(items))) => {
                        items
                            .iter()
                            .for_each(|i| b.values().append_option(i.as_f64()));
                        b.append(true);
                    }
                    _ => b.append(false),
                }
            }
            let array = b.finish();
            (array.data_type().clone(), Arc::new(array))
        }
        Kind::TextList | Kind::EmptyList => {
            let mut b = ListBuilder::new(StringBuilder::new());
            for value in values {
                match value {
                    Some(Cell::Json(Value::Array(items))) => {
                        items
                            .iter()
                            .for_each(|i| b.values().append_option(i.as_str()));
                        b.append(true);
                    }
                    Some(Cell::Texts(items)) => {
                        items.iter().for_each(|i| b.values().append_value(i));
                        b.append(true);
                    }
                    _ => b.append(false),
                }
            }
            let array = b.finish();
            (array.data_type().clone(), Arc::new(array))
        }
        Kind::Text | Kind::Json => {
            let mut b = StringBuilder::with_capacity(len, len * 16);
            for value in values {
                match value {
                    None => b.append_null(),
                    Some(cell) => b.append_value(cell.text()),
                }
            }
            (DataType::Utf8, Arc::new(b.finish()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use serde_json::{Map, json};
    use std::collections::BTreeMap;

    /// A record's columns, as one row of a batch gives them.
    fn columns(record: &Record) -> Columns<'_> {
        let mut scratch = Scratch::default();
        columns_of(record, &mut scratch);
        scratch.columns
    }

    fn prediction(i: i64) -> Record {
        let fields = json!({
            "prediction_id": format!("p{i}"),
            "model": "fraud",
            "version": 3,
            "variant": null,
            "entities": {"user_id": format!("u{i}")},
            "features": {"amount": i as f64 * 1.5, "hour": i, "device": "ios"},
            "prediction": [0.1, 0.9],
            "cache_hit": false,
        });
        let Value::Object(fields) = fields else {
            unreachable!()
        };
        Record::prediction("fraud", 1_764_867_600_000 + i, fields)
    }

    fn read_all(dir: &Path) -> Vec<RecordBatch> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files
            .iter()
            .inspect(|p| assert_eq!(p.extension().unwrap(), "parquet", "{p:?} is closed"))
            .flat_map(|p| {
                ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(Result::unwrap)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn predictions_land_by_model_and_hour_with_features_as_columns() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ParquetSink::new(dir.path(), Duration::from_secs(3600)).unwrap();
        let records: Vec<Record> = (0..10).map(prediction).collect();
        sink.write(Arc::new(records[..6].to_vec())).await.unwrap();
        sink.write(Arc::new(records[6..].to_vec())).await.unwrap();
        let event = Record::event("model.deployed", "fraud", 1_764_867_600_000, Map::new());
        sink.write(Arc::new(vec![event])).await.unwrap();
        sink.flush().await.unwrap();

        let folder = dir
            .path()
            .join("predictions/model=fraud/date=2025-12-04/hour=17");
        assert_eq!(
            std::fs::read_dir(&folder).unwrap().count(),
            1,
            "one file per hour"
        );
        let batches = read_all(&folder);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 10);
        let batch = &batches[0];
        let schema = batch.schema();
        for column in [
            "timestamp",
            "prediction_id",
            "user_id",
            "amount",
            "hour",
            "device",
            "prediction",
        ] {
            assert!(
                schema.field_with_name(column).is_ok(),
                "{column} in {schema:?}"
            );
        }
        assert_eq!(
            batch
                .column_by_name("hour")
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(3),
            3
        );
        assert_eq!(
            batch
                .column_by_name("amount")
                .unwrap()
                .as_primitive::<Float64Type>()
                .value(2),
            3.0
        );
        let lists = batch.column_by_name("prediction").unwrap().as_list::<i32>();
        assert_eq!(
            lists
                .value(0)
                .as_primitive::<Float64Type>()
                .values()
                .to_vec(),
            vec![0.1, 0.9]
        );
        let events = read_all(&dir.path().join("events/model"));
        assert_eq!(
            events[0]
                .column_by_name("kind")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "model.deployed"
        );
    }

    #[test]
    fn mixed_columns_widen_and_keys_cannot_climb() {
        assert_eq!(unify(Kind::Int, Kind::Float), Kind::Float);
        assert_eq!(unify(Kind::Text, Kind::Float), Kind::Json);
        assert_eq!(safe("../etc"), "_etc");
        assert_eq!(kind_of(&json!([1, "a"])), Some(Kind::Json));
    }

    /// A typed prediction and the JSON object it encodes to (what the spill gives back) write
    /// the same columns, in the same order, of the same types, with the same values.
    #[test]
    fn a_typed_prediction_writes_the_columns_of_its_json() {
        for degraded in [vec!["features"], Vec::new()] {
            let typed = PredictionFields {
                cache_hit: false,
                degraded,
                entities: json!({"user_id": "u1", "model": "entity"})
                    .as_object()
                    .cloned()
                    .unwrap(),
                features: Features::Named {
                    names: vec!["amount".to_string(), "user_id".into(), "hour".into()].into(),
                    values: vec![json!(2.5), json!(7), json!(3)],
                },
                label: None,
                latency_ms: 0.75,
                model: "fraud".into(),
                prediction: json!([0.1, 0.9]),
                prediction_id: "p1".into(),
                variant: Some("b".into()),
                version: 3,
            };
            let record = Record::prediction("fraud", 5, typed);
            let line = serde_json::to_string(&record).unwrap();
            let replayed: Record = serde_json::from_str(&line).unwrap();
            assert!(matches!(replayed.fields, Fields::Json(_)));
            let texts = |record: &Record| -> Vec<(String, Option<String>)> {
                columns(record)
                    .into_iter()
                    .map(|(name, cell)| {
                        (
                            name.into_owned(),
                            (!cell.is_null()).then(|| cell.text().into_owned()),
                        )
                    })
                    .collect()
            };
            let from_typed = texts(&record);
            assert!(from_typed.iter().any(|(name, _)| name == "entities.model"));
            assert!(
                from_typed
                    .iter()
                    .any(|(name, _)| name == "features.user_id")
            );
            assert_eq!(from_typed, texts(&replayed));
            let schema = |record: &Record| to_batch(&[record]).unwrap().schema();
            assert_eq!(schema(&record), schema(&replayed), "one file takes both");
            assert_eq!(
                schema(&record)
                    .field_with_name("degraded")
                    .unwrap()
                    .data_type(),
                &DataType::new_list(DataType::Utf8, true)
            );
        }
    }

    /// Rows of two pipelines in one batch (two lists of feature names, in no order): each row's
    /// values land in its own names' columns, whichever list came first.
    #[test]
    fn rows_of_other_feature_lists_keep_their_values() {
        let typed = |names: &[&str], values: &[f64]| {
            let fields = PredictionFields {
                cache_hit: false,
                degraded: Vec::new(),
                entities: Map::new(),
                features: Features::Named {
                    names: names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .into(),
                    values: values.iter().map(|&v| json!(v)).collect(),
                },
                label: None,
                latency_ms: 1.0,
                model: "m".into(),
                prediction: json!(0.5),
                prediction_id: "p".into(),
                variant: None,
                version: 1,
            };
            Record::prediction("m", 0, fields)
        };
        let first = typed(&["b", "a"], &[2.0, 1.0]);
        let other = typed(&["c", "a", "b"], &[30.0, 10.0, 20.0]);
        // The same length as `first`'s list, in the other order.
        let sorted = typed(&["a", "b"], &[100.0, 200.0]);
        let batch = to_batch(&[&first, &first, &other, &other, &sorted, &first]).unwrap();
        let column = |name: &str| -> Vec<Option<f64>> {
            let array = batch.column_by_name(name).unwrap();
            array.as_primitive::<Float64Type>().iter().collect()
        };
        let (a, b) = (Some(1.0), Some(2.0));
        let (other_a, other_b) = (Some(10.0), Some(20.0));
        assert_eq!(column("a"), [a, a, other_a, other_a, Some(100.0), a]);
        assert_eq!(column("b"), [b, b, other_b, other_b, Some(200.0), b]);
        assert_eq!(
            column("c"),
            [None, None, Some(30.0), Some(30.0), None, None]
        );
        let names: Vec<String> = columns(&other)
            .into_iter()
            .map(|(n, _)| n.into_owned())
            .collect();
        let features: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| ["a", "b", "c"].contains(n))
            .collect();
        assert_eq!(features, ["a", "b", "c"], "features in name order");
    }

    #[test]
    fn a_typed_inference_writes_the_columns_of_its_json() {
        let record = Record::inference("gbr", 1_767_225_600_000, crate::tests::inference_fields());
        let line = serde_json::to_string(&record).unwrap();
        let replayed: Record = serde_json::from_str(&line).unwrap();
        let (typed, json) = (
            to_batch(&[&record]).unwrap(),
            to_batch(&[&replayed]).unwrap(),
        );
        assert_eq!(typed.schema(), json.schema(), "one file takes both");
        let both = to_batch(&[&record, &replayed]).unwrap();
        assert_eq!(both.schema(), typed.schema());
        let inputs = both.column_by_name("inputs").unwrap().as_string::<i32>();
        let parsed: Vec<Value> = inputs
            .iter()
            .map(|t| serde_json::from_str(t.unwrap()).unwrap())
            .collect();
        assert_eq!(parsed[0], parsed[1]);
        assert_eq!(parsed[0]["X"]["data"], json!([0.26150993, 8.5]));
        assert_eq!(
            typed
                .schema()
                .field_with_name("request_id")
                .unwrap()
                .data_type(),
            &DataType::Utf8
        );
        assert_eq!(
            folder_of(&record),
            PathBuf::from("inferences/model=gbr/date=2026-01-01/hour=00")
        );
    }

    #[test]
    fn an_opened_key_never_hides_a_field_or_another_key() {
        let Value::Object(fields) = json!({
            "model": "fraud",
            "entities": {"user_id": "u1", "amount": "entity"},
            "features": {"model": 1.0, "amount": 2.0, "hour": 3, "timestamp": 4.0},
        }) else {
            unreachable!()
        };
        let record = Record::prediction("fraud", 0, fields);
        let columns: BTreeMap<String, &Value> = columns(&record)
            .into_iter()
            .map(|(name, cell)| match cell {
                Cell::Json(value) => (name.into_owned(), value),
                typed => panic!("a JSON record gives JSON cells: {typed:?}"),
            })
            .collect();
        assert_eq!(columns.len(), 7, "{columns:?}");
        assert_eq!(columns["model"], "fraud");
        assert_eq!(columns["features.model"], 1.0);
        assert_eq!(columns["features.timestamp"], 4.0);
        assert!(
            !columns.contains_key("timestamp"),
            "the record's time has its own column"
        );
        let amounts: Vec<&Value> = columns
            .iter()
            .filter(|(name, _)| name.ends_with("amount"))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(amounts.len(), 2, "both amounts kept: {columns:?}");
        assert!(amounts.contains(&&json!("entity")) && amounts.contains(&&json!(2.0)));
    }
}
