//! Where models come from. Serving asks this crate for model names, configurations and artifact
//! bytes and never touches a filesystem or bucket itself, so a local folder, S3 and GCS are one
//! code path (`object_store`).
//!
//! Today the source is a Triton model repository (`{root}/{model}/config.pbtxt`,
//! `{root}/{model}/{version}/model.onnx`); the versioned registry with manifests and aliases
//! (DESIGN.md, issue 3) will live here too.

mod triton;

pub use triton::{ModelRepository, ModelSource};

/// Why a model or repository could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid repository location '{location}': {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("model '{0}' is not in the repository")]
    ModelNotFound(String),
    #[error("model '{model}': {reason}")]
    InvalidConfig { model: String, reason: String },
    #[error("model '{model}' version {version}: file '{file}' is missing")]
    ArtifactMissing {
        model: String,
        version: u64,
        file: String,
    },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}
