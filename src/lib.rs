//! distill: offline knowledge distillation of language models with cached teacher logits.
//!
//! Data flows one way: dataset -> tokens -> teacher -> captured targets -> shards ->
//! reader -> batches -> student -> losses -> optimizer -> checkpoint. Each module owns
//! one step; configuration is passed down as typed structs.
pub mod batch;
pub mod capture;
pub mod chat;
pub mod dataset;
pub mod losses;
pub mod model;
pub mod precompute;
pub mod runtime;
pub mod score;
pub mod shards;
pub mod student;
pub mod tokenizer;
pub mod train;
