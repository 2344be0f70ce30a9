//! What a precompute run is asked to do, with the library's defaults (`Default`), the
//! checks that need no model (`validate`) and the teacher dtype resolved against the
//! devices. `distill precompute` and TOML pipeline files only fill this in.
use anyhow::{bail, Result};
use std::path::PathBuf;
use tch::{Device, Kind};

use crate::dataset::FieldNames;
use crate::shards::manifest::Slice;
use crate::shards::writer::ParquetOptions;

/// Most draws per position: a count must fit the `draw_counts` column's uint8.
pub const MAX_DRAWS: usize = 255;

#[derive(Debug, Clone)]
pub struct PrecomputeConfig {
    pub teacher: PathBuf,
    pub inputs: Vec<String>,
    pub output: PathBuf,
    pub fields: FieldNames,
    pub max_len: usize,
    pub pack: bool,
    /// Top-k ids kept per position (0: none, with `sample`).
    pub top_k: usize,
    /// Mass-adaptive top-k: keep the fewest of the top-k ids that reach this mass.
    pub top_p: Option<f64>,
    /// With `top_p`: keep at least this many ids (a floor under the adaptive count).
    pub min_k: usize,
    /// Temperatures besides 1 at which the stored targets are audited against the full
    /// distribution (`shards::audit`).
    pub audit_temperatures: Vec<f64>,
    /// Ids drawn per position from the teacher's distribution outside the top-k (0: none).
    pub sample: usize,
    pub sample_seed: u64,
    pub hidden_layers: Vec<usize>,
    /// One teacher replica per entry; an entry of several devices splits that replica
    /// by layers over them.
    pub devices: Vec<Vec<Device>>,
    /// Teacher weights and arithmetic; `None`: bfloat16 when every device is a GPU,
    /// float32 otherwise (see `teacher_dtype`).
    pub dtype: Option<Kind>,
    /// Padded tokens per teacher batch; `None`: chosen for the devices (see `batch_tokens`).
    pub batch_tokens: Option<usize>,
    pub shard_tokens: usize,
    pub parquet: ParquetOptions,
    pub slice: Slice,
    pub skip_invalid: bool,
    /// Targets for every token, not only responses / assistant turns.
    pub train_on_all_tokens: bool,
    /// Delete an existing shard set in `output` instead of resuming it.
    pub overwrite: bool,
    pub progress: bool,
    /// For the resume tests only: abort like `kill -9` part-way into the shard after
    /// this many complete ones (the hidden flag `--crash-after-shards`).
    pub crash_after_shards: Option<usize>,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        PrecomputeConfig {
            teacher: PathBuf::new(),
            inputs: vec![],
            output: PathBuf::new(),
            fields: FieldNames::default(),
            max_len: 2048,
            pack: false,
            // The top-16 plus 16 draws from the tail: of the targets measured on the main
            // job's teacher (docs/targets.md), the best held-out perplexity and KL,
            // in 79 bytes per token where the top-64 took 181.
            top_k: 16,
            top_p: None,
            min_k: 0,
            audit_temperatures: vec![],
            sample: 16,
            sample_seed: 0,
            hidden_layers: vec![],
            devices: vec![vec![Device::cuda_if_available()]],
            dtype: None,
            batch_tokens: None,
            shard_tokens: 1_000_000,
            parquet: ParquetOptions { zstd_level: 3, row_group_rows: 64, byte_stream_split: true },
            slice: Slice { index: 0, count: 1 },
            skip_invalid: false,
            train_on_all_tokens: false,
            overwrite: false,
            progress: true,
            crash_after_shards: None,
        }
    }
}

impl PrecomputeConfig {
    /// Padded tokens per teacher batch: as given, else 2,048 on CPU and 16,384 when every
    /// device is a GPU. On CPU larger batches ran slower, not faster (the main job's
    /// teacher, 2 cores, `scripts/bench_precompute.sh`: 460 tokens/s at 2,048, 396 at
    /// 4,096, 346 at 8,192, 305 at 16,384; transformers slows down likewise); on a GPU larger
    /// batches keep it busy, and 16,384 tokens of activations fit beside any teacher
    /// that fits (activations are freed layer by layer, the head runs in chunks).
    pub fn batch_tokens(&self) -> usize {
        self.batch_tokens.unwrap_or(if self.devices.iter().flatten().all(|d| d.is_cuda()) { 16384 } else { 2048 })
    }

    /// The teacher's dtype: as given, else bfloat16 when every device is a GPU and
    /// float32 otherwise.
    pub fn teacher_dtype(&self) -> Kind {
        self.dtype.unwrap_or_else(|| {
            if self.devices.iter().flatten().all(|d| d.is_cuda()) {
                Kind::BFloat16
            } else {
                Kind::Float
            }
        })
    }

    /// T = 1 and the `audit_temperatures` asked for, each once.
    pub fn audit_temperatures(&self) -> Vec<f64> {
        let mut t = vec![1.0];
        t.extend(self.audit_temperatures.iter().filter(|&&x| x != 1.0));
        t.sort_by(f64::total_cmp);
        t.dedup();
        t
    }

    /// The checks that need neither the teacher nor the data.
    pub fn validate(&self) -> Result<()> {
        if self.teacher.as_os_str().is_empty() {
            bail!("--teacher is required (or `teacher` in the --config file)");
        }
        if self.inputs.is_empty() {
            bail!("--input is required (or `input` in the --config file)");
        }
        if self.output.as_os_str().is_empty() {
            bail!("--output is required (or `output` in the --config file)");
        }
        if self.devices.is_empty() || self.devices.iter().any(Vec::is_empty) {
            bail!("--devices names no device");
        }
        let Slice { index, count } = self.slice;
        if count == 0 || index >= count {
            bail!("--shard-index {index} must be below --num-shards {count}");
        }
        let p = &self.parquet;
        let checks: [(bool, String); 11] = [
            (
                self.audit_temperatures.iter().all(|t| t.is_finite() && *t > 0.0),
                format!("--audit-temperatures {:?}: each must be a positive number", self.audit_temperatures),
            ),
            (
                self.top_p.is_none_or(|p| p > 0.0 && p <= 1.0 && self.top_k > 0),
                format!("--top-p {:?} must lie in (0, 1] and needs --top-k above 0 as its cap", self.top_p),
            ),
            (
                self.min_k == 0 || (self.top_p.is_some() && self.min_k <= self.top_k),
                format!(
                    "--min-k {} is a floor under --top-p's count: it needs --top-p and at most --top-k {}",
                    self.min_k, self.top_k
                ),
            ),
            (self.top_k + self.sample >= 1, "--top-k 0 needs --sample: the shards would hold no target".into()),
            (
                self.sample <= MAX_DRAWS,
                format!("--sample {} is above {MAX_DRAWS} (counts are stored as uint8)", self.sample),
            ),
            (self.max_len >= 2, format!("--max-len must be at least 2 tokens, not {}", self.max_len)),
            (self.batch_tokens() >= 1, format!("--batch-tokens must be at least 1, not {}", self.batch_tokens())),
            (self.shard_tokens >= 1, format!("--shard-tokens must be at least 1, not {}", self.shard_tokens)),
            (p.row_group_rows >= 1, format!("--row-group-rows must be at least 1, not {}", p.row_group_rows)),
            ((1..=22).contains(&p.zstd_level), format!("--zstd-level must lie in 1..=22, not {}", p.zstd_level)),
            (
                (1..self.hidden_layers.len()).all(|i| !self.hidden_layers[..i].contains(&self.hidden_layers[i])),
                format!("--hidden-layers {:?} names a layer twice", self.hidden_layers),
            ),
        ];
        if let Some((_, message)) = checks.into_iter().find(|(ok, _)| !ok) {
            bail!("{message}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_caller_builds_a_config_from_defaults() {
        let cfg = PrecomputeConfig {
            teacher: "teacher".into(),
            inputs: vec!["data.jsonl".into()],
            output: "shards".into(),
            devices: vec![vec![Device::Cpu]],
            ..PrecomputeConfig::default()
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.teacher_dtype(), Kind::Float);
        assert_eq!(cfg.batch_tokens(), 2048, "auto on CPU");
        let gpus = PrecomputeConfig { devices: vec![vec![Device::Cuda(0), Device::Cuda(1)]], ..cfg.clone() };
        assert_eq!(gpus.teacher_dtype(), Kind::BFloat16);
        assert_eq!(gpus.batch_tokens(), 16384, "auto on GPUs");
        assert_eq!(PrecomputeConfig { batch_tokens: Some(100), ..gpus.clone() }.batch_tokens(), 100);
        assert_eq!(PrecomputeConfig { dtype: Some(Kind::Half), ..gpus }.teacher_dtype(), Kind::Half);
        let e = PrecomputeConfig { slice: Slice { index: 2, count: 2 }, ..cfg }.validate().unwrap_err().to_string();
        assert!(e.contains("--shard-index 2"), "{e}");
        assert!(PrecomputeConfig::default().validate().unwrap_err().to_string().contains("--teacher"));
    }
}
