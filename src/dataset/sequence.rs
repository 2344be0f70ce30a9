//! From records to the sequences a teacher sees: tokenised in parallel (in input
//! order), cut to `max_len`, optionally packed several to a row.
//!
//! Packing keeps document boundaries in two ways at once: position ids restart at 0
//! in each document and attention cannot cross a boundary (a block-diagonal causal
//! mask). Together they make every packed document's teacher outputs equal to those
//! of the same document alone, so targets never depend on what it was packed with.
use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::read::InvalidRow;
use super::{Example, Record};
use crate::chat::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// One row of teacher input. `loss_mask[t]` marks token t as a target; it is false at
/// every document start (nothing in the document predicts its first token).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Index of the row's first example among all input rows: a stable key that does
    /// not depend on slicing, skipping or packing.
    pub row_index: u64,
    pub sample_ids: Vec<String>,
    pub doc_lengths: Vec<u32>,
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// For sampled rows (on-policy rounds): the sampling model's log-probability of
    /// each trained token, one per target in token order, so a loss can weight stale
    /// samples (importance weights). `None` for fixed data.
    pub sampler_logprobs: Option<Vec<f32>>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }

    /// Position of each token within its document (restarting at 0 per document).
    pub fn position_ids(&self) -> Vec<i64> {
        self.doc_lengths.iter().flat_map(|&n| 0..n as i64).collect()
    }

    /// Trained positions (targets) of each document.
    pub fn targets_per_document(&self) -> Vec<usize> {
        let mut start = 0;
        self.doc_lengths
            .iter()
            .map(|&n| {
                let range = start..start + n as usize;
                start = range.end;
                self.loss_mask[range].iter().filter(|&&m| m).count()
            })
            .collect()
    }

    /// Index of each token's document within the row.
    pub fn segment_ids(&self) -> Vec<i64> {
        self.doc_lengths.iter().enumerate().flat_map(|(d, &n)| std::iter::repeat_n(d as i64, n as usize)).collect()
    }

    /// `other` laid after this row: its documents stay separate (their lengths are
    /// kept) and its first token is not a target, so no token predicts across the
    /// boundary. Packing at precompute and at training time both join rows this way.
    pub fn append(&mut self, other: Sequence) {
        let start = self.ids.len();
        let (mine_targets, other_targets) = (self.num_targets(), other.num_targets());
        self.sample_ids.extend(other.sample_ids);
        self.doc_lengths.extend(other.doc_lengths);
        self.ids.extend(other.ids);
        let other_first_trained = other.loss_mask.first() == Some(&true);
        self.loss_mask.extend(other.loss_mask);
        if let Some(first) = self.loss_mask.get_mut(start) {
            *first = false;
        }
        // A sampled document packed with fixed text: the fixed targets get 0 (given, not
        // sampled), as prompt tokens trained with `train_on_all_tokens` do.
        self.sampler_logprobs = match (self.sampler_logprobs.take(), other.sampler_logprobs) {
            (None, None) => None,
            (mine, theirs) => {
                let mut all = mine.unwrap_or_else(|| vec![0.0; mine_targets]);
                let theirs = theirs.unwrap_or_else(|| vec![0.0; other_targets]);
                all.extend(theirs.into_iter().skip(other_first_trained as usize));
                Some(all)
            }
        };
    }
}

#[derive(Debug, Clone)]
pub struct SequenceOptions {
    /// Longest sequence in tokens; longer examples are cut (and counted).
    pub max_len: usize,
    /// Pack several examples into rows of up to `max_len` tokens.
    pub pack: bool,
    /// Count bad examples (template rejects them, no target left) instead of failing.
    pub skip_invalid: bool,
    /// Train on every token, prompts and user turns included (default: only
    /// responses and assistant turns for prompt/response and chat examples).
    pub train_on_all_tokens: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SequenceStats {
    pub examples: usize,
    pub truncated: usize,
    pub truncated_tokens: usize,
    pub invalid: Vec<InvalidRow>,
}

/// Tokenises `records` in parallel and returns the rows in input order. `first_index`
/// is the input-wide index of `records[0]` (non-zero for a slice).
pub fn build_sequences(
    records: &[Record],
    first_index: u64,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
    opts: &SequenceOptions,
) -> Result<(Vec<Sequence>, SequenceStats)> {
    if opts.max_len < 2 {
        bail!("max_len must be at least 2 tokens");
    }
    let tokenized: Vec<Result<(Sequence, usize)>> = records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut t = r
                .example
                .tokenize_up_to(tokenizer, template, Some(opts.max_len))
                .with_context(|| r.location.clone())?;
            let cut = t.ids.len().saturating_sub(opts.max_len);
            t.ids.truncate(opts.max_len);
            t.loss_mask.truncate(opts.max_len);
            if opts.train_on_all_tokens {
                t.loss_mask.fill(true);
            }
            if let Some(first) = t.loss_mask.first_mut() {
                *first = false;
            }
            if !t.loss_mask.iter().any(|&m| m) {
                let why = if cut > 0 { " after truncation to max_len" } else { "" };
                bail!("{}: example {} has no target token{why} (every token is masked)", r.location, r.id);
            }
            let n = t.ids.len() as u32;
            // One value per trained token: the response's, after truncation and masking.
            let sampler_logprobs = match &r.example {
                Example::Tokens { prompt, logprobs: Some(lp), .. } => Some(
                    (0..t.ids.len())
                        .filter(|&p| t.loss_mask[p])
                        .map(|p| if p >= prompt.len() { lp[p - prompt.len()] } else { 0.0 })
                        .collect(),
                ),
                _ => None,
            };
            let seq = Sequence {
                row_index: first_index + i as u64,
                sample_ids: vec![r.id.clone()],
                doc_lengths: vec![n],
                ids: t.ids,
                loss_mask: t.loss_mask,
                sampler_logprobs,
            };
            Ok((seq, cut))
        })
        .collect();
    let mut stats = SequenceStats::default();
    let mut docs = Vec::with_capacity(records.len());
    for (record, result) in records.iter().zip(tokenized) {
        match result {
            Ok((seq, cut)) => {
                stats.examples += 1;
                if cut > 0 {
                    stats.truncated += 1;
                    stats.truncated_tokens += cut;
                }
                docs.push(seq);
            }
            Err(e) if opts.skip_invalid => {
                stats.invalid.push(InvalidRow { location: record.location.clone(), error: format!("{e:#}") })
            }
            Err(e) => return Err(e),
        }
    }
    if docs.is_empty() {
        bail!("no usable example in the input ({} skipped as invalid)", stats.invalid.len());
    }
    let rows = if opts.pack { pack(docs, opts.max_len) } else { docs };
    Ok((rows, stats))
}

/// Greedy packing in input order: a document joins the current row if it fits.
fn pack(docs: Vec<Sequence>, max_len: usize) -> Vec<Sequence> {
    let mut rows: Vec<Sequence> = vec![];
    for doc in docs {
        match rows.last_mut() {
            Some(row) if row.len() + doc.len() <= max_len => row.append(doc),
            _ => rows.push(doc),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, n: usize) -> Sequence {
        let mut mask = vec![true; n];
        mask[0] = false;
        Sequence {
            row_index: 0,
            sample_ids: vec![id.into()],
            doc_lengths: vec![n as u32],
            ids: vec![7; n],
            loss_mask: mask,
            sampler_logprobs: None,
        }
    }

    #[test]
    fn packing_keeps_order_and_boundaries() {
        let rows = pack(vec![doc("a", 3), doc("b", 4), doc("c", 5), doc("d", 2)], 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].sample_ids, ["a", "b"]);
        assert_eq!(rows[0].doc_lengths, [3, 4]);
        assert_eq!(rows[0].position_ids(), [0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(rows[0].segment_ids(), [0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(rows[0].loss_mask, [false, true, true, false, true, true, true]);
        assert_eq!(rows[1].sample_ids, ["c", "d"]);
    }
}
