//! Checkpoints: `checkpoint-NNNNNNN/` holds the student in Hugging Face layout with its
//! tokenizer files, the optimiser moments, the hidden-state projections (when used) and
//! the trainer state (step, stream position). Written under a temporary name and
//! renamed, so a failed write (disk full) leaves earlier checkpoints intact; only the
//! newest `keep_last` are kept. Restoring one resumes training bit for bit.
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

use super::hidden::HiddenDistill;
use super::optim::AdamW;
use crate::batch::stream::StreamPosition;
use crate::model::save::{write_tensors, DEFAULT_MAX_SHARD_BYTES};
use crate::model::CausalLm;
use crate::tokenizer::copy_tokenizer_files;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const PROJECTIONS_FILE: &str = "projections.safetensors";

/// What a checkpoint needs besides weights and optimiser moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub optimizer_steps: u64,
    pub position: StreamPosition,
    pub seed: u64,
}

impl TrainerState {
    /// The state of a run that has not taken a step.
    pub fn start(seed: u64) -> Self {
        TrainerState { step: 0, optimizer_steps: 0, position: StreamPosition::default(), seed }
    }
}

/// Everything a checkpoint holds, borrowed from the running trainer.
pub struct Checkpoint<'a> {
    pub model: &'a CausalLm,
    /// Where the tokenizer files and chat template come from (the student directory).
    pub tokenizer_dir: &'a Path,
    pub hidden: Option<&'a HiddenDistill>,
    /// AdamW's moments by name (`AdamW::state`, or gathered from the ranks with ZeRO-1).
    pub optimizer_state: &'a [(String, Tensor)],
    pub state: &'a TrainerState,
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

impl Checkpoint<'_> {
    /// Writes `output/checkpoint-{step}` through a temporary directory and a rename,
    /// then removes all but the newest `keep_last` checkpoints.
    pub fn save(&self, output: &Path, keep_last: usize) -> Result<()> {
        let step = self.state.step;
        let final_dir = output.join(checkpoint_name(step));
        let tmp = output.join(format!(".{}.tmp", checkpoint_name(step)));
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(e) = self.write(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(
                e.context(format!("writing checkpoint {}; earlier checkpoints are intact", final_dir.display()))
            );
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir)?;
        let mut all = checkpoints(output)?;
        while all.len() > keep_last.max(1) {
            let (_, old) = all.remove(0);
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        Ok(())
    }

    fn write(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, DEFAULT_MAX_SHARD_BYTES)?;
        copy_tokenizer_files(self.tokenizer_dir, dir)?;
        if let Some(h) = self.hidden {
            h.save(&dir.join(PROJECTIONS_FILE))?;
        }
        write_tensors(self.optimizer_state, &dir.join(OPTIMIZER_FILE))?;
        std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(self.state)?)?;
        Ok(())
    }
}

/// Restores the optimiser moments and projections of checkpoint `dir` (whose weights the
/// model was loaded from) and returns its trainer state.
pub fn restore(
    dir: &Path,
    optimizer: &mut AdamW,
    hidden: Option<&mut HiddenDistill>,
    device: Device,
) -> Result<TrainerState> {
    if let Some(h) = hidden {
        h.load(&dir.join(PROJECTIONS_FILE))?;
    }
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE))?)
        .with_context(|| format!("{}: malformed trainer state", dir.display()))?;
    let moments = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))?;
    let moments: Vec<(String, Tensor)> = moments.into_iter().map(|(n, t)| (n, t.to_device(device))).collect();
    optimizer.load_state(state.optimizer_steps, &moments).with_context(|| format!("{}", dir.display()))?;
    Ok(state)
}

/// Complete checkpoints in `dir`, oldest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
            if path.join(STATE_FILE).exists() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}
