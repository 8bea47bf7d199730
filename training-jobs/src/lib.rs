//! Training jobs: the data the hosted models learn from (`data`, `marquee data generate`), and
//! the jobs that build point-in-time training sets from it, fit through Python trainer scripts,
//! evaluate the exported artifact through the serving backend, gate on metrics against each
//! model's fallback and register (`train`, `marquee train`).

pub mod cli;
pub mod data;
pub mod metrics;
pub mod train;

/// What a training job can fail with; each maps to an exit code (`exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The command line was wrong (an option's value, a missing argument).
    #[error("{0}")]
    Invalid(String),
    /// Writing the output failed (the location, the store, encoding).
    #[error("cannot write the output: {0}")]
    Output(String),
    /// The input data is missing or not what a job needs.
    #[error("the data: {0}")]
    Data(String),
    /// A trainer script could not run or failed.
    #[error("the trainer: {0}")]
    Trainer(String),
    /// The exported artifact could not be run through the serving backend.
    #[error("evaluating the exported model: {0}")]
    Evaluation(String),
    /// The model did not beat its baseline; nothing was pushed.
    #[error("{0}")]
    Gate(String),
    /// The registry refused or failed the push.
    #[error("the registry: {0}")]
    Registry(String),
}

impl TrainingError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainingError::Output(_) | TrainingError::Registry(_) => 1,
            TrainingError::Invalid(_) | TrainingError::Data(_) => 2,
            TrainingError::Trainer(_) | TrainingError::Evaluation(_) => 3,
            TrainingError::Gate(_) => 5,
        }
    }
}
