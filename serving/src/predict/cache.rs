//! The `/v1/predict` response cache of one model version: answers keyed by the SHA-256 of the
//! version and the request's canonical inputs, kept for the pipeline's TTL, bounded in entries
//! (oldest out first). It also serves as the last resort when a request's time budget runs out,
//! so it keeps expired answers until they are pushed out, and says how old an answer is.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::pipeline::CacheSpec;

pub type CacheKey = [u8; 32];

pub struct ResponseCache {
    spec: CacheSpec,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    answers: HashMap<CacheKey, (Instant, serde_json::Map<String, Value>)>,
    /// Keys in insertion order, for eviction.
    order: VecDeque<CacheKey>,
}

impl ResponseCache {
    pub fn new(spec: CacheSpec) -> Self {
        Self {
            spec,
            entries: Mutex::new(Entries::default()),
        }
    }

    /// The key of one instance: model, version and the inputs with object keys sorted, so the
    /// same inputs in any order hit the same entry.
    pub fn key(
        model: &str,
        version: u64,
        entities: &serde_json::Map<String, Value>,
        features: &serde_json::Map<String, Value>,
    ) -> CacheKey {
        let mut hasher = Sha256::new();
        hasher.update(model.as_bytes());
        hasher.update([0]);
        hasher.update(version.to_le_bytes());
        // serde_json's maps are ordered by key, so this text is canonical.
        hasher.update(serde_json::to_vec(&(entities, features)).expect("JSON serializes"));
        hasher.finalize().into()
    }

    /// A fresh answer (younger than the TTL).
    pub fn fresh(&self, key: &CacheKey) -> Option<serde_json::Map<String, Value>> {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .answers
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.spec.ttl)
            .map(|(_, answer)| answer.clone())
    }

    /// Any answer still held, however old: for when the alternative is no answer at all.
    pub fn any(&self, key: &CacheKey) -> Option<(Duration, serde_json::Map<String, Value>)> {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .answers
            .get(key)
            .map(|(at, answer)| (at.elapsed(), answer.clone()))
    }

    pub fn insert(&self, key: CacheKey, answer: serde_json::Map<String, Value>) {
        let mut entries = self.entries.lock().expect("cache lock");
        if entries
            .answers
            .insert(key, (Instant::now(), answer))
            .is_some()
        {
            // A refreshed answer is the newest again, not the first to go.
            entries.order.retain(|k| *k != key);
        }
        entries.order.push_back(key);
        while entries.order.len() > self.spec.max_entries {
            if let Some(old) = entries.order.pop_front() {
                entries.answers.remove(&old);
            }
        }
    }
}
