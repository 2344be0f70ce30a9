//! Stage two: training the student against the shards. `config` says what to do,
//! `trainer` runs setup, loop and finish: batches (from `batch`) -> student -> losses ->
//! AdamW (`optim`, `schedule`) -> `checkpoint`, in a `run_dir` it owns; bf16 `autocast`,
//! hidden-state projections (`hidden`) and the loss `plot` serve the loop.
pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod hidden;
pub mod moments;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod run_dir;
pub mod schedule;
pub mod trainer;

pub use config::{CrossTokenizerSettings, HiddenSettings, ParallelSettings, Precision, TrainConfig};
pub use trainer::{train, StepLog};
