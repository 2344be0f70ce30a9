//! One file per subcommand: argument parsing, merging over a TOML pipeline file, and
//! output; the work and its defaults live in the library.
pub mod bench_reader;
pub mod env;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod precompute;
pub mod score;
pub mod student;
pub mod train;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value as Json;
use std::path::Path;

/// Reads a TOML pipeline file (`--config`) into a subcommand's arguments; unknown keys
/// are errors that name the file.
pub fn read_pipeline_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: invalid pipeline file", path.display()))
}

/// `cli` over the pipeline file at `file`, if any: every option given on the command
/// line wins, the others come from the file. Arguments are structs of `Option`s whose
/// keys are the file's keys, so one merge serves every subcommand.
pub fn with_pipeline_file<T: Serialize + DeserializeOwned>(cli: T, file: Option<&Path>) -> Result<T> {
    let Some(path) = file else { return Ok(cli) };
    let mut merged = serde_json::to_value(read_pipeline_file::<T>(path)?)?;
    if let (Json::Object(merged), Json::Object(given)) = (&mut merged, serde_json::to_value(cli)?) {
        merged.extend(given.into_iter().filter(|(_, v)| !v.is_null()));
    }
    serde_json::from_value(merged).with_context(|| format!("{}: options do not combine", path.display()))
}
