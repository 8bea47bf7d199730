//! The set of loaded models: loads them from the model source, swaps them in and out, and
//! resolves `(name, version or alias)` for every request.
//!
//! A (re)load plans the versions to serve, builds and warms up the ones not already loaded (a
//! version number never changes content, so loaded ones are reused), then swaps the whole model at
//! once; requests holding an old version finish on it. From the registry, a version that fails
//! (bad file, checksum mismatch, failing warm-up) is refused and reported while the others serve,
//! and the previous production version stays loaded for rollback until production moves again.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use marquee_feature_store::Definitions;
use marquee_proto::ModelConfig;

use crate::backend::Backends;
use crate::error::ServingError;
use crate::infer::parse_version;
use crate::metrics::Metrics;
use crate::model::spec::{self, ModelDefaults};
use crate::model::{LoadedModel, PipelineState};
use crate::predict::ModelPipeline;
use crate::predict::pipeline::{self, Pipeline};
use crate::source::{ModelSource, PlannedVersion, load_failed};

/// What the repository index reports for a model or version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    /// `None` for a model that was never loaded.
    pub state: Option<IndexState>,
    pub reason: Option<String>,
}

/// A model's or version's state in the repository index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Ready,
    Unavailable,
}

impl IndexState {
    /// Triton's name for the state, as both transports report it.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Ready => "READY",
            IndexState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// Who asks for a load: an operator loads whatever the state; the registry poll never reloads
/// a model an operator unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requester {
    Operator,
    Poll,
}

/// A model being served.
#[derive(Clone, Default)]
struct Served {
    versions: BTreeMap<u64, Arc<LoadedModel>>,
    aliases: BTreeMap<String, u64>,
    /// The version for requests that name none; `None`: the highest.
    default: Option<u64>,
    /// The previous production version, kept loaded for rollback.
    rollback: Option<u64>,
    /// Versions the source asked for that could not be loaded, with the reason.
    refused: BTreeMap<u64, String>,
    /// The source's references revision this state was built from.
    revision: u64,
}

enum ModelState {
    Ready(Served),
    /// Loading failed, for this reason; the server is not ready.
    Failed(String),
    /// Unloaded on request; does not count against readiness, and polling leaves it unloaded.
    Unloaded,
}

/// Told the versions of a model that stopped being served (a reload left them out, or the model
/// was unloaded), so what is kept per version elsewhere (the drift monitor's state) goes too.
pub type RetiredVersions = Box<dyn Fn(&str, &[u64]) + Send + Sync>;

/// Owns every loaded model version.
pub struct ModelManager {
    source: ModelSource,
    backends: Arc<Backends>,
    defaults: ModelDefaults,
    metrics: Arc<Metrics>,
    /// Feature definitions that `/v1/predict` pipelines are checked against at load.
    features: Arc<Definitions>,
    models: RwLock<BTreeMap<String, ModelState>>,
    /// One lock per model: loads and unloads of a model run one at a time, so two reloads of it
    /// cannot interleave, while a slow load of one model (download, warm-up) holds up no other.
    changes: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    retired: std::sync::RwLock<Vec<RetiredVersions>>,
}

impl ModelManager {
    pub fn new(
        source: ModelSource,
        backends: Backends,
        defaults: ModelDefaults,
        metrics: Arc<Metrics>,
        features: Arc<Definitions>,
    ) -> Self {
        Self {
            source,
            backends: Arc::new(backends),
            defaults,
            metrics,
            features,
            models: RwLock::new(BTreeMap::new()),
            changes: std::sync::Mutex::new(BTreeMap::new()),
            retired: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// Calls `listener` with the versions of a model each time some stop being served (inside
    /// the model's change lock; a listener must not call back into the manager's `on_retired`).
    pub fn on_retired(&self, listener: RetiredVersions) {
        self.retired
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn retire(&self, name: &str, versions: &[u64]) {
        if versions.is_empty() {
            return;
        }
        tracing::debug!(model = name, ?versions, "versions retired");
        for listener in self
            .retired
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            listener(name, versions);
        }
    }

    /// Loads every model of the source; failures are recorded, logged and returned.
    pub async fn load_all(&self) -> Result<Vec<(String, ServingError)>, ServingError> {
        let mut failures = Vec::new();
        for name in self.source.names().await? {
            match self.load(&name, None).await {
                Ok(()) => {}
                // A registry model with nothing aliased or pinned is simply not served.
                Err(ServingError::NotFound(_)) if self.source.is_registry() => {}
                Err(e) => failures.push((name, e)),
            }
        }
        Ok(failures)
    }

    /// The lock that serialises changes to one model.
    fn change_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a model's lock once no change holds or waits for it, so names that were only ever
    /// asked for (a load of a model that does not exist) leave nothing behind.
    fn release_change_lock(&self, name: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        // Two holders: the table and `lock`; anyone else waiting holds a third.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(name);
        }
    }

    /// Picks up what changed in the source since the last look: new models, and models whose
    /// references moved. Cheap when nothing changed (one listing per model). A model whose
    /// references cannot be read is skipped this round (and named in the error); the others are
    /// still looked at.
    pub async fn refresh(&self) -> Result<(), ServingError> {
        let mut unreadable = Vec::new();
        for name in self.source.names().await? {
            let revision = match self.models.read().expect("model table lock").get(&name) {
                Some(ModelState::Ready(served)) => Some(served.revision),
                Some(ModelState::Unloaded) => continue,
                _ => None,
            };
            let changed = match revision {
                Some(revision) => match self.source.changed_since(&name, revision).await {
                    Ok(changed) => changed,
                    Err(e) => {
                        unreadable.push(format!("{name}: {e}"));
                        continue;
                    }
                },
                None => true,
            };
            if changed {
                match self.load_for(&name, None, Requester::Poll).await {
                    Ok(()) | Err(ServingError::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(model = name, error = %e, "refresh could not load the model")
                    }
                }
            }
        }
        if unreadable.is_empty() {
            Ok(())
        } else {
            Err(ServingError::Unavailable(format!(
                "cannot read the references of {}",
                unreadable.join("; ")
            )))
        }
    }

    /// Loads (or reloads) a model: every version the source plans. On failure the versions
    /// already serving keep serving.
    pub async fn load(
        &self,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<(), ServingError> {
        self.load_for(name, config_override, Requester::Operator)
            .await
    }

    async fn load_for(
        &self,
        name: &str,
        config_override: Option<ModelConfig>,
        requester: Requester,
    ) -> Result<(), ServingError> {
        let lock = self.change_lock(name);
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.load_locked(name, config_override, requester).await
        };
        self.release_change_lock(name, lock);
        result
    }

    async fn load_locked(
        &self,
        name: &str,
        config_override: Option<ModelConfig>,
        requester: Requester,
    ) -> Result<(), ServingError> {
        let current = match self.models.read().expect("model table lock").get(name) {
            Some(ModelState::Ready(served)) => Some(served.clone()),
            // Unloaded between the poll's look and now: polling leaves it unloaded.
            Some(ModelState::Unloaded) if requester == Requester::Poll => return Ok(()),
            _ => None,
        };
        match self
            .build(name, current.as_ref(), config_override.as_ref())
            .await
        {
            Ok(served) => {
                let versions: Vec<u64> = served.versions.keys().copied().collect();
                for (version, reason) in &served.refused {
                    tracing::error!(model = name, version, %reason, "version refused; the others keep serving");
                }
                tracing::info!(model = name, ?versions, default = ?served.default, "model loaded");
                let retired: Vec<u64> = current
                    .iter()
                    .flat_map(|c| c.versions.keys())
                    .filter(|v| !served.versions.contains_key(v))
                    .copied()
                    .collect();
                self.models
                    .write()
                    .expect("model table lock")
                    .insert(name.to_string(), ModelState::Ready(served));
                self.retire(name, &retired);
                Ok(())
            }
            Err(e) => {
                if !matches!(e, ServingError::NotFound(_)) || current.is_some() {
                    tracing::error!(model = name, error = %e, "model failed to load");
                }
                if current.is_none() && !matches!(e, ServingError::NotFound(_)) {
                    self.models
                        .write()
                        .expect("model table lock")
                        .insert(name.to_string(), ModelState::Failed(e.to_string()));
                }
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        name: &str,
        current: Option<&Served>,
        config_override: Option<&ModelConfig>,
    ) -> Result<Served, ServingError> {
        let previous_production = current.and_then(|c| c.aliases.get("production").copied());
        let keep: Vec<u64> = previous_production
            .into_iter()
            .chain(current.and_then(|c| c.rollback))
            .collect();
        let plan = self.source.plan(name, &keep, config_override).await?;
        let new_production = plan.aliases.get("production").copied();
        let rollback = if previous_production.is_some() && previous_production != new_production {
            previous_production
        } else {
            current
                .and_then(|c| c.rollback)
                .filter(|r| Some(*r) != new_production)
        };
        let wanted = |v: u64| {
            plan.aliases.values().any(|a| *a == v)
                || Some(v) == rollback
                || !self.source.is_registry()
        };
        let mut served = Served {
            aliases: plan.aliases.clone(),
            rollback,
            revision: plan.revision,
            ..Default::default()
        };
        for planned in plan
            .versions
            .iter()
            .filter(|p| wanted(p.version) || p.pinned)
        {
            let reuse = config_override
                .is_none()
                .then(|| current.and_then(|c| c.versions.get(&planned.version).cloned()))
                .flatten();
            let loaded = match reuse {
                Some(model) => Ok(model),
                None => self.build_version(name, planned).await.map(Arc::new),
            };
            match loaded {
                Ok(model) => {
                    served.versions.insert(planned.version, model);
                }
                Err(e) if self.source.is_registry() => {
                    served.refused.insert(planned.version, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        if served.versions.is_empty() {
            let reasons: Vec<String> = served.refused.values().cloned().collect();
            return Err(load_failed(
                name,
                format!("no version could be loaded: {}", reasons.join("; ")),
            ));
        }
        served.default = plan
            .default
            .filter(|v| served.versions.contains_key(v))
            .or_else(|| {
                current
                    .and_then(|c| c.default)
                    .filter(|v| served.versions.contains_key(v))
            });
        Ok(served)
    }

    /// Fetches, builds and warms up one version.
    async fn build_version(
        &self,
        name: &str,
        planned: &PlannedVersion,
    ) -> Result<LoadedModel, ServingError> {
        let bytes = self.source.artifact(name, planned).await?;
        let backends = self.backends.clone();
        let defaults = self.defaults.clone();
        let metrics = self.metrics.for_model(name, planned.version);
        let config = planned.config.clone();
        let signature = planned.signature.clone();
        let model_name = name.to_string();
        let version = planned.version;
        let model = tokio::task::spawn_blocking(move || {
            let failed = |e: String| load_failed(&model_name, format!("version {version}: {e}"));
            let platform = spec::platform(&config).map_err(failed)?;
            let backend = backends.get(platform).map_err(|e| failed(e.to_string()))?;
            let sessions = spec::session_configs(&model_name, &config, &defaults)
                .map_err(failed)?
                .iter()
                .map(|session| backend.session(&bytes, session))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failed(e.to_string()))?;
            // The artifact's own signature, else the registry manifest's, else the declared one.
            let signature = match sessions[0].signature().or(signature) {
                Some(signature) => signature,
                None => spec::declared_signature(&config).map_err(failed)?,
            };
            let (spec, warnings) = spec::build_spec(
                &model_name,
                version,
                config,
                &signature.0,
                &signature.1,
                &defaults,
            )
            .map_err(failed)?;
            for warning in warnings {
                tracing::warn!(model = model_name, version, "{warning}");
            }
            LoadedModel::start(spec, &signature, sessions, metrics)
        })
        .await
        .map_err(|e| ServingError::Internal(format!("model loading task failed: {e}")))??;
        let model = if planned.pipeline.is_null() {
            model
        } else {
            // A pipeline that cannot run costs the model its /v1/predict, not its /v2 serving.
            let mut assets = std::collections::HashMap::new();
            let mut missing = None;
            for file in pipeline::asset_names(&planned.pipeline) {
                match self.source.file(name, planned, &file).await {
                    Ok(bytes) => {
                        assets.insert(file, bytes);
                    }
                    Err(e) => missing = Some(format!("file '{file}': {e}")),
                }
            }
            let parsed = match missing {
                Some(reason) => Err(reason),
                None => {
                    // Parsing builds what steps need (tokenizers, item graphs): CPU work, off
                    // the async runtime, so a hot load never stalls requests.
                    let (declared, spec, features) = (
                        planned.pipeline.clone(),
                        model.spec().clone(),
                        self.features.clone(),
                    );
                    tokio::task::spawn_blocking(move || {
                        Pipeline::parse(&declared, &spec, &features, &assets)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("parsing the pipeline failed: {e}")))
                }
            };
            let pipeline = match parsed {
                Ok(pipeline) => PipelineState::Ready(Box::new(ModelPipeline::new(
                    pipeline,
                    planned.drift_baseline.clone(),
                ))),
                Err(reason) => {
                    tracing::error!(model = name, version, %reason, "/v1/predict pipeline refused; /v2 serves on");
                    PipelineState::Unusable(reason)
                }
            };
            model.with_pipeline(pipeline)
        };
        if let Err(e) = model.warm_up().await {
            // With every dimension known, a model that cannot answer zeros cannot serve. With free
            // dimensions the warm-up's shape (1 where free) is a guess the model may refuse.
            if !model.spec().has_free_dims() {
                return Err(load_failed(
                    name,
                    format!("version {version} failed its warm-up: {e}"),
                ));
            }
            tracing::warn!(model = name, version, error = %e, "warm-up with free dimensions set to 1 failed; serving anyway");
        }
        Ok(model)
    }

    /// Unloads a model; requests in flight finish on it.
    pub async fn unload(&self, name: &str) -> Result<(), ServingError> {
        let lock = self.change_lock(name);
        let result = {
            let _one_at_a_time = lock.lock().await;
            let unloaded = {
                let mut models = self.models.write().expect("model table lock");
                match models.get(name) {
                    Some(ModelState::Ready(served)) => {
                        let versions: Vec<u64> = served.versions.keys().copied().collect();
                        models.insert(name.to_string(), ModelState::Unloaded);
                        tracing::info!(model = name, "model unloaded");
                        Ok(versions)
                    }
                    _ => Err(ServingError::NotFound(format!(
                        "model '{name}' is not loaded"
                    ))),
                }
            };
            // Inside the change lock, as a reload's: a load queued behind this unload cannot
            // finish first and then lose its versions' state to a late retirement.
            self.retire(name, unloaded.as_deref().unwrap_or_default());
            unloaded
        };
        self.release_change_lock(name, lock);
        result.map(|_| ())
    }

    /// The version `reference` names: a number, an alias, or nothing (the model's default:
    /// production from the registry, else the highest version).
    pub fn get(&self, name: &str, reference: &str) -> Result<Arc<LoadedModel>, ServingError> {
        let models = self.models.read().expect("model table lock");
        let served = match models.get(name) {
            Some(ModelState::Ready(served)) => served,
            Some(ModelState::Failed(reason)) => {
                return Err(ServingError::Unavailable(format!(
                    "model '{name}' is not available: {reason}"
                )));
            }
            Some(ModelState::Unloaded) => {
                return Err(ServingError::Unavailable(format!(
                    "model '{name}' is not available: unloaded"
                )));
            }
            None => {
                return Err(ServingError::NotFound(format!(
                    "model '{name}' is not found"
                )));
            }
        };
        let version = if reference.is_empty() {
            served
                .default
                .or_else(|| served.versions.keys().next_back().copied())
        } else if let Some(&version) = served.aliases.get(reference) {
            Some(version)
        } else if self.source.is_registry() && reference.parse::<u64>().is_err() {
            return Err(ServingError::NotFound(format!(
                "model '{name}' has no alias '{reference}' (aliases: {})",
                served
                    .aliases
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        } else {
            parse_version(reference)?
        };
        version
            .and_then(|v| served.versions.get(&v))
            .cloned()
            .ok_or_else(|| {
                let have: Vec<String> = served.versions.keys().map(u64::to_string).collect();
                ServingError::NotFound(format!(
                    "model '{name}' version {reference} is not found (ready versions: {})",
                    have.join(", ")
                ))
            })
    }

    /// The registry this manager follows, if it follows one.
    pub fn registry(&self) -> Option<&marquee_registry::Registry> {
        self.source.registry()
    }

    /// Why a version of a model was refused at its last load, if it was.
    pub fn refused(&self, name: &str, version: u64) -> Option<String> {
        match self.models.read().expect("model table lock").get(name) {
            Some(ModelState::Ready(served)) => served.refused.get(&version).cloned(),
            Some(ModelState::Failed(reason)) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Ready versions of a model, ascending.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        match self.models.read().expect("model table lock").get(name) {
            Some(ModelState::Ready(served)) => served.versions.keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// Every ready model version.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        self.models
            .read()
            .expect("model table lock")
            .values()
            .filter_map(|state| match state {
                ModelState::Ready(served) => Some(served.versions.values().cloned()),
                ModelState::Failed(_) | ModelState::Unloaded => None,
            })
            .flatten()
            .collect()
    }

    /// True when no model has failed to load (Triton's strict readiness); unloaded models do
    /// not count against readiness.
    pub fn all_ready(&self) -> bool {
        self.models
            .read()
            .expect("model table lock")
            .values()
            .all(|s| match s {
                ModelState::Ready(_) | ModelState::Unloaded => true,
                ModelState::Failed(_) => false,
            })
    }

    /// The repository index: every model of the source with the state of its versions.
    pub async fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, ServingError> {
        let names = self.source.names().await?;
        let models = self.models.read().expect("model table lock");
        let mut entries = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(ModelState::Ready(served)) => {
                    entries.extend(served.versions.keys().map(|&v| IndexEntry {
                        name: name.clone(),
                        version: Some(v),
                        state: Some(IndexState::Ready),
                        reason: None,
                    }));
                    if !ready_only {
                        entries.extend(served.refused.iter().map(|(&v, reason)| IndexEntry {
                            name: name.clone(),
                            version: Some(v),
                            state: Some(IndexState::Unavailable),
                            reason: Some(reason.clone()),
                        }));
                    }
                }
                Some(ModelState::Failed(reason)) if !ready_only => entries.push(IndexEntry {
                    name,
                    version: None,
                    state: Some(IndexState::Unavailable),
                    reason: Some(reason.clone()),
                }),
                Some(ModelState::Unloaded) if !ready_only => entries.push(IndexEntry {
                    name,
                    version: None,
                    state: Some(IndexState::Unavailable),
                    reason: Some("unloaded".into()),
                }),
                None if !ready_only => entries.push(IndexEntry {
                    name,
                    version: None,
                    state: None,
                    reason: None,
                }),
                _ => {}
            }
        }
        Ok(entries)
    }
}
