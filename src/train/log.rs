//! What a training step reports: its losses, rates and times (`StepLog`) and the bytes
//! of training state, written by `RunLog` as one line of metrics.jsonl and one
//! TensorBoard event per step.
use anyhow::Result;
use serde::Serialize;
use std::io::Write;
use tch::Tensor;

use super::config::TrainConfig;
use super::optim::AdamW;
use super::run_dir::{self, RunRecord};
use super::tensorboard::EventWriter;

/// Where rank 0 (or the only process) writes each step's log.
pub(super) struct RunLog {
    metrics: std::fs::File,
    events: EventWriter,
}

impl RunLog {
    /// The run folder started (or resumed after `step`) and a new TensorBoard event file
    /// in `--tensorboard` or `OUTPUT/tensorboard`.
    pub(super) fn start(cfg: &TrainConfig, record: &RunRecord, step: u64) -> Result<Self> {
        let metrics = run_dir::start(&cfg.output, record, step)?;
        let events_dir = cfg.tensorboard.clone().unwrap_or_else(|| cfg.output.join(run_dir::TENSORBOARD_DIR));
        Ok(RunLog { metrics, events: EventWriter::create(&events_dir, step)? })
    }

    pub(super) fn write(&mut self, log: &StepLog) -> Result<()> {
        // One serialisation for both (serde_json keeps the fields' order).
        let value = serde_json::to_value(log)?;
        writeln!(self.metrics, "{value}")?;
        self.events.scalars(log.step, &value)?;
        self.events.flush()
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        self.metrics.flush()?;
        self.events.flush()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub kd: f64,
    pub ce: f64,
    /// Mean hidden-state loss per trained token (0 without hidden-state distillation).
    pub hidden: f64,
    /// The routers' load-balancing loss, unweighted, averaged over the micro-batches by
    /// their trained tokens (with `--router-aux-weight` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_balance: Option<f64>,
    pub grad_norm: f64,
    pub tokens: usize,
    pub targets: usize,
    /// Share of padding in the step's batches.
    pub padding: f64,
    /// GPU memory in use after the step (CUDA only; see `runtime::cuda_memory_in_use`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    /// The process's resident memory after the step and its peak so far (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_resident_bytes: Option<u64>,
    pub tokens_per_s: f64,
    pub time: StepTime,
    pub state_bytes: StateBytes,
}

/// Bytes of training state, read off the live tensors after the step: the weights and
/// gradients of every trained tensor, and the optimiser's state (moments, block scales,
/// master copies) next to them or, offloaded, in host memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StateBytes {
    pub parameters: i64,
    pub weights: i64,
    pub gradients: i64,
    pub optimizer: i64,
    pub optimizer_host: i64,
}

impl StateBytes {
    pub(super) fn measure(params: &[Tensor], opt: &AdamW) -> Self {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let (optimizer, optimizer_host) = opt.state_bytes();
        let grads = params.iter().map(Tensor::grad).filter(Tensor::defined);
        StateBytes {
            parameters: params.iter().map(|p| p.numel() as i64).sum(),
            weights: params.iter().map(bytes).sum(),
            gradients: grads.map(|g| bytes(&g)).sum(),
            optimizer,
            optimizer_host,
        }
    }

    /// Bytes per parameter on the training device.
    pub fn per_parameter(&self) -> f64 {
        (self.weights + self.gradients + self.optimizer) as f64 / self.parameters.max(1) as f64
    }

    pub fn summary(&self) -> String {
        let per = |b: i64| b as f64 / self.parameters.max(1) as f64;
        let host = if self.optimizer_host > 0 {
            format!(", plus {:.2} in host memory", per(self.optimizer_host))
        } else {
            String::new()
        };
        format!(
            "{:.2} bytes per parameter ({:.2} weights, {:.2} gradients, {:.2} optimizer{host}) of {} parameters",
            self.per_parameter(),
            per(self.weights),
            per(self.gradients),
            per(self.optimizer),
            self.parameters
        )
    }
}

/// Where a step's wall time went, in seconds: waiting for batches, the student's body
/// (forward and backward), the head with its losses, and clipping + AdamW. On CUDA the
/// work is asynchronous, so only `data` means what it says there.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub data: f64,
    pub body: f64,
    pub head: f64,
    pub optimizer: f64,
    /// Summing gradients (and, with ZeRO-1, gathering weights) over the ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub communication: Option<f64>,
}
