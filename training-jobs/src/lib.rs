//! Training jobs: build point-in-time training sets, fit, evaluate through the serving backend,
//! gate on metrics and register. Planned; nothing is implemented yet, so this crate holds no code.
