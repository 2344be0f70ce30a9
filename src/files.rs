//! Small file utilities every stage shares: atomic writes (temporary sibling + rename,
//! so a crash never leaves a half-written file under its final name) and the xxh3
//! checksums that manifests, shard sets and tokenizer checks record as `xxh3:<16 hex>`.
use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-distill");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Refuses a file name read from a file we did not write in this process (an index,
/// a manifest) unless it names a file directly inside the directory it came with: no
/// separators, no `..`, not absolute.
pub fn check_plain_name(name: &str) -> Result<()> {
    let mut parts = Path::new(name).components();
    let plain = matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None));
    if !plain || name.contains(['/', '\\']) {
        anyhow::bail!("{name:?} is not a plain file name inside the directory");
    }
    Ok(())
}

/// The names in `dir`, sorted; none when it does not exist.
pub fn dir_entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut names = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// A directory written under a temporary sibling name (`.NAME.distill-staging`) and moved
/// to its target only when complete: an interrupted write never leaves a partial
/// directory under the final name, and what the target held is replaced only then.
/// Dropped without `commit`, it removes itself.
pub struct StagedDir {
    path: std::path::PathBuf,
    target: std::path::PathBuf,
    committed: bool,
}

impl StagedDir {
    pub fn new(target: &Path) -> Result<Self> {
        let path = sibling(target, "distill-staging")?;
        if path.exists() {
            // Ours by its name: the leftover of an interrupted write.
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| {
            format!("cannot create {} (written first, then renamed to {})", path.display(), target.display())
        })?;
        Ok(StagedDir { path, target: target.to_path_buf(), committed: false })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the written directory to the target; an existing target is moved aside
    /// first and removed once the new one is in place.
    pub fn commit(mut self) -> Result<()> {
        let mut old = None;
        if self.target.exists() {
            if dir_entries(&self.target)?.is_empty() {
                std::fs::remove_dir(&self.target)
                    .with_context(|| format!("cannot replace {}", self.target.display()))?;
            } else {
                let aside = sibling(&self.target, "distill-old")?;
                if aside.exists() {
                    std::fs::remove_dir_all(&aside).with_context(|| format!("cannot remove {}", aside.display()))?;
                }
                std::fs::rename(&self.target, &aside)
                    .with_context(|| format!("cannot move {} aside", self.target.display()))?;
                old = Some(aside);
            }
        }
        std::fs::rename(&self.path, &self.target)
            .with_context(|| format!("cannot rename {} to {}", self.path.display(), self.target.display()))?;
        self.committed = true;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `.NAME.{suffix}` next to `target`.
fn sibling(target: &Path, suffix: &str) -> Result<std::path::PathBuf> {
    let name = target.file_name().with_context(|| format!("{} does not name a directory", target.display()))?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// Bytes of memory the system can still give, from /proc/meminfo (`None` elsewhere).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The checksum spelling of an xxh3-64 digest: `xxh3:<16 hex digits>`.
pub fn xxh3_string(digest: u64) -> String {
    format!("xxh3:{digest:016x}")
}

/// xxh3-64 of `bytes`, spelled as a checksum.
pub fn checksum_bytes(bytes: &[u8]) -> String {
    xxh3_string(xxhash_rust::xxh3::xxh3_64(bytes))
}

/// xxh3-64 of a file's bytes, read in 1 MiB blocks, spelled as a checksum.
pub fn checksum_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    update_from(&mut hasher, &mut file).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(xxh3_string(hasher.digest()))
}

/// Feeds everything `reader` yields into `hasher`.
pub fn update_from(hasher: &mut xxhash_rust::xxh3::Xxh3, reader: &mut impl Read) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_checksum_equals_the_one_shot_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        write_atomic(&path, &bytes).unwrap();
        assert_eq!(checksum_file(&path).unwrap(), checksum_bytes(&bytes));
        assert!(checksum_bytes(&bytes).starts_with("xxh3:") && checksum_bytes(&bytes).len() == 21);
        assert!(!path.with_extension("tmp-distill").exists());
    }

    #[test]
    fn only_plain_names_stay_inside_their_directory() {
        check_plain_name("model-00001-of-00002.safetensors").unwrap();
        for bad in ["../model.safetensors", "/etc/passwd", "a/b.safetensors", "..", ".", "", "a\\b"] {
            assert!(check_plain_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
