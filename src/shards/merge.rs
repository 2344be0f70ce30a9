//! Merging the shard sets of a sliced run (`--shard-index i --num-shards n`, one per
//! GPU or node) into one set: every slice must be complete, made with the same
//! settings, and together cover slices 0..n exactly once; every listed shard is verified
//! before anything is written. Shards are hard-linked (or copied) into the output's
//! staging directory under new consecutive numbers and moved into place when complete.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::dir::create_staged;
use super::manifest::{settings_diff, Manifest, ShardEntry, Slice};
use super::writer::shard_file_name;

pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<Manifest> {
    if inputs.is_empty() {
        bail!("nothing to merge");
    }
    let mut manifests: Vec<(PathBuf, Manifest)> =
        inputs.iter().map(|d| Ok((d.clone(), Manifest::load(d)?))).collect::<Result<_>>()?;
    manifests.sort_by_key(|(_, m)| m.slices.first().map(|s| s.index).unwrap_or(0));
    let (first_dir, first) = &manifests[0];
    let count = first.slices.first().map(|s| s.count).unwrap_or(1);
    let mut covered: Vec<Slice> = vec![];
    for (dir, m) in &manifests {
        if !m.complete {
            bail!(
                "{}: the shard set is incomplete ({} of {} shards); finish it first",
                dir.display(),
                m.shards.len(),
                m.planned_shards
            );
        }
        let diff = settings_diff(&m.settings, &first.settings);
        if !diff.is_empty() {
            bail!(
                "{} and {} were made with other settings:\n  {}",
                dir.display(),
                first_dir.display(),
                diff.join("\n  ")
            );
        }
        if let Some(other) = m.slices.iter().find(|s| s.count != count) {
            bail!(
                "{} was made with --num-shards {} and {} with --num-shards {count}; slices of one run share it",
                dir.display(),
                other.count,
                first_dir.display()
            );
        }
        for shard in &m.shards {
            shard.open_verified(dir)?;
        }
        covered.extend(m.slices.iter().copied());
    }
    covered.sort_by_key(|s| s.index);
    let expected: Vec<Slice> = (0..count).map(|index| Slice { index, count }).collect();
    if covered != expected {
        bail!(
            "the inputs cover slices {:?}; a merge needs each of 0..{count} of {count} exactly once",
            covered.iter().map(|s| s.index).collect::<Vec<_>>()
        );
    }
    let out = create_staged(output)?;
    let mut merged = Manifest::new(first.settings.clone(), Slice { index: 0, count: 1 }, 0, Default::default());
    merged.slices = expected;
    merged.source_examples = first.source_examples.clone();
    for (dir, m) in &manifests {
        merged.skipped.invalid_rows += m.skipped.invalid_rows;
        merged.skipped.truncated_examples += m.skipped.truncated_examples;
        merged.skipped.truncated_tokens += m.skipped.truncated_tokens;
        merged.skipped.examples.extend(m.skipped.examples.iter().cloned());
        for shard in &m.shards {
            let src = dir.join(&shard.file);
            let name = shard_file_name(merged.shards.len());
            let dst = out.dir.join(&name);
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst)
                    .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
            }
            merged.shards.push(ShardEntry { file: name, ..shard.clone() });
        }
    }
    merged.planned_shards = merged.shards.len();
    merged.complete = true;
    merged.save(&out.dir)?;
    out.finish()?;
    Ok(merged)
}
