//! The life of a shard directory on the writing side. A command writes only into an
//! empty or absent directory, or into a shard set it recognises: every entry is a file
//! a shard set holds, and the manifest is distill's. Resuming needs the same settings;
//! replacing a set (`--overwrite`, or a merge) writes the new set under
//! `.distill-staging/` inside the directory and moves it into place only when it is
//! complete, so the old set survives any failure before that. All checks run before the
//! first byte is written (`OutputPlan::check`), the writes after (`OutputPlan::open`).
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::manifest::{settings_diff, Manifest, Settings, SkipReport, Slice, MANIFEST_FILE};
use crate::files::dir_entries;

/// Where a replacing set is written until it is complete.
pub const STAGING_DIR: &str = ".distill-staging";

/// What writing into a directory will do, decided without writing.
#[derive(Debug)]
pub struct OutputPlan {
    target: PathBuf,
    kind: PlanKind,
}

#[derive(Debug)]
enum PlanKind {
    /// Absent or empty (or holding only our leftovers): start a set there.
    Fresh,
    /// A set with the same settings: continue after its listed shards.
    Resume(Box<Manifest>),
    /// A set to replace: write the new one in the staging directory (resuming a staged
    /// set with the same settings), then move it into place.
    Replace { staged: Option<Box<Manifest>> },
}

/// A directory being written: `dir` receives the shards and the manifest; a staged
/// set is moved into `target` by `finish`.
#[derive(Debug)]
pub struct ShardDir {
    pub dir: PathBuf,
    target: PathBuf,
}

impl OutputPlan {
    /// Decides how a run with `settings` over `slice` writes into `target`; reads only.
    /// `replace` allows replacing a set made with other settings (`--overwrite`).
    pub fn check(target: &Path, settings: &Settings, slice: Slice, replace: bool) -> Result<Self> {
        let plan = |kind| Ok(OutputPlan { target: target.to_path_buf(), kind });
        let Some(existing) = recognise(target)? else { return plan(PlanKind::Fresh) };
        let manifest_path = Manifest::path(target);
        let same = |m: &Manifest| settings_diff(settings, &m.settings).is_empty() && m.slices == vec![slice];
        if replace {
            let staging = target.join(STAGING_DIR);
            let staged = match recognise(&staging)? {
                Some(m) if same(&m) => {
                    verify_listed(&staging, &m)?;
                    Some(Box::new(m))
                }
                _ => None,
            };
            return plan(PlanKind::Replace { staged });
        }
        if !same(&existing) {
            let mut lines = settings_diff(settings, &existing.settings);
            if existing.slices != vec![slice] {
                lines.push(format!("slices: {:?} there, {:?} here", existing.slices, vec![slice]));
            }
            bail!(
                "{} holds shards made with other settings:\n  {}\nuse another --output, or --overwrite to replace them",
                manifest_path.display(),
                lines.join("\n  ")
            );
        }
        verify_listed(target, &existing)?;
        plan(PlanKind::Resume(Box::new(existing)))
    }

    /// Shards already complete that the run continues after.
    pub fn listed_shards(&self) -> usize {
        match &self.kind {
            PlanKind::Fresh | PlanKind::Replace { staged: None } => 0,
            PlanKind::Resume(m) | PlanKind::Replace { staged: Some(m) } => m.shards.len(),
        }
    }

    /// Creates what the plan needs and returns where to write, with the manifest to
    /// extend (fresh, resumed or staged); it carries this run's `skipped` report.
    pub fn open(self, settings: &Settings, slice: Slice, skipped: SkipReport) -> Result<(ShardDir, Manifest)> {
        let fresh = Manifest::new(settings.clone(), slice, 0, skipped);
        let (dir, manifest) = match self.kind {
            PlanKind::Fresh => {
                create(&self.target)?;
                remove_leftovers(&self.target)?;
                fresh.save(&self.target)?;
                (self.target.clone(), fresh)
            }
            PlanKind::Resume(existing) => {
                remove_temporaries(&self.target)?;
                (self.target.clone(), Manifest { skipped: fresh.skipped, ..*existing })
            }
            PlanKind::Replace { staged } => {
                let staging = self.target.join(STAGING_DIR);
                match staged {
                    Some(existing) => {
                        remove_temporaries(&staging)?;
                        (staging, Manifest { skipped: fresh.skipped, ..*existing })
                    }
                    None => {
                        if staging.exists() {
                            std::fs::remove_dir_all(&staging)
                                .with_context(|| format!("cannot remove {}", staging.display()))?;
                        }
                        create(&staging)?;
                        fresh.save(&staging)?;
                        (staging, fresh)
                    }
                }
            }
        };
        Ok((ShardDir { dir, target: self.target }, manifest))
    }
}

/// A directory for a set made from others (a merge): `target` must be absent or empty;
/// the set is written in its staging directory and moved into place by `finish`.
pub fn create_staged(target: &Path) -> Result<ShardDir> {
    if recognise(target)?.is_some() {
        bail!("{} already holds a shard set", target.display());
    }
    let staging = target.join(STAGING_DIR);
    remove_leftovers_if_present(target)?;
    create(&staging)?;
    Ok(ShardDir { dir: staging, target: target.to_path_buf() })
}

fn remove_leftovers_if_present(dir: &Path) -> Result<()> {
    if dir.exists() {
        remove_leftovers(dir)?;
    }
    Ok(())
}

impl ShardDir {
    /// Moves a staged, complete set into place (nothing to do for a set written in place).
    pub fn finish(&self) -> Result<()> {
        if self.dir == self.target {
            return Ok(());
        }
        finish_staged(&self.target)
    }
}

/// The manifest of the shard set in `dir` (`None`: missing or empty); an error naming
/// what is there when it holds anything else. For a command that writes a set only after
/// long work and must refuse a foreign directory before starting it.
pub fn existing_set(dir: &Path) -> Result<Option<Manifest>> {
    recognise(dir)
}

/// The manifest of the shard set in `dir`, `None` when `dir` is absent or holds nothing
/// of a set; refuses a directory holding anything else, naming the entry. An interrupted
/// replacement (no manifest, a complete staged set) is finished first.
fn recognise(dir: &Path) -> Result<Option<Manifest>> {
    let names = dir_entries(dir)?;
    if !names.iter().any(|n| n == MANIFEST_FILE) {
        let staged = dir.join(STAGING_DIR);
        if names.iter().any(|n| n == STAGING_DIR) && Manifest::load(&staged).is_ok_and(|m| m.complete) {
            finish_staged(dir)?;
            return recognise(dir);
        }
        if let Some(other) = names.iter().find(|n| !is_leftover(n)) {
            bail!("{}: not empty and not a shard set (found {other}); choose an empty --output", dir.display());
        }
        return Ok(None);
    }
    let manifest = Manifest::load(dir)?;
    if let Some(other) = names.iter().find(|n| !is_set_file(n)) {
        bail!(
            "{}: holds {other}, which is not part of a shard set; distill writes only into an empty directory or one holding a shard set alone",
            dir.display()
        );
    }
    Ok(Some(manifest))
}

/// What an interrupted run of ours may leave without a manifest.
fn is_leftover(name: &str) -> bool {
    name == STAGING_DIR || is_temporary(name)
}

/// A shard or manifest being written (`ShardWriter`, `write_atomic`): never listed.
fn is_temporary(name: &str) -> bool {
    (name.starts_with("shard-") && name.ends_with(".parquet.tmp")) || name == "manifest.tmp-distill"
}

fn is_set_file(name: &str) -> bool {
    name == MANIFEST_FILE || is_leftover(name) || (name.starts_with("shard-") && name.ends_with(".parquet"))
}

fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output directory {}", dir.display()))
}

/// Every listed shard present, of its size, with its checksum.
fn verify_listed(dir: &Path, manifest: &Manifest) -> Result<()> {
    for shard in &manifest.shards {
        shard.open_verified(dir)?;
    }
    Ok(())
}

/// Half-written shards of an interrupted run: never listed, safe to delete.
pub fn remove_temporaries(dir: &Path) -> Result<()> {
    for name in dir_entries(dir)? {
        if is_temporary(&name) {
            let path = dir.join(name);
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Temporaries and an abandoned staging directory of an earlier run of ours.
fn remove_leftovers(dir: &Path) -> Result<()> {
    remove_temporaries(dir)?;
    let staging = dir.join(STAGING_DIR);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    Ok(())
}

/// Moves the complete set in `target/.distill-staging` into `target`. The old manifest
/// goes first (from then on the old set is no longer listed), then each staged shard,
/// the old set's other files, and the new manifest last. Idempotent: rerun after a crash
/// at any point, it completes the same move.
fn finish_staged(target: &Path) -> Result<()> {
    let staging = target.join(STAGING_DIR);
    let manifest = Manifest::load(&staging)?;
    if !manifest.complete {
        bail!("{}: the staged shard set is incomplete", staging.display());
    }
    let old_manifest = Manifest::path(target);
    if old_manifest.exists() {
        std::fs::remove_file(&old_manifest).with_context(|| format!("cannot remove {}", old_manifest.display()))?;
    }
    for shard in &manifest.shards {
        let (src, dst) = (staging.join(&shard.file), target.join(&shard.file));
        if src.exists() {
            std::fs::rename(&src, &dst)
                .with_context(|| format!("cannot move {} to {}", src.display(), dst.display()))?;
        } else {
            shard.open_verified(target)?;
        }
    }
    let listed: Vec<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    for name in dir_entries(target)? {
        let stale = name.starts_with("shard-") && name.ends_with(".parquet") && !listed.contains(&name.as_str());
        if stale || is_temporary(&name) {
            let path = target.join(&name);
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    let (src, dst) = (Manifest::path(&staging), Manifest::path(target));
    std::fs::rename(&src, &dst).with_context(|| format!("cannot move {} to {}", src.display(), dst.display()))?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))
}
