//! Stage two: training the student against the shards:
//! rows -> batches -> student -> losses -> optimiser -> checkpoints.
pub mod autocast;
pub mod data;
pub mod eval;
pub mod feed;
pub mod hidden;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;
