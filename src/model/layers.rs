//! The blocks every family is built from: RMSNorm (Llama's and Gemma's), linear maps and
//! the gated MLP. Numerics follow transformers' modeling files: the norm in float32, cast
//! back where each family casts. Where a training graph is recorded, the norm and the
//! MLP are `fused`'s functions with their own backward (same values, less kept).
use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::{Activation, ModelConfig};
use super::fused;
use super::weights::{Init, VarBuilder};

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma: scale by (1 + weight) in float32, then cast (its weights start at zero).
    plus_one: bool,
}

impl RmsNorm {
    /// A norm over `size` features in `cfg`'s style (Gemma's or the others').
    pub fn new(vb: &VarBuilder, size: usize, cfg: &ModelConfig) -> Result<Self> {
        let init = if cfg.norm_plus_one { Init::Zeros } else { Init::Ones };
        Ok(RmsNorm {
            weight: vb.get("weight", &[size as i64], init)?,
            eps: cfg.rms_norm_eps,
            plus_one: cfg.norm_plus_one,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if fused::wanted(x, &self.weight, FEW_ROWS) {
            return fused::rms_norm(x, &self.weight, self.eps, self.plus_one);
        }
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let variance = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = xf * (variance + self.eps).rsqrt();
        if self.plus_one {
            (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
        } else {
            &self.weight * normed.to_kind(kind)
        }
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

/// `cap * tanh(x / cap)` (Gemma 2's soft-capping of attention scores and logits).
pub fn soft_cap(x: &Tensor, cap: f64) -> Tensor {
    (x / cap).tanh() * cap
}

#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// A gated MLP `hidden -> width -> hidden` whose gate, up and down projections are
    /// named `names`: `down(act(gate(x)) * up(x))`.
    pub fn new(
        vb: &VarBuilder,
        hidden: usize,
        width: usize,
        bias: bool,
        activation: Activation,
        names: [&str; 3],
    ) -> Result<Self> {
        let [gate, up, down] = names;
        Ok(Mlp {
            gate_proj: Linear::new(&vb.pp(gate), hidden, width, bias)?,
            up_proj: Linear::new(&vb.pp(up), hidden, width, bias)?,
            down_proj: Linear::new(&vb.pp(down), width, hidden, bias)?,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up, down) = (&self.gate_proj, &self.up_proj, &self.down_proj);
        if self.unbiased() && fused::wanted(x, &gate.weight, FEW_ROWS) {
            return fused::gated_mlp(x, &gate.weight, &up.weight, &down.weight, self.activation);
        }
        self.decomposed(x)
    }

    /// Whether no projection has a bias (the fused functions take none).
    fn unbiased(&self) -> bool {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|l| l.bias.is_none())
    }

    /// `forward(norm.forward(x))`, in one fused function where a graph is recorded.
    pub fn forward_normed(&self, norm: &RmsNorm, x: &Tensor) -> Tensor {
        let (gate, up, down) = (&self.gate_proj, &self.up_proj, &self.down_proj);
        if self.unbiased() && fused::wanted(x, &norm.weight, FEW_ROWS) {
            let weights = [&gate.weight, &up.weight, &down.weight];
            return fused::norm_gated_mlp(x, (&norm.weight, norm.eps, norm.plus_one), weights, self.activation);
        }
        self.forward(&norm.forward(x))
    }

    fn decomposed(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x);
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
            Activation::Gelu => gate.gelu("none"),
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}
