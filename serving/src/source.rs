//! Where the model manager gets its models: a plain Triton model repository, or the Marquee
//! registry. Both answer the same two questions: which versions of a model to serve (with their
//! configurations), and the bytes of one version's artifact.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use marquee_proto::ModelConfig;
use marquee_registry::{ModelRepository, Registry, RegistryError};

use crate::backend::{GraphTensor, Platform, Signature};
use crate::error::ServingError;
use crate::model::spec;

/// A model source.
pub enum ModelSource {
    /// A Triton repository folder, served as it is (`--model-repository`).
    Repository(ModelRepository),
    /// The registry (`--registry`): what the aliases point at, plus pinned versions.
    Registry {
        registry: Registry,
        /// Versions to serve whatever the aliases say, by model.
        pinned: BTreeMap<String, BTreeSet<u64>>,
    },
}

/// What to serve of one model.
pub struct Plan {
    pub versions: Vec<PlannedVersion>,
    /// Alias -> version (registry only).
    pub aliases: BTreeMap<String, u64>,
    /// The version for requests that name none; `None`: the highest loaded.
    pub default: Option<u64>,
    /// The references revision the plan was made from (registry only; 0 otherwise).
    pub revision: u64,
}

/// One version to serve.
pub struct PlannedVersion {
    pub version: u64,
    pub config: ModelConfig,
    /// Served because it is pinned, whatever the aliases say.
    pub pinned: bool,
    /// The `/v1/predict` pipeline declared with the version (`Null`: none).
    pub pipeline: serde_json::Value,
    /// Inputs and outputs from the registry manifest, for artifacts that carry no signature of
    /// their own (TorchScript); `None` for Triton repositories and ONNX versions.
    pub signature: Option<Signature>,
    /// The manifest's `drift_baseline` (`Null` for Triton repositories and versions without).
    pub drift_baseline: serde_json::Value,
}

impl ModelSource {
    pub fn is_registry(&self) -> bool {
        matches!(self, ModelSource::Registry { .. })
    }

    pub fn registry(&self) -> Option<&Registry> {
        match self {
            ModelSource::Registry { registry, .. } => Some(registry),
            ModelSource::Repository(_) => None,
        }
    }

    /// Names of the models the source holds.
    pub async fn names(&self) -> Result<Vec<String>, ServingError> {
        match self {
            ModelSource::Repository(repository) => repository.model_names().await,
            ModelSource::Registry { registry, .. } => registry.models().await,
        }
        .map_err(|e| self.error(e))
    }

    /// The versions of `name` to serve. `keep` are versions serving wants to keep (the previous
    /// production version, for rollback); `config_override` replaces every version's
    /// configuration (Triton's load API).
    pub async fn plan(
        &self,
        name: &str,
        keep: &[u64],
        config_override: Option<&ModelConfig>,
    ) -> Result<Plan, ServingError> {
        match self {
            ModelSource::Repository(repository) => {
                let source = repository.model(name).await.map_err(|e| self.error(e))?;
                let config = config_override
                    .cloned()
                    .or(source.config)
                    .unwrap_or_default();
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
                Ok(Plan {
                    versions: versions
                        .into_iter()
                        .map(|version| PlannedVersion {
                            version,
                            config: config.clone(),
                            pinned: false,
                            pipeline: source.pipeline.clone().unwrap_or_default(),
                            signature: None,
                            drift_baseline: serde_json::Value::Null,
                        })
                        .collect(),
                    aliases: BTreeMap::new(),
                    default: None,
                    revision: 0,
                })
            }
            ModelSource::Registry { registry, pinned } => {
                let refs = registry.refs(name).await.map_err(|e| self.error(e))?;
                let mut wanted: BTreeSet<u64> = refs.aliases.values().copied().collect();
                wanted.extend(pinned.get(name).into_iter().flatten());
                wanted.extend(keep);
                wanted.retain(|v| !refs.archived.contains(v));
                if wanted.is_empty() {
                    return Err(ServingError::NotFound(format!(
                        "model '{name}' has no alias and no pinned version in the registry; promote or alias a version to serve it"
                    )));
                }
                let mut versions = Vec::with_capacity(wanted.len());
                for version in wanted {
                    let manifest = registry
                        .manifest(name, version)
                        .await
                        .map_err(|e| self.error(e))?;
                    let config = match config_override {
                        Some(config) => config.clone(),
                        None if manifest.config.is_null() => ModelConfig::default(),
                        None => marquee_proto::parse_config_json(&manifest.config.to_string())
                            .map_err(|e| {
                                load_failed(
                                    name,
                                    format!("version {version}: manifest config: {e}"),
                                )
                            })?,
                    };
                    let (config, signature) = registry_version(&manifest, config)
                        .map_err(|e| load_failed(name, format!("version {version}: {e}")))?;
                    let pinned = pinned.get(name).is_some_and(|p| p.contains(&version));
                    versions.push(PlannedVersion {
                        version,
                        config,
                        pinned,
                        pipeline: manifest.pipeline,
                        signature,
                        drift_baseline: manifest.drift_baseline,
                    });
                }
                Ok(Plan {
                    versions,
                    default: refs.aliases.get("production").copied(),
                    aliases: refs.aliases,
                    revision: refs.revision,
                })
            }
        }
    }

    /// The artifact of one version; from the registry, checked against its manifest's sha256.
    pub async fn artifact(
        &self,
        name: &str,
        planned: &PlannedVersion,
    ) -> Result<Bytes, ServingError> {
        self.file(name, planned, spec::model_filename(&planned.config))
            .await
    }

    /// One file of a version (the artifact, or one its pipeline names); from the registry,
    /// checked against its manifest's sha256.
    pub async fn file(
        &self,
        name: &str,
        planned: &PlannedVersion,
        filename: &str,
    ) -> Result<Bytes, ServingError> {
        match self {
            ModelSource::Repository(repository) => repository
                .artifact(name, planned.version, filename)
                .await
                .map_err(|e| self.error(e)),
            ModelSource::Registry { registry, .. } => {
                let manifest = registry
                    .manifest(name, planned.version)
                    .await
                    .map_err(|e| self.error(e))?;
                let entry = manifest
                    .files
                    .iter()
                    .find(|f| f.path == filename)
                    .ok_or_else(|| {
                        load_failed(
                            name,
                            format!("version {} has no file '{filename}'", planned.version),
                        )
                    })?;
                registry
                    .file(&manifest, entry)
                    .await
                    .map_err(|e| self.error(e))
            }
        }
    }

    /// Whether the model's references changed after `revision` (always false for a repository,
    /// whose changes are picked up by an explicit load).
    pub async fn changed_since(&self, name: &str, revision: u64) -> Result<bool, ServingError> {
        match self {
            ModelSource::Repository(_) => Ok(false),
            ModelSource::Registry { registry, .. } => Ok(registry
                .refs_after(name, revision)
                .await
                .map_err(|e| self.error(e))?
                .is_some()),
        }
    }
}

pub fn load_failed(name: &str, reason: impl std::fmt::Display) -> ServingError {
    ServingError::LoadFailed(format!("failed to load model '{name}': {reason}"))
}

impl ModelSource {
    /// A store error as the serving error a client or the log should see.
    fn error(&self, error: RegistryError) -> ServingError {
        let place = match self {
            ModelSource::Repository(_) => "the model repository",
            ModelSource::Registry { .. } => "the registry",
        };
        match error {
            RegistryError::ModelNotFound(name) => {
                ServingError::NotFound(format!("model '{name}' is not in {place}"))
            }
            e @ RegistryError::VersionNotFound { .. } => ServingError::NotFound(e.to_string()),
            e @ (RegistryError::InvalidConfig { .. }
            | RegistryError::ArtifactMissing { .. }
            | RegistryError::Corrupt(_)) => ServingError::LoadFailed(e.to_string()),
            e => ServingError::Internal(e.to_string()),
        }
    }
}

/// What a registry version's manifest adds to its serving configuration: the platform its
/// framework implies (a TorchScript version needs no `platform` in its configuration, but one
/// that names another is refused), and for TorchScript, which carries no signature of its own,
/// the manifest's signature when it has one.
fn registry_version(
    manifest: &marquee_registry::Manifest,
    mut config: ModelConfig,
) -> Result<(ModelConfig, Option<Signature>), String> {
    let framework = Platform::of_framework(&manifest.framework).ok_or_else(|| {
        format!(
            "the manifest's framework '{}' is not served (onnx or torchscript)",
            manifest.framework
        )
    })?;
    if framework == Platform::Torch && config.platform.is_empty() && config.backend.is_empty() {
        config.platform = Platform::Torch.platform_name().to_string();
    }
    let configured = spec::platform(&config)?;
    if configured != framework {
        return Err(format!(
            "the manifest says {} but the serving configuration names platform '{}' / backend '{}'",
            manifest.framework, config.platform, config.backend
        ));
    }
    let declared = &manifest.signature;
    let signature = (framework == Platform::Torch
        && !(declared.inputs.is_empty() && declared.outputs.is_empty()))
    .then(|| manifest_signature(declared))
    .transpose()
    .map_err(|e| format!("manifest signature: {e}"))?;
    Ok((config, signature))
}

/// A manifest's signature as the backend would report it (types by their KServe names).
fn manifest_signature(signature: &marquee_registry::onnx::Signature) -> Result<Signature, String> {
    let tensors = |list: &[marquee_registry::onnx::TensorSignature]| {
        list.iter()
            .map(|t| {
                let dtype = crate::tensor::DataType::from_name(&t.datatype).ok_or_else(|| {
                    format!(
                        "tensor '{}' has an unknown datatype '{}'",
                        t.name, t.datatype
                    )
                })?;
                Ok(GraphTensor {
                    name: t.name.clone(),
                    dtype: Some(dtype),
                    shape: t.shape.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok((tensors(&signature.inputs)?, tensors(&signature.outputs)?))
}
