//! Rotary position embeddings as transformers computes them, including the
//! `linear` and `llama3` frequency scalings. Other scalings (yarn, dynamic, longrope)
//! change the math and are refused by name.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    pub fn from_json(v: &Value) -> Result<Self> {
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            let x = v
                .get(key)
                .and_then(Value::as_f64)
                .with_context(|| format!("rope type {kind:?} needs a number `{key}`"))?;
            if !(x.is_finite() && x > 0.0) {
                bail!("rope type {kind:?}: `{key}` is {x}; it must be a positive number");
            }
            Ok(x)
        };
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    bail!("rope type \"llama3\": `high_freq_factor` {high} must exceed `low_freq_factor` {low}");
                }
                RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }
            }
            other => bail!("unsupported rope type {other:?} (supported: default, linear, llama3)"),
        })
    }
}

/// Inverse frequencies for `head_dim`, in float32 exactly as transformers computes them
/// (`1 / theta^(arange(0, d, 2) / d)` in float32), then scaled.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let d = head_dim as f32;
    let base = theta as f32;
    let freqs = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d));
    match *scaling {
        RopeScaling::Default => freqs.collect(),
        RopeScaling::Linear { factor } => freqs.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old_ctx = original_max_position_embeddings as f32;
            let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
            let low_freq_wavelen = old_ctx / low;
            let high_freq_wavelen = old_ctx / high;
            freqs
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Precomputed inverse frequencies; `cos_sin` turns position ids into the tables.
#[derive(Debug)]
pub struct RotaryEmbedding {
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling, device: Device) -> Self {
        let inv = inv_freq(head_dim, theta, scaling);
        RotaryEmbedding { inv_freq: Tensor::from_slice(&inv).to_device(device) }
    }

    /// `position_ids` `[batch, seq]` (int64) -> (cos, sin), each `[batch, 1, seq, head_dim]`
    /// in `kind`. Angles are computed in float32 and cast, as transformers does.
    pub fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, head_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inv_freq(128, 500000.0, &RopeScaling::Default);
        let scaled = inv_freq(128, 500000.0, &s);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
        // In the ramp, the value lies between the two.
        let mid = (0..64).find(|&i| scaled[i] != plain[i] && (scaled[i] - plain[i] / 8.0).abs() > 1e-12);
        let i = mid.expect("a frequency in the smooth ramp");
        assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0);
    }

    #[test]
    fn rotation_preserves_norm_and_is_identity_at_position_zero() {
        let rope = RotaryEmbedding::new(8, 10000.0, &RopeScaling::Default, Device::Cpu);
        let x = Tensor::randn([1, 2, 3, 8], (Kind::Float, Device::Cpu));
        let pos = Tensor::from_slice(&[0i64, 5, 17]).view([1, 3]);
        let (cos, sin) = rope.cos_sin(&pos, Kind::Float);
        let y = apply_rotary(&x, &cos, &sin);
        let diff0 = (y.narrow(2, 0, 1) - x.narrow(2, 0, 1)).abs().max().double_value(&[]);
        assert!(diff0 < 1e-7);
        let n = |t: &Tensor| t.square().sum(Kind::Double).double_value(&[]);
        assert!((n(&y) - n(&x)).abs() / n(&x) < 1e-6);
    }
}
