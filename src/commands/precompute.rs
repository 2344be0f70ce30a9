use anyhow::{bail, Result};
use clap::Args;
use serde::Deserialize;
use std::path::PathBuf;

use distill::dataset::FieldNames;
use distill::model::parse_kind;
use distill::precompute::{run, PrecomputeConfig, Summary};
use distill::runtime::parse_device;
use distill::shards::manifest::Slice;
use distill::shards::writer::ParquetOptions;

/// Every option can come from a TOML file (`--config`, keys named as the flags with
/// `_` for `-`); flags given on the command line override it.
#[derive(Args, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PrecomputeArgs {
    /// TOML pipeline file with any of the options below.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Teacher model directory (Hugging Face layout).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Input JSONL / Parquet files, directories or globs.
    #[arg(long, num_args = 1..)]
    input: Option<Vec<String>>,
    /// Output directory for the shards and manifest.json.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long)]
    text_field: Option<String>,
    #[arg(long)]
    prompt_field: Option<String>,
    #[arg(long)]
    response_field: Option<String>,
    #[arg(long)]
    messages_field: Option<String>,
    /// Longest sequence in tokens [default: 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Pack several examples into each row of max-len tokens.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pack: Option<bool>,
    /// Teacher token ids kept per position [default: 64].
    #[arg(long)]
    top_k: Option<usize>,
    /// Hidden states to store, comma-separated (0 = embeddings, i = output of layer i).
    #[arg(long, value_delimiter = ',')]
    hidden_layers: Option<Vec<usize>>,
    /// Devices, one teacher replica each: cpu, cuda:0,cuda:1,... or auto [default: auto].
    /// Join devices with `+` to split one replica by layers: cuda:0+cuda:1.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Teacher dtype: float32, bfloat16, float16 or auto (bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Padded tokens per teacher batch [default: 16384].
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Tokens per shard file [default: 1000000].
    #[arg(long)]
    shard_tokens: Option<usize>,
    /// zstd level of the Parquet pages [default: 3].
    #[arg(long)]
    zstd_level: Option<i32>,
    /// Rows per Parquet row group [default: 64].
    #[arg(long)]
    row_group_rows: Option<usize>,
    /// BYTE_STREAM_SPLIT encoding for ids and floats [default: true].
    #[arg(long)]
    byte_stream_split: Option<bool>,
    /// This process's slice of the data (0-based), for runs split over GPUs or nodes.
    #[arg(long)]
    shard_index: Option<usize>,
    /// Number of slices the data is split into [default: 1].
    #[arg(long)]
    num_shards: Option<usize>,
    /// Train on every token, prompts and user turns included.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    train_on_all_tokens: Option<bool>,
    /// Count and skip bad rows (listed in the manifest) instead of stopping.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    skip_invalid: Option<bool>,
    /// Replace an existing shard set in --output instead of resuming it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    overwrite: Option<bool>,
    /// Hide the progress bar.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_progress: Option<bool>,
}

impl PrecomputeArgs {
    /// Command-line values over file values.
    fn over(self, file: PrecomputeArgs) -> PrecomputeArgs {
        macro_rules! pick {
            ($($f:ident),*) => { PrecomputeArgs { config: self.config, $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            teacher,
            input,
            output,
            text_field,
            prompt_field,
            response_field,
            messages_field,
            max_len,
            pack,
            top_k,
            hidden_layers,
            devices,
            dtype,
            batch_tokens,
            shard_tokens,
            zstd_level,
            row_group_rows,
            byte_stream_split,
            shard_index,
            num_shards,
            train_on_all_tokens,
            skip_invalid,
            overwrite,
            no_progress
        )
    }
}

pub fn config_from(args: PrecomputeArgs) -> Result<PrecomputeConfig> {
    let args = match args.config.clone() {
        Some(path) => args.over(super::read_pipeline_file(&path)?),
        None => args,
    };
    let Some(teacher) = args.teacher else { bail!("--teacher is required (or `teacher` in the --config file)") };
    let Some(inputs) = args.input else { bail!("--input is required (or `input` in the --config file)") };
    let Some(output) = args.output else { bail!("--output is required (or `output` in the --config file)") };
    let devices = match args.devices {
        Some(list) => list
            .iter()
            .map(|replica| replica.split('+').map(parse_device).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?,
        None => vec![vec![parse_device("auto")?]],
    };
    let on_cuda = devices.iter().flatten().all(|d| d.is_cuda());
    let dtype = match args.dtype.as_deref() {
        None | Some("auto") => {
            if on_cuda {
                tch::Kind::BFloat16
            } else {
                tch::Kind::Float
            }
        }
        Some(s) => parse_kind(s)?,
    };
    let defaults = FieldNames::default();
    Ok(PrecomputeConfig {
        teacher,
        inputs,
        output,
        fields: FieldNames {
            text: args.text_field.unwrap_or(defaults.text),
            prompt: args.prompt_field.unwrap_or(defaults.prompt),
            response: args.response_field.unwrap_or(defaults.response),
            messages: args.messages_field.unwrap_or(defaults.messages),
        },
        max_len: args.max_len.unwrap_or(2048),
        pack: args.pack.unwrap_or(false),
        top_k: args.top_k.unwrap_or(64),
        hidden_layers: args.hidden_layers.unwrap_or_default(),
        devices,
        dtype,
        batch_tokens: args.batch_tokens.unwrap_or(16384),
        shard_tokens: args.shard_tokens.unwrap_or(1_000_000),
        parquet: ParquetOptions {
            zstd_level: args.zstd_level.unwrap_or(3),
            row_group_rows: args.row_group_rows.unwrap_or(64),
            byte_stream_split: args.byte_stream_split.unwrap_or(true),
        },
        slice: Slice { index: args.shard_index.unwrap_or(0), count: args.num_shards.unwrap_or(1) },
        skip_invalid: args.skip_invalid.unwrap_or(false),
        train_on_all_tokens: args.train_on_all_tokens.unwrap_or(false),
        overwrite: args.overwrite.unwrap_or(false),
        progress: !args.no_progress.unwrap_or(false),
        max_logit_elements: 1 << 28,
    })
}

pub fn run_command(args: PrecomputeArgs) -> Result<()> {
    let cfg = config_from(args)?;
    let summary = run(&cfg)?;
    print_summary(&cfg, &summary);
    Ok(())
}

fn print_summary(cfg: &PrecomputeConfig, s: &Summary) {
    let secs = s.wall.as_secs_f64();
    println!("precompute finished: {}", cfg.output.display());
    println!("  rows           {}", s.rows);
    println!("  tokens         {} ({} trained positions)", s.tokens, s.targets);
    println!("  shards         {} ({} resumed)", s.shards, s.resumed_shards);
    println!("  bytes          {} ({:.1} bytes/token)", s.bytes, s.bytes_per_token());
    println!("  time           {secs:.1}s, {:.0} tokens/s this run", s.tokens_this_run as f64 / secs.max(1e-9));
    println!("  teacher busy   {:.0}% of wall time on {} device(s)", 100.0 * s.busy_share(), s.devices);
    if s.invalid_rows > 0 {
        println!("  skipped        {} invalid rows (listed in manifest.json)", s.invalid_rows);
    }
    if s.truncated_examples > 0 {
        println!("  truncated      {} examples to {} tokens", s.truncated_examples, cfg.max_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ready pipeline files stay valid as options change.
    #[test]
    fn every_pipeline_file_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".toml") && !name.starts_with("train-") {
                let text = std::fs::read_to_string(&path).unwrap();
                let parsed: Result<PrecomputeArgs, _> = toml::from_str(&text);
                assert!(parsed.is_ok(), "{}: {}", path.display(), parsed.err().unwrap());
                n += 1;
            }
        }
        assert!(n >= 3);
    }
}
