//! Sequence-level KD in one teacher pass (`distill generate --capture`): the logits the
//! teacher chose each reply token from are that token's targets, captured step by step
//! with precompute's own code (`capture::TargetParts`), so no second teacher pass runs.
//!
//! The shard set is the one `precompute --token-ids` would write over the rows
//! `generate --with-ids` wrote: the same `PrecomputeConfig`, the same planned rows
//! (prompt ids untrained, reply ids trained), the same manifest; the draws take the
//! same uniform numbers (keyed by output row and reply token number). Only the numbers
//! differ, by the rounding between a cached decoding step and a full forward pass
//! (tests/generate.rs measures it against a separate precompute).
use anyhow::{bail, Result};
use std::cell::RefCell;
use tch::{Kind, Tensor};

use super::capture::{hidden_targets, CaptureSettings, TargetParts};
use super::plan::prepare;
use super::{PrecomputeConfig, Summary};
use crate::dataset::read::hash_named_inputs;
use crate::shards::row::{HiddenTargets, TopKTargets};

/// The targets of every reply, gathered as the replies are written.
pub struct ReplyTargets {
    settings: CaptureSettings,
    /// Per output row: the targets of its reply tokens so far.
    rows: RefCell<Vec<(TopKTargets, Vec<HiddenTargets>)>>,
}

impl ReplyTargets {
    pub fn new(settings: CaptureSettings, rows: usize) -> Self {
        let empty = (TopKTargets::empty(settings.top_k), vec![]);
        ReplyTargets { settings, rows: RefCell::new(vec![empty; rows]) }
    }

    pub fn settings(&self) -> &CaptureSettings {
        &self.settings
    }

    /// One decoding step: row r of `logits` `[rows, vocab]` (and of each `hidden`
    /// `[rows, width]`) chose `tokens[r]`, token number `numbers[r]` of output row
    /// `out_rows[r]`'s reply.
    pub fn record(
        &self,
        out_rows: &[usize],
        numbers: &[u64],
        logits: &Tensor,
        tokens: &[u32],
        hidden: &[Tensor],
    ) -> Result<()> {
        let s = &self.settings;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= s.vocab_limit) {
            bail!(
                "the model chose id {id}, a padded row outside its tokenizer's {} tokens: no target can be stored for it",
                s.vocab_limit
            );
        }
        let device = logits.device();
        let keys: Vec<(u64, u64)> = out_rows.iter().zip(numbers).map(|(&row, &n)| (row as u64, n)).collect();
        let next = Tensor::from_slice(&tokens.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(device);
        let mut parts = TargetParts::default();
        // A copy: `push` overwrites float32 logits, and these are the step's own.
        parts.push(&logits.to_kind(Kind::Float).copy(), &next, s.uniforms(&keys, device).as_ref(), None, s)?;
        let ones = vec![1; out_rows.len()];
        let topk = parts.to_host(s)?.split(&ones, s);
        let states = hidden_targets(hidden, s)?.split(&ones);
        let mut rows = self.rows.borrow_mut();
        for ((&row, &n), (t, h)) in out_rows.iter().zip(numbers).zip(topk.into_iter().zip(states)) {
            let (mine, my_hidden) = &mut rows[row];
            if mine.positions() as u64 != n {
                bail!("reply {row}: token {n} arrived after {} captured ones", mine.positions());
            }
            mine.append(t);
            if my_hidden.is_empty() {
                *my_hidden = h;
            } else {
                for (m, h) in my_hidden.iter_mut().zip(h) {
                    m.append(h);
                }
            }
        }
        Ok(())
    }

    /// Writes the shard set of `cfg` (whose one input is the rows written with their
    /// ids) from the captured targets; the manifest names that input `recorded_as` (the
    /// rows are read from a temporary file that then takes this name).
    pub fn write(self, cfg: &PrecomputeConfig, recorded_as: &std::path::Path) -> Result<Summary> {
        cfg.validate()?;
        let mut prepared = prepare(cfg)?;
        let name = recorded_as.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let read_from: Vec<_> = cfg.inputs.iter().map(|f| (std::path::PathBuf::from(f), name.clone())).collect();
        prepared.settings.data.hash = hash_named_inputs(&read_from)?;
        for source in &mut prepared.settings.data.sources {
            source.path = recorded_as.display().to_string();
        }
        let mut captured = self.rows.into_inner();
        super::write_without_teacher(cfg, &prepared, |sequence| {
            let (topk, hidden) =
                std::mem::replace(&mut captured[sequence.row_index as usize], (TopKTargets::empty(0), vec![]));
            if topk.positions() != sequence.num_targets() {
                bail!(
                    "row {}: {} reply tokens were captured but the row trains {}",
                    sequence.row_index,
                    topk.positions(),
                    sequence.num_targets()
                );
            }
            Ok((topk, hidden))
        })
    }
}
