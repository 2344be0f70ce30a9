//! The head and every loss on it, a chunk of positions at a time, with the gradient
//! with respect to the logits written out instead of left to autograd: one logsumexp
//! serves every term, the probabilities are computed in place in the logits' buffer,
//! which then becomes the gradient, and a term of weight 0 costs nothing.
//!
//! With the student's probabilities `q = softmax(z)`, the losses are functions of a few
//! log-probabilities per position: the k+1 buckets `log q_K`, `log q_rest` (bucket mode),
//! the re-tempered top-k (renormalised mode) and the label's `log q_y` (cross-entropy).
//! Their gradients with respect to those few values, `G`, come from autograd on `[P, k+1]`
//! tensors; the chain rule to the logits is then, per position and vocabulary entry j,
//! `dL/dz_j = [j in K] G_j + [j not in K] q_j G_rest / q_rest + [j = y] G_y - q_j S`
//! with `S = sum_K G + G_rest + G_y` (as `d log q_i / dz_j = [i = j] - q_j` and
//! `d log q_rest / dz_j = [j not in K] q_j / q_rest - q_j`); the renormalised top-k
//! adds its gradient at K only. The tail mass is summed over the non-top-k
//! probabilities (never `1 - sum q_K`), so it stays exact when the top-k hold nearly all
//! the mass. Tested against the autograd formulation and float64 references.
use anyhow::Result;
use tch::{Kind, Tensor};

use super::{KdLoss, TeacherTargets, TopKMode, LOG_FLOOR};

/// What the head is trained on: the label of each trained position and, for KD, the
/// teacher's targets; `alpha` weighs the cross-entropy, `1 - alpha` the divergence.
pub struct HeadLoss<'a> {
    pub next_tokens: &'a Tensor,
    pub teacher: Option<&'a TeacherTargets>,
    pub kd: KdLoss,
    pub alpha: f64,
    /// The model's logits are `cap * tanh(h W^T / cap)` (Gemma 2); the gradient through
    /// the cap is `1 - (z / cap)^2`.
    pub logit_softcap: Option<f64>,
}

/// Loss sums (float64, on the device) and gradients of one call.
pub struct HeadLossOutput {
    /// `scale * sum((1 - alpha) kd + alpha ce)`, the value whose gradients these are.
    pub loss: Tensor,
    /// Unweighted, unscaled sums of the per-position divergence and cross-entropy.
    pub kd_sum: Tensor,
    pub ce_sum: Tensor,
    /// Gradient with respect to `hidden` `[P, H]`.
    pub grad_hidden: Tensor,
    /// Gradient with respect to the head weight `[V, H]` (float32; float64 for float64).
    pub grad_head: Tensor,
}

impl HeadLoss<'_> {
    fn kd_weight(&self) -> f64 {
        if self.teacher.is_some() {
            1.0 - self.alpha
        } else {
            0.0
        }
    }
}

/// The head `hidden [P, H] @ head^T` and the losses, `chunk` positions at a time, and
/// their gradients, each multiplied by `scale` (e.g. 1 / the global count of trained
/// tokens). No autograd graph is kept beyond one chunk's `[n, k+1]` tensors.
pub fn fused_head_loss(
    hidden: &Tensor,
    head: &Tensor,
    loss: &HeadLoss,
    chunk: i64,
    scale: f64,
) -> Result<HeadLossOutput> {
    let grad_kind = if head.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let grad_head = Tensor::zeros(head.size(), (grad_kind, head.device()));
    fused_head_loss_into(hidden, head, loss, chunk, scale, grad_head)
}

/// `fused_head_loss` adding the head's gradient into `grad_head` (float32 or float64,
/// e.g. the head's own `.grad()`: no `[V, H]` buffer of its own), which the output
/// returns.
pub fn fused_head_loss_into(
    hidden: &Tensor,
    head: &Tensor,
    loss: &HeadLoss,
    chunk: i64,
    scale: f64,
    mut grad_head: Tensor,
) -> Result<HeadLossOutput> {
    let _no_grad = tch::no_grad_guard();
    let device = hidden.device();
    let positions = hidden.size()[0];
    let (mut total, mut kd_sum, mut ce_sum) = (zero_sum(device), zero_sum(device), zero_sum(device));
    let mut grad_hidden = Vec::new();
    let mut start = 0;
    while start < positions {
        let n = chunk.max(1).min(positions - start);
        let h = hidden.narrow(0, start, n);
        let part = |t: &Tensor| t.narrow(0, start, n);
        let teacher = loss.teacher.map(|t| t.map(part));
        let next = part(loss.next_tokens).unsqueeze(-1);
        let sums = chunk_gradient(&h, head, loss, teacher.as_ref(), &next, scale)?;
        total += sums.total;
        kd_sum += sums.kd;
        ce_sum += sums.ce;
        // The logits' buffer now holds dL/dz: back through the head.
        grad_hidden.push(sums.grad.mm(head));
        accumulate_head_grad(&mut grad_head, &sums.grad, &h);
        start += n;
    }
    let grad_hidden = if grad_hidden.is_empty() { hidden.zeros_like() } else { Tensor::cat(&grad_hidden, 0) };
    Ok(HeadLossOutput { loss: total, kd_sum, ce_sum, grad_hidden, grad_head })
}

/// `grad_head += grad^T @ h`, in place, in `grad_head`'s precision (a bfloat16 chunk
/// is widened first: `[n, H]`, never a `[V, H]` temporary).
fn accumulate_head_grad(grad_head: &mut Tensor, grad: &Tensor, h: &Tensor) {
    let kind = grad_head.kind();
    let _ = grad_head.addmm_(&grad.to_kind(kind).tr(), &h.to_kind(kind));
}

struct ChunkSums {
    total: Tensor,
    kd: Tensor,
    ce: Tensor,
    /// dL/dz `[n, V]` (float32; the logits' own buffer).
    grad: Tensor,
}

/// One chunk: logits, loss terms and dL/dz, in one `[n, V]` buffer.
fn chunk_gradient(
    h: &Tensor,
    head: &Tensor,
    loss: &HeadLoss,
    teacher: Option<&TeacherTargets>,
    next: &Tensor,
    scale: f64,
) -> Result<ChunkSums> {
    // `linear` (not `matmul(head.tr())`): autocast caches its cast of a leaf weight.
    let mut z = h.linear(head, None::<Tensor>);
    if !matches!(z.kind(), Kind::Float | Kind::Double) {
        z = z.to_kind(Kind::Float);
    }
    // Soft-capped logits: z = cap tanh(raw / cap), in place; dz/draw kept for the end.
    let cap_slope = loss.logit_softcap.map(|cap| {
        let _ = z.g_div_scalar_(cap).tanh_();
        let slope = 1.0 - z.square();
        let _ = z.g_mul_scalar_(cap);
        slope
    });
    let kind = z.kind();
    let z_y = z.gather(-1, next, false);
    let (alpha, kd_weight) = (loss.alpha, loss.kd_weight());
    // dL/d log q_y of the weighted, scaled cross-entropy.
    let g_y = Tensor::full_like(&z_y, -alpha * scale);
    let sum = |t: &Tensor| t.sum(Kind::Double);
    let (lse, kd) = match teacher.filter(|_| kd_weight > 0.0) {
        None => {
            // Cross-entropy alone: dL/dz = g_y (onehot(y) - q).
            let lse = z.logsumexp([-1], true);
            let _ = z.g_sub_(&lse).exp_().g_mul_(&(-&g_y));
            (lse, zero_sum(z.device()))
        }
        Some(t) if loss.kd.mode == TopKMode::Bucket => {
            // At T != 1 the divergence sees z / T and the cross-entropy z: the latter's
            // gradient `alpha scale softmax(z)` is kept aside, the buffer becomes z / T.
            let temperature = loss.kd.temperature;
            let tempered = temperature != 1.0;
            let (ce_lse, ce_grad, g_y_kd) = if tempered {
                let lse = z.logsumexp([-1], true);
                let ce_grad = (alpha > 0.0).then(|| (&z - &lse).exp() * (alpha * scale));
                let _ = z.g_div_scalar_(temperature);
                (Some(lse), ce_grad, g_y.zeros_like())
            } else {
                (None, None, g_y.shallow_clone())
            };
            // The top-k masked out, the rest's logsumexp, and from the two the whole one:
            // every log-probability stays in log space (exact for a tiny tail).
            // Padding entries repeat a listed id: they hold no student mass either.
            let z_k = z.gather(-1, &t.ids, false).masked_fill(&t.padding(), f64::NEG_INFINITY);
            let _ = z.scatter_value_(-1, &t.ids, f64::NEG_INFINITY);
            let lse_rest = z.logsumexp([-1], true);
            let lse = Tensor::stack(&[&lse_rest, &z_k.logsumexp([-1], true)], 0).logsumexp([0], false);
            let (log_q_k, log_q_rest) = (&z_k - &lse, &lse_rest - &lse);
            let raw = Tensor::cat(&[&log_q_k, &log_q_rest], -1);
            let (kd, g) = divergence_grad(loss, t, &raw, kd_weight * scale, |leaf| leaf.clamp_min(LOG_FLOOR))?;
            let k = t.ids.size()[1];
            let (g_k, g_rest) = (g.narrow(1, 0, k), g.narrow(1, k, 1));
            let s = g_k.sum_dim_intlist(-1, true, kind) + &g_rest + &g_y_kd;
            // Outside the top-k: q_j (G_rest / q_rest - S) = (q_j / q_rest) (G_rest - q_rest S),
            // with q_j / q_rest = exp(z_j - lse_rest) bounded by 1 (0 where masked).
            let finite = lse_rest.isfinite();
            let shift = lse_rest.where_self(&finite, &lse_rest.zeros_like());
            let _ = z.g_sub_(&shift).exp_().g_mul_(&(g_rest - log_q_rest.exp() * &s));
            // Added, not written: the listed ids hold 0 here, and a padding entry (whose
            // id repeats a listed one) adds its 0 instead of overwriting.
            let _ = z.scatter_add_(-1, &t.ids, &(g_k - log_q_k.exp() * &s));
            match ce_lse {
                // dL/dz = dL/d(z / T) / T, plus the cross-entropy's part.
                Some(ce_lse) => {
                    let _ = z.g_div_scalar_(temperature);
                    if let Some(c) = ce_grad {
                        let _ = z.g_add_(&c);
                    }
                    (ce_lse, kd)
                }
                None => (lse, kd),
            }
        }
        Some(t) => {
            // Renormalised top-k: the divergence depends on z_K alone.
            let z_k = z.gather(-1, &t.ids, false);
            let temperature = loss.kd.temperature;
            let (kd, g_k) =
                divergence_grad(loss, t, &z_k, kd_weight * scale, |leaf| loss.kd.student_top_k(&(leaf / temperature)))?;
            let lse = z.logsumexp([-1], true);
            if alpha > 0.0 {
                let _ = z.g_sub_(&lse).exp_().g_mul_(&(-&g_y));
            } else {
                let _ = z.zero_();
            }
            let _ = z.scatter_add_(-1, &t.ids, &g_k);
            (lse, kd)
        }
    };
    let _ = z.scatter_add_(-1, next, &g_y);
    if let Some(slope) = cap_slope {
        let _ = z.g_mul_(&slope);
    }
    let ce = sum(&(lse - z_y));
    let total = &ce * (alpha * scale) + &kd * (kd_weight * scale);
    Ok(ChunkSums { total, kd, ce, grad: z })
}

/// A float64 scalar 0 on `device`: the start of a loss sum.
fn zero_sum(device: tch::Device) -> Tensor {
    Tensor::zeros([], (Kind::Double, device))
}

/// The divergence summed over the chunk (float64) and its gradient with respect to
/// `input` (the student's few log-probabilities or logits per position), times `weight`,
/// through `student` (what turns `input` into the student's log-distribution).
fn divergence_grad(
    loss: &HeadLoss,
    teacher: &TeacherTargets,
    input: &Tensor,
    weight: f64,
    student: impl Fn(&Tensor) -> Tensor,
) -> Result<(Tensor, Tensor)> {
    tch::with_grad(|| {
        let leaf = input.detach().set_requires_grad(true);
        let per = loss.kd.divergence_of(&loss.kd.teacher_log_dist(teacher), &student(&leaf));
        (per.sum(per.kind()) * weight).backward();
        Ok((per.detach().sum(Kind::Double), leaf.grad()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::{cross_entropy, Divergence};
    use tch::Device;

    /// The autograd formulation the fused one replaces: logits of every position, the
    /// per-position losses, `backward`; in float64 it is the reference.
    fn autograd(hidden: &Tensor, head: &Tensor, loss: &HeadLoss, scale: f64) -> (f64, Tensor, Tensor) {
        let h = hidden.detach().set_requires_grad(true);
        let w = head.detach().set_requires_grad(true);
        let z = h.mm(&w.tr());
        let z = match loss.logit_softcap {
            Some(cap) => (z / cap).tanh() * cap,
            None => z,
        };
        let ce = cross_entropy(&z, loss.next_tokens);
        let per = match loss.teacher.filter(|_| loss.alpha < 1.0) {
            Some(t) => loss.kd.per_position(&z, t).unwrap() * (1.0 - loss.alpha) + ce * loss.alpha,
            None => ce,
        };
        let total = per.sum(Kind::Double) * scale;
        total.backward();
        (total.double_value(&[]), h.grad(), w.grad())
    }

    /// Standard normal numbers from a seed alone (splitmix64 + Box-Muller): libtorch's
    /// generator is global, and tests running beside this one would draw from it too.
    struct Normal(u64);

    impl Normal {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn tensor(&mut self, shape: &[i64]) -> Tensor {
            let n: i64 = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let (a, b) = (1.0 - self.uniform(), self.uniform());
                    ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
                })
                .collect();
            Tensor::from_slice(&values).view(shape)
        }
    }

    struct Setup {
        hidden: Tensor,
        head: Tensor,
        next: Tensor,
        teacher: TeacherTargets,
    }

    /// Random states and a head with logits of spread ~3; the teacher's top-k from its
    /// own logits, which favour ids 0..k. `peaked`: the student puts nearly all its mass
    /// on those ids too (states and their head rows share a direction), leaving a tail
    /// far below float32's resolution of `1 - sum q_K`.
    fn setup(seed: u64, p: i64, h: i64, v: i64, k: i64, peaked: bool) -> Setup {
        let opts = (Kind::Float, Device::Cpu);
        let mut rng = Normal(seed);
        let direction = rng.tensor(&[h]);
        let direction = &direction / direction.norm();
        let mut hidden = rng.tensor(&[p, h]);
        let mut head = rng.tensor(&[v, h]) * (3.0 / (h as f64).sqrt());
        if peaked {
            hidden = hidden * 0.3 + &direction * 4.0;
            let boost = (&direction * 15.0).unsqueeze(0).expand([k, h], false);
            head = head.index_add(0, &Tensor::arange(k, (Kind::Int64, Device::Cpu)), &boost);
        }
        let favoured = Tensor::cat(&[Tensor::full([k], 30.0, opts), Tensor::zeros([v - k], opts)], 0);
        let teacher_logits = rng.tensor(&[p, v]) * 3.0 + favoured;
        let lp = teacher_logits.log_softmax(-1, Kind::Float);
        let (top, ids) = lp.topk(k, -1, true, true);
        let tail = lp.scatter_value(-1, &ids, f64::NEG_INFINITY).logsumexp([-1], false);
        let next = (rng.tensor(&[p]).abs() * 1000.0).to_kind(Kind::Int64).remainder(v);
        Setup {
            hidden,
            head,
            next,
            teacher: TeacherTargets { ids, logprobs: top.to_kind(Kind::Half), tail_logmass: tail },
        }
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
    }

    /// Fused (float32, chunked) against the autograd formulation in float64: the loss
    /// within 1e-5; the gradients of the states and of the head within 1e-5 of their
    /// largest entry, or no worse than twice the float32 autograd formulation's own error
    /// (a state's gradient sums V products, and float32 loses more there than 1e-5).
    fn check(s: &Setup, kd: KdLoss, alpha: f64, teacher: bool) {
        check_capped(s, kd, alpha, teacher, None);
    }

    fn check_capped(s: &Setup, kd: KdLoss, alpha: f64, teacher: bool, logit_softcap: Option<f64>) {
        let loss = HeadLoss { next_tokens: &s.next, teacher: teacher.then_some(&s.teacher), kd, alpha, logit_softcap };
        let scale = 1.0 / s.hidden.size()[0] as f64;
        let fused = fused_head_loss(&s.hidden, &s.head, &loss, 5, scale).unwrap();
        let (_, gh32, gw32) = autograd(&s.hidden, &s.head, &loss, scale);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let (want, gh, gw) = autograd(&d(&s.hidden), &d(&s.head), &loss, scale);
        let got = fused.loss.double_value(&[]);
        let what = format!("{kd:?} alpha {alpha} teacher {teacher} cap {logit_softcap:?}");
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{what}: loss {got} vs {want}");
        for (name, ours, old, exact) in
            [("state", &fused.grad_hidden, &gh32, &gh), ("head", &fused.grad_head, &gw32, &gw)]
        {
            let (e, e_old) = (rel(ours, exact), rel(old, exact));
            eprintln!("{what}: {name} gradient: fused {e:.1e}, autograd float32 {e_old:.1e}");
            assert!(e < 1e-5 || e <= 2.0 * e_old, "{what}: {name} gradient off by {e:e} (autograd float32: {e_old:e})");
        }
        // The reported parts are the unweighted sums.
        let z = d(&s.hidden).mm(&d(&s.head).tr());
        let z = logit_softcap.map_or(z.shallow_clone(), |cap| (&z / cap).tanh() * cap);
        let ce = cross_entropy(&z, &s.next).sum(Kind::Double).double_value(&[]);
        assert!((fused.ce_sum.double_value(&[]) - ce).abs() <= 1e-5 * ce, "{what}: CE sum");
    }

    #[test]
    fn fused_head_loss_equals_autograd_in_float64() {
        let bucket = |divergence| KdLoss { divergence, mode: TopKMode::Bucket, temperature: 1.0 };
        for peaked in [false, true] {
            let s = setup(11, 13, 8, 40, 6, peaked);
            for alpha in [0.0, 0.5] {
                check(&s, bucket(Divergence::ForwardKl), alpha, true);
                check(&s, bucket(Divergence::ReverseKl), alpha, true);
                check(&s, bucket(Divergence::Jsd { beta: 0.3 }), alpha, true);
            }
            for temperature in [2.0, 0.5] {
                for divergence in [Divergence::ForwardKl, Divergence::Jsd { beta: 0.3 }] {
                    check(&s, KdLoss { divergence, mode: TopKMode::Bucket, temperature }, 0.0, true);
                    check(&s, KdLoss { divergence, mode: TopKMode::Bucket, temperature }, 0.4, true);
                }
            }
            let renormalized =
                KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Renormalized, temperature: 2.0 };
            check(&s, renormalized, 0.0, true);
            check(&s, renormalized, 0.3, true);
            // Plain SFT: alpha 1, or no teacher targets at all.
            check(&s, bucket(Divergence::ForwardKl), 1.0, true);
            check(&s, bucket(Divergence::ForwardKl), 1.0, false);
        }
        // The label bucket: the label appended, padding (-inf) where it is in the top-k
        // (the first 3 positions); elsewhere an id outside it (the teacher's top-k are
        // ids 0..6, see `setup`).
        let mut s = setup(13, 13, 8, 40, 6, false);
        let outside = s.next.narrow(0, 3, 10).remainder(34) + 6;
        let labels = Tensor::cat(&[s.teacher.ids.narrow(0, 0, 3).select(1, 2), outside], 0);
        s.next = labels.copy();
        let label_lp = Tensor::full([13], -6.0, (Kind::Float, Device::Cpu)).index_fill(
            0,
            &Tensor::arange(3, (Kind::Int64, Device::Cpu)),
            f64::NEG_INFINITY,
        );
        s.teacher = TeacherTargets {
            ids: Tensor::cat(&[&s.teacher.ids, &labels.unsqueeze(1)], 1),
            logprobs: Tensor::cat(&[s.teacher.logprobs.to_kind(Kind::Float), label_lp.unsqueeze(1)], 1),
            tail_logmass: s.teacher.tail_logmass.clamp_min(-5.0),
        };
        for divergence in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.3 }] {
            check(&s, bucket(divergence), 0.0, true);
            check(&s, bucket(divergence), 0.5, true);
        }
        // k = the vocabulary: no tail at all.
        let s = setup(14, 7, 8, 12, 12, false);
        check(&s, bucket(Divergence::ForwardKl), 0.0, true);
        check(&s, bucket(Divergence::Jsd { beta: 0.5 }), 0.2, true);
    }

    /// Gemma 2's soft-capped logits: a cap of 2 on logits of spread ~3 bends most of them.
    #[test]
    fn soft_capped_logits_match_autograd_through_the_cap() {
        let s = setup(15, 11, 8, 40, 6, false);
        let z = s.hidden.mm(&s.head.tr());
        let bent = z.abs().gt(2.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!(bent > 0.2, "only {bent} of the logits exceed the cap");
        let bucket = |divergence| KdLoss { divergence, mode: TopKMode::Bucket, temperature: 1.0 };
        for alpha in [0.0, 0.5, 1.0] {
            check_capped(&s, bucket(Divergence::ForwardKl), alpha, true, Some(2.0));
            check_capped(&s, bucket(Divergence::ReverseKl), alpha, true, Some(2.0));
        }
        let tempered = KdLoss { divergence: Divergence::Jsd { beta: 0.3 }, mode: TopKMode::Bucket, temperature: 2.0 };
        check_capped(&s, tempered, 0.3, true, Some(2.0));
        let renormalized = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Renormalized, temperature: 1.0 };
        check_capped(&s, renormalized, 0.2, true, Some(2.0));
    }

    #[test]
    fn in_float64_the_fused_gradient_is_the_autograd_one() {
        let s = setup(12, 9, 8, 30, 5, false);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        for divergence in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.3 }] {
            let kd = KdLoss { divergence, mode: TopKMode::Bucket, temperature: 1.0 };
            let loss =
                HeadLoss { next_tokens: &s.next, teacher: Some(&s.teacher), kd, alpha: 0.25, logit_softcap: None };
            let fused = fused_head_loss(&d(&s.hidden), &d(&s.head), &loss, 4, 0.1).unwrap();
            let (_, gh, gw) = autograd(&d(&s.hidden), &d(&s.head), &loss, 0.1);
            assert!(rel(&fused.grad_hidden, &gh) < 1e-10, "{divergence:?}: {:e}", rel(&fused.grad_hidden, &gh));
            assert!(rel(&fused.grad_head, &gw) < 1e-10, "{divergence:?}: {:e}", rel(&fused.grad_head, &gw));
        }
    }

    #[test]
    fn the_tail_of_a_peaked_student_stays_exact() {
        let s = setup(5, 4, 8, 40, 6, true);
        let z = s.hidden.to_kind(Kind::Double).mm(&s.head.to_kind(Kind::Double).tr());
        let lp = z.log_softmax(-1, Kind::Double);
        let tail = lp.scatter_value(-1, &s.teacher.ids, f64::NEG_INFINITY).logsumexp([-1], false);
        let smallest = tail.max().double_value(&[]);
        assert!(smallest < -20.0, "the setup should leave the student a tail below e^-20, not e^{smallest}");
        check(&s, KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 }, 0.0, true);
    }
}
