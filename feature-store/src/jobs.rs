//! The batch jobs over the offline store: materialisation (offline history -> online store,
//! incrementally from a watermark) and training sets (entity rows + point-in-time feature
//! values, written as Parquet). Both take missing values the way serving does: a training row
//! gets the feature's default where serving would have served the default.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::FeatureStoreError;
use crate::definitions::{Definitions, Feature, FeatureView};
use crate::offline::{self, HistoryRow, StorePath};
use crate::online::{OnlineRow, OnlineStore, entity_key};
use crate::value::{DType, FeatureValue};

/// Rows written to the online store per call.
const WRITE_CHUNK: usize = 500;

/// What one materialisation of one view did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MaterializeReport {
    pub view: String,
    /// Exclusive start (the previous watermark), if any.
    pub start_ms: Option<i64>,
    /// Inclusive end, now the view's watermark.
    pub end_ms: i64,
    pub history_rows: usize,
    pub entities_written: usize,
}

/// Copies the latest value per entity with `start < event time <= end` into the online store
/// and moves the view's watermark to `end`. `start` defaults to the stored watermark, so runs
/// are incremental; `progress` hears (done, total) entities.
pub async fn materialize(
    view: &FeatureView,
    source: &StorePath,
    online: &dyn OnlineStore,
    start_ms: Option<i64>,
    end_ms: i64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<MaterializeReport, FeatureStoreError> {
    let start_ms = match start_ms {
        Some(start) => Some(start),
        None => online.watermark(&view.name).await?,
    };
    let history = offline::read_history(view, source).await?;
    let latest = offline::latest_per_entity(&history, start_ms, end_ms);
    let total = latest.len() as u64;
    progress(0, total);
    for (chunk_index, chunk) in latest.chunks(WRITE_CHUNK).enumerate() {
        let rows: Vec<OnlineRow> = chunk
            .iter()
            .map(|row| OnlineRow {
                entity_key: row.entity_key.clone(),
                values: row.values.clone(),
                event_time_ms: row.event_time_ms,
            })
            .collect();
        online.write(view, &rows).await?;
        progress(
            ((chunk_index * WRITE_CHUNK + chunk.len()) as u64).min(total),
            total,
        );
    }
    online.set_watermark(&view.name, end_ms).await?;
    Ok(MaterializeReport {
        view: view.name.clone(),
        start_ms,
        end_ms,
        history_rows: history.len(),
        entities_written: latest.len(),
    })
}

/// Features asked for a training set: `view:feature`, or `view` for all of its features.
pub fn parse_feature_refs<'a>(
    definitions: &'a Definitions,
    refs: &[String],
) -> Result<Vec<(&'a FeatureView, &'a Feature)>, FeatureStoreError> {
    let mut chosen = Vec::new();
    let mut names = BTreeSet::new();
    for reference in refs
        .iter()
        .flat_map(|r| r.split(','))
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        let (view_name, feature_name) = match reference.split_once(':') {
            Some((v, f)) => (v, Some(f)),
            None => (reference, None),
        };
        let view = definitions.view(view_name)?;
        let features: Vec<&Feature> = match feature_name {
            Some(name) => vec![view.feature(name).map(|(_, f)| f).ok_or_else(|| {
                FeatureStoreError::Offline(format!(
                    "feature view '{view_name}' has no feature '{name}' (features: {})",
                    view.features
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?],
            None => view.features.iter().collect(),
        };
        for feature in features {
            if !names.insert(feature.name.clone()) {
                return Err(FeatureStoreError::Offline(format!(
                    "feature '{}' is asked for twice (or exists in two views); name one view per feature",
                    feature.name
                )));
            }
            chosen.push((view, feature));
        }
    }
    if chosen.is_empty() {
        return Err(FeatureStoreError::Offline("no features asked for".into()));
    }
    Ok(chosen)
}

/// The entity rows with one column per asked feature: the value valid at each row's event time
/// (see [`offline::point_in_time`]), else the feature's default.
pub async fn training_set(
    entities: &RecordBatch,
    timestamp_column: &str,
    features: &[(&FeatureView, &Feature)],
    source_of: impl Fn(&FeatureView) -> Result<StorePath, FeatureStoreError>,
) -> Result<RecordBatch, FeatureStoreError> {
    let times = offline::timestamps_ms(
        entities.column_by_name(timestamp_column).ok_or_else(|| {
            FeatureStoreError::Offline(format!(
                "the entity rows have no '{timestamp_column}' column (set --timestamp-column)"
            ))
        })?,
        timestamp_column,
    )?;
    let mut fields: Vec<Arc<Field>> = entities.schema().fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = entities.columns().to_vec();
    let mut views: Vec<&FeatureView> = features.iter().map(|(v, _)| *v).collect();
    let mut seen = BTreeSet::new();
    views.retain(|v| seen.insert(v.name.clone()));
    for view in views {
        let keys = entity_keys(entities, view)?;
        let history: Vec<HistoryRow> = offline::read_history(view, &source_of(view)?).await?;
        let queries: Vec<(&str, i64)> = keys
            .iter()
            .zip(&times)
            .map(|(key, time)| {
                (
                    key.as_deref().unwrap_or("\u{0}missing"),
                    time.unwrap_or(i64::MIN),
                )
            })
            .collect();
        let found = offline::point_in_time(&history, &queries, view.ttl.as_millis() as i64);
        for (_, feature) in features.iter().filter(|(v, _)| v.name == view.name) {
            let (position, _) = view
                .feature(&feature.name)
                .expect("asked features come from the view");
            let values = found.iter().map(|hit| {
                hit.and_then(|i| history[i].values[position].clone())
                    .unwrap_or_else(|| feature.default.clone())
            });
            fields.push(Arc::new(Field::new(
                &feature.name,
                arrow_type(feature.dtype),
                false,
            )));
            columns.push(build_column(feature.dtype, values));
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| FeatureStoreError::Offline(e.to_string()))
}

fn entity_keys(
    entities: &RecordBatch,
    view: &FeatureView,
) -> Result<Vec<Option<String>>, FeatureStoreError> {
    let columns = view
        .join_keys
        .iter()
        .map(|key| {
            let column = entities.column_by_name(key).ok_or_else(|| {
                FeatureStoreError::Offline(format!(
                    "the entity rows have no '{key}' column, which feature view '{}' joins on",
                    view.name
                ))
            })?;
            offline::key_strings(column, key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..entities.num_rows())
        .map(|row| {
            columns
                .iter()
                .map(|c| c[row].as_deref())
                .collect::<Option<Vec<&str>>>()
                .map(|parts| entity_key(&parts))
        })
        .collect())
}

fn arrow_type(dtype: DType) -> DataType {
    match dtype {
        DType::Int64 => DataType::Int64,
        DType::Float32 => DataType::Float32,
        DType::Float64 => DataType::Float64,
        DType::Bool => DataType::Boolean,
        DType::String => DataType::Utf8,
        DType::Int64List => DataType::new_list(DataType::Int64, true),
        DType::Float32List => DataType::new_list(DataType::Float32, true),
        DType::StringList => DataType::new_list(DataType::Utf8, true),
    }
}

fn build_column(dtype: DType, values: impl Iterator<Item = FeatureValue>) -> ArrayRef {
    match dtype {
        DType::Int64 => {
            let mut b = Int64Builder::new();
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Int(x) = v {
                    Some(x)
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::Float32 => {
            let mut b = Float32Builder::new();
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Float(x) = v {
                    Some(x as f32)
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::Float64 => {
            let mut b = Float64Builder::new();
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Float(x) = v {
                    Some(x)
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::Bool => {
            let mut b = BooleanBuilder::new();
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Bool(x) = v {
                    Some(x)
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::String => {
            let mut b = StringBuilder::new();
            values.for_each(|v| {
                b.append_option(if let FeatureValue::String(x) = v {
                    Some(x)
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::Int64List => {
            let mut b = ListBuilder::new(Int64Builder::new());
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Ints(x) = v {
                    Some(x.into_iter().map(Some))
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::Float32List => {
            let mut b = ListBuilder::new(Float32Builder::new());
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Floats(x) = v {
                    Some(x.into_iter().map(Some))
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
        DType::StringList => {
            let mut b = ListBuilder::new(StringBuilder::new());
            values.for_each(|v| {
                b.append_option(if let FeatureValue::Strings(x) = v {
                    Some(x.into_iter().map(Some))
                } else {
                    None
                })
            });
            Arc::new(b.finish())
        }
    }
}

/// A record batch as a Parquet file's bytes.
pub fn to_parquet(batch: &RecordBatch) -> Result<Vec<u8>, FeatureStoreError> {
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None)
        .map_err(|e| FeatureStoreError::Offline(e.to_string()))?;
    writer
        .write(batch)
        .and_then(|_| writer.close().map(|_| ()))
        .map_err(|e| FeatureStoreError::Offline(e.to_string()))?;
    Ok(bytes)
}
