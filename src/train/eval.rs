//! Held-out evaluation of a student against teacher shards: mean forward KL on the
//! (k+1) buckets and mean cross-entropy per trained token, in shard order, no gradients.
use anyhow::Result;
use tch::{Device, Kind};

use super::trainer::teacher_targets;
use crate::batch::{PaddedBatch, RowTokens};
use crate::losses::{cross_entropy, Divergence, KdLoss, TopKMode};
use crate::model::CausalLm;
use crate::shards::reader::ShardSet;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub kl: f64,
    pub ce: f64,
    pub targets: usize,
}

pub fn evaluate(model: &CausalLm, set: &ShardSet, device: Device) -> Result<EvalResult> {
    let _guard = tch::no_grad_guard();
    let kd = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 };
    let (mut kl, mut ce, mut n) = (0f64, 0f64, 0usize);
    for &rg in set.row_groups() {
        for row in set.decode(rg)? {
            let rows = [row];
            let tokens = [RowTokens {
                ids: &rows[0].input_ids,
                loss_mask: &rows[0].loss_mask,
                doc_lengths: &rows[0].doc_lengths,
            }];
            let batch = PaddedBatch::new(&tokens, device);
            let hidden = model.transformer.forward_hidden(&batch.input(), &[])?.last;
            let width = hidden.size()[2];
            let h = hidden.reshape([-1, width]).index_select(0, &batch.predicting);
            let logits = model.transformer.logits(&h);
            kl += kd.per_position(&logits, &teacher_targets(&rows, device))?.sum(Kind::Double).double_value(&[]);
            ce += cross_entropy(&logits, &batch.next_tokens).sum(Kind::Double).double_value(&[]);
            n += rows[0].tail_logmass.len();
        }
    }
    let d = n.max(1) as f64;
    Ok(EvalResult { kl: kl / d, ce: ce / d, targets: n })
}
