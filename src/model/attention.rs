//! Grouped-query attention with RoPE. Through libtorch's scaled_dot_product_attention
//! (its fused kernels) for every family but Gemma 2, whose scores are soft-capped before
//! the softmax, which no fused kernel does: there the scores are computed explicitly
//! (`softcapped`), with grouped heads multiplied as groups (no copy of the keys and
//! values per query head), the softmax in float32 as transformers' eager path does.
use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::ModelConfig;
use super::decode::LayerKv;
use super::flash_varlen::flash_varlen;
use super::layers::{soft_cap, Linear, RmsNorm};
use super::packed::PackedDocuments;
use super::rope::apply_rotary;
use super::weights::VarBuilder;

/// How attention may look back. `Causal` lets SDPA pick its fastest kernel; `Explicit`
/// is a boolean `[batch, 1, seq, keys]` mask (true = may attend); `All`: every key
/// (one new token over a cache without padding); `Documents`: packed rows, each
/// document causally on its own (`packed.rs`).
pub enum AttentionMask {
    Causal,
    Explicit(Tensor),
    All,
    Documents(DocumentMask),
}

/// Per-document attention for one layer: the batch's documents and, for a layer with a
/// sliding window, a `[1, 1, len, len]` band per bucket longer than the window.
pub struct DocumentMask {
    pub layout: PackedDocuments,
    pub window: Option<usize>,
    pub bands: Vec<Option<Tensor>>,
}

impl DocumentMask {
    pub fn new(layout: &PackedDocuments, window: Option<usize>) -> Self {
        let layout = layout.map(Tensor::shallow_clone);
        let device = layout.cu_seqlens.device();
        let bands = layout
            .buckets
            .iter()
            .map(|b| match window {
                Some(w) if (w as i64) < b.len => {
                    Some(PackedDocuments::window_mask(b.len, w, device).view([1, 1, b.len, b.len]))
                }
                _ => None,
            })
            .collect();
        DocumentMask { layout, window, bands }
    }

    pub fn to_device(&self, device: tch::Device) -> Self {
        DocumentMask {
            layout: self.layout.to_device(device),
            window: self.window,
            bands: self.bands.iter().map(|b| b.as_ref().map(|t| t.to_device(device))).collect(),
        }
    }
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
        if let AttentionMask::Documents(docs) = mask {
            // Positions first: the per-document layouts index positions, so no transposed
            // copy of q, k and v is made for them.
            let (q, k, v) = self.project(x, cos, sin, true);
            return self.o_proj.forward(&self.per_document(&q, &k, &v, docs));
        }
        let (q, k, v) = self.project(x, cos, sin, false);
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
        let (q, k, v) = self.project(x, cos, sin, false);
        let (k, v) = LayerKv::append(cache, &k, &v);
        self.attend(&q, &k, &v, mask)
    }

    /// Queries, keys and values `[batch, heads, seq, head_dim]` (or, `positions_first`,
    /// `[batch, seq, heads, head_dim]`), normed (Qwen3, Gemma 3) and rotated.
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, positions_first: bool) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let heads = |t: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let t = t.view([b, s, n, self.head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(&t),
                None => t,
            };
            if positions_first {
                t
            } else {
                t.transpose(1, 2)
            }
        };
        let q = heads(self.q_proj.forward(x), self.num_heads, &self.q_norm);
        let k = heads(self.k_proj.forward(x), self.num_kv_heads, &self.k_norm);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads, &None);
        // The tables are `[batch, 1, seq, head_dim]`: as `[batch, seq, 1, head_dim]` views
        // they broadcast over heads in the positions-first layout.
        let (cos, sin) = if positions_first {
            (cos.transpose(1, 2), sin.transpose(1, 2))
        } else {
            (cos.shallow_clone(), sin.shallow_clone())
        };
        (apply_rotary(&q, &cos, &sin), apply_rotary(&k, &cos, &sin), v)
    }

    /// Attention of `q` over `k`, `v`, then the output projection: `[batch, seq, hidden]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Tensor {
        let (b, _, s, _) = q.size4().expect("[batch, heads, seq, head_dim]");
        let out = match mask {
            AttentionMask::Documents(docs) => {
                self.per_document(&q.transpose(1, 2), &k.transpose(1, 2), &v.transpose(1, 2), docs)
            }
            _ => self.core(q, k, v, mask).transpose(1, 2).reshape([b, s, self.num_heads * self.head_dim]),
        };
        self.o_proj.forward(&out)
    }

    /// Attention `[batch, heads, seq, head_dim]` of `q` over `k`, `v` under `mask`
    /// (anything but `Documents`).
    fn core(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Tensor {
        let s = q.size()[2];
        let gqa = self.num_kv_heads != self.num_heads;
        match (mask, self.softcap) {
            (AttentionMask::Documents(_), _) => unreachable!("documents are attended by per_document"),
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
        }
    }

    /// Packed rows: each document attends causally to itself only. `q`, `k`, `v` are
    /// `[batch, seq, heads, head_dim]`; the result `[batch, seq, heads * head_dim]`. On
    /// CUDA in bf16/f16 one variable-length flash call does every document; elsewhere
    /// (and with soft-capping) one causal call per bucket of documents of similar length
    /// (see `packed.rs`).
    fn per_document(&self, q: &Tensor, k: &Tensor, v: &Tensor, docs: &DocumentMask) -> Tensor {
        let (b, s, h, d) = q.size4().expect("[batch, seq, heads, head_dim]");
        let width = h * d;
        // [batch * seq, heads, head_dim]: a view of the positions-first layout.
        let flat = |t: &Tensor| t.reshape([b * s, t.size()[2], d]);
        let (qf, kf, vf) = (flat(q), flat(k), flat(v));
        if self.softcap.is_none() {
            if let Some(out) = flash_varlen(&qf, &kf, &vf, &docs.layout, self.scale, docs.window) {
                return out.reshape([b, s, width]);
            }
        }
        let layout = &docs.layout;
        let outs: Vec<Tensor> = layout
            .buckets
            .iter()
            .enumerate()
            .map(|(i, bucket)| {
                let slots =
                    |t: &Tensor| layout.gather(i, t).view([bucket.count, bucket.len, t.size()[1], d]).transpose(1, 2);
                let mask = match &docs.bands[i] {
                    Some(band) => AttentionMask::Explicit(band.shallow_clone()),
                    None => AttentionMask::Causal,
                };
                let out = self.core(&slots(&qf), &slots(&kf), &slots(&vf), &mask);
                out.transpose(1, 2).reshape([bucket.count * bucket.len, width])
            })
            .collect();
        let joined = if outs.len() == 1 { outs.into_iter().next().expect("one") } else { Tensor::cat(&outs, 0) };
        layout.scatter(&joined).view([b, s, width])
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
            AttentionMask::Documents(_) => unreachable!("documents are attended by per_document"),
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
