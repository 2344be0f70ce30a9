//! The output directory of `distill train`: a run writes only into an empty or absent
//! directory, or, with `--resume`, into a run it recognises (every entry is one a run
//! writes) made with the same student, shards and settings, which `run.json` records.
//! `check` decides without writing; `start` creates the directory, records the run and
//! drops the metrics of steps a resumed run will redo.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

use super::checkpoint::latest_checkpoint;
use super::config::TrainConfig;
use super::moments::MomentStorage;
use crate::files::{checksum_bytes, checksum_file, dir_entries, write_atomic};
use crate::shards::manifest::{json_diff, Manifest};

pub const RUN_FILE: &str = "run.json";
/// The teacher's targets in the student's tokens (`--cross-tokenizer`), made by the run.
pub const STUDENT_TARGETS_DIR: &str = "student-targets";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// TensorBoard's event files, unless `--tensorboard` puts them elsewhere.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// Held (flock) by the process writing the run, so that a second one is refused.
pub const LOCK_FILE: &str = ".lock";
const FORMAT: &str = "distill-run";

/// What a run was made with; a resumed run must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: String,
    /// The student's config.json and tokenizer.json (by content: the directory may move).
    pub student: Json,
    /// The shard set: its settings and the checksums of its shards.
    pub shards: Json,
    /// Every option that changes what is learned. Options that do not (the device,
    /// precision, recomputation, head chunk, checkpoint cadence, steps and stop, where
    /// the optimiser's state lives) may differ between a run and its resumption.
    pub settings: Json,
}

impl RunRecord {
    pub fn new(cfg: &TrainConfig, shards: &Manifest) -> Result<Self> {
        let cross_shards = shards.settings.capture.cross_tokenizer.is_some();
        let student = serde_json::json!({
            "path": cfg.student.display().to_string(),
            "config": checksum_file(&cfg.student.join("config.json"))?,
            "tokenizer": checksum_file(&cfg.student.join("tokenizer.json"))?,
        });
        let listed: String = shards.shards.iter().map(|s| s.checksum.as_str()).collect();
        let shards = serde_json::json!({
            "path": cfg.shards.display().to_string(),
            "content": checksum_bytes(listed.as_bytes()),
            "settings": serde_json::to_value(&shards.settings)?,
        });
        let h = cfg.hidden.as_ref();
        // The schedule's shape without `total_steps`: a resumed run may run longer.
        let mut schedule = serde_json::to_value(cfg.schedule)?;
        schedule.as_object_mut().map(|o| o.remove("total_steps"));
        let settings = serde_json::json!({
            "batch_tokens": cfg.batch_tokens,
            "pack": cfg.pack,
            "seq_len": cfg.seq_len,
            // Micro-batches per optimiser step over all ranks: 2 ranks x 1 and 1 rank x 2
            // train on the same batches, so either may resume the other.
            "grad_accum": cfg.grad_accum * cfg.world.as_ref().map_or(1, |w| w.world),
            "schedule": schedule,
            "adamw": format!("{:?}", cfg.adamw),
            "clip_norm": cfg.clip_norm,
            "alpha": cfg.alpha,
            "kd": format!("{:?}", cfg.kd),
            "label_bucket": cfg.label_bucket,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "hidden": h.map(|h| format!("{:?} weight {} {:?}", h.maps, h.weight, h.loss)),
        });
        // Recorded only when on, so that runs recorded before the option still resume.
        let mut settings = settings;
        if cfg.router_aux_weight > 0.0 {
            settings["router_aux_weight"] = cfg.router_aux_weight.into();
        }
        if cfg.cross_tokenizer.is_some() || cross_shards {
            settings["uld_weight"] = cfg.uld_weight.into();
        }
        if cfg.cross_tokenizer.is_some() {
            settings["cross_tokenizer"] = true.into();
        }
        // The moments' and weights' storage change the arithmetic of every step (where
        // the state lives, --offload-optimizer, does not).
        if cfg.memory.moments != MomentStorage::Float32 {
            settings["optimizer_moments"] = cfg.memory.moments.name().into();
        }
        if cfg.memory.bf16_weights {
            settings["weights"] = "bf16".into();
        }
        Ok(RunRecord { format: FORMAT.into(), student, shards, settings })
    }

    /// The record as JSON without its paths: what two runs of one job share even when
    /// a directory moved (or is mounted elsewhere on another node).
    pub fn without_paths(&self) -> Json {
        let mut v = serde_json::to_value(self).expect("a record is JSON");
        for part in ["student", "shards"] {
            if let Some(o) = v.get_mut(part).and_then(Json::as_object_mut) {
                o.remove("path");
            }
        }
        v
    }

    /// The fields where `self` (this invocation) and `recorded` differ; paths are
    /// recorded, not compared (a directory may move).
    fn differences(&self, recorded: &RunRecord) -> Vec<String> {
        json_diff(&self.without_paths(), &recorded.without_paths())
    }
}

/// The checkpoint to resume from, after checking that `cfg.output` may be written by
/// this run; writes nothing.
pub fn check(cfg: &TrainConfig, record: &RunRecord) -> Result<Option<PathBuf>> {
    let out = &cfg.output;
    // The lock file alone is what a run that stopped before its first write leaves.
    let names: Vec<String> = dir_entries(out)?.into_iter().filter(|n| n != LOCK_FILE).collect();
    let Some(first) = names.first() else { return Ok(None) };
    if !cfg.resume {
        bail!(
            "{} already holds {first}: continue the run there with --resume, or choose an empty or new --output",
            out.display()
        );
    }
    if let Some(other) = names.iter().find(|n| !is_run_entry(n)) {
        bail!(
            "{}: holds {other}, which is not part of a training run; --resume continues only a run of distill train",
            out.display()
        );
    }
    let run_file = out.join(RUN_FILE);
    if run_file.exists() {
        let text = std::fs::read_to_string(&run_file).with_context(|| format!("cannot read {}", run_file.display()))?;
        let recorded: RunRecord = serde_json::from_str(&text)
            .ok()
            .filter(|r: &RunRecord| r.format == FORMAT)
            .with_context(|| format!("{}: not a distill run record", run_file.display()))?;
        let diff = record.differences(&recorded);
        if !diff.is_empty() {
            bail!(
                "{}: the run there was made with another student, other shards or other settings:\n  {}\nresume it with those, or start a new run in another --output",
                run_file.display(),
                diff.join("\n  ")
            );
        }
    }
    latest_checkpoint(out)
}

/// The run folder held by this process for as long as the value lives: another `train`
/// on the same --output (a `--resume` while this run writes, say) is refused, naming
/// this process. The operating system drops the lock when the process ends, however it
/// ends, so an interrupted run never leaves a stale one.
pub struct RunLock {
    _file: std::fs::File,
    dir: PathBuf,
    created_dir: bool,
}

pub fn lock(out: &Path) -> Result<RunLock> {
    let created_dir = !out.exists();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let path = out.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{}: another distill train (process {}) is writing this run; wait for it to end, or choose another --output",
                out.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => bail!("cannot lock {}: {e}", path.display()),
    }
    use std::io::Write;
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(RunLock { _file: file, dir: out.to_path_buf(), created_dir })
}

impl Drop for RunLock {
    /// A run that stopped before writing anything leaves the folder as it found it.
    fn drop(&mut self) {
        if dir_entries(&self.dir).is_ok_and(|n| n == [LOCK_FILE]) {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            if self.created_dir {
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// Creates the output directory, records the run and opens `metrics.jsonl` for
/// appending, without the lines of steps after `resumed_step` (a resumed run redoes them).
pub fn start(out: &Path, record: &RunRecord, resumed_step: u64) -> Result<std::fs::File> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create the output directory {}", out.display()))?;
    write_atomic(&out.join(RUN_FILE), &serde_json::to_vec_pretty(record)?)?;
    let metrics = out.join(METRICS_FILE);
    if metrics.exists() {
        let text = std::fs::read_to_string(&metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
        let step_of = |line: &str| serde_json::from_str::<Json>(line).ok().and_then(|v| v["step"].as_u64());
        let kept: Vec<&str> = text.lines().filter(|l| step_of(l).is_some_and(|s| s <= resumed_step)).collect();
        if kept.len() != text.lines().count() {
            let mut bytes = kept.join("\n").into_bytes();
            if !bytes.is_empty() {
                bytes.push(b'\n');
            }
            write_atomic(&metrics, &bytes)?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .with_context(|| format!("cannot write {}", metrics.display()))
}

/// What a run of distill train writes into its directory.
fn is_run_entry(name: &str) -> bool {
    let checkpoint = |n: &str| n.strip_prefix("checkpoint-").is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
    matches!(
        name,
        RUN_FILE
            | METRICS_FILE
            | LOCK_FILE
            | TENSORBOARD_DIR
            | STUDENT_TARGETS_DIR
            | "loss.png"
            | "loss.png.tmp"
            | "run.tmp-distill"
            | "metrics.tmp-distill"
    ) || checkpoint(name)
        || name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")).is_some_and(checkpoint)
}
