//! The feature store: entity and feature-view definitions (TOML, validated), and the online
//! stores serving reads them from on the request path (Redis in production, in-process by
//! default). Offline sources, materialisation and point-in-time training sets build on the same
//! definitions.

pub mod definitions;
pub mod memory;
pub mod online;
pub mod redis_store;
pub mod value;

pub use definitions::{Definitions, Entity, Feature, FeatureView, OfflineSource};
pub use memory::MemoryStore;
pub use online::{FoundRow, Lookup, OnlineRow, OnlineStore, entity_key};
pub use redis_store::{RedisConfig, RedisStore};
pub use value::{DType, FeatureValue};

/// What can go wrong in the feature store; callers decide whether to degrade or fail.
#[derive(Debug, thiserror::Error)]
pub enum FeatureStoreError {
    #[error("feature definitions: {0}")]
    Definitions(String),
    #[error("feature view '{0}' is not defined")]
    UnknownView(String),
    /// The online store did not answer (down, unreachable, or slower than its timeout).
    #[error("online store unavailable: {0}")]
    Unavailable(String),
    /// The online store holds something the definitions cannot read.
    #[error("online store holds a bad value: {0}")]
    Corrupt(String),
}
