//! `distill import-logprobs`: precompute's data and target options, with the targets
//! read from a served teacher's responses instead of computed here
//! (`precompute::served`).
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

use super::precompute::{config_from, print_summary, PrecomputeArgs};
use distill::precompute::{served, PrecomputeConfig};

#[derive(Args)]
pub struct ImportArgs {
    /// `--teacher` names the served model's folder: its config.json, tokenizer and chat
    /// template (no weights are read). Data, --top-k, --top-p and shard options are
    /// precompute's.
    #[command(flatten)]
    precompute: PrecomputeArgs,
    /// JSONL files of `{"id", "prompt_token_ids", "response"}` lines, as
    /// scripts/capture_served.py writes them (vLLM, OpenAI echo or SGLang responses).
    #[arg(long, num_args = 1..)]
    responses: Vec<PathBuf>,
    /// Write the planned documents' token ids to this JSONL file (the requests
    /// scripts/capture_served.py sends) and stop; no shard is written.
    #[arg(long)]
    write_requests: Option<PathBuf>,
}

pub fn run(args: ImportArgs) -> Result<()> {
    // No draws by default: a server lists its top ids only.
    let defaults = PrecomputeConfig { sample: 0, ..PrecomputeConfig::default() };
    let precompute = match &args.write_requests {
        Some(path) => args.precompute.or_output(path.clone()), // no shard set is written
        None => args.precompute,
    };
    let cfg = config_from(precompute, defaults)?;
    match (&args.write_requests, args.responses.is_empty()) {
        (Some(path), true) => {
            let n = served::write_requests(&cfg, path)?;
            println!("wrote {n} requests (one per document) to {}", path.display());
        }
        (None, false) => print_summary("import", &cfg, &served::import(&cfg, &args.responses)?),
        _ => bail!("give either --write-requests FILE (plan the requests) or --responses FILE... (import them)"),
    }
    Ok(())
}
