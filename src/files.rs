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
}
