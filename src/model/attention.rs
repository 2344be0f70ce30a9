//! Grouped-query attention with RoPE. Through libtorch's scaled_dot_product_attention
//! (its fused kernels) for every family but Gemma 2, whose scores are soft-capped before
//! the softmax, which no fused kernel does: there the scores are computed explicitly
//! (`softcapped`), with grouped heads multiplied as groups (no copy of the keys and
//! values per query head), the softmax in float32 as transformers' eager path does.
use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::ModelConfig;
use super::decode::LayerKv;
use super::layers::{soft_cap, Linear, RmsNorm};
use super::rope::apply_rotary;
use super::weights::VarBuilder;

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
    /// Scale of the scores; `None`: 1 / sqrt(head_dim).
    scale: Option<f64>,
    softcap: Option<f64>,
}

impl Attention {
    pub fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, q, kv) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm.then(|| RmsNorm::new(&vb.pp(name), cfg.head_dim, cfg)).transpose()
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
            scale: cfg.attention_scale,
            softcap: cfg.attn_softcap,
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

    /// Queries, keys and values `[batch, heads, seq, head_dim]`, normed (Qwen3, Gemma 3)
    /// and rotated.
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
        let gqa = self.num_kv_heads != self.num_heads;
        let out = match (mask, self.softcap) {
            (_, Some(cap)) => self.softcapped(q, k, v, mask, cap),
            (AttentionMask::Causal, None) => {
                Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, self.scale, gqa)
            }
            (AttentionMask::Explicit(m), None) if s > 1 => {
                // Fused kernels with a mask do not all take grouped heads: expand k/v.
                let (k, v) = (self.repeat_kv(k.shallow_clone()), self.repeat_kv(v.shallow_clone()));
                Tensor::scaled_dot_product_attention(q, &k, &v, Some(m), 0.0, false, self.scale, false)
            }
            // One query (a decoding step): grouped heads in the kernel, not a copy of the
            // cache per step (on 2 CPU cores 7x faster than expanding at 120 slots).
            (AttentionMask::Explicit(m), None) => {
                Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, self.scale, gqa)
            }
            (AttentionMask::All, None) => {
                Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, self.scale, gqa)
            }
        };
        let out = out.transpose(1, 2).reshape([b, s, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out)
    }

    /// Soft-capped attention, `[batch, heads, seq, head_dim]`: scores `cap * tanh(q k^T
    /// scale / cap)`, masked, softmax in float32, times v. The query heads sharing a key
    /// head are stacked as rows of one matmul against it.
    fn softcapped(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, cap: f64) -> Tensor {
        let (b, h, s, d) = q.size4().expect("[batch, heads, seq, head_dim]");
        let (kv, t) = (self.num_kv_heads, k.size()[2]);
        let rep = h / kv;
        let scale = self.scale.unwrap_or(1.0 / (d as f64).sqrt());
        let grouped = q.reshape([b, kv, rep * s, d]);
        let scores = soft_cap(&(grouped.matmul(&k.transpose(-1, -2)) * scale), cap).view([b, kv, rep, s, t]);
        let allowed = match mask {
            AttentionMask::All => None,
            // The last query of `s` sits at the last of `t` keys.
            AttentionMask::Causal => {
                let device = q.device();
                let qi = Tensor::arange_start(t - s, t, (Kind::Int64, device)).unsqueeze(1);
                Some(Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).le_tensor(&qi).view([1, 1, 1, s, t]))
            }
            AttentionMask::Explicit(m) => Some(m.unsqueeze(2)),
        };
        let scores = match allowed {
            Some(a) => scores.masked_fill(&a.logical_not(), f64::NEG_INFINITY),
            None => scores,
        };
        let weights = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        weights.view([b, kv, rep * s, t]).matmul(v).view([b, h, s, d])
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
