//! `distill precompute`: run the teacher once over a dataset and write its top-k
//! targets and chosen hidden states to zstd Parquet shards with a manifest.
//!
//! Resuming is the default: a rerun into the same output directory with the same
//! settings verifies the shards listed in the manifest and continues after them. A
//! run with other settings is refused with the differing fields named.
pub mod pipeline;
pub mod plan;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Kind};

use crate::capture::CaptureSettings;
use crate::dataset::FieldNames;
use crate::shards::manifest::{settings_diff, Manifest, Slice};
use crate::shards::writer::{file_checksum, ParquetOptions};
use pipeline::{jobs_for, Pass};
use plan::{plan_batches, plan_shards, prepare};

#[derive(Debug, Clone)]
pub struct PrecomputeConfig {
    pub teacher: PathBuf,
    pub inputs: Vec<String>,
    pub output: PathBuf,
    pub fields: FieldNames,
    pub max_len: usize,
    pub pack: bool,
    pub top_k: usize,
    pub hidden_layers: Vec<usize>,
    /// One teacher replica per entry; an entry of several devices splits that replica
    /// by layers over them.
    pub devices: Vec<Vec<Device>>,
    pub dtype: Kind,
    /// Padded tokens per teacher batch.
    pub batch_tokens: usize,
    pub shard_tokens: usize,
    pub parquet: ParquetOptions,
    pub slice: Slice,
    pub skip_invalid: bool,
    /// Targets for every token, not only responses / assistant turns.
    pub train_on_all_tokens: bool,
    /// Delete an existing shard set in `output` instead of resuming it.
    pub overwrite: bool,
    pub progress: bool,
    /// Upper bound on elements of one float32 `[positions, vocab]` logits chunk.
    pub max_logit_elements: i64,
}

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
}

impl Summary {
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }

    /// Share of wall time the teacher devices spent in forward + capture.
    pub fn busy_share(&self) -> f64 {
        self.teacher_busy.as_secs_f64() / (self.wall.as_secs_f64() * self.devices.max(1) as f64).max(1e-9)
    }
}

pub fn run(cfg: &PrecomputeConfig) -> Result<Summary> {
    let prepared = prepare(cfg)?;
    let dir = &cfg.output;
    let mut manifest = open_output(cfg, &prepared.settings, prepared.skipped.clone())?;
    let shards = plan_shards(&prepared.rows, cfg.shard_tokens);
    manifest.planned_shards = shards.len();
    let done = manifest.shards.len();
    if done > shards.len() {
        bail!("{}: the manifest lists {done} shards but this run plans {}", dir.display(), shards.len());
    }
    let resumed_tokens: usize = manifest.total_tokens();
    let pending: Vec<(usize, Vec<Vec<usize>>)> = shards
        .iter()
        .enumerate()
        .skip(done)
        .map(|(j, range)| (j, plan_batches(&prepared.rows, range.clone(), cfg.batch_tokens)))
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
            hidden_layers: cfg.hidden_layers.clone(),
            vocab_limit: prepared.settings.tokenizer.vocab_size,
            max_logit_elements: cfg.max_logit_elements,
        },
        settings_json: serde_json::to_string(&prepared.settings)?,
        on_progress: &on_progress,
    };
    let stats = pass.run(jobs_for(pending), dir, &mut manifest)?;
    bar.finish_and_clear();
    manifest.complete = manifest.shards.len() == shards.len();
    manifest.save(dir)?;
    Ok(Summary {
        rows: manifest.shards.iter().map(|s| s.rows).sum(),
        tokens: manifest.total_tokens(),
        targets: manifest.shards.iter().map(|s| s.targets).sum(),
        shards: manifest.shards.len(),
        resumed_shards: done,
        tokens_this_run: manifest.total_tokens() - resumed_tokens,
        bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
        wall: stats.wall,
        teacher_busy: stats.teacher_busy,
        devices: cfg.devices.len(),
        invalid_rows: manifest.skipped.invalid_rows,
        truncated_examples: manifest.skipped.truncated_examples,
    })
}

/// Creates the output directory, or checks and resumes the shard set already in it.
fn open_output(
    cfg: &PrecomputeConfig,
    settings: &crate::shards::manifest::Settings,
    skipped: crate::shards::manifest::SkipReport,
) -> Result<Manifest> {
    let dir = &cfg.output;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let manifest_path = Manifest::path(dir);
    if cfg.overwrite {
        remove_shard_set(dir)?;
    }
    let fresh = Manifest::new(settings.clone(), cfg.slice, 0, skipped);
    if !manifest_path.exists() {
        let stray: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".tmp"))
            .collect();
        if !stray.is_empty() {
            bail!("{}: not empty and not a shard set (found {}); choose an empty --output", dir.display(), stray[0]);
        }
        remove_temporaries(dir)?;
        fresh.save(dir)?;
        return Ok(fresh);
    }
    let existing = Manifest::load(dir)?;
    let diff = settings_diff(settings, &existing.settings);
    if !diff.is_empty() || existing.slices != vec![cfg.slice] {
        let mut lines = diff;
        if existing.slices != vec![cfg.slice] {
            lines.push(format!("slices: {:?} there, {:?} here", existing.slices, vec![cfg.slice]));
        }
        bail!(
            "{} holds shards made with other settings:\n  {}\nuse another --output, or --overwrite to replace them",
            manifest_path.display(),
            lines.join("\n  ")
        );
    }
    for shard in &existing.shards {
        let path = dir.join(&shard.file);
        let checksum =
            file_checksum(&path).with_context(|| format!("{}: listed shard is unreadable", path.display()))?;
        if checksum != shard.checksum {
            bail!(
                "{}: checksum {checksum} does not match the manifest's {}; the shard is corrupt",
                path.display(),
                shard.checksum
            );
        }
    }
    remove_temporaries(dir)?;
    Ok(Manifest { skipped: fresh.skipped, ..existing })
}

/// Half-written shards of an interrupted run: never listed, safe to delete.
fn remove_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

fn remove_shard_set(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let ours = name == crate::shards::manifest::MANIFEST_FILE
            || (name.starts_with("shard-") && (name.ends_with(".parquet") || name.ends_with(".tmp")));
        if ours {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
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
