//! Scoring text with a model: per-example count of target tokens, mean negative
//! log-likelihood and perplexity. Examples are batched by length (little padding) and
//! the head is applied in chunks of positions so full `[batch, seq, vocab]` float32
//! logits never exist at once.
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::chat::ChatTemplate;
use crate::dataset::read::{read_records, resolve_inputs};
use crate::dataset::FieldNames;
use crate::model::{config_path_of, CausalLm, ForwardInput, ModelConfig};
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
    /// Upper bound on elements of one float32 logits chunk.
    pub max_logit_elements: i64,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions { max_batch_tokens: 8192, max_len: 0, max_logit_elements: 32 << 20 }
    }
}

/// Sum of negative log-likelihood and count of targets for each sequence, in input order.
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

pub fn score_sequences(model: &CausalLm, seqs: &[MaskedTokens], opts: &ScoreOptions) -> Result<Vec<(usize, f64)>> {
    let _guard = tch::no_grad_guard();
    let lens: Vec<usize> =
        seqs.iter().map(|s| if opts.max_len > 0 { s.ids.len().min(opts.max_len) } else { s.ids.len() }).collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut out = vec![(0usize, 0f64); seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = lens[order[start]].max(1);
        let fit = (opts.max_batch_tokens / longest).max(1);
        let batch = &order[start..(start + fit).min(order.len())];
        for (&i, result) in batch.iter().zip(score_batch(model, seqs, &lens, batch, longest, opts)?) {
            out[i] = result;
        }
        start += batch.len();
    }
    Ok(out)
}

fn score_batch(
    model: &CausalLm,
    seqs: &[MaskedTokens],
    lens: &[usize],
    batch: &[usize],
    width: usize,
    opts: &ScoreOptions,
) -> Result<Vec<(usize, f64)>> {
    let b = batch.len();
    let mut ids = vec![0i64; b * width];
    let mut attn = vec![0i64; b * width];
    let mut target = vec![0f32; b * width];
    for (row, &i) in batch.iter().enumerate() {
        for t in 0..lens[i] {
            ids[row * width + t] = seqs[i].ids[t] as i64;
            attn[row * width + t] = 1;
            // Token 0 is never a target: nothing before it predicts it.
            target[row * width + t] = f32::from(t > 0 && seqs[i].loss_mask[t]);
        }
    }
    let device = model.device();
    let shape = [b as i64, width as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let attn = Tensor::from_slice(&attn).view(shape).to_device(device);
    let target = Tensor::from_slice(&target).view(shape).to_device(device);
    let hidden = model.transformer.forward_hidden(&ForwardInput::new(&ids, Some(&attn)), &[])?.last;
    let nll = target_nll(model, &hidden, &ids, &target, opts.max_logit_elements);
    let sums = Vec::<f64>::try_from(nll.to_device(Device::Cpu))?;
    let counts = Vec::<f64>::try_from(target.sum_dim_intlist(1, false, Kind::Double).to_device(Device::Cpu))?;
    Ok(counts.into_iter().zip(sums).map(|(c, s)| (c as usize, s)).collect())
}

/// Per-row sum over positions of `-log p(ids[t] | ids[..t]) * target[t]`, in float64,
/// with the head applied `chunk` positions at a time.
pub fn target_nll(model: &CausalLm, hidden: &Tensor, ids: &Tensor, target: &Tensor, max_logit_elements: i64) -> Tensor {
    let (b, s, _) = hidden.size3().expect("[batch, seq, hidden]");
    let vocab = model.config.vocab_size as i64;
    let chunk = (max_logit_elements / (b * vocab)).clamp(1, s.max(1));
    let mut total = Tensor::zeros([b], (Kind::Double, hidden.device()));
    // Position t-1 predicts token t: hidden[:, :-1] against ids[:, 1:].
    let mut pos = 0;
    while pos < s - 1 {
        let n = chunk.min(s - 1 - pos);
        let logits = model.transformer.logits(&hidden.narrow(1, pos, n)).to_kind(Kind::Float);
        let logp = logits.log_softmax(-1, Kind::Float);
        let next = ids.narrow(1, pos + 1, n).unsqueeze(-1);
        let picked = logp.gather(-1, &next, false).squeeze_dim(-1);
        let weight = target.narrow(1, pos + 1, n);
        total -= (picked * weight).to_kind(Kind::Double).sum_dim_intlist(1, false, Kind::Double);
        pos += n;
    }
    total
}

/// Combines per-sequence sums into rows, and a token-weighted total row.
pub fn rows(ids: &[String], sums: &[(usize, f64)]) -> (Vec<ScoreRow>, ScoreRow) {
    let row = |id: String, tokens: usize, sum: f64| {
        let nll = if tokens > 0 { sum / tokens as f64 } else { f64::NAN };
        ScoreRow { id, tokens, nll, ppl: nll.exp() }
    };
    let per: Vec<ScoreRow> = ids.iter().zip(sums).map(|(id, &(n, s))| row(id.clone(), n, s)).collect();
    let tokens = sums.iter().map(|x| x.0).sum();
    let total = sums.iter().map(|x| x.1).sum();
    (per, row("ALL".into(), tokens, total))
}
