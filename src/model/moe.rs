//! Mixture-of-experts feed-forward blocks (Qwen2-MoE, Qwen3-MoE, Mixtral), as in
//! transformers' modeling files: a router's softmax over all experts in float32, the
//! top-k experts per token (renormalised where the config says so), each expert a gated
//! SiLU MLP, outputs weighted and summed; Qwen2-MoE adds a shared expert scaled by
//! sigmoid(its gate).
//!
//! Dispatch is by expert: the (token, choice) pairs are sorted by expert once, the
//! tokens gathered in that order, and each expert that has tokens multiplies its
//! contiguous run: one matmul per expert and projection, never a dense pass of every
//! expert over every token. One `index_add` puts the weighted outputs back in token
//! order (in ascending expert order per token, the order transformers adds them in).
//! The counts per expert come to the host once per layer (one sync, as transformers'
//! own dispatch has).
use anyhow::Result;
use std::cell::RefCell;
use tch::{Kind, Tensor};

use super::config::{Family, ModelConfig, MoeConfig};
use super::layers::{linear, Mlp, RmsNorm};
use super::weights::{Init, VarBuilder};

/// A layer's feed-forward block: dense, or experts.
#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    /// The block of layer `index`, under the family's names (`mlp`, Mixtral's
    /// `block_sparse_moe`).
    pub fn new(layer: &VarBuilder, cfg: &ModelConfig, index: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        match &cfg.moe {
            Some(moe) if moe.sparse_layers[index] => Ok(FeedForward::Sparse(SparseMoe::new(layer, cfg, moe)?)),
            _ => Ok(FeedForward::Dense(Mlp::new(
                &layer.pp("mlp"),
                h,
                cfg.intermediate_size,
                cfg.mlp_bias,
                cfg.activation,
                MLP_NAMES,
            )?)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Sparse(moe) => moe.forward(x),
        }
    }

    /// `forward(norm.forward(x))`; a dense MLP takes both in one fused function.
    pub fn forward_normed(&self, norm: &RmsNorm, x: &Tensor) -> Tensor {
        match self {
            FeedForward::Dense(mlp) => mlp.forward_normed(norm, x),
            FeedForward::Sparse(moe) => moe.forward(&norm.forward(x)),
        }
    }
}

/// Names of an MLP's gate, up and down projections.
pub const MLP_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// Mixtral's expert names: w1 = gate, w3 = up, w2 = down.
const MIXTRAL_NAMES: [&str; 3] = ["w1", "w3", "w2"];

#[derive(Debug)]
pub struct SparseMoe {
    /// `[experts, hidden]`.
    router: Tensor,
    experts: Vec<Mlp>,
    /// Qwen2-MoE: the shared expert and its `[1, hidden]` gate.
    shared: Option<(Mlp, Tensor)>,
    top_k: i64,
    norm_topk_prob: bool,
    /// transformers' Qwen casts the routing weights to the model's dtype before the
    /// product; Mixtral keeps them in float32.
    weights_in_model_dtype: bool,
    /// The router's decisions of each forward while recording (the load-balancing loss,
    /// expert usage).
    record: RefCell<Option<Vec<RouterRecord>>>,
}

impl SparseMoe {
    fn new(layer: &VarBuilder, cfg: &ModelConfig, moe: &MoeConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let (block, names) = match cfg.family {
            Family::Mixtral => (layer.pp("block_sparse_moe"), MIXTRAL_NAMES),
            _ => (layer.pp("mlp"), MLP_NAMES),
        };
        let router = block.pp("gate").get("weight", &[moe.num_experts as i64, h as i64], Init::Normal)?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                Mlp::new(&block.pp("experts").pp(e), h, moe.expert_intermediate_size, false, cfg.activation, names)
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match moe.shared_expert_intermediate_size {
            Some(width) => Some((
                Mlp::new(&block.pp("shared_expert"), h, width, false, cfg.activation, MLP_NAMES)?,
                block.pp("shared_expert_gate").get("weight", &[1, h as i64], Init::Normal)?,
            )),
            None => None,
        };
        Ok(SparseMoe {
            router,
            experts,
            shared,
            top_k: moe.experts_per_token as i64,
            norm_topk_prob: moe.norm_topk_prob,
            weights_in_model_dtype: cfg.family != Family::Mixtral,
            record: RefCell::new(None),
        })
    }

    /// The experts chosen for each token, `[tokens, k]` int64, and their weights
    /// `[tokens, k]`; also the router's logits `[tokens, experts]` (the load-balancing
    /// loss reads them).
    pub fn route(&self, flat: &Tensor) -> Routing {
        let logits = linear(flat, &self.router, None);
        let probs = logits.softmax(-1, Kind::Float);
        let (top, chosen) = probs.topk(self.top_k, -1, true, true);
        let top = if self.norm_topk_prob { &top / top.sum_dim_intlist(-1, true, Kind::Float) } else { top };
        let weights = if self.weights_in_model_dtype { top.to_kind(logits.kind()) } else { top };
        if let Some(record) = self.record.borrow_mut().as_mut() {
            record.push(RouterRecord { probs: probs.shallow_clone(), chosen: chosen.shallow_clone() });
        }
        Routing { logits, chosen, weights }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let h = *size.last().expect("[.., hidden]");
        let flat = x.reshape([-1, h]);
        let Routing { chosen, weights, .. } = self.route(&flat);
        let routed = self.dispatch(&flat, &chosen, &weights);
        let out = match &self.shared {
            Some((shared, gate)) => routed + linear(&flat, gate, None).sigmoid() * shared.forward(&flat),
            None => routed,
        };
        out.view(size.as_slice())
    }

    /// The experts' weighted outputs summed per token, `[tokens, hidden]`.
    fn dispatch(&self, flat: &Tensor, chosen: &Tensor, weights: &Tensor) -> Tensor {
        let pairs = chosen.reshape([-1]);
        // Stable, so each expert's tokens stay in token order.
        let (_, order) = pairs.sort_stable(true, 0, false);
        let counts =
            Vec::<i64>::try_from(pairs.bincount(None::<Tensor>, self.experts.len() as i64)).expect("int64 counts");
        let tokens = order.floor_divide_scalar(self.top_k);
        let gathered = flat.index_select(0, &tokens);
        let mut outputs = Vec::with_capacity(self.experts.len());
        let mut start = 0;
        for (expert, &count) in self.experts.iter().zip(&counts) {
            if count > 0 {
                outputs.push(expert.forward(&gathered.narrow(0, start, count)));
                start += count;
            }
        }
        let weighted = Tensor::cat(&outputs, 0) * weights.reshape([-1]).index_select(0, &order).unsqueeze(1);
        flat.zeros_like().index_add(0, &tokens, &weighted.to_kind(flat.kind()))
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }
}

/// A router's decision on one forward's tokens: the softmax over every expert
/// `[tokens, experts]` (float32, with its graph) and the chosen experts `[tokens, k]`.
#[derive(Debug)]
pub struct RouterRecord {
    pub probs: Tensor,
    pub chosen: Tensor,
}

/// The Switch Transformer load-balancing loss as transformers computes it
/// (`load_balancing_loss_func`, over every layer's router at once, padding excluded):
/// `E * sum_e f_e * P_e`, with `f_e` the share of (token, choice) pairs routed to expert
/// e (per token and layer; the shares sum to k) and `P_e` the mean router probability
/// of e. Only `P` carries a gradient, so given `f` (counted over every layer first) the
/// loss is a sum of per-layer terms `E / rows * sum_t mask_t p_te f_e`: a layer
/// recomputed during backward (`--recompute`) adds its own term.
pub struct RouterBalance {
    fractions: Tensor,
    scale: f64,
}

impl RouterBalance {
    /// From every layer's records of one forward; `mask` `[tokens]` float32 (1 = real
    /// token). None when no layer routed a real token.
    pub fn new<'a>(records: impl IntoIterator<Item = &'a RouterRecord>, mask: &Tensor) -> Option<Self> {
        let mut records = records.into_iter().peekable();
        let first = records.peek()?;
        let (experts, k) = (first.probs.size()[1], first.chosen.size()[1]);
        let mut counts = Tensor::zeros([experts], (Kind::Float, mask.device()));
        let mut layers = 0;
        for r in records {
            let m = mask.to_device(r.chosen.device()).repeat_interleave_self_int(k, 0, None);
            let c = Tensor::zeros([experts], (Kind::Float, m.device())).scatter_add(0, &r.chosen.reshape([-1]), &m);
            counts += c.to_device(mask.device());
            layers += 1;
        }
        let rows = mask.sum(Kind::Double).double_value(&[]) * layers as f64;
        (rows > 0.0).then(|| RouterBalance { fractions: counts / rows, scale: experts as f64 / rows })
    }

    /// One layer's term (with the graph of its probabilities).
    pub fn term(&self, record: &RouterRecord, mask: &Tensor) -> Tensor {
        let device = record.probs.device();
        let per_expert = (&record.probs * mask.to_device(device).unsqueeze(1)).sum_dim_intlist(0, false, Kind::Float);
        (per_expert * self.fractions.to_device(device)).sum(Kind::Float) * self.scale
    }
}

/// What the router decided for a batch of tokens.
pub struct Routing {
    pub logits: Tensor,
    pub chosen: Tensor,
    pub weights: Tensor,
}

impl super::Transformer {
    /// Whether any layer routes tokens to experts.
    pub fn has_experts(&self) -> bool {
        self.layers.iter().any(|l| matches!(l.mlp, FeedForward::Sparse(_)))
    }

    /// Starts (or stops) recording every router's decisions; `take_routing` hands them over.
    pub fn record_routing(&self, on: bool) {
        for l in &self.layers {
            if let FeedForward::Sparse(moe) = &l.mlp {
                *moe.record.borrow_mut() = on.then(Vec::new);
            }
        }
    }

    /// The decisions recorded since the last call, in layer order.
    pub fn take_routing(&self) -> Vec<RouterRecord> {
        let mut out = vec![];
        for l in &self.layers {
            if let FeedForward::Sparse(moe) = &l.mlp {
                if let Some(record) = moe.record.borrow_mut().as_mut() {
                    out.append(record);
                }
            }
        }
        out
    }

    /// How often each layer's router chose each expert over `rows` (token ids, each run
    /// alone, so no padding is counted): per layer, the count per expert, or None for a
    /// dense layer.
    pub fn expert_usage(&self, rows: &[Vec<i64>]) -> Result<Vec<Option<Vec<i64>>>> {
        let mut usage: Vec<Option<Vec<i64>>> = self
            .layers
            .iter()
            .map(|l| match &l.mlp {
                FeedForward::Sparse(moe) => Some(vec![0; moe.num_experts()]),
                FeedForward::Dense(_) => None,
            })
            .collect();
        let device = self.embed_device();
        self.record_routing(true);
        let run = tch::no_grad(|| -> Result<()> {
            for row in rows.iter().filter(|r| !r.is_empty()) {
                let ids = Tensor::from_slice(row).unsqueeze(0).to_device(device);
                self.forward_hidden(&super::ForwardInput::new(&ids, None), &[])?;
                // One record per layer with experts, in layer order.
                for (counts, record) in usage.iter_mut().flatten().zip(self.take_routing()) {
                    let n = counts.len() as i64;
                    let row = Vec::<i64>::try_from(record.chosen.reshape([-1]).bincount(None::<Tensor>, n))?;
                    counts.iter_mut().zip(row).for_each(|(c, r)| *c += r);
                }
            }
            Ok(())
        });
        self.record_routing(false);
        run.map(|()| usage)
    }
}
