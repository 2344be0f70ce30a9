//! Shard rows -> what a step consumes, shared by training, evaluation and the teacher
//! pass: the row order over a shard set (`stream`), rows grouped into padded or packed
//! micro-batches built ahead on a thread (`feed`), and the padded batch tensors
//! themselves (here): ids, attention mask, per-document position ids, the documents of
//! packed rows, and the flat indices of the positions that predict a trained token.
pub mod feed;
pub mod stream;
pub mod targets;

use tch::{Device, Tensor};

use crate::dataset::sequence::Sequence;
use crate::model::packed::PackedDocuments;
use crate::model::ForwardInput;

/// Rows right-padded to the longest one, as tensors.
pub struct PaddedBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub positions: Tensor,
    /// Packed rows: their documents, laid out for per-document attention.
    pub documents: Option<PackedDocuments>,
    /// Flat index `row * width + t - 1` for every trained token t, row-major.
    pub predicting: Tensor,
    /// The token each predicting position must predict.
    pub next_tokens: Tensor,
    pub targets_per_row: Vec<usize>,
}

impl PaddedBatch {
    pub fn new(rows: &[&Sequence], device: Device) -> Self {
        Self::host(rows).to_device(device, false)
    }

    /// The batch as CPU tensors (built off the training thread, then moved).
    pub fn host(rows: &[&Sequence]) -> Self {
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
        let b = rows.len();
        let packed = rows.iter().any(|r| r.doc_lengths.len() > 1);
        let (mut ids, mut mask, mut pos) = (vec![0i64; b * width], vec![0i64; b * width], vec![0i64; b * width]);
        let (mut predicting, mut next, mut counts) = (vec![], vec![], vec![]);
        for (r, row) in rows.iter().enumerate() {
            let (base, n) = (r * width, row.ids.len());
            for (t, &id) in row.ids.iter().enumerate() {
                ids[base + t] = id as i64;
                mask[base + t] = 1;
            }
            pos[base..base + n].copy_from_slice(&row.position_ids());
            let mut count = 0;
            for t in 1..n {
                if row.loss_mask[t] {
                    predicting.push((base + t - 1) as i64);
                    next.push(row.ids[t] as i64);
                    count += 1;
                }
            }
            counts.push(count);
        }
        let shape = [b as i64, width as i64];
        let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape);
        PaddedBatch {
            ids: tensor(&ids),
            mask: tensor(&mask),
            positions: tensor(&pos),
            documents: packed.then(|| {
                let docs: Vec<Vec<u32>> = rows.iter().map(|r| r.doc_lengths.clone()).collect();
                PackedDocuments::new(&docs, width)
            }),
            predicting: Tensor::from_slice(&predicting),
            next_tokens: Tensor::from_slice(&next),
            targets_per_row: counts,
        }
    }

    /// Every tensor on `device`; `non_blocking` copies need pinned host memory to overlap.
    pub fn to_device(&self, device: Device, non_blocking: bool) -> Self {
        self.map(|t| move_tensor(t, device, non_blocking))
    }

    /// Page-locks the host tensors so that copies to `device` (CUDA) run asynchronously.
    pub fn pin(&self, device: Device) -> Self {
        self.map(|t| t.pin_memory(device))
    }

    /// `f` applied to every tensor.
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        PaddedBatch {
            ids: f(&self.ids),
            mask: f(&self.mask),
            positions: f(&self.positions),
            documents: self.documents.as_ref().map(|d| d.map(&f)),
            predicting: f(&self.predicting),
            next_tokens: f(&self.next_tokens),
            targets_per_row: self.targets_per_row.clone(),
        }
    }

    pub fn input(&self) -> ForwardInput<'_> {
        ForwardInput {
            input_ids: &self.ids,
            attention_mask: Some(&self.mask),
            position_ids: Some(&self.positions),
            documents: self.documents.as_ref(),
        }
    }
}

/// `t` on `device`: a no-op when it is there already, an asynchronous copy when
/// `non_blocking` (from pinned memory to CUDA; PyTorch keeps the host buffer alive until
/// the copy has run).
pub fn move_tensor(t: &Tensor, device: Device, non_blocking: bool) -> Tensor {
    if t.device() == device {
        t.shallow_clone()
    } else {
        t.to_device_(device, t.kind(), non_blocking, false)
    }
}
