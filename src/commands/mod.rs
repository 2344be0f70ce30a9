//! One file per subcommand: argument parsing, merging over a TOML pipeline file, and
//! output; the work and its defaults live in the library.
pub mod bench_reader;
pub mod cross;
pub mod env;
pub mod eval;
pub mod generate;
pub mod import;
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

/// A count option that also takes `auto` (`--batch-tokens 4096`, `--batch-tokens auto`,
/// `batch_tokens = "auto"` or `= 4096` in a pipeline file): `auto` leaves the choice to
/// the library, which picks for the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum CountOrAuto {
    Count(usize),
    #[serde(with = "auto_word")]
    Auto,
}

impl CountOrAuto {
    pub fn count(self) -> Option<usize> {
        match self {
            CountOrAuto::Count(n) => Some(n),
            CountOrAuto::Auto => None,
        }
    }
}

impl std::str::FromStr for CountOrAuto {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CountOrAuto::Auto),
            _ => s.parse().map(CountOrAuto::Count).map_err(|_| format!("expected a whole number or `auto`, not `{s}`")),
        }
    }
}

/// `CountOrAuto::Auto` as the string "auto" in JSON and TOML.
mod auto_word {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        match String::deserialize(d)?.as_str() {
            "auto" => Ok(()),
            other => Err(D::Error::custom(format!("expected a whole number or \"auto\", not \"{other}\""))),
        }
    }
}

#[cfg(test)]
mod count_or_auto_tests {
    use super::CountOrAuto;

    #[test]
    fn parses_from_the_command_line_and_from_pipeline_files() {
        assert_eq!("auto".parse::<CountOrAuto>().unwrap().count(), None);
        assert_eq!("4096".parse::<CountOrAuto>().unwrap().count(), Some(4096));
        assert!("-1".parse::<CountOrAuto>().unwrap_err().contains("`-1`"));
        #[derive(serde::Deserialize, serde::Serialize)]
        struct File {
            a: CountOrAuto,
            b: CountOrAuto,
        }
        let f: File = toml::from_str("a = 16384\nb = \"auto\"\n").unwrap();
        assert_eq!((f.a.count(), f.b.count()), (Some(16384), None));
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json, serde_json::json!({"a": 16384, "b": "auto"}), "round trip through the TOML merge");
        let back: File = serde_json::from_value(json).unwrap();
        assert_eq!((back.a, back.b), (CountOrAuto::Count(16384), CountOrAuto::Auto));
        assert!(toml::from_str::<File>("a = \"many\"\nb = 1\n").is_err());
    }
}
