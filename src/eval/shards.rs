//! Held-out evaluation of a model against teacher shards: mean forward KL on the
//! (k+1) buckets, mean cross-entropy per trained token, and how often the model's
//! most likely token is the teacher's; batched like training (padded or packed), the
//! head in chunks (`model::logits`), no gradients.
use anyhow::Result;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

use crate::batch::feed::{BatchContent, BatchLoader, Feed, FeedOptions, MicroBatch};
use crate::batch::stream::{RowStream, StreamOptions, StreamPosition};
use crate::batch::targets::TargetOptions;
use crate::losses::uld::{head_logits, uld_sum, UldBatch};
use crate::losses::{cross_entropy, Divergence, KdLoss, TopKMode};
use crate::model::logits::{chunk_positions, default_logits_budget};
use crate::model::CausalLm;
use crate::shards::reader::ShardSet;
use crate::shards::teachers::RowRouter;

#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub kl: f64,
    pub ce: f64,
    /// Share of trained positions where the model's argmax is the teacher's top-1.
    pub top1_agreement: f64,
    pub targets: usize,
    /// Token slots of the batches, padding included.
    pub slots: usize,
    /// Cross-tokenizer sets: mean ULD distance per aligned group (0..2; `losses::uld`).
    pub uld: Option<f64>,
    /// A set merged with `merge-teachers --route`: the same figures over the documents
    /// routed to each teacher (and over those routed to none, named `unrouted`).
    pub per_teacher: Vec<TeacherFigures>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeacherFigures {
    pub teacher: String,
    pub targets: usize,
    pub kl: f64,
    pub ce: f64,
    pub top1_agreement: f64,
}

/// Per-position sums split by the teacher each position's document was routed to.
struct RoutedSums {
    router: RowRouter,
    /// `[teachers + 1, 4]` float64: KL, CE, agreement, count; the last row is unrouted.
    sums: Tensor,
}

impl RoutedSums {
    /// The group of every target of `mb`, in predicting order.
    fn groups(&self, mb: &MicroBatch, device: Device) -> Result<Tensor> {
        let unrouted = self.router.names.len() as i64;
        let mut groups = Vec::with_capacity(mb.targets);
        for (&row, docs) in mb.row_indices.iter().zip(&mb.doc_targets) {
            for (teacher, &n) in self.router.doc_teachers(row, docs.len())?.into_iter().zip(docs) {
                groups.extend(std::iter::repeat_n(teacher.map_or(unrouted, |t| t as i64), n));
            }
        }
        Ok(Tensor::from_slice(&groups).to_device(device))
    }

    fn figures(&self) -> Result<Vec<TeacherFigures>> {
        let sums = Vec::<f64>::try_from(self.sums.to_device(Device::Cpu).reshape([-1]))?;
        let names = self.router.names.iter().map(String::as_str).chain(["unrouted"]);
        Ok(names
            .zip(sums.chunks(4))
            .filter(|(_, s)| s[3] > 0.0)
            .map(|(name, s)| TeacherFigures {
                teacher: name.to_string(),
                targets: s[3] as usize,
                kl: s[0] / s[3],
                ce: s[1] / s[3],
                top1_agreement: s[2] / s[3],
            })
            .collect())
    }
}

/// Every row of `set` once, batched by `batching` (padded or packed: the results agree).
pub fn evaluate(model: &CausalLm, set: Arc<ShardSet>, device: Device, batching: FeedOptions) -> Result<EvalResult> {
    let _guard = tch::no_grad_guard();
    if set.manifest.settings.capture.top_k == 0 {
        anyhow::bail!(
            "{}: these shards hold draws but no top-k ids; evaluate against a shard set with top-k targets",
            set.dir.display()
        );
    }
    let kd = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 };
    let cross = set.manifest.settings.capture.cross_tokenizer.is_some();
    let mut routed = RowRouter::open(&set)?.map(|router| {
        let sums = Tensor::zeros([router.names.len() as i64 + 1, 4], (Kind::Double, device));
        RoutedSums { router, sums }
    });
    let stream = RowStream::new(
        set,
        StreamOptions { seed: 0, window: 8, prefetch: 2, epochs: Some(1), shuffle: true },
        StreamPosition::default(),
    );
    let feed = Feed::new(stream, batching);
    // The plain (k+1) buckets: one measure for students trained on any kind of targets.
    let content = BatchContent {
        teacher: Some(TargetOptions { label_bucket: false, use_draws: false }),
        hidden_layers: vec![],
        uld: cross,
    };
    let loader = BatchLoader::new(feed, content, device, 2);
    let chunk = chunk_positions(model.config.vocab_size, default_logits_budget(device));
    let sum = |t: Tensor| t.sum(Kind::Double);
    let zero = || Tensor::zeros([], (Kind::Double, device));
    let (mut kl, mut ce, mut agree, mut n) = (zero(), zero(), zero(), 0usize);
    let (mut uld, mut groups) = (zero(), 0i64);
    let mut slots = 0;
    while let Some(mb) = loader.next()? {
        let mb = mb.to_device(device, device.is_cuda());
        let hidden = model.transformer.forward_hidden(&mb.batch.input(), &[])?.last;
        let width = hidden.size()[2];
        let h = hidden.reshape([-1, width]).index_select(0, &mb.batch.predicting);
        let teacher = mb.teacher.as_ref().expect("requested above");
        let route_groups = routed.as_ref().map(|r| r.groups(&mb, device)).transpose()?;
        model.transformer.logits_in_chunks(&h, chunk, |logits, r| {
            let part = |t: &Tensor| t.narrow(0, r.start, r.end - r.start);
            let targets = teacher.map(part);
            let kl_each = kd.per_position(logits, &targets)?.to_kind(Kind::Double);
            let ce_each = cross_entropy(logits, &part(&mb.batch.next_tokens)).to_kind(Kind::Double);
            let top1 = targets.ids.select(1, 0);
            let agree_each = logits.argmax(-1, false).eq_tensor(&top1).to_kind(Kind::Double);
            if let (Some(routed), Some(route_groups)) = (routed.as_mut(), route_groups.as_ref()) {
                let each = Tensor::stack(&[&kl_each, &ce_each, &agree_each, &kl_each.ones_like()], 1);
                let _ = routed.sums.index_add_(0, &part(route_groups), &each);
            }
            kl += sum(kl_each);
            ce += sum(ce_each);
            agree += sum(agree_each);
            Ok(())
        })?;
        if let Some(u) = mb.uld.as_ref().filter(|u| u.groups() > 0) {
            uld += uld_of_groups(model, &h, &mb.batch.next_tokens, u);
            groups += u.groups();
        }
        n += mb.targets;
        slots += mb.batch.ids.numel();
    }
    if n == 0 {
        anyhow::bail!("the shard set holds no trained position to evaluate");
    }
    let d = n as f64;
    let read = |t: &Tensor| t.double_value(&[]) / d;
    let uld = (cross && groups > 0).then(|| uld.double_value(&[]) / groups as f64);
    let per_teacher = routed.map(|r| r.figures()).transpose()?.unwrap_or_default();
    Ok(EvalResult { kl: read(&kl), ce: read(&ce), top1_agreement: read(&agree), targets: n, slots, uld, per_teacher })
}

/// ULD summed over a micro-batch's groups: the head on the groups' positions only,
/// logits of at most 16M values at a time.
fn uld_of_groups(model: &CausalLm, h: &Tensor, labels: &Tensor, u: &UldBatch) -> Tensor {
    let t = &model.transformer;
    let vocab = t.lm_head_weight().size()[0];
    let mut sum = Tensor::zeros([], (Kind::Double, h.device()));
    for piece in u.pieces((1 << 24) / vocab.max(1)) {
        let (rows, local) = piece.gathered();
        let logits = head_logits(&h.index_select(0, &rows), t.lm_head_weight(), t.final_softcap());
        sum += uld_sum(&logits.log_softmax(-1, Kind::Float), &labels.index_select(0, &rows), &local);
    }
    sum
}
