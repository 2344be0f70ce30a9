//! Stage two: training the student against the shards. `config` says what to do,
//! `trainer` runs setup and the loop: batches (from `batch`) -> `step` (student, losses,
//! backward) -> AdamW (`optim`, `moments`, `schedule`) -> `checkpoint`, in a `run_dir` it
//! owns; `extras` holds the cross-tokenizer and hidden-state parts, `log` what a step
//! reports (metrics.jsonl, TensorBoard, the loss `plot`); bf16 `autocast` and
//! hidden-state projections (`hidden`) serve the step.
pub mod autocast;
mod batches;
pub mod checkpoint;
pub mod config;
mod extras;
pub mod hidden;
pub mod log;
pub mod moments;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod run_dir;
pub mod schedule;
mod step;
pub mod tensorboard;
pub mod trainer;

pub use config::{CrossTokenizerSettings, HiddenSettings, ParallelSettings, Precision, TrainConfig};
pub use log::StepLog;
pub use trainer::train;
