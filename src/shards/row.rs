//! `ShardRow`: one row of a shard set, the single shape that capture produces, the
//! writer writes, the reader returns, and inspect, the batch builder and evaluation
//! consume. The token side is the teacher's exact input (`Sequence`); the targets are
//! per trained position, in increasing token order (position t-1 predicts token t where
//! `loss_mask[t]`).
use half::f16;

use crate::dataset::sequence::Sequence;

/// How far a position's probabilities may sum from 1 beyond float16 rounding
/// (`TopKTargets::check_mass`).
pub const MASS_SLACK: f64 = 2e-3;

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
    /// Ids kept at each position (1..=k) when the shard set is mass-adaptive
    /// (`precompute --top-p`); `None`: k at every position.
    pub lengths: Option<Vec<u32>>,
    /// Each position's ids (k, or `lengths[i]`) in descending probability.
    pub ids: Vec<u32>,
    /// Their log-probabilities under the full-vocabulary softmax (temperature 1).
    pub logprobs: Vec<f16>,
    /// log(1 - sum of the top-k probabilities); -inf when k covers the vocabulary.
    pub tail_logmass: Vec<f32>,
    /// Log-probability of the token that actually follows (the label; it may lie
    /// outside the top-k).
    pub target_logprob: Vec<f32>,
    /// Ids drawn from the teacher's tail (its whole distribution when k = 0), when the
    /// shard set holds draws.
    pub draws: Option<TailDraws>,
    /// Cross-tokenizer sets: the teacher's distribution over each aligned group of
    /// tokens, for ULD (see `UldTargets`).
    pub uld: Option<UldTargets>,
}

/// A cross-tokenizer set's targets beyond the matched ids (`train --cross-tokenizer`):
/// per trained position, the teacher's probabilities for the group of tokens that
/// starts there, sorted in descending order, and whether the position continues the
/// group of the position before (its student probability multiplies into that group's
/// instead of starting one).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UldTargets {
    /// `k + 1` log-probabilities per position: the k largest of the group's teacher
    /// probabilities, descending, then the rest of its mass; all -inf where the
    /// position continues a group.
    pub logprobs: Vec<f16>,
    pub continues: Vec<bool>,
}

impl UldTargets {
    pub fn append(&mut self, other: UldTargets) {
        self.logprobs.extend(other.logprobs);
        self.continues.extend(other.continues);
    }
}

/// Per position, the distinct ids drawn from the teacher's distribution renormalised
/// over the ids outside the top-k, ascending, with how often each was drawn (the counts
/// of a position sum to the draws per position). An id drawn c times out of M stands
/// for `tail_mass * c / M` of the teacher's probability: an unbiased estimate of each
/// tail id's probability.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TailDraws {
    /// Distinct ids of each position.
    pub lengths: Vec<u32>,
    pub ids: Vec<u32>,
    pub counts: Vec<u8>,
}

impl TailDraws {
    /// `(ids, counts)` of each position in order.
    pub fn per_position(&self) -> impl Iterator<Item = (&[u32], &[u8])> + '_ {
        let mut start = 0;
        self.lengths.iter().map(move |&n| {
            let range = start..start + n as usize;
            start = range.end;
            (&self.ids[range.clone()], &self.counts[range])
        })
    }

    pub fn append(&mut self, other: TailDraws) {
        self.lengths.extend(other.lengths);
        self.ids.extend(other.ids);
        self.counts.extend(other.counts);
    }
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
        TopKTargets {
            k,
            lengths: None,
            ids: vec![],
            logprobs: vec![],
            tail_logmass: vec![],
            target_logprob: vec![],
            draws: None,
            uld: None,
        }
    }

    /// Number of positions held.
    pub fn positions(&self) -> usize {
        self.tail_logmass.len()
    }

    /// Each position's top ids and their log-probabilities, best first.
    pub fn per_position(&self) -> impl Iterator<Item = (&[u32], &[f16])> + '_ {
        let mut start = 0;
        (0..self.positions()).map(move |i| {
            let n = self.lengths.as_ref().map_or(self.k, |l| l[i] as usize);
            let range = start..start + n;
            start = range.end;
            (&self.ids[range.clone()], &self.logprobs[range])
        })
    }

    /// Each position's listed probabilities plus its tail mass make 1, within the
    /// stored precision: a log-probability rounded to float16 moves its probability by
    /// at most `2^-11 * p * |log p|`, and `MASS_SLACK` covers float32 arithmetic and the
    /// 1e-3 to which a served teacher's log-probs are taken as normalised
    /// (`precompute::served`). Catches targets that are not a distribution (a broken
    /// mixture, scaled values) before anything trains on them.
    pub fn check_mass(&self) -> anyhow::Result<()> {
        for (i, (_, logprobs)) in self.per_position().enumerate() {
            let (mut mass, mut rounding) = (f64::from(self.tail_logmass[i]).exp(), 0.0);
            for lp in logprobs.iter().map(|x| x.to_f64()) {
                let p = lp.exp();
                mass += p;
                rounding += if p > 0.0 { p * -lp } else { 0.0 };
            }
            if (mass - 1.0).abs() > rounding / 2048.0 + MASS_SLACK {
                anyhow::bail!(
                    "column `{}`: position {i}: the listed probabilities and the tail mass sum to {mass:.4}, not 1: these are not a distribution",
                    super::schema::columns::TOPK_LOGPROBS
                );
            }
        }
        Ok(())
    }

    pub fn append(&mut self, other: TopKTargets) {
        let was_empty = self.positions() == 0;
        match (&mut self.lengths, other.lengths) {
            (Some(mine), Some(theirs)) => mine.extend(theirs),
            (mine @ None, Some(theirs)) if was_empty => *mine = Some(theirs),
            (_, theirs) => debug_assert!(theirs.is_none(), "rows of one shard set are all mass-adaptive or none"),
        }
        self.ids.extend(other.ids);
        self.logprobs.extend(other.logprobs);
        self.tail_logmass.extend(other.tail_logmass);
        self.target_logprob.extend(other.target_logprob);
        match (&mut self.draws, other.draws) {
            (Some(mine), Some(theirs)) => mine.append(theirs),
            (mine @ None, Some(theirs)) if was_empty => *mine = Some(theirs),
            (_, theirs) => debug_assert!(theirs.is_none(), "rows of one shard set all hold draws or none"),
        }
        match (&mut self.uld, other.uld) {
            (Some(mine), Some(theirs)) => mine.append(theirs),
            (mine @ None, Some(theirs)) if was_empty => *mine = Some(theirs),
            (_, theirs) => debug_assert!(theirs.is_none(), "rows of one shard set all hold ULD targets or none"),
        }
    }
}

impl HiddenTargets {
    pub fn append(&mut self, other: HiddenTargets) {
        self.values.extend(other.values);
        self.rms.extend(other.rms);
    }
}

/// What every row of a shard set must agree with: the manifest's capture settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLimits {
    pub top_k: usize,
    /// Token ids and top-k ids lie in `0..vocab` (the tokenizer's ids).
    pub vocab: usize,
    /// (layer, width) of each captured hidden state, in order.
    pub hidden: Vec<(usize, usize)>,
    /// Tail draws per position (0: the rows hold none).
    pub draws: usize,
    /// Mass-adaptive top-k: each position keeps 1..=top_k ids.
    pub adaptive: bool,
    /// Cross-tokenizer set: positions may list no id (only teacher ids whose strings the
    /// student's vocabulary has are listed), and ULD targets (k + 1 per position) are held.
    pub cross: bool,
}

impl ShardRow {
    /// Refuses a row whose parts disagree with each other or with `limits`, or that holds
    /// impossible values (ids outside the vocabulary, log-probabilities above 0 or NaN,
    /// non-finite hidden states), naming the column. Decoded rows are checked before any
    /// tensor is built from them: a bad value would otherwise panic inside libtorch or
    /// train on garbage.
    pub fn check(&self, limits: &RowLimits) -> anyhow::Result<()> {
        use super::schema::columns::*;
        use anyhow::bail;
        let s = &self.sequence;
        let n = s.ids.len();
        if n == 0 {
            bail!("column `{INPUT_IDS}`: the row holds no token");
        }
        if let Some(&id) = s.ids.iter().find(|&&i| i as usize >= limits.vocab) {
            bail!("column `{INPUT_IDS}`: token id {id} is outside the vocabulary (ids 0..{})", limits.vocab);
        }
        if s.loss_mask.len() != n {
            bail!("column `{LOSS_MASK}`: {} entries for {n} tokens", s.loss_mask.len());
        }
        if s.doc_lengths.contains(&0) || s.doc_lengths.iter().map(|&d| d as usize).sum::<usize>() != n {
            bail!("column `{DOC_LENGTHS}`: {:?} does not split the row's {n} tokens into documents", s.doc_lengths);
        }
        if s.sample_ids.len() != s.doc_lengths.len() {
            bail!("column `{SAMPLE_IDS}`: {} ids for {} documents", s.sample_ids.len(), s.doc_lengths.len());
        }
        let mut start = 0;
        for &len in &s.doc_lengths {
            if s.loss_mask[start] {
                bail!("column `{LOSS_MASK}`: token {start} starts a document but is marked as a target");
            }
            start += len as usize;
        }
        let targets = s.num_targets();
        if let Some(l) = &s.sampler_logprobs {
            if l.len() != targets {
                bail!("column `{SAMPLER_LOGPROB}`: {} entries for the row's {targets} trained positions", l.len());
            }
            if let Some(x) = l.iter().find(|x| x.is_nan() || **x > 0.0) {
                bail!("column `{SAMPLER_LOGPROB}`: {x} is not a log-probability");
            }
        }
        let t = &self.topk;
        for (column, len) in [(TAIL_LOGMASS, t.tail_logmass.len()), (TARGET_LOGPROB, t.target_logprob.len())] {
            if len != targets {
                bail!("column `{column}`: {len} entries for the row's {targets} trained positions");
            }
        }
        let least = usize::from(!limits.cross);
        let held = match &t.lengths {
            None if !limits.adaptive => targets * t.k,
            Some(l)
                if limits.adaptive
                    && l.len() == targets
                    && l.iter().all(|&n| (least..=t.k).contains(&(n as usize))) =>
            {
                l.iter().map(|&n| n as usize).sum()
            }
            _ => {
                bail!("column `{TOPK_IDS}`: the lists' lengths do not fit {targets} positions of (at most) top-{}", t.k)
            }
        };
        for (column, len) in [(TOPK_IDS, t.ids.len()), (TOPK_LOGPROBS, t.logprobs.len())] {
            if t.k != limits.top_k || len != held {
                bail!("column `{column}`: {len} values for {targets} positions of top-{}", limits.top_k);
            }
        }
        if let Some(&id) = t.ids.iter().find(|&&i| i as usize >= limits.vocab) {
            bail!("column `{TOPK_IDS}`: id {id} is outside the vocabulary (ids 0..{})", limits.vocab);
        }
        let bad_logprob = |x: f32| x.is_nan() || x > 0.0;
        if let Some(x) = t.logprobs.iter().map(|x| x.to_f32()).find(|&x| bad_logprob(x)) {
            bail!("column `{TOPK_LOGPROBS}`: {x} is not a log-probability (NaN or above 0)");
        }
        for (column, values) in [(TAIL_LOGMASS, &t.tail_logmass), (TARGET_LOGPROB, &t.target_logprob)] {
            if let Some(x) = values.iter().copied().find(|&x| bad_logprob(x)) {
                bail!("column `{column}`: {x} is not a log-probability (NaN or above 0)");
            }
        }
        t.check_mass()?;
        self.check_draws(limits)?;
        self.check_uld(limits)?;
        let layers: Vec<(usize, usize)> = self.hidden.iter().map(|h| (h.layer, h.width)).collect();
        if layers != limits.hidden {
            bail!("hidden-state columns {layers:?} (layer, width) differ from the manifest's {:?}", limits.hidden);
        }
        for h in &self.hidden {
            let (values, rms) = (super::schema::hidden_column(h.layer), super::schema::hidden_rms_column(h.layer));
            if h.values.len() != targets * h.width || h.rms.len() != targets {
                bail!("columns `{values}` / `{rms}`: lengths do not match the row's {targets} trained positions");
            }
            if h.values.iter().any(|x| !x.is_finite()) {
                bail!("column `{values}`: a value is not finite");
            }
            if let Some(x) = h.rms.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                bail!("column `{rms}`: {x} is not a positive RMS");
            }
        }
        Ok(())
    }

    /// ULD columns: k + 1 log-probabilities per position (k descending, then the rest)
    /// and a continuation flag.
    fn check_uld(&self, limits: &RowLimits) -> anyhow::Result<()> {
        use super::schema::columns::{GROUP_CONTINUES, ULD_LOGPROBS};
        use anyhow::bail;
        let t = &self.topk;
        let u = match (&t.uld, limits.cross) {
            (None, false) => return Ok(()),
            (Some(u), true) => u,
            _ => bail!(
                "columns `{ULD_LOGPROBS}` / `{GROUP_CONTINUES}`: the row and the manifest disagree on holding them"
            ),
        };
        let (p, width) = (t.positions(), limits.top_k + 1);
        if u.logprobs.len() != p * width || u.continues.len() != p {
            bail!(
                "columns `{ULD_LOGPROBS}` / `{GROUP_CONTINUES}`: lengths do not match {p} positions of {width} entries"
            );
        }
        for (i, v) in u.logprobs.chunks(width).enumerate() {
            if v.iter().any(|x| x.is_nan() || x.to_f32() > 0.0) || v[..width - 1].windows(2).any(|w| w[0] < w[1]) {
                bail!("column `{ULD_LOGPROBS}`: position {i}: {v:?} are not log-probabilities, descending before the rest");
            }
        }
        Ok(())
    }

    /// Draw columns: one list per position, ids ascending, inside the vocabulary and
    /// outside the position's top-k, counts summing to the draws per position.
    fn check_draws(&self, limits: &RowLimits) -> anyhow::Result<()> {
        use super::schema::columns::{DRAW_COUNTS, DRAW_IDS};
        use anyhow::bail;
        let t = &self.topk;
        let d = match (&t.draws, limits.draws) {
            (None, 0) => return Ok(()),
            (Some(d), n) if n > 0 => d,
            _ => bail!("columns `{DRAW_IDS}` / `{DRAW_COUNTS}`: the row and the manifest disagree on holding draws"),
        };
        let total: usize = d.lengths.iter().map(|&n| n as usize).sum();
        if d.lengths.len() != t.positions() || d.ids.len() != total || d.counts.len() != total {
            bail!(
                "columns `{DRAW_IDS}` / `{DRAW_COUNTS}`: lengths do not match the row's {} trained positions",
                t.positions()
            );
        }
        for (i, ((ids, counts), (top, _))) in d.per_position().zip(t.per_position()).enumerate() {
            if ids.windows(2).any(|w| w[0] >= w[1]) || ids.last().is_some_and(|&id| id as usize >= limits.vocab) {
                bail!(
                    "column `{DRAW_IDS}`: position {i}: ids {ids:?} are not distinct, ascending ids of the vocabulary"
                );
            }
            if let Some(id) = ids.iter().find(|id| top.contains(id)) {
                bail!("column `{DRAW_IDS}`: position {i}: id {id} was drawn from the tail but is in the top-k");
            }
            let sum: usize = counts.iter().map(|&c| c as usize).sum();
            if counts.contains(&0) || sum != limits.draws {
                bail!(
                    "column `{DRAW_COUNTS}`: position {i}: counts {counts:?} do not sum to the {} draws per position",
                    limits.draws
                );
            }
        }
        Ok(())
    }
}
