//! `distill score`: per-example NLL and perplexity of one model, as a table or JSONL.
use anyhow::Result;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

use distill::dataset::FieldNames;
use distill::eval::text::{check_tokenizer_fits, rows, score_inputs, ScoreOptions};
use distill::model::{parse_kind, CausalLm};
use distill::runtime::parse_device;

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Jsonl,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Model directory in Hugging Face layout (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// JSONL or Parquet files, directories or globs: rows with `text`, `prompt` +
    /// `response`, or chat `messages`.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Cut sequences to this many tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_len: usize,
    /// Tokens per forward pass (batch x padded length).
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Name of the plain-text field.
    #[arg(long, default_value = "text")]
    text_field: String,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = parse_kind(&args.dtype)?;
    check_tokenizer_fits(&args.model)?; // before the (slow) load
    let model = CausalLm::load(&args.model, device, kind)?;
    let fields = FieldNames { text: args.text_field.clone(), ..FieldNames::default() };
    let opts = ScoreOptions { max_batch_tokens: args.batch_tokens, max_len: args.max_len, ..ScoreOptions::default() };
    let started = std::time::Instant::now();
    let (ids, sums) = score_inputs(&args.model, &model, None, &args.input, &fields, &opts)?;
    let elapsed = started.elapsed().as_secs_f64();
    let (per, total) = rows(&ids, &sums)?;
    match args.format {
        Format::Jsonl => {
            for row in per.iter().chain(std::iter::once(&total)) {
                println!("{}", serde_json::to_string(row)?);
            }
        }
        Format::Table => {
            let width = per.iter().map(|r| r.id.len()).max().unwrap_or(2).max(3);
            println!("{:<width$}  {:>7}  {:>8}  {:>10}", "id", "tokens", "nll", "ppl");
            for r in per.iter().chain(std::iter::once(&total)) {
                if r.tokens == 0 {
                    // One token long or masked: nothing to score.
                    println!("{:<width$}  {:>7}  {:>8}  {:>10}", r.id, r.tokens, "-", "-");
                } else {
                    println!("{:<width$}  {:>7}  {:>8.4}  {:>10.3}", r.id, r.tokens, r.nll, r.ppl);
                }
            }
            eprintln!(
                "scored {} tokens of {} examples in {elapsed:.2}s ({:.0} tokens/s) on {device:?} in {}",
                total.tokens,
                per.len(),
                total.tokens as f64 / elapsed.max(1e-9),
                args.dtype
            );
        }
    }
    Ok(())
}
