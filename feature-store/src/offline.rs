//! The offline store: each view's history as Parquet on an object store (a file, or a folder of
//! `.parquet` files), and the point-in-time join that builds training sets from it. The join uses
//! the online store's validity rule (a value counts from its event time until `ttl` after it), so
//! a model is trained on exactly what serving would have looked up at that moment: never a value
//! from the future, never one serving would have considered expired.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::FeatureStoreError;
use crate::definitions::FeatureView;
use crate::online::entity_key;
use crate::value::{DType, FeatureValue};

/// One row of a view's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub entity_key: String,
    pub event_time_ms: i64,
    /// One value per feature of the view, in the view's order (`None` for a null).
    pub values: Vec<Option<FeatureValue>>,
}

/// An object store and a path in it: a file, or a folder whose `.parquet` files are read.
pub struct StorePath {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
}

impl StorePath {
    /// Opens `location` (a local path, `file://`, `s3://bucket/key`, `gs://bucket/key`); a
    /// relative local path is taken from `base` (the definitions file's folder).
    pub fn open(
        location: &str,
        base: &std::path::Path,
        options: &[(String, String)],
    ) -> Result<Self, FeatureStoreError> {
        let bad = |e: String| FeatureStoreError::Offline(format!("{location}: {e}"));
        if location.contains("://") && !location.starts_with("file://") {
            let opened = marquee_registry::location::open(location, false, options)
                .map_err(|e| bad(e.to_string()))?;
            return Ok(Self {
                store: opened.store,
                path: opened.root,
            });
        }
        let local = std::path::Path::new(location.strip_prefix("file://").unwrap_or(location));
        let local = if local.is_absolute() {
            local.to_path_buf()
        } else {
            base.join(local)
        };
        let (dir, name) = if local.is_dir() {
            (local.as_path(), None)
        } else {
            let dir = local.parent().ok_or_else(|| bad("has no folder".into()))?;
            // A bare file name lives in the current folder.
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            (dir, local.file_name().and_then(|n| n.to_str()))
        };
        let dir = dir.to_str().ok_or_else(|| bad("is not UTF-8".into()))?;
        let opened = marquee_registry::location::open(dir, false, options)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            store: opened.store,
            path: match name {
                Some(name) => opened.root.clone().join(name),
                None => opened.root,
            },
        })
    }

    /// The Parquet files at this path: itself, or every `.parquet` object under it, in order.
    async fn parquet_files(&self) -> Result<Vec<Path>, FeatureStoreError> {
        if self.path.extension() == Some("parquet") {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<Path> = self
            .store
            .list(Some(&self.path))
            .map_ok(|meta| meta.location)
            .try_filter(|p| std::future::ready(p.extension() == Some("parquet")))
            .try_collect()
            .await
            .map_err(|e| FeatureStoreError::Offline(format!("{}: {e}", self.path)))?;
        files.sort();
        Ok(files)
    }

    async fn read(&self, path: &Path) -> Result<Bytes, FeatureStoreError> {
        let result = self
            .store
            .get(path)
            .await
            .map_err(|e| FeatureStoreError::Offline(format!("{path}: {e}")))?;
        result
            .bytes()
            .await
            .map_err(|e| FeatureStoreError::Offline(format!("{path}: {e}")))
    }

    /// Every record batch of the Parquet file(s), with only `columns` read (all with `None`).
    pub async fn batches(
        &self,
        columns: Option<&[&str]>,
    ) -> Result<Vec<RecordBatch>, FeatureStoreError> {
        let files = self.parquet_files().await?;
        if files.is_empty() {
            return Err(FeatureStoreError::Offline(format!(
                "{}: no .parquet file there",
                self.path
            )));
        }
        let mut batches = Vec::new();
        for file in files {
            let bytes = self.read(&file).await?;
            let bad = |e: String| FeatureStoreError::Offline(format!("{file}: {e}"));
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(e.to_string()))?;
            let schema = builder.schema().clone();
            let mut indices = Vec::new();
            for column in columns.unwrap_or_default() {
                let index = schema.index_of(column).map_err(|_| {
                    bad(format!(
                        "has no column '{column}' (columns: {})",
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                indices.push(index);
            }
            let builder = match columns {
                Some(_) => {
                    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
                    builder.with_projection(mask)
                }
                None => builder,
            };
            let reader = builder.build().map_err(|e| bad(e.to_string()))?;
            for batch in reader {
                batches.push(batch.map_err(|e| bad(e.to_string()))?);
            }
        }
        Ok(batches)
    }
}

/// A view's whole history from its offline source.
pub async fn read_history(
    view: &FeatureView,
    source: &StorePath,
) -> Result<Vec<HistoryRow>, FeatureStoreError> {
    let timestamp_column = &view
        .source
        .as_ref()
        .ok_or_else(|| {
            FeatureStoreError::Offline(format!(
                "feature view '{}' has no offline source",
                view.name
            ))
        })?
        .timestamp_column;
    let mut columns: Vec<&str> = view.join_keys.iter().map(String::as_str).collect();
    columns.push(timestamp_column);
    // Streaming aggregates come from events, not from the offline source.
    columns.extend(
        view.features
            .iter()
            .filter(|f| f.aggregate.is_none())
            .map(|f| f.name.as_str()),
    );
    let mut rows = Vec::new();
    for batch in source.batches(Some(&columns)).await? {
        let keys = view
            .join_keys
            .iter()
            .map(|k| key_strings(column(&batch, k)?, k))
            .collect::<Result<Vec<_>, _>>()?;
        let times = timestamps_ms(column(&batch, timestamp_column)?, timestamp_column)?;
        let values = view
            .features
            .iter()
            .map(|f| match f.aggregate {
                Some(_) => Ok(vec![None; batch.num_rows()]),
                None => feature_values(column(&batch, &f.name)?, f.dtype, &f.name),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let (Some(time), Some(key)) = (
                times[row],
                keys.iter()
                    .map(|k| k[row].as_deref())
                    .collect::<Option<Vec<&str>>>(),
            ) else {
                continue;
            };
            rows.push(HistoryRow {
                entity_key: entity_key(&key),
                event_time_ms: time,
                values: values.iter().map(|v| v[row].clone()).collect(),
            });
        }
    }
    Ok(rows)
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, FeatureStoreError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| FeatureStoreError::Offline(format!("no column '{name}'")))
}

/// Entity ids as text, whether the column holds strings or integers; `None` for a null.
pub fn key_strings(array: &ArrayRef, name: &str) -> Result<Vec<Option<String>>, FeatureStoreError> {
    let strings = match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => array.clone(),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => arrow_cast::cast(array, &DataType::Utf8)
            .map_err(|e| FeatureStoreError::Offline(format!("column '{name}': {e}")))?,
        other => {
            return Err(FeatureStoreError::Offline(format!(
                "column '{name}' holds {other}; an entity id must be a string or an integer"
            )));
        }
    };
    let strings = arrow_cast::cast(&strings, &DataType::Utf8)
        .map_err(|e| FeatureStoreError::Offline(format!("column '{name}': {e}")))?;
    let strings = strings.as_string::<i32>();
    Ok((0..strings.len())
        .map(|i| strings.is_valid(i).then(|| strings.value(i).to_string()))
        .collect())
}

/// Event times in ms since the epoch: from a timestamp column of any unit, or an integer
/// column of milliseconds, or RFC 3339 text; `None` for a null.
pub fn timestamps_ms(array: &ArrayRef, name: &str) -> Result<Vec<Option<i64>>, FeatureStoreError> {
    let bad = |e: String| FeatureStoreError::Offline(format!("timestamp column '{name}': {e}"));
    match array.data_type() {
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            let ms = arrow_cast::cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None))
                .map_err(|e| bad(e.to_string()))?;
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            Ok(ms.iter().collect())
        }
        DataType::Int64 | DataType::Int32 => {
            let ms = arrow_cast::cast(array, &DataType::Int64).map_err(|e| bad(e.to_string()))?;
            Ok(ms.as_primitive::<Int64Type>().iter().collect())
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = arrow_cast::cast(array, &DataType::Utf8).map_err(|e| bad(e.to_string()))?;
            text.as_string::<i32>()
                .iter()
                .map(|t| t.map(|t| parse_time_ms(t).map_err(bad)).transpose())
                .collect()
        }
        other => Err(bad(format!(
            "holds {other}; use a timestamp, milliseconds since the epoch, or RFC 3339 text"
        ))),
    }
}

/// RFC 3339 (`2026-11-23T18:00:00Z`) or milliseconds since the epoch.
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.trim().parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("'{text}' is not a time ({e}); use RFC 3339 or milliseconds"))?;
    Ok(time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("'{text}' is before 1970"))?
        .as_millis() as i64)
}

/// One feature column as values of the declared type; a column whose type cannot hold the
/// feature's dtype is refused with both types named.
fn feature_values(
    array: &ArrayRef,
    dtype: DType,
    name: &str,
) -> Result<Vec<Option<FeatureValue>>, FeatureStoreError> {
    let source = array.data_type();
    let compatible = match dtype {
        DType::Int64 => source.is_integer(),
        DType::Float32 | DType::Float64 => source.is_integer() || source.is_floating(),
        DType::Bool => *source == DataType::Boolean,
        DType::String => is_text(source),
        DType::Int64List => list_item(source).is_some_and(DataType::is_integer),
        DType::Float32List => {
            list_item(source).is_some_and(|item| item.is_integer() || item.is_floating())
        }
        DType::StringList => list_item(source).is_some_and(is_text),
    };
    if !compatible {
        return Err(FeatureStoreError::Offline(format!(
            "column '{name}' holds {source}, which cannot be the {} feature '{name}'",
            dtype.name()
        )));
    }
    let cast = |to: &DataType| {
        arrow_cast::cast(array, to)
            .map_err(|e| FeatureStoreError::Offline(format!("column '{name}': {e}")))
    };
    let list_of = |item: DataType| DataType::new_list(item, true);
    Ok(match dtype {
        DType::Int64 => cast(&DataType::Int64)?
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map(FeatureValue::Int))
            .collect(),
        DType::Float32 => cast(&DataType::Float64)?
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(|v| FeatureValue::Float(v as f32 as f64)))
            .collect(),
        DType::Float64 => cast(&DataType::Float64)?
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(FeatureValue::Float))
            .collect(),
        DType::Bool => array
            .as_boolean()
            .iter()
            .map(|v| v.map(FeatureValue::Bool))
            .collect(),
        DType::String => cast(&DataType::Utf8)?
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(|v| FeatureValue::String(v.to_string())))
            .collect(),
        // A null inside a list has no value to stand for: the list is refused, not shortened.
        DType::Int64List => lists(&cast(&list_of(DataType::Int64))?, name, |items| {
            items
                .as_primitive::<Int64Type>()
                .iter()
                .collect::<Option<Vec<_>>>()
                .map(FeatureValue::Ints)
        })?,
        DType::Float32List => lists(&cast(&list_of(DataType::Float32))?, name, |items| {
            items
                .as_primitive::<Float32Type>()
                .iter()
                .collect::<Option<Vec<_>>>()
                .map(FeatureValue::Floats)
        })?,
        DType::StringList => lists(&cast(&list_of(DataType::Utf8))?, name, |items| {
            items
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(FeatureValue::Strings)
        })?,
    })
}

fn is_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// The item type of a list column of any layout.
fn list_item(data_type: &DataType) -> Option<&DataType> {
    match data_type {
        DataType::List(field)
        | DataType::LargeList(field)
        | DataType::ListView(field)
        | DataType::FixedSizeList(field, _) => Some(field.data_type()),
        _ => None,
    }
}

/// Each row of a list column (cast to `List`) read by `read`; a list holding a null is refused.
fn lists(
    array: &ArrayRef,
    name: &str,
    read: impl Fn(&ArrayRef) -> Option<FeatureValue>,
) -> Result<Vec<Option<FeatureValue>>, FeatureStoreError> {
    let lists = array.as_list::<i32>();
    (0..lists.len())
        .map(|row| {
            if lists.is_null(row) {
                return Ok(None);
            }
            read(&lists.value(row)).map(Some).ok_or_else(|| {
                FeatureStoreError::Offline(format!(
                    "column '{name}', row {row}: a list holds a null"
                ))
            })
        })
        .collect()
}

/// For each query (entity key, event time), the index in `history` of the row valid then: the
/// latest with `event_time <= query time` and `event_time > query time - ttl` (the online
/// store's expiry rule); among rows with the same event time, the one written last.
pub fn point_in_time(
    history: &[HistoryRow],
    queries: &[(&str, i64)],
    ttl_ms: i64,
) -> Vec<Option<usize>> {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, row) in history.iter().enumerate() {
        by_key
            .entry(row.entity_key.as_str())
            .or_default()
            .push(index);
    }
    for indices in by_key.values_mut() {
        indices.sort_by_key(|&i| (history[i].event_time_ms, i));
    }
    queries
        .iter()
        .map(|&(key, at)| {
            let indices = by_key.get(key)?;
            let until = indices.partition_point(|&i| history[i].event_time_ms <= at);
            let latest = indices[..until].last().copied()?;
            (history[latest].event_time_ms > at.saturating_sub(ttl_ms)).then_some(latest)
        })
        .collect()
}

/// The latest row per entity with `start < event_time <= end`: what materialisation writes.
pub fn latest_per_entity(
    history: &[HistoryRow],
    start_ms: Option<i64>,
    end_ms: i64,
) -> Vec<&HistoryRow> {
    let mut latest: HashMap<&str, (i64, usize)> = HashMap::new();
    for (index, row) in history.iter().enumerate() {
        if row.event_time_ms > end_ms || start_ms.is_some_and(|s| row.event_time_ms <= s) {
            continue;
        }
        let candidate = (row.event_time_ms, index);
        latest
            .entry(row.entity_key.as_str())
            .and_modify(|best| *best = (*best).max(candidate))
            .or_insert(candidate);
    }
    let mut rows: Vec<&HistoryRow> = latest.values().map(|&(_, i)| &history[i]).collect();
    rows.sort_by(|a, b| a.entity_key.cmp(&b.entity_key));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(key: &str, time: i64, value: i64) -> HistoryRow {
        HistoryRow {
            entity_key: key.into(),
            event_time_ms: time,
            values: vec![Some(FeatureValue::Int(value))],
        }
    }

    /// The definition, written as plainly as possible: scan everything.
    fn naive(history: &[HistoryRow], queries: &[(&str, i64)], ttl: i64) -> Vec<Option<usize>> {
        queries
            .iter()
            .map(|&(key, at)| {
                history
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.entity_key == key && r.event_time_ms <= at && r.event_time_ms > at - ttl
                    })
                    .max_by_key(|(i, r)| (r.event_time_ms, *i))
                    .map(|(i, _)| i)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn the_join_matches_the_naive_definition_and_never_leaks_the_future(
            history in prop::collection::vec((0..5u8, 0..100i64, any::<i64>()), 0..60),
            queries in prop::collection::vec((0..6u8, 0..120i64), 0..40),
            ttl in 1..50i64,
        ) {
            let history: Vec<HistoryRow> = history.iter().map(|&(k, t, v)| row(&k.to_string(), t, v)).collect();
            let keys: Vec<String> = queries.iter().map(|(k, _)| k.to_string()).collect();
            let queries: Vec<(&str, i64)> = keys.iter().zip(&queries).map(|(k, &(_, t))| (k.as_str(), t)).collect();
            let joined = point_in_time(&history, &queries, ttl);
            prop_assert_eq!(&joined, &naive(&history, &queries, ttl));
            for (found, (key, at)) in joined.iter().zip(&queries) {
                if let Some(i) = found {
                    prop_assert!(history[*i].event_time_ms <= *at, "a value from the future");
                    prop_assert_eq!(history[*i].entity_key.as_str(), *key);
                }
            }
        }
    }

    #[test]
    fn list_columns_of_any_layout_read_as_lists() {
        use arrow_array::builder::{
            FixedSizeListBuilder, Float64Builder, ListBuilder, StringBuilder,
        };
        let mut texts = ListBuilder::new(StringBuilder::new());
        texts.append_value([Some("m1"), Some("m2")]);
        texts.append_null();
        texts.append_value(Vec::<Option<&str>>::new());
        let texts: ArrayRef = Arc::new(texts.finish());
        assert_eq!(
            feature_values(&texts, DType::StringList, "booked").unwrap(),
            vec![
                Some(FeatureValue::Strings(vec!["m1".into(), "m2".into()])),
                None,
                Some(FeatureValue::Strings(Vec::new())),
            ]
        );
        // A fixed-size list of f64 (how a vector column is often written) is a float32 vector.
        let mut vectors = FixedSizeListBuilder::new(Float64Builder::new(), 2);
        vectors.values().append_slice(&[0.5, -1.25]);
        vectors.append(true);
        let vectors: ArrayRef = Arc::new(vectors.finish());
        assert_eq!(
            feature_values(&vectors, DType::Float32List, "taste").unwrap(),
            vec![Some(FeatureValue::Floats(vec![0.5, -1.25]))]
        );
        let mut holed = ListBuilder::new(StringBuilder::new());
        holed.append_value([Some("m1"), None]);
        let holed: ArrayRef = Arc::new(holed.finish());
        let refused = feature_values(&holed, DType::StringList, "booked").unwrap_err();
        assert!(
            refused.to_string().contains("row 0: a list holds a null"),
            "{refused}"
        );
        let refused = feature_values(&texts, DType::Float32List, "booked").unwrap_err();
        assert!(
            refused.to_string().contains("cannot be the list<float32>"),
            "{refused}"
        );
    }

    #[test]
    fn validity_matches_the_online_expiry() {
        let history = [row("u", 100, 1)];
        // Valid from its event time until ttl after it, exclusive, like the online store.
        assert_eq!(
            point_in_time(
                &history,
                &[("u", 99), ("u", 100), ("u", 109), ("u", 110)],
                10
            ),
            [None, Some(0), Some(0), None]
        );
    }

    #[test]
    fn materialisation_takes_the_latest_row_in_the_window() {
        let history = [
            row("a", 5, 1),
            row("a", 9, 2),
            row("a", 12, 3),
            row("b", 3, 4),
        ];
        let rows = latest_per_entity(&history, Some(3), 10);
        assert_eq!(
            rows,
            [&history[1]],
            "b's row is not after the watermark; a's 12 is after the end"
        );
        assert_eq!(
            parse_time_ms("2026-11-23T00:00:00Z").unwrap(),
            1_795_392_000_000
        );
        assert_eq!(parse_time_ms("1000").unwrap(), 1000);
    }
}
