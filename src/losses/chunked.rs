//! The head and the loss computed a chunk of positions at a time (the Liger-kernel
//! idea): for each chunk, `logits = hidden_chunk @ W^T`, the loss, and its backward pass
//! into the chunk and the head weight, so full `[positions, vocab]` float32 logits never
//! exist at once. The caller then backpropagates the returned gradient of `hidden`
//! through the body with `backward_with_grad`.
use anyhow::Result;
use std::ops::Range;
use tch::{Kind, Tensor};

/// Loss sum and gradient with respect to `hidden` `[P, H]`. `loss_fn(logits, rows)`
/// returns the per-position losses `[n]` of the chunk covering `rows`; they are summed
/// and multiplied by `scale` (e.g. 1 / global count of trained tokens) before backward.
/// The head's gradient accumulates in `head.grad()` when `head` requires grad.
pub fn chunked_head_loss(
    hidden: &Tensor,
    head: &Tensor,
    chunk: i64,
    scale: f64,
    mut loss_fn: impl FnMut(&Tensor, Range<i64>) -> Result<Tensor>,
) -> Result<(f64, Tensor)> {
    let positions = hidden.size()[0];
    // Summed on the device and read once: a host read per chunk would stall the GPU.
    let mut total = Tensor::zeros([], (Kind::Double, hidden.device()));
    let mut grads = Vec::new();
    let mut start = 0;
    while start < positions {
        let n = chunk.max(1).min(positions - start);
        let part = hidden.narrow(0, start, n).detach().set_requires_grad(true);
        // `linear`, not `matmul(head.tr())`: autocast caches its cast of a leaf weight, not of a view.
        let logits = part.linear(head, None::<Tensor>);
        let loss = loss_fn(&logits, start..start + n)?.sum(Kind::Float) * scale;
        total = total.g_add(&loss.detach().to_kind(Kind::Double));
        loss.backward();
        grads.push(part.grad());
        start += n;
    }
    let grad = if grads.is_empty() { hidden.zeros_like() } else { Tensor::cat(&grads, 0) };
    Ok((total.double_value(&[]), grad))
}

/// Backpropagates `grad` (the gradient of the loss with respect to `t`) through the graph
/// that produced `t`: tch has no `backward(gradient)`, and d/dt sum(t * grad) = grad.
pub fn backward_with_grad(t: &Tensor, grad: &Tensor) {
    (t * grad.detach()).sum(Kind::Float).backward();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::{Divergence, KdLoss, TeacherTargets, TopKMode};

    #[test]
    fn chunked_equals_unchunked_in_loss_and_gradients() {
        tch::manual_seed(7);
        let (p, h, v, k) = (13i64, 8i64, 40i64, 6i64);
        let body_out = Tensor::randn([p, h], (Kind::Float, tch::Device::Cpu));
        let teacher_logits = Tensor::randn([p, v], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let lp = teacher_logits.log_softmax(-1, Kind::Float);
        let (top, ids) = lp.topk(k, -1, true, true);
        let tail = lp.scatter_value(-1, &ids, f64::NEG_INFINITY).logsumexp([-1], false);
        let targets = TeacherTargets { ids, logprobs: top, tail_logmass: tail };
        let loss = KdLoss { divergence: Divergence::Jsd { beta: 0.3 }, mode: TopKMode::Bucket, temperature: 1.0 };
        let run = |chunk: i64| {
            // The same head weights for both runs, each with its own gradient.
            let head =
                Tensor::arange(v * h, (Kind::Float, tch::Device::Cpu)).view([v, h]).sin().set_requires_grad(true);
            let x = body_out.detach().set_requires_grad(true);
            let hidden = x.tanh(); // a stand-in for the body, so the hidden gradient is used
            let (total, dh) = chunked_head_loss(&hidden, &head, chunk, 1.0 / p as f64, |logits, rows| {
                let t = targets.map(|x| x.narrow(0, rows.start, rows.end - rows.start));
                loss.per_position(logits, &t)
            })
            .unwrap();
            backward_with_grad(&hidden, &dh);
            (total, x.grad(), head.grad())
        };
        let (l1, gx1, gw1) = run(p);
        let (l2, gx2, gw2) = run(4);
        assert!((l1 - l2).abs() < 1e-6 * l1.abs(), "{l1} vs {l2}");
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
        assert!(close(&gx2, &gx1) < 1e-5, "hidden gradients differ");
        assert!(close(&gw2, &gw1) < 1e-5, "head gradients differ");
        assert!(gx1.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
