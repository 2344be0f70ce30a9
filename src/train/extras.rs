//! What the loop needs beyond KD and CE: the cross-tokenizer run's student-side targets
//! and ULD gradients, and the hidden-state projections checked against the shards.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::config::{CrossTokenizerSettings, HiddenSettings, TrainConfig};
use super::hidden::HiddenDistill;
use super::run_dir;
use crate::align::set::student_targets;
use crate::losses::uld::{head_logits, uld_per_group, UldBatch};
use crate::model::CausalLm;
use crate::shards::reader::ShardSet;

/// The teacher's targets in the student's tokens, made in `OUTPUT/student-targets` by
/// the first run and reused by later ones (in a data-parallel run rank 0 makes them and
/// the other ranks read them: `Parallel::first_makes`).
pub(super) fn student_side_set(cfg: &TrainConfig, c: &CrossTokenizerSettings) -> Result<ShardSet> {
    let dir = cfg.output.join(run_dir::STUDENT_TARGETS_DIR);
    let made = student_targets(&cfg.shards, c.teacher_tokenizer.as_deref(), &cfg.student, &dir)?;
    if let Some(s) = made.stats {
        eprintln!(
            "student-side targets in {}: {} groups ({} of one token on each side) cover {} of the teacher's {} targets; {} rows, {} tokens",
            made.dir.display(),
            s.groups,
            s.one_to_one,
            s.aligned_targets,
            s.teacher_targets,
            made.manifest.shards.iter().map(|e| e.rows).sum::<usize>(),
            made.manifest.total_tokens()
        );
    }
    ShardSet::open(&made.dir, false)
}

/// Checks the map against the shards and the student, and makes the projections.
pub(super) fn hidden_distill(
    h: &HiddenSettings,
    set: &ShardSet,
    model: &CausalLm,
    device: Device,
) -> Result<HiddenDistill> {
    let captured = &set.manifest.settings.capture.hidden_layers;
    for m in &h.maps {
        if !captured.contains(&m.teacher_layer) {
            bail!(
                "--hidden-map {}:{}: the shards hold teacher hidden states {captured:?} only",
                m.teacher_layer,
                m.student_layer
            );
        }
        if m.student_layer > model.config.num_layers {
            bail!(
                "--hidden-map {}:{}: the student has {} layers",
                m.teacher_layer,
                m.student_layer,
                model.config.num_layers
            );
        }
    }
    let widths = (set.manifest.settings.teacher.hidden_size, model.config.hidden_size);
    Ok(HiddenDistill::new(h.maps.clone(), h.weight, h.loss, widths, device))
}

/// ULD's sum over a micro-batch's groups and its gradients (times `scale`) with respect
/// to the trained positions' hidden states `[P, H]` and the head, by autograd on the
/// rows of the groups' positions: the cross-tokenizer term beside the fused head's.
pub(super) struct UldGradients {
    pub(super) sum: Tensor,
    pub(super) grad_hidden: Tensor,
    pub(super) grad_head: Tensor,
}

pub(super) fn uld_gradients(
    h: &Tensor,
    head: &Tensor,
    labels: &Tensor,
    u: &UldBatch,
    scale: f64,
    softcap: Option<f64>,
) -> UldGradients {
    let mut grad_hidden = Tensor::zeros(h.size(), (Kind::Float, h.device()));
    let mut grad_head = Tensor::zeros(head.size(), (Kind::Float, head.device()));
    let mut sum = Tensor::zeros([], (Kind::Double, h.device()));
    // Logits of at most 16M values (64 MiB) at a time.
    let vocab = head.size()[0];
    for piece in u.pieces((1 << 24) / vocab.max(1)) {
        let (rows, local) = piece.gathered();
        let h_sel = h.detach().index_select(0, &rows).to_kind(Kind::Float).set_requires_grad(true);
        let w = head.detach().to_kind(Kind::Float).set_requires_grad(true);
        let log_q = head_logits(&h_sel, &w, softcap).log_softmax(-1, Kind::Float);
        let per_group = uld_per_group(&log_q, &labels.index_select(0, &rows), &local);
        (per_group.sum(Kind::Float) * scale).backward();
        grad_hidden = grad_hidden.index_add(0, &rows, &h_sel.grad());
        grad_head += w.grad();
        sum += per_group.detach().sum(Kind::Double);
    }
    UldGradients { sum, grad_hidden, grad_head }
}
