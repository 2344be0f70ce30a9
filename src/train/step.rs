//! One micro-batch of a step: the student's forward, the chunked head with KD and CE
//! (and the cross-tokenizer ULD term), the hidden-state terms on captured layers, and
//! backward; the loss sums stay on the device until the step reads them once.
use anyhow::Result;
use std::time::Instant;
use tch::{Kind, Tensor};

use super::config::TrainConfig;
use super::extras::uld_gradients;
use super::hidden::HiddenDistill;
use crate::batch::feed::MicroBatch;
use crate::losses::fused::{fused_head_loss_into, HeadLoss};
use crate::model::backward::StepLosses;
use crate::model::logits::{chunk_positions, default_logits_budget};
use crate::model::CausalLm;

/// Loss sums over a step's micro-batches, kept on the device and read once per step
/// (a host read per chunk or micro-batch would stall the GPU).
#[derive(Default)]
pub(super) struct LossSums {
    loss: Vec<Tensor>,
    kd: Vec<Tensor>,
    ce: Vec<Tensor>,
    hidden: Vec<Tensor>,
    /// Sum over micro-batches of (their share of the step's trained tokens) x (their
    /// load-balancing loss).
    pub(super) router_balance: f64,
    /// Wall time inside the head and its losses.
    pub(super) head_time: std::time::Duration,
}

impl LossSums {
    /// (scaled total, KD sum, CE sum, hidden sum).
    pub(super) fn read(&self) -> (f64, f64, f64, f64) {
        let total = |parts: &[Tensor]| {
            if parts.is_empty() {
                0.0
            } else {
                let on_one: Vec<Tensor> = parts.iter().map(|t| t.to_device(parts[0].device())).collect();
                Tensor::stack(&on_one, 0).sum(Kind::Double).double_value(&[])
            }
        };
        (total(&self.loss), total(&self.kd), total(&self.ce), total(&self.hidden))
    }
}

/// The step's losses on the body's outputs (see `StepLosses`): the chunked head with
/// KD and CE on the final hidden states, hidden-state terms on the captured ones.
struct MicroLosses<'a> {
    model: &'a CausalLm,
    hidden: Option<&'a HiddenDistill>,
    mb: &'a MicroBatch,
    cfg: &'a TrainConfig,
    scale: f64,
    sums: &'a mut LossSums,
    /// The step's first micro-batch: gradients hold nothing of this step yet.
    fresh: bool,
}

impl StepLosses for MicroLosses<'_> {
    fn on_last(&mut self, last: &Tensor) -> Result<Tensor> {
        let (cfg, mb) = (self.cfg, self.mb);
        let width = last.size()[2];
        let h = last.reshape([-1, width]).index_select(0, &mb.batch.predicting);
        let head = self.model.transformer.lm_head_weight();
        let chunk = cfg.head_chunk.unwrap_or_else(|| {
            chunk_positions(self.model.config.vocab_size, default_logits_budget(self.model.output_device()))
        });
        let loss = HeadLoss {
            next_tokens: &mb.batch.next_tokens,
            teacher: mb.teacher.as_ref(),
            kd: cfg.kd,
            alpha: cfg.alpha,
            logit_softcap: self.model.transformer.final_softcap(),
        };
        let started = Instant::now();
        // The head's gradient goes straight into its `.grad()` when that holds nothing
        // of this step yet and is float32 (no `[V, H]` buffer and surrogate); a later
        // micro-batch's enters through autograd, which adds it as it adds each
        // micro-batch's gradient (so N micro-batches in one process sum exactly as N
        // ranks do).
        let existing = head.grad();
        let direct = self.fresh && existing.defined() && existing.kind() == Kind::Float;
        let into = if direct { existing } else { Tensor::zeros(head.size(), (Kind::Float, head.device())) };
        let mut out = fused_head_loss_into(&h.detach(), head, &loss, chunk, self.scale, into)?;
        if let Some(u) = &mb.uld {
            let weight = (1.0 - cfg.alpha) * cfg.uld_weight;
            if u.groups() > 0 && weight > 0.0 {
                let softcap = self.model.transformer.final_softcap();
                let g = uld_gradients(&h, head, &mb.batch.next_tokens, u, weight * self.scale, softcap);
                out.grad_hidden += g.grad_hidden.to_kind(out.grad_hidden.kind());
                let _ = out.grad_head.g_add_(&g.grad_head);
                self.sums.loss.push(g.sum.shallow_clone() * (weight * self.scale));
                self.sums.kd.push(g.sum);
            }
        }
        self.sums.head_time += started.elapsed();
        self.sums.loss.push(out.loss);
        self.sums.kd.push(out.kd_sum);
        self.sums.ce.push(out.ce_sum);
        // The gradients enter the graph through the surrogates sum(h * dL/dh) (the body)
        // and, unless added in place above, sum(W * dL/dW) (the head, tied or not).
        let body = (&h * out.grad_hidden).sum(Kind::Float);
        if direct {
            return Ok(body);
        }
        Ok(body + (head * out.grad_head).sum(Kind::Float))
    }

    fn fresh_gradients(&self) -> bool {
        self.fresh
    }

    /// Each micro-batch's balance loss counts by its share of the step's trained tokens,
    /// as every other term does (`scale` = 1 / the step's trained tokens).
    fn router_balance_weight(&self) -> f64 {
        self.cfg.router_aux_weight * self.mb.targets as f64 * self.scale
    }

    fn on_router_balance(&mut self, loss: f64) {
        self.sums.router_balance += loss * self.mb.targets as f64 * self.scale;
    }

    fn on_captured(&mut self, slot: usize, state: &Tensor) -> Result<Tensor> {
        let hd = self.hidden.expect("captures are requested for hidden-state distillation only");
        let (term, raw) =
            hd.slot_loss(slot, state, &self.mb.batch.predicting, &self.mb.teacher_hidden[slot], self.scale);
        self.sums.loss.push(term.detach().to_kind(Kind::Double));
        self.sums.hidden.push(raw);
        Ok(term)
    }
}

/// Forward, chunked head + losses, hidden-state terms and backward for one micro-batch.
pub(super) fn micro_step(
    model: &CausalLm,
    hidden: Option<&HiddenDistill>,
    mb: &MicroBatch,
    cfg: &TrainConfig,
    scale: f64,
    sums: &mut LossSums,
    fresh: bool,
) -> Result<()> {
    let capture = hidden.map(|h| h.student_layers()).unwrap_or_default();
    let mut losses = MicroLosses { model, hidden, mb, cfg, scale, sums, fresh };
    model.transformer.forward_backward(&mb.batch.input(), &capture, cfg.recompute, &mut losses)
}
