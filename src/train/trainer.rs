//! The training loop: rows from the shards -> padded batches -> student forward ->
//! chunked head + losses (KD on the teacher's targets mixed with hard-label CE by
//! `alpha`; `alpha = 1` is plain SFT on the same tokens) -> AdamW -> checkpoints.
//! Losses are normalised by the count of trained tokens over the whole accumulated
//! step, and every loss part is logged on its own.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::data::{RowStream, StreamOptions, StreamPosition};
use super::hidden::{HiddenDistill, HiddenMap};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::LrSchedule;
use crate::batch::{PaddedBatch, RowTokens};
use crate::losses::chunked::chunked_head_loss;
use crate::losses::{cross_entropy, HiddenLoss, KdLoss, TeacherTargets};
use crate::model::CausalLm;
use crate::precompute::plan::hash_file;
use crate::shards::reader::{ShardSet, TargetRow};
use crate::tokenizer::copy_tokenizer_files;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub student: PathBuf,
    pub shards: PathBuf,
    pub output: PathBuf,
    pub device: Device,
    pub steps: u64,
    /// Padded tokens per micro-batch.
    pub batch_tokens: usize,
    pub grad_accum: usize,
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    pub clip_norm: f64,
    /// Weight of the hard-label cross-entropy; KD gets `1 - alpha`.
    pub alpha: f64,
    pub kd: KdLoss,
    pub seed: u64,
    pub save_every: u64,
    pub keep_last: usize,
    pub resume: bool,
    pub force_tokenizer: bool,
    /// Positions per chunk of the head + loss.
    pub head_chunk: i64,
    /// Hidden-state distillation (teacher layer -> student layer), if any.
    pub hidden: Option<HiddenSettings>,
    /// End this invocation at this step (with a checkpoint), keeping the schedule of
    /// `steps`: for jobs with a wall-time limit, continued with `resume`.
    pub stop_at: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct HiddenSettings {
    pub maps: Vec<HiddenMap>,
    pub weight: f64,
    pub loss: HiddenLoss,
}

/// What a checkpoint needs besides weights and optimiser moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub optimizer_steps: u64,
    pub position: StreamPosition,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub kd: f64,
    pub ce: f64,
    /// Mean hidden-state loss per trained token (0 without hidden-state distillation).
    pub hidden: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub targets: usize,
    pub tokens_per_s: f64,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

pub fn train(cfg: &TrainConfig, mut on_step: impl FnMut(&StepLog)) -> Result<Vec<StepLog>> {
    let set = Arc::new(ShardSet::open(&cfg.shards, false)?);
    let student_tok = cfg.student.join("tokenizer.json");
    let config = crate::model::ModelConfig::from_dir(&cfg.student)?;
    set.check_student(&hash_file(&student_tok)?, config.vocab_size, cfg.force_tokenizer)?;
    std::fs::create_dir_all(&cfg.output).with_context(|| format!("cannot create {}", cfg.output.display()))?;
    tch::manual_seed(cfg.seed as i64);

    let resume_from = if cfg.resume { latest_checkpoint(&cfg.output)? } else { None };
    let model_dir = resume_from.clone().unwrap_or_else(|| cfg.student.clone());
    let model = CausalLm::load(&model_dir, cfg.device, Kind::Float)?;
    let mut hidden = match &cfg.hidden {
        Some(h) => Some(hidden_distill(h, &set, &model, cfg.device)?),
        None => None,
    };
    if let (Some(h), Some(dir)) = (hidden.as_mut(), &resume_from) {
        h.load(dir)?;
    }
    let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    if let Some(h) = &hidden {
        named.extend(h.vs.variables());
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let mut opt = AdamW::new(named, cfg.adamw);
    let mut state = TrainerState { step: 0, optimizer_steps: 0, position: StreamPosition::default(), seed: cfg.seed };
    if let Some(dir) = &resume_from {
        state = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE))?)
            .with_context(|| format!("{}: malformed trainer state", dir.display()))?;
        let moments = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))?;
        let moments: Vec<(String, Tensor)> = moments.into_iter().map(|(n, t)| (n, t.to_device(cfg.device))).collect();
        opt.load_state(state.optimizer_steps, &moments).with_context(|| format!("{}", dir.display()))?;
    }
    let mut stream = Feed::new(RowStream::new(
        set.clone(),
        StreamOptions { seed: cfg.seed, window: 8, prefetch: 2, epochs: None },
        state.position,
    ));
    let mut log_file = std::fs::OpenOptions::new().create(true).append(true).open(cfg.output.join("metrics.jsonl"))?;
    let mut logs = vec![];
    let end = cfg.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    for step in state.step..end {
        let started = Instant::now();
        opt.zero_grad();
        let micro: Vec<Vec<TargetRow>> =
            (0..cfg.grad_accum.max(1)).map(|_| stream.take_batch(cfg.batch_tokens)).collect::<Result<_>>()?;
        let targets: usize = micro.iter().flatten().map(|r| r.tail_logmass.len()).sum();
        let tokens: usize = micro.iter().flatten().map(|r| r.input_ids.len()).sum();
        let (mut kd_sum, mut ce_sum, mut hidden_sum, mut loss_sum) = (0f64, 0f64, 0f64, 0f64);
        for rows in &micro {
            let parts = micro_step(&model, hidden.as_ref(), rows, cfg, 1.0 / targets.max(1) as f64)?;
            loss_sum += parts.loss;
            kd_sum += parts.kd;
            ce_sum += parts.ce;
            hidden_sum += parts.hidden;
        }
        if !loss_sum.is_finite() {
            let ids: Vec<u64> = micro.iter().flatten().map(|r| r.row_index).collect();
            bail!(
                "step {}: the loss is {loss_sum} (rows {ids:?}); stopping, the last good checkpoint is kept",
                step + 1
            );
        }
        let grad_norm = clip_grad_norm(&params, cfg.clip_norm);
        let lr = cfg.schedule.lr(step);
        opt.step(lr);
        let n = targets.max(1) as f64;
        let log = StepLog {
            step: step + 1,
            lr,
            loss: loss_sum,
            kd: kd_sum / n,
            ce: ce_sum / n,
            hidden: hidden_sum / n,
            grad_norm,
            tokens,
            targets,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        writeln!(log_file, "{}", serde_json::to_string(&log)?)?;
        on_step(&log);
        logs.push(log);
        let done = step + 1;
        if done % cfg.save_every.max(1) == 0 || done == end {
            let state =
                TrainerState { step: done, optimizer_steps: opt.steps, position: stream.position(), seed: cfg.seed };
            save_checkpoint(cfg, &model, hidden.as_ref(), &opt, &state)?;
        }
    }
    Ok(logs)
}

/// Checks the map against the shards and the student, and makes the projections.
fn hidden_distill(h: &HiddenSettings, set: &ShardSet, model: &CausalLm, device: Device) -> Result<HiddenDistill> {
    let captured = &set.manifest.settings.capture.hidden_layers;
    for m in &h.maps {
        if !captured.contains(&m.teacher_layer) {
            bail!(
                "--hidden-map {}:{}: the shards hold teacher hidden states {captured:?} only",
                m.teacher_layer,
                m.student_layer
            );
        }
        if m.student_layer > model.config.num_layers {
            bail!(
                "--hidden-map {}:{}: the student has {} layers",
                m.teacher_layer,
                m.student_layer,
                model.config.num_layers
            );
        }
    }
    let widths = (set.manifest.settings.teacher.hidden_size, model.config.hidden_size);
    Ok(HiddenDistill::new(h.maps.clone(), h.weight, h.loss, widths, device))
}

/// The loss of one micro-batch: the scaled total and the unscaled sums of its parts.
struct LossParts {
    loss: f64,
    kd: f64,
    ce: f64,
    hidden: f64,
}

/// Forward, chunked head + loss, hidden-state loss, and one backward for a micro-batch.
fn micro_step(
    model: &CausalLm,
    hidden_distill: Option<&HiddenDistill>,
    rows: &[TargetRow],
    cfg: &TrainConfig,
    scale: f64,
) -> Result<LossParts> {
    let tokens: Vec<RowTokens> = rows
        .iter()
        .map(|r| RowTokens { ids: &r.input_ids, loss_mask: &r.loss_mask, doc_lengths: &r.doc_lengths })
        .collect();
    let batch = PaddedBatch::new(&tokens, cfg.device);
    let capture = hidden_distill.map(|h| h.student_layers()).unwrap_or_default();
    let out = model.transformer.forward_hidden(&batch.input(), &capture)?;
    let width = out.last.size()[2];
    let h = out.last.reshape([-1, width]).index_select(0, &batch.predicting);
    let teacher = teacher_targets(rows, cfg.device);
    // Per-part sums stay on the device until the micro-batch ends (no per-chunk sync).
    let (mut kd_parts, mut ce_parts): (Vec<Tensor>, Vec<Tensor>) = (vec![], vec![]);
    let alpha = cfg.alpha;
    let (loss, dh) = chunked_head_loss(&h, model.transformer.lm_head_weight(), cfg.head_chunk, scale, |logits, r| {
        let n = r.end - r.start;
        let ce = cross_entropy(logits, &batch.next_tokens.narrow(0, r.start, n));
        ce_parts.push(ce.detach().sum(Kind::Double));
        if alpha >= 1.0 {
            return Ok(ce);
        }
        let part = TeacherTargets {
            ids: teacher.ids.narrow(0, r.start, n),
            logprobs: teacher.logprobs.narrow(0, r.start, n),
            tail_logmass: teacher.tail_logmass.narrow(0, r.start, n),
        };
        let kd = cfg.kd.per_position(logits, &part)?;
        kd_parts.push(kd.detach().sum(Kind::Double));
        Ok(kd * (1.0 - alpha) + ce * alpha)
    })?;
    // One backward through the body: the head's gradient (from the chunks) plus the
    // hidden-state term.
    let host_sum = |parts: &[Tensor]| {
        if parts.is_empty() {
            0.0
        } else {
            Tensor::stack(parts, 0).sum(Kind::Double).double_value(&[])
        }
    };
    let (kd_sum, ce_sum) = (host_sum(&kd_parts), host_sum(&ce_parts));
    let mut surrogate = (&h * dh.detach()).sum(Kind::Float);
    let (mut hidden_loss, mut hidden_raw) = (0f64, 0f64);
    if let Some(hd) = hidden_distill {
        let (term, raw) = hd.term(&out.captured, &batch.predicting, rows, scale)?;
        hidden_loss = term.double_value(&[]);
        hidden_raw = raw;
        surrogate = surrogate.g_add(&term); // out of place: autograd
    }
    surrogate.backward();
    Ok(LossParts { loss: loss + hidden_loss, kd: kd_sum, ce: ce_sum, hidden: hidden_raw })
}

/// The rows' teacher targets as tensors, in the batch's predicting order (row-major,
/// increasing position), which is the order the shards store them in.
pub fn teacher_targets(rows: &[TargetRow], device: Device) -> TeacherTargets {
    let k = if rows.is_empty() || rows[0].tail_logmass.is_empty() {
        1
    } else {
        rows[0].topk_ids.len() / rows[0].tail_logmass.len()
    };
    let ids: Vec<i64> = rows.iter().flat_map(|r| r.topk_ids.iter().map(|&i| i as i64)).collect();
    let lps: Vec<f32> = rows.iter().flat_map(|r| r.topk_logprobs.iter().map(|x| x.to_f32())).collect();
    let tails: Vec<f32> = rows.iter().flat_map(|r| r.tail_logmass.iter().copied()).collect();
    TeacherTargets {
        ids: Tensor::from_slice(&ids).view([-1, k as i64]).to_device(device),
        logprobs: Tensor::from_slice(&lps).view([-1, k as i64]).to_device(device),
        tail_logmass: Tensor::from_slice(&tails).to_device(device),
    }
}

/// Rows from the stream in batches of at most `batch_tokens` padded tokens; a row that
/// does not fit waits for the next batch, and `position` accounts for it.
struct Feed {
    stream: RowStream,
    pending: Option<(TargetRow, StreamPosition)>,
}

impl Feed {
    fn new(stream: RowStream) -> Self {
        Feed { stream, pending: None }
    }

    /// Position of the next row not yet in a batch.
    fn position(&self) -> StreamPosition {
        self.pending.as_ref().map(|p| p.1).unwrap_or_else(|| self.stream.position())
    }

    fn take_batch(&mut self, batch_tokens: usize) -> Result<Vec<TargetRow>> {
        let mut rows: Vec<TargetRow> = vec![];
        let mut width = 0;
        loop {
            let (row, at) = match self.pending.take() {
                Some(p) => p,
                None => {
                    let at = self.stream.position();
                    match self.stream.next() {
                        Some(row) => (row?, at),
                        None => bail!("the shard stream ended"),
                    }
                }
            };
            let w = width.max(row.input_ids.len());
            if !rows.is_empty() && w * (rows.len() + 1) > batch_tokens {
                self.pending = Some((row, at));
                return Ok(rows);
            }
            width = w;
            rows.push(row);
        }
    }
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

/// Writes a checkpoint under a temporary name and renames it, so a failed write (disk
/// full) leaves the previous checkpoints intact; then removes all but the last K.
fn save_checkpoint(
    cfg: &TrainConfig,
    model: &CausalLm,
    hidden: Option<&HiddenDistill>,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let final_dir = cfg.output.join(checkpoint_name(state.step));
    let tmp = cfg.output.join(format!(".{}.tmp", checkpoint_name(state.step)));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> Result<()> {
        model.save(&tmp, crate::model::save::DEFAULT_MAX_SHARD_BYTES)?;
        copy_tokenizer_files(&cfg.student, &tmp)?;
        if let Some(h) = hidden {
            h.save(&tmp)?;
        }
        let moments = opt.state();
        Tensor::write_safetensors(&moments, tmp.join(OPTIMIZER_FILE))?;
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}; earlier checkpoints are intact", final_dir.display())));
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir)?;
    let mut all = checkpoints(&cfg.output)?;
    while all.len() > cfg.keep_last.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Complete checkpoints in `dir`, oldest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
            if path.join(STATE_FILE).exists() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}
