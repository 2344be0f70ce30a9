//! Decoding continuations of prompts with a model (`distill generate`): prompts sorted
//! by length (longest first), a key/value cache (`model::decode`), greedy or sampled next
//! tokens, and continuous batching: a row leaves the batch as it stops and a waiting
//! prompt takes its place. Sampling is reproducible whatever the batch or device: the
//! uniform number of a prompt's n-th token comes from the same splitmix64 stream as the
//! precompute draws (`model::sampling`, keyed by the prompt and n), and the inverse CDF
//! is summed in float64.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::decode::KvCache;
use crate::model::sampling::{draw_from_logits, draw_uniforms};
use crate::model::transformer::Hidden;
use crate::model::CausalLm;

pub mod prompts;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// 0: greedy (the most likely token); else logits are divided by it.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens until their mass reaches p (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A row stops after producing one of these ids (it is kept in the output).
    pub stop_ids: Vec<u32>,
    pub sampling: SamplingOptions,
    /// Upper bound on `batch * (longest prompt + max_new_tokens)`.
    pub max_batch_tokens: usize,
    /// Upper bound on the rows of a batch.
    pub max_batch_rows: usize,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub finish: FinishReason,
}

/// Called after each new token of prompt `i` with its tokens so far: true ends the row.
pub type StopCheck<'a> = &'a dyn Fn(usize, &[u32]) -> bool;

/// What the caller watches while decoding.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Stop strings, say.
    pub stop: Option<StopCheck<'a>>,
    /// After each decoding step, the number of tokens it produced.
    pub progress: Option<&'a dyn Fn(usize)>,
    /// Sees every step's logits, tokens and chosen hidden states (capturing targets).
    pub observer: Option<Observer<'a>>,
}

/// One decoding step as an observer sees it: batch row r decodes prompt `prompts[r]`,
/// whose token number `numbers[r]` (0 = the first of the reply) is `tokens[r]`, chosen
/// from `logits[r]` (float32, the model's whole vocabulary, temperature 1).
pub struct StepView<'a> {
    pub prompts: &'a [usize],
    pub numbers: &'a [u64],
    pub logits: &'a Tensor,
    pub tokens: &'a [u32],
    /// `[rows, hidden]` per layer of `Observer::hidden_layers`, at the slot whose
    /// logits these are.
    pub hidden: &'a [Tensor],
}

#[derive(Clone, Copy)]
pub struct Observer<'a> {
    /// Hidden states to hand over, in transformers' numbering (0 = embeddings).
    pub hidden_layers: &'a [usize],
    pub on_step: &'a dyn Fn(&StepView) -> Result<()>,
}

/// The continuation of each prompt, in input order. `keys[i]` names prompt i in the
/// sampling stream (its row number in the input), so a prompt samples the same tokens
/// in any batch. A row never runs past the model's context (`max_position_embeddings`).
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    keys: &[u64],
    opts: &GenerateOptions,
    hooks: &Hooks,
) -> Result<Vec<Generated>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} has no token; a continuation needs at least one");
    }
    let context = model.config.max_position_embeddings.unwrap_or(usize::MAX);
    for (i, p) in prompts.iter().enumerate() {
        model.config.check_length(p.len() + 1).with_context(|| format!("prompt {i} and its first new token"))?;
    }
    let t = opts.sampling.temperature;
    let top_p = opts.sampling.top_p;
    if !(t.is_finite() && t >= 0.0 && top_p > 0.0 && top_p <= 1.0) {
        bail!(
            "temperature must be >= 0 and top-p in (0, 1], not {} and {}",
            opts.sampling.temperature,
            opts.sampling.top_p
        );
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let longest = order.first().map_or(1, |&i| prompts[i].len()) + opts.max_new_tokens;
    let rows = (opts.max_batch_tokens / longest.max(1)).clamp(1, opts.max_batch_rows.max(1));
    Decoder { model, prompts, keys, opts, hooks, context, waiting: order.into(), rows }.run()
}

/// Continuous batching: a batch of at most `rows` prompts decodes one token per row per
/// step; a row leaves as soon as it stops, and waiting prompts (longest first) take the
/// free rows: they are prefilled together, right-aligned to the batch's slots, and join.
struct Decoder<'a> {
    model: &'a CausalLm,
    prompts: &'a [Vec<u32>],
    keys: &'a [u64],
    opts: &'a GenerateOptions,
    hooks: &'a Hooks<'a>,
    context: usize,
    waiting: std::collections::VecDeque<usize>,
    rows: usize,
}

impl Decoder<'_> {
    fn run(mut self) -> Result<Vec<Generated>> {
        let device = self.model.device();
        let mut results: Vec<Generated> =
            self.prompts.iter().map(|_| Generated { ids: vec![], finish: FinishReason::Length }).collect();
        let mut cache = KvCache::new(self.model.config.num_layers);
        // Per batch row: the prompt it decodes and the token it feeds next.
        let (mut active, mut next): (Vec<usize>, Vec<i64>) = (vec![], vec![]);
        loop {
            if active.len() < self.rows && !self.waiting.is_empty() {
                let take = (self.rows - active.len()).min(self.waiting.len());
                let joining: Vec<usize> = self.waiting.drain(..take).collect();
                let (ids, mask) = left_padded(&joining.iter().map(|&i| self.prompts[i].as_slice()).collect::<Vec<_>>());
                let mut fresh = KvCache::new(self.model.config.num_layers);
                let hidden = self.model.transformer.decode_capturing(
                    &ids.to_device(device),
                    &mask.to_device(device),
                    &mut fresh,
                    self.observed_layers(),
                )?;
                let (go_on, tokens) = self.step(&hidden, &joining, &mut results)?;
                fresh.select_rows(&Tensor::from_slice(&go_on.iter().map(|&r| r as i64).collect::<Vec<_>>()));
                cache.append_rows(fresh);
                active.extend(go_on.iter().map(|&r| joining[r]));
                next.extend(go_on.iter().map(|&r| tokens[r] as i64));
                continue;
            }
            if active.is_empty() {
                return Ok(results);
            }
            let input = Tensor::from_slice(&next).view([active.len() as i64, 1]).to_device(device);
            let hidden = self.model.transformer.decode_capturing(
                &input,
                &input.ones_like(),
                &mut cache,
                self.observed_layers(),
            )?;
            let (go_on, tokens) = self.step(&hidden, &active, &mut results)?;
            if go_on.len() < active.len() {
                cache.select_rows(&Tensor::from_slice(&go_on.iter().map(|&r| r as i64).collect::<Vec<_>>()));
                cache.drop_unused_slots();
                active = go_on.iter().map(|&r| active[r]).collect();
            }
            next = go_on.iter().map(|&r| tokens[r] as i64).collect();
        }
    }

    fn observed_layers(&self) -> &[usize] {
        self.hooks.observer.map_or(&[], |o| o.hidden_layers)
    }

    /// Chooses the next token of each row (`batch[r]` is row r's prompt) from its final
    /// hidden state, records it, and returns the rows that go on and the tokens.
    fn step(&self, hidden: &Hidden, batch: &[usize], results: &mut [Generated]) -> Result<(Vec<usize>, Vec<u32>)> {
        let logits = self.model.transformer.logits(&hidden.last).to_kind(Kind::Float);
        // A NaN (or +inf) logit would pick an arbitrary token and log-probabilities of NaN.
        let broken = logits.isnan().logical_or(&logits.isposinf()).any_dim(-1, false);
        if let Some(r) = Vec::<bool>::try_from(broken.to_device(Device::Cpu))?.iter().position(|&b| b) {
            let i = batch[r];
            bail!(
                "prompt {i}: the model's logits for reply token {} are not finite (NaN or inf); its weights or dtype are broken",
                results[i].ids.len()
            );
        }
        // A row's n-th token takes the n-th number of its stream, whatever the batch.
        let streams: Vec<(u64, u64)> = batch.iter().map(|&i| (self.keys[i], results[i].ids.len() as u64)).collect();
        let tokens = choose(&logits, &self.opts.sampling, &streams)?;
        if let Some(observer) = self.hooks.observer {
            let numbers: Vec<u64> = streams.iter().map(|s| s.1).collect();
            let view = StepView {
                prompts: batch,
                numbers: &numbers,
                logits: &logits,
                tokens: &tokens,
                hidden: &hidden.captured,
            };
            (observer.on_step)(&view)?;
        }
        if let Some(progress) = self.hooks.progress {
            progress(tokens.len());
        }
        let mut go_on = vec![];
        for (r, (&i, &id)) in batch.iter().zip(&tokens).enumerate() {
            let out = &mut results[i];
            out.ids.push(id);
            let limit = self.opts.max_new_tokens.min(self.context - self.prompts[i].len());
            if self.opts.stop_ids.contains(&id) || self.hooks.stop.is_some_and(|stop| stop(i, &out.ids)) {
                out.finish = FinishReason::Stop;
            } else if out.ids.len() < limit {
                go_on.push(r);
            }
        }
        Ok((go_on, tokens))
    }
}

/// Token ids and mask `[rows, longest]` of `prompts`, padded on the left.
fn left_padded(prompts: &[&[u32]]) -> (Tensor, Tensor) {
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
    let (mut ids, mut mask) = (vec![0i64; prompts.len() * width], vec![0i64; prompts.len() * width]);
    for (r, p) in prompts.iter().enumerate() {
        let pad = width - p.len();
        for (t, &id) in p.iter().enumerate() {
            ids[r * width + pad + t] = id as i64;
            mask[r * width + pad + t] = 1;
        }
    }
    let shape = [prompts.len() as i64, width as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

/// The next token of every row of `logits` `[rows, vocab]`; `streams[r]` = (key, number
/// of tokens so far) of row r picks its uniform number.
fn choose(logits: &Tensor, s: &SamplingOptions, streams: &[(u64, u64)]) -> Result<Vec<u32>> {
    let picked = if s.temperature == 0.0 {
        logits.argmax(-1, false)
    } else {
        let mut z = (logits / s.temperature).to_device(Device::Cpu).to_kind(Kind::Double);
        let vocab = z.size()[1];
        if s.top_k > 0 && (s.top_k as i64) < vocab {
            let kth = z.topk(s.top_k as i64, -1, true, true).0.narrow(1, s.top_k as i64 - 1, 1);
            z = z.masked_fill(&z.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if s.top_p < 1.0 {
            // Keep a token while the mass of the more likely ones is below p (the first
            // always), as transformers' top-p does.
            let (sorted, index) = z.sort(-1, true);
            let p = sorted.softmax(-1, Kind::Double);
            let before = p.cumsum(-1, Kind::Double) - &p;
            let drop_sorted = before.ge(s.top_p);
            let drop = drop_sorted.zeros_like().scatter(-1, &index, &drop_sorted);
            z = z.masked_fill(&drop, f64::NEG_INFINITY);
        }
        let uniforms: Vec<f64> = streams.iter().flat_map(|&(key, n)| draw_uniforms(s.seed, key, n, 1)).collect();
        let u = Tensor::from_slice(&uniforms).view([streams.len() as i64, 1]);
        draw_from_logits(&z, &u).squeeze_dim(1)
    };
    Ok(Vec::<i64>::try_from(picked.to_device(Device::Cpu))?.into_iter().map(|x| x as u32).collect())
}

/// The ids that end a reply: `eos_token_id` (one id or a list) of the model's
/// `generation_config.json`, else of its `config.json`.
pub fn stop_ids_of(model_dir: &std::path::Path) -> Result<Vec<u32>> {
    for name in ["generation_config.json", "config.json"] {
        let path = model_dir.join(name);
        if !path.exists() {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
        let as_id = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
        let bad = |v: &serde_json::Value| {
            anyhow::anyhow!(
                "{}: field `eos_token_id` is {v}: it must be a token id or a list of token ids",
                path.display()
            )
        };
        let ids: Vec<u32> = match json.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(list)) => {
                list.iter().map(|x| as_id(x).ok_or_else(|| bad(x))).collect::<Result<_>>()?
            }
            Some(v) => vec![as_id(v).ok_or_else(|| bad(v))?],
        };
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(vec![])
}
