//! config.json's fields as serde reads them, and the ranges their values must lie in.
use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Fields as they appear in config.json; `ModelConfig` is the validated form.
#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    pub(super) model_type: String,
    #[serde(default)]
    pub(super) architectures: Option<Vec<String>>,
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) intermediate_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    #[serde(default)]
    pub(super) num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub(super) head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default)]
    pub(super) rope_theta: Option<f64>,
    #[serde(default)]
    pub(super) rope_scaling: Option<Value>,
    /// transformers >= 5 writes theta and scaling together here.
    #[serde(default)]
    pub(super) rope_parameters: Option<Value>,
    #[serde(default)]
    pub(super) tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub(super) attention_bias: Option<bool>,
    #[serde(default)]
    pub(super) mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    pub(super) hidden_act: String,
    /// Gemma's name for the activation (its hidden_act is ignored by transformers).
    #[serde(default)]
    pub(super) hidden_activation: Option<String>,
    #[serde(default)]
    pub(super) query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    pub(super) attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub(super) final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub(super) max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub(super) sliding_window: Option<usize>,
    #[serde(default)]
    pub(super) use_sliding_window: Option<bool>,
    #[serde(default)]
    pub(super) max_window_layers: Option<usize>,
    #[serde(default)]
    pub(super) layer_types: Option<Vec<String>>,
    #[serde(default = "default_init_range")]
    pub(super) initializer_range: f64,
    #[serde(default)]
    pub(super) partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub(super) pretraining_tp: Option<usize>,
    /// Qwen2 in transformers >= 5 (default true); Qwen2-MoE.
    #[serde(default)]
    pub(super) qkv_bias: Option<bool>,
    // Mixture of experts. Qwen names the count num_experts; Mixtral (and transformers 5
    // when it saves Qwen3-MoE) num_local_experts.
    #[serde(default)]
    pub(super) num_experts: Option<usize>,
    #[serde(default)]
    pub(super) num_local_experts: Option<usize>,
    #[serde(default)]
    pub(super) num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub(super) moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub(super) norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub(super) decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub(super) mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub(super) shared_expert_intermediate_size: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_init_range() -> f64 {
    0.02
}

/// Sizes, with the least value each may take; a dense family's config may carry the
/// expert counts as 0 (the MoE families' own checks come later).
/// Above any real width or length (2^31 - 1), and small enough that products of sizes
/// cannot wrap; counts (layers, heads, experts) that size per-item tables stop at 2^16.
const MAX_SIZE: u64 = i32::MAX as u64;
const MAX_COUNT: u64 = 1 << 16;

/// (field, least, most).
const SIZES: &[(&str, u64, u64)] = &[
    ("vocab_size", 1, MAX_SIZE),
    ("hidden_size", 1, MAX_SIZE),
    ("intermediate_size", 1, MAX_SIZE),
    ("num_hidden_layers", 1, MAX_COUNT),
    ("num_attention_heads", 1, MAX_COUNT),
    ("num_key_value_heads", 1, MAX_COUNT),
    ("head_dim", 1, MAX_SIZE),
    ("max_position_embeddings", 1, MAX_SIZE),
    ("moe_intermediate_size", 1, MAX_SIZE),
    ("shared_expert_intermediate_size", 1, MAX_SIZE),
    ("decoder_sparse_step", 1, MAX_COUNT),
    ("num_experts_per_tok", 0, MAX_COUNT),
    ("num_experts", 0, MAX_COUNT),
    ("num_local_experts", 0, MAX_COUNT),
    // Qwen2-MoE writes a window of 0 when no layer slides.
    ("sliding_window", 0, MAX_SIZE),
    ("max_window_layers", 0, MAX_SIZE),
];

/// Numbers that must be positive: each divides, or is the base of a power, in the
/// forward pass, and 0 makes every output NaN or uniform. The rest of a family's numbers
/// are checked where they are read.
const POSITIVE: &[&str] = &["rope_theta", "rms_norm_eps", "rope_local_base_freq"];

/// Refuses, by name, a config.json whose values no model can have: sizes that are not
/// whole numbers or are below their least value, a RoPE base or norm epsilon that is
/// not a positive number, a negative initialiser range, and a RoPE base given twice with
/// two values. Before any weight is read, so a broken teacher costs nothing.
pub(super) fn check_values(raw: &Map<String, Value>) -> Result<()> {
    let present = |name: &str| raw.get(name).filter(|v| !v.is_null());
    for &(name, least, most) in SIZES {
        if let Some(v) = present(name) {
            match v.as_u64() {
                Some(n) if n > most => bail!("field `{name}`: {v} is larger than any model's (at most {most})"),
                Some(n) if n >= least => {}
                _ if least == 1 => bail!("field `{name}`: {v} must be a positive whole number"),
                _ => bail!("field `{name}`: {v} must be a whole number (0 or more)"),
            }
        }
    }
    for &name in POSITIVE {
        if let Some(v) = present(name) {
            if !v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0) {
                bail!("field `{name}`: {} must be a positive number", shown(v));
            }
        }
    }
    if let Some(v) = present("initializer_range") {
        if !v.as_f64().is_some_and(|x| x.is_finite() && x >= 0.0) {
            bail!("field `initializer_range`: {} must be a number, 0 or more", shown(v));
        }
    }
    // transformers 5 keeps the base in rope_parameters (per layer type for Gemma 3);
    // a second, different rope_theta beside it would be silently ignored.
    if let (Some(top), Some(params)) = (present("rope_theta"), present("rope_parameters")) {
        let inner = params.get("rope_theta").or_else(|| params.get("full_attention")?.get("rope_theta"));
        if let Some(inner) = inner.filter(|v| v.as_f64() != top.as_f64()) {
            bail!(
                "field `rope_theta`: {} disagrees with `rope_parameters` ({}); say the base once",
                shown(top),
                shown(inner)
            );
        }
    }
    Ok(())
}

/// A number as Rust prints it (-0.00001, not JSON's -1e-5), anything else as JSON.
fn shown(v: &Value) -> String {
    v.as_f64().map_or_else(|| v.to_string(), |x| x.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::ModelConfig;
    use serde_json::{json, Value};

    fn err(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        });
        edit(&mut v);
        match ModelConfig::from_value(v) {
            Ok(_) => panic!("a config that makes no sense was read"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn values_no_model_can_have_are_named() {
        type Edit = fn(&mut Value);
        let cases: [(Edit, &str); 12] = [
            (|c| c["rope_parameters"]["rope_theta"] = 0.into(), "`rope_theta`: 0"),
            (|c| c["rope_theta"] = (-1.0).into(), "`rope_theta`: -1"),
            (|c| c["rope_theta"] = 500000.0.into(), "`rope_theta`: 500000 disagrees with `rope_parameters` (10000)"),
            (|c| c["rms_norm_eps"] = 0.into(), "`rms_norm_eps`: 0 must be a positive number"),
            (|c| c["hidden_size"] = 0.into(), "`hidden_size`: 0 must be a positive"),
            (|c| c["hidden_size"] = (-64).into(), "`hidden_size`: -64 must be a positive"),
            (|c| c["num_hidden_layers"] = "2".into(), "`num_hidden_layers`: \"2\" must be"),
            (|c| c["vocab_size"] = 0.into(), "`vocab_size`: 0"),
            (|c| c["intermediate_size"] = 64.5.into(), "`intermediate_size`: 64.5"),
            (|c| c["max_position_embeddings"] = 0.into(), "`max_position_embeddings`: 0"),
            (|c| c["head_dim"] = 0.into(), "`head_dim`: 0"),
            (|c| c["initializer_range"] = (-0.02).into(), "`initializer_range`: -0.02"),
        ];
        for (edit, expected) in cases {
            let e = err(edit);
            assert!(e.contains(expected), "expected {expected:?} in: {e}");
        }
    }
}
