//! Writes a world to the offline store: one Parquet file per table with event times as
//! timestamps, the feature views' histories and their definitions (`features.toml`), the labels
//! kept apart from what models see (`labels/`), and `manifest.json` saying what was generated
//! from what. Any location the registry opens works (a folder, `s3://`, `gs://`).

use std::sync::Arc;

use arrow_array::builder::{Float32Builder, ListBuilder, StringBuilder};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt32Array,
};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::World;
use super::catalog::{CITIES, GENRES};
use super::features::{self, Column, History};
use crate::TrainingError;

/// What `manifest.json` records about a generated world.
#[derive(Debug, Serialize)]
pub struct DataManifest {
    pub generator: &'static str,
    pub scale: super::Scale,
    pub seed: u64,
    pub start: String,
    pub days: usize,
    /// Rows per table, by file.
    pub rows: Vec<(String, usize)>,
}

/// Writes `world` under `location`; returns what it wrote.
pub async fn write(
    world: &World,
    location: &str,
    options: &[(String, String)],
    progress: &mut dyn FnMut(&str),
) -> Result<DataManifest, TrainingError> {
    let opened = marquee_registry::location::open(location, true, options)
        .map_err(|e| TrainingError::Output(format!("{location}: {e}")))?;
    let out = Output {
        store: opened.store,
        root: opened.root,
    };
    let mut rows = Vec::new();
    let tables: [(&str, Table); 10] = [
        ("users.parquet", users),
        ("devices.parquet", devices),
        ("movies.parquet", movies),
        ("theaters.parquet", theaters),
        ("shows.parquet", shows),
        ("bookings.parquet", bookings),
        ("payments.parquet", payments),
        ("labels/fraud.parquet", fraud_labels),
        ("labels/search_queries.parquet", search_queries),
        ("labels/show_demand_truth.parquet", demand_truth),
    ];
    for (name, table) in tables {
        progress(name);
        let batch = table(world)?;
        rows.push((name.to_string(), batch.num_rows()));
        out.put(name, parquet(&batch)?).await?;
    }
    for history in features::histories(world) {
        let name = format!("features/{}.parquet", history.view);
        progress(&name);
        let batch = history_batch(history)?;
        rows.push((name.clone(), batch.num_rows()));
        out.put(&name, parquet(&batch)?).await?;
    }
    out.put("features.toml", features::DEFINITIONS.as_bytes().to_vec())
        .await?;
    let manifest = DataManifest {
        generator: concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
        scale: world.scale,
        seed: world.seed,
        start: "2026-01-05T00:00:00Z".into(),
        days: world.scale.size().days,
        rows,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| TrainingError::Output(format!("manifest.json: {e}")))?;
    out.put("manifest.json", json).await?;
    Ok(manifest)
}

/// Builds one table of a world.
type Table = fn(&World) -> Result<RecordBatch, TrainingError>;

struct Output {
    store: Arc<dyn ObjectStore>,
    root: Path,
}

impl Output {
    async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), TrainingError> {
        let mut path = self.root.clone();
        for part in name.split('/') {
            path = path.clone().join(part);
        }
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| TrainingError::Output(format!("{path}: {e}")))
    }
}

/// One record batch as a Parquet file (Snappy).
pub(crate) fn parquet(batch: &RecordBatch) -> Result<Vec<u8>, TrainingError> {
    let failed = |e: parquet::errors::ParquetError| TrainingError::Output(e.to_string());
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties)).map_err(failed)?;
    writer.write(batch).map_err(failed)?;
    writer.close().map_err(failed)?;
    Ok(bytes)
}

fn batch(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch, TrainingError> {
    RecordBatch::try_from_iter(columns).map_err(|e| TrainingError::Output(e.to_string()))
}

fn text<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn float(values: impl Iterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(values))
}

fn int(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(values))
}

fn time(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(values).with_timezone("UTC"))
}

fn users(world: &World) -> Result<RecordBatch, TrainingError> {
    let u = &world.users;
    batch(vec![
        ("user_id", text(u.iter().map(|u| u.id.as_str()))),
        ("city", text(u.iter().map(|u| CITIES[u.city].name))),
        ("home_lat", float(u.iter().map(|u| u.home_lat))),
        ("home_lon", float(u.iter().map(|u| u.home_lon))),
        ("signed_up_at", time(u.iter().map(|u| u.signup_ms))),
    ])
}

fn devices(world: &World) -> Result<RecordBatch, TrainingError> {
    let pairs: Vec<(&str, &str)> = world
        .users
        .iter()
        .flat_map(|u| u.devices.iter().map(move |d| (d.as_str(), u.id.as_str())))
        .collect();
    batch(vec![
        ("device_id", text(pairs.iter().map(|p| p.0))),
        ("user_id", text(pairs.iter().map(|p| p.1))),
    ])
}

fn movies(world: &World) -> Result<RecordBatch, TrainingError> {
    let m = &world.movies;
    let mut genres = ListBuilder::new(StringBuilder::new());
    for movie in m {
        for &g in &movie.genres {
            genres.values().append_value(GENRES[g]);
        }
        genres.append(true);
    }
    batch(vec![
        ("movie_id", text(m.iter().map(|m| m.id.as_str()))),
        ("title", text(m.iter().map(|m| m.title.as_str()))),
        (
            "description",
            text(m.iter().map(|m| m.description.as_str())),
        ),
        ("genres", Arc::new(genres.finish())),
        ("primary_genre", text(m.iter().map(|m| GENRES[m.genres[0]]))),
        ("released_at", time(m.iter().map(|m| m.release_ms))),
        (
            "runtime_minutes",
            Arc::new(UInt32Array::from_iter_values(
                m.iter().map(|m| m.runtime_minutes),
            )),
        ),
    ])
}

fn theaters(world: &World) -> Result<RecordBatch, TrainingError> {
    let t = &world.theaters;
    batch(vec![
        ("theater_id", text(t.iter().map(|t| t.id.as_str()))),
        ("name", text(t.iter().map(|t| t.name.as_str()))),
        ("city", text(t.iter().map(|t| CITIES[t.city].name))),
        ("lat", float(t.iter().map(|t| t.lat))),
        ("lon", float(t.iter().map(|t| t.lon))),
        ("screens", int(t.iter().map(|t| t.screens.len() as i64))),
        (
            "seats",
            int(t.iter().map(|t| t.screens.iter().sum::<u32>() as i64)),
        ),
        ("list_price", float(t.iter().map(|t| t.list_price))),
    ])
}

fn shows(world: &World) -> Result<RecordBatch, TrainingError> {
    let s = &world.shows;
    batch(vec![
        ("show_id", text(s.iter().map(|s| s.id.as_str()))),
        (
            "movie_id",
            text(s.iter().map(|s| world.movies[s.movie].id.as_str())),
        ),
        (
            "theater_id",
            text(s.iter().map(|s| world.theaters[s.theater].id.as_str())),
        ),
        ("screen", int(s.iter().map(|s| s.screen as i64))),
        ("capacity", int(s.iter().map(|s| s.capacity as i64))),
        ("starts_at", time(s.iter().map(|s| s.starts_ms))),
        ("base_price", float(s.iter().map(|s| s.base_price))),
        ("price_multiplier", float(s.iter().map(|s| s.multiplier))),
        ("seats_sold", int(s.iter().map(|s| s.seats_sold as i64))),
    ])
}

fn bookings(world: &World) -> Result<RecordBatch, TrainingError> {
    let b = &world.bookings;
    let show = |i: usize| &world.shows[b[i].show];
    batch(vec![
        ("booking_id", text(b.iter().map(|b| b.id.as_str()))),
        (
            "user_id",
            text(b.iter().map(|b| world.users[b.user].id.as_str())),
        ),
        (
            "show_id",
            text(b.iter().map(|b| world.shows[b.show].id.as_str())),
        ),
        (
            "movie_id",
            text((0..b.len()).map(|i| world.movies[show(i).movie].id.as_str())),
        ),
        (
            "theater_id",
            text((0..b.len()).map(|i| world.theaters[show(i).theater].id.as_str())),
        ),
        ("seats", int(b.iter().map(|b| b.seats as i64))),
        ("unit_price", float(b.iter().map(|b| b.unit_price))),
        (
            "amount",
            float(b.iter().map(|b| b.unit_price * b.seats as f64)),
        ),
        ("booked_at", time(b.iter().map(|b| b.booked_ms))),
        ("device_id", text(b.iter().map(|b| b.device.as_str()))),
        ("lat", float(b.iter().map(|b| b.lat))),
        ("lon", float(b.iter().map(|b| b.lon))),
        (
            "distance_from_home_km",
            float(b.iter().map(|b| {
                let user = &world.users[b.user];
                super::distance_km(user.home_lat, user.home_lon, b.lat, b.lon)
            })),
        ),
    ])
}

fn payments(world: &World) -> Result<RecordBatch, TrainingError> {
    let p = &world.payments;
    batch(vec![
        ("payment_id", text(p.iter().map(|p| p.id.as_str()))),
        (
            "booking_id",
            text(p.iter().map(|p| world.bookings[p.booking].id.as_str())),
        ),
        (
            "user_id",
            text(
                p.iter()
                    .map(|p| world.users[world.bookings[p.booking].user].id.as_str()),
            ),
        ),
        ("card_id", text(p.iter().map(|p| p.card.as_str()))),
        ("amount", float(p.iter().map(|p| p.amount))),
        ("status", text(p.iter().map(|p| p.status.name()))),
        ("attempted_at", time(p.iter().map(|p| p.at_ms))),
    ])
}

fn fraud_labels(world: &World) -> Result<RecordBatch, TrainingError> {
    batch(vec![
        (
            "booking_id",
            text(world.bookings.iter().map(|b| b.id.as_str())),
        ),
        (
            "is_fraud",
            Arc::new(BooleanArray::from_iter(
                world.fraud.iter().map(|f| Some(f.is_some())),
            )),
        ),
        (
            "pattern",
            Arc::new(StringArray::from_iter(
                world.fraud.iter().map(|f| f.map(|p| p.name())),
            )),
        ),
    ])
}

fn search_queries(world: &World) -> Result<RecordBatch, TrainingError> {
    let q = &world.queries;
    batch(vec![
        ("query", text(q.iter().map(|q| q.query.as_str()))),
        (
            "movie_id",
            text(q.iter().map(|q| world.movies[q.movie].id.as_str())),
        ),
    ])
}

/// What each show's demand depended on: with `market::expected_occupancy`, the occupancy the
/// show would have reached at any price.
fn demand_truth(world: &World) -> Result<RecordBatch, TrainingError> {
    let s = &world.shows;
    batch(vec![
        ("show_id", text(s.iter().map(|s| s.id.as_str()))),
        ("popularity", float(s.iter().map(|s| s.demand.popularity))),
        ("weekday", int(s.iter().map(|s| s.demand.weekday as i64))),
        ("hour", float(s.iter().map(|s| s.demand.hour))),
    ])
}

fn history_batch(history: History) -> Result<RecordBatch, TrainingError> {
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        (
            history.key_column,
            text(history.keys.iter().map(String::as_str)),
        ),
        ("event_time", time(history.times_ms.into_iter())),
    ];
    for (name, column) in history.columns {
        let array: ArrayRef = match column {
            Column::Int64(values) => Arc::new(Int64Array::from(values)),
            Column::Float64(values) => Arc::new(Float64Array::from(values)),
            Column::Float32(values) => Arc::new(Float32Array::from(values)),
            Column::StringLists(lists) => {
                let mut builder = ListBuilder::new(StringBuilder::new());
                for list in lists {
                    builder.append_value(list.into_iter().map(Some));
                }
                Arc::new(builder.finish())
            }
            Column::Float32Lists(lists) => {
                let mut builder = ListBuilder::new(Float32Builder::new());
                for list in lists {
                    builder.append_value(list.into_iter().map(Some));
                }
                Arc::new(builder.finish())
            }
        };
        columns.push((name, array));
    }
    batch(columns)
}
