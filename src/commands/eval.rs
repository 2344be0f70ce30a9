//! `distill eval`: text and shard metrics of several models, as a table or JSON.
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

use distill::batch::feed::FeedOptions;
use distill::chat::ChatTemplate;
use distill::dataset::read::{read_raw_rows, resolve_inputs};
use distill::dataset::FieldNames;
use distill::eval::generation::{judge_replies, GenerationMetrics};
use distill::eval::shards::evaluate;
use distill::eval::text::{check_tokenizer_fits, text_metrics, ScoreOptions, TextMetrics};
use distill::files::checksum_file;
use distill::generate::prompts::prompt_rows;
use distill::generate::stop_ids_of;
use distill::model::{parse_kind, CausalLm, ModelConfig};
use distill::runtime::parse_device;
use distill::shards::reader::ShardSet;

/// Held-out evaluation of one or more models (students, checkpoints, the teacher):
/// cross-entropy and perplexity on text, and on teacher shards also KL to the teacher
/// (on the shards' buckets) and top-1 agreement with it. With `--teacher`, the text is
/// also scored against the teacher's whole distribution.
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
    /// Teacher model directory: on --text, also the KL from the teacher over the whole
    /// vocabulary and the top-1 agreement (every model must share its tokenizer).
    #[arg(long)]
    teacher: Option<PathBuf>,
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
    /// Held-out prompts (chat, prompt or text rows): each model's greedy replies, their
    /// exact match with the rows' reference answers, length, and (with --teacher) the
    /// teacher's NLL of them.
    #[arg(long, num_args = 1..)]
    generate: Vec<String>,
    /// Reply length limit for --generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Write every prompt with its reference and each model's reply here (markdown).
    #[arg(long, requires = "generate")]
    side_by_side: Option<PathBuf>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<GenerationMetrics>,
}

#[derive(Debug, Serialize)]
struct ShardEval {
    targets: usize,
    cross_entropy: f64,
    perplexity: f64,
    kl_to_teacher: f64,
    top1_agreement: f64,
    /// Cross-tokenizer shards: mean ULD distance to the teacher per aligned group.
    #[serde(skip_serializing_if = "Option::is_none")]
    uld: Option<f64>,
    /// Shards merged with `merge-teachers --route`: the figures per routed teacher.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    per_teacher: Vec<TeacherShardEval>,
}

#[derive(Debug, Serialize)]
struct TeacherShardEval {
    teacher: String,
    targets: usize,
    cross_entropy: f64,
    perplexity: f64,
    kl_to_teacher: f64,
    top1_agreement: f64,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.text.is_empty() && args.shards.is_none() && args.generate.is_empty() {
        bail!("give held-out --text files, --shards, --generate prompts, or several");
    }
    if !args.generate.is_empty() && args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 asks for no reply; give at least 1");
    }
    let prompt_files = if args.generate.is_empty() { vec![] } else { resolve_inputs(&args.generate)? };
    if let Some(path) = &args.side_by_side {
        check_side_by_side_target(path)?; // before any model runs
    }
    // Per prompt: id, prompt text, reference; per model: its replies.
    let mut prompts_shown: Vec<(String, String, Option<String>)> = vec![];
    let mut replies_of: Vec<(String, Vec<String>)> = vec![];
    let device = parse_device(&args.device)?;
    let kind = parse_kind(&args.dtype)?;
    let set = args.shards.as_ref().map(|d| ShardSet::open(d, false).map(Arc::new)).transpose()?;
    let teacher = match &args.teacher {
        None => None,
        Some(dir) => {
            check_tokenizer_fits(dir)?;
            let hash = checksum_file(&dir.join("tokenizer.json"))?;
            Some((dir, hash, CausalLm::load(dir, device, kind)?))
        }
    };
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
        if let Some((dir, hash, _)) = &teacher {
            if *hash != checksum_file(&path.join("tokenizer.json"))? && !args.force_tokenizer {
                bail!(
                    "model {name}: {} differs from the teacher's {}; the full-vocabulary KL compares the same token ids \
                     (--force-tokenizer if the ids agree anyway)",
                    path.join("tokenizer.json").display(),
                    dir.join("tokenizer.json").display()
                );
            }
        }
        let model = CausalLm::load(&path, device, kind)?;
        let text = if args.text.is_empty() {
            None
        } else {
            let opts = ScoreOptions { max_batch_tokens: args.batch_tokens, ..ScoreOptions::default() };
            let t = teacher.as_ref().map(|(_, _, m)| m);
            Some(text_metrics(&path, &model, t, &args.text, &FieldNames::default(), &opts)?)
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
                    uld: r.uld,
                    per_teacher: r
                        .per_teacher
                        .iter()
                        .map(|t| TeacherShardEval {
                            teacher: t.teacher.clone(),
                            targets: t.targets,
                            cross_entropy: t.ce,
                            perplexity: t.ce.exp(),
                            kl_to_teacher: t.kl,
                            top1_agreement: t.top1_agreement,
                        })
                        .collect(),
                })
            }
        };
        let generation = if prompt_files.is_empty() {
            None
        } else {
            let tokenizer = check_tokenizer_fits(&path)?;
            let template = ChatTemplate::load(&path)?;
            let rows =
                prompt_rows(read_raw_rows(&prompt_files)?, &FieldNames::default(), &tokenizer, template.as_ref())?;
            let t = teacher.as_ref().map(|(_, _, m)| m);
            let replies = judge_replies(&model, &tokenizer, &rows, &stop_ids_of(&path)?, args.max_new_tokens, t)?;
            if prompts_shown.is_empty() {
                for r in &rows {
                    prompts_shown.push((r.id.clone(), tokenizer.decode(&r.ids, false)?, r.reference.clone()));
                }
            }
            replies_of.push((name.clone(), replies.texts));
            Some(replies.metrics)
        };
        let evaluated = ModelEval { name, path, text, shards, generation };
        check_finite(&evaluated)?;
        results.push(evaluated);
    }
    if let Some(path) = &args.side_by_side {
        write_side_by_side(path, &prompts_shown, &replies_of)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    if !args.text.is_empty() || args.shards.is_some() {
        print_metrics_table(&results, width);
    }
    for r in results.iter().filter_map(|r| Some((&r.name, r.shards.as_ref()?.uld?))) {
        println!("{}: ULD distance to the teacher {:.4} per aligned group (cross-tokenizer shards; KL is on the matched ids)", r.0, r.1);
    }
    if let Some(mix) = set.as_ref().and_then(|s| s.manifest.settings.mixture.as_ref()) {
        let teachers: Vec<String> =
            mix.teachers.iter().map(|t| format!("{:.4} {}", t.weight, t.teacher.path)).collect();
        println!(
            "(shard CE, KL and top-1 are against the mixture of {} teachers: {})",
            teachers.len(),
            teachers.join(", ")
        );
    }
    for r in &results {
        for t in r.shards.iter().flat_map(|s| &s.per_teacher) {
            println!(
                "  {} on rows routed to {}: {} targets, CE {:.4}, PPL {:.2}, KL {:.4}, top-1 {:.1}%",
                r.name,
                t.teacher,
                t.targets,
                t.cross_entropy,
                t.perplexity,
                t.kl_to_teacher,
                100.0 * t.top1_agreement
            );
        }
    }
    if results.iter().any(|r| r.generation.is_some()) {
        print_generation_table(&results, width);
    }
    Ok(())
}

fn print_metrics_table(results: &[ModelEval], width: usize) {
    println!(
        "{:<width$}  {:>9} {:>8} {:>9} {:>8} {:>7}  {:>9} {:>8} {:>9} {:>8} {:>7}",
        "model", "text tok", "text CE", "text PPL", "full KL", "top-1", "shard tok", "CE", "PPL", "KL", "top-1"
    );
    for r in results {
        let (t, s) = (r.text.as_ref(), r.shards.as_ref());
        println!(
            "{:<width$}  {:>9} {:>8} {:>9} {:>8} {:>7}  {:>9} {:>8} {:>9} {:>8} {:>7}",
            r.name,
            t.map_or("-".into(), |t| t.tokens.to_string()),
            num(t.map(|t| t.cross_entropy), 4),
            num(t.map(|t| t.perplexity), 2),
            num(t.and_then(|t| t.kl_to_teacher), 4),
            num(t.and_then(|t| t.top1_agreement).map(|a| 100.0 * a), 1),
            s.map_or("-".into(), |s| s.targets.to_string()),
            num(s.map(|s| s.cross_entropy), 4),
            num(s.map(|s| s.perplexity), 2),
            num(s.map(|s| s.kl_to_teacher), 4),
            num(s.map(|s| 100.0 * s.top1_agreement), 1),
        );
    }
}

fn print_generation_table(results: &[ModelEval], width: usize) {
    println!(
        "{:<width$}  {:>7} {:>11} {:>9} {:>8} {:>11} {:>14}",
        "model", "prompts", "exact match", "mean new", "stopped", "teacher NLL", "KL on replies"
    );
    for r in results {
        let Some(g) = &r.generation else { continue };
        println!(
            "{:<width$}  {:>7} {:>11} {:>9.1} {:>7.1}% {:>11} {:>14}",
            r.name,
            g.prompts,
            g.exact_match.map_or("-".into(), |e| format!("{:.1}%", 100.0 * e)),
            g.mean_new_tokens,
            100.0 * g.stopped,
            num(g.teacher_nll, 4),
            num(g.kl_on_replies, 4),
        );
    }
}

/// A number with `p` decimals, or `-` when not measured.
fn num(v: Option<f64>, p: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.p$}"))
}

/// A figure that is not a number (NaN logits of the model or the teacher) fails the
/// run rather than reaching a table.
fn check_finite(e: &ModelEval) -> Result<()> {
    let mut figures: Vec<(&str, Option<f64>)> = vec![];
    if let Some(t) = &e.text {
        figures.extend([("text cross-entropy", Some(t.cross_entropy)), ("text KL to the teacher", t.kl_to_teacher)]);
        figures.push(("text top-1 agreement", t.top1_agreement));
    }
    if let Some(s) = &e.shards {
        figures.extend([("shard cross-entropy", Some(s.cross_entropy)), ("shard KL", Some(s.kl_to_teacher))]);
        figures.extend([("shard top-1 agreement", Some(s.top1_agreement)), ("shard ULD", s.uld)]);
        for t in &s.per_teacher {
            figures.extend([
                ("per-teacher cross-entropy", Some(t.cross_entropy)),
                ("per-teacher KL", Some(t.kl_to_teacher)),
            ]);
        }
    }
    if let Some(g) = &e.generation {
        figures.extend([("replies' teacher NLL", g.teacher_nll), ("KL on replies", g.kl_on_replies)]);
    }
    match figures.iter().find(|(_, v)| v.is_some_and(|v| !v.is_finite())) {
        Some((what, v)) => bail!(
            "model {}: the {what} is {} (the model's or the teacher's logits are not finite)",
            e.name,
            v.unwrap_or_default()
        ),
        None => Ok(()),
    }
}

/// First line of a side-by-side file: eval replaces only files that carry it.
const SIDE_BY_SIDE_MARK: &str = "<!-- distill eval --side-by-side -->";

/// The side-by-side file may be written: its folder exists, and any file already there
/// is one an earlier `eval --side-by-side` wrote.
fn check_side_by_side_target(path: &std::path::Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        bail!("--side-by-side {}: the folder {} does not exist", path.display(), parent.display());
    }
    if path.exists() {
        let first = std::fs::read_to_string(path).ok().and_then(|t| t.lines().next().map(str::to_string));
        if first.as_deref() != Some(SIDE_BY_SIDE_MARK) {
            bail!("--side-by-side {} exists and was not written by distill eval; choose another path", path.display());
        }
    }
    Ok(())
}

/// Every prompt with its reference and each model's reply, as markdown a person reads.
fn write_side_by_side(
    path: &std::path::Path,
    prompts: &[(String, String, Option<String>)],
    replies: &[(String, Vec<String>)],
) -> Result<()> {
    let quote = |text: &str| text.trim_end().lines().map(|l| format!("    {l}\n")).collect::<String>();
    let mut out = format!("{SIDE_BY_SIDE_MARK}\n\n");
    for (i, (id, prompt, reference)) in prompts.iter().enumerate() {
        out += &format!("## {} ({id})\n\nprompt:\n\n{}\n", i + 1, quote(prompt));
        if let Some(reference) = reference {
            out += &format!("reference:\n\n{}\n", quote(reference));
        }
        for (name, texts) in replies {
            out += &format!("{name}:\n\n{}\n", quote(&texts[i]));
        }
    }
    distill::files::write_atomic(path, out.as_bytes())
}
