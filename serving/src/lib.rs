//! Marquee's serving core: KServe v2 over REST and gRPC in front of dynamically batched models
//! (ONNX Runtime; TorchScript through libtorch with the `torch` feature). A request reads top to bottom through:
//!
//! `http` / `grpc` (transport) → [`service::Service`] (transport-neutral; admission) →
//! [`infer::InferRequest`] → [`models::ModelManager::get`] →
//! [`model::LoadedModel::infer`] (validation) → `marquee_batcher` → the model's [`backend`] →
//! [`infer::InferResponse`] → transport. `/v1/predict` enters at [`predict::Predictor`], which
//! fetches features, encodes them and calls the same [`model::LoadedModel::infer`].
//!
//! ARCHITECTURE.md at the repository root is the map.

pub mod backend;
pub mod config;
pub mod deploy;
pub mod drift;
pub mod embeddings;
pub mod error;
pub mod experiments;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod models;
pub mod predict;
pub mod prediction_log;
pub mod server;
pub mod service;
pub mod source;
pub mod stats;
pub mod tensor;
pub mod traffic;

pub use config::ServeConfig;
pub use error::ServingError;
pub use server::{Server, StartError};
