//! What `distill inspect` reports about a shard set: the manifest, per-shard counts,
//! bytes per token per column, and sample rows with the teacher's top-k decoded to text.
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

use super::manifest::Manifest;
use super::reader::ShardSet;
use super::row::ShardRow;
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
    /// Ids drawn from the tail, most drawn first: (id, text, times drawn); empty when
    /// the set holds no draws.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drawn: Vec<(u32, Option<String>, u8)>,
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
        .column_bytes()
        .into_iter()
        .map(|(column, bytes)| ColumnBytes { column, bytes, bytes_per_token: bytes as f64 / tokens.max(1) as f64 })
        .collect();
    let mut samples = vec![];
    for &rg in set.row_groups() {
        if samples.len() >= opts.sample_rows {
            break;
        }
        for row in set.decode(rg)?.into_iter().take(opts.sample_rows - samples.len()) {
            samples.push(sample(&row, tokenizer, opts)?);
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

fn sample(row: &ShardRow, tok: Option<&TextTokenizer>, opts: &InspectOptions) -> Result<SampleRow> {
    let text_of = |ids: &[u32]| -> Result<Option<String>> { tok.map(|t| t.decode(ids, false)).transpose() };
    let (seq, topk) = (&row.sequence, &row.topk);
    let mut targets = vec![];
    let mut draws = topk.draws.as_ref().map(|d| d.per_position());
    let trained = (1..seq.len()).filter(|&t| seq.loss_mask[t]);
    for ((i, t), (top_ids, top_lps)) in trained.enumerate().zip(topk.per_position()).take(opts.sample_targets) {
        let id = seq.ids[t];
        let top = top_ids
            .iter()
            .zip(top_lps)
            .take(opts.show_top)
            .map(|(&tid, lp)| Ok((tid, text_of(&[tid])?, lp.to_f64().exp())))
            .collect::<Result<_>>()?;
        let mut drawn: Vec<(u32, u8)> = match draws.as_mut().and_then(Iterator::next) {
            Some((ids, counts)) => ids.iter().copied().zip(counts.iter().copied()).collect(),
            None => vec![],
        };
        drawn.sort_by_key(|&(id, count)| (std::cmp::Reverse(count), id));
        let drawn = drawn
            .into_iter()
            .take(opts.show_top)
            .map(|(id, count)| Ok((id, text_of(&[id])?, count)))
            .collect::<Result<_>>()?;
        targets.push(SampleTarget {
            position: t,
            token_id: id,
            token: text_of(&[id])?,
            probability: f64::from(topk.target_logprob[i]).exp(),
            top,
            tail: f64::from(topk.tail_logmass[i]).exp(),
            drawn,
        });
    }
    Ok(SampleRow { row_index: seq.row_index, sample_ids: seq.sample_ids.clone(), text: text_of(&seq.ids)?, targets })
}
