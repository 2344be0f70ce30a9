//! The life of a shard directory on the writing side: created empty, resumed when it
//! holds a set made with the same settings (every listed shard verified first),
//! replaced on request, and cleared of the half-written temporaries an interrupted run
//! leaves (never listed, so safe to delete).
use anyhow::{bail, Context, Result};
use std::path::Path;

use super::manifest::{settings_diff, Manifest, Settings, SkipReport, Slice, MANIFEST_FILE};

/// Opens `dir` for a run with `settings` over `slice`: a fresh manifest in an empty or
/// new directory, or the manifest of the set already there (same settings and slice;
/// its listed shards verified) to resume after. `overwrite` first removes an existing
/// set's files. The returned manifest carries this run's `skipped` report.
pub fn open_for_writing(
    dir: &Path,
    settings: &Settings,
    slice: Slice,
    skipped: SkipReport,
    overwrite: bool,
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let manifest_path = Manifest::path(dir);
    if overwrite {
        remove_shard_set(dir)?;
    }
    let fresh = Manifest::new(settings.clone(), slice, 0, skipped);
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
    if !diff.is_empty() || existing.slices != vec![slice] {
        let mut lines = diff;
        if existing.slices != vec![slice] {
            lines.push(format!("slices: {:?} there, {:?} here", existing.slices, vec![slice]));
        }
        bail!(
            "{} holds shards made with other settings:\n  {}\nuse another --output, or --overwrite to replace them",
            manifest_path.display(),
            lines.join("\n  ")
        );
    }
    for shard in &existing.shards {
        shard.open_verified(dir)?;
    }
    remove_temporaries(dir)?;
    Ok(Manifest { skipped: fresh.skipped, ..existing })
}

/// Half-written shards of an interrupted run: never listed, safe to delete.
pub fn remove_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes the files of a shard set (manifest, shards, temporaries), nothing else.
fn remove_shard_set(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let ours = name == MANIFEST_FILE
            || (name.starts_with("shard-") && (name.ends_with(".parquet") || name.ends_with(".tmp")));
        if ours {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Creates `dir` for a set made elsewhere (a merge); refuses one that holds a set.
pub fn create_for_merge(dir: &Path) -> Result<()> {
    if Manifest::path(dir).exists() {
        bail!("{} already holds a shard set", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
