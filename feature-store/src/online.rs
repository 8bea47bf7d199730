//! The online store: the latest feature values per entity, read on the request path. One trait,
//! two stores: Redis for production and an in-process map as the embedded default (and for
//! tests of code above it). Both expire a value `ttl` after its event time, as Feast does, and
//! both answer a whole request's lookups in one call, so Redis can serve them in one round trip.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::FeatureStoreError;
use crate::definitions::FeatureView;
use crate::memory::MemoryStore;
use crate::redis_store::{RedisConfig, RedisStore};
use crate::value::FeatureValue;

/// One entity's values for one view, as materialisation writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineRow {
    /// The entity key: the view's join-key values joined (see [`entity_key`]).
    pub entity_key: String,
    /// One value per feature of the view, in the view's order; `None` leaves a feature unset.
    pub values: Vec<Option<FeatureValue>>,
    /// When the values were true, in milliseconds since the Unix epoch.
    pub event_time_ms: i64,
}

/// What a lookup found for one entity: values in the view's feature order (`None` for a
/// feature the store has no value for) and their event time.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundRow {
    pub values: Vec<Option<FeatureValue>>,
    pub event_time_ms: i64,
}

/// One event counted by a streaming aggregate: the aggregate's position among its view's
/// features, the entity, and when the event happened.
#[derive(Debug, Clone, PartialEq)]
pub struct CountedEvent {
    pub feature: usize,
    pub entity_key: String,
    pub time_ms: i64,
}

/// One (view, entity) pair of a request. For a view with streaming aggregates the answer always
/// has a row: a count of zero is a value, not a missing one.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub view: &'a FeatureView,
    pub entity_key: &'a str,
}

#[async_trait]
pub trait OnlineStore: Send + Sync {
    /// Stores rows of one view; a row older than one already stored does not replace it, and
    /// a row already past its TTL is not stored.
    async fn write(&self, view: &FeatureView, rows: &[OnlineRow]) -> Result<(), FeatureStoreError>;

    /// Reads every lookup at once; `None` where the entity has no live row.
    async fn read(
        &self,
        lookups: &[Lookup<'_>],
    ) -> Result<Vec<Option<FoundRow>>, FeatureStoreError>;

    /// The event time up to which a view has been materialised into this store, so the next
    /// run starts there (kept in the store itself: it is a fact about what the store holds).
    async fn watermark(&self, view: &str) -> Result<Option<i64>, FeatureStoreError>;

    async fn set_watermark(&self, view: &str, event_time_ms: i64) -> Result<(), FeatureStoreError>;

    /// Counts events for the view's streaming aggregates; events older than their window are
    /// dropped.
    async fn record(
        &self,
        view: &FeatureView,
        events: &[CountedEvent],
    ) -> Result<(), FeatureStoreError>;
}

/// Puts a view's aggregate counts into a lookup's answer (`count` gives the count of the
/// aggregate at a feature position); a view with aggregates always answers.
pub(crate) fn with_counts(
    view: &FeatureView,
    row: Option<FoundRow>,
    mut count: impl FnMut(usize) -> i64,
) -> Option<FoundRow> {
    if view.aggregates().next().is_none() {
        return row;
    }
    let mut row = row.unwrap_or_else(|| FoundRow {
        values: vec![None; view.features.len()],
        event_time_ms: 0,
    });
    row.values.resize(view.features.len(), None);
    for (position, _) in view.aggregates() {
        row.values[position] = Some(FeatureValue::Int(count(position)));
    }
    Some(row)
}

/// The online store a location names: `memory` (in process) or `redis://host:port/db`, with
/// `timeout_ms` as Redis's per-call limit.
pub fn open_online(
    location: &str,
    timeout_ms: u64,
) -> Result<Arc<dyn OnlineStore>, FeatureStoreError> {
    if location == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if location.starts_with("redis://") || location.starts_with("rediss://") {
        let config = RedisConfig {
            timeout_ms,
            ..RedisConfig::new(location)
        };
        return Ok(Arc::new(RedisStore::new(&config)?));
    }
    Err(FeatureStoreError::Definitions(format!(
        "online store '{location}': use memory or redis://host:port/db"
    )))
}

/// The key of an entity from its join-key values, in the view's join-key order.
pub fn entity_key<S: AsRef<str>>(values: &[S]) -> String {
    let mut key = String::new();
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            // A separator that cannot appear in ids people use, so keys never collide.
            key.push('\u{1f}');
        }
        key.push_str(value.as_ref());
    }
    key
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// When a row with this event time stops being served.
pub(crate) fn expires_at_ms(view: &FeatureView, event_time_ms: i64) -> i64 {
    event_time_ms.saturating_add(view.ttl.as_millis().min(i64::MAX as u128) as i64)
}
