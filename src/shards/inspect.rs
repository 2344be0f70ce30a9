//! What `distill inspect` reports about a shard set: the manifest, per-shard counts,
//! bytes per token per column, and sample rows with the teacher's top-k decoded to text.
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

use super::manifest::Manifest;
use super::reader::{ShardSet, TargetRow};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub manifest: Manifest,
    pub rows: usize,
    pub tokens: usize,
    pub targets: usize,
    pub bytes: u64,
    pub columns: Vec<ColumnBytes>,
    pub samples: Vec<SampleRow>,
}

#[derive(Debug, Serialize)]
pub struct ColumnBytes {
    pub column: String,
    pub bytes: u64,
    pub bytes_per_token: f64,
}

#[derive(Debug, Serialize)]
pub struct SampleRow {
    pub row_index: u64,
    pub sample_ids: Vec<String>,
    /// The row's text (`None` without a tokenizer).
    pub text: Option<String>,
    pub targets: Vec<SampleTarget>,
}

/// One trained position: the token that follows and the teacher's view of it.
#[derive(Debug, Serialize)]
pub struct SampleTarget {
    pub position: usize,
    pub token_id: u32,
    pub token: Option<String>,
    /// The teacher's probability of the actual next token.
    pub probability: f64,
    /// The teacher's most likely next tokens, best first: (id, text, probability).
    pub top: Vec<(u32, Option<String>, f64)>,
    /// Probability mass outside the stored top-k.
    pub tail: f64,
}

pub struct InspectOptions {
    pub sample_rows: usize,
    pub sample_targets: usize,
    pub show_top: usize,
}

pub fn inspect(dir: &Path, tokenizer: Option<&TextTokenizer>, opts: &InspectOptions) -> Result<ShardReport> {
    let set = ShardSet::open(dir, true)?;
    let m = &set.manifest;
    let tokens = m.total_tokens();
    let columns = set
        .column_bytes()?
        .into_iter()
        .map(|(column, bytes)| ColumnBytes { column, bytes, bytes_per_token: bytes as f64 / tokens.max(1) as f64 })
        .collect();
    let mut samples = vec![];
    for &rg in set.row_groups() {
        if samples.len() >= opts.sample_rows {
            break;
        }
        for row in set.decode(rg)?.into_iter().take(opts.sample_rows - samples.len()) {
            samples.push(sample(&row, tokenizer, opts, m.settings.capture.top_k)?);
        }
    }
    Ok(ShardReport {
        rows: m.shards.iter().map(|s| s.rows).sum(),
        tokens,
        targets: m.shards.iter().map(|s| s.targets).sum(),
        bytes: m.shards.iter().map(|s| s.bytes).sum(),
        manifest: m.clone(),
        columns,
        samples,
    })
}

fn sample(row: &TargetRow, tok: Option<&TextTokenizer>, opts: &InspectOptions, k: usize) -> Result<SampleRow> {
    let text_of = |ids: &[u32]| -> Result<Option<String>> { tok.map(|t| t.decode(ids, false)).transpose() };
    let mut targets = vec![];
    let trained = (1..row.input_ids.len()).filter(|&t| row.loss_mask[t]);
    for (i, t) in trained.enumerate().take(opts.sample_targets) {
        let id = row.input_ids[t];
        let top = (0..k.min(opts.show_top))
            .map(|j| {
                let tid = row.topk_ids[i * k + j];
                Ok((tid, text_of(&[tid])?, (row.topk_logprobs[i * k + j].to_f64()).exp()))
            })
            .collect::<Result<_>>()?;
        targets.push(SampleTarget {
            position: t,
            token_id: id,
            token: text_of(&[id])?,
            probability: f64::from(row.target_logprob[i]).exp(),
            top,
            tail: f64::from(row.tail_logmass[i]).exp(),
        });
    }
    Ok(SampleRow {
        row_index: row.row_index,
        sample_ids: row.sample_ids.clone(),
        text: text_of(&row.input_ids)?,
        targets,
    })
}
