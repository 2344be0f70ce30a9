//! A teacher's row in the student's tokens: the student's tokenisation of the same
//! documents (`Aligner`) with targets per aligned group of tokens.
//!
//! For a group of teacher tokens `[t0, t1)` and student tokens `[s0, s1)` over the same
//! bytes, all trained on the teacher's side and with a token before `s0` on the
//! student's (something predicts it), the student's tokens `s0..s1` are trained:
//! - at `s0`, the ULD targets: the teacher's top-k probabilities at `t0` times the label
//!   probabilities of `t0+1..t1` (the probability of the group's text starting with
//!   each first token, as TRL's GOLD merges), descending, then the rest of the mass; the
//!   student's side is merged the same way at training time (`group_continues`);
//! - at `s0` of a 1:1 group (one token on each side, the same string): the teacher's
//!   top-k ids whose strings the student's vocabulary holds, as student ids with the
//!   teacher's log-probabilities, and the mass of the others as the tail: the hybrid
//!   KL's buckets, which the ordinary KD loss trains on;
//! - `target_logprob` at `s0`: the teacher's log-probability of the group's text (the
//!   sum over `t0..t1`); 0 at the positions that continue a group.
use half::f16;
use std::collections::HashMap;

use super::token_bytes::TokenBytes;
use super::Aligner;
use crate::dataset::sequence::Sequence;
use crate::shards::row::{ShardRow, TopKTargets, UldTargets};

/// Teacher id -> student id for ids that stand for the same bytes in both vocabularies.
pub fn matched_ids(teacher: &TokenBytes, student: &TokenBytes) -> HashMap<u32, u32> {
    let by_bytes: HashMap<&[u8], u32> =
        (0..student.len() as u32).filter_map(|id| Some((student.of(id)?, id))).filter(|(b, _)| !b.is_empty()).collect();
    (0..teacher.len() as u32).filter_map(|id| Some((id, *by_bytes.get(teacher.of(id)?)?))).collect()
}

/// Moves teacher rows to the student's tokens.
pub struct RowConverter<'a> {
    pub aligner: Aligner<'a>,
    pub matched: &'a HashMap<u32, u32>,
    /// The teacher set's top-k (the ULD vectors hold k + 1 entries).
    pub top_k: usize,
}

/// What a conversion kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Teacher targets, and those inside a trained group.
    pub teacher_targets: usize,
    pub aligned_targets: usize,
    /// Groups trained, and those of one token on each side.
    pub groups: usize,
    pub one_to_one: usize,
}

impl ConvertStats {
    pub fn add(&mut self, o: ConvertStats) {
        self.teacher_targets += o.teacher_targets;
        self.aligned_targets += o.aligned_targets;
        self.groups += o.groups;
        self.one_to_one += o.one_to_one;
    }
}

impl RowConverter<'_> {
    pub fn convert(&self, row: &ShardRow) -> anyhow::Result<(ShardRow, ConvertStats)> {
        let (seq, t) = (&row.sequence, &row.topk);
        let k = self.top_k;
        let mut stats = ConvertStats { teacher_targets: t.positions(), ..Default::default() };
        // Target index of each trained teacher token.
        let mut target_of = vec![usize::MAX; seq.len()];
        let mut j = 0;
        for (i, &m) in seq.loss_mask.iter().enumerate() {
            if m {
                target_of[i] = j;
                j += 1;
            }
        }
        let lists: Vec<_> = t.per_position().collect();
        let mut out_seq = Sequence {
            row_index: seq.row_index,
            sample_ids: vec![],
            doc_lengths: vec![],
            ids: vec![],
            loss_mask: vec![],
            sampler_logprobs: None,
        };
        let mut out = TopKTargets::empty(k);
        out.lengths = Some(vec![]);
        let mut uld = UldTargets::default();
        let mut start = 0;
        for (d, &len) in seq.doc_lengths.iter().enumerate() {
            let doc = start..start + len as usize;
            start = doc.end;
            let a = self.aligner.align(&seq.ids[doc.clone()])?;
            if a.student_ids.is_empty() {
                continue; // nothing but special tokens
            }
            let mut mask = vec![false; a.student_ids.len()];
            for g in &a.groups {
                let teacher: Vec<usize> = g.teacher.clone().map(|i| doc.start + i).collect();
                if g.student.start == 0 || teacher.iter().any(|&i| !seq.loss_mask[i]) {
                    continue;
                }
                stats.groups += 1;
                stats.aligned_targets += teacher.len();
                let first = target_of[teacher[0]];
                let follow: f64 = teacher[1..].iter().map(|&i| f64::from(t.target_logprob[target_of[i]])).sum();
                let (ids, lps) = lists[first];
                // ULD: the group's probabilities, largest first, then the rest.
                let mut merged: Vec<f64> = lps.iter().map(|l| l.to_f64() + follow).collect();
                merged.truncate(k);
                let listed: f64 = merged.iter().map(|l| l.exp()).sum();
                merged.resize(k, f64::NEG_INFINITY);
                merged.push((1.0 - listed).max(0.0).ln());
                let one_to_one = teacher.len() == 1 && g.student.len() == 1;
                stats.one_to_one += usize::from(one_to_one);
                // Hybrid KL: the matched ids of a 1:1 group.
                let (mut n, mut mass) = (0u32, 0.0f64);
                if one_to_one {
                    for (id, lp) in ids.iter().zip(lps) {
                        if let Some(&s) = self.matched.get(id) {
                            out.ids.push(s);
                            out.logprobs.push(*lp);
                            mass += lp.to_f64().exp();
                            n += 1;
                        }
                    }
                }
                let label: f64 = teacher.iter().map(|&i| f64::from(t.target_logprob[target_of[i]])).sum();
                for (s, pos) in g.student.clone().enumerate() {
                    mask[pos] = true;
                    let starts = s == 0;
                    out.lengths.as_mut().unwrap().push(if starts { n } else { 0 });
                    out.tail_logmass.push(if starts { ((1.0 - mass).max(0.0).ln()) as f32 } else { 0.0 });
                    out.target_logprob.push(if starts { label.min(0.0) as f32 } else { 0.0 });
                    uld.continues.push(!starts);
                    match starts {
                        true => uld.logprobs.extend(merged.iter().map(|&l| f16::from_f64(l.min(0.0)))),
                        false => uld.logprobs.extend(std::iter::repeat_n(f16::NEG_INFINITY, k + 1)),
                    }
                }
            }
            out_seq.sample_ids.push(seq.sample_ids[d].clone());
            out_seq.doc_lengths.push(a.student_ids.len() as u32);
            out_seq.ids.extend(a.student_ids);
            out_seq.loss_mask.extend(mask);
        }
        out.uld = Some(uld);
        Ok((ShardRow { sequence: out_seq, topk: out, hidden: vec![] }, stats))
    }
}
