//! Traffic management: which loaded version answers a request that names no version, and which
//! version a share of requests is mirrored to. A model's [`Policy`] splits its traffic between a
//! control version and variants (A/B tests, canaries), by user or by request, and may mirror a
//! share to a shadow version whose answers are recorded and never returned.
//!
//! A user-level split hashes a named entity (e.g. `user_id`) with the policy's salt into one of
//! 10,000 buckets, and variants own consecutive bucket ranges from 0: the same user lands in the
//! same bucket on every server and after restarts, and a variant whose share grows keeps every
//! user it had (a user on the canary at 5% is still on it at 20%). A request-level split and the
//! shadow share walk the buckets with a Weyl sequence (an atomic counter times the golden
//! ratio), so shares are exact over any run of requests without a random number generator.
//!
//! Routing only answers "which version"; the request path (`predict/mod.rs`, `service.rs`) runs
//! the request there and reports each answer back through [`Router::finished`] (for
//! `/v1/predict` with the predictions themselves) for the per-variant metrics that guardrails
//! judge and the A/B readout shows (`experiments.rs`). Outcomes fed back later
//! (`POST /v1/feedback`) find their variant through the ids of recent answers the router keeps.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ServingError;
use crate::metrics::{Metrics, VariantSeries};
use crate::stats::Moments;

/// Buckets a split divides traffic into: a share is a whole number of hundredths of a percent.
pub const BUCKETS: u32 = 10_000;

/// The name of the variant that answers whatever no other variant takes.
pub const CONTROL: &str = "control";

/// The name mirrored requests are counted under.
pub const SHADOW: &str = "shadow";

/// The entity a user-level split hashes unless it names another. Requests may name it for any
/// model, whatever its pipeline reads and whether or not a split is installed, so a client that
/// always sends it is never refused before, during or after a deployment (or on a server that
/// has not yet seen one).
pub const DEFAULT_SPLIT_ENTITY: &str = "user_id";

/// Shadow requests in flight at once, all models together: past it, a mirrored request is dropped
/// (and counted), so mirroring never queues work behind the answers clients wait for.
pub const SHADOW_IN_FLIGHT: usize = 64;

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrafficError {
    #[error("a share must be between 0 and 100 percent, not {0}")]
    Share(String),
    #[error("the variants' shares add up to {0}%, more than 100%")]
    Oversubscribed(f64),
    #[error("variant '{0}' appears twice")]
    DuplicateVariant(String),
    #[error("variant name '{0}' is reserved")]
    ReservedName(String),
    #[error("variant '{name}' routes to version {version}, which is the control version")]
    ControlAsVariant { name: String, version: u64 },
    #[error("a user-level split needs the entity to hash, e.g. \"user_id\"")]
    NoEntity,
}

/// A share of traffic, in buckets (hundredths of a percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Share(u32);

impl Share {
    pub const ALL: Share = Share(BUCKETS);

    /// A percentage, rounded to the nearest hundredth of a percent.
    pub fn from_percent(percent: f64) -> Result<Self, TrafficError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(TrafficError::Share(percent.to_string()));
        }
        Ok(Share((percent * f64::from(BUCKETS) / 100.0).round() as u32))
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) * 100.0 / f64::from(BUCKETS)
    }

    pub fn buckets(self) -> u32 {
        self.0
    }
}

impl Serialize for Share {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.percent())
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let percent = f64::deserialize(deserializer)?;
        Share::from_percent(percent).map_err(serde::de::Error::custom)
    }
}

/// How requests are assigned to variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Split {
    /// By a hash of the entity id the request names under `entity` (e.g. `user_id`): sticky per
    /// user. A request that names none goes to the control.
    User { entity: String },
    /// Each request on its own.
    Request,
}

/// A version that takes a share of a model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub version: u64,
    pub share: Share,
}

/// A version that sees a share of the traffic without answering it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: u64,
    pub share: Share,
}

/// A model's traffic policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The version that answers what no variant takes.
    pub control: u64,
    pub variants: Vec<Variant>,
    pub split: Split,
    /// Mixed into the user hash: a new experiment (a new salt) puts other users first.
    #[serde(default)]
    pub salt: String,
    #[serde(default)]
    pub shadow: Option<Shadow>,
}

impl Policy {
    /// Every version the policy sends requests to.
    pub fn versions(&self) -> Vec<u64> {
        let mut versions = vec![self.control];
        versions.extend(self.variants.iter().map(|v| v.version));
        versions.extend(self.shadow.as_ref().map(|s| s.version));
        versions
    }

    /// The version a variant's name stands for (`control`, `shadow` or a variant's).
    pub fn version_of(&self, variant: &str) -> Option<u64> {
        match variant {
            CONTROL => Some(self.control),
            SHADOW => self.shadow.as_ref().map(|s| s.version),
            name => self
                .variants
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.version),
        }
    }

    /// Checks the shares, names and versions.
    pub fn check(&self) -> Result<(), TrafficError> {
        let total: u32 = self.variants.iter().map(|v| v.share.buckets()).sum();
        if total > BUCKETS {
            return Err(TrafficError::Oversubscribed(
                f64::from(total) * 100.0 / f64::from(BUCKETS),
            ));
        }
        for (i, variant) in self.variants.iter().enumerate() {
            if [CONTROL, SHADOW, ""].contains(&variant.name.as_str()) {
                return Err(TrafficError::ReservedName(variant.name.clone()));
            }
            if self.variants[..i].iter().any(|v| v.name == variant.name) {
                return Err(TrafficError::DuplicateVariant(variant.name.clone()));
            }
            if variant.version == self.control {
                return Err(TrafficError::ControlAsVariant {
                    name: variant.name.clone(),
                    version: variant.version,
                });
            }
        }
        if matches!(&self.split, Split::User { entity } if entity.is_empty()) {
            return Err(TrafficError::NoEntity);
        }
        Ok(())
    }

    /// The variant that owns `bucket` (its position; `None`: the control): variants own
    /// consecutive ranges from 0, the control the rest.
    fn owner(&self, bucket: u32) -> Option<usize> {
        let mut end = 0;
        self.variants.iter().position(|variant| {
            end += variant.share.buckets();
            bucket < end
        })
    }

    /// The version of a variant position (`None`: the control).
    fn version_at(&self, variant: Option<usize>) -> u64 {
        variant.map_or(self.control, |i| self.variants[i].version)
    }
}

/// Where one request goes, under the policy that chose it: its answer is counted there.
pub struct Route {
    pub version: u64,
    /// A version to mirror this request to.
    pub shadow: Option<u64>,
    installed: Arc<Installed>,
    /// The answering arm's position in `installed.arms`.
    arm: usize,
}

impl Route {
    /// The variant's name (`control` for the control version, `shadow` for a mirrored copy).
    pub fn variant(&self) -> &str {
        &self.installed.arms[self.arm].name
    }

    /// The route of this request's mirrored copy, where it has one.
    pub fn mirrored(&self) -> Option<Route> {
        let version = self.shadow?;
        Some(Route {
            version,
            shadow: None,
            installed: self.installed.clone(),
            arm: self.installed.arms.len() - 1,
        })
    }
}

/// The latencies a window keeps at most: a uniform sample of all it saw beyond that.
pub const WINDOW_SAMPLES: usize = 4096;

/// Distinct labels a window counts; answers with further labels are counted under [`OTHER_LABEL`].
pub const WINDOW_LABELS: usize = 64;

/// Where labels past [`WINDOW_LABELS`] are counted.
pub const OTHER_LABEL: &str = "(other)";

/// Ids of recent routed answers the router remembers for outcomes fed back later.
pub const REMEMBERED_PREDICTIONS: usize = 100_000;

/// What one variant's requests did since its policy was set: the evidence a canary is judged on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub server_errors: u64,
    pub client_errors: u64,
    /// Latencies in milliseconds, every one up to [`WINDOW_SAMPLES`], then a reservoir sample.
    pub latencies_ms: Vec<f32>,
    /// Latencies offered to the sample so far.
    pub seen_latencies: u64,
    /// Numeric predictions (`/v1/predict` answers whose main value is a number or a boolean).
    pub predictions: Moments,
    /// Labelled predictions, per label (at most [`WINDOW_LABELS`] labels, then [`OTHER_LABEL`]).
    pub labels: BTreeMap<String, u64>,
    /// Outcomes fed back for this variant's answers.
    pub outcomes: Moments,
}

impl Window {
    fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.requests += 1;
        match outcome {
            Outcome::Success => {}
            Outcome::ClientError => self.client_errors += 1,
            Outcome::ServerError => self.server_errors += 1,
        }
        let ms = latency.as_secs_f64() as f32 * 1e3;
        self.seen_latencies += 1;
        if self.latencies_ms.len() < WINDOW_SAMPLES {
            self.latencies_ms.push(ms);
        } else {
            // Reservoir sampling (Vitter's algorithm R), the slot drawn from a hash of the count.
            let slot = mix64(self.seen_latencies) % self.seen_latencies;
            if let Some(kept) = self.latencies_ms.get_mut(slot as usize) {
                *kept = ms;
            }
        }
    }

    fn record_answer(&mut self, answer: &AnswerSummary<'_>) {
        if let Some(value) = answer.value {
            self.predictions.push(value);
        }
        if let Some(label) = answer.label {
            if let Some(count) = self.labels.get_mut(label) {
                *count += 1;
            } else {
                let kept = self.labels.len() < WINDOW_LABELS;
                let label = if kept { label } else { OTHER_LABEL };
                *self.labels.entry(label.to_string()).or_default() += 1;
            }
        }
    }

    /// Server errors over requests (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.server_errors as f64 / self.requests as f64
        }
    }

    /// The `q` quantile of the sampled latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.latencies_ms.is_empty() {
            return None;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f32::total_cmp);
        let at = ((sorted.len() - 1) as f64 * q).round() as usize;
        Some(f64::from(sorted[at.min(sorted.len() - 1)]))
    }
}

/// A well-mixed 64-bit hash of a number (SplitMix64's finaliser), for reservoir slots.
fn mix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One model's policy as the router holds it, with its request counters and windows.
struct Installed {
    policy: Policy,
    /// What answers under the policy: the control first, then the variants in the policy's
    /// order, then the shadow where it has one. A route names its arm by position.
    arms: Vec<Arm>,
    requests: AtomicU64,
    mirrored: AtomicU64,
    /// Per variant (and `shadow`), what its requests did since this policy was set.
    windows: std::sync::Mutex<BTreeMap<Arc<str>, Window>>,
}

/// One variant of an installed policy, with what its answers are counted in, resolved when the
/// policy is set so that a routed request looks up no name.
struct Arm {
    name: Arc<str>,
    series: VariantSeries,
    /// Its model and variant in the router's recent answers; `None` for the shadow, whose
    /// answers nobody saw and no outcome follows.
    origin: Option<u32>,
}

impl Policy {
    /// The arms a policy answers with, in [`Installed::arms`]' order: (name, counted for outcomes).
    fn arm_names(&self) -> impl Iterator<Item = (&str, bool)> {
        std::iter::once((CONTROL, true))
            .chain(self.variants.iter().map(|v| (v.name.as_str(), true)))
            .chain(self.shadow.iter().map(|_| (SHADOW, false)))
    }
}

/// One `/v1/predict` answer as a window counts it.
pub struct AnswerSummary<'a> {
    pub prediction_id: &'a str,
    /// The main value, where it is a number (a boolean counts as 0 or 1).
    pub value: Option<f64>,
    pub label: Option<&'a str>,
}

/// Where a recent answer came from, for its outcome.
#[derive(Debug, Clone, Copy)]
struct Remembered {
    /// Its prediction id, a UUID, as a number.
    id: u128,
    /// Its model and variant: an index into [`Recent::origins`].
    origin: u32,
    version: u64,
    /// Whether an outcome was counted for it already.
    counted: bool,
}

/// The last [`REMEMBERED_PREDICTIONS`] routed answers: a ring whose oldest entry the next one
/// overwrites, found by id. Entries are plain numbers (no allocation, no shared reference count
/// touched per answer), so remembering costs a map insert and a removal.
#[derive(Default)]
struct Recent {
    ring: Vec<Remembered>,
    /// The slot the next answer takes once the ring is full.
    next: usize,
    by_id: HashMap<u128, usize>,
    /// Every (model, variant) an answer was remembered for.
    origins: Vec<(Arc<str>, Arc<str>)>,
}

impl Recent {
    fn origin(&mut self, model: &str, variant: &str) -> u32 {
        let known = self
            .origins
            .iter()
            .position(|(m, v)| &**m == model && &**v == variant);
        let index = known.unwrap_or_else(|| {
            self.origins.push((Arc::from(model), Arc::from(variant)));
            self.origins.len() - 1
        });
        u32::try_from(index).expect("fewer than 2^32 variants")
    }

    fn remember(&mut self, answer: Remembered) {
        let slot = if self.ring.len() < REMEMBERED_PREDICTIONS {
            self.ring.push(answer);
            self.ring.len() - 1
        } else {
            let slot = self.next;
            self.next = (slot + 1) % REMEMBERED_PREDICTIONS;
            let evicted = std::mem::replace(&mut self.ring[slot], answer);
            if self.by_id.get(&evicted.id) == Some(&slot) {
                self.by_id.remove(&evicted.id);
            }
            slot
        };
        self.by_id.insert(answer.id, slot);
    }

    /// The answer whose id is exactly `prediction_id` as it was given out (the hyphenated
    /// lowercase form: another spelling of the same UUID is not that id).
    fn get_mut(&mut self, prediction_id: &str) -> Option<&mut Remembered> {
        let uuid = uuid::Uuid::try_parse(prediction_id).ok()?;
        let mut text = uuid::Uuid::encode_buffer();
        if uuid.hyphenated().encode_lower(&mut text) != prediction_id {
            return None;
        }
        let id = uuid.as_u128();
        let slot = *self.by_id.get(&id)?;
        self.ring.get_mut(slot).filter(|r| r.id == id)
    }
}

/// What became of an outcome fed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// Counted in the variant that answered.
    Counted {
        model: String,
        variant: String,
        version: u64,
    },
    /// Known, but the model's policy no longer has its variant on its version: not counted.
    PolicyChanged {
        model: String,
        variant: String,
        version: u64,
    },
    /// This prediction has an outcome already.
    AlreadyCounted,
    /// Not among the answers the router remembers (too old, another server's, or not routed).
    Unknown,
}

/// The traffic policies of all models.
pub struct Router {
    policies: RwLock<BTreeMap<String, Arc<Installed>>>,
    /// Per model, the entities a split hashes or will hash (a policy's, a deployment's): requests
    /// may name them even when the model's pipeline reads none, and keep doing so after the
    /// policy is gone (a rollback must not turn every request that carries `user_id` into a 400).
    routing_entities: RwLock<BTreeMap<String, std::collections::BTreeSet<String>>>,
    shadow_slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    recent: Mutex<Recent>,
}

/// A mirrored request's place; dropping it frees the place.
pub struct ShadowSlot {
    _place: OwnedSemaphorePermit,
}

/// How an answered request went, for the per-variant metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Refused for the request's own fault (bad input, unknown names): says little about the
    /// version, unless one variant refuses what another takes.
    ClientError,
    /// The version failed the request (execution failed, timed out, overloaded, unavailable).
    ServerError,
}

impl Outcome {
    /// How a routed request's result counts for its variant.
    pub fn of<T>(result: &Result<T, ServingError>) -> Self {
        match result {
            Ok(_) => Outcome::Success,
            Err(error) if error.is_clients_fault() => Outcome::ClientError,
            Err(_) => Outcome::ServerError,
        }
    }

    /// Its place in the metric's labels ([`OUTCOME_LABELS`]).
    pub fn label_index(self) -> usize {
        match self {
            Outcome::Success => 0,
            Outcome::ClientError => 1,
            Outcome::ServerError => 2,
        }
    }
}

impl Router {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            policies: RwLock::new(BTreeMap::new()),
            routing_entities: RwLock::new(BTreeMap::new()),
            shadow_slots: Arc::new(Semaphore::new(SHADOW_IN_FLIGHT)),
            metrics,
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Installs (or replaces) a model's policy. Replacing a policy with the same salt keeps every
    /// user where the shares allow, which is what a ramp step does.
    pub fn set(&self, model: &str, policy: Policy) -> Result<(), TrafficError> {
        policy.check()?;
        if let Split::User { entity } = &policy.split {
            self.allow_entity(model, entity);
        }
        let arms = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            policy
                .arm_names()
                .map(|(name, counted)| Arm {
                    name: Arc::from(name),
                    series: self.metrics.variant_series(model, name),
                    origin: counted.then(|| recent.origin(model, name)),
                })
                .collect()
        };
        let installed = Arc::new(Installed {
            policy,
            arms,
            requests: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            windows: Default::default(),
        });
        self.policies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string(), installed);
        Ok(())
    }

    /// Removes a model's policy: its requests go to its default version again.
    pub fn clear(&self, model: &str) -> Option<Policy> {
        self.policies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model)
            .map(|installed| installed.policy.clone())
    }

    pub fn policy(&self, model: &str) -> Option<Policy> {
        self.installed(model).map(|i| i.policy.clone())
    }

    fn installed(&self, model: &str) -> Option<Arc<Installed>> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
    }

    /// Where a request for `model` that names no version goes; `None` without a policy.
    /// `entity_id` gives the id the request names for an entity (called only by a user-level
    /// split, with the split's entity, e.g. `user_id`).
    pub fn route<'a>(
        &self,
        model: &str,
        entity_id: impl FnOnce(&str) -> Option<Cow<'a, str>>,
    ) -> Option<Route> {
        let installed = self.installed(model)?;
        let policy = &installed.policy;
        let variant = match &policy.split {
            Split::User { entity } => {
                entity_id(entity).and_then(|id| policy.owner(user_bucket(&policy.salt, &id)))
            }
            Split::Request => policy.owner(weyl_bucket(
                installed.requests.fetch_add(1, Ordering::Relaxed),
            )),
        };
        let shadow = policy.shadow.as_ref().and_then(|shadow| {
            // Offset from the request sequence, so the mirrored requests are not the same run of
            // numbers a request-level split gives the first variant.
            let n = installed.mirrored.fetch_add(1, Ordering::Relaxed);
            (weyl_bucket(n.wrapping_add(1 << 32)) < shadow.share.buckets())
                .then_some(shadow.version)
        });
        Some(Route {
            version: policy.version_at(variant),
            shadow,
            // The control is the first arm, the variants follow it.
            arm: variant.map_or(0, |i| i + 1),
            installed,
        })
    }

    /// Lets requests for `model` name `entity` (a split's, now or soon) whatever its pipeline reads.
    pub fn allow_entity(&self, model: &str, entity: &str) {
        let known = self
            .routing_entities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .is_some_and(|e| e.contains(entity));
        if !known {
            self.routing_entities
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(model.to_string())
                .or_default()
                .insert(entity.to_string());
        }
    }

    /// Whether requests for `model` may name `entity` for routing.
    pub fn is_routing_entity(&self, model: &str, entity: &str) -> bool {
        entity == DEFAULT_SPLIT_ENTITY
            || self
                .routing_entities
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(model)
                .is_some_and(|e| e.contains(entity))
    }

    /// A place for one mirrored request, or `None` (counted as dropped) when as many are in flight
    /// as the router allows.
    pub fn shadow_slot(&self, model: &str) -> Option<ShadowSlot> {
        match self.shadow_slots.clone().try_acquire_owned() {
            Ok(place) => Some(ShadowSlot { _place: place }),
            Err(_) => {
                self.metrics.shadow_dropped(model);
                None
            }
        }
    }

    /// Records how a routed request went (a mirrored one's too): its variant's metrics, and
    /// its policy's window for that variant with its `answers` (the `/v1/predict` predictions;
    /// none for `/v2`), whose ids are remembered for outcomes fed back later (not a shadow's:
    /// nobody saw them). One lock of the window and, with answers, one of the recent ids.
    pub fn finished(
        &self,
        route: &Route,
        outcome: Outcome,
        latency: Duration,
        answers: &[AnswerSummary<'_>],
    ) {
        let arm = &route.installed.arms[route.arm];
        arm.series.record(outcome.label_index(), latency);
        {
            let mut windows = route
                .installed
                .windows
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let window = match windows.get_mut(&*arm.name) {
                Some(window) => window,
                None => windows.entry(arm.name.clone()).or_default(),
            };
            window.record(outcome, latency);
            answers.iter().for_each(|a| window.record_answer(a));
        }
        let Some(origin) = arm.origin.filter(|_| !answers.is_empty()) else {
            return;
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for answer in answers {
            if let Ok(id) = uuid::Uuid::try_parse(answer.prediction_id) {
                recent.remember(Remembered {
                    id: id.as_u128(),
                    origin,
                    version: route.version,
                    counted: false,
                });
            }
        }
    }

    /// Counts an outcome for a recent answer in its variant's window under the model's current
    /// policy (a ramp step keeps the variant's name, so late outcomes still count; a request,
    /// by contrast, is counted under the policy that routed it, in [`Router::finished`]).
    pub fn feedback(&self, prediction_id: &str, outcome: f64) -> Feedback {
        let (model, variant, version) = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let Some(remembered) = recent.get_mut(prediction_id).copied() else {
                return Feedback::Unknown;
            };
            if remembered.counted {
                return Feedback::AlreadyCounted;
            }
            let (model, variant) = &recent.origins[remembered.origin as usize];
            (model.to_string(), variant.to_string(), remembered.version)
        };
        match self.installed(&model) {
            Some(installed) if installed.policy.version_of(&variant) == Some(version) => {
                // Marked under the lock, so two outcomes for one answer cannot both count.
                let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                match recent.get_mut(prediction_id) {
                    Some(remembered) if !remembered.counted => remembered.counted = true,
                    Some(_) => return Feedback::AlreadyCounted,
                    None => return Feedback::Unknown,
                }
                drop(recent);
                let mut windows = installed.windows.lock().unwrap_or_else(|p| p.into_inner());
                windows
                    .entry(Arc::from(variant.as_str()))
                    .or_default()
                    .outcomes
                    .push(outcome);
                Feedback::Counted {
                    model,
                    variant,
                    version,
                }
            }
            _ => Feedback::PolicyChanged {
                model,
                variant,
                version,
            },
        }
    }

    /// Every variant's window under the model's current policy (empty without one).
    pub fn windows(&self, model: &str) -> BTreeMap<String, Window> {
        self.snapshot(model)
            .map(|(_, windows)| windows)
            .unwrap_or_default()
    }

    /// The model's current policy with its windows, read together.
    pub fn snapshot(&self, model: &str) -> Option<(Policy, BTreeMap<String, Window>)> {
        let installed = self.installed(model)?;
        let windows = installed
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(variant, window)| (variant.to_string(), window.clone()))
            .collect();
        Some((installed.policy.clone(), windows))
    }
}

/// The bucket of an entity id: SHA-256 of the salt and the id, so it is the same on every server,
/// in every build, and independent between experiments with different salts.
pub fn user_bucket(salt: &str, id: &str) -> u32 {
    let mut hash = Sha256::new();
    hash.update(salt.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    let digest = hash.finalize();
    let word = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes of a digest"));
    ((u128::from(word) * u128::from(BUCKETS)) >> 64) as u32
}

/// The n-th bucket of the golden-ratio sequence: any run of requests spreads over the buckets
/// almost evenly, so a share of s buckets takes s / 10,000 of them within a few requests.
fn weyl_bucket(n: u64) -> u32 {
    let point = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(point) * u128::from(BUCKETS)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canary(share: f64) -> Policy {
        Policy {
            control: 1,
            variants: vec![Variant {
                name: "canary".into(),
                version: 2,
                share: Share::from_percent(share).unwrap(),
            }],
            split: Split::User {
                entity: "user_id".into(),
            },
            salt: "deployment-1".into(),
            shadow: None,
        }
    }

    fn router() -> Router {
        Router::new(Arc::new(Metrics::new()))
    }

    /// A request naming user `id`.
    fn user<'a>(id: &'a str) -> impl FnOnce(&str) -> Option<Cow<'a, str>> + 'a {
        move |entity: &str| {
            assert_eq!(entity, "user_id");
            Some(Cow::Borrowed(id))
        }
    }

    #[test]
    fn a_user_keeps_the_canary_as_its_share_grows() {
        let router = router();
        let users: Vec<String> = (0..5_000).map(|i| format!("u{i}")).collect();
        let mut on_canary = std::collections::BTreeSet::new();
        let mut previous = 0;
        for share in [5.0, 20.0, 50.0, 100.0] {
            router.set("m", canary(share)).unwrap();
            let now: std::collections::BTreeSet<&String> = users
                .iter()
                .filter(|u| router.route("m", user(u)).unwrap().version == 2)
                .collect();
            assert!(
                on_canary.iter().all(|u| now.contains(u)),
                "a user left the canary at {share}%"
            );
            let expected = share / 100.0 * users.len() as f64;
            assert!(
                (now.len() as f64 - expected).abs() < 0.03 * users.len() as f64 + 1.0,
                "{} of {} users on the canary at {share}%",
                now.len(),
                users.len()
            );
            assert!(now.len() >= previous);
            previous = now.len();
            on_canary = now;
        }
        assert_eq!(previous, users.len());
    }

    #[test]
    fn the_same_user_gets_the_same_variant_every_time() {
        let router = router();
        router.set("m", canary(30.0)).unwrap();
        for i in 0..200 {
            let id = format!("u{i}");
            let first = router.route("m", user(&id)).unwrap();
            for _ in 0..5 {
                let again = router.route("m", user(&id)).unwrap();
                assert_eq!(
                    (again.version, again.variant()),
                    (first.version, first.variant())
                );
            }
            let name = if first.version == 2 {
                "canary"
            } else {
                CONTROL
            };
            assert_eq!(first.variant(), name);
        }
    }

    #[test]
    fn buckets_are_fixed_by_the_salt_and_the_id() {
        // SHA-256 of "s\0u1", first 8 bytes scaled to 10,000 buckets: fixed by the specification,
        // so a user's bucket never changes with the build or the server.
        let digest = Sha256::digest(b"s\0u1");
        let word = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(
            user_bucket("s", "u1"),
            ((word as u128 * 10_000) >> 64) as u32
        );
        assert_ne!(
            (0..100)
                .map(|i| user_bucket("a", &format!("u{i}")))
                .collect::<Vec<_>>(),
            (0..100)
                .map(|i| user_bucket("b", &format!("u{i}")))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn requests_without_the_entity_go_to_the_control() {
        let router = router();
        router.set("m", canary(100.0)).unwrap();
        let route = router.route("m", |_| None).unwrap();
        assert_eq!((route.version, route.variant()), (1, CONTROL));
        assert!(router.route("other", user("u1")).is_none());
    }

    #[test]
    fn a_request_split_takes_its_share_exactly() {
        let router = router();
        let mut policy = canary(25.0);
        policy.split = Split::Request;
        router.set("m", policy).unwrap();
        let canary = (0..10_000)
            .filter(|_| router.route("m", |_| None).unwrap().version == 2)
            .count();
        assert!((2_490..=2_510).contains(&canary), "{canary} of 10,000");
    }

    #[test]
    fn the_shadow_sees_its_share() {
        let router = router();
        let mut policy = canary(0.0);
        policy.shadow = Some(Shadow {
            version: 3,
            share: Share::from_percent(10.0).unwrap(),
        });
        router.set("m", policy).unwrap();
        let routes: Vec<Route> = (0..5_000)
            .map(|i| router.route("m", user(&format!("u{i}"))).unwrap())
            .collect();
        assert!(routes.iter().all(|r| r.version == 1));
        let mirrored = routes.iter().filter(|r| r.shadow == Some(3)).count();
        assert!((490..=510).contains(&mirrored), "{mirrored} of 5,000");
    }

    #[test]
    fn shadow_places_run_out_and_come_back() {
        let router = router();
        let held: Vec<ShadowSlot> = (0..SHADOW_IN_FLIGHT)
            .map(|_| router.shadow_slot("m").unwrap())
            .collect();
        assert!(router.shadow_slot("m").is_none());
        drop(held);
        assert!(router.shadow_slot("m").is_some());
    }

    #[test]
    fn outcomes_find_their_answer_until_it_is_forgotten() {
        let router = router();
        let mut policy = canary(50.0);
        policy.shadow = Some(Shadow {
            version: 3,
            share: Share::ALL,
        });
        router.set("m", policy).unwrap();
        let route = router.route("m", user("u1")).unwrap();
        let finish = |route: &Route, id: &str| {
            let answer = AnswerSummary {
                prediction_id: id,
                value: Some(1.0),
                label: None,
            };
            router.finished(route, Outcome::Success, Duration::from_millis(1), &[answer]);
        };
        let ids: Vec<String> = (0..REMEMBERED_PREDICTIONS + 10)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        finish(&route, &ids[0]);
        assert!(matches!(
            router.feedback(&ids[0], 0.5),
            Feedback::Counted { version, .. } if version == route.version
        ));
        assert_eq!(router.feedback(&ids[0], 0.5), Feedback::AlreadyCounted);
        // A mirrored answer is never fed back: nobody saw it.
        let shadow = uuid::Uuid::new_v4().to_string();
        finish(&route.mirrored().unwrap(), &shadow);
        assert_eq!(router.feedback(&shadow, 0.5), Feedback::Unknown);
        assert_eq!(router.feedback("not-an-id", 0.5), Feedback::Unknown);
        let upper = ids[0].to_uppercase();
        assert_eq!(
            router.feedback(&upper, 0.5),
            Feedback::Unknown,
            "not the id given out"
        );
        // The ring keeps the last answers: the first ten have been overwritten.
        ids[1..].iter().for_each(|id| finish(&route, id));
        assert_eq!(router.feedback(&ids[9], 0.5), Feedback::Unknown);
        let recent = router.recent.lock().unwrap();
        assert_eq!(
            recent.by_id.len(),
            REMEMBERED_PREDICTIONS,
            "evicted ids leave the map"
        );
        assert_eq!(recent.ring.len(), REMEMBERED_PREDICTIONS);
        drop(recent);
        assert!(matches!(
            router.feedback(&ids[10], 0.5),
            Feedback::Counted { .. }
        ));
        let windows = router.windows("m");
        let window = &windows[route.variant()];
        assert_eq!(window.outcomes.count(), 2);
        assert_eq!(window.requests, ids.len() as u64);
        assert_eq!(windows[SHADOW].requests, 1);
    }

    #[test]
    fn bad_policies_are_refused() {
        let router = router();
        let mut two = canary(60.0);
        two.variants.push(Variant {
            name: "b".into(),
            version: 3,
            share: Share::from_percent(50.0).unwrap(),
        });
        assert_eq!(
            router.set("m", two),
            Err(TrafficError::Oversubscribed(110.0))
        );
        let mut control = canary(10.0);
        control.variants[0].name = CONTROL.into();
        assert!(matches!(
            router.set("m", control),
            Err(TrafficError::ReservedName(_))
        ));
        let mut same = canary(10.0);
        same.variants[0].version = 1;
        assert!(matches!(
            router.set("m", same),
            Err(TrafficError::ControlAsVariant { .. })
        ));
        assert!(Share::from_percent(100.5).is_err());
        assert!(Share::from_percent(-1.0).is_err());
        assert!(router.policy("m").is_none());
    }

    proptest! {
        /// Whatever the shares, every bucket has one owner, the shares are the owners' bucket
        /// counts, and growing the first variant's share never moves a user off it.
        #[test]
        fn shares_own_their_buckets(a in 0u32..=5_000, b in 0u32..=5_000, grow in 0u32..=5_000) {
            let policy = |first: u32| Policy {
                control: 1,
                variants: vec![
                    Variant { name: "a".into(), version: 2, share: Share(first) },
                    Variant { name: "b".into(), version: 3, share: Share(b) },
                ],
                split: Split::Request,
                salt: String::new(),
                shadow: None,
            };
            let before = policy(a);
            let after = policy((a + grow).min(BUCKETS - b));
            let name = |policy: &Policy, bucket| {
                policy.owner(bucket).map_or(CONTROL.to_string(), |i| policy.variants[i].name.clone())
            };
            let mut counts = BTreeMap::new();
            for bucket in 0..BUCKETS {
                *counts.entry(name(&before, bucket)).or_insert(0u32) += 1;
                if name(&before, bucket) == "a" {
                    prop_assert_eq!(name(&after, bucket), "a");
                }
            }
            prop_assert_eq!(counts.get("a").copied().unwrap_or(0), a);
            prop_assert_eq!(counts.get("b").copied().unwrap_or(0), b);
            prop_assert_eq!(counts.get(CONTROL).copied().unwrap_or(0), BUCKETS - a - b);
        }
    }
}
