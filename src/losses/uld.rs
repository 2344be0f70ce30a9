//! Universal Logit Distillation (Boizard et al. 2024) over aligned groups of tokens, for
//! a teacher with another tokenizer: the L1 distance between the teacher's and the
//! student's probability vectors sorted in descending order, which needs no mapping
//! between the vocabularies.
//!
//! Per group: the teacher's vector (stored, `k + 1` entries: its k largest group
//! probabilities in descending order, then the rest of the mass) against the student's:
//! its k largest probabilities at the group's first position times the probability of
//! the labels of the group's other positions (the student's probability of the group's
//! text starting with each first token), descending, then the rest. `sum_i |t_i - s_i|`
//! lies in [0, 2]. The rest stays last instead of being sorted in: sorted in, the large
//! rest of a flat student distribution would stand in for a peaked teacher's top-1, and
//! a uniform student would look close to a confident teacher.
use tch::{Kind, Tensor};

/// A micro-batch's ULD targets, in the order of its trained (predicting) positions.
pub struct UldBatch {
    /// `[G, k+1]` the teacher's probabilities per group, descending (float32).
    pub teacher: Tensor,
    /// `[G]` the trained position that starts each group.
    pub starts: Tensor,
    /// `[C]` trained positions that continue a group, and `[C]` the group of each.
    pub continuations: Tensor,
    pub group_of: Tensor,
}

impl UldBatch {
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> UldBatch {
        UldBatch {
            teacher: f(&self.teacher),
            starts: f(&self.starts),
            continuations: f(&self.continuations),
            group_of: f(&self.group_of),
        }
    }

    pub fn groups(&self) -> i64 {
        self.starts.size()[0]
    }

    /// The batch cut into pieces of whole groups, each using at most about `max_rows`
    /// positions (a group larger than that is a piece of its own): the head's logits
    /// over those positions are what a piece holds in memory.
    pub fn pieces(&self, max_rows: i64) -> Vec<UldBatch> {
        let group_of: Vec<i64> = Vec::try_from(&self.group_of.to_device(tch::Device::Cpu)).unwrap_or_default();
        let mut out = vec![];
        let (mut g0, mut c0) = (0i64, 0usize);
        while g0 < self.groups() {
            let (mut g1, mut c1) = (g0, c0);
            loop {
                let mut next_c = c1;
                while next_c < group_of.len() && group_of[next_c] == g1 {
                    next_c += 1;
                }
                let rows = (g1 + 1 - g0) + (next_c - c0) as i64;
                if g1 > g0 && rows > max_rows {
                    break;
                }
                (g1, c1) = (g1 + 1, next_c);
                if g1 == self.groups() {
                    break;
                }
            }
            let (gn, cn) = (g1 - g0, (c1 - c0) as i64);
            out.push(UldBatch {
                teacher: self.teacher.narrow(0, g0, gn),
                starts: self.starts.narrow(0, g0, gn),
                continuations: self.continuations.narrow(0, c0 as i64, cn),
                group_of: self.group_of.narrow(0, c0 as i64, cn) - g0,
            });
            (g0, c0) = (g1, c1);
        }
        out
    }

    /// The positions the groups use (starts, then continuations) and the batch indexed
    /// into a tensor of those rows alone: the head need run on no other position.
    pub fn gathered(&self) -> (Tensor, UldBatch) {
        let rows = Tensor::cat(&[&self.starts, &self.continuations], 0);
        let (g, device) = (self.groups(), self.starts.device());
        let local = UldBatch {
            teacher: self.teacher.shallow_clone(),
            starts: Tensor::arange(g, (Kind::Int64, device)),
            continuations: Tensor::arange_start(g, rows.size()[0], (Kind::Int64, device)),
            group_of: self.group_of.shallow_clone(),
        };
        (rows, local)
    }
}

/// float32 logits `h [n, H] @ head^T`, soft-capped when the model caps them (Gemma 2).
pub fn head_logits(h: &Tensor, head: &Tensor, softcap: Option<f64>) -> Tensor {
    let logits = h.to_kind(Kind::Float).matmul(&head.to_kind(Kind::Float).tr());
    match softcap {
        Some(cap) => (logits / cap).tanh() * cap,
        None => logits,
    }
}

/// `[G]` ULD per group. `log_q` `[P, V]`: the student's log-probabilities at the
/// micro-batch's trained positions (or the rows of them that `u` indexes); `labels` `[P]`.
pub fn uld_per_group(log_q: &Tensor, labels: &Tensor, u: &UldBatch) -> Tensor {
    let k = u.teacher.size()[1] - 1;
    let groups = u.groups();
    let kind = log_q.kind();
    // log of the probability of each group's following labels.
    let follow = Tensor::zeros([groups], (kind, log_q.device()));
    let follow = if u.continuations.size()[0] > 0 {
        let lp = log_q.index_select(0, &u.continuations).gather(
            1,
            &labels.index_select(0, &u.continuations).unsqueeze(1),
            false,
        );
        follow.index_add(0, &u.group_of, &lp.squeeze_dim(1))
    } else {
        follow
    };
    let first = log_q.index_select(0, &u.starts);
    let (top, _) = first.topk(k.min(first.size()[1]), -1, true, true);
    let top = (top + follow.unsqueeze(1)).exp();
    let rest = (top.sum_dim_intlist(-1, true, kind).neg() + 1.0).clamp_min(0.0);
    // A student vocabulary smaller than k: zeros, as ULD pads the shorter vector.
    let pad = Tensor::zeros([groups, k - top.size()[1]], (kind, log_q.device()));
    let student = Tensor::cat(&[top, pad, rest], 1);
    (student - u.teacher.to_kind(kind)).abs().sum_dim_intlist(-1, false, kind)
}

/// The sum over groups of `uld_per_group`, in float64.
pub fn uld_sum(log_q: &Tensor, labels: &Tensor, u: &UldBatch) -> Tensor {
    uld_per_group(log_q, labels, u).sum(Kind::Double)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ULD in float64 loops: the definition, written out.
    fn reference(
        log_q: &[Vec<f64>],
        labels: &[i64],
        teacher: &[Vec<f64>],
        starts: &[usize],
        cont: &[(usize, usize)],
    ) -> Vec<f64> {
        let k = teacher[0].len() - 1;
        starts
            .iter()
            .enumerate()
            .map(|(g, &p)| {
                let follow: f64 = cont.iter().filter(|c| c.1 == g).map(|&(c, _)| log_q[c][labels[c] as usize]).sum();
                let mut q: Vec<f64> = log_q[p].iter().map(|l| (l + follow).exp()).collect();
                q.sort_by(|a, b| b.total_cmp(a));
                let top: Vec<f64> = q[..k].to_vec();
                let mut s = top.clone();
                s.push((1.0 - top.iter().sum::<f64>()).max(0.0));
                s.iter().zip(&teacher[g]).map(|(a, b)| (a - b).abs()).sum()
            })
            .collect()
    }

    #[test]
    fn pieces_hold_whole_groups_and_sum_to_the_whole() {
        tch::manual_seed(4);
        let log_q = Tensor::randn([9, 7], (Kind::Double, tch::Device::Cpu)).log_softmax(-1, Kind::Double);
        let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2]);
        let u = UldBatch {
            teacher: Tensor::rand([4, 3], (Kind::Double, tch::Device::Cpu)),
            starts: Tensor::from_slice(&[0i64, 1, 4, 6]),
            continuations: Tensor::from_slice(&[2i64, 3, 5, 7, 8]),
            group_of: Tensor::from_slice(&[1i64, 1, 2, 3, 3]),
        };
        let whole = uld_sum(&log_q, &labels, &u).double_value(&[]);
        for max_rows in [1, 2, 3, 4, 9, 100] {
            let pieces = u.pieces(max_rows);
            let sum: f64 = pieces.iter().map(|p| uld_sum(&log_q, &labels, p).double_value(&[])).sum();
            assert!((sum - whole).abs() < 1e-12, "max_rows {max_rows}: {sum} vs {whole}");
            assert_eq!(pieces.iter().map(UldBatch::groups).sum::<i64>(), 4);
        }
        // Groups of 1, 3, 2 and 3 rows: no two neighbours fit in 3 rows, all four in 9.
        assert_eq!(u.pieces(3).len(), 4);
        assert_eq!(u.pieces(5).len(), 2);
        assert_eq!(u.pieces(9).len(), 1);
    }

    #[test]
    fn matches_the_float64_definition_and_its_gradient() {
        tch::manual_seed(3);
        let (p, v, k) = (5i64, 11i64, 3usize);
        let logits = (Tensor::randn([p, v], (Kind::Double, tch::Device::Cpu)) * 2.0).set_requires_grad(true);
        let labels = Tensor::from_slice(&[1i64, 4, 7, 2, 9]);
        // Groups: {0}, {1, 2, 3} (1 starts, 2 and 3 continue), {4}.
        let teacher_rows: Vec<Vec<f64>> =
            vec![vec![0.5, 0.3, 0.1, 0.1], vec![0.4, 0.2, 0.2, 0.2], vec![0.7, 0.1, 0.05, 0.15]];
        // Top k descending, the rest last.
        let mut sorted_rows = teacher_rows.clone();
        for r in &mut sorted_rows {
            r[..k].sort_by(|a, b| b.total_cmp(a));
        }
        let u = UldBatch {
            teacher: Tensor::from_slice(&sorted_rows.concat()).view([3, (k + 1) as i64]),
            starts: Tensor::from_slice(&[0i64, 1, 4]),
            continuations: Tensor::from_slice(&[2i64, 3]),
            group_of: Tensor::from_slice(&[1i64, 1]),
        };
        let log_q = logits.log_softmax(-1, Kind::Double);
        let got = uld_per_group(&log_q, &labels, &u);
        let lq: Vec<Vec<f64>> = (0..p).map(|i| Vec::<f64>::try_from(log_q.get(i)).unwrap()).collect();
        let lab: Vec<i64> = Vec::try_from(&labels).unwrap();
        let want = reference(&lq, &lab, &sorted_rows, &[0, 1, 4], &[(2, 1), (3, 1)]);
        let got_v: Vec<f64> = Vec::try_from(&got).unwrap();
        for (a, b) in got_v.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{got_v:?} vs {want:?}");
            assert!((0.0..=2.0).contains(a));
        }
        // Gradient against central differences of the float64 definition.
        got.sum(Kind::Double).backward();
        let grad = logits.grad();
        let eps = 1e-6;
        let base: Vec<f64> = Vec::try_from(logits.detach().reshape([-1])).unwrap();
        for idx in [0usize, 7, 13, 25, 40, 54] {
            let at = |delta: f64| {
                let mut x = base.clone();
                x[idx] += delta;
                let t = Tensor::from_slice(&x).view([p, v]).log_softmax(-1, Kind::Double);
                let lq: Vec<Vec<f64>> = (0..p).map(|i| Vec::<f64>::try_from(t.get(i)).unwrap()).collect();
                reference(&lq, &lab, &sorted_rows, &[0, 1, 4], &[(2, 1), (3, 1)]).iter().sum::<f64>()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let analytic = grad.reshape([-1]).double_value(&[idx as i64]);
            assert!((numeric - analytic).abs() < 1e-6, "logit {idx}: {analytic} vs {numeric}");
        }
        // The same distribution on both sides: 0.
        let same = UldBatch {
            teacher: {
                let q = log_q.get(0).exp();
                let (top, _) = q.topk(k as i64, -1, true, true);
                let rest = top.sum(Kind::Double).neg() + 1.0;
                Tensor::cat(&[top, rest.unsqueeze(0)], 0).unsqueeze(0)
            },
            starts: Tensor::from_slice(&[0i64]),
            continuations: Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
            group_of: Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
        };
        assert!(uld_sum(&log_q.detach(), &labels, &same).double_value(&[]) < 1e-15);
    }
}
