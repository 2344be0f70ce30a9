//! `distill inspect`: a shard set's manifest, sizes and sample rows, as text or JSON.
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

use distill::files::checksum_file;
use distill::shards::inspect::{inspect, InspectOptions, ShardReport};
use distill::shards::manifest::Manifest;
use distill::tokenizer::TextTokenizer;

/// The manifest at a glance, per-shard counts, bytes per token per column, and sample
/// rows decoded to text with the teacher's top-k as tokens and probabilities.
#[derive(Args)]
pub struct InspectArgs {
    /// Shard set directory (written by `distill precompute`).
    shards: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Sample rows to show.
    #[arg(long, default_value_t = 2)]
    rows: usize,
    /// Trained positions to show per sample row.
    #[arg(long, default_value_t = 8)]
    targets: usize,
    /// Teacher candidates to show per position.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Directory with the tokenizer.json the shards were made with [default: the teacher's].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let manifest = Manifest::load(&args.shards)?;
    let tokenizer = match args.tokenizer.as_deref() {
        // Asked for by name: anything but the shards' own tokenizer is an error.
        Some(dir) => Some(shard_tokenizer(&manifest, dir)?),
        // The teacher's, where the manifest says it was: shown as ids when it has moved.
        None => shard_tokenizer(&manifest, Path::new(&manifest.settings.teacher.path))
            .map_err(|e| eprintln!("warning: {e:#}; showing ids only (--tokenizer DIR to show text)"))
            .ok(),
    };
    let opts = InspectOptions { sample_rows: args.rows, sample_targets: args.targets, show_top: args.top };
    let report = inspect(&args.shards, tokenizer.as_ref(), &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args.shards, &report, tokenizer.is_some());
    }
    Ok(())
}

/// The tokenizer in `dir`, if it is the one the shards were made with (same hash).
fn shard_tokenizer(m: &Manifest, dir: &Path) -> Result<TextTokenizer> {
    let path = dir.join("tokenizer.json");
    let hash = checksum_file(&path)?;
    if hash != m.settings.tokenizer.hash {
        bail!("{} hashes {hash}, not the shards' tokenizer {}", path.display(), m.settings.tokenizer.hash);
    }
    TextTokenizer::from_dir(dir)
}

fn print_report(dir: &Path, r: &ShardReport, have_tokenizer: bool) {
    let m = &r.manifest;
    let s = &m.settings;
    let state = if m.complete {
        "complete".to_string()
    } else {
        format!("INCOMPLETE: {} of {} shards", m.shards.len(), m.planned_shards)
    };
    println!("shard set   {} ({state}; format {} v{})", dir.display(), m.format, m.format_version);
    println!(
        "teacher     {} {} layers, hidden {}, vocab {} ({}), {}",
        s.teacher.architecture,
        s.teacher.num_layers,
        s.teacher.hidden_size,
        s.tokenizer.vocab_size,
        s.teacher.dtype,
        s.teacher.path
    );
    println!(
        "capture     top-k {} ({:?} ids, {} log-probs), tail: {}, hidden states {:?}",
        s.capture.top_k, s.capture.id_type, s.capture.logprob_dtype, s.capture.tail, s.capture.hidden_layers
    );
    if let Some(c) = &s.capture.cross_tokenizer {
        println!(
            "cross-tok   the targets of {} ({} ids, tokenizer {}) in a student's tokens ({} ids, tokenizer {}); {} teacher ids match a student id; pass the student's --tokenizer to see text",
            c.teacher_set, c.teacher_tokenizer.vocab_size, c.teacher_tokenizer.hash, s.tokenizer.vocab_size, s.tokenizer.hash, c.matched_ids
        );
    }
    if let Some(mix) = &s.mixture {
        println!("teachers    {} mixed ({})", mix.teachers.len(), mix.rule);
        for t in &mix.teachers {
            println!(
                "  {:.4}  {} {} layers, top-{}, {} (set {}, {})",
                t.weight, t.teacher.architecture, t.teacher.num_layers, t.top_k, t.teacher.path, t.set, t.set_hash
            );
        }
        for sw in &mix.source_weights {
            let w: Vec<String> = sw.weights.iter().map(|w| format!("{w:.4}")).collect();
            println!("  documents of {}: weights {}", sw.source, w.join(", "));
        }
        if let Some(r) = &mix.route {
            println!("  {}", r.describe());
        }
    }
    if let Some(d) = &s.capture.draws {
        println!("draws       {} per position (seed {}) from {}", d.per_position, d.seed, d.from);
    }
    println!(
        "data        {} source file(s), max_len {}, packing {}, data hash {}",
        s.data.sources.len(),
        s.data.max_len,
        s.data.packing,
        s.data.hash
    );
    println!(
        "totals      {} rows, {} tokens, {} trained positions, {} bytes ({:.1} bytes/token)",
        r.rows,
        r.tokens,
        r.targets,
        r.bytes,
        r.bytes as f64 / r.tokens.max(1) as f64
    );
    if let Some(served) = &s.capture.served {
        println!(
            "served      {} ({} response file(s)); normalised over {}",
            served.formats.join(", "),
            served.responses.len(),
            served.normalised_over
        );
    }
    for (i, line) in m.audit_sums().iter().flat_map(|a| a.summary().lines()).enumerate() {
        println!("{:<11} {line}", if i == 0 { "audit" } else { "" });
    }
    if m.skipped.invalid_rows + m.skipped.truncated_examples > 0 {
        println!(
            "skipped     {} invalid rows, {} examples truncated",
            m.skipped.invalid_rows, m.skipped.truncated_examples
        );
    }
    println!("\n{:<28} {:>8} {:>10} {:>10} {:>12}", "shard", "rows", "tokens", "targets", "bytes");
    for e in &m.shards {
        println!("{:<28} {:>8} {:>10} {:>10} {:>12}", e.file, e.rows, e.tokens, e.targets, e.bytes);
    }
    println!("\n{:<28} {:>12} {:>12}", "column", "bytes", "bytes/token");
    for c in &r.columns {
        println!("{:<28} {:>12} {:>12.2}", c.column, c.bytes, c.bytes_per_token);
    }
    if !have_tokenizer {
        println!("\n(no tokenizer: pass --tokenizer DIR to see text)");
    }
    for row in &r.samples {
        println!("\nrow {} (samples {})", row.row_index, row.sample_ids.join(", "));
        if let Some(text) = &row.text {
            let short: String = text.chars().take(300).collect();
            println!("  text: {short:?}{}", if text.chars().count() > 300 { " ..." } else { "" });
        }
        println!("  {:>5}  {:<16} {:>8}  {:<56} {:>6}", "pos", "next token", "p", "teacher top", "tail");
        for t in &row.targets {
            let show = |id: u32, text: &Option<String>| text.as_ref().map_or(format!("#{id}"), |s| format!("{s:?}"));
            let top: Vec<String> = t.top.iter().map(|(id, s, p)| format!("{} {p:.2}", show(*id, s))).collect();
            println!(
                "  {:>5}  {:<16} {:>8.3}  {:<56} {:>6.3}",
                t.position,
                show(t.token_id, &t.token),
                t.probability,
                top.join(" | "),
                t.tail
            );
            if !t.drawn.is_empty() {
                let drawn: Vec<String> = t.drawn.iter().map(|(id, s, n)| format!("{} x{n}", show(*id, s))).collect();
                println!("  {:>5}  {:<16} {:>8}  drawn from the tail: {}", "", "", "", drawn.join(" | "));
            }
        }
    }
}
