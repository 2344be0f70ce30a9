//! Scoring text with a model: per-example count of target tokens, mean negative
//! log-likelihood and perplexity, and their token-weighted total. Examples are batched
//! by length (little padding) through the shared batch builder, and the head runs over
//! the trained positions only, in chunks (`model::logits`), so `[batch, seq, vocab]`
//! float32 logits never exist at once.
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::batch::PaddedBatch;
use crate::chat::ChatTemplate;
use crate::dataset::read::{read_records, resolve_inputs};
use crate::dataset::sequence::Sequence;
use crate::dataset::FieldNames;
use crate::model::logits::{chunk_positions, default_logits_budget};
use crate::model::{config_path_of, CausalLm, ModelConfig};
use crate::tokenizer::{MaskedTokens, TextTokenizer};

#[derive(Debug, Clone, Serialize)]
pub struct ScoreRow {
    pub id: String,
    /// Number of target tokens scored (masked tokens and the first token excluded).
    pub tokens: usize,
    /// Mean negative log-likelihood per target token, in nats.
    pub nll: f64,
    pub ppl: f64,
}

#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Upper bound on `batch * padded_length` per forward pass.
    pub max_batch_tokens: usize,
    /// Sequences are cut to this many tokens (0: no limit).
    pub max_len: usize,
    /// Positions per head chunk (`None`: `model::logits`' policy for the device).
    pub head_chunk: Option<i64>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions { max_batch_tokens: 8192, max_len: 0, head_chunk: None }
    }
}

/// Scored tokens and their summed negative log-likelihood, of one example.
pub type TokenNll = (usize, f64);

/// The tokenizer of `model_dir`, refused (naming both files) when it has ids beyond the
/// model's vocabulary. Cheap: call it before loading the weights.
pub fn check_tokenizer_fits(model_dir: &Path) -> Result<TextTokenizer> {
    let tokenizer = TextTokenizer::from_dir(model_dir)?;
    tokenizer.check_fits(&ModelConfig::from_dir(model_dir)?, &config_path_of(model_dir))?;
    Ok(tokenizer)
}

/// Scores the examples of `inputs` (files, directories, globs) with the tokenizer and chat
/// template of `model_dir`: each example's id and (scored tokens, summed NLL).
pub fn score_inputs(
    model_dir: &Path,
    model: &CausalLm,
    inputs: &[String],
    fields: &FieldNames,
    opts: &ScoreOptions,
) -> Result<(Vec<String>, Vec<TokenNll>)> {
    let tokenizer = check_tokenizer_fits(model_dir)?;
    let template = ChatTemplate::load(model_dir)?;
    let (records, _) = read_records(&resolve_inputs(inputs)?, fields, false)?;
    let seqs = records
        .iter()
        .map(|r| r.example.tokenize(&tokenizer, template.as_ref()).with_context(|| r.location.clone()))
        .collect::<Result<Vec<_>>>()?;
    let sums = score_sequences(model, &seqs, opts)?;
    Ok((records.into_iter().map(|r| r.id).collect(), sums))
}

/// Held-out text in one figure: target tokens, cross-entropy per token and perplexity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TextMetrics {
    pub tokens: usize,
    pub cross_entropy: f64,
    pub perplexity: f64,
}

/// `score_inputs` summed over every example (its `ALL` row).
pub fn text_metrics(
    model_dir: &Path,
    model: &CausalLm,
    inputs: &[String],
    fields: &FieldNames,
    opts: &ScoreOptions,
) -> Result<TextMetrics> {
    let (ids, sums) = score_inputs(model_dir, model, inputs, fields, opts)?;
    let (_, total) = rows(&ids, &sums);
    if total.tokens == 0 {
        anyhow::bail!("{inputs:?}: no token to score (every example is masked or one token long)");
    }
    Ok(TextMetrics { tokens: total.tokens, cross_entropy: total.nll, perplexity: total.ppl })
}

/// (scored tokens, summed NLL) of each sequence, in input order.
pub fn score_sequences(model: &CausalLm, seqs: &[MaskedTokens], opts: &ScoreOptions) -> Result<Vec<TokenNll>> {
    let rows: Vec<Sequence> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = if opts.max_len > 0 { s.ids.len().min(opts.max_len) } else { s.ids.len() };
            Sequence {
                row_index: i as u64,
                sample_ids: vec![],
                doc_lengths: vec![n as u32],
                ids: s.ids[..n].to_vec(),
                loss_mask: s.loss_mask[..n].to_vec(),
            }
        })
        .collect();
    let chunk = opts
        .head_chunk
        .unwrap_or_else(|| chunk_positions(model.config.vocab_size, default_logits_budget(model.output_device())));
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    let mut out = vec![(0usize, 0f64); rows.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = rows[order[start]].len().max(1);
        let fit = (opts.max_batch_tokens / longest).max(1);
        let batch: Vec<&Sequence> = order[start..(start + fit).min(order.len())].iter().map(|&i| &rows[i]).collect();
        for (row, result) in batch.iter().zip(score_batch(model, &batch, chunk)?) {
            out[row.row_index as usize] = result;
        }
        start += batch.len();
    }
    Ok(out)
}

/// (targets, summed NLL) of each row of one batch. Token 0 of a row is never a target:
/// nothing before it predicts it.
fn score_batch(model: &CausalLm, rows: &[&Sequence], chunk: i64) -> Result<Vec<TokenNll>> {
    let _guard = tch::no_grad_guard();
    let batch = PaddedBatch::new(rows, model.device());
    let hidden = model.transformer.forward_hidden(&batch.input(), &[])?.last;
    let width = hidden.size()[2];
    let h = hidden.reshape([-1, width]).index_select(0, &batch.predicting.to_device(hidden.device()));
    let next = batch.next_tokens.to_device(hidden.device());
    let mut nll = vec![];
    model.transformer.logits_in_chunks(&h, chunk, |logits, r| {
        let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let picked = logp.gather(-1, &next.narrow(0, r.start, r.end - r.start).unsqueeze(-1), false);
        nll.push(-picked.squeeze_dim(-1).to_kind(Kind::Double));
        Ok(())
    })?;
    let nll = if nll.is_empty() { vec![] } else { Vec::<f64>::try_from(Tensor::cat(&nll, 0).to_device(Device::Cpu))? };
    let mut sums = Vec::with_capacity(rows.len());
    let mut offset = 0;
    for &count in &batch.targets_per_row {
        sums.push((count, nll[offset..offset + count].iter().sum()));
        offset += count;
    }
    Ok(sums)
}

/// Combines per-sequence sums into rows, and a token-weighted total row.
pub fn rows(ids: &[String], sums: &[TokenNll]) -> (Vec<ScoreRow>, ScoreRow) {
    let row = |id: String, tokens: usize, sum: f64| {
        let nll = if tokens > 0 { sum / tokens as f64 } else { f64::NAN };
        ScoreRow { id, tokens, nll, ppl: nll.exp() }
    };
    let per: Vec<ScoreRow> = ids.iter().zip(sums).map(|(id, &(n, s))| row(id.clone(), n, s)).collect();
    let tokens = sums.iter().map(|x| x.0).sum();
    let total = sums.iter().map(|x| x.1).sum();
    (per, row("ALL".into(), tokens, total))
}
