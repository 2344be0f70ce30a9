//! Gemma 2 and Gemma 3 configs as transformers reads them. Three things differ from the
//! other families' config.json:
//! - missing fields take `Gemma2Config` / `Gemma3TextConfig` defaults, not Llama's (the
//!   hub's Gemma 3 checkpoints write only what differs from them in `text_config`, so a
//!   missing `head_dim` means 256 and a missing `final_logit_softcapping` means 30 on
//!   Gemma 2). They are written into the config we keep, so a saved student says them.
//! - `layer_types` may be given as `sliding_window_pattern` (every n-th layer global);
//!   it is written out as the explicit list, which survives dropping layers.
//! - Gemma 3 has a RoPE per layer type: sliding layers base 10,000, global layers
//!   1,000,000 with the checkpoint's scaling (transformers 5: `rope_parameters` keyed
//!   by layer type; 4: `rope_theta`, `rope_local_base_freq`, `rope_scaling`).
//!
//! A `gemma3` (image + text) checkpoint is read as its text part: `text_config` becomes
//! a `gemma3_text` config and the weights are found under the multimodal names.
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::model::rope::RopeScaling;

/// A multimodal Gemma 3 config.json's text part, as a `gemma3_text` config of its own.
pub(super) fn text_part(mut raw: Map<String, Value>) -> Result<Map<String, Value>> {
    let Some(Value::Object(mut text)) = raw.remove("text_config") else {
        bail!("field `text_config`: a gemma3 config needs its text model's settings (an object)");
    };
    match text.get("model_type").and_then(Value::as_str) {
        None | Some("gemma3_text") => {}
        Some(other) => bail!("field `text_config.model_type`: {other:?}, expected \"gemma3_text\""),
    }
    text.insert("model_type".into(), "gemma3_text".into());
    text.remove("architectures");
    // The head is tied (or not) by the outer config, as Gemma3ForConditionalGeneration does.
    if let Some(tie) = raw.get("tie_word_embeddings").filter(|v| !v.is_null()) {
        text.entry("tie_word_embeddings").or_insert(tie.clone());
    }
    for key in ["torch_dtype", "dtype"] {
        if let Some(v) = raw.get(key) {
            text.entry(key).or_insert(v.clone());
        }
    }
    Ok(text)
}

/// transformers' class defaults of `model_type` for the fields that change the math.
fn defaults(model_type: &str) -> Value {
    let shared = json!({
        "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "attention_bias": false, "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    });
    let own = if model_type == "gemma2" {
        json!({"vocab_size": 256000, "max_position_embeddings": 8192,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0})
    } else {
        json!({"vocab_size": 262208, "max_position_embeddings": 131072,
               "final_logit_softcapping": null, "attn_logit_softcapping": null})
    };
    let mut all = shared;
    all.as_object_mut().expect("object").extend(own.as_object().expect("object").clone());
    all
}

/// Fills the fields `raw` leaves out with the family's defaults and writes `layer_types`
/// out in full (sliding unless every `sliding_window_pattern`-th layer; Gemma 2 every other).
pub(super) fn complete(raw: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    if let Value::Object(d) = defaults(model_type) {
        for (k, v) in d {
            raw.entry(k).or_insert(v);
        }
    }
    if raw.get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
        bail!("field `use_bidirectional_attention`: bidirectional Gemma (EmbeddingGemma) is not a causal LM");
    }
    if raw.get("layer_types").is_none_or(Value::is_null) {
        let pattern = match model_type {
            "gemma2" => 2,
            _ => match raw.get("sliding_window_pattern") {
                None | Some(Value::Null) => 6,
                Some(v) => v
                    .as_u64()
                    .filter(|&p| p > 0)
                    .context("field `sliding_window_pattern` must be a positive integer")?,
            },
        };
        let n = raw.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0);
        let types: Vec<&str> =
            (0..n).map(|i| if (i + 1) % pattern != 0 { "sliding_attention" } else { "full_attention" }).collect();
        raw.insert("layer_types".into(), types.into());
    }
    // Said by layer_types from now on (a student with fewer layers keeps its own list).
    raw.remove("sliding_window_pattern");
    raw.remove("_sliding_window_pattern");
    Ok(())
}

/// RoPE of a Gemma 3 config: (full-attention layers, sliding-window layers), each as
/// (base, scaling).
pub(super) fn gemma3_rope(raw: &Map<String, Value>) -> Result<((f64, RopeScaling), (f64, RopeScaling))> {
    let theta = |v: Option<&Value>, default: f64, field: &str| -> Result<f64> {
        match v.filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|t| t.is_finite() && *t > 0.0)
                .with_context(|| format!("field `{field}` must be a positive number")),
        }
    };
    if let Some(params) = raw.get("rope_parameters").filter(|v| !v.is_null()) {
        let per_type = |key: &str, default: f64| -> Result<(f64, RopeScaling)> {
            let field = format!("rope_parameters.{key}");
            match params.get(key).filter(|v| !v.is_null()) {
                None => Ok((default, RopeScaling::Default)),
                Some(p) => Ok((
                    theta(p.get("rope_theta"), default, &format!("{field}.rope_theta"))?,
                    RopeScaling::from_json(p).with_context(|| format!("field `{field}`"))?,
                )),
            }
        };
        if params.get("full_attention").is_none() && params.get("sliding_attention").is_none() {
            bail!(
                "field `rope_parameters`: Gemma 3 needs one entry per layer type (full_attention, sliding_attention)"
            );
        }
        return Ok((per_type("full_attention", 1_000_000.0)?, per_type("sliding_attention", 10_000.0)?));
    }
    let global_scaling = match raw.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(s) => RopeScaling::from_json(s).context("field `rope_scaling`")?,
        None => RopeScaling::Default,
    };
    Ok((
        (theta(raw.get("rope_theta"), 1_000_000.0, "rope_theta")?, global_scaling),
        (theta(raw.get("rope_local_base_freq"), 10_000.0, "rope_local_base_freq")?, RopeScaling::Default),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{Activation, ModelConfig};
    use super::*;

    fn err(v: Value) -> String {
        format!("{:#}", ModelConfig::from_value(v).unwrap_err())
    }

    /// The hub's gemma-3-4b-it config.json: a sparse text_config, the rest defaults.
    #[test]
    fn a_hub_gemma3_multimodal_config_reads_as_its_text_model() {
        let v = json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                            "sliding_window": 1024},
            "vision_config": {"model_type": "siglip_vision_model"}, "torch_dtype": "bfloat16",
        });
        let c = ModelConfig::from_value(v).unwrap();
        assert!(c.nested_text_model && c.tie_word_embeddings && c.qk_norm && c.sandwich_norms && c.norm_plus_one);
        assert_eq!((c.vocab_size, c.head_dim, c.num_heads, c.num_kv_heads), (262208, 256, 8, 4));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.attention_scale, Some(1.0 / 16.0));
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1e6, RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.sliding_rope, Some((1e4, RopeScaling::Default)));
        let full: Vec<usize> = (0..34).filter(|&i| c.sliding_windows[i].is_none()).collect();
        assert_eq!(full, [5, 11, 17, 23, 29]);
        assert_eq!(c.sliding_windows[0], Some(1024));
        assert_eq!(c.embed_scale, Some(2560f64.sqrt()));
        let saved = c.to_json("float32");
        assert_eq!(saved["model_type"], "gemma3_text");
        assert_eq!(saved["architectures"], json!(["Gemma3ForCausalLM"]));
        assert!(saved.get("sliding_window_pattern").is_none() && saved.get("vision_config").is_none());
        // Read back as a text model: the same settings.
        let again = ModelConfig::from_value(saved).unwrap();
        assert!(!again.nested_text_model);
        assert_eq!((again.sliding_windows, again.sliding_rope), (c.sliding_windows, c.sliding_rope));
    }

    #[test]
    fn gemma2_defaults_are_transformers_and_null_means_off() {
        let base = json!({"model_type": "gemma2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8});
        let c = ModelConfig::from_value(base.clone()).unwrap();
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.sliding_windows, vec![Some(4096), None, Some(4096)]);
        assert_eq!((c.attention_scale, c.sliding_rope.clone(), c.qk_norm), (Some(1.0 / 16.0), None, false));
        let mut off = base.clone();
        off["final_logit_softcapping"] = Value::Null;
        assert_eq!(ModelConfig::from_value(off).unwrap().final_softcap, None);
        let mut v = base.clone();
        v["hidden_activation"] = "relu".into();
        assert!(err(v).contains("hidden_activation"));
    }

    #[test]
    fn gemma_variants_distill_does_not_implement_name_the_field() {
        let text = json!({"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4});
        let mut v = text.clone();
        v["use_bidirectional_attention"] = true.into();
        assert!(err(v).contains("use_bidirectional_attention"));
        let mut v = text.clone();
        v["attn_logit_softcapping"] = 50.0.into();
        assert!(err(v).contains("attn_logit_softcapping"));
        let mut v = text.clone();
        v["rope_parameters"] = json!({"rope_type": "yarn", "factor": 2.0});
        assert!(err(v).contains("rope_parameters"));
        let mut v = text;
        v["rope_parameters"] = json!({"full_attention": {"rope_type": "yarn", "factor": 2.0}});
        let e = err(v);
        assert!(e.contains("rope_parameters.full_attention") && e.contains("yarn"), "{e}");
        let llama = json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "final_logit_softcapping": 30.0});
        assert!(err(llama).contains("final_logit_softcapping"));
        assert!(err(json!({"model_type": "gemma3"})).contains("text_config"));
    }
}
