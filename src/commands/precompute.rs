//! `distill precompute`: flags and pipeline file -> `PrecomputeConfig`, and the summary.
use anyhow::Result;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use distill::dataset::{FieldNames, TokenIdFields};
use distill::model::parse_kind;
use distill::precompute::{self, PrecomputeConfig, Summary};
use distill::runtime::parse_device;
use distill::shards::manifest::Slice;
use distill::shards::writer::ParquetOptions;

/// Every option can come from a TOML file (`--config`, keys named as the flags with
/// `_` for `-`); flags given on the command line override it.
#[derive(Args, Serialize, Deserialize, Default, Clone)]
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
    /// Read token ids, not text: `prompt_ids` (not trained) and `response_ids` of each
    /// row, as `distill generate --with-ids` writes them, so the teacher scores exactly
    /// the sampled tokens (on-policy rounds). Optionally the two field names, comma-separated.
    #[arg(long, num_args = 0..=1, default_missing_value = "prompt_ids,response_ids")]
    token_ids: Option<String>,
    /// Longest sequence in tokens [default: 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Pack several examples into each row of max-len tokens.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pack: Option<bool>,
    /// Teacher token ids kept per position; 0 with --sample keeps none [default: 16].
    #[arg(long)]
    top_k: Option<usize>,
    /// Mass-adaptive top-k: keep the fewest of the top-k ids whose probabilities reach
    /// this mass (--top-k is the cap) [default: off, k ids everywhere].
    #[arg(long)]
    top_p: Option<f64>,
    /// With --top-p: keep at least this many ids at every position (a floor under the
    /// adaptive count) [default: 1].
    #[arg(long)]
    min_k: Option<usize>,
    /// Temperatures besides 1 at which to audit the stored targets against the full
    /// distribution (retained mass, truncation KL), comma-separated, e.g. 2,4.
    #[arg(long, value_delimiter = ',')]
    audit_temperatures: Option<Vec<f64>>,
    /// Ids drawn per position from the teacher's distribution outside the top-k (the
    /// whole distribution with --top-k 0), stored with their counts; 0: none [default: 16].
    #[arg(long)]
    sample: Option<usize>,
    /// Seed of --sample's draws [default: 0].
    #[arg(long)]
    sample_seed: Option<u64>,
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
    /// Padded tokens per teacher batch, or auto: 2048 on CPU, 16384 on GPUs [default: auto].
    #[arg(long)]
    batch_tokens: Option<super::CountOrAuto>,
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
    /// Testing only: abort like `kill -9` part-way into the shard after N complete ones.
    #[arg(long, hide = true)]
    #[serde(skip)]
    crash_after_shards: Option<usize>,
}

impl PrecomputeArgs {
    /// `output` unless one is given (a command that writes no shard set needs none).
    pub fn or_output(mut self, output: PathBuf) -> Self {
        self.output.get_or_insert(output);
        self
    }
}

/// The options over the defaults `d` (`PrecomputeConfig::default()` for precompute).
pub fn config_from(args: PrecomputeArgs, d: PrecomputeConfig) -> Result<PrecomputeConfig> {
    // Neither is a pipeline-file key, so neither survives the merge.
    let (file, crash_after_shards) = (args.config.clone(), args.crash_after_shards);
    let a = super::with_pipeline_file(args, file.as_deref())?;
    let devices = match a.devices {
        Some(list) => list
            .iter()
            .map(|replica| replica.split('+').map(parse_device).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?,
        None => d.devices,
    };
    let cfg = PrecomputeConfig {
        teacher: a.teacher.unwrap_or_default(),
        inputs: a.input.unwrap_or_default(),
        output: a.output.unwrap_or_default(),
        fields: FieldNames {
            text: a.text_field.unwrap_or(d.fields.text),
            prompt: a.prompt_field.unwrap_or(d.fields.prompt),
            response: a.response_field.unwrap_or(d.fields.response),
            messages: a.messages_field.unwrap_or(d.fields.messages),
            token_ids: match a.token_ids.as_deref() {
                None | Some("false") => None,
                Some(names) => match names.split_once(',') {
                    Some((prompt, response)) if !prompt.is_empty() && !response.is_empty() => Some(TokenIdFields {
                        prompt: prompt.trim().into(),
                        response: response.trim().into(),
                        ..TokenIdFields::default()
                    }),
                    _ => anyhow::bail!(
                        "--token-ids takes the prompt and response id fields as `PROMPT,RESPONSE`, not `{names}`"
                    ),
                },
            },
        },
        max_len: a.max_len.unwrap_or(d.max_len),
        pack: a.pack.unwrap_or(d.pack),
        top_k: a.top_k.unwrap_or(d.top_k),
        top_p: a.top_p.or(d.top_p),
        min_k: a.min_k.unwrap_or(d.min_k),
        audit_temperatures: a.audit_temperatures.unwrap_or(d.audit_temperatures),
        sample: a.sample.unwrap_or(d.sample),
        sample_seed: a.sample_seed.unwrap_or(d.sample_seed),
        hidden_layers: a.hidden_layers.unwrap_or(d.hidden_layers),
        devices,
        dtype: match a.dtype.as_deref() {
            None | Some("auto") => None,
            Some(s) => Some(parse_kind(s)?),
        },
        batch_tokens: a.batch_tokens.map_or(d.batch_tokens, |b| b.count()),
        shard_tokens: a.shard_tokens.unwrap_or(d.shard_tokens),
        parquet: ParquetOptions {
            zstd_level: a.zstd_level.unwrap_or(d.parquet.zstd_level),
            row_group_rows: a.row_group_rows.unwrap_or(d.parquet.row_group_rows),
            byte_stream_split: a.byte_stream_split.unwrap_or(d.parquet.byte_stream_split),
        },
        slice: Slice { index: a.shard_index.unwrap_or(d.slice.index), count: a.num_shards.unwrap_or(d.slice.count) },
        skip_invalid: a.skip_invalid.unwrap_or(d.skip_invalid),
        train_on_all_tokens: a.train_on_all_tokens.unwrap_or(d.train_on_all_tokens),
        overwrite: a.overwrite.unwrap_or(d.overwrite),
        progress: !a.no_progress.unwrap_or(!d.progress),
        crash_after_shards,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: PrecomputeArgs) -> Result<()> {
    let cfg = config_from(args, PrecomputeConfig::default())?;
    let summary = precompute::run(&cfg)?;
    print_summary("precompute", &cfg, &summary);
    Ok(())
}

pub fn print_summary(what: &str, cfg: &PrecomputeConfig, s: &Summary) {
    let secs = s.wall.as_secs_f64();
    println!("{what} finished: {}", cfg.output.display());
    println!("  rows           {}", s.rows);
    println!("  tokens         {} ({} trained positions)", s.tokens, s.targets);
    println!("  shards         {} ({} resumed)", s.shards, s.resumed_shards);
    println!("  bytes          {} ({:.1} bytes/token)", s.bytes, s.bytes_per_token());
    let teacher_here = s.devices > 0 && !s.teacher_busy.is_zero();
    if teacher_here {
        println!("  batch tokens   {}{}", cfg.batch_tokens(), if cfg.batch_tokens.is_none() { " (auto)" } else { "" });
    }
    println!("  time           {secs:.1}s, {:.0} tokens/s this run", s.tokens_this_run as f64 / secs.max(1e-9));
    if teacher_here {
        println!("  teacher busy   {:.0}% of wall time on {} device(s)", 100.0 * s.busy_share(), s.devices);
    }
    if s.invalid_rows > 0 {
        println!("  skipped        {} invalid rows (listed in manifest.json)", s.invalid_rows);
    }
    if s.truncated_examples > 0 {
        println!("  truncated      {} examples to {} tokens", s.truncated_examples, cfg.max_len);
    }
    for (i, line) in s.audit.iter().flat_map(|a| a.lines()).enumerate() {
        println!("  {:<14} {line}", if i == 0 { "audit" } else { "" });
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
