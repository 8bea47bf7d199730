//! The Redis online store. One hash per (view, entity), `{prefix}{view}:{entity key}`, holding
//! `_ts` (the event time) and `_row` (the features as one JSON object, readable in redis-cli),
//! expiring `ttl` after the event time. One field for the whole row rather than one per feature:
//! a 100-entity lookup then parses 200 reply strings instead of 2,100, which halves its cost. A
//! request's lookups go out as one pipeline of HMGETs (one round trip for all views and entities)
//! over a shared multiplexed connection that reconnects by itself. Every call is bounded by a
//! timeout, and while Redis is unreachable new connection attempts are spaced out, so callers
//! that degrade on errors get their answer fast instead of queueing behind reconnects.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::FeatureStoreError;
use crate::definitions::FeatureView;
use crate::online::{
    CountedEvent, FoundRow, Lookup, OnlineRow, OnlineStore, expires_at_ms, now_ms, with_counts,
};
use crate::value::FeatureValue;

/// The hash fields: a row's event time and its values.
const EVENT_TIME_FIELD: &str = "_ts";
const ROW_FIELD: &str = "_row";

/// Stores a row unless a newer one is there, and sets its expiry. KEYS[1] the hash; ARGV[1]
/// event time (ms); ARGV[2] expiry (ms since the epoch); ARGV[3] the row as JSON.
const WRITE_ROW: &str = r"
local stored = redis.call('HGET', KEYS[1], '_ts')
if stored and tonumber(stored) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], '_ts', ARGV[1], '_row', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";

/// Counts one event for a windowed aggregate: a sorted set of event times (members made unique
/// by a counter), trimmed to the window behind the newest event, expiring with it. KEYS[1] the
/// set; KEYS[2] the counter; ARGV[1] event time (ms); ARGV[2] window (ms).
const RECORD_EVENT: &str = r"
local id = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1] .. ':' .. id)
local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', newest - tonumber(ARGV[2]))
redis.call('PEXPIREAT', KEYS[1], newest + tonumber(ARGV[2]))
return 1
";

/// How to reach Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS where the build supports it).
    pub url: String,
    /// Prepended to every key, so several deployments can share one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Longest wait for one call (connect, read or write), in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    "marquee:".into()
}

/// The per-call time limit when none is configured, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 50;

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: default_prefix(),
            timeout_ms: default_timeout_ms(),
        }
    }
}

pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    connection: tokio::sync::Mutex<Connection>,
}

/// The shared connection, or when the last attempt to make one failed.
enum Connection {
    Up(ConnectionManager),
    Down { since: Instant },
}

/// While Redis is down, at most one connection attempt per this interval.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

impl RedisStore {
    /// A store for `config`. Does not need Redis to be up: the connection is made on first use
    /// and remade after Redis comes back.
    pub fn new(config: &RedisConfig) -> Result<Self, FeatureStoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            FeatureStoreError::Definitions(format!("redis url '{}': {e}", config.url))
        })?;
        Ok(Self {
            client,
            prefix: config.prefix.clone(),
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
            connection: tokio::sync::Mutex::new(Connection::Down {
                since: Instant::now()
                    .checked_sub(RECONNECT_INTERVAL)
                    .unwrap_or_else(Instant::now),
            }),
        })
    }

    fn key(&self, view: &FeatureView, entity_key: &str) -> String {
        format!("{}{}:{entity_key}", self.prefix, view.name)
    }

    /// The sorted set of one aggregate's events for one entity (`#` cannot be in a view name, so
    /// this never meets a row key).
    fn events_key(&self, view: &FeatureView, feature: usize, entity_key: &str) -> String {
        format!(
            "{}{}#{}:{entity_key}",
            self.prefix, view.name, view.features[feature].name
        )
    }

    fn watermark_key(&self, view: &str) -> String {
        format!("{}_watermark:{view}", self.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, FeatureStoreError> {
        let mut connection = self.connection.lock().await;
        match &*connection {
            Connection::Up(manager) => return Ok(manager.clone()),
            Connection::Down { since } if since.elapsed() < RECONNECT_INTERVAL => {
                return Err(FeatureStoreError::Unavailable(
                    "redis is unreachable; retrying shortly".into(),
                ));
            }
            Connection::Down { .. } => {}
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            // Each call's own limit (longer for write batches) is kept by `run`.
            .set_response_timeout(None)
            .set_number_of_retries(1);
        match tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(manager)) => {
                *connection = Connection::Up(manager.clone());
                Ok(manager)
            }
            Ok(Err(e)) => {
                *connection = Connection::Down {
                    since: Instant::now(),
                };
                Err(FeatureStoreError::Unavailable(format!("redis: {e}")))
            }
            Err(_) => {
                *connection = Connection::Down {
                    since: Instant::now(),
                };
                Err(FeatureStoreError::Unavailable(format!(
                    "redis did not accept a connection within {:?}",
                    self.timeout * 2
                )))
            }
        }
    }

    /// Runs a batch of writes (materialisation, counted events), with time in proportion to its
    /// size; an empty batch is not sent.
    async fn run_batch(&self, pipeline: &redis::Pipeline) -> Result<(), FeatureStoreError> {
        if pipeline.is_empty() {
            return Ok(());
        }
        let timeout = self.timeout + Duration::from_micros(50 * pipeline.len() as u64);
        self.run::<()>(pipeline, timeout).await
    }

    /// Runs a pipeline within the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
        timeout: Duration,
    ) -> Result<T, FeatureStoreError> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(timeout, pipeline.query_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(FeatureStoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(FeatureStoreError::Unavailable(format!(
                "redis did not answer within {timeout:?}"
            ))),
        }
    }
}

#[async_trait]
impl OnlineStore for RedisStore {
    async fn write(&self, view: &FeatureView, rows: &[OnlineRow]) -> Result<(), FeatureStoreError> {
        let now = now_ms();
        let mut pipeline = redis::pipe();
        for row in rows {
            let expires = expires_at_ms(view, row.event_time_ms);
            if expires <= now {
                continue;
            }
            let values: serde_json::Map<String, serde_json::Value> = view
                .features
                .iter()
                .zip(&row.values)
                .filter_map(|(feature, value)| {
                    Some((feature.name.clone(), value.as_ref()?.to_json()))
                })
                .collect();
            pipeline
                .cmd("EVAL")
                .arg(WRITE_ROW)
                .arg(1)
                .arg(self.key(view, &row.entity_key))
                .arg(row.event_time_ms)
                .arg(expires)
                .arg(serde_json::Value::Object(values).to_string())
                .ignore();
        }
        self.run_batch(&pipeline).await
    }

    async fn read(
        &self,
        lookups: &[Lookup<'_>],
    ) -> Result<Vec<Option<FoundRow>>, FeatureStoreError> {
        if lookups.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        let now = now_ms();
        for lookup in lookups {
            pipeline
                .cmd("HMGET")
                .arg(self.key(lookup.view, lookup.entity_key))
                .arg(EVENT_TIME_FIELD)
                .arg(ROW_FIELD);
            for (position, aggregate) in lookup.view.aggregates() {
                pipeline
                    .cmd("ZCOUNT")
                    .arg(self.events_key(lookup.view, position, lookup.entity_key))
                    .arg(format!("({}", now - aggregate.window.as_millis() as i64))
                    .arg(now);
            }
        }
        let replies: Vec<redis::Value> = self.run(&pipeline, self.timeout).await?;
        let mut replies = replies.into_iter();
        let unexpected =
            |e: redis::ParsingError| FeatureStoreError::Corrupt(format!("redis reply: {e}"));
        lookups
            .iter()
            .map(|lookup| {
                let reply = replies.next().ok_or_else(|| {
                    FeatureStoreError::Corrupt("redis answered fewer replies than asked".into())
                })?;
                let (event_time, row): (Option<i64>, Option<Vec<u8>>) =
                    redis::from_redis_value(reply).map_err(unexpected)?;
                let row = decode(lookup, event_time, row)?;
                let mut counts = Vec::new();
                for _ in lookup.view.aggregates() {
                    let count: i64 = replies
                        .next()
                        .map(redis::from_redis_value)
                        .transpose()
                        .map_err(unexpected)?
                        .unwrap_or(0);
                    counts.push(count);
                }
                let mut counts = counts.into_iter();
                Ok(with_counts(lookup.view, row, |_| {
                    counts.next().unwrap_or(0)
                }))
            })
            .collect()
    }

    async fn watermark(&self, view: &str) -> Result<Option<i64>, FeatureStoreError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("GET").arg(self.watermark_key(view));
        let (value,): (Option<i64>,) = self.run(&pipeline, self.timeout).await?;
        Ok(value)
    }

    async fn set_watermark(&self, view: &str, event_time_ms: i64) -> Result<(), FeatureStoreError> {
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("SET")
            .arg(self.watermark_key(view))
            .arg(event_time_ms)
            .ignore();
        self.run::<()>(&pipeline, self.timeout).await
    }

    async fn record(
        &self,
        view: &FeatureView,
        events: &[CountedEvent],
    ) -> Result<(), FeatureStoreError> {
        let mut pipeline = redis::pipe();
        let sequence = format!("{}_event_seq", self.prefix);
        for event in events {
            let Some(aggregate) = view.aggregate(event.feature) else {
                continue;
            };
            pipeline
                .cmd("EVAL")
                .arg(RECORD_EVENT)
                .arg(2)
                .arg(self.events_key(view, event.feature, &event.entity_key))
                .arg(&sequence)
                .arg(event.time_ms)
                .arg(aggregate.window.as_millis() as i64)
                .ignore();
        }
        self.run_batch(&pipeline).await
    }
}

/// One HMGET reply (`_ts`, `_row`) as a row; `None` when the key is absent. A feature missing
/// from the JSON (or null there, as a NaN is written) is unset.
fn decode(
    lookup: &Lookup<'_>,
    event_time: Option<i64>,
    row: Option<Vec<u8>>,
) -> Result<Option<FoundRow>, FeatureStoreError> {
    let (Some(event_time_ms), Some(row)) = (event_time, row) else {
        return Ok(None);
    };
    // Redis expires keys a little late (and a ttl may have been shortened since the write): the
    // validity rule is checked here too.
    if expires_at_ms(lookup.view, event_time_ms) <= now_ms() {
        return Ok(None);
    }
    let bad = |what: String| {
        FeatureStoreError::Corrupt(format!(
            "{} entity '{}': {what}",
            lookup.view.name, lookup.entity_key
        ))
    };
    let stored: RowEntries =
        serde_json::from_slice(&row).map_err(|e| bad(format!("row is not a JSON object: {e}")))?;
    let values = lookup
        .view
        .features
        .iter()
        .enumerate()
        .map(
            |(position, feature)| match stored.get(position, &feature.name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(value) => FeatureValue::from_json(feature.dtype, value)
                    .map(Some)
                    .map_err(|e| bad(format!("feature '{}': {e}, stored {value}", feature.name))),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(FoundRow {
        values,
        event_time_ms,
    }))
}

/// A stored row's (name, value) pairs in stored order. Rows are written in the view's feature
/// order, so looking a feature up at its own position almost always hits at once; a hash map
/// here cost a fifth of a lookup's time.
struct RowEntries<'a>(Vec<(&'a str, serde_json::Value)>);

impl RowEntries<'_> {
    fn get(&self, position: usize, name: &str) -> Option<&serde_json::Value> {
        match self.0.get(position) {
            Some((stored, value)) if *stored == name => Some(value),
            _ => self
                .0
                .iter()
                .find(|(stored, _)| *stored == name)
                .map(|(_, v)| v),
        }
    }
}

impl<'de> serde::Deserialize<'de> for RowEntries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = RowEntries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of feature values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(entry) = map.next_entry::<&'de str, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(RowEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}
