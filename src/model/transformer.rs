//! The decoder-only transformer shared by every family: embeddings, decoder layers
//! (attention in `attention.rs`, MLP or experts in `layers.rs` / `moe.rs`), final norm
//! and a tied or untied head. Gemma's extras are switches here: scaled embeddings, norms
//! around the attention and the MLP, a RoPE per layer type and soft-capped logits.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::attention::{Attention, AttentionMask, DocumentMask};
use super::config::ModelConfig;
use super::decode::LayerKv;
use super::layers::{linear, soft_cap, RmsNorm};
use super::moe::FeedForward;
use super::packed::PackedDocuments;
use super::rope::RotaryEmbedding;
use super::weights::{Init, VarBuilder};

#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Gemma: the norm of the attention's output (`post_attention_layernorm`).
    attn_out_norm: Option<RmsNorm>,
    /// The norm before the MLP: `post_attention_layernorm` (Llama and kin) or
    /// `pre_feedforward_layernorm` (Gemma).
    mlp_in_norm: RmsNorm,
    /// Gemma: the norm of the MLP's output (`post_feedforward_layernorm`).
    mlp_out_norm: Option<RmsNorm>,
    pub(super) mlp: FeedForward,
    pub sliding_window: Option<usize>,
    /// Which of the model's rotary tables this layer uses (Gemma 3: per layer type).
    pub(super) rope: usize,
}

impl DecoderLayer {
    pub fn new(vb: &VarBuilder, cfg: &ModelConfig, index: usize) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(&vb.pp(name), cfg.hidden_size, cfg);
        let sliding_window = cfg.sliding_windows[index];
        let (attn_out_norm, mlp_in_norm, mlp_out_norm) = if cfg.sandwich_norms {
            (
                Some(norm("post_attention_layernorm")?),
                norm("pre_feedforward_layernorm")?,
                Some(norm("post_feedforward_layernorm")?),
            )
        } else {
            (None, norm("post_attention_layernorm")?, None)
        };
        Ok(DecoderLayer {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(&vb.pp("self_attn"), cfg)?,
            attn_out_norm,
            mlp_in_norm,
            mlp_out_norm,
            mlp: FeedForward::new(vb, cfg, index)?,
            sliding_window,
            rope: usize::from(sliding_window.is_some() && cfg.sliding_rope.is_some()),
        })
    }

    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttentionMask) -> Tensor {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask);
        self.after_attention(x, attn)
    }

    /// `forward` with a key/value cache (see `Attention::forward_cached`).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut Option<LayerKv>,
    ) -> Tensor {
        let attn = self.self_attn.forward_cached(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        self.after_attention(x, attn)
    }

    /// The residual adds and the MLP, given the attention's output.
    fn after_attention(&self, x: &Tensor, attn: Tensor) -> Tensor {
        let normed = |norm: &Option<RmsNorm>, t: Tensor| match norm {
            Some(n) => n.forward(&t),
            None => t,
        };
        let h = x + normed(&self.attn_out_norm, attn);
        let out = self.mlp.forward_normed(&self.mlp_in_norm, &h);
        &h + normed(&self.mlp_out_norm, out)
    }
}

/// The transformer body and head, without the VarStore that owns the parameters.
#[derive(Debug)]
pub struct Transformer {
    embed_tokens: Tensor,
    pub(super) layers: Vec<DecoderLayer>,
    /// Device of each layer; more than one device when the model is split by layers.
    pub(super) layer_devices: Vec<Device>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// Rotary tables: [all layers] or, with a RoPE per layer type, [full, sliding].
    pub(super) rotary: Vec<RotaryEmbedding>,
    /// Gemma: embeddings times sqrt(hidden) (a scalar in the weights' dtype, as
    /// transformers rounds it), and `cap * tanh(logits / cap)` (Gemma 2).
    embed_scale: Option<Tensor>,
    final_softcap: Option<f64>,
}

/// The inputs of one forward pass; see `Transformer::forward_hidden`.
#[derive(Clone, Copy)]
pub struct ForwardInput<'a> {
    pub input_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub position_ids: Option<&'a Tensor>,
    /// Packed rows: their documents (attention stays within each).
    pub documents: Option<&'a PackedDocuments>,
}

impl<'a> ForwardInput<'a> {
    pub fn new(input_ids: &'a Tensor, attention_mask: Option<&'a Tensor>) -> Self {
        ForwardInput { input_ids, attention_mask, position_ids: None, documents: None }
    }
}

/// What one forward pass returns. `hidden_states[i]` is the hidden state numbered
/// `capture[i]` in transformers' numbering: 0 = embeddings, l = output of layer l,
/// and num_layers = the final (normed) hidden state.
pub struct Hidden {
    pub last: Tensor,
    pub captured: Vec<Tensor>,
}

/// The hidden states a pass was asked for, filled as the pass reaches them.
pub(super) struct Captures<'a> {
    wanted: &'a [usize],
    states: Vec<Option<Tensor>>,
}

impl<'a> Captures<'a> {
    pub(super) fn new(wanted: &'a [usize]) -> Self {
        Captures { wanted, states: wanted.iter().map(|_| None).collect() }
    }

    /// Hidden state `index` (transformers' numbering), made by `state` only if wanted.
    pub(super) fn keep(&mut self, index: usize, state: impl Fn() -> Tensor) {
        for (slot, &want) in self.states.iter_mut().zip(self.wanted) {
            if want == index {
                *slot = Some(state());
            }
        }
    }

    pub(super) fn into_states(self) -> Vec<Tensor> {
        self.states.into_iter().map(|t| t.expect("every capture index is filled")).collect()
    }
}

impl Transformer {
    /// Builds the model on `devices`: one device, or several to split the layers in
    /// contiguous, equal runs (embeddings on the first, final norm and head on the last).
    pub fn new(vb: &VarBuilder, cfg: &ModelConfig, devices: &[Device]) -> Result<Self> {
        let (first, last) = (devices[0], devices[devices.len() - 1]);
        let body = vb.pp("model");
        let embed_tokens = body.on(first).pp("embed_tokens").get(
            "weight",
            &[cfg.vocab_size as i64, cfg.hidden_size as i64],
            Init::Normal,
        )?;
        let layer_devices: Vec<Device> =
            (0..cfg.num_layers).map(|i| devices[i * devices.len() / cfg.num_layers]).collect();
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::new(&body.on(layer_devices[i]).pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&body.on(last).pp("norm"), cfg.hidden_size, cfg)?;
        let lm_head = match (cfg.tie_word_embeddings, first == last) {
            (true, true) => embed_tokens.shallow_clone(),
            // A split, tied model keeps a copy of the embeddings next to the head.
            (true, false) => embed_tokens.detach().to_device(last),
            (false, _) => vb.on(last).pp("lm_head").get(
                "weight",
                &[cfg.vocab_size as i64, cfg.hidden_size as i64],
                Init::Normal,
            )?,
        };
        let mut rotary = vec![RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, first)];
        if let Some((theta, scaling)) = &cfg.sliding_rope {
            rotary.push(RotaryEmbedding::new(cfg.head_dim, *theta, scaling, first));
        }
        let embed_scale = cfg.embed_scale.map(|s| Tensor::from(s).to_kind(embed_tokens.kind()).to_device(first));
        Ok(Transformer {
            embed_tokens,
            layers,
            layer_devices,
            norm,
            lm_head,
            rotary,
            embed_scale,
            final_softcap: cfg.final_softcap,
        })
    }

    /// Where inputs go (the embeddings' device).
    pub fn embed_device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Where outputs (final hidden states, logits) live.
    pub fn output_device(&self) -> Device {
        self.lm_head.device()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs the body. `input_ids` `[batch, seq]` int64; `attention_mask` `[batch, seq]`
    /// (1 = token, 0 = padding, either side); `position_ids` default to the count of
    /// real tokens before each position, so padding does not shift positions;
    /// `documents` (packed rows) keep attention within each document, at the cost of
    /// the documents' squares (see `packed.rs`).
    pub fn forward_hidden(&self, input: &ForwardInput, capture: &[usize]) -> Result<Hidden> {
        self.forward_from(self.embed(input.input_ids), input, capture)
    }

    /// `forward_hidden` from `x`, the embeddings' output for `input` (a leaf that
    /// collects their gradient in a training step: see `embed_backward`).
    pub(super) fn forward_from(&self, mut x: Tensor, input: &ForwardInput, capture: &[usize]) -> Result<Hidden> {
        let n = self.check_capture(capture)?;
        let mut ctx = self.layer_context(input, x.kind())?;
        let mut captured = Captures::new(capture);
        captured.keep(0, || x.shallow_clone());
        for i in 0..n {
            x = self.layer_forward(i, &x, &mut ctx);
            if i + 1 < n {
                captured.keep(i + 1, || x.shallow_clone());
            }
        }
        let last = self.final_norm(&x);
        captured.keep(n, || last.shallow_clone());
        Ok(Hidden { captured: captured.into_states(), last })
    }

    /// The number of layers, after checking that every hidden state in `capture` exists.
    pub fn check_capture(&self, capture: &[usize]) -> Result<usize> {
        let n = self.layers.len();
        if let Some(&bad) = capture.iter().find(|&&i| i > n) {
            bail!("hidden state {bad} requested but the model has {n} layers (valid: 0..={n})");
        }
        Ok(n)
    }

    pub(super) fn embed(&self, input_ids: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        match &self.embed_scale {
            Some(scale) => x * scale,
            None => x,
        }
    }

    /// The embeddings' output for `input_ids` without a graph to the embedding matrix:
    /// a leaf whose gradient `embed_backward` takes to the matrix.
    pub(super) fn embed_leaf(&self, input_ids: &Tensor) -> Tensor {
        tch::no_grad(|| self.embed(input_ids)).set_requires_grad(true)
    }

    /// Whether a training pass may take the embedding matrix's gradient in place
    /// (`embed_leaf` + `embed_backward`): the matrix has a gradient and it holds nothing
    /// of this step yet (`fresh`). Later micro-batches of a step go through autograd, so
    /// that their sums are autograd's, bit for bit (N micro-batches in one process then
    /// sum exactly as N ranks do).
    pub(super) fn embeds_in_place(&self, fresh: bool) -> bool {
        fresh && self.embed_tokens.grad().defined()
    }

    /// Adds `grad` (of the embeddings' output `[.., hidden]` for `input_ids`) into the
    /// embedding matrix's gradient in place: no `[vocab, hidden]` temporary as
    /// autograd's dense embedding backward makes (a 262k vocabulary's is as large as the
    /// matrix). The rows of each id are summed first in token order, over the batch's
    /// distinct ids only, then added: the dense backward's sums, bit for bit.
    pub(super) fn embed_backward(&self, input_ids: &Tensor, grad: &Tensor) {
        let _guard = tch::no_grad_guard();
        let mut target = self.embed_tokens.grad();
        let width = self.embed_tokens.size()[1];
        let mut rows = grad.to_device(self.embed_device()).reshape([-1, width]);
        if let Some(scale) = &self.embed_scale {
            rows = rows * scale;
        }
        let rows = rows.to_kind(target.kind());
        let (distinct, slot, _) = input_ids.reshape([-1]).unique_dim(0, true, true, false);
        let summed =
            Tensor::zeros([distinct.size()[0], width], (rows.kind(), rows.device())).index_add(0, &slot, &rows);
        let _ = target.index_add_(0, &distinct, &summed);
    }

    /// Gives the embedding matrix and the head a zero gradient before the first step,
    /// so that every step adds into them in place (`embed_backward`, the fused head's
    /// loss) rather than through `[vocab, hidden]` temporaries.
    pub fn define_vocab_grads(&self) {
        for w in [&self.embed_tokens, &self.lm_head] {
            if w.requires_grad() && !w.grad().defined() {
                (w.sum(Kind::Float) * 0.0).backward();
            }
        }
    }

    /// Rotary tables (cos, sin) for `positions`, one pair per table in `self.rotary`.
    pub(super) fn rotary_tables(&self, positions: &Tensor, kind: Kind) -> RotaryTables {
        self.rotary.iter().map(|r| r.cos_sin(positions, kind)).collect()
    }

    /// What every layer of one forward pass shares: positions -> rotary tables, and masks.
    pub(super) fn layer_context(&self, input: &ForwardInput, kind: Kind) -> Result<LayerContext> {
        let ForwardInput { input_ids, attention_mask, position_ids, documents } = *input;
        let (b, s) = input_ids.size2()?;
        let device = input_ids.device();
        let mask = attention_mask.map(|m| m.to_kind(Kind::Int64));
        let positions = match (position_ids, &mask) {
            (Some(p), _) => p.shallow_clone(),
            (None, Some(m)) => (m.cumsum(-1, Kind::Int64) - 1).clamp_min(0),
            (None, None) => Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0).expand([b, s], false),
        };
        let tables = self.rotary_tables(&positions, kind);
        let masks = LayerMasks::new(mask.as_ref(), documents, &self.layers, s, device);
        Ok(LayerContext { per_device: vec![(device, tables, masks)] })
    }

    /// Layer `i` on `x`, moving `x` (and, once, the context) to the layer's device.
    pub(super) fn layer_forward(&self, i: usize, x: &Tensor, ctx: &mut LayerContext) -> Tensor {
        let (layer, dev) = (&self.layers[i], self.layer_devices[i]);
        let x = if x.device() != dev { x.to_device(dev) } else { x.shallow_clone() };
        if ctx.per_device.iter().all(|c| c.0 != dev) {
            let (_, tables, masks) = &ctx.per_device[0];
            let tables = tables.iter().map(|(c, s)| (c.to_device(dev), s.to_device(dev))).collect();
            ctx.per_device.push((dev, tables, masks.to_device(dev)));
        }
        let (_, tables, masks) = ctx.per_device.iter().find(|c| c.0 == dev).expect("context made above");
        let (cos, sin) = &tables[layer.rope];
        layer.forward(&x, cos, sin, masks.for_layer(layer.sliding_window))
    }

    /// The final norm, on the head's device: hidden state `num_layers`.
    pub(super) fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&x.to_device(self.output_device()))
    }

    /// Logits for final hidden states `[.., hidden]` -> `[.., vocab]`, in the model's
    /// dtype (soft-capped where the model caps them).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let z = linear(hidden, &self.lm_head, None);
        match self.final_softcap {
            Some(cap) => soft_cap(&z, cap),
            None => z,
        }
    }

    /// Gemma 2's `cap` of `cap * tanh(logits / cap)`, which every loss on the head applies.
    pub fn final_softcap(&self) -> Option<f64> {
        self.final_softcap
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }
}

/// Rotary tables and masks of one forward pass, per device (moved once for a model
/// split by layers).
pub(super) struct LayerContext {
    per_device: Vec<(Device, RotaryTables, LayerMasks)>,
}

/// (cos, sin) per rotary table of the model (see `Transformer::rotary`).
type RotaryTables = Vec<(Tensor, Tensor)>;

/// The attention masks a forward pass needs: one for full attention and one per
/// distinct sliding window, built once and shared by the layers.
struct LayerMasks {
    full: AttentionMask,
    windowed: Vec<(usize, AttentionMask)>,
}

impl LayerMasks {
    fn new(
        mask: Option<&Tensor>,
        documents: Option<&PackedDocuments>,
        layers: &[DecoderLayer],
        s: i64,
        device: Device,
    ) -> Self {
        // Right padding (or none) needs no mask under causal attention: a real token
        // never sees a later pad. Left padding and windows do; packed documents are
        // attended one by one (a packed row's padding is a segment of its own).
        let needs_key_mask = mask.is_some_and(|m| !is_right_padded(m));
        let key_mask = if needs_key_mask { mask } else { None };
        let build = |window: Option<usize>| -> AttentionMask {
            if let Some(docs) = documents {
                return AttentionMask::Documents(DocumentMask::new(docs, window));
            }
            if key_mask.is_none() && window.is_none() {
                return AttentionMask::Causal;
            }
            let i = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(1);
            let j = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
            let mut allowed = j.le_tensor(&i);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&i - &j).lt(w as i64));
            }
            let mut allowed = allowed.view([1, 1, s, s]);
            if let Some(m) = key_mask {
                let keys = m.ne(0).unsqueeze(1).unsqueeze(1);
                // A padding query with no visible key would make SDPA produce NaN, which
                // then leaks through 0 * NaN; let every position see itself.
                let diagonal = Tensor::eye(s, (Kind::Bool, device)).view([1, 1, s, s]);
                allowed = allowed.logical_and(&keys).logical_or(&diagonal);
            }
            AttentionMask::Explicit(allowed)
        };
        let mut windows: Vec<usize> = layers.iter().filter_map(|l| l.sliding_window).collect();
        windows.sort_unstable();
        windows.dedup();
        LayerMasks { full: build(None), windowed: windows.into_iter().map(|w| (w, build(Some(w)))).collect() }
    }

    fn to_device(&self, device: Device) -> Self {
        let move_mask = |m: &AttentionMask| match m {
            AttentionMask::Causal => AttentionMask::Causal,
            AttentionMask::All => AttentionMask::All,
            AttentionMask::Explicit(t) => AttentionMask::Explicit(t.to_device(device)),
            AttentionMask::Documents(d) => AttentionMask::Documents(d.to_device(device)),
        };
        LayerMasks {
            full: move_mask(&self.full),
            windowed: self.windowed.iter().map(|(w, m)| (*w, move_mask(m))).collect(),
        }
    }

    fn for_layer(&self, window: Option<usize>) -> &AttentionMask {
        match window {
            None => &self.full,
            Some(w) => &self.windowed.iter().find(|(x, _)| *x == w).expect("mask built for every window").1,
        }
    }
}

/// True when every row is ones followed by zeros (padding only on the right).
fn is_right_padded(mask: &Tensor) -> bool {
    let m = mask.ne(0);
    let s = m.size()[1];
    if s < 2 {
        return true;
    }
    // A 0 followed by a 1 anywhere means a gap or left padding.
    let rises = m.narrow(1, 1, s - 1).logical_and(&m.narrow(1, 0, s - 1).logical_not());
    rises.any().int64_value(&[]) == 0
}
