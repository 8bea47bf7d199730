//! The feature store: entity and feature-view definitions (TOML, validated), and the online
//! stores serving reads them from on the request path (Redis in production, in-process by
//! default). Offline sources, materialisation and point-in-time training sets build on the same
//! definitions.

pub mod aggregates;
pub mod cli;
pub mod definitions;
pub mod jobs;
pub mod memory;
pub mod offline;
pub mod online;
pub mod redis_store;
pub mod value;

pub use aggregates::{Aggregator, ChannelSource, Event, EventPublisher, EventSource};
pub use definitions::{Aggregate, Definitions, Entity, Feature, FeatureView, OfflineSource};
pub use memory::MemoryStore;
pub use online::{CountedEvent, FoundRow, Lookup, OnlineRow, OnlineStore, entity_key, open_online};
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
    /// An offline source or dataset file could not be read or written, or does not fit the
    /// definitions.
    #[error("offline: {0}")]
    Offline(String),
}

impl FeatureStoreError {
    /// The process exit code the CLI uses: 1 store unreachable, 2 definitions, arguments or data
    /// that do not fit them, 3 unknown view, 6 unreadable stored value.
    pub fn exit_code(&self) -> i32 {
        match self {
            FeatureStoreError::Unavailable(_) => 1,
            FeatureStoreError::Definitions(_) | FeatureStoreError::Offline(_) => 2,
            FeatureStoreError::UnknownView(_) => 3,
            FeatureStoreError::Corrupt(_) => 6,
        }
    }
}
