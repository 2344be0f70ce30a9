//! ZeRO-1 (Rajbhandari et al. 2020, stage 1): the parameters laid end to end are cut
//! into one equal range per rank; each rank keeps AdamW moments for its range only and
//! updates only it, then the updated ranges are all-gathered so every rank again holds
//! all the weights. Moments are 8 bytes per parameter (two float32), so a rank saves
//! 8 P (1 - 1/N) bytes; the gather goes in slabs, so it holds at most N slabs extra.
use anyhow::Result;
use std::ops::Range;
use tch::{Kind, Tensor};

use super::group::ProcessGroup;

/// Elements per rank in one all-gather (4 MiB of float32 each).
pub const SLAB: i64 = 1 << 20;

/// The parameters laid end to end, and each rank's range of them.
#[derive(Debug, Clone)]
pub struct Partition {
    /// Where each parameter starts in the flat order, and its length.
    starts: Vec<i64>,
    numels: Vec<i64>,
    total: i64,
    /// Elements per rank (the last range may be shorter).
    chunk: i64,
    world: usize,
}

impl Partition {
    pub fn new(numels: &[i64], world: usize) -> Self {
        let mut starts = vec![];
        let mut total = 0;
        for &n in numels {
            starts.push(total);
            total += n;
        }
        let chunk = (total + world as i64 - 1) / world as i64;
        Partition { starts, numels: numels.to_vec(), total, chunk, world }
    }

    pub fn owned(&self, rank: usize) -> Range<i64> {
        let start = (rank as i64 * self.chunk).min(self.total);
        start..(start + self.chunk).min(self.total)
    }

    /// The pieces of `range` by parameter: (parameter, offset in it, offset in `range`, length).
    pub fn pieces(&self, range: Range<i64>) -> Vec<(usize, i64, i64, i64)> {
        let mut out = vec![];
        for (i, (&start, &n)) in self.starts.iter().zip(&self.numels).enumerate() {
            let (from, to) = (range.start.max(start), range.end.min(start + n));
            if from < to {
                out.push((i, from - start, from - range.start, to - from));
            }
        }
        out
    }

    /// Every rank's `own` values (its range, `owned(rank).len()` elements, float32)
    /// gathered slab by slab; `write(range, values)` receives each slab of the flat
    /// order as it arrives (on every rank), ranks in order.
    pub fn all_gather(
        &self,
        group: &ProcessGroup,
        own: &Tensor,
        mut write: impl FnMut(Range<i64>, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let own = own.to_kind(Kind::Float).to_device(group.device);
        let own_len = own.numel() as i64;
        let mut at = 0;
        while at < self.chunk {
            let len = SLAB.min(self.chunk - at);
            let mine = Tensor::zeros([len], (Kind::Float, group.device));
            let real = (own_len - at).clamp(0, len);
            if real > 0 {
                mine.narrow(0, 0, real).copy_(&own.narrow(0, at, real));
            }
            let outputs: Vec<Tensor> =
                (0..self.world).map(|_| Tensor::zeros([len], (Kind::Float, group.device))).collect();
            group.all_gather(&mine, &outputs)?;
            for (rank, values) in outputs.iter().enumerate() {
                let range = self.owned(rank);
                let from = range.start + at;
                let to = (from + len).min(range.end);
                if from < to {
                    write(from..to, &values.narrow(0, 0, to - from))?;
                }
            }
            at += len;
        }
        Ok(())
    }
}

/// Copies the flat `range`'s `values` into the parameters it covers.
pub fn write_into(partition: &Partition, params: &[Tensor], range: Range<i64>, values: &Tensor) {
    let _no_grad = tch::no_grad_guard();
    for (i, offset, at, len) in partition.pieces(range) {
        let values = values.narrow(0, at, len).to_device(params[i].device()).to_kind(params[i].kind());
        params[i].view([-1]).narrow(0, offset, len).copy_(&values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_parameters_once() {
        let numels = [5i64, 3, 8];
        let p = Partition::new(&numels, 3);
        assert_eq!((p.owned(0), p.owned(1), p.owned(2)), (0..6, 6..12, 12..16));
        assert_eq!(p.pieces(p.owned(0)), vec![(0, 0, 0, 5), (1, 0, 5, 1)]);
        assert_eq!(p.pieces(p.owned(1)), vec![(1, 1, 0, 2), (2, 0, 2, 4)]);
        assert_eq!(p.pieces(p.owned(2)), vec![(2, 4, 0, 4)]);
        let tiny = Partition::new(&[1], 4);
        assert_eq!((tiny.owned(0), tiny.owned(3)), (0..1, 1..1), "more ranks than elements");
    }

    /// Each rank's range, gathered in slabs smaller than a range, lands in every rank's
    /// parameters (SLAB is large; a 3-element slab is forced through `chunk`).
    #[test]
    fn gathered_ranges_rebuild_every_parameter() {
        crate::distributed::group::on_two_ranks(|g| {
            let params = [
                Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)),
                Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)),
            ];
            let numels = [6i64, 5];
            let p = Partition::new(&numels, 2);
            let owned = p.owned(g.rank);
            let own = Tensor::arange_start(owned.start, owned.end, (Kind::Float, tch::Device::Cpu));
            let mut seen = vec![];
            p.all_gather(&g, &own, |range, values| {
                seen.push(range.clone());
                write_into(&p, &params, range, values);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, vec![0..6, 6..11]);
            let all: Vec<f32> = params.iter().flat_map(|t| Vec::<f32>::try_from(t.reshape([-1])).unwrap()).collect();
            assert_eq!(all, (0..11).map(|i| i as f32).collect::<Vec<_>>());
        });
    }
}
