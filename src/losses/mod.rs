//! Distillation losses as pure functions of tensors, per trained position.
//!
//! With the teacher's top-k log-probs `log p_i` (i in K), its tail mass `r = 1 - sum p_i`
//! and the student's full-vocabulary log-softmax `log q`:
//! - `Bucket` compares the (k+1)-bucket distributions `{p_K, r}` and `{q_K, q_rest}`,
//!   `q_rest = 1 - sum_K q_i`: exact, and equal to the full KL when k is the vocabulary;
//! - `Renormalized` compares both distributions renormalised over K (what top-k tools
//!   such as DistillKit and axolotl approximate); it ignores the student's mass outside K.
//!
//! Divergences: forward KL(p || q), reverse KL(q || p) (MiniLLM) and the generalised JSD
//! of GKD: `beta KL(p || m) + (1 - beta) KL(q || m)`, `m = beta p + (1 - beta) q`.
//! Temperature T re-tempers the student as `log_softmax(z / T)` and the stored teacher
//! log-probs as `log p_K / T`, and scales by T^2. Renormalised mode then normalises over
//! K. Bucket mode needs the tail's tempered mass `sum_tail p_j^(1/T)`, which the shards
//! do not hold: it is approximated by a tail that continues flat at the smallest listed
//! probability p_min, `r / p_min` ids of p_min each, so `r * p_min^(1/T - 1)` (for T > 1
//! the least tempered mass a tail of ids below p_min can have, where one bucket
//! `r^(1/T)` would understate it far more; exact when nothing is left in the tail).
//! All results are per position (`[P]`, float32); callers sum and normalise by the
//! global count of trained tokens.
pub mod fused;
pub mod uld;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Log-probabilities are floored here instead of -inf, so `0 * log 0` terms and their
/// gradients stay finite (exp(-1e4) is 0 in float32).
const LOG_FLOOR: f64 = -1e4;

/// Teacher targets for P positions on the training device: a sparse distribution over
/// the listed ids plus one bucket for the rest of the vocabulary.
///
/// The listed ids are the top-k, optionally followed by the label (when it lies outside
/// the top-k) or by ids drawn from the tail with their estimated mass (`batch::feed`).
/// Positions list different numbers of ids: shorter lists are padded with an id the
/// position already lists and log-probability -inf, which stands for "no entry" (the
/// losses give it no mass on either side).
pub struct TeacherTargets {
    /// `[P, m]` int64 token ids, distinct within a position except for padding.
    pub ids: Tensor,
    /// `[P, m]` log-probabilities at temperature 1 (any float kind); -inf marks padding.
    pub logprobs: Tensor,
    /// `[P]` log of the mass of the ids not listed (-inf when the list holds it all).
    pub tail_logmass: Tensor,
}

impl TeacherTargets {
    /// `[P, m]` true where an entry is padding (no token).
    pub fn padding(&self) -> Tensor {
        self.logprobs.isneginf()
    }

    /// `f` applied to every tensor (a slice of positions, a device move, pinning).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> TeacherTargets {
        TeacherTargets { ids: f(&self.ids), logprobs: f(&self.logprobs), tail_logmass: f(&self.tail_logmass) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    /// GKD's generalised JSD; beta = 0 is forward KL, beta = 1 reverse KL.
    Jsd {
        beta: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TopKMode {
    Bucket,
    Renormalized,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdLoss {
    pub divergence: Divergence,
    pub mode: TopKMode,
    pub temperature: f64,
}

impl KdLoss {
    /// Refuses settings no loss can be computed with.
    pub fn check(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            bail!("temperature must be a positive number, not {t}");
        }
        if let Divergence::Jsd { beta } = self.divergence {
            if !(0.0..=1.0).contains(&beta) {
                bail!("JSD beta must lie in [0, 1], not {beta}");
            }
        }
        Ok(())
    }

    /// Per-position divergence `[P]` between teacher targets and student logits `[P, V]`,
    /// times T^2.
    pub fn per_position(&self, student_logits: &Tensor, teacher: &TeacherTargets) -> Result<Tensor> {
        self.check()?;
        let z = working(student_logits) / self.temperature;
        let log_q = match self.mode {
            TopKMode::Bucket => {
                let lse = z.logsumexp([-1], true);
                let q_k = (z.gather(-1, &teacher.ids, false) - &lse).masked_fill(&teacher.padding(), LOG_FLOOR);
                // The student's tail from its own logsumexp over the non-top-k logits.
                let q_rest = z.scatter_value(-1, &teacher.ids, LOG_FLOOR).logsumexp([-1], true) - &lse;
                Tensor::cat(&[q_k, q_rest], -1).clamp_min(LOG_FLOOR)
            }
            TopKMode::Renormalized => self.student_top_k(&z.gather(-1, &teacher.ids, false)),
        };
        Ok(self.divergence_of(&self.teacher_log_dist(teacher), &log_q))
    }

    /// The teacher's log-distribution over the loss's support at the temperature: the
    /// listed ids and the rest bucket renormalised (stored values are rounded to float16;
    /// the tempered tail approximated, see the module notes), or the top-k renormalised.
    pub fn teacher_log_dist(&self, teacher: &TeacherTargets) -> Tensor {
        let logp_k = working(&teacher.logprobs);
        let t = self.temperature;
        match self.mode {
            TopKMode::Bucket => {
                let tail = working(&teacher.tail_logmass).unsqueeze(-1);
                // Never in place: `tail` may share the targets' storage.
                let tail = if t != 1.0 {
                    let listed_min = logp_k.masked_fill(&teacher.padding(), 0.0).min_dim(-1, true).0;
                    tail + listed_min * (1.0 / t - 1.0)
                } else {
                    tail
                };
                let p = Tensor::cat(&[&logp_k / t, tail], -1);
                p.clamp_min(LOG_FLOOR).log_softmax(-1, p.kind())
            }
            TopKMode::Renormalized => (&logp_k / self.temperature).log_softmax(-1, logp_k.kind()),
        }
    }

    /// The student's renormalised top-k log-distribution from its tempered logits at the
    /// teacher's top-k ids `[P, k]`: `log_softmax(z / T)` gathered and renormalised over
    /// K is `log_softmax(z_K / T)`.
    pub fn student_top_k(&self, z_k_tempered: &Tensor) -> Tensor {
        let z_k = working(z_k_tempered);
        z_k.log_softmax(-1, z_k.kind())
    }

    /// The divergence per position `[P]` between log-distributions over the same support,
    /// times T^2.
    pub fn divergence_of(&self, log_p: &Tensor, log_q: &Tensor) -> Tensor {
        let t = self.temperature;
        let kl = |a: &Tensor, b: &Tensor| {
            let d = a.exp() * (a - b);
            d.sum_dim_intlist(-1, false, d.kind())
        };
        let loss = match self.divergence {
            Divergence::ForwardKl => kl(log_p, log_q),
            Divergence::ReverseKl => kl(log_q, log_p),
            Divergence::Jsd { beta: 0.0 } => kl(log_p, log_q),
            Divergence::Jsd { beta: 1.0 } => kl(log_q, log_p),
            Divergence::Jsd { beta } => {
                let log_m = Tensor::stack(&[log_p + beta.ln(), log_q + (1.0 - beta).ln()], 0).logsumexp([0], false);
                kl(log_p, &log_m) * beta + kl(log_q, &log_m) * (1.0 - beta)
            }
        };
        loss * (t * t)
    }
}

/// Losses compute in float32 (whatever the logits' dtype), or in float64 when given
/// float64: the reference precision of the tests.
fn working(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Double {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}

/// Per-position hard-label cross-entropy `-log q(target)` `[P]` for logits `[P, V]`.
pub fn cross_entropy(student_logits: &Tensor, targets: &Tensor) -> Tensor {
    let z = working(student_logits);
    let logq = z.log_softmax(-1, z.kind());
    -logq.gather(-1, &targets.unsqueeze(-1), false).squeeze_dim(-1)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HiddenLoss {
    /// Mean over features of the squared difference.
    Mse,
    /// 1 - cosine similarity.
    Cosine,
}

/// Per-position hidden-state loss `[P]` between the student's (already projected to the
/// teacher's width) and the teacher's states, both `[P, H]`.
pub fn hidden_loss(kind: HiddenLoss, student: &Tensor, teacher: &Tensor) -> Tensor {
    let (s, t) = (student.to_kind(Kind::Float), teacher.to_kind(Kind::Float));
    match kind {
        HiddenLoss::Mse => (&s - &t).square().mean_dim(-1, false, Kind::Float),
        HiddenLoss::Cosine => {
            let dot = (&s * &t).sum_dim_intlist(-1, false, Kind::Float);
            let norms = s.norm_scalaropt_dim(2, [-1], false) * t.norm_scalaropt_dim(2, [-1], false);
            1.0 - dot / norms.clamp_min(1e-12)
        }
    }
}

#[cfg(test)]
mod tests;
