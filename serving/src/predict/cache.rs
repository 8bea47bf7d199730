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

/// A cached answer: its outputs and the tokens its text took.
pub type CachedAnswer = (serde_json::Map<String, Value>, usize);

pub struct ResponseCache {
    spec: CacheSpec,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Each answer with when it was stored and its insertion number.
    answers: HashMap<CacheKey, (Instant, CachedAnswer, u64)>,
    /// Keys in insertion order, for eviction. A refreshed key is pushed again and its older
    /// place skipped when it comes up (its number no longer matches): refreshing costs no scan.
    order: VecDeque<(CacheKey, u64)>,
    inserted: u64,
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
        canonical_object(entities, &mut hasher);
        canonical_object(features, &mut hasher);
        hasher.finalize().into()
    }

    /// A fresh answer (younger than the TTL).
    pub fn fresh(&self, key: &CacheKey) -> Option<CachedAnswer> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .answers
            .get(key)
            .filter(|(at, _, _)| at.elapsed() < self.spec.ttl)
            .map(|(_, answer, _)| answer.clone())
    }

    /// Any answer still held, however old: for when the alternative is no answer at all.
    pub fn any(&self, key: &CacheKey) -> Option<(Duration, CachedAnswer)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .answers
            .get(key)
            .map(|(at, answer, _)| (at.elapsed(), answer.clone()))
    }

    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let number = entries.inserted;
        entries.inserted += 1;
        entries
            .answers
            .insert(key, (Instant::now(), answer, number));
        // A refreshed answer is the newest again, not the first to go.
        entries.order.push_back((key, number));
        let most = self.spec.max_entries;
        while entries.answers.len() > most {
            let Some((old, number)) = entries.order.pop_front() else {
                break;
            };
            if entries
                .answers
                .get(&old)
                .is_some_and(|(_, _, n)| *n == number)
            {
                entries.answers.remove(&old);
            }
        }
        // Skipped places pile up under refreshes: drop them all once they outnumber the
        // answers (one scan per `max_entries` refreshes at most).
        if entries.order.len() > 2 * most.max(1) {
            let Entries { answers, order, .. } = &mut *entries;
            order.retain(|(key, number)| answers.get(key).is_some_and(|(_, _, n)| n == number));
        }
    }
}

/// Feeds a JSON object to the hasher in one canonical form: keys sorted here (not by whatever
/// order the map type keeps, which serde_json's `preserve_order` feature would change), every
/// item tagged and length-prefixed so no two different values hash alike.
fn canonical_object(map: &serde_json::Map<String, Value>, hasher: &mut Sha256) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    hasher.update(b"{");
    hasher.update((keys.len() as u64).to_le_bytes());
    for key in keys {
        canonical_text(key, hasher);
        canonical_value(&map[key], hasher);
    }
}

fn canonical_value(value: &Value, hasher: &mut Sha256) {
    match value {
        Value::Null => hasher.update(b"n"),
        Value::Bool(b) => hasher.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            hasher.update(b"#");
            canonical_text(&n.to_string(), hasher);
        }
        Value::String(s) => {
            hasher.update(b"s");
            canonical_text(s, hasher);
        }
        Value::Array(items) => {
            hasher.update(b"[");
            hasher.update((items.len() as u64).to_le_bytes());
            for item in items {
                canonical_value(item, hasher);
            }
        }
        Value::Object(map) => canonical_object(map, hasher),
    }
}

fn canonical_text(text: &str, hasher: &mut Sha256) {
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn keys_ignore_order_and_tell_types_apart() {
        let entities = map(json!({"user_id": "u1", "show_id": "s1"}));
        let mut reordered = serde_json::Map::new();
        reordered.insert("show_id".into(), json!("s1"));
        reordered.insert("user_id".into(), json!("u1"));
        let features = map(json!({"tags": {"b": 1, "a": [1, "2"]}}));
        let key = ResponseCache::key("m", 1, &entities, &features);
        assert_eq!(key, ResponseCache::key("m", 1, &reordered, &features));
        for (entities, features, version) in [
            (
                map(json!({"user_id": "u1", "show_id": 1})),
                features.clone(),
                1,
            ),
            (
                entities.clone(),
                map(json!({"tags": {"b": 1, "a": [1, 2]}})),
                1,
            ),
            (entities.clone(), features.clone(), 2),
            (
                map(json!({"user_id": "u1s", "show_id": ""})),
                features.clone(),
                1,
            ),
        ] {
            assert_ne!(key, ResponseCache::key("m", version, &entities, &features));
        }
    }

    #[test]
    fn a_refreshed_answer_goes_last_and_refreshing_costs_no_scan() {
        let cache = ResponseCache::new(CacheSpec {
            ttl: Duration::from_secs(60),
            max_entries: 3,
        });
        let answer = |n: usize| (serde_json::Map::new(), n);
        for k in 0..3u8 {
            cache.insert([k; 32], answer(k.into()));
        }
        cache.insert([0; 32], answer(10));
        cache.insert([3; 32], answer(3));
        assert!(
            cache.fresh(&[1; 32]).is_none(),
            "the oldest unrefreshed answer went"
        );
        assert_eq!(cache.fresh(&[0; 32]).map(|a| a.1), Some(10));
        for n in 0..100 {
            cache.insert([2; 32], answer(n));
        }
        let entries = cache.entries.lock().unwrap();
        assert_eq!(entries.answers.len(), 3);
        assert!(
            entries.order.len() <= 6,
            "{} places kept",
            entries.order.len()
        );
    }
}
