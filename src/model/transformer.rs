//! The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3 (and their
//! mixture-of-experts kin, `moe.rs`): RMSNorm, GQA attention with RoPE (through
//! libtorch's scaled_dot_product_attention), SwiGLU MLP, tied or untied head. Numerics follow transformers' modeling files:
//! RMSNorm in float32 then cast back, RoPE angles in float32.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::decode::LayerKv;
use super::moe::FeedForward;
use super::rope::{apply_rotary, RotaryEmbedding};
use super::weights::{Init, VarBuilder};

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get("weight", &[size as i64], Init::Ones)?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let variance = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = xf * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim as i64, in_dim as i64], Init::Normal)?;
        let bias = if bias { Some(vb.get("bias", &[out_dim as i64], Init::Zeros)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// Rows up to which `linear` multiplies as `W x^T`.
const FEW_ROWS: i64 = 64;

/// `x W^T + b` for `x` `[.., in]` and `weight` `[out, in]`. With a few rows (a decoding
/// step), MKL's `x W^T` copies the whole weight into its packed layout on every call;
/// `(W x^T)^T` packs only the few rows and streams the weight once. Measured on the main
/// job's teacher, batch 8, weights cold: the 30 layers' and the head's matmuls 59 -> 45 ms
/// per step; from a few hundred rows on, `x W^T` is the faster one again.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let size = x.size();
    let in_dim = *size.last().expect("an input of at least one dimension");
    let rows = if in_dim == 0 { 0 } else { x.numel() as i64 / in_dim };
    if !(2..=FEW_ROWS).contains(&rows) {
        return x.linear(weight, bias);
    }
    let y = weight.matmul(&x.reshape([rows, in_dim]).tr()).tr().contiguous();
    let y = match bias {
        Some(b) => y + b,
        None => y,
    };
    let mut shape = size;
    *shape.last_mut().expect("checked") = weight.size()[0];
    y.view(shape.as_slice())
}

/// How attention may look back. `Causal` lets SDPA pick its fastest kernel; `Explicit`
/// is a boolean `[batch, 1, seq, keys]` mask (true = may attend); `All`: every key
/// (one new token over a cache without padding).
pub enum AttentionMask {
    Causal,
    Explicit(Tensor),
    All,
}

#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    pub fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, q, kv) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm.then(|| RmsNorm::new(&vb.pp(name), cfg.head_dim, cfg.rms_norm_eps)).transpose()
        };
        Ok(Attention {
            q_proj: Linear::new(&vb.pp("q_proj"), h, q, cfg.qkv_bias)?,
            k_proj: Linear::new(&vb.pp("k_proj"), h, kv, cfg.qkv_bias)?,
            v_proj: Linear::new(&vb.pp("v_proj"), h, kv, cfg.qkv_bias)?,
            o_proj: Linear::new(&vb.pp("o_proj"), q, h, cfg.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            num_heads: cfg.num_heads as i64,
            num_kv_heads: cfg.num_kv_heads as i64,
            head_dim: cfg.head_dim as i64,
        })
    }

    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttentionMask) -> Tensor {
        let (q, k, v) = self.project(x, cos, sin);
        self.attend(&q, &k, &v, mask)
    }

    /// Like `forward`, with the keys and values of earlier positions in `cache`
    /// (`[batch, kv_heads, slots, head_dim]`), to which this call appends its own; an
    /// explicit `mask` is `[batch, 1, seq, slots]` over every slot, cached and new.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut Option<LayerKv>,
    ) -> Tensor {
        let (q, k, v) = self.project(x, cos, sin);
        let (k, v) = LayerKv::append(cache, &k, &v);
        self.attend(&q, &k, &v, mask)
    }

    /// Queries, keys and values `[batch, heads, seq, head_dim]`, normed (Qwen3) and rotated.
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let heads = |t: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let t = t.view([b, s, n, self.head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(&t),
                None => t,
            };
            t.transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(x), self.num_heads, &self.q_norm);
        let k = heads(self.k_proj.forward(x), self.num_kv_heads, &self.k_norm);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads, &None);
        (apply_rotary(&q, cos, sin), apply_rotary(&k, cos, sin), v)
    }

    /// Attention of `q` over `k`, `v`, then the output projection: `[batch, seq, hidden]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Tensor {
        let (b, _, s, _) = q.size4().expect("[batch, heads, seq, head_dim]");
        let out = match mask {
            AttentionMask::Causal => {
                let gqa = self.num_kv_heads != self.num_heads;
                Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, None, gqa)
            }
            AttentionMask::Explicit(m) if s > 1 => {
                // Fused kernels with a mask do not all take grouped heads: expand k/v.
                let (k, v) = (self.repeat_kv(k.shallow_clone()), self.repeat_kv(v.shallow_clone()));
                Tensor::scaled_dot_product_attention(q, &k, &v, Some(m), 0.0, false, None, false)
            }
            // One query (a decoding step): grouped heads in the kernel, not a copy of the
            // cache per step (on 2 CPU cores 7x faster than expanding at 120 slots).
            AttentionMask::Explicit(m) => {
                let gqa = self.num_kv_heads != self.num_heads;
                Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, None, gqa)
            }
            AttentionMask::All => {
                let gqa = self.num_kv_heads != self.num_heads;
                Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, gqa)
            }
        };
        let out = out.transpose(1, 2).reshape([b, s, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out)
    }

    fn repeat_kv(&self, t: Tensor) -> Tensor {
        let rep = self.num_heads / self.num_kv_heads;
        if rep == 1 {
            return t;
        }
        let (b, n, s, d) = t.size4().expect("[batch, heads, seq, head_dim]");
        t.unsqueeze(2).expand([b, n, rep, s, d], false).reshape([b, n * rep, s, d])
    }
}

#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// A gated SiLU MLP `hidden -> width -> hidden` whose gate, up and down projections
    /// are named `names`.
    pub fn new(vb: &VarBuilder, hidden: usize, width: usize, bias: bool, names: [&str; 3]) -> Result<Self> {
        let [gate, up, down] = names;
        Ok(Mlp {
            gate_proj: Linear::new(&vb.pp(gate), hidden, width, bias)?,
            up_proj: Linear::new(&vb.pp(up), hidden, width, bias)?,
            down_proj: Linear::new(&vb.pp(down), width, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pub(super) mlp: FeedForward,
    pub sliding_window: Option<usize>,
}

impl DecoderLayer {
    pub fn new(vb: &VarBuilder, cfg: &ModelConfig, index: usize) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(&vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: FeedForward::new(vb, cfg, index)?,
            sliding_window: cfg.sliding_windows[index],
        })
    }

    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttentionMask) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
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
        let h = x + self.self_attn.forward_cached(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
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
    pub(super) rotary: RotaryEmbedding,
}

/// The inputs of one forward pass; see `Transformer::forward_hidden`.
#[derive(Clone, Copy)]
pub struct ForwardInput<'a> {
    pub input_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub position_ids: Option<&'a Tensor>,
    pub segment_ids: Option<&'a Tensor>,
}

impl<'a> ForwardInput<'a> {
    pub fn new(input_ids: &'a Tensor, attention_mask: Option<&'a Tensor>) -> Self {
        ForwardInput { input_ids, attention_mask, position_ids: None, segment_ids: None }
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
        let norm = RmsNorm::new(&body.on(last).pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
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
        let rotary = RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, first);
        Ok(Transformer { embed_tokens, layers, layer_devices, norm, lm_head, rotary })
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
    /// `segment_ids` (packed rows) stop attention from crossing document boundaries.
    pub fn forward_hidden(&self, input: &ForwardInput, capture: &[usize]) -> Result<Hidden> {
        let n = self.check_capture(capture)?;
        let mut x = self.embed(input.input_ids);
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
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// What every layer of one forward pass shares: positions -> rotary tables, and masks.
    pub(super) fn layer_context(&self, input: &ForwardInput, kind: Kind) -> Result<LayerContext> {
        let ForwardInput { input_ids, attention_mask, position_ids, segment_ids } = *input;
        let (b, s) = input_ids.size2()?;
        let device = input_ids.device();
        let mask = attention_mask.map(|m| m.to_kind(Kind::Int64));
        let positions = match (position_ids, &mask) {
            (Some(p), _) => p.shallow_clone(),
            (None, Some(m)) => (m.cumsum(-1, Kind::Int64) - 1).clamp_min(0),
            (None, None) => Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0).expand([b, s], false),
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, kind);
        let masks = LayerMasks::new(mask.as_ref(), segment_ids, &self.layers, s, device);
        Ok(LayerContext { per_device: vec![(device, cos, sin, masks)] })
    }

    /// Layer `i` on `x`, moving `x` (and, once, the context) to the layer's device.
    pub(super) fn layer_forward(&self, i: usize, x: &Tensor, ctx: &mut LayerContext) -> Tensor {
        let (layer, dev) = (&self.layers[i], self.layer_devices[i]);
        let x = if x.device() != dev { x.to_device(dev) } else { x.shallow_clone() };
        if ctx.per_device.iter().all(|c| c.0 != dev) {
            let (_, cos, sin, masks) = &ctx.per_device[0];
            let moved = (dev, cos.to_device(dev), sin.to_device(dev), masks.to_device(dev));
            ctx.per_device.push(moved);
        }
        let (_, cos, sin, masks) = ctx.per_device.iter().find(|c| c.0 == dev).expect("context made above");
        layer.forward(&x, cos, sin, masks.for_layer(layer.sliding_window))
    }

    /// The final norm, on the head's device: hidden state `num_layers`.
    pub(super) fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&x.to_device(self.output_device()))
    }

    /// Logits for final hidden states `[.., hidden]` -> `[.., vocab]`, in the model's dtype.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        linear(hidden, &self.lm_head, None)
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }
}

/// Rotary tables and masks of one forward pass, per device (moved once for a model
/// split by layers).
pub(super) struct LayerContext {
    per_device: Vec<(Device, Tensor, Tensor, LayerMasks)>,
}

/// The attention masks a forward pass needs: one for full attention and one per
/// distinct sliding window, built once and shared by the layers.
struct LayerMasks {
    full: AttentionMask,
    windowed: Vec<(usize, AttentionMask)>,
}

impl LayerMasks {
    fn new(mask: Option<&Tensor>, segments: Option<&Tensor>, layers: &[DecoderLayer], s: i64, device: Device) -> Self {
        // Right padding (or none) needs no mask under causal attention: a real token
        // never sees a later pad. Left padding, windows and packed documents do.
        let needs_key_mask = mask.is_some_and(|m| !is_right_padded(m));
        let key_mask = if needs_key_mask { mask } else { None };
        let build = |window: Option<usize>| -> AttentionMask {
            if key_mask.is_none() && window.is_none() && segments.is_none() {
                return AttentionMask::Causal;
            }
            let i = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(1);
            let j = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
            let mut allowed = j.le_tensor(&i);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&i - &j).lt(w as i64));
            }
            let mut allowed = allowed.view([1, 1, s, s]);
            if let Some(seg) = segments {
                let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1)).unsqueeze(1);
                allowed = allowed.logical_and(&same);
            }
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
