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

use super::autocast::AutocastGuard;
use super::data::{RowStream, StreamOptions, StreamPosition};
use super::feed::{BatchContent, BatchLoader, Feed, FeedOptions, MicroBatch};
use super::hidden::{HiddenDistill, HiddenMap};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::LrSchedule;
use crate::losses::chunked::chunked_head_loss;
use crate::losses::{cross_entropy, HiddenLoss, KdLoss};
use crate::model::backward::StepLosses;
use crate::model::CausalLm;
use crate::precompute::plan::hash_file;
use crate::shards::reader::ShardSet;
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
    /// Pack several shard rows into each batch row (see `FeedOptions`), of `seq_len`
    /// tokens (default: the longest row the shards allow).
    pub pack: bool,
    pub seq_len: Option<usize>,
    /// Keep only each layer's input and recompute the layer during backward.
    pub recompute: bool,
    pub precision: Precision,
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
    /// Positions per chunk of the head + loss (`None`: see `auto_head_chunk`).
    pub head_chunk: Option<i64>,
    /// Hidden-state distillation (teacher layer -> student layer), if any.
    pub hidden: Option<HiddenSettings>,
    /// End this invocation at this step (with a checkpoint), keeping the schedule of
    /// `steps`: for jobs with a wall-time limit, continued with `resume`.
    pub stop_at: Option<u64>,
}

/// Arithmetic of the forward and backward passes; weights and optimiser state are float32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Float32,
    /// bfloat16 autocast (see `autocast.rs`).
    Bf16Autocast,
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
    /// Share of padding in the step's batches.
    pub padding: f64,
    /// GPU memory in use after the step (CUDA only; see `runtime::cuda_memory_in_use`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
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
    let stream = RowStream::new(
        set.clone(),
        StreamOptions { seed: cfg.seed, window: 8, prefetch: 2, epochs: None },
        state.position,
    );
    let content = BatchContent {
        teacher: cfg.alpha < 1.0,
        hidden_layers: hidden.as_ref().map(|h| h.teacher_layers()).unwrap_or_default(),
    };
    let pack_to = cfg.pack.then(|| cfg.seq_len.unwrap_or(set.manifest.settings.data.max_len));
    let feed = Feed::new(stream, FeedOptions { batch_tokens: cfg.batch_tokens, pack_to });
    let loader = BatchLoader::new(feed, content, cfg.device, 2 * cfg.grad_accum.max(1));
    let mut log_file = std::fs::OpenOptions::new().create(true).append(true).open(cfg.output.join("metrics.jsonl"))?;
    let mut logs = vec![];
    let mut position = state.position;
    let end = cfg.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    for step in state.step..end {
        let started = Instant::now();
        opt.zero_grad();
        let mut micro = vec![];
        for _ in 0..cfg.grad_accum.max(1) {
            let Some(mb) = loader.next()? else { bail!("the shard stream ended") };
            micro.push(mb);
        }
        let targets: usize = micro.iter().map(|m| m.targets).sum();
        let tokens: usize = micro.iter().map(|m| m.tokens).sum();
        let padded: usize = micro.iter().map(|m| m.batch.ids.numel()).sum();
        let mut sums = LossSums::default();
        for mb in &micro {
            let mb = mb.to_device(cfg.device, cfg.device.is_cuda());
            let _autocast = (cfg.precision == Precision::Bf16Autocast).then(|| AutocastGuard::bf16(cfg.device));
            micro_step(&model, hidden.as_ref(), &mb, cfg, 1.0 / targets.max(1) as f64, &mut sums)?;
        }
        let (loss_sum, kd_sum, ce_sum, hidden_sum) = sums.read();
        if !loss_sum.is_finite() {
            let ids: Vec<u64> = micro.iter().flat_map(|m| m.row_indices.iter().copied()).collect();
            bail!(
                "step {}: the loss is {loss_sum} (rows {ids:?}); stopping, the last good checkpoint is kept",
                step + 1
            );
        }
        position = micro.last().map_or(position, |m| m.position);
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
            padding: 1.0 - tokens as f64 / padded.max(1) as f64,
            gpu_memory_bytes: cfg.device.is_cuda().then(crate::runtime::cuda_memory_in_use).flatten(),
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        writeln!(log_file, "{}", serde_json::to_string(&log)?)?;
        on_step(&log);
        logs.push(log);
        let done = step + 1;
        if done % cfg.save_every.max(1) == 0 || done == end {
            let state = TrainerState { step: done, optimizer_steps: opt.steps, position, seed: cfg.seed };
            save_checkpoint(cfg, &model, hidden.as_ref(), &opt, &state)?;
            log_file.flush()?;
            // The plot is a by-product: failing to draw it does not stop training.
            if let Err(e) = plot_losses(&cfg.output) {
                eprintln!("warning: no loss plot: {e:#}");
            }
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

/// Loss sums over a step's micro-batches, kept on the device and read once per step
/// (a host read per chunk or micro-batch would stall the GPU).
#[derive(Default)]
struct LossSums {
    loss: Vec<Tensor>,
    kd: Vec<Tensor>,
    ce: Vec<Tensor>,
    hidden: Vec<Tensor>,
}

impl LossSums {
    /// (scaled total, KD sum, CE sum, hidden sum).
    fn read(&self) -> (f64, f64, f64, f64) {
        let total = |parts: &[Tensor]| {
            if parts.is_empty() {
                0.0
            } else {
                let on_one: Vec<Tensor> = parts.iter().map(|t| t.to_device(parts[0].device())).collect();
                Tensor::stack(&on_one, 0).sum(Kind::Double).double_value(&[])
            }
        };
        (total(&self.loss), total(&self.kd), total(&self.ce), total(&self.hidden))
    }
}

/// The step's losses on the body's outputs (see `StepLosses`): the chunked head with
/// KD and CE on the final hidden states, hidden-state terms on the captured ones.
struct MicroLosses<'a> {
    model: &'a CausalLm,
    hidden: Option<&'a HiddenDistill>,
    mb: &'a MicroBatch,
    cfg: &'a TrainConfig,
    scale: f64,
    sums: &'a mut LossSums,
}

impl StepLosses for MicroLosses<'_> {
    fn on_last(&mut self, last: &Tensor) -> Result<Tensor> {
        let (cfg, mb) = (self.cfg, self.mb);
        let width = last.size()[2];
        let h = last.reshape([-1, width]).index_select(0, &mb.batch.predicting);
        let (kd_parts, ce_parts) = (&mut self.sums.kd, &mut self.sums.ce);
        let alpha = cfg.alpha;
        let head = self.model.transformer.lm_head_weight();
        let chunk = cfg.head_chunk.unwrap_or_else(|| auto_head_chunk(self.model.config.vocab_size));
        let (loss, dh) = chunked_head_loss(&h, head, chunk, self.scale, |logits, r| {
            let n = r.end - r.start;
            let ce = cross_entropy(logits, &mb.batch.next_tokens.narrow(0, r.start, n));
            ce_parts.push(ce.detach().sum(Kind::Double));
            let Some(teacher) = mb.teacher.as_ref().filter(|_| alpha < 1.0) else {
                return Ok(ce);
            };
            let part = teacher.map(|t| t.narrow(0, r.start, n));
            let kd = cfg.kd.per_position(logits, &part)?;
            kd_parts.push(kd.detach().sum(Kind::Double));
            Ok(kd * (1.0 - alpha) + ce * alpha)
        })?;
        self.sums.loss.push(Tensor::from(loss));
        // The body's gradient enters through the surrogate sum(h * dL/dh).
        Ok((&h * dh.detach()).sum(Kind::Float))
    }

    fn on_captured(&mut self, slot: usize, state: &Tensor) -> Result<Tensor> {
        let hd = self.hidden.expect("captures are requested for hidden-state distillation only");
        let (term, raw) =
            hd.slot_loss(slot, state, &self.mb.batch.predicting, &self.mb.teacher_hidden[slot], self.scale);
        self.sums.loss.push(term.detach().to_kind(Kind::Double));
        self.sums.hidden.push(raw);
        Ok(term)
    }
}

/// Positions per head chunk so that a chunk's float32 logits take about 64 MiB: larger
/// chunks gain nothing on a GPU and cost page faults on a CPU (measured: 2048 positions
/// of a 49k vocabulary ran 30% slower than 256 on 2 cores).
pub fn auto_head_chunk(vocab: usize) -> i64 {
    ((1i64 << 24) / vocab.max(1) as i64).clamp(64, 4096)
}

/// Forward, chunked head + losses, hidden-state terms and backward for one micro-batch.
fn micro_step(
    model: &CausalLm,
    hidden: Option<&HiddenDistill>,
    mb: &MicroBatch,
    cfg: &TrainConfig,
    scale: f64,
    sums: &mut LossSums,
) -> Result<()> {
    let capture = hidden.map(|h| h.student_layers()).unwrap_or_default();
    let mut losses = MicroLosses { model, hidden, mb, cfg, scale, sums };
    model.transformer.forward_backward(&mb.batch.input(), &capture, cfg.recompute, &mut losses)
}

pub const PLOT_FILE: &str = "loss.png";

fn plot_losses(output: &Path) -> Result<()> {
    let series = super::plot::series_from_metrics(&output.join("metrics.jsonl"))?;
    let title = format!("distill train: {}", output.file_name().unwrap_or_default().to_string_lossy());
    super::plot::write_loss_plot(&series, &title, &output.join(PLOT_FILE))
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
