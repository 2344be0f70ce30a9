//! Stored targets -> the sparse teacher distribution a loss trains on
//! (`losses::TeacherTargets`): per trained position the listed ids with their
//! log-probabilities and the log-mass of the rest of the vocabulary.
//!
//! - Top-k alone: the k ids and the tail bucket (k+1 buckets).
//! - `label_bucket`: when the label (the true next token) lies outside the top-k, it
//!   gets its own bucket with its stored log-probability and leaves the rest of the tail
//!   (k+2 buckets): a finer partition of the same teacher distribution, so the bucket
//!   divergences stay exact on it, and the student learns which tail token is right.
//! - Tail draws (shards made with `precompute --sample M`): each distinct drawn id with
//!   mass `tail * count / M` and no rest. For forward KL its expected gradient is the
//!   full-vocabulary one (`q - p`), tail included: the draws are an unbiased estimate of
//!   the tail, where the single tail bucket only says how much mass lies there.
//!
//! All of it is computed in float64 on the host and stored in float32.
use tch::Tensor;

use crate::losses::uld::UldBatch;
use crate::losses::TeacherTargets;
use crate::shards::row::ShardRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetOptions {
    /// Give a label outside the top-k its own bucket (ignored where draws are used:
    /// they already carry the tail).
    pub label_bucket: bool,
    /// Use the shards' tail draws (forward KL at temperature 1); otherwise the top-k and
    /// the tail bucket of the same shards.
    pub use_draws: bool,
}

/// One position's entries and rest, in float64.
struct Listing {
    ids: Vec<i64>,
    logprobs: Vec<f64>,
    rest: f64,
}

/// The rows' teacher targets as host tensors `[P, m]` (m: the longest listing of the
/// batch), in the batch's predicting order (row-major, increasing position), which is
/// the order the shards store them in.
pub fn teacher_targets(rows: &[ShardRow], opts: TargetOptions) -> TeacherTargets {
    let mut listings = vec![];
    for row in rows {
        let labels = labels(row);
        let t = &row.topk;
        let mut draws = t.draws.as_ref().filter(|_| opts.use_draws).map(|d| d.per_position());
        for (i, (&label, (top_ids, top_lps))) in labels.iter().zip(t.per_position()).enumerate() {
            let tail = f64::from(t.tail_logmass[i]);
            let mut listing = Listing {
                ids: top_ids.iter().map(|&id| id as i64).collect(),
                logprobs: top_lps.iter().map(|x| f64::from(x.to_f32())).collect(),
                rest: tail,
            };
            if let Some((ids, counts)) = draws.as_mut().and_then(Iterator::next) {
                let m: f64 = counts.iter().map(|&c| f64::from(c)).sum();
                listing.ids.extend(ids.iter().map(|&id| id as i64));
                listing.logprobs.extend(counts.iter().map(|&c| tail + (f64::from(c) / m).ln()));
                listing.rest = f64::NEG_INFINITY;
            } else if opts.label_bucket && !listing.ids.contains(&label) {
                // Stored values are rounded: the label never holds more than the tail.
                let label_lp = f64::from(t.target_logprob[i]).min(tail);
                listing.ids.push(label);
                listing.logprobs.push(label_lp);
                listing.rest = log_sub(tail, label_lp);
            }
            listings.push(listing);
        }
    }
    pack(&listings)
}

/// The rows' ULD targets (cross-tokenizer sets), their positions counted in the batch's
/// predicting order. `None` when the rows hold none.
pub fn uld_batch(rows: &[ShardRow]) -> Option<UldBatch> {
    let (mut teacher, mut starts, mut continuations, mut group_of) = (vec![], vec![], vec![], vec![]);
    let mut position = 0i64;
    let mut width = 0;
    for row in rows {
        let u = row.topk.uld.as_ref()?;
        width = row.topk.k + 1;
        for (j, &continues) in u.continues.iter().enumerate() {
            match continues {
                // A group never continues across rows: each row's first target starts one.
                true if !starts.is_empty() => {
                    continuations.push(position);
                    group_of.push(starts.len() as i64 - 1);
                }
                _ => {
                    starts.push(position);
                    teacher.extend(u.logprobs[j * width..(j + 1) * width].iter().map(|l| l.to_f32().exp()));
                }
            }
            position += 1;
        }
    }
    Some(UldBatch {
        teacher: Tensor::from_slice(&teacher).view([-1, width.max(1) as i64]),
        starts: Tensor::from_slice(&starts),
        continuations: Tensor::from_slice(&continuations),
        group_of: Tensor::from_slice(&group_of),
    })
}

/// The token each trained position predicts, in stored order.
fn labels(row: &ShardRow) -> Vec<i64> {
    let s = &row.sequence;
    s.ids.iter().zip(&s.loss_mask).filter(|(_, &m)| m).map(|(&id, _)| id as i64).collect()
}

/// `log(exp(a) - exp(b))` for `b <= a`; -inf when they are equal.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        a
    } else {
        a + (-(b - a).exp_m1()).ln()
    }
}

/// Listings padded to the longest with the position's first id and log-probability -inf.
fn pack(listings: &[Listing]) -> TeacherTargets {
    let m = listings.iter().map(|l| l.ids.len()).max().unwrap_or(0).max(1);
    let (mut ids, mut lps, mut rest) = (vec![], vec![], vec![]);
    for l in listings {
        let pad = l.ids.first().copied().unwrap_or(0);
        ids.extend(l.ids.iter().copied().chain(std::iter::repeat(pad)).take(m));
        lps.extend(l.logprobs.iter().map(|&x| x as f32).chain(std::iter::repeat(f32::NEG_INFINITY)).take(m));
        rest.push(l.rest as f32);
    }
    TeacherTargets {
        ids: Tensor::from_slice(&ids).view([-1, m as i64]),
        logprobs: Tensor::from_slice(&lps).view([-1, m as i64]),
        tail_logmass: Tensor::from_slice(&rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::sequence::Sequence;
    use crate::shards::row::{TailDraws, TopKTargets};
    use half::f16;

    fn row(ids: Vec<u32>, topk: TopKTargets) -> ShardRow {
        let n = ids.len();
        let sequence = Sequence {
            row_index: 0,
            sample_ids: vec!["a".into()],
            doc_lengths: vec![n as u32],
            loss_mask: (0..n).map(|t| t > 0).collect(),
            sampler_logprobs: None,
            ids,
        };
        ShardRow { sequence, topk, hidden: vec![] }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).reshape([-1])).unwrap()
    }

    #[test]
    fn the_label_gets_its_own_bucket_only_outside_the_top_k() {
        let lp = |p: f64| f16::from_f64(p.ln());
        // Two positions, top-2: labels 7 (outside) and 1 (inside).
        let topk = TopKTargets {
            k: 2,
            lengths: None,
            ids: vec![1, 2, 1, 3],
            logprobs: vec![lp(0.5), lp(0.3), lp(0.6), lp(0.2)],
            tail_logmass: vec![0.2f32.ln(), 0.2f32.ln()],
            target_logprob: vec![0.05f32.ln(), 0.6f32.ln()],
            draws: None,
            uld: None,
        };
        let rows = [row(vec![9, 7, 1], topk)];
        let t = teacher_targets(&rows, TargetOptions { label_bucket: true, use_draws: true });
        assert_eq!(Vec::<i64>::try_from(t.ids.reshape([-1])).unwrap(), vec![1, 2, 7, 1, 3, 1]);
        let lps = values(&t.logprobs);
        assert!((lps[2] - 0.05f64.ln()).abs() < 1e-6 && lps[5] == f64::NEG_INFINITY, "{lps:?}");
        let rest = values(&t.tail_logmass);
        assert!((rest[0] - 0.15f64.ln()).abs() < 1e-6 && (rest[1] - 0.2f64.ln()).abs() < 1e-6, "{rest:?}");
        let plain = teacher_targets(&rows, TargetOptions { label_bucket: false, use_draws: true });
        assert_eq!(plain.ids.size(), [2, 2]);
    }

    #[test]
    fn draws_carry_the_tail_mass_by_their_counts() {
        let topk = TopKTargets {
            k: 1,
            lengths: None,
            ids: vec![4],
            logprobs: vec![f16::from_f64(0.6f64.ln())],
            tail_logmass: vec![0.4f32.ln()],
            target_logprob: vec![0.1f32.ln()],
            draws: Some(TailDraws { lengths: vec![2], ids: vec![0, 5], counts: vec![3, 1] }),
            uld: None,
        };
        let t = teacher_targets(&[row(vec![9, 5], topk)], TargetOptions { label_bucket: true, use_draws: true });
        assert_eq!(Vec::<i64>::try_from(t.ids.reshape([-1])).unwrap(), vec![4, 0, 5]);
        let p: Vec<f64> = values(&t.logprobs).iter().map(|x| x.exp()).collect();
        assert!((p[1] - 0.3).abs() < 1e-6 && (p[2] - 0.1).abs() < 1e-6, "{p:?}");
        assert_eq!(values(&t.tail_logmass), vec![f64::NEG_INFINITY]);
    }
}
