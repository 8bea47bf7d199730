//! Training jobs: the data the hosted models learn from, and (next) the jobs that build
//! point-in-time training sets from it, fit, evaluate through the serving backend, gate on metrics
//! and register. Today this crate generates the movie-ticket platform's world (`data`) and writes
//! it to the offline store with its feature definitions (`marquee data generate`).

pub mod cli;
pub mod data;

/// What a training job can fail with; each maps to an exit code (`exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The command line was wrong (an option's value, a missing argument).
    #[error("{0}")]
    Invalid(String),
    /// Writing the output failed (the location, the store, encoding).
    #[error("cannot write the output: {0}")]
    Output(String),
}

impl TrainingError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainingError::Invalid(_) => 2,
            TrainingError::Output(_) => 1,
        }
    }
}
