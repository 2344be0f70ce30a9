//! distill: offline knowledge distillation of language models with cached teacher logits.
//!
//! Data flows one way: dataset -> tokens -> teacher -> captured targets -> shards ->
//! reader -> batches -> student -> losses -> optimizer -> checkpoint. Each module owns
//! one step (docs/layout.md names the owner of each); configuration is passed
//! down as typed structs. Imports point one way: `precompute`, `train`, `eval` ->
//! `batch`, `shards`, `align`, `distributed` -> `model`, `losses`, `dataset`, `tokenizer`,
//! `chat`, `files`.
pub mod align;
pub mod batch;
pub mod chat;
pub mod dataset;
pub mod distributed;
pub mod eval;
pub mod files;
pub mod generate;
pub mod losses;
pub mod model;
pub mod precompute;
pub mod runtime;
pub mod shards;
pub mod student;
pub mod tokenizer;
pub mod train;
