//! Where models come from. Serving asks this crate for model names, configurations and artifact
//! bytes and never touches a filesystem or bucket itself, so a local folder, S3 and GCS are one
//! code path (`object_store`).
//!
//! Two sources: a plain Triton model repository (`triton.rs`, read-only), and the Marquee
//! registry (`registry.rs`): immutable versions with manifests (`manifest.rs`) and per-model
//! aliases and stages kept as a revision log (`refs.rs`). `cli.rs` is the `marquee registry`
//! command that data scientists use.

pub mod baseline;
pub mod cli;
pub mod deployments;
pub mod location;
pub mod manifest;
pub mod onnx;
pub mod refs;
mod registry;
mod triton;

pub use manifest::Manifest;
pub use refs::{Refs, Stage};
pub use registry::{FileCheck, Progress, PushFile, Quiet, Registry, now, sha256_hex};
pub use triton::{ModelRepository, ModelSource};

/// Why a model or repository could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid repository location '{location}': {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("model '{0}' is not found")]
    ModelNotFound(String),
    #[error("model '{model}': {reason}")]
    InvalidConfig { model: String, reason: String },
    #[error("model '{model}' version {version}: file '{file}' is missing")]
    ArtifactMissing {
        model: String,
        version: u64,
        file: String,
    },
    #[error("model '{model}' has no version or alias '{version}' (versions: {available:?})")]
    VersionNotFound {
        model: String,
        version: String,
        available: Vec<u64>,
    },
    #[error("{0}")]
    Invalid(String),
    /// Lost a race with another writer; nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// The change breaks a rule (stage order, approval, gates, archived versions).
    #[error("{0}")]
    Refused(String),
    /// Stored data does not match its manifest, or cannot be read.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

impl RegistryError {
    /// The process exit code the CLI uses, so scripts can tell failures apart.
    pub fn exit_code(&self) -> i32 {
        match self {
            RegistryError::ModelNotFound(_) | RegistryError::VersionNotFound { .. } => 3,
            RegistryError::Conflict(_) => 4,
            RegistryError::Refused(_) => 5,
            RegistryError::Corrupt(_) => 6,
            RegistryError::Invalid(_)
            | RegistryError::InvalidLocation { .. }
            | RegistryError::InvalidConfig { .. } => 2,
            RegistryError::ArtifactMissing { .. }
            | RegistryError::Io(_)
            | RegistryError::Store(_) => 1,
        }
    }
}
