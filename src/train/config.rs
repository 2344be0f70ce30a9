//! What a training run is asked to do, with the library's defaults (`Default`), the
//! checks that need neither model nor shards (`validate`) and `auto` precision resolved
//! against the device. `distill train` and TOML pipeline files only fill this in.
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

use super::hidden::HiddenMap;
use super::moments::MomentStorage;
use super::optim::{AdamWConfig, OptimizerMemory};
use super::schedule::{Decay, LrSchedule};
use crate::batch::targets::TargetOptions;
use crate::distributed::buckets::BucketOptions;
use crate::distributed::WorldInfo;
use crate::losses::{Divergence, HiddenLoss, KdLoss, TopKMode};
use crate::shards::manifest::CaptureInfo;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub student: PathBuf,
    pub shards: PathBuf,
    pub output: PathBuf,
    pub device: Device,
    pub steps: u64,
    /// Padded tokens per micro-batch.
    pub batch_tokens: usize,
    /// Pack several shard rows into each batch row (see `batch::feed::FeedOptions`), of
    /// `seq_len` tokens (default: the longest row the shards allow); `None`: auto, see
    /// `pack_to`.
    pub pack: Option<bool>,
    pub seq_len: Option<usize>,
    /// Layers (the first ones) that keep only their input and are recomputed during
    /// backward: 0 none, `usize::MAX` all (see `Transformer::forward_backward`).
    pub recompute: usize,
    pub precision: Precision,
    /// How the training state is kept: weights, moments, where (see `MemorySettings`).
    pub memory: MemorySettings,
    pub grad_accum: usize,
    /// Its `total_steps` is taken from `steps` (see `schedule()`).
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    pub clip_norm: f64,
    /// Weight of the hard-label cross-entropy; KD gets `1 - alpha`.
    pub alpha: f64,
    /// A mixture-of-experts student: weight of its routers' load-balancing loss
    /// (`model::moe::RouterBalance`, as transformers' `router_aux_loss_coef`); 0: off.
    pub router_aux_weight: f64,
    pub kd: KdLoss,
    /// A label outside the teacher's top-k gets its own bucket (see `batch::targets`).
    pub label_bucket: bool,
    /// At a temperature other than 1, train on the top-k and tail bucket of shards that
    /// hold draws (which stand for the tail at temperature 1 only) instead of refusing.
    pub ignore_draws: bool,
    pub seed: u64,
    /// Shuffle rows (row groups per epoch, rows within windows); `false` keeps the
    /// shards' order (curricula, and benchmarks on the same batches as another tool).
    pub shuffle: bool,
    pub save_every: u64,
    pub keep_last: usize,
    /// TensorBoard event files go here (`None`: `OUTPUT/tensorboard`).
    pub tensorboard: Option<PathBuf>,
    pub resume: bool,
    pub force_tokenizer: bool,
    /// Positions per chunk of the head + loss (`None`: `model::logits`' policy).
    pub head_chunk: Option<i64>,
    /// Hidden-state distillation (teacher layer -> student layer), if any.
    pub hidden: Option<HiddenSettings>,
    /// End this invocation at this step (with a checkpoint), keeping the schedule of
    /// `steps`: for jobs with a wall-time limit, continued with `resume`.
    pub stop_at: Option<u64>,
    /// This process's place in a data-parallel job (`None`: it trains alone).
    pub world: Option<WorldInfo>,
    pub parallel: ParallelSettings,
    /// A teacher with another tokenizer than the student's (`--cross-tokenizer`).
    pub cross_tokenizer: Option<CrossTokenizerSettings>,
    /// On shards in the student's tokens made from another tokenizer's (`--cross-tokenizer`
    /// or `distill cross-tokenize`): weight of ULD beside the matched-id KL, both within
    /// KD's `1 - alpha`.
    pub uld_weight: f64,
}

/// Cross-tokenizer KD: the shards are moved to the student's tokens once, into
/// `OUTPUT/student-targets` (`align::set`), and trained on with ULD plus the KL on the
/// teacher ids whose strings the student's vocabulary holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossTokenizerSettings {
    /// The tokenizer the shards were made with (default: the teacher's path in the
    /// manifest).
    pub teacher_tokenizer: Option<PathBuf>,
}

/// How the ranks of a data-parallel job work together (ignored when training alone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParallelSettings {
    /// A collective that waits longer than this for a rank fails, naming the rank; it
    /// must exceed the longest gap between two steps (rank 0 writing a checkpoint).
    pub timeout: Duration,
    /// ZeRO-1: each rank keeps 1/N of AdamW's moments (see `distributed::zero`).
    pub zero1: bool,
    pub buckets: BucketOptions,
}

impl Default for ParallelSettings {
    fn default() -> Self {
        ParallelSettings { timeout: Duration::from_secs(600), zero1: false, buckets: BucketOptions::default() }
    }
}

/// The training state's storage, each a flag for a smaller device: bf16 weights (and
/// gradients) with a float32 master copy in the optimiser, AdamW's moments in bf16 or
/// block-wise 8-bit, the optimiser's state in host memory while training on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MemorySettings {
    pub bf16_weights: bool,
    pub moments: MomentStorage,
    pub offload: bool,
}

impl MemorySettings {
    pub fn optimizer(&self) -> OptimizerMemory {
        OptimizerMemory { moments: self.moments, offload: self.offload }
    }

    /// The dtype the student's weights are kept in.
    pub fn weight_kind(&self) -> tch::Kind {
        if self.bf16_weights {
            tch::Kind::BFloat16
        } else {
            tch::Kind::Float
        }
    }

    /// Whether any setting differs from float32 weights and moments next to the weights.
    pub fn is_default(&self) -> bool {
        *self == MemorySettings::default()
    }
}

/// Arithmetic of the forward and backward passes (the weights' storage is
/// `MemorySettings`' choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16 autocast on CUDA, float32 elsewhere.
    Auto,
    Float32,
    /// bfloat16 autocast (see `autocast.rs`).
    Bf16Autocast,
}

impl Precision {
    /// `Auto` decided for `device`.
    pub fn resolve(self, device: Device) -> Precision {
        match self {
            Precision::Auto if device.is_cuda() => Precision::Bf16Autocast,
            Precision::Auto => Precision::Float32,
            other => other,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HiddenSettings {
    pub maps: Vec<HiddenMap>,
    pub weight: f64,
    pub loss: HiddenLoss,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            student: PathBuf::new(),
            shards: PathBuf::new(),
            output: PathBuf::new(),
            device: Device::cuda_if_available(),
            steps: 100,
            batch_tokens: 8192,
            pack: None,
            seq_len: None,
            recompute: 0,
            precision: Precision::Auto,
            memory: MemorySettings::default(),
            grad_accum: 1,
            schedule: LrSchedule {
                peak_lr: 1e-4,
                warmup_steps: 0,
                total_steps: 100,
                decay: Decay::Cosine,
                min_lr_ratio: 0.1,
            },
            adamw: AdamWConfig::default(),
            clip_norm: 1.0,
            // Half hard labels: the best perplexity of every targets table (docs/targets.md, "Which
            // targets"); pure KD (0) gets a lower KL but a worse perplexity.
            alpha: 0.5,
            router_aux_weight: 0.0,
            kd: KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 },
            label_bucket: false,
            ignore_draws: false,
            seed: 0,
            shuffle: true,
            save_every: 100,
            keep_last: 2,
            tensorboard: None,
            resume: false,
            force_tokenizer: false,
            head_chunk: None,
            hidden: None,
            stop_at: None,
            world: None,
            parallel: ParallelSettings::default(),
            cross_tokenizer: None,
            uld_weight: 1.0,
        }
    }
}

impl TrainConfig {
    /// Tokens per packed batch row, or `None` for padded batches. `--pack auto` (the
    /// default) packs: attention over a packed row runs per document (`model::packed`),
    /// so its cost is the sum of the documents' squares whatever the row's length, and
    /// packing only removes padding. (Before per-document attention, a packed row's
    /// attention was dense and masked and auto packing stopped at 1024 tokens: rows
    /// packed to 1024 trained at 211-225 tokens/s against 275-282 packed to 256.)
    pub fn pack_to(&self, shards_max_len: usize) -> Option<usize> {
        let len = self.seq_len.unwrap_or(shards_max_len);
        self.pack.unwrap_or(true).then_some(len)
    }

    /// How the teacher targets of shards captured as `capture` are built for the loss,
    /// or `None` when no divergence is trained (alpha 1). Tail draws estimate the forward
    /// KL's gradient (bucket mode, temperature 1) without bias, and nothing else: any
    /// other loss trains on the top-k and the tail bucket of the same shards, and on
    /// shards without top-k ids it is refused.
    pub fn target_options(&self, capture: &CaptureInfo) -> Result<Option<TargetOptions>> {
        if self.alpha >= 1.0 {
            return Ok(None);
        }
        if capture.cross_tokenizer.is_some() {
            // Listed: the matched ids; positions inside a group list none (KL 0 there).
            return Ok(Some(TargetOptions { label_bucket: false, use_draws: false }));
        }
        let bucket = self.kd.mode == TopKMode::Bucket;
        let forward_kl_t1 = bucket && self.kd.divergence == Divergence::ForwardKl && self.kd.temperature == 1.0;
        if capture.draws.is_some() && capture.top_k > 0 && self.kd.temperature != 1.0 && !self.ignore_draws {
            bail!(
                "--temperature {}: these shards' tail draws stand for the tail at temperature 1 only (each drawn id's teacher probability is not stored, so a tempered tail cannot be importance-weighted); train at --temperature 1 to use them, or add --ignore-draws to train on the top-k and the tail bucket at this temperature (the manifest's audit gives the truncation KL and the top-k's mass at temperatures passed to precompute --audit-temperatures)",
                self.kd.temperature
            );
        }
        if capture.top_k == 0 && !forward_kl_t1 {
            bail!(
                "these shards hold tail draws but no top-k ids (precompute --top-k 0 --sample), and draws give an unbiased estimate of the forward KL on buckets only, at temperature 1: train them with --loss forward-kl, without --renormalized-topk or --temperature, or precompute a top-k"
            );
        }
        Ok(Some(TargetOptions { label_bucket: self.label_bucket && bucket, use_draws: forward_kl_t1 }))
    }

    /// The arithmetic of this run: `precision` resolved for the device; bf16 weights
    /// always run under bf16 autocast, through whose casts their matmuls meet the
    /// float32 tensors of the head's loss and the hidden-state projections.
    pub fn resolved_precision(&self) -> Precision {
        if self.memory.bf16_weights {
            return Precision::Bf16Autocast;
        }
        self.precision.resolve(self.device)
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { total_steps: self.steps, ..self.schedule }
    }

    /// The checks that need neither the student nor the shards.
    pub fn validate(&self) -> Result<()> {
        if [&self.student, &self.shards, &self.output].iter().any(|p| p.as_os_str().is_empty()) {
            bail!("--student, --shards and --output are required (or in the --config file)");
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!("--alpha must lie in [0, 1], not {}", self.alpha);
        }
        if self.alpha < 1.0 {
            self.kd.check()?;
        }
        if !(self.router_aux_weight.is_finite() && self.router_aux_weight >= 0.0) {
            bail!("--router-aux-weight must be a number >= 0, not {}", self.router_aux_weight);
        }
        let s = &self.schedule;
        let checks: [(bool, String); 13] = [
            (self.steps >= 1, format!("--steps must be at least 1, not {}", self.steps)),
            (self.batch_tokens >= 1, format!("--batch-tokens must be at least 1, not {}", self.batch_tokens)),
            (self.grad_accum >= 1, format!("--grad-accum must be at least 1, not {}", self.grad_accum)),
            (s.peak_lr.is_finite() && s.peak_lr > 0.0, format!("--lr must be a positive number, not {}", s.peak_lr)),
            (
                (0.0..=1.0).contains(&s.min_lr_ratio),
                format!("--min-lr-ratio must lie in [0, 1], not {}", s.min_lr_ratio),
            ),
            (
                self.adamw.weight_decay.is_finite() && self.adamw.weight_decay >= 0.0,
                format!("--weight-decay must be a number >= 0, not {}", self.adamw.weight_decay),
            ),
            (self.clip_norm > 0.0, format!("--clip-norm must be positive (inf: no clipping), not {}", self.clip_norm)),
            (self.save_every >= 1, format!("--save-every must be at least 1, not {}", self.save_every)),
            (self.keep_last >= 1, format!("--keep-last must be at least 1, not {}", self.keep_last)),
            (
                self.head_chunk.is_none_or(|c| c >= 1),
                format!("--head-chunk must be at least 1, not {:?}", self.head_chunk),
            ),
            (
                self.stop_at.is_none_or(|n| (1..=self.steps).contains(&n)),
                format!("--stop-at must lie in 1..={}, not {:?}", self.steps, self.stop_at),
            ),
            (
                self.seq_len.is_none_or(|n| n >= 2),
                format!("--seq-len must be at least 2 tokens, not {:?}", self.seq_len),
            ),
            (
                self.seq_len.is_none() || self.pack != Some(false),
                "--seq-len sets the packed row length; it has no effect with --pack false".to_string(),
            ),
        ];
        if let Some((_, message)) = checks.into_iter().find(|(ok, _)| !ok) {
            bail!("{message}");
        }
        if let Some(h) = &self.hidden {
            if !(h.weight.is_finite() && h.weight >= 0.0) {
                bail!("--hidden-weight must be a number >= 0, not {}", h.weight);
            }
        }
        if !(self.uld_weight.is_finite() && self.uld_weight >= 0.0) {
            bail!("--uld-weight must be a number >= 0, not {}", self.uld_weight);
        }
        let m = &self.memory;
        if m.offload && !self.device.is_cuda() {
            bail!(
                "--offload-optimizer keeps AdamW's state in host memory while the student trains on CUDA; on {:?} it is in host memory already",
                self.device
            );
        }
        if m.bf16_weights && self.precision == Precision::Float32 {
            bail!("--weights bf16 computes in bfloat16; --precision f32 asks for float32 arithmetic");
        }
        if self.parallel.zero1 && !m.is_default() {
            bail!(
                "--zero1 shards float32 moments of float32 weights; with --optimizer-moments {} or --weights bf16 train without --zero1",
                m.moments.name()
            );
        }
        if self.cross_tokenizer.is_some() && self.hidden.is_some() {
            bail!("--cross-tokenizer: hidden-state distillation needs the teacher's positions; the student's tokens are others");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_caller_builds_a_config_from_defaults() {
        let cfg = TrainConfig {
            student: "student".into(),
            shards: "shards".into(),
            output: "run".into(),
            device: Device::Cpu,
            steps: 40,
            ..TrainConfig::default()
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.schedule().total_steps, 40);
        assert_eq!(cfg.precision.resolve(Device::Cpu), Precision::Float32);
        assert_eq!(Precision::Auto.resolve(Device::Cuda(0)), Precision::Bf16Autocast);
        assert_eq!(Precision::Float32.resolve(Device::Cuda(0)), Precision::Float32);
        let e = TrainConfig { alpha: 1.5, ..cfg.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--alpha"), "{e}");
        let bad_kd = KdLoss { temperature: -1.0, ..cfg.kd };
        assert!(TrainConfig { kd: bad_kd, ..cfg.clone() }.validate().is_err());
        // Plain SFT never computes the KD loss, so its settings do not matter.
        TrainConfig { kd: bad_kd, alpha: 1.0, ..cfg }.validate().unwrap();
        assert!(TrainConfig::default().validate().unwrap_err().to_string().contains("--student"));
    }

    #[test]
    fn auto_packs_rows_of_any_length() {
        let auto = TrainConfig { student: "s".into(), shards: "d".into(), output: "o".into(), ..Default::default() };
        auto.validate().unwrap();
        assert_eq!(auto.pack_to(256), Some(256));
        assert_eq!(auto.pack_to(16384), Some(16384), "per-document attention: no length limit");
        assert_eq!(TrainConfig { seq_len: Some(4096), ..auto.clone() }.pack_to(256), Some(4096), "asked for");
        assert_eq!(TrainConfig { pack: Some(false), ..auto.clone() }.pack_to(256), None);
        let e = TrainConfig { pack: Some(false), seq_len: Some(64), ..auto }.validate().unwrap_err().to_string();
        assert!(e.contains("--pack false"), "{e}");
    }

    #[test]
    fn tempered_training_on_draws_is_refused_unless_asked() {
        let capture: CaptureInfo = serde_json::from_value(serde_json::json!({
            "top_k": 8, "id_type": "uint16", "logprob_dtype": "float16", "tail": "", "hidden_layers": [],
            "hidden_dtype": "", "draws": {"per_position": 16, "seed": 0, "from": ""}
        }))
        .unwrap();
        let t1 = TrainConfig { alpha: 0.5, ..Default::default() };
        assert!(t1.target_options(&capture).unwrap().unwrap().use_draws, "T = 1 uses the draws");
        let t2 = TrainConfig { kd: KdLoss { temperature: 2.0, ..t1.kd }, ..t1.clone() };
        let e = t2.target_options(&capture).unwrap_err().to_string();
        assert!(e.contains("--temperature 2") && e.contains("--ignore-draws"), "{e}");
        let ignored = TrainConfig { ignore_draws: true, ..t2 }.target_options(&capture).unwrap().unwrap();
        assert!(!ignored.use_draws);
    }

    #[test]
    fn memory_settings_that_cannot_work_are_refused_by_name() {
        let cfg = TrainConfig {
            student: "s".into(),
            shards: "d".into(),
            output: "o".into(),
            device: Device::Cpu,
            ..Default::default()
        };
        let with = |memory: MemorySettings| TrainConfig { memory, ..cfg.clone() };
        let offload = MemorySettings { offload: true, ..Default::default() };
        assert!(with(offload).validate().unwrap_err().to_string().contains("--offload-optimizer"));
        let bf16 = MemorySettings { bf16_weights: true, ..Default::default() };
        assert_eq!(with(bf16).resolved_precision(), Precision::Bf16Autocast);
        let f32_arith = TrainConfig { precision: Precision::Float32, ..with(bf16) };
        assert!(f32_arith.validate().unwrap_err().to_string().contains("--precision f32"));
        let eight = MemorySettings { moments: MomentStorage::Blockwise8Bit, ..Default::default() };
        with(eight).validate().unwrap();
        let mut zero = with(eight);
        zero.parallel.zero1 = true;
        assert!(zero.validate().unwrap_err().to_string().contains("--zero1"));
    }
}
