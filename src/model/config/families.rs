//! What differs between the families of dense decoders: their names, activations, biases,
//! which layers slide and where RoPE's base is read from.
use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::raw::RawConfig;
use crate::model::rope::RopeScaling;

/// The families we implement. They differ in biases, q/k norms, defaults and, for the
/// mixture-of-experts ones, in the feed-forward block (`MoeConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen2Moe,
    Qwen3Moe,
    Mixtral,
    Gemma2,
    /// Gemma 3's text model (`gemma3_text`; also the text part of a `gemma3` checkpoint).
    Gemma3,
}

pub(super) const MODEL_TYPES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("qwen2_moe", Family::Qwen2Moe),
    ("qwen3_moe", Family::Qwen3Moe),
    ("mixtral", Family::Mixtral),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
];

impl Family {
    pub(super) fn from_model_type(model_type: &str) -> Option<Self> {
        MODEL_TYPES.iter().find(|(name, _)| *name == model_type).map(|&(_, f)| f)
    }

    /// The `architectures` entry transformers expects for a causal LM of this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    pub fn is_moe(self) -> bool {
        matches!(self, Family::Qwen2Moe | Family::Qwen3Moe | Family::Mixtral)
    }
}

/// What an MLP's gate goes through (`hidden_act`; Gemma: `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma's).
    GeluTanh,
    /// Exact GELU (`gelu`).
    Gelu,
}

impl Activation {
    pub(super) fn parse(name: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => bail!("field `{field}`: {other:?} is not supported (silu, gelu_pytorch_tanh, gelu)"),
        })
    }
}

pub(super) fn rope_settings(cfg: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers 5: {"rope_theta": .., "rope_type": .., ...}; 4: rope_theta + rope_scaling.
    let params = cfg.rope_parameters.as_ref().filter(|v| !v.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(cfg.rope_theta).unwrap_or(10000.0);
    let scaling = match (params, cfg.rope_scaling.as_ref().filter(|v| !v.is_null())) {
        (_, Some(s)) => RopeScaling::from_json(s).context("field `rope_scaling`")?,
        (Some(p), None) => RopeScaling::from_json(p).context("field `rope_parameters`")?,
        (None, None) => RopeScaling::Default,
    };
    Ok((theta, scaling))
}

pub(super) fn sliding_windows(cfg: &RawConfig, family: Family) -> Result<Vec<Option<usize>>> {
    let n = cfg.num_hidden_layers;
    // transformers' Mistral and Mixtral ignore layer_types and window every layer when set.
    if matches!(family, Family::Mistral | Family::Mixtral) {
        return Ok(vec![cfg.sliding_window; n]);
    }
    // Qwen3-MoE: every layer when use_sliding_window.
    if family == Family::Qwen3Moe {
        let window = cfg.sliding_window.filter(|_| cfg.use_sliding_window.unwrap_or(false));
        return Ok(vec![window; n]);
    }
    if let Some(types) = &cfg.layer_types {
        if types.len() != n {
            bail!("field `layer_types` has {} entries for {n} layers", types.len());
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => cfg.sliding_window.map(Some).with_context(|| {
                    format!("field `layer_types[{i}]` is sliding_attention but `sliding_window` is not set")
                }),
                other => bail!("field `layer_types[{i}]`: unsupported layer type {other:?}"),
            })
            .collect();
    }
    let sliding = cfg.use_sliding_window.unwrap_or(false);
    Ok(match family {
        Family::Qwen2 | Family::Qwen3 if sliding => {
            let first = cfg.max_window_layers.unwrap_or(n);
            (0..n).map(|i| if i >= first { cfg.sliding_window } else { None }).collect()
        }
        // transformers' Qwen2MoeConfig default layer_types: every other layer, from the
        // first, below max_window_layers.
        Family::Qwen2Moe if sliding => {
            let below = cfg.max_window_layers.unwrap_or(n);
            (0..n).map(|i| if i % 2 == 0 && i < below { cfg.sliding_window } else { None }).collect()
        }
        _ => vec![None; n],
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::base;
    use super::super::ModelConfig;

    #[test]
    fn qwen_families_set_bias_and_norm() {
        let mut v = base();
        v["model_type"] = "qwen2".into();
        let c = ModelConfig::from_value(v.clone()).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        v["model_type"] = "qwen3".into();
        v["head_dim"] = 16.into();
        let c = ModelConfig::from_value(v).unwrap();
        assert!(!c.qkv_bias && c.qk_norm && c.head_dim == 16);
    }

    #[test]
    fn sliding_window_per_family() {
        let mut v = base();
        v["model_type"] = "mistral".into();
        v["sliding_window"] = 4.into();
        assert_eq!(ModelConfig::from_value(v).unwrap().sliding_windows, vec![Some(4), Some(4)]);
        let mut v = base();
        v["model_type"] = "qwen2".into();
        v["sliding_window"] = 4.into();
        v["use_sliding_window"] = true.into();
        v["max_window_layers"] = 1.into();
        assert_eq!(ModelConfig::from_value(v).unwrap().sliding_windows, vec![None, Some(4)]);
    }
}
