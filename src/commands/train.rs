//! `distill train`: flags and pipeline file -> `TrainConfig`, a progress bar or one line
//! per step, and a closing line.
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use distill::distributed::buckets::BucketOptions;
use distill::distributed::launch::run_local;
use distill::distributed::WorldInfo;
use distill::losses::{Divergence, HiddenLoss, KdLoss, TopKMode};
use distill::runtime::parse_device;
use distill::train::config::MemorySettings;
use distill::train::hidden::HiddenMap;
use distill::train::moments::MomentStorage;
use distill::train::optim::AdamWConfig;
use distill::train::schedule::{Decay, LrSchedule};
use distill::train::{train, CrossTokenizerSettings, HiddenSettings, ParallelSettings, Precision, TrainConfig};
use std::time::Duration;
use tch::{Device, Kind};

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Loss {
    ForwardKl,
    ReverseKl,
    Jsd,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DecayArg {
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum PrecisionArg {
    Auto,
    F32,
    Bf16,
}

/// Every option can come from a TOML file (`--config`, keys named as the flags with `_`
/// for `-`); flags given on the command line override it.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML pipeline file with any of the options below.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Student model directory (Hugging Face layout; same tokenizer as the teacher).
    #[arg(long)]
    student: Option<PathBuf>,
    /// Shard set written by `distill precompute`.
    #[arg(long)]
    shards: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl.
    #[arg(long)]
    output: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// Optimiser steps [default: 100].
    #[arg(long)]
    steps: Option<u64>,
    /// Padded tokens per micro-batch [default: 8192].
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Pack several shard rows into each batch row (less padding; attention stays
    /// within each document, at the cost of each document's own length) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pack: Option<bool>,
    /// Tokens per packed batch row [default: the shards' max_len].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Recompute each layer's activations during backward (less memory, one more forward).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    recompute: Option<bool>,
    /// Recompute the first N layers only, whatever --recompute says; the others keep their
    /// activations (memory and time in between; N above the model's layers: every layer).
    #[arg(long, value_name = "N")]
    recompute_layers: Option<usize>,
    /// auto (bf16 on CUDA, f32 on CPU), f32, or bf16 autocast with float32 weights [default: auto].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// The student's weights (and gradients): f32, or bf16 with a float32 master copy
    /// in the optimiser (computes under bf16 autocast) [default: f32].
    #[arg(long, value_enum)]
    weights: Option<WeightsArg>,
    /// AdamW's moments: float32, bf16, or 8bit (block-wise, as bitsandbytes' AdamW8bit;
    /// tensors under 4096 values stay float32) [default: float32].
    #[arg(long, value_enum)]
    optimizer_moments: Option<MomentsArg>,
    /// On CUDA: keep the optimiser's state (moments, master weights) in host memory.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    offload_optimizer: Option<bool>,
    /// Micro-batches per step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 1e-4].
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// [default: cosine]
    #[arg(long, value_enum)]
    decay: Option<DecayArg>,
    /// Decay floor as a share of the peak rate [default: 0.1].
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// [default: 0.01]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip [default: 1.0].
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Weight of the hard-label cross-entropy (1 = plain SFT, no teacher targets; 0 = pure KD) [default: 0.5].
    #[arg(long)]
    alpha: Option<f64>,
    /// A mixture-of-experts student: weight of its routers' load-balancing loss (as
    /// transformers' router_aux_loss_coef, e.g. 0.001) [default: 0, off].
    #[arg(long)]
    router_aux_weight: Option<f64>,
    /// [default: forward-kl]
    #[arg(long, value_enum)]
    loss: Option<Loss>,
    /// JSD beta (with --loss jsd) [default: 0.5].
    #[arg(long)]
    beta: Option<f64>,
    /// Compare top-k renormalised distributions instead of the (k+1) buckets.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    renormalized_topk: Option<bool>,
    /// A label (true next token) outside the teacher's top-k gets its own bucket [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    label_bucket: Option<bool>,
    /// At --temperature other than 1, train on the top-k and tail bucket of shards that
    /// hold tail draws (draws stand for the tail at temperature 1 only) [default: refused].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    ignore_draws: Option<bool>,
    /// Distillation temperature; with buckets the tempered tail is approximated (docs/train.md) [default: 1].
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Shuffle the rows [default: true]; false keeps the shards' order.
    #[arg(long)]
    shuffle: Option<bool>,
    /// [default: 100]
    #[arg(long)]
    save_every: Option<u64>,
    /// Checkpoints kept [default: 2].
    #[arg(long)]
    keep_last: Option<usize>,
    /// TensorBoard event files (every loss part, lr, gradient norm, tokens/s, memory,
    /// times) go to this folder [default: OUTPUT/tensorboard].
    #[arg(long)]
    tensorboard: Option<PathBuf>,
    /// Continue from the newest checkpoint in --output.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    resume: Option<bool>,
    /// Train even if the shards were made with another tokenizer file (same ids).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    force_tokenizer: Option<bool>,
    /// The shards come from a teacher with another tokenizer: move them to the student's
    /// tokens once (into OUTPUT/student-targets) and train with ULD plus the KL on the
    /// teacher ids whose strings the student's vocabulary holds.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    cross_tokenizer: Option<bool>,
    /// With --cross-tokenizer: the directory of the tokenizer the shards were made with
    /// [default: the teacher's path in the shards' manifest].
    #[arg(long)]
    teacher_tokenizer: Option<PathBuf>,
    /// On a teacher of another tokenizer (--cross-tokenizer, or shards made by
    /// `distill cross-tokenize`): weight of ULD beside the matched-id KL [default: 1].
    #[arg(long)]
    uld_weight: Option<f64>,
    /// Positions per chunk of the head and loss [default: 64 MiB of float32 logits on a CPU, 256 MiB on a GPU].
    #[arg(long)]
    head_chunk: Option<i64>,
    /// Stop this run at this step (with a checkpoint); --resume continues the schedule.
    #[arg(long)]
    stop_at: Option<u64>,
    /// Hidden-state distillation pairs TEACHER:STUDENT (hidden-state numbers), comma-separated.
    #[arg(long, value_delimiter = ',')]
    hidden_map: Option<Vec<String>>,
    /// Weight of the hidden-state loss [default: 1].
    #[arg(long)]
    hidden_weight: Option<f64>,
    /// Use cosine distance instead of MSE for hidden states.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    hidden_cosine: Option<bool>,
    /// Start N local processes of this command, data-parallel (as `torchrun
    /// --nproc-per-node N` does); under torchrun or Slurm the ranks come from the environment.
    #[arg(long)]
    #[serde(skip)]
    nproc: Option<usize>,
    /// Data-parallel: seconds a rank waits for the others before stopping with an error
    /// naming the missing rank; must exceed a checkpoint's write time [default: 600].
    #[arg(long)]
    dist_timeout: Option<f64>,
    /// Data-parallel: each rank keeps 1/N of AdamW's moments (ZeRO-1).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    zero1: Option<bool>,
    /// Data-parallel: gradients travel as f32 or bf16 (half the bytes, rounded sums) [default: f32].
    #[arg(long, value_enum)]
    allreduce_dtype: Option<WireArg>,
    /// Data-parallel: MiB per gradient bucket [default: 25].
    #[arg(long)]
    bucket_mb: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum WeightsArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq)]
enum MomentsArg {
    #[value(name = "float32")]
    #[serde(rename = "float32")]
    Float32,
    #[value(name = "bf16")]
    #[serde(rename = "bf16")]
    Bf16,
    #[value(name = "8bit")]
    #[serde(rename = "8bit")]
    Eight,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum WireArg {
    F32,
    Bf16,
}

/// The longest --dist-timeout (35 years): what c10d's clocks hold.
const MAX_DIST_TIMEOUT_S: f64 = distill::distributed::group::MAX_WAIT_MS as f64 / 1000.0;

pub fn config_from(args: TrainArgs) -> Result<TrainConfig> {
    let file = args.config.clone();
    let a = super::with_pipeline_file(args, file.as_deref())?;
    let d = TrainConfig::default();
    let steps = a.steps.unwrap_or(d.steps);
    let divergence = match a.loss {
        None => d.kd.divergence,
        Some(Loss::ForwardKl) => Divergence::ForwardKl,
        Some(Loss::ReverseKl) => Divergence::ReverseKl,
        Some(Loss::Jsd) => Divergence::Jsd { beta: a.beta.unwrap_or(0.5) },
    };
    let decay = match a.decay {
        None => d.schedule.decay,
        Some(DecayArg::Cosine) => Decay::Cosine,
        Some(DecayArg::Linear) => Decay::Linear,
        Some(DecayArg::Constant) => Decay::Constant,
    };
    // Options that would be silently ignored in this combination are refused.
    if a.beta.is_some() && !matches!(a.loss, Some(Loss::Jsd)) {
        bail!("--beta weighs the generalised JSD; it needs --loss jsd");
    }
    let maps: Vec<HiddenMap> = a.hidden_map.unwrap_or_default().iter().map(|m| m.parse()).collect::<Result<_>>()?;
    if maps.is_empty() && (a.hidden_weight.is_some() || a.hidden_cosine.is_some()) {
        bail!("--hidden-weight and --hidden-cosine apply to hidden-state distillation; they need --hidden-map");
    }
    let world = WorldInfo::from_env()?;
    let mut device = a.device.as_deref().map(parse_device).transpose()?.unwrap_or(d.device);
    if let (Some(w), true) = (&world, device.is_cuda()) {
        // One GPU per process, as torchrun's LOCAL_RANK means.
        device = Device::Cuda(w.local_rank);
    }
    let dp = ParallelSettings::default();
    let parallel = ParallelSettings {
        timeout: match a.dist_timeout {
            Some(t) if t > 0.0 && t <= MAX_DIST_TIMEOUT_S => Duration::from_secs_f64(t),
            Some(t) => {
                bail!("--dist-timeout must be a positive number of seconds up to {MAX_DIST_TIMEOUT_S:e}, not {t}")
            }
            None => dp.timeout,
        },
        zero1: a.zero1.unwrap_or(dp.zero1),
        buckets: BucketOptions {
            bytes: a.bucket_mb.map_or(dp.buckets.bytes, |mb| mb.max(1) << 20),
            wire: match a.allreduce_dtype {
                Some(WireArg::Bf16) => Kind::BFloat16,
                _ => dp.buckets.wire,
            },
        },
    };
    let cfg = TrainConfig {
        student: a.student.unwrap_or_default(),
        shards: a.shards.unwrap_or_default(),
        output: a.output.unwrap_or_default(),
        device,
        steps,
        batch_tokens: a.batch_tokens.unwrap_or(d.batch_tokens),
        pack: a.pack.or(d.pack),
        seq_len: a.seq_len,
        recompute: match (a.recompute, a.recompute_layers) {
            (_, Some(n)) => n,
            (Some(true), None) => usize::MAX,
            (Some(false), None) => 0,
            (None, None) => d.recompute,
        },
        precision: match a.precision {
            None | Some(PrecisionArg::Auto) => Precision::Auto,
            Some(PrecisionArg::F32) => Precision::Float32,
            Some(PrecisionArg::Bf16) => Precision::Bf16Autocast,
        },
        memory: MemorySettings {
            bf16_weights: a.weights == Some(WeightsArg::Bf16),
            moments: match a.optimizer_moments {
                None | Some(MomentsArg::Float32) => MomentStorage::Float32,
                Some(MomentsArg::Bf16) => MomentStorage::Bf16,
                Some(MomentsArg::Eight) => MomentStorage::Blockwise8Bit,
            },
            offload: a.offload_optimizer.unwrap_or(false),
        },
        grad_accum: a.grad_accum.unwrap_or(d.grad_accum),
        schedule: LrSchedule {
            peak_lr: a.lr.unwrap_or(d.schedule.peak_lr),
            warmup_steps: a.warmup_steps.unwrap_or(d.schedule.warmup_steps),
            total_steps: steps,
            decay,
            min_lr_ratio: a.min_lr_ratio.unwrap_or(d.schedule.min_lr_ratio),
        },
        adamw: AdamWConfig { weight_decay: a.weight_decay.unwrap_or(d.adamw.weight_decay), ..d.adamw },
        clip_norm: a.clip_norm.unwrap_or(d.clip_norm),
        alpha: a.alpha.unwrap_or(d.alpha),
        router_aux_weight: a.router_aux_weight.unwrap_or(d.router_aux_weight),
        kd: KdLoss {
            divergence,
            mode: if a.renormalized_topk.unwrap_or(false) { TopKMode::Renormalized } else { d.kd.mode },
            temperature: a.temperature.unwrap_or(d.kd.temperature),
        },
        label_bucket: a.label_bucket.unwrap_or(d.label_bucket),
        ignore_draws: a.ignore_draws.unwrap_or(d.ignore_draws),
        seed: a.seed.unwrap_or(d.seed),
        shuffle: a.shuffle.unwrap_or(d.shuffle),
        save_every: a.save_every.unwrap_or(d.save_every),
        keep_last: a.keep_last.unwrap_or(d.keep_last),
        tensorboard: a.tensorboard.or(d.tensorboard),
        resume: a.resume.unwrap_or(d.resume),
        force_tokenizer: a.force_tokenizer.unwrap_or(d.force_tokenizer),
        head_chunk: a.head_chunk,
        stop_at: a.stop_at,
        hidden: (!maps.is_empty()).then(|| HiddenSettings {
            maps,
            weight: a.hidden_weight.unwrap_or(1.0),
            loss: if a.hidden_cosine.unwrap_or(false) { HiddenLoss::Cosine } else { HiddenLoss::Mse },
        }),
        world,
        parallel,
        cross_tokenizer: a
            .cross_tokenizer
            .unwrap_or(false)
            .then(|| CrossTokenizerSettings { teacher_tokenizer: a.teacher_tokenizer.clone() }),
        uld_weight: a.uld_weight.unwrap_or(d.uld_weight),
    };
    if !a.cross_tokenizer.unwrap_or(false) && a.teacher_tokenizer.is_some() {
        bail!("--teacher-tokenizer goes with --cross-tokenizer");
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let nproc = args.nproc;
    // Flags are checked here, once, before any rank starts.
    let cfg = config_from(args)?;
    if let (Some(n), None) = (nproc.filter(|&n| n > 1), &cfg.world) {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return run_local(n, &args);
    }
    if let (Some(n), Some(w)) = (nproc, &cfg.world) {
        if n != w.world {
            bail!("--nproc {n} inside a job of {} ranks (the launcher already started the ranks)", w.world);
        }
    }
    if cfg.world.as_ref().is_some_and(|w| w.rank != 0) {
        // Rank 0 reports progress; the others speak only to fail.
        train(&cfg, |_| {})?;
        return Ok(());
    }
    // A bar on a terminal; one line per step otherwise (logs of batch jobs).
    let bar = indicatif::ProgressBar::new(cfg.steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len}  {msg}  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let logs = train(&cfg, |l| {
        let line = format!(
            "loss {:.4}  kd {:.4}  ce {:.4}  hidden {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            l.loss, l.kd, l.ce, l.hidden, l.lr, l.grad_norm, l.tokens_per_s
        );
        if bar.is_hidden() {
            eprintln!("step {:>6}  {line}", l.step);
        } else {
            bar.set_position(l.step);
            bar.set_message(line);
        }
    })?;
    bar.finish_and_clear();
    match logs.last() {
        Some(last) => {
            println!("trained to step {} in {}; metrics in metrics.jsonl", last.step, cfg.output.display());
            println!("training state: {}", last.state_bytes.summary());
        }
        None => println!("nothing to do: {} is already at step {}", cfg.output.display(), cfg.steps),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_train_pipeline_file_parses_into_a_config() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("train-") && name.ends_with(".toml") {
                let args = TrainArgs { config: Some(path.clone()), ..TrainArgs::default() };
                let cfg = config_from(args);
                assert!(cfg.is_ok(), "{}: {:#}", path.display(), cfg.err().unwrap());
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn flags_override_the_pipeline_file_and_the_rest_comes_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        let text =
            "student = \"s\"\nshards = \"d\"\noutput = \"o\"\nsteps = 5\nlr = 0.5\nloss = \"jsd\"\npack = true\n";
        std::fs::write(&file, text).unwrap();
        let args = TrainArgs { config: Some(file), steps: Some(7), device: Some("cpu".into()), ..TrainArgs::default() };
        let cfg = config_from(args).unwrap();
        assert_eq!((cfg.steps, cfg.schedule().total_steps), (7, 7), "the flag wins");
        assert_eq!(cfg.schedule.peak_lr, 0.5, "the file fills what the flags leave out");
        assert!(cfg.pack == Some(true) && cfg.kd.divergence == Divergence::Jsd { beta: 0.5 });
        assert_eq!(cfg.batch_tokens, TrainConfig::default().batch_tokens, "the library's default");
    }

    #[test]
    fn recompute_flags_give_the_layers_recomputed() {
        let layers = |recompute: Option<bool>, recompute_layers: Option<usize>| {
            let args = TrainArgs {
                recompute,
                recompute_layers,
                student: Some("s".into()),
                shards: Some("d".into()),
                output: Some("o".into()),
                device: Some("cpu".into()),
                ..TrainArgs::default()
            };
            config_from(args).unwrap().recompute
        };
        assert_eq!(layers(None, None), 0, "none by default");
        assert_eq!(layers(Some(true), None), usize::MAX, "--recompute: every layer");
        assert_eq!(layers(Some(false), None), 0);
        assert_eq!(layers(None, Some(8)), 8);
        assert_eq!(layers(Some(false), Some(8)), 8, "a pipeline file's `recompute = false` does not undo the count");
    }
}
