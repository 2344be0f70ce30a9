//! One file per subcommand: argument parsing and output; the work lives in the library.
pub mod bench_reader;
pub mod env;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod precompute;
pub mod score;
pub mod student;
pub mod train;

/// Reads a TOML pipeline file (`--config`) into a subcommand's arguments; unknown keys
/// are errors that name the file.
pub fn read_pipeline_file<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<T> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: invalid pipeline file", path.display()))
}
