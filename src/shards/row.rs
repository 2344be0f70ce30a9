//! `ShardRow`: one row of a shard set, the single shape that capture produces, the
//! writer writes, the reader returns, and inspect, the batch builder and evaluation
//! consume. The token side is the teacher's exact input (`Sequence`); the targets are
//! per trained position, in increasing token order (position t-1 predicts token t where
//! `loss_mask[t]`).
use half::f16;

use crate::dataset::sequence::Sequence;

#[derive(Debug, Clone, PartialEq)]
pub struct ShardRow {
    /// Row index, sample ids, document lengths, token ids and loss mask.
    pub sequence: Sequence,
    pub topk: TopKTargets,
    /// One entry per captured layer, in the shard set's order.
    pub hidden: Vec<HiddenTargets>,
}

/// The teacher's next-token distribution at each trained position, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKTargets {
    pub k: usize,
    /// `positions * k` ids, each position's in descending probability.
    pub ids: Vec<u32>,
    /// Their log-probabilities under the full-vocabulary softmax (temperature 1).
    pub logprobs: Vec<f16>,
    /// log(1 - sum of the top-k probabilities); -inf when k covers the vocabulary.
    pub tail_logmass: Vec<f32>,
    /// Log-probability of the token that actually follows (the label; it may lie
    /// outside the top-k).
    pub target_logprob: Vec<f32>,
}

/// One captured hidden state at each trained position, divided by its RMS.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenTargets {
    /// transformers' numbering: 0 = embeddings, i = output of layer i.
    pub layer: usize,
    pub width: usize,
    /// `positions * width` values of h / rms(h).
    pub values: Vec<f16>,
    pub rms: Vec<f32>,
}

impl ShardRow {
    /// Trained positions (= stored targets).
    pub fn num_targets(&self) -> usize {
        self.topk.positions()
    }

    /// `other` laid after this row: documents stay separate and no token predicts
    /// across the boundary (see `Sequence::append`); targets follow in the same order.
    pub fn append(&mut self, other: ShardRow) {
        self.sequence.append(other.sequence);
        self.topk.append(other.topk);
        for h in other.hidden {
            match self.hidden.iter_mut().find(|mine| mine.layer == h.layer) {
                Some(mine) => mine.append(h),
                None => self.hidden.push(h),
            }
        }
    }
}

impl TopKTargets {
    pub fn empty(k: usize) -> Self {
        TopKTargets { k, ids: vec![], logprobs: vec![], tail_logmass: vec![], target_logprob: vec![] }
    }

    /// Number of positions held.
    pub fn positions(&self) -> usize {
        self.tail_logmass.len()
    }

    /// The top-k ids of position `i`, best first.
    pub fn ids_at(&self, i: usize) -> &[u32] {
        &self.ids[i * self.k..(i + 1) * self.k]
    }

    /// The top-k log-probabilities of position `i`, best first.
    pub fn logprobs_at(&self, i: usize) -> &[f16] {
        &self.logprobs[i * self.k..(i + 1) * self.k]
    }

    pub fn append(&mut self, other: TopKTargets) {
        self.ids.extend(other.ids);
        self.logprobs.extend(other.logprobs);
        self.tail_logmass.extend(other.tail_logmass);
        self.target_logprob.extend(other.target_logprob);
    }
}

impl HiddenTargets {
    pub fn append(&mut self, other: HiddenTargets) {
        self.values.extend(other.values);
        self.rms.extend(other.rms);
    }
}
