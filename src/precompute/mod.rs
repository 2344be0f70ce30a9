//! `distill precompute`: run the teacher once over a dataset and write its top-k
//! targets and chosen hidden states to zstd Parquet shards with a manifest.
//!
//! Resuming is the default: a rerun into the same output directory with the same
//! settings verifies the shards listed in the manifest and continues after them. A
//! run with other settings is refused with the differing fields named.
pub mod capture;
pub mod config;
pub mod pipeline;
pub mod plan;
pub mod replies;
pub mod served;

use anyhow::{bail, Context, Result};
use std::time::Duration;

use crate::dataset::sequence::Sequence;
use crate::model::CausalLm;
use crate::shards::dir::{OutputPlan, ShardDir};
use crate::shards::manifest::Manifest;
use crate::shards::row::{HiddenTargets, ShardRow, TopKTargets};
use crate::shards::writer::ShardWriter;
use capture::{CaptureSettings, DrawSettings};
pub use config::PrecomputeConfig;
use pipeline::{jobs_for, Pass};
use plan::{plan_batches, plan_shards, prepare};

#[derive(Debug, Clone)]
pub struct Summary {
    pub rows: usize,
    pub tokens: usize,
    pub targets: usize,
    pub shards: usize,
    pub resumed_shards: usize,
    /// Tokens written by this run (not by the run it resumed).
    pub tokens_this_run: usize,
    pub bytes: u64,
    pub wall: Duration,
    pub teacher_busy: Duration,
    pub devices: usize,
    pub invalid_rows: usize,
    pub truncated_examples: usize,
    /// What the stored targets lose (`shards::audit`).
    pub audit: Option<crate::shards::audit::AuditSummary>,
}

impl Summary {
    /// The run that left `manifest` as it is, after resuming at shard `resumed_shards`
    /// holding `resumed_tokens`.
    pub fn of(
        manifest: &Manifest,
        resumed_shards: usize,
        resumed_tokens: usize,
        wall: Duration,
        teacher_busy: Duration,
        devices: usize,
    ) -> Self {
        Summary {
            rows: manifest.shards.iter().map(|s| s.rows).sum(),
            tokens: manifest.total_tokens(),
            targets: manifest.shards.iter().map(|s| s.targets).sum(),
            shards: manifest.shards.len(),
            resumed_shards,
            tokens_this_run: manifest.total_tokens() - resumed_tokens,
            bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
            wall,
            teacher_busy,
            devices,
            invalid_rows: manifest.skipped.invalid_rows,
            truncated_examples: manifest.skipped.truncated_examples,
            audit: manifest.audit_sums().map(|a| a.summary()),
        }
    }

    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }

    /// Share of wall time the teacher devices spent in forward + capture.
    pub fn busy_share(&self) -> f64 {
        self.teacher_busy.as_secs_f64() / (self.wall.as_secs_f64() * self.devices.max(1) as f64).max(1e-9)
    }
}

pub fn run(cfg: &PrecomputeConfig) -> Result<Summary> {
    cfg.validate()?;
    let prepared = prepare(cfg)?;
    let shards = plan_shards(&prepared.rows, cfg.shard_tokens);
    let plan = OutputPlan::check(&cfg.output, &prepared.settings, cfg.slice, cfg.overwrite)?;
    let done = plan.listed_shards();
    if done > shards.len() {
        bail!("{}: the manifest lists {done} shards but this run plans {}", cfg.output.display(), shards.len());
    }
    // The first replica loads before the output is touched: a teacher that cannot be
    // loaded leaves the directory as it was.
    let first_replica = if done < shards.len() {
        let devices = &cfg.devices[0];
        let model = CausalLm::load_split(&cfg.teacher, devices, cfg.teacher_dtype())
            .with_context(|| format!("loading the teacher on {devices:?}"))?;
        Some(model)
    } else {
        None
    };
    let (out, mut manifest) = plan.open(&prepared.settings, cfg.slice, prepared.skipped.clone())?;
    manifest.source_examples = prepared.source_examples.clone();
    let dir = &out.dir;
    manifest.planned_shards = shards.len();
    let resumed_tokens: usize = manifest.total_tokens();
    let pending: Vec<(usize, Vec<Vec<usize>>)> = shards
        .iter()
        .enumerate()
        .skip(done)
        .map(|(j, range)| (j, plan_batches(&prepared.rows, range.clone(), cfg.batch_tokens())))
        .collect();
    let total_tokens: usize = prepared.rows.iter().map(|r| r.len()).sum();
    let bar = progress_bar(cfg.progress, total_tokens as u64, resumed_tokens as u64);
    let sequences = std::sync::atomic::AtomicUsize::new(manifest.shards.iter().map(|s| s.rows).sum());
    let on_progress = |rows: usize, tokens: usize| {
        let done = sequences.fetch_add(rows, std::sync::atomic::Ordering::Relaxed) + rows;
        bar.set_message(format!("{done}/{} sequences", prepared.rows.len()));
        bar.inc(tokens as u64);
    };
    let pass = Pass {
        cfg,
        rows: &prepared.rows,
        layout: &prepared.layout,
        capture: CaptureSettings {
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            min_k: cfg.min_k,
            audit_temperatures: cfg.audit_temperatures(),
            draws: (cfg.sample > 0).then_some(DrawSettings { per_position: cfg.sample, seed: cfg.sample_seed }),
            hidden_layers: cfg.hidden_layers.clone(),
            vocab_limit: prepared.settings.tokenizer.vocab_size,
        },
        settings_json: serde_json::to_string(&prepared.settings)?,
        on_progress: &on_progress,
    };
    let stats = pass.run(jobs_for(pending), first_replica, dir, &mut manifest)?;
    bar.finish_and_clear();
    close(&out, &mut manifest, shards.len())?;
    Ok(Summary::of(&manifest, done, resumed_tokens, stats.wall, stats.teacher_busy, cfg.devices.len()))
}

/// Writes (or resumes) the shard set of `cfg` over `prepared`'s rows with targets that
/// come from elsewhere than a teacher forward pass here: captured while generating
/// (`replies`) or returned by a server (`served`). `targets` gives each row's, in order.
pub fn write_without_teacher(
    cfg: &PrecomputeConfig,
    prepared: &plan::Prepared,
    mut targets: impl FnMut(&Sequence) -> Result<(TopKTargets, Vec<HiddenTargets>)>,
) -> Result<Summary> {
    let started = std::time::Instant::now();
    let shards = plan_shards(&prepared.rows, cfg.shard_tokens);
    let plan = OutputPlan::check(&cfg.output, &prepared.settings, cfg.slice, cfg.overwrite)?;
    let done = plan.listed_shards();
    let (out, mut manifest) = plan.open(&prepared.settings, cfg.slice, prepared.skipped.clone())?;
    manifest.source_examples = prepared.source_examples.clone();
    manifest.planned_shards = shards.len();
    let settings_json = serde_json::to_string(&prepared.settings)?;
    let resumed_tokens = manifest.total_tokens();
    for (j, range) in shards.iter().enumerate().skip(done) {
        let mut writer = ShardWriter::create(&out.dir, j, prepared.layout.clone(), &cfg.parquet, &settings_json)?;
        let mut rows = Vec::with_capacity(range.len());
        for sequence in &prepared.rows[range.clone()] {
            let (topk, hidden) = targets(sequence)?;
            let row = ShardRow { sequence: sequence.clone(), topk, hidden };
            capture::check_finite(&row)?;
            rows.push(row);
        }
        writer.write(&rows)?;
        if cfg.crash_after_shards == Some(manifest.shards.len()) {
            std::process::abort(); // the resume tests' stand-in for `kill -9`
        }
        manifest.shards.push(writer.finish()?);
        manifest.save(&out.dir)?;
    }
    close(&out, &mut manifest, shards.len())?;
    // The teacher's time is the caller's (generation or the server's).
    Ok(Summary::of(&manifest, done, resumed_tokens, started.elapsed(), Duration::ZERO, 1))
}

/// Records whether all `planned` shards are written and, when they are, moves a staged
/// set into place: only a complete set replaces an old one.
fn close(out: &ShardDir, manifest: &mut Manifest, planned: usize) -> Result<()> {
    manifest.complete = manifest.shards.len() == planned;
    manifest.save(&out.dir)?;
    if manifest.complete {
        out.finish()?;
    }
    Ok(())
}

fn progress_bar(enabled: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {msg}  {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(done);
    bar.reset_eta();
    bar
}
