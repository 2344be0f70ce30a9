use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

use distill::losses::{Divergence, HiddenLoss, KdLoss, TopKMode};
use distill::runtime::parse_device;
use distill::train::optim::AdamWConfig;
use distill::train::schedule::{Decay, LrSchedule};
use distill::train::trainer::{train, HiddenSettings, TrainConfig};

#[derive(Clone, Copy, ValueEnum)]
enum Loss {
    ForwardKl,
    ReverseKl,
    Jsd,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Student model directory (Hugging Face layout; same tokenizer as the teacher).
    #[arg(long)]
    student: PathBuf,
    /// Shard set written by `distill precompute`.
    #[arg(long)]
    shards: PathBuf,
    /// Output directory: checkpoints, metrics.jsonl.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Padded tokens per micro-batch.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, value_enum, default_value = "cosine")]
    decay: DecayArg,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// Weight of the hard-label cross-entropy (1 = plain SFT, no teacher targets).
    #[arg(long, default_value_t = 0.0)]
    alpha: f64,
    #[arg(long, value_enum, default_value = "forward-kl")]
    loss: Loss,
    /// JSD beta (with --loss jsd).
    #[arg(long, default_value_t = 0.5)]
    beta: f64,
    /// Compare top-k renormalised distributions instead of the (k+1) buckets.
    #[arg(long)]
    renormalized_topk: bool,
    /// Distillation temperature (needs --renormalized-topk when not 1).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    /// Train even if the shards were made with another tokenizer.
    #[arg(long)]
    force_tokenizer: bool,
    /// Positions per chunk of the head and loss.
    #[arg(long, default_value_t = 2048)]
    head_chunk: i64,
    /// Hidden-state distillation pairs TEACHER:STUDENT (hidden-state numbers), comma-separated.
    #[arg(long, value_delimiter = ',')]
    hidden_map: Vec<distill::train::hidden::HiddenMap>,
    /// Weight of the hidden-state loss.
    #[arg(long, default_value_t = 1.0)]
    hidden_weight: f64,
    /// Use cosine distance instead of MSE for hidden states.
    #[arg(long)]
    hidden_cosine: bool,
    /// Stop this run at this step (with a checkpoint); --resume continues the schedule.
    #[arg(long)]
    stop_at: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DecayArg {
    Cosine,
    Linear,
    Constant,
}

pub fn run(args: TrainArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.alpha) {
        bail!("--alpha must lie in [0, 1]");
    }
    let divergence = match args.loss {
        Loss::ForwardKl => Divergence::ForwardKl,
        Loss::ReverseKl => Divergence::ReverseKl,
        Loss::Jsd => Divergence::Jsd { beta: args.beta },
    };
    let decay = match args.decay {
        DecayArg::Cosine => Decay::Cosine,
        DecayArg::Linear => Decay::Linear,
        DecayArg::Constant => Decay::Constant,
    };
    let cfg = TrainConfig {
        student: args.student,
        shards: args.shards,
        output: args.output.clone(),
        device: parse_device(&args.device)?,
        steps: args.steps,
        batch_tokens: args.batch_tokens,
        grad_accum: args.grad_accum,
        schedule: LrSchedule {
            peak_lr: args.lr,
            warmup_steps: args.warmup_steps,
            total_steps: args.steps,
            decay,
            min_lr_ratio: args.min_lr_ratio,
        },
        adamw: AdamWConfig { weight_decay: args.weight_decay, ..AdamWConfig::default() },
        clip_norm: args.clip_norm,
        alpha: args.alpha,
        kd: KdLoss {
            divergence,
            mode: if args.renormalized_topk { TopKMode::Renormalized } else { TopKMode::Bucket },
            temperature: args.temperature,
        },
        seed: args.seed,
        save_every: args.save_every,
        keep_last: args.keep_last,
        resume: args.resume,
        force_tokenizer: args.force_tokenizer,
        head_chunk: args.head_chunk,
        stop_at: args.stop_at,
        hidden: (!args.hidden_map.is_empty()).then(|| HiddenSettings {
            maps: args.hidden_map.clone(),
            weight: args.hidden_weight,
            loss: if args.hidden_cosine { HiddenLoss::Cosine } else { HiddenLoss::Mse },
        }),
    };
    let logs = train(&cfg, |l| {
        eprintln!(
            "step {:>6}  loss {:.4}  kd {:.4}  ce {:.4}  hidden {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            l.step, l.loss, l.kd, l.ce, l.hidden, l.lr, l.grad_norm, l.tokens_per_s
        )
    })?;
    if let Some(last) = logs.last() {
        println!("trained to step {} in {}; metrics in metrics.jsonl", last.step, args.output.display());
    } else {
        println!("nothing to do: {} is already at step {}", args.output.display(), cfg.steps);
    }
    Ok(())
}
