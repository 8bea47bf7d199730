//! The feature store: entity and feature-view definitions, online lookups for serving and
//! point-in-time-correct training sets. Planned in issue 4; nothing is implemented yet, so this
//! crate holds no code.
