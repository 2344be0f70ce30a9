//! Judging models on held-out data: text scoring (per-example NLL and perplexity, and
//! the total that `distill eval` reports) and shard metrics (KL to the teacher,
//! cross-entropy, top-1 agreement), both over the shared batch builder and the one
//! chunked-logits routine of `model::logits`; and generation (greedy replies judged by
//! exact match and by the teacher).
pub mod generation;
pub mod shards;
pub mod text;
