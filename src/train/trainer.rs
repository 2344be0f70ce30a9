//! The training loop: rows from the shards -> padded batches -> student forward ->
//! chunked head + losses (KD on the teacher's targets mixed with hard-label CE by
//! `alpha`; `alpha = 1` is plain SFT on the same tokens) -> AdamW -> checkpoints.
//! Losses are normalised by the count of trained tokens over the whole accumulated
//! step, and every loss part is logged on its own. In a data-parallel job (`parallel`)
//! "the step" spans every rank's micro-batches.
use anyhow::{bail, Result};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::autocast::AutocastGuard;
use super::checkpoint::{restore, Checkpoint, TrainerState};
use super::config::{CrossTokenizerSettings, HiddenSettings, Precision, TrainConfig};
use super::hidden::HiddenDistill;
use super::optim::{clip_grad_norm, AdamW};
use super::parallel::Parallel;
use super::run_dir::{self, RunRecord};
use crate::align::set::student_targets;
use crate::batch::feed::{BatchContent, BatchCounts, BatchLoader, Feed, FeedOptions, Loaded, MicroBatch, Share};
use crate::batch::stream::{RowStream, StreamOptions};
use crate::batch::targets::TargetOptions;
use crate::files::checksum_file;
use crate::losses::fused::{fused_head_loss_into, HeadLoss};
use crate::losses::uld::{head_logits, uld_per_group, UldBatch};
use crate::model::backward::StepLosses;
use crate::model::logits::{chunk_positions, default_logits_budget};
use crate::model::CausalLm;
use crate::shards::manifest::Manifest;
use crate::shards::reader::ShardSet;

#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub kd: f64,
    pub ce: f64,
    /// Mean hidden-state loss per trained token (0 without hidden-state distillation).
    pub hidden: f64,
    /// The routers' load-balancing loss, unweighted, averaged over the micro-batches by
    /// their trained tokens (with `--router-aux-weight` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_balance: Option<f64>,
    pub grad_norm: f64,
    pub tokens: usize,
    pub targets: usize,
    /// Share of padding in the step's batches.
    pub padding: f64,
    /// GPU memory in use after the step (CUDA only; see `runtime::cuda_memory_in_use`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    pub tokens_per_s: f64,
    pub time: StepTime,
    pub state_bytes: StateBytes,
}

/// Bytes of training state, read off the live tensors after the step: the weights and
/// gradients of every trained tensor, and the optimiser's state (moments, block scales,
/// master copies) next to them or, offloaded, in host memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StateBytes {
    pub parameters: i64,
    pub weights: i64,
    pub gradients: i64,
    pub optimizer: i64,
    pub optimizer_host: i64,
}

impl StateBytes {
    fn measure(params: &[Tensor], opt: &AdamW) -> Self {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let (optimizer, optimizer_host) = opt.state_bytes();
        let grads = params.iter().map(Tensor::grad).filter(Tensor::defined);
        StateBytes {
            parameters: params.iter().map(|p| p.numel() as i64).sum(),
            weights: params.iter().map(bytes).sum(),
            gradients: grads.map(|g| bytes(&g)).sum(),
            optimizer,
            optimizer_host,
        }
    }

    /// Bytes per parameter on the training device.
    pub fn per_parameter(&self) -> f64 {
        (self.weights + self.gradients + self.optimizer) as f64 / self.parameters.max(1) as f64
    }

    pub fn summary(&self) -> String {
        let per = |b: i64| b as f64 / self.parameters.max(1) as f64;
        let host = if self.optimizer_host > 0 {
            format!(", plus {:.2} in host memory", per(self.optimizer_host))
        } else {
            String::new()
        };
        format!(
            "{:.2} bytes per parameter ({:.2} weights, {:.2} gradients, {:.2} optimizer{host}) of {} parameters",
            self.per_parameter(),
            per(self.weights),
            per(self.gradients),
            per(self.optimizer),
            self.parameters
        )
    }
}

/// Where a step's wall time went, in seconds: waiting for batches, the student's body
/// (forward and backward), the head with its losses, and clipping + AdamW. On CUDA the
/// work is asynchronous, so only `data` means what it says there.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub data: f64,
    pub body: f64,
    pub head: f64,
    pub optimizer: f64,
    /// Summing gradients (and, with ZeRO-1, gathering weights) over the ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub communication: Option<f64>,
}

/// Trains the student as `cfg` says, calling `on_step` after every optimiser step;
/// returns the logs of the steps this call ran.
pub fn train(cfg: &TrainConfig, mut on_step: impl FnMut(&StepLog)) -> Result<Vec<StepLog>> {
    let mut run = Run::setup(cfg)?;
    let end = cfg.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    let mut logs = vec![];
    let mut steps = || -> Result<()> {
        for step in run.state.step..end {
            let log = run.step(step)?;
            if let Some(metrics) = &mut run.metrics {
                writeln!(metrics, "{}", serde_json::to_string(&log)?)?;
            }
            on_step(&log);
            logs.push(log);
            if (step + 1) % cfg.save_every.max(1) == 0 || step + 1 == end {
                run.save_checkpoint()?;
            }
        }
        Ok(())
    };
    let result = steps();
    if let (Err(e), Some(p)) = (&result, &run.parallel) {
        p.report(&format!("{e:#}"));
    }
    result.map(|()| logs)
}

/// A training run in progress: the student, its projections and optimiser, the batches,
/// and the state a checkpoint records.
struct Run<'a> {
    cfg: &'a TrainConfig,
    model: CausalLm,
    hidden: Option<HiddenDistill>,
    /// Every trained tensor by name (the student's, then the projections'), sorted.
    named: Vec<(String, Tensor)>,
    params: Vec<Tensor>,
    opt: AdamW,
    loader: BatchLoader,
    /// Step and stream position after the last step taken.
    state: TrainerState,
    precision: Precision,
    /// Rank 0's (or the only process's).
    metrics: Option<std::fs::File>,
    parallel: Option<Parallel>,
}

impl<'a> Run<'a> {
    /// The shards checked against the student, the model (or the checkpoint resumed
    /// from), projections, optimiser, and the batches from the stream position.
    fn setup(cfg: &'a TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let mut set = Arc::new(ShardSet::open(&cfg.shards, false)?);
        let config = crate::model::ModelConfig::from_dir(&cfg.student)?;
        if cfg.router_aux_weight > 0.0 && config.moe.is_none() {
            bail!("--router-aux-weight: the student {} has no mixture of experts", cfg.student.display());
        }
        let tokenizer_hash = checksum_file(&cfg.student.join("tokenizer.json"))?;
        if cfg.cross_tokenizer.is_none() {
            set.check_student(&tokenizer_hash, config.vocab_size, cfg.force_tokenizer)?;
        }
        // The record names the teacher's set: the student-side one follows from it.
        let record = RunRecord::new(cfg, &set.manifest)?;
        let resume_from = run_dir::check(cfg, &record)?;
        if let Some(c) = &cfg.cross_tokenizer {
            set = Arc::new(student_side_set(cfg, c)?);
            set.check_student(&tokenizer_hash, config.vocab_size, false)?;
        }
        let targets = cfg.target_options(&set.manifest.settings.capture)?;
        let mut parallel = match &cfg.world {
            Some(world) => {
                let p = Parallel::join(world, cfg.parallel, cfg.device)?;
                let resumed =
                    resume_from.as_ref().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned());
                p.check_same(&serde_json::json!({
                    "run": record.without_paths(),
                    "resumes_from": resumed,
                    "world": world.world,
                    "ranks_per_node": world.local_world,
                    "device": if cfg.device.is_cuda() { "cuda" } else { "cpu" },
                    "zero1": cfg.parallel.zero1,
                    "wire": format!("{:?}", cfg.parallel.buckets.wire),
                    "distill": env!("CARGO_PKG_VERSION"),
                }))?;
                Some(p)
            }
            None => None,
        };
        tch::manual_seed(cfg.seed as i64);

        let weights = cfg.memory.weight_kind();
        let model = CausalLm::load(resume_from.as_deref().unwrap_or(&cfg.student), cfg.device, weights)?;
        model.transformer.define_vocab_grads();
        let mut hidden = match &cfg.hidden {
            Some(h) => Some(hidden_distill(h, &set, &model, cfg.device)?),
            None => None,
        };
        let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        if let Some(h) = &hidden {
            named.extend(h.vs.variables());
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let shallow = || named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let mut opt = match parallel.as_mut() {
            Some(p) => p.optimizer(shallow(), cfg.adamw, cfg.memory.optimizer()),
            None => AdamW::with_memory(shallow(), cfg.adamw, cfg.memory.optimizer()),
        };
        let state = match &resume_from {
            Some(dir) => restore(dir, &mut opt, hidden.as_mut(), cfg.device)?,
            None => TrainerState::start(cfg.seed),
        };
        if let Some(p) = &parallel {
            p.broadcast_weights(&params)?;
        }
        // Every check has passed: the first write (rank 0's only).
        let first = parallel.as_ref().is_none_or(Parallel::is_first);
        let metrics = first.then(|| run_dir::start(&cfg.output, &record, state.step)).transpose()?;
        let share = parallel.as_ref().map_or(Share::ALL, Parallel::share);
        let loader = batch_loader(cfg, &set, targets, hidden.as_ref(), &state, share);
        let precision = cfg.resolved_precision();
        Ok(Run { cfg, model, hidden, named, params, opt, loader, state, precision, metrics, parallel })
    }

    /// Optimiser step `step` (0-based) over `grad_accum` micro-batches of each rank.
    fn step(&mut self, step: u64) -> Result<StepLog> {
        let cfg = self.cfg;
        let started = Instant::now();
        self.opt.zero_grad();
        let ranks = self.parallel.as_ref().map_or(1, |p| p.world.world);
        let (counts, micro) = self.next_micro_batches(cfg.grad_accum.max(1) * ranks)?;
        let data = started.elapsed();
        let targets: usize = counts.iter().map(|m| m.targets).sum();
        let tokens: usize = counts.iter().map(|m| m.tokens).sum();
        let padded: usize = counts.iter().map(|m| m.padded).sum();
        let mut sums = LossSums::default();
        for (i, mb) in micro.iter().enumerate() {
            let mb = mb.to_device(cfg.device, cfg.device.is_cuda());
            let _autocast = (self.precision == Precision::Bf16Autocast).then(|| AutocastGuard::bf16(cfg.device));
            let scale = 1.0 / targets.max(1) as f64;
            micro_step(&self.model, self.hidden.as_ref(), &mb, cfg, scale, &mut sums, i == 0)?;
        }
        let (mut loss_sum, mut kd_sum, mut ce_sum, mut hidden_sum) = sums.read();
        let communication_started = Instant::now();
        if let Some(p) = &self.parallel {
            let all = p.sum(&[loss_sum, kd_sum, ce_sum, hidden_sum, sums.router_balance], step + 1)?;
            (loss_sum, kd_sum, ce_sum, hidden_sum, sums.router_balance) = (all[0], all[1], all[2], all[3], all[4]);
        }
        if !loss_sum.is_finite() {
            let ids: Vec<u64> = micro.iter().flat_map(|m| m.row_indices.iter().copied()).collect();
            bail!(
                "step {}: the loss is {loss_sum} (rows {ids:?}{}); stopping, the last good checkpoint is kept",
                step + 1,
                if ranks > 1 { " of this rank; other ranks' rows in their own messages" } else { "" }
            );
        }
        if let Some(p) = &self.parallel {
            p.reduce_grads(&self.params, step + 1)?;
        }
        let mut communication = communication_started.elapsed();
        let optimizer_started = Instant::now();
        let grad_norm = clip_grad_norm(&self.params, cfg.clip_norm);
        let lr = cfg.schedule().lr(step);
        self.opt.step(lr);
        let optimizer = optimizer_started.elapsed();
        if let Some(p) = &self.parallel {
            let gathering = Instant::now();
            p.gather_weights(&self.opt, &self.params, step + 1)?;
            communication += gathering.elapsed();
        }
        let position = counts.last().map_or(self.state.position, |m| m.position);
        self.state = TrainerState { step: step + 1, optimizer_steps: self.opt.steps, position, seed: cfg.seed };
        let n = targets.max(1) as f64;
        Ok(StepLog {
            step: step + 1,
            lr,
            loss: loss_sum,
            kd: kd_sum / n,
            ce: ce_sum / n,
            hidden: hidden_sum / n,
            router_balance: (cfg.router_aux_weight > 0.0).then_some(sums.router_balance),
            grad_norm,
            tokens,
            targets,
            padding: 1.0 - tokens as f64 / padded.max(1) as f64,
            gpu_memory_bytes: cfg.device.is_cuda().then(crate::runtime::cuda_memory_in_use).flatten(),
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            time: StepTime {
                data: data.as_secs_f64(),
                head: sums.head_time.as_secs_f64(),
                body: (communication_started - started - data - sums.head_time).as_secs_f64(),
                optimizer: optimizer.as_secs_f64(),
                communication: self.parallel.is_some().then_some(communication.as_secs_f64()),
            },
            state_bytes: StateBytes::measure(&self.params, &self.opt),
        })
    }

    /// The next `n` micro-batches of the stream (one step's, over all ranks): what is
    /// known of each, and those this process builds.
    fn next_micro_batches(&mut self, n: usize) -> Result<(Vec<BatchCounts>, Vec<MicroBatch>)> {
        let (mut counts, mut mine) = (vec![], vec![]);
        for _ in 0..n {
            let Some(loaded) = self.loader.next_loaded()? else { bail!("the shard stream ended") };
            counts.push(loaded.counts());
            if let Loaded::Mine(m) = loaded {
                mine.push(*m);
            }
        }
        Ok((counts, mine))
    }

    /// A checkpoint of the state after the last step, then the loss plot.
    fn save_checkpoint(&mut self) -> Result<()> {
        let optimizer_state = match &self.parallel {
            Some(p) => p.optimizer_state(&self.opt, &self.named, self.state.step)?,
            None => Some(self.opt.state()),
        };
        // Rank 0 writes; the others have contributed their moments (ZeRO-1) and go on.
        let (Some(optimizer_state), Some(metrics)) = (optimizer_state, &mut self.metrics) else { return Ok(()) };
        metrics.flush()?;
        let checkpoint = Checkpoint {
            model: &self.model,
            tokenizer_dir: &self.cfg.student,
            hidden: self.hidden.as_ref(),
            optimizer_state: &optimizer_state,
            state: &self.state,
        };
        checkpoint.save(&self.cfg.output, self.cfg.keep_last)?;
        // The plot is a by-product: failing to draw it does not stop training.
        if let Err(e) = super::plot::plot_run(&self.cfg.output) {
            eprintln!("warning: no loss plot: {e:#}");
        }
        Ok(())
    }
}

/// Micro-batches from the stream position of `state`, built ahead on a thread.
/// The teacher's targets in the student's tokens, made in `OUTPUT/student-targets` by
/// the first run and reused by later ones (and by every rank of a data-parallel run,
/// which only reads them).
fn student_side_set(cfg: &TrainConfig, c: &CrossTokenizerSettings) -> Result<ShardSet> {
    let dir = cfg.output.join(run_dir::STUDENT_TARGETS_DIR);
    let several = cfg.world.as_ref().is_some_and(|w| w.world > 1);
    if several && !Manifest::load(&dir).is_ok_and(|m| m.complete) {
        bail!(
            "--cross-tokenizer with several processes: {} does not hold the student-side targets yet; make them with one process first (e.g. --steps 1 --stop-at 1), then --resume",
            dir.display()
        );
    }
    let made = student_targets(&cfg.shards, c.teacher_tokenizer.as_deref(), &cfg.student, &dir)?;
    if let Some(s) = made.stats {
        eprintln!(
            "student-side targets in {}: {} groups ({} of one token on each side) cover {} of the teacher's {} targets; {} rows, {} tokens",
            made.dir.display(),
            s.groups,
            s.one_to_one,
            s.aligned_targets,
            s.teacher_targets,
            made.manifest.shards.iter().map(|e| e.rows).sum::<usize>(),
            made.manifest.total_tokens()
        );
    }
    ShardSet::open(&made.dir, false)
}

fn batch_loader(
    cfg: &TrainConfig,
    set: &Arc<ShardSet>,
    targets: Option<TargetOptions>,
    hidden: Option<&HiddenDistill>,
    state: &TrainerState,
    share: Share,
) -> BatchLoader {
    let stream = RowStream::new(
        set.clone(),
        StreamOptions { seed: cfg.seed, window: 8, prefetch: 2, epochs: None, shuffle: cfg.shuffle },
        state.position,
    );
    let content = BatchContent {
        teacher: targets,
        hidden_layers: hidden.map(|h| h.teacher_layers()).unwrap_or_default(),
        // A set moved to the student's tokens (by --cross-tokenizer or cross-tokenize).
        uld: set.manifest.settings.capture.cross_tokenizer.is_some() && targets.is_some(),
    };
    let pack_to = cfg.pack_to(set.manifest.settings.data.max_len);
    let feed = Feed::new(stream, FeedOptions { batch_tokens: cfg.batch_tokens, pack_to });
    BatchLoader::shared(feed, content, cfg.device, 2 * cfg.grad_accum.max(1) * share.of, share)
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
    /// Sum over micro-batches of (their share of the step's trained tokens) x (their
    /// load-balancing loss).
    router_balance: f64,
    /// Wall time inside the head and its losses.
    head_time: std::time::Duration,
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
    /// The step's first micro-batch: gradients hold nothing of this step yet.
    fresh: bool,
}

impl StepLosses for MicroLosses<'_> {
    fn on_last(&mut self, last: &Tensor) -> Result<Tensor> {
        let (cfg, mb) = (self.cfg, self.mb);
        let width = last.size()[2];
        let h = last.reshape([-1, width]).index_select(0, &mb.batch.predicting);
        let head = self.model.transformer.lm_head_weight();
        let chunk = cfg.head_chunk.unwrap_or_else(|| {
            chunk_positions(self.model.config.vocab_size, default_logits_budget(self.model.output_device()))
        });
        let loss = HeadLoss {
            next_tokens: &mb.batch.next_tokens,
            teacher: mb.teacher.as_ref(),
            kd: cfg.kd,
            alpha: cfg.alpha,
            logit_softcap: self.model.transformer.final_softcap(),
        };
        let started = Instant::now();
        // The head's gradient goes straight into its `.grad()` when that holds nothing
        // of this step yet and is float32 (no `[V, H]` buffer and surrogate); a later
        // micro-batch's enters through autograd, which adds it as it adds each
        // micro-batch's gradient (so N micro-batches in one process sum exactly as N
        // ranks do).
        let existing = head.grad();
        let direct = self.fresh && existing.defined() && existing.kind() == Kind::Float;
        let into = if direct { existing } else { Tensor::zeros(head.size(), (Kind::Float, head.device())) };
        let mut out = fused_head_loss_into(&h.detach(), head, &loss, chunk, self.scale, into)?;
        if let Some(u) = &mb.uld {
            let weight = (1.0 - cfg.alpha) * cfg.uld_weight;
            if u.groups() > 0 && weight > 0.0 {
                let softcap = self.model.transformer.final_softcap();
                let g = uld_gradients(&h, head, &mb.batch.next_tokens, u, weight * self.scale, softcap);
                out.grad_hidden += g.grad_hidden.to_kind(out.grad_hidden.kind());
                let _ = out.grad_head.g_add_(&g.grad_head);
                self.sums.loss.push(g.sum.shallow_clone() * (weight * self.scale));
                self.sums.kd.push(g.sum);
            }
        }
        self.sums.head_time += started.elapsed();
        self.sums.loss.push(out.loss);
        self.sums.kd.push(out.kd_sum);
        self.sums.ce.push(out.ce_sum);
        // The gradients enter the graph through the surrogates sum(h * dL/dh) (the body)
        // and, unless added in place above, sum(W * dL/dW) (the head, tied or not).
        let body = (&h * out.grad_hidden).sum(Kind::Float);
        if direct {
            return Ok(body);
        }
        Ok(body + (head * out.grad_head).sum(Kind::Float))
    }

    fn fresh_gradients(&self) -> bool {
        self.fresh
    }

    /// Each micro-batch's balance loss counts by its share of the step's trained tokens,
    /// as every other term does (`scale` = 1 / the step's trained tokens).
    fn router_balance_weight(&self) -> f64 {
        self.cfg.router_aux_weight * self.mb.targets as f64 * self.scale
    }

    fn on_router_balance(&mut self, loss: f64) {
        self.sums.router_balance += loss * self.mb.targets as f64 * self.scale;
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

/// ULD's sum over a micro-batch's groups and its gradients (times `scale`) with respect
/// to the trained positions' hidden states `[P, H]` and the head, by autograd on the
/// rows of the groups' positions: the cross-tokenizer term beside the fused head's.
struct UldGradients {
    sum: Tensor,
    grad_hidden: Tensor,
    grad_head: Tensor,
}

fn uld_gradients(
    h: &Tensor,
    head: &Tensor,
    labels: &Tensor,
    u: &UldBatch,
    scale: f64,
    softcap: Option<f64>,
) -> UldGradients {
    let mut grad_hidden = Tensor::zeros(h.size(), (Kind::Float, h.device()));
    let mut grad_head = Tensor::zeros(head.size(), (Kind::Float, head.device()));
    let mut sum = Tensor::zeros([], (Kind::Double, h.device()));
    // Logits of at most 16M values (64 MiB) at a time.
    let vocab = head.size()[0];
    for piece in u.pieces((1 << 24) / vocab.max(1)) {
        let (rows, local) = piece.gathered();
        let h_sel = h.detach().index_select(0, &rows).to_kind(Kind::Float).set_requires_grad(true);
        let w = head.detach().to_kind(Kind::Float).set_requires_grad(true);
        let log_q = head_logits(&h_sel, &w, softcap).log_softmax(-1, Kind::Float);
        let per_group = uld_per_group(&log_q, &labels.index_select(0, &rows), &local);
        (per_group.sum(Kind::Float) * scale).backward();
        grad_hidden = grad_hidden.index_add(0, &rows, &h_sel.grad());
        grad_head += w.grad();
        sum += per_group.detach().sum(Kind::Double);
    }
    UldGradients { sum, grad_hidden, grad_head }
}

/// Forward, chunked head + losses, hidden-state terms and backward for one micro-batch.
fn micro_step(
    model: &CausalLm,
    hidden: Option<&HiddenDistill>,
    mb: &MicroBatch,
    cfg: &TrainConfig,
    scale: f64,
    sums: &mut LossSums,
    fresh: bool,
) -> Result<()> {
    let capture = hidden.map(|h| h.student_layers()).unwrap_or_default();
    let mut losses = MicroLosses { model, hidden, mb, cfg, scale, sums, fresh };
    model.transformer.forward_backward(&mb.batch.input(), &capture, cfg.recompute, &mut losses)
}
