//! Teacher forward pass -> the targets a loss needs, per trained position:
//! the top-k token ids with their log-probabilities under the full-vocabulary
//! log-softmax (temperature 1, descending), the log of the probability mass outside
//! the top-k (the tail bucket), the log-probability of the true next token, optionally
//! ids drawn from the tail (the distribution renormalised outside the top-k), and the
//! hidden states of chosen layers divided by their per-position RMS (float16 that
//! cannot overflow) with the RMS kept in float32.
//!
//! Everything vocabulary-sized stays on the device, in chunks of positions
//! (`model::logits`): only k values per position and the chosen hidden states travel
//! to the host.
use anyhow::{bail, Result};
use half::f16;
use tch::{Device, Kind, Tensor};

use crate::batch::PaddedBatch;
use crate::dataset::sequence::Sequence;
use crate::model::logits::{chunk_positions, default_logits_budget};
use crate::model::sampling::{draw_from_logits, draw_uniforms};
use crate::model::CausalLm;
use crate::shards::audit::{AuditSums, TemperedSums, AUDIT_STRIDE};
use crate::shards::row::{HiddenTargets, ShardRow, TailDraws, TopKTargets};

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// 0: no top-k (with `draws`, which then come from the whole distribution).
    pub top_k: usize,
    /// Mass-adaptive top-k: keep the fewest of the top-k ids whose probabilities reach
    /// this mass (the tail and the draws are then over every id not kept).
    pub top_p: Option<f64>,
    /// With `top_p`: every position keeps at least this many ids.
    pub min_k: usize,
    pub draws: Option<DrawSettings>,
    /// Hidden states to keep, in transformers' numbering (0 = embeddings).
    pub hidden_layers: Vec<usize>,
    /// Temperatures at which every `AUDIT_STRIDE`-th target is audited against the full
    /// distribution (`shards::audit`); empty: none.
    pub audit_temperatures: Vec<f64>,
    /// Softmax over ids `0..vocab_limit` only: the tokenizer's real vocabulary, so
    /// padded embedding rows (Qwen2: 152,064 rows for 151,646 tokens) get no mass.
    pub vocab_limit: usize,
}

/// Runs the teacher on `rows` (one padded batch) and returns them with their targets,
/// and the audit of the targets against the full distribution.
pub fn capture_batch(
    model: &CausalLm,
    rows: &[&Sequence],
    settings: &CaptureSettings,
) -> Result<(Vec<ShardRow>, Vec<TemperedSums>)> {
    let _guard = tch::no_grad_guard();
    settings.check(model)?;
    let batch = PaddedBatch::new(rows, model.device());
    let hidden = model.transformer.forward_hidden(&batch.input(), &settings.hidden_layers)?;
    let width = hidden.last.size()[2];
    // Captured states of a model split by layers live on their layer's device.
    let flat = |t: &Tensor| t.reshape([-1, width]).index_select(0, &batch.predicting.to_device(t.device()));
    let next_tokens = batch.next_tokens.to_device(model.output_device());
    let chunk = chunk_positions(model.config.vocab_size, default_logits_budget(model.output_device()));
    // The draws of a row's t-th target are keyed by the row and t alone.
    let keys: Vec<(u64, u64)> = rows
        .iter()
        .zip(&batch.targets_per_row)
        .flat_map(|(row, &count)| (0..count as u64).map(|t| (row.row_index, t)))
        .collect();
    let uniforms = settings.uniforms(&keys, model.output_device());
    let audited: Vec<i64> =
        (0..keys.len() as i64).filter(|&p| keys[p as usize].1.is_multiple_of(AUDIT_STRIDE)).collect();
    let mut parts = TargetParts::default();
    model.transformer.logits_in_chunks(&flat(&hidden.last), chunk, |logits, r| {
        let u = uniforms.as_ref().map(|u| u.narrow(0, r.start, r.end - r.start));
        // `audited` ascends: the chunk's positions are one run of it.
        let run = audited.partition_point(|&p| p < r.start)..audited.partition_point(|&p| p < r.end);
        let mine: Vec<i64> = audited[run].iter().map(|&p| p - r.start).collect();
        let mine = Tensor::from_slice(&mine).to_device(logits.device());
        parts.push(logits, &next_tokens.narrow(0, r.start, r.end - r.start), u.as_ref(), Some(&mine), settings)?;
        Ok(())
    })?;
    let states: Vec<Tensor> = hidden.captured.iter().map(flat).collect();
    let targets = parts.to_host(settings)?.split(&batch.targets_per_row, settings);
    let hidden = hidden_targets(&states, settings)?.split(&batch.targets_per_row);
    let mut out = Vec::with_capacity(rows.len());
    for ((&row, topk), hidden) in rows.iter().zip(targets).zip(hidden) {
        let captured = ShardRow { sequence: row.clone(), topk, hidden };
        check_finite(&captured)?;
        out.push(captured);
    }
    Ok((out, parts.audit.tempered))
}

impl CaptureSettings {
    /// Refuses settings the model cannot give.
    pub fn check(&self, model: &CausalLm) -> Result<()> {
        let sampled_out = self.draws.is_some() && self.top_k >= self.vocab_limit;
        if self.top_k + self.draws.map_or(0, |d| d.per_position) == 0
            || self.vocab_limit < self.top_k
            || sampled_out
            || self.vocab_limit > model.config.vocab_size
        {
            bail!(
                "top_k {} must be between 1 (0 with draws) and the vocabulary (below it with draws; {} tokens, model rows {})",
                self.top_k,
                self.vocab_limit,
                model.config.vocab_size
            );
        }
        model.transformer.check_capture(&self.hidden_layers)?;
        Ok(())
    }

    /// The uniform numbers `[positions, draws]` of the draws at positions keyed
    /// (row index, target number), when the settings draw.
    pub fn uniforms(&self, keys: &[(u64, u64)], device: Device) -> Option<Tensor> {
        self.draws.map(|d| {
            let u: Vec<f64> = keys.iter().flat_map(|&(row, t)| draw_uniforms(d.seed, row, t, d.per_position)).collect();
            Tensor::from_slice(&u).view([-1, d.per_position as i64]).to_device(device)
        })
    }
}

/// The targets of positions computed chunk by chunk on the device; only k values per
/// position travel to the host (`to_host`).
#[derive(Default)]
pub struct TargetParts {
    ids: Vec<Tensor>,
    logprobs: Vec<Tensor>,
    tails: Vec<Tensor>,
    targets: Vec<Tensor>,
    drawn: Vec<Tensor>,
    kept: Vec<Tensor>,
    /// The audit of the positions so far (only its `tempered` part is filled here).
    pub audit: AuditSums,
}

impl TargetParts {
    /// The targets of the positions whose logits are `logits` `[n, model vocab]`, whose
    /// next tokens are `next` `[n]` and whose draws take `uniforms` `[n, draws]`.
    /// Float32 `logits` are overwritten (the top-k masked out for the tail): pass a
    /// tensor nothing reads afterwards. `audited` `[a]` are the positions (rows of
    /// `logits`) to audit at `settings.audit_temperatures`.
    pub fn push(
        &mut self,
        logits: &Tensor,
        next: &Tensor,
        uniforms: Option<&Tensor>,
        audited: Option<&Tensor>,
        settings: &CaptureSettings,
    ) -> Result<()> {
        let mut logits = logits.narrow(1, 0, settings.vocab_limit as i64).to_kind(Kind::Float);
        let lse = logits.logsumexp([-1], true);
        let (top, idx) = logits.topk(settings.top_k as i64, -1, true, true);
        self.targets.push((logits.gather(-1, &next.unsqueeze(-1), false) - &lse).squeeze_dim(-1));
        let top = top - &lse;
        // Mass-adaptive: an id is kept while the ids before it hold less than top_p, and
        // the first min_k always (`keeps_id`); the first id stands in for the dropped
        // ones where the kept ids are masked below.
        let masked_ids = match settings.top_p {
            Some(p) => {
                let probs = top.to_kind(Kind::Double).exp();
                let floor =
                    Tensor::arange(settings.top_k as i64, (Kind::Int64, top.device())).lt(settings.min_k as i64);
                let keep = (probs.cumsum(-1, Kind::Double) - &probs).lt(p).logical_or(&floor);
                let masked = idx.where_self(&keep, &idx.narrow(1, 0, 1).expand_as(&idx));
                self.kept.push(keep);
                masked
            }
            None => idx.shallow_clone(),
        };
        let auditing = settings.top_k > 0 && !settings.audit_temperatures.is_empty();
        if let Some(rows) = audited.filter(|r| auditing && r.numel() > 0) {
            let listed = masked_ids.index_select(0, rows);
            self.audit.merge_tempered(&audit_positions(
                &logits.index_select(0, rows),
                &listed,
                &settings.audit_temperatures,
            )?);
        }
        self.logprobs.push(top.to_kind(Kind::Half));
        // The tail's log-mass from its own logsumexp, not log(1 - sum p): exact even
        // when the top-k hold nearly all the mass.
        let _ = logits.scatter_value_(-1, &masked_ids, f64::NEG_INFINITY);
        self.tails.push((logits.logsumexp([-1], false) - lse.squeeze_dim(-1)).clamp_max(0.0));
        self.ids.push(idx.to_kind(Kind::Int));
        if let Some(u) = uniforms {
            self.drawn.push(draw_from_logits(&logits, u));
        }
        Ok(())
    }

    pub fn to_host(&self, settings: &CaptureSettings) -> Result<HostTargets> {
        let host = |parts: &[Tensor]| Tensor::cat(parts, 0).to_device(Device::Cpu);
        let mut ids = Vec::<i32>::try_from(host(&self.ids).reshape([-1]))?;
        let mut logprobs = half_values(&host(&self.logprobs))?;
        // Mass-adaptive: each position's count, and only the kept entries.
        let lengths = match settings.top_p {
            Some(_) => {
                let keep = Vec::<i8>::try_from(host(&self.kept).to_kind(Kind::Int8).reshape([-1]))?;
                let mut flags = keep.iter().map(|&x| x != 0);
                ids.retain(|_| flags.next().unwrap_or(false));
                let mut flags = keep.iter().map(|&x| x != 0);
                logprobs.retain(|_| flags.next().unwrap_or(false));
                let counts = keep.chunks(settings.top_k).map(|c| c.iter().filter(|&&x| x != 0).count() as u32);
                Some(counts.collect())
            }
            None => None,
        };
        let drawn = match settings.draws {
            Some(_) => Some(Vec::<i64>::try_from(host(&self.drawn).reshape([-1]))?),
            None => None,
        };
        Ok(HostTargets {
            ids,
            logprobs,
            lengths,
            tails: Vec::<f32>::try_from(host(&self.tails))?,
            targets: Vec::<f32>::try_from(host(&self.targets))?,
            drawn,
        })
    }
}

/// The targets of consecutive positions on the host.
pub struct HostTargets {
    ids: Vec<i32>,
    logprobs: Vec<f16>,
    lengths: Option<Vec<u32>>,
    tails: Vec<f32>,
    targets: Vec<f32>,
    drawn: Option<Vec<i64>>,
}

impl HostTargets {
    /// One `TopKTargets` per row, row r holding the next `counts[r]` positions.
    pub fn split(&self, counts: &[usize], settings: &CaptureSettings) -> Vec<TopKTargets> {
        let (mut offset, mut entry) = (0, 0);
        let mut out = Vec::with_capacity(counts.len());
        for &count in counts {
            let range = offset..offset + count;
            let row_lengths = self.lengths.as_ref().map(|l| l[range.clone()].to_vec());
            let entries = row_lengths.as_ref().map_or(count * settings.top_k, |l| l.iter().map(|&n| n as usize).sum());
            let held = entry..entry + entries;
            entry = held.end;
            out.push(TopKTargets {
                k: settings.top_k,
                lengths: row_lengths,
                ids: self.ids[held.clone()].iter().map(|&i| i as u32).collect(),
                logprobs: self.logprobs[held].to_vec(),
                tail_logmass: self.tails[range.clone()].to_vec(),
                target_logprob: self.targets[range.clone()].to_vec(),
                draws: self.drawn.as_ref().zip(settings.draws).map(|(d, s)| {
                    let m = s.per_position;
                    tail_draws(&d[range.start * m..range.end * m], m)
                }),
                uld: None,
            });
            offset = range.end;
        }
        out
    }
}

/// Captured hidden states of consecutive positions on the host, per layer: values
/// divided by their per-position RMS (float16) and the RMS (float32).
pub struct HostHidden {
    layers: Vec<usize>,
    width: usize,
    per_layer: Vec<(Vec<f16>, Vec<f32>)>,
}

/// `states[i]` `[positions, width]` is hidden state `settings.hidden_layers[i]`.
pub fn hidden_targets(states: &[Tensor], settings: &CaptureSettings) -> Result<HostHidden> {
    let per_layer = states
        .iter()
        .map(|h| {
            let h = h.to_kind(Kind::Float);
            let rms = h.square().mean_dim(-1, true, Kind::Float).sqrt().clamp_min(f64::from(f32::MIN_POSITIVE));
            let values = (&h / &rms).to_kind(Kind::Half).to_device(Device::Cpu);
            Ok((half_values(&values)?, Vec::<f32>::try_from(rms.reshape([-1]).to_device(Device::Cpu))?))
        })
        .collect::<Result<_>>()?;
    let width = states.first().map_or(0, |h| h.size()[1] as usize);
    Ok(HostHidden { layers: settings.hidden_layers.clone(), width, per_layer })
}

impl HostHidden {
    /// Each row's captured states, row r holding the next `counts[r]` positions.
    pub fn split(&self, counts: &[usize]) -> Vec<Vec<HiddenTargets>> {
        let w = self.width;
        let mut offset = 0;
        counts
            .iter()
            .map(|&count| {
                let range = offset..offset + count;
                offset = range.end;
                self.layers
                    .iter()
                    .zip(&self.per_layer)
                    .map(|(&layer, (values, rms))| HiddenTargets {
                        layer,
                        width: w,
                        values: values[range.start * w..range.end * w].to_vec(),
                        rms: rms[range.clone()].to_vec(),
                    })
                    .collect()
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSettings {
    pub per_position: usize,
    pub seed: u64,
}

/// Draws `[positions * m]` -> per position the distinct ids, ascending, with counts.
pub fn tail_draws(drawn: &[i64], m: usize) -> TailDraws {
    let mut out = TailDraws::default();
    for position in drawn.chunks(m) {
        let mut ids = position.to_vec();
        ids.sort_unstable();
        let before = out.ids.len();
        for id in ids {
            match out.ids.last() {
                Some(&last) if out.ids.len() > before && last as i64 == id => *out.counts.last_mut().unwrap() += 1,
                _ => {
                    out.ids.push(id as u32);
                    out.counts.push(1);
                }
            }
        }
        out.lengths.push((out.ids.len() - before) as u32);
    }
    out
}

/// The audit of positions whose logits over the tokenizer's ids are `z` `[a, V]` (float32)
/// and whose stored ids are `listed` `[a, k]` (repeats allowed), at each temperature: the
/// truncation KL `KL(p_T || p̂_T)` and the listed ids' mass at T (`shards::audit` defines
/// `p̂_T`; its tail follows `losses`' flat-tail rule).
pub fn audit_positions(z: &Tensor, listed: &Tensor, temperatures: &[f64]) -> Result<Vec<TemperedSums>> {
    let vocab = z.size()[1] as f64;
    let is_listed = Tensor::zeros(z.size(), (Kind::Bool, z.device())).scatter_value(1, listed, 1);
    let logp1 = z.log_softmax(-1, Kind::Float);
    let n_listed = is_listed.sum_dim_intlist(1, false, Kind::Float);
    let log_tail = logp1.masked_fill(&is_listed, f64::NEG_INFINITY).logsumexp([1], false);
    let log_p_min = logp1.masked_fill(&is_listed.logical_not(), f64::INFINITY).amin(1, false);
    let mut out = Vec::with_capacity(temperatures.len());
    for &t in temperatures {
        let log_pt = (z / t).log_softmax(-1, Kind::Float);
        let pt = log_pt.exp();
        let mass = (&pt * is_listed.to_kind(Kind::Float)).sum_dim_intlist(1, false, Kind::Float);
        // What a loss at T makes of the stored targets: listed ids p_i^(1/T), the tail
        // bucket r * p_min^(1/T - 1), spread evenly over the unlisted ids; normalised.
        let log_tail_weight = &log_tail + &log_p_min * (1.0 / t - 1.0);
        let log_listed = (&logp1 / t).masked_fill(&is_listed.logical_not(), f64::NEG_INFINITY);
        let norm = Tensor::stack(&[log_listed.logsumexp([1], false), log_tail_weight.shallow_clone()], 1)
            .logsumexp([1], false);
        let q_unlisted = (&log_tail_weight - &norm - (-&n_listed + vocab).log()).clamp_min(-1e4);
        let q = (&logp1 / t - norm.unsqueeze(1)).where_self(&is_listed, &q_unlisted.unsqueeze(1));
        let terms = (&pt * (&log_pt - q)).where_self(&pt.gt(0.0), &pt.zeros_like());
        let kl = Vec::<f64>::try_from(terms.sum_dim_intlist(1, false, Kind::Double).to_device(Device::Cpu))?;
        let mass = Vec::<f64>::try_from(mass.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let mut sums = TemperedSums::new(t);
        for (k, m) in kl.into_iter().zip(mass) {
            sums.add(k.max(0.0), m);
        }
        out.push(sums);
    }
    Ok(out)
}

/// The mass-adaptive rule for one position's ids (probabilities descending): id `i` is
/// kept while the ids before it hold less than `top_p`, and always when `i < min_k`.
/// `TargetParts::push` applies the same rule on the device.
pub fn keeps_id(i: usize, mass_before: f64, top_p: f64, min_k: usize) -> bool {
    mass_before < top_p || i < min_k
}

/// Refuses targets that are not numbers: a teacher with NaN weights or an impossible
/// config yields them, and shards full of NaN must never be listed as complete.
pub fn check_finite(row: &ShardRow) -> Result<()> {
    let t = &row.topk;
    let nan = t.logprobs.iter().any(|x| x.is_nan())
        || t.tail_logmass.iter().chain(&t.target_logprob).any(|x| x.is_nan() || *x > 0.0)
        || row.hidden.iter().any(|h| h.values.iter().any(|x| !x.is_finite()) || h.rms.iter().any(|x| !x.is_finite()));
    if nan {
        bail!(
            "the teacher's outputs for row {} (samples {}) are not finite numbers (NaN or infinity); its weights or config.json are broken, and no shard was written from them",
            row.sequence.row_index,
            row.sequence.sample_ids.join(", ")
        );
    }
    Ok(())
}

/// Raw float16 values of a CPU Half tensor.
fn half_values(t: &Tensor) -> Result<Vec<f16>> {
    let t = t.contiguous();
    let n = t.numel();
    let mut bits = vec![0u16; n];
    // SAFETY: u16 has no invalid bit patterns; the slice covers exactly n * 2 bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr() as *mut u8, n * 2) };
    t.f_copy_data_u8(bytes, n)?;
    Ok(bits.into_iter().map(f16::from_bits).collect())
}
