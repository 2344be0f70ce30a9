//! `distill eval`: text and shard metrics of several models, as a table or JSON.
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

use distill::batch::feed::FeedOptions;
use distill::dataset::FieldNames;
use distill::eval::shards::evaluate;
use distill::eval::text::{check_tokenizer_fits, text_metrics, ScoreOptions, TextMetrics};
use distill::files::checksum_file;
use distill::model::{parse_kind, CausalLm, ModelConfig};
use distill::runtime::parse_device;
use distill::shards::reader::ShardSet;

/// Held-out evaluation of one or more models (students, checkpoints, the teacher):
/// cross-entropy and perplexity on text, and on teacher shards also KL to the teacher
/// and top-1 agreement with it.
#[derive(Args)]
pub struct EvalArgs {
    /// Model directories, each optionally named: NAME=DIR.
    #[arg(long = "model", required = true, num_args = 1..)]
    models: Vec<String>,
    /// Held-out text: JSONL or Parquet files, directories or globs.
    #[arg(long, num_args = 1..)]
    text: Vec<String>,
    /// Held-out teacher shards (from `distill precompute`).
    #[arg(long)]
    shards: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Evaluate on shards made with another tokenizer file (same ids) anyway.
    #[arg(long)]
    force_tokenizer: bool,
}

#[derive(Debug, Serialize)]
struct ModelEval {
    name: String,
    path: PathBuf,
    text: Option<TextMetrics>,
    shards: Option<ShardEval>,
}

#[derive(Debug, Serialize)]
struct ShardEval {
    targets: usize,
    cross_entropy: f64,
    perplexity: f64,
    kl_to_teacher: f64,
    top1_agreement: f64,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.text.is_empty() && args.shards.is_none() {
        bail!("give held-out --text files, --shards, or both");
    }
    let device = parse_device(&args.device)?;
    let kind = parse_kind(&args.dtype)?;
    let set = args.shards.as_ref().map(|d| ShardSet::open(d, false).map(Arc::new)).transpose()?;
    let mut results = vec![];
    for spec in &args.models {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => (spec.clone(), PathBuf::from(spec)),
        };
        // Before the (slow) load: the tokenizer fits the model, and made the shards' targets.
        check_tokenizer_fits(&path)?;
        if let Some(set) = &set {
            let vocab = ModelConfig::from_dir(&path)?.vocab_size;
            let hash = checksum_file(&path.join("tokenizer.json"))?;
            set.check_student(&hash, vocab, args.force_tokenizer).with_context(|| format!("model {name}"))?;
        }
        let model = CausalLm::load(&path, device, kind)?;
        let text = if args.text.is_empty() {
            None
        } else {
            let opts = ScoreOptions { max_batch_tokens: args.batch_tokens, ..ScoreOptions::default() };
            Some(text_metrics(&path, &model, &args.text, &FieldNames::default(), &opts)?)
        };
        let shards = match &set {
            None => None,
            Some(set) => {
                let batching = FeedOptions { batch_tokens: args.batch_tokens, pack_to: None };
                let r = evaluate(&model, set.clone(), device, batching)?;
                Some(ShardEval {
                    targets: r.targets,
                    cross_entropy: r.ce,
                    perplexity: r.ce.exp(),
                    kl_to_teacher: r.kl,
                    top1_agreement: r.top1_agreement,
                })
            }
        };
        results.push(ModelEval { name, path, text, shards });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<width$}  {:>9} {:>8} {:>9}  {:>9} {:>8} {:>9} {:>8} {:>7}",
        "model", "text tok", "text CE", "text PPL", "shard tok", "CE", "PPL", "KL", "top-1"
    );
    let num = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    for r in &results {
        let (t, s) = (r.text.as_ref(), r.shards.as_ref());
        println!(
            "{:<width$}  {:>9} {:>8} {:>9}  {:>9} {:>8} {:>9} {:>8} {:>7}",
            r.name,
            t.map_or("-".into(), |t| t.tokens.to_string()),
            num(t.map(|t| t.cross_entropy), 4),
            num(t.map(|t| t.perplexity), 2),
            s.map_or("-".into(), |s| s.targets.to_string()),
            num(s.map(|s| s.cross_entropy), 4),
            num(s.map(|s| s.perplexity), 2),
            num(s.map(|s| s.kl_to_teacher), 4),
            num(s.map(|s| 100.0 * s.top1_agreement), 1),
        );
    }
    Ok(())
}
