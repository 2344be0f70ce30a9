//! Gradients summed over the ranks in flat buckets (as PyTorch's DDP does: one
//! collective per ~25 MiB instead of one per tensor), after the last micro-batch of a
//! step. Buckets go over the wire in float32 (exact sums up to rounding) or bfloat16
//! (half the bytes, sums rounded to bf16's 8 bits of mantissa).
use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::group::ProcessGroup;

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;
/// Buckets in flight at once: overlap without holding a second copy of all gradients.
const IN_FLIGHT: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketOptions {
    pub bytes: usize,
    /// `Kind::Float` or `Kind::BFloat16`.
    pub wire: Kind,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions { bytes: DEFAULT_BUCKET_BYTES, wire: Kind::Float }
    }
}

/// Sums every parameter's gradient over the ranks, in place. A parameter without a
/// gradient here takes part as zeros when another rank has one; one that has none on
/// any rank keeps none, so AdamW leaves it alone as a single process would. Returns the
/// number of buckets.
pub fn all_reduce_grads(group: &ProcessGroup, params: &[Tensor], opts: BucketOptions) -> Result<usize> {
    let device = params.first().map_or(group.device, Tensor::device);
    let defined: Vec<f32> = params.iter().map(|p| f32::from(u8::from(p.grad().defined()))).collect();
    let flags = Tensor::from_slice(&defined).to_device(group.device);
    group.all_reduce(std::slice::from_ref(&flags))?;
    let anywhere = Vec::<f32>::try_from(flags.to_device(tch::Device::Cpu))?;
    let mut grads = vec![];
    for (p, (&here, &anywhere)) in params.iter().zip(defined.iter().zip(&anywhere)) {
        if anywhere > 0.0 {
            if here == 0.0 {
                // tch cannot assign `.grad`; a zero-valued backward defines it as zeros.
                (p * 0.0).sum(Kind::Float).backward();
            }
            grads.push(p.grad());
        }
    }
    let _no_grad = tch::no_grad_guard();
    let element = opts.wire.elt_size_in_bytes();
    let mut buckets: Vec<Vec<Tensor>> = vec![vec![]];
    let mut filled = 0;
    for g in grads {
        let bytes = g.numel() * element;
        if filled > 0 && filled + bytes > opts.bytes {
            buckets.push(vec![]);
            filled = 0;
        }
        filled += bytes;
        buckets.last_mut().expect("one open bucket").push(g);
    }
    buckets.retain(|b| !b.is_empty());
    for group_of in buckets.chunks(IN_FLIGHT) {
        let flats: Vec<Tensor> = group_of.iter().map(|b| flatten(b, opts.wire, group.device)).collect();
        group.all_reduce(&flats)?;
        for (bucket, flat) in group_of.iter().zip(&flats) {
            unflatten_into(&flat.to_device(device), bucket);
        }
    }
    Ok(buckets.len())
}

/// `tensors` laid end to end in one flat tensor of `kind` on `device`.
fn flatten(tensors: &[Tensor], kind: Kind, device: Device) -> Tensor {
    let views: Vec<Tensor> = tensors.iter().map(|t| t.reshape([-1])).collect();
    Tensor::cat(&views, 0).to_kind(kind).to_device(device)
}

/// The inverse of `flatten`: `flat`'s values copied back into `tensors`, in place.
fn unflatten_into(flat: &Tensor, tensors: &[Tensor]) {
    let mut at = 0;
    for t in tensors {
        let n = t.numel() as i64;
        t.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(t));
        at += n;
    }
}

/// Every rank's `values` summed, element by element (float64, for loss sums and counts).
pub fn all_reduce_sum(group: &ProcessGroup, values: &[f64]) -> Result<Vec<f64>> {
    let t = Tensor::from_slice(values).to_device(group.device);
    group.all_reduce(std::slice::from_ref(&t))?;
    Ok(Vec::<f64>::try_from(t.to_device(tch::Device::Cpu))?)
}

/// Rank 0's values of `tensors` on every rank, one flat collective per bucket (the
/// start of a run: every rank begins from the same weights).
pub fn broadcast_from_first(group: &ProcessGroup, tensors: &[Tensor]) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    for chunk in tensors.chunks(64) {
        let flat = flatten(chunk, Kind::Float, group.device);
        group.broadcast(&flat, 0)?;
        unflatten_into(&flat.to_device(chunk[0].device()), chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::group::on_two_ranks;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    /// `a` has a gradient on both ranks, `b` on rank 1 only, `c` on none; buckets of
    /// one tensor each (two elements), in float32 and bfloat16.
    #[test]
    fn sums_gradients_defined_on_some_ranks() {
        on_two_ranks(|g| {
            for wire in [Kind::Float, Kind::BFloat16] {
                let (a, b, c) = (param(&[1.0, 2.0]), param(&[3.0, 4.0]), param(&[5.0]));
                let r = g.rank as f64 + 1.0;
                let loss = if g.rank == 0 { (&a * r).sum(Kind::Float) } else { (&a * r + &b * 0.5).sum(Kind::Float) };
                loss.backward();
                let params = [a.shallow_clone(), b.shallow_clone(), c.shallow_clone()];
                let bytes = 2 * wire.elt_size_in_bytes();
                let buckets = all_reduce_grads(&g, &params, BucketOptions { bytes, wire }).unwrap();
                assert_eq!(buckets, 2, "a and b, one bucket each");
                assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![3.0, 3.0]);
                assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), vec![0.5, 0.5], "rank 1's alone");
                assert!(!c.grad().defined(), "no rank had one: AdamW must leave c alone");
            }
            assert_eq!(all_reduce_sum(&g, &[g.rank as f64, 0.25]).unwrap(), vec![1.0, 0.5]);
            let w = Tensor::full([3], g.rank as f64 + 7.0, (Kind::Float, Device::Cpu));
            broadcast_from_first(&g, std::slice::from_ref(&w)).unwrap();
            assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![7.0; 3]);
        });
    }
}
