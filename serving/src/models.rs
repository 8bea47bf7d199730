//! The set of loaded models: loads them from the repository, swaps them in and out, and resolves
//! `(name, version)` for every request. A reload builds the new versions first and swaps the
//! whole model at once; requests already holding the old version finish on it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use marquee_proto::ModelConfig;
use marquee_registry::{ModelRepository, RegistryError};

use crate::backend::onnx::OnnxRuntime;
use crate::error::ServingError;
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::model::spec::{self, ModelDefaults};

/// What the repository index reports for a model or version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    /// `READY` or `UNAVAILABLE`; `None` for a model that was never loaded.
    pub state: Option<&'static str>,
    pub reason: Option<String>,
}

enum ModelState {
    Ready(BTreeMap<u64, Arc<LoadedModel>>),
    Unavailable(String),
}

/// Owns every loaded model version.
pub struct ModelManager {
    repository: ModelRepository,
    runtime: OnnxRuntime,
    defaults: ModelDefaults,
    metrics: Arc<Metrics>,
    models: RwLock<BTreeMap<String, ModelState>>,
    /// Loads and unloads run one at a time, so two reloads of a model cannot interleave.
    changes: tokio::sync::Mutex<()>,
}

impl ModelManager {
    pub fn new(
        repository: ModelRepository,
        runtime: OnnxRuntime,
        defaults: ModelDefaults,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            repository,
            runtime,
            defaults,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads every model in the repository; failures are recorded, logged and returned.
    pub async fn load_all(&self) -> Result<Vec<(String, ServingError)>, ServingError> {
        let names = self
            .repository
            .model_names()
            .await
            .map_err(registry_error)?;
        let mut failures = Vec::new();
        for name in names {
            if let Err(e) = self.load(&name, None).await {
                failures.push((name, e));
            }
        }
        Ok(failures)
    }

    /// Loads (or reloads) a model: every version its policy selects. On failure the previous
    /// versions, if any, keep serving.
    pub async fn load(
        &self,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<(), ServingError> {
        let _one_at_a_time = self.changes.lock().await;
        match self.build(name, config_override).await {
            Ok(versions) => {
                let numbers: Vec<u64> = versions.keys().copied().collect();
                self.models
                    .write()
                    .expect("model table lock")
                    .insert(name.to_string(), ModelState::Ready(versions));
                tracing::info!(model = name, versions = ?numbers, "model loaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "model failed to load");
                let mut models = self.models.write().expect("model table lock");
                if !matches!(models.get(name), Some(ModelState::Ready(_))) {
                    models.insert(name.to_string(), ModelState::Unavailable(e.to_string()));
                }
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<BTreeMap<u64, Arc<LoadedModel>>, ServingError> {
        let source = self.repository.model(name).await.map_err(registry_error)?;
        let config = config_override.or(source.config).unwrap_or_default();
        spec::check_config(name, &config).map_err(|e| load_failed(name, e))?;
        let versions = spec::select_versions(&config, &source.versions);
        if versions.is_empty() {
            return Err(load_failed(
                name,
                format!(
                    "no version to serve (version folders present: {:?})",
                    source.versions
                ),
            ));
        }
        let mut loaded = BTreeMap::new();
        for version in versions {
            let bytes = self
                .repository
                .artifact(name, version, spec::model_filename(&config))
                .await
                .map_err(registry_error)?;
            let runtime = self.runtime.clone();
            let defaults = self.defaults.clone();
            let metrics = self.metrics.for_model(name, version);
            let config = config.clone();
            let model_name = name.to_string();
            let model = tokio::task::spawn_blocking(move || {
                let failed = |e: String| load_failed(&model_name, e);
                let sessions = spec::session_configs(&model_name, &config, &defaults)
                    .map_err(failed)?
                    .iter()
                    .map(|session| runtime.session(&bytes, session))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| failed(e.to_string()))?;
                let (inputs, outputs) = sessions[0].signature();
                let (spec, warnings) =
                    spec::build_spec(&model_name, version, config, &inputs, &outputs, &defaults)
                        .map_err(failed)?;
                for warning in warnings {
                    tracing::warn!(model = model_name, version, "{warning}");
                }
                LoadedModel::start(spec, sessions, metrics)
            })
            .await
            .map_err(|e| ServingError::Internal(format!("model loading task failed: {e}")))??;
            loaded.insert(version, Arc::new(model));
        }
        Ok(loaded)
    }

    /// Unloads a model; requests in flight finish on it.
    pub async fn unload(&self, name: &str) -> Result<(), ServingError> {
        let _one_at_a_time = self.changes.lock().await;
        let mut models = self.models.write().expect("model table lock");
        match models.get(name) {
            Some(ModelState::Ready(_)) => {
                models.insert(name.to_string(), ModelState::Unavailable("unloaded".into()));
                tracing::info!(model = name, "model unloaded");
                Ok(())
            }
            _ => Err(ServingError::NotFound(format!(
                "model '{name}' is not loaded"
            ))),
        }
    }

    /// The version to serve for `name`: the one asked for, or the highest ready one.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>, ServingError> {
        let models = self.models.read().expect("model table lock");
        let versions = match models.get(name) {
            Some(ModelState::Ready(versions)) => versions,
            Some(ModelState::Unavailable(reason)) => {
                return Err(ServingError::Unavailable(format!(
                    "model '{name}' is not available: {reason}"
                )));
            }
            None => {
                return Err(ServingError::NotFound(format!(
                    "model '{name}' is not found"
                )));
            }
        };
        let found = match version {
            Some(v) => versions.get(&v),
            None => versions.values().next_back(),
        };
        found.cloned().ok_or_else(|| {
            let have: Vec<String> = versions.keys().map(u64::to_string).collect();
            ServingError::NotFound(format!(
                "model '{name}' version {} is not found (ready versions: {})",
                version.map(|v| v.to_string()).unwrap_or_default(),
                have.join(", ")
            ))
        })
    }

    /// Ready versions of a model, ascending.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        match self.models.read().expect("model table lock").get(name) {
            Some(ModelState::Ready(versions)) => versions.keys().copied().collect(),
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
                ModelState::Ready(versions) => Some(versions.values().cloned()),
                ModelState::Unavailable(_) => None,
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
            .all(|s| {
                matches!(s, ModelState::Ready(_))
                    || matches!(s, ModelState::Unavailable(r) if r == "unloaded")
            })
    }

    /// The repository index: every model in the repository with the state of its versions.
    pub async fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, ServingError> {
        let names = self
            .repository
            .model_names()
            .await
            .map_err(registry_error)?;
        let models = self.models.read().expect("model table lock");
        let mut entries = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(ModelState::Ready(versions)) => {
                    entries.extend(versions.keys().map(|&v| IndexEntry {
                        name: name.clone(),
                        version: Some(v),
                        state: Some("READY"),
                        reason: None,
                    }));
                }
                Some(ModelState::Unavailable(reason)) if !ready_only => entries.push(IndexEntry {
                    name,
                    version: None,
                    state: Some("UNAVAILABLE"),
                    reason: Some(reason.clone()),
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

fn load_failed(name: &str, reason: impl std::fmt::Display) -> ServingError {
    ServingError::LoadFailed(format!("failed to load model '{name}': {reason}"))
}

fn registry_error(error: RegistryError) -> ServingError {
    match error {
        RegistryError::ModelNotFound(name) => {
            ServingError::NotFound(format!("model '{name}' is not in the model repository"))
        }
        e @ (RegistryError::InvalidConfig { .. } | RegistryError::ArtifactMissing { .. }) => {
            ServingError::LoadFailed(e.to_string())
        }
        e => ServingError::Internal(e.to_string()),
    }
}
