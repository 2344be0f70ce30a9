//! The training loop: rows from the shards -> padded batches -> student forward ->
//! chunked head + losses (KD on the teacher's targets mixed with hard-label CE by
//! `alpha`; `alpha = 1` is plain SFT on the same tokens) -> AdamW -> checkpoints.
//! Losses are normalised by the count of trained tokens over the whole accumulated
//! step, and every loss part is logged on its own. In a data-parallel job (`parallel`)
//! "the step" spans every rank's micro-batches.
use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

use super::autocast::AutocastGuard;
use super::batches::batch_loader;
use super::checkpoint::{restore, Checkpoint, TrainerState};
use super::config::{Precision, TrainConfig};
use super::extras::{hidden_distill, student_side_set};
use super::hidden::HiddenDistill;
use super::log::{RunLog, StateBytes, StepLog, StepTime};
use super::optim::{clip_grad_norm, AdamW};
use super::parallel::Parallel;
use super::run_dir::{self, RunRecord};
use super::step::{micro_step, LossSums};
use super::tensorboard::check_dir;
use crate::batch::feed::{BatchCounts, BatchLoader, Loaded, MicroBatch, Share};
use crate::files::checksum_file;
use crate::model::CausalLm;
use crate::shards::reader::ShardSet;

/// Trains the student as `cfg` says, calling `on_step` after every optimiser step;
/// returns the logs of the steps this call ran.
pub fn train(cfg: &TrainConfig, mut on_step: impl FnMut(&StepLog)) -> Result<Vec<StepLog>> {
    let mut run = Run::setup(cfg)?;
    let end = cfg.stop_at.map_or(cfg.steps, |s| s.min(cfg.steps));
    let mut logs = vec![];
    let mut steps = || -> Result<()> {
        for step in run.state.step..end {
            let log = run.step(step)?;
            if let Some(run_log) = &mut run.log {
                run_log.write(&log)?;
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
    log: Option<RunLog>,
    parallel: Option<Parallel>,
    /// Rank 0's (or the only process's) hold on the run folder.
    _lock: Option<run_dir::RunLock>,
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
        if let Some(dir) = &cfg.tensorboard {
            check_dir(dir, resume_from.is_some())?;
        }
        // Every check of the folder has passed: hold it before the first write.
        let writes = cfg.world.as_ref().is_none_or(|w| w.rank == 0);
        let lock = writes.then(|| run_dir::lock(&cfg.output)).transpose()?;
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
        if let Some(c) = &cfg.cross_tokenizer {
            // Made once, by rank 0 (or the only process); the other ranks read them.
            let made = match &parallel {
                Some(p) => p.first_makes("the student-side targets", || student_side_set(cfg, c))?,
                None => Some(student_side_set(cfg, c)?),
            };
            set = Arc::new(match made {
                Some(set) => set,
                None => student_side_set(cfg, c)?,
            });
            set.check_student(&tokenizer_hash, config.vocab_size, false)?;
        }
        let targets = cfg.target_options(&set.manifest.settings.capture)?;
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
        let log = first.then(|| RunLog::start(cfg, &record, state.step)).transpose()?;
        let share = parallel.as_ref().map_or(Share::ALL, Parallel::share);
        let loader = batch_loader(cfg, &set, targets, hidden.as_ref(), &state, share);
        let precision = cfg.resolved_precision();
        Ok(Run { cfg, model, hidden, named, params, opt, loader, state, precision, log, parallel, _lock: lock })
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
        crate::runtime::release_idle_cpu_blocks();
        let optimizer = optimizer_started.elapsed();
        if let Some(p) = &self.parallel {
            let gathering = Instant::now();
            p.gather_weights(&self.opt, &self.params, step + 1)?;
            communication += gathering.elapsed();
        }
        let position = counts.last().map_or(self.state.position, |m| m.position);
        self.state = TrainerState { step: step + 1, optimizer_steps: self.opt.steps, position, seed: cfg.seed };
        let n = targets.max(1) as f64;
        let resident = crate::runtime::resident_memory();
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
            resident_bytes: resident.map(|r| r.0),
            peak_resident_bytes: resident.map(|r| r.1),
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
        let (Some(optimizer_state), Some(log)) = (optimizer_state, &mut self.log) else { return Ok(()) };
        log.flush()?;
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
