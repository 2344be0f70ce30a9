use anyhow::Result;
use clap::{Parser, Subcommand};

mod commands;

/// Offline knowledge distillation of language models with cached teacher logits.
#[derive(Parser)]
#[command(name = "distill", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch this binary runs on, CUDA availability and the GPUs.
    Env(commands::env::EnvArgs),
    /// Per-example token count, mean negative log-likelihood and perplexity of a model.
    Score(commands::score::ScoreArgs),
    /// Run the teacher once over a dataset; write top-k targets and hidden states to shards.
    Precompute(Box<commands::precompute::PrecomputeArgs>),
    /// Write a shard set from a served teacher's prompt log-probs (vLLM, SGLang).
    ImportLogprobs(Box<commands::import::ImportArgs>),
    /// Show a shard set: manifest, per-shard and per-column sizes, sample rows as text.
    Inspect(commands::inspect::InspectArgs),
    /// Merge the shard sets of a sliced precompute into one.
    MergeShards(commands::merge::MergeArgs),
    /// Mix several teachers' shard sets over the same rows into one set of targets.
    MergeTeachers(commands::merge::MergeTeachersArgs),
    /// Move a teacher's shard set to a student's tokenizer (what train --cross-tokenizer trains on).
    CrossTokenize(commands::cross::CrossTokenizeArgs),
    /// Train a student against precomputed shards (KD, or plain SFT with --alpha 1).
    Train(Box<commands::train::TrainArgs>),
    /// Held-out cross-entropy, perplexity, KL to the teacher and top-1 agreement of models.
    Eval(commands::eval::EvalArgs),
    /// Continue dataset rows (chat, prompt or text) with a model; write them as JSONL.
    Generate(Box<commands::generate::GenerateArgs>),
    /// Make a student model from a teacher.
    Student(commands::student::StudentArgs),
    /// Measure how fast the shard reader decodes a shard set.
    BenchReader(commands::bench_reader::BenchReaderArgs),
}

fn main() {
    let cli = Cli::parse();
    // Training and generation only: precompute runs the teacher beside tokenising and
    // writing threads, which spinning OpenMP workers starve (the main job's teacher on 2
    // cores: 437 tokens/s with sleeping workers, 243 with spinning ones).
    if matches!(cli.command, Command::Train(_) | Command::Generate(_)) {
        distill::runtime::tune_for_torch_loops_on_cpu();
        if matches!(cli.command, Command::Train(_)) {
            distill::runtime::cache_cpu_allocations();
        }
    } else if matches!(cli.command, Command::Precompute(_)) {
        distill::runtime::keep_freed_memory_on_cpu();
    }
    let result: Result<()> = match cli.command {
        Command::Env(args) => commands::env::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Precompute(args) => commands::precompute::run(*args),
        Command::ImportLogprobs(args) => commands::import::run(*args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::MergeShards(args) => commands::merge::run(args),
        Command::MergeTeachers(args) => commands::merge::run_teachers(args),
        Command::CrossTokenize(args) => commands::cross::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Generate(args) => commands::generate::run(*args),
        Command::Student(args) => commands::student::run(args),
        Command::BenchReader(args) => commands::bench_reader::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
