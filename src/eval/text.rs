//! Scoring text with a model: per-example count of target tokens, mean negative
//! log-likelihood and perplexity, and their token-weighted total. Examples are batched
//! by length (little padding) through the shared batch builder, and the head runs over
//! the trained positions only, in chunks (`model::logits`), so `[batch, seq, vocab]`
//! float32 logits never exist at once. Given a teacher with the same tokenizer, the same
//! pass also measures the KL from the teacher over the whole vocabulary (not the cached
//! top-k buckets): the teacher runs on the same batch and its logits come chunk by chunk
//! beside the model's.
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

/// Sums over the scored tokens of one example: NLL, and against a teacher the
/// full-vocabulary forward KL `sum_v p_teacher(v) (log p_teacher(v) - log p_model(v))`
/// and the count of positions where both models' most likely token agree (0 without one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenSums {
    pub tokens: usize,
    pub nll: f64,
    /// The teacher's NLL of the same tokens (0 without a teacher).
    pub teacher_nll: f64,
    pub kl: f64,
    pub agree: f64,
}

/// The tokenizer of `model_dir`, refused (naming both files) when it has ids beyond the
/// model's vocabulary. Cheap: call it before loading the weights.
pub fn check_tokenizer_fits(model_dir: &Path) -> Result<TextTokenizer> {
    let tokenizer = TextTokenizer::from_dir(model_dir)?;
    tokenizer.check_fits(&ModelConfig::from_dir(model_dir)?, &config_path_of(model_dir))?;
    Ok(tokenizer)
}

/// Scores the examples of `inputs` (files, directories, globs) with the tokenizer and chat
/// template of `model_dir`: each example's id and sums (KL and agreement against
/// `teacher`, which reads the same token ids).
pub fn score_inputs(
    model_dir: &Path,
    model: &CausalLm,
    teacher: Option<&CausalLm>,
    inputs: &[String],
    fields: &FieldNames,
    opts: &ScoreOptions,
) -> Result<(Vec<String>, Vec<TokenSums>)> {
    let tokenizer = check_tokenizer_fits(model_dir)?;
    let template = ChatTemplate::load(model_dir)?;
    let (records, _) = read_records(&resolve_inputs(inputs)?, fields, false)?;
    let seqs = records
        .iter()
        .map(|r| r.example.tokenize(&tokenizer, template.as_ref()).with_context(|| r.location.clone()))
        .collect::<Result<Vec<_>>>()?;
    for (r, s) in records.iter().zip(&seqs) {
        let n = if opts.max_len > 0 { s.ids.len().min(opts.max_len) } else { s.ids.len() };
        for m in std::iter::once(model).chain(teacher) {
            m.config.check_length(n).with_context(|| format!("{}: cut it with --max-len", r.location))?;
        }
    }
    let sums = score_sequences_against(model, teacher, &seqs, opts)?;
    Ok((records.into_iter().map(|r| r.id).collect(), sums))
}

/// Held-out text in one figure: target tokens, cross-entropy per token and perplexity;
/// against a teacher also the mean full-vocabulary KL from it and the top-1 agreement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TextMetrics {
    pub tokens: usize,
    pub cross_entropy: f64,
    pub perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_to_teacher: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// `score_inputs` summed over every example.
pub fn text_metrics(
    model_dir: &Path,
    model: &CausalLm,
    teacher: Option<&CausalLm>,
    inputs: &[String],
    fields: &FieldNames,
    opts: &ScoreOptions,
) -> Result<TextMetrics> {
    let (_, sums) = score_inputs(model_dir, model, teacher, inputs, fields, opts)?;
    let tokens: usize = sums.iter().map(|s| s.tokens).sum();
    if tokens == 0 {
        anyhow::bail!("{inputs:?}: no token to score (every example is masked or one token long)");
    }
    let mean = |f: fn(&TokenSums) -> f64| sums.iter().map(f).sum::<f64>() / tokens as f64;
    let cross_entropy = mean(|s| s.nll);
    Ok(TextMetrics {
        tokens,
        cross_entropy,
        perplexity: cross_entropy.exp(),
        kl_to_teacher: teacher.map(|_| mean(|s| s.kl)),
        top1_agreement: teacher.map(|_| mean(|s| s.agree)),
    })
}

/// (scored tokens, summed NLL) of each sequence, in input order.
pub fn score_sequences(model: &CausalLm, seqs: &[MaskedTokens], opts: &ScoreOptions) -> Result<Vec<TokenNll>> {
    Ok(score_sequences_against(model, None, seqs, opts)?.iter().map(|s| (s.tokens, s.nll)).collect())
}

/// The sums of each sequence, in input order; KL and agreement against `teacher`, which
/// must read the same token ids (same tokenizer, same vocabulary size).
pub fn score_sequences_against(
    model: &CausalLm,
    teacher: Option<&CausalLm>,
    seqs: &[MaskedTokens],
    opts: &ScoreOptions,
) -> Result<Vec<TokenSums>> {
    if let Some(t) = teacher {
        if t.config.vocab_size != model.config.vocab_size {
            anyhow::bail!(
                "the teacher has {} logits per position and the model {}: the full-vocabulary KL needs the same vocabulary",
                t.config.vocab_size,
                model.config.vocab_size
            );
        }
    }
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
                sampler_logprobs: None,
            }
        })
        .collect();
    let chunk = opts
        .head_chunk
        .unwrap_or_else(|| chunk_positions(model.config.vocab_size, default_logits_budget(model.output_device())));
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    let mut out = vec![TokenSums::default(); rows.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = rows[order[start]].len().max(1);
        let fit = (opts.max_batch_tokens / longest).max(1);
        let batch: Vec<&Sequence> = order[start..(start + fit).min(order.len())].iter().map(|&i| &rows[i]).collect();
        for (row, result) in batch.iter().zip(score_batch(model, teacher, &batch, chunk)?) {
            out[row.row_index as usize] = result;
        }
        start += batch.len();
    }
    Ok(out)
}

/// The sums of each row of one batch. Token 0 of a row is never a target: nothing
/// before it predicts it.
fn score_batch(model: &CausalLm, teacher: Option<&CausalLm>, rows: &[&Sequence], chunk: i64) -> Result<Vec<TokenSums>> {
    let _guard = tch::no_grad_guard();
    let trained_states = |m: &CausalLm| -> Result<(PaddedBatch, Tensor)> {
        let batch = PaddedBatch::new(rows, m.device());
        let hidden = m.transformer.forward_hidden(&batch.input(), &[])?.last;
        let width = hidden.size()[2];
        let h = hidden.reshape([-1, width]).index_select(0, &batch.predicting.to_device(hidden.device()));
        Ok((batch, h))
    };
    let (batch, h) = trained_states(model)?;
    let teacher_h = teacher.map(|t| trained_states(t).map(|(_, h)| (t, h))).transpose()?;
    let next = batch.next_tokens.to_device(h.device());
    let (mut nll, mut teacher_nll, mut kl, mut agree) = (vec![], vec![], vec![], vec![]);
    model.transformer.logits_in_chunks(&h, chunk, |logits, r| {
        let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let labels = next.narrow(0, r.start, r.end - r.start).unsqueeze(-1);
        let picked = logp.gather(-1, &labels, false);
        nll.push(-picked.squeeze_dim(-1).to_kind(Kind::Double));
        if let Some((t, th)) = &teacher_h {
            let teacher_logits = t.transformer.logits(&th.narrow(0, r.start, r.end - r.start));
            let logq = teacher_logits.to_device(logp.device()).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
            kl.push((logq.exp() * (&logq - &logp)).sum_dim_intlist(-1, false, Kind::Double));
            teacher_nll.push(-logq.gather(-1, &labels, false).squeeze_dim(-1).to_kind(Kind::Double));
            agree.push(logq.argmax(-1, false).eq_tensor(&logp.argmax(-1, false)).to_kind(Kind::Double));
        }
        Ok(())
    })?;
    let host = |parts: Vec<Tensor>| -> Result<Vec<f64>> {
        Ok(if parts.is_empty() { vec![] } else { Vec::<f64>::try_from(Tensor::cat(&parts, 0).to_device(Device::Cpu))? })
    };
    let (nll, teacher_nll, kl, agree) = (host(nll)?, host(teacher_nll)?, host(kl)?, host(agree)?);
    let sum = |v: &[f64], range: std::ops::Range<usize>| if v.is_empty() { 0.0 } else { v[range].iter().sum() };
    let mut sums = Vec::with_capacity(rows.len());
    let mut offset = 0;
    for &count in &batch.targets_per_row {
        let range = offset..offset + count;
        sums.push(TokenSums {
            tokens: count,
            nll: sum(&nll, range.clone()),
            teacher_nll: sum(&teacher_nll, range.clone()),
            kl: sum(&kl, range.clone()),
            agree: sum(&agree, range),
        });
        offset += count;
    }
    Ok(sums)
}

/// Combines per-sequence sums into rows, and a token-weighted total row; refused when
/// no token was scored or a sum is not finite (a model whose logits are NaN), naming the
/// first example at fault.
pub fn rows(ids: &[String], sums: &[TokenSums]) -> Result<(Vec<ScoreRow>, ScoreRow)> {
    let row = |id: String, tokens: usize, sum: f64| {
        let nll = if tokens > 0 { sum / tokens as f64 } else { f64::NAN };
        ScoreRow { id, tokens, nll, ppl: nll.exp() }
    };
    if let Some((id, s)) = ids.iter().zip(sums).find(|(_, s)| !s.nll.is_finite()) {
        anyhow::bail!("example {id}: the model's NLL is {} (its logits are not finite)", s.nll);
    }
    let per: Vec<ScoreRow> = ids.iter().zip(sums).map(|(id, s)| row(id.clone(), s.tokens, s.nll)).collect();
    let tokens = sums.iter().map(|x| x.tokens).sum();
    if tokens == 0 {
        anyhow::bail!("no token to score: each of the {} examples is masked or one token long", ids.len());
    }
    let total = sums.iter().map(|x| x.nll).sum();
    Ok((per, row("ALL".into(), tokens, total)))
}
