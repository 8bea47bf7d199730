//! The in-process online store: the embedded default, so `marquee serve` needs no Redis to run,
//! with the same semantics as the Redis store (newest event wins, expiry `ttl` after the event).

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use async_trait::async_trait;

use crate::FeatureStoreError;
use crate::definitions::FeatureView;
use crate::online::{
    CountedEvent, FoundRow, Lookup, OnlineRow, OnlineStore, expires_at_ms, now_ms, with_counts,
};

/// An aggregate's window (ms; kept so stale entities can be dropped) and the event times inside
/// it, oldest first.
type CountedTimes = (i64, VecDeque<i64>);

#[derive(Default)]
pub struct MemoryStore {
    /// (view, entity key) -> the stored row and when it expires (ms since the epoch).
    rows: RwLock<HashMap<(String, String), (FoundRow, i64)>>,
    watermarks: RwLock<HashMap<String, i64>>,
    /// (view, aggregate position, entity key) -> its window and event times.
    events: RwLock<HashMap<(String, usize, String), CountedTimes>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl OnlineStore for MemoryStore {
    async fn write(&self, view: &FeatureView, rows: &[OnlineRow]) -> Result<(), FeatureStoreError> {
        let now = now_ms();
        let mut stored = self.rows.write().expect("memory store lock");
        // Expired rows go at each write, so memory follows the live rows, not the history.
        stored.retain(|_, (_, expires)| *expires > now);
        for row in rows {
            let expires = expires_at_ms(view, row.event_time_ms);
            if expires <= now {
                continue;
            }
            let key = (view.name.clone(), row.entity_key.clone());
            if let Some((existing, _)) = stored.get(&key)
                && existing.event_time_ms > row.event_time_ms
            {
                continue;
            }
            let found = FoundRow {
                values: row.values.clone(),
                event_time_ms: row.event_time_ms,
            };
            stored.insert(key, (found, expires));
        }
        Ok(())
    }

    async fn read(
        &self,
        lookups: &[Lookup<'_>],
    ) -> Result<Vec<Option<FoundRow>>, FeatureStoreError> {
        let now = now_ms();
        let stored = self.rows.read().expect("memory store lock");
        let events = self.events.read().expect("memory store lock");
        Ok(lookups
            .iter()
            .map(|lookup| {
                let row = stored
                    .get(&(lookup.view.name.clone(), lookup.entity_key.to_string()))
                    .filter(|(_, expires)| *expires > now)
                    .map(|(row, _)| row.clone());
                with_counts(lookup.view, row, |position| {
                    let window = lookup
                        .view
                        .aggregate(position)
                        .map_or(0, |a| a.window.as_millis() as i64);
                    let key = (
                        lookup.view.name.clone(),
                        position,
                        lookup.entity_key.to_string(),
                    );
                    events.get(&key).map_or(0, |(_, times)| {
                        times
                            .iter()
                            .filter(|&&t| t > now - window && t <= now)
                            .count() as i64
                    })
                })
            })
            .collect())
    }

    async fn watermark(&self, view: &str) -> Result<Option<i64>, FeatureStoreError> {
        Ok(self
            .watermarks
            .read()
            .expect("memory store lock")
            .get(view)
            .copied())
    }

    async fn set_watermark(&self, view: &str, event_time_ms: i64) -> Result<(), FeatureStoreError> {
        self.watermarks
            .write()
            .expect("memory store lock")
            .insert(view.to_string(), event_time_ms);
        Ok(())
    }

    async fn record(
        &self,
        view: &FeatureView,
        events: &[CountedEvent],
    ) -> Result<(), FeatureStoreError> {
        let mut counted = self.events.write().expect("memory store lock");
        // Entities whose newest event left its window count zero: their entries go, so memory
        // follows the active entities, not every entity ever seen.
        let now = now_ms();
        counted.retain(|_, (window, times)| times.back().is_some_and(|&t| t > now - *window));
        for event in events {
            let Some(aggregate) = view.aggregate(event.feature) else {
                continue;
            };
            let window = aggregate.window.as_millis() as i64;
            let key = (view.name.clone(), event.feature, event.entity_key.clone());
            let (_, times) = counted
                .entry(key)
                .or_insert_with(|| (window, VecDeque::new()));
            let at = times.partition_point(|&t| t <= event.time_ms);
            times.insert(at, event.time_ms);
            let horizon = times.back().copied().unwrap_or(event.time_ms) - window;
            while times.front().is_some_and(|&t| t <= horizon) {
                times.pop_front();
            }
        }
        Ok(())
    }
}
