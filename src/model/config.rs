//! `config.json` of a Hugging Face decoder-only model (Llama, Mistral, Qwen2, Qwen3).
//!
//! We parse the fields our math depends on and refuse configs whose other settings
//! would change the math in ways we do not implement: a silently ignored field is a
//! wrong model, so it must be an error that names the field.
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use super::rope::RopeScaling;

/// The families we implement. They differ only in biases, q/k norms and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }

    /// The `architectures` entry transformers expects for a causal LM of this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Fields as they appear in config.json; `ModelConfig` is the validated form.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// transformers >= 5 writes theta and scaling together here.
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_init_range")]
    initializer_range: f64,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pretraining_tp: Option<usize>,
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

/// A validated model configuration. `raw` keeps every field of the original file so
/// that saving writes back what we did not touch.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2 always; Llama/Qwen3 with attention_bias).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama/Qwen3 with attention_bias).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm over head_dim on queries and keys before RoPE.
    pub qk_norm: bool,
    /// Per layer: `Some(w)` where attention sees only the last `w` keys.
    pub sliding_windows: Vec<Option<usize>>,
    pub max_position_embeddings: Option<usize>,
    pub initializer_range: f64,
    pub raw: Map<String, Value>,
}

/// Fields that change the forward pass of these families and that we do not implement.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "quantization_config",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "num_experts",
    "num_local_experts",
    "moe_intermediate_size",
];

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_value(value).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&config_path_of(dir))
    }

    pub fn from_value(value: Value) -> Result<Self> {
        let Value::Object(raw) = value else { bail!("config is not a JSON object") };
        let cfg: RawConfig = serde_json::from_value(Value::Object(raw.clone()))
            .context("config.json is missing a required field or has a wrong type")?;
        let family = Family::from_model_type(&cfg.model_type).with_context(|| {
            format!(
                "field `model_type`: unsupported architecture {:?} (supported: llama, mistral, qwen2, qwen3)",
                cfg.model_type
            )
        })?;
        if let Some(archs) = &cfg.architectures {
            for arch in archs {
                if arch != family.architecture() {
                    bail!(
                        "field `architectures`: unsupported architecture {arch:?} for model_type {:?} (expected {})",
                        cfg.model_type,
                        family.architecture()
                    );
                }
            }
        }
        for field in UNSUPPORTED_FIELDS {
            if raw.get(*field).is_some_and(|v| !v.is_null()) {
                bail!("field `{field}` is set; distill does not implement it for {:?}", cfg.model_type);
            }
        }
        if cfg.hidden_act != "silu" {
            bail!("field `hidden_act`: {:?} is not supported (only silu / SwiGLU)", cfg.hidden_act);
        }
        if let Some(f) = cfg.partial_rotary_factor {
            if f != 1.0 {
                bail!("field `partial_rotary_factor`: {f} is not supported (only 1.0)");
            }
        }
        if cfg.pretraining_tp.unwrap_or(1) != 1 {
            log_note("pretraining_tp > 1 only splits matmuls in transformers; the math is the same");
        }
        let positive = |name: &str, v: usize| -> Result<usize> {
            if v == 0 {
                bail!("field `{name}` must be positive");
            }
            Ok(v)
        };
        let hidden_size = positive("hidden_size", cfg.hidden_size)?;
        let num_heads = positive("num_attention_heads", cfg.num_attention_heads)?;
        let num_kv_heads = positive("num_key_value_heads", cfg.num_key_value_heads.unwrap_or(num_heads))?;
        if num_heads % num_kv_heads != 0 {
            bail!("field `num_key_value_heads`: {num_kv_heads} does not divide num_attention_heads {num_heads}");
        }
        let head_dim = match cfg.head_dim {
            Some(d) => positive("head_dim", d)?,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("field `hidden_size`: {hidden_size} is not divisible by num_attention_heads {num_heads} and head_dim is not set");
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("field `head_dim`: {head_dim} must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = rope_settings(&cfg)?;
        // Values that would make every output NaN or infinite.
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            bail!("field `rope_theta`: {rope_theta} must be a positive number");
        }
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0) {
            bail!("field `rms_norm_eps`: {} must be zero or a small positive number", cfg.rms_norm_eps);
        }
        if cfg.sliding_window == Some(0) {
            bail!("field `sliding_window` must be positive");
        }
        let attention_bias = cfg.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
        };
        if family == Family::Mistral && attention_bias {
            bail!("field `attention_bias`: Mistral has no attention biases in transformers");
        }
        let sliding_windows = sliding_windows(&cfg, family)?;
        Ok(ModelConfig {
            family,
            vocab_size: positive("vocab_size", cfg.vocab_size)?,
            hidden_size,
            intermediate_size: positive("intermediate_size", cfg.intermediate_size)?,
            num_layers: positive("num_hidden_layers", cfg.num_hidden_layers)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && cfg.mlp_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            sliding_windows,
            max_position_embeddings: cfg.max_position_embeddings,
            initializer_range: cfg.initializer_range,
            raw,
        })
    }

    /// The config as JSON, with the fields we own brought up to date.
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut raw = self.raw.clone();
        let set = |raw: &mut Map<String, Value>, k: &str, v: Value| {
            raw.insert(k.to_string(), v);
        };
        set(&mut raw, "architectures", Value::from(vec![self.family.architecture()]));
        set(&mut raw, "vocab_size", self.vocab_size.into());
        set(&mut raw, "hidden_size", self.hidden_size.into());
        set(&mut raw, "intermediate_size", self.intermediate_size.into());
        set(&mut raw, "num_hidden_layers", self.num_layers.into());
        set(&mut raw, "num_attention_heads", self.num_heads.into());
        set(&mut raw, "num_key_value_heads", self.num_kv_heads.into());
        set(&mut raw, "head_dim", self.head_dim.into());
        set(&mut raw, "tie_word_embeddings", self.tie_word_embeddings.into());
        // transformers 4 reads torch_dtype, 5 reads dtype.
        set(&mut raw, "torch_dtype", dtype.into());
        set(&mut raw, "dtype", dtype.into());
        if raw.contains_key("layer_types") {
            // Rewritten from our per-layer windows, so it stays one entry per layer
            // (student init may drop layers).
            let types: Vec<&str> = self
                .sliding_windows
                .iter()
                .map(|w| if w.is_some() { "sliding_attention" } else { "full_attention" })
                .collect();
            set(&mut raw, "layer_types", types.into());
        }
        Value::Object(raw)
    }
}

pub fn config_path_of(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

fn log_note(msg: &str) {
    eprintln!("note: {msg}");
}

fn rope_settings(cfg: &RawConfig) -> Result<(f64, RopeScaling)> {
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

fn sliding_windows(cfg: &RawConfig, family: Family) -> Result<Vec<Option<usize>>> {
    let n = cfg.num_hidden_layers;
    // transformers' Mistral ignores layer_types and windows every layer when set.
    if family == Family::Mistral {
        return Ok(vec![cfg.sliding_window; n]);
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
    Ok(match family {
        Family::Qwen2 | Family::Qwen3 if cfg.use_sliding_window.unwrap_or(false) => {
            let first = cfg.max_window_layers.unwrap_or(n);
            (0..n).map(|i| if i >= first { cfg.sliding_window } else { None }).collect()
        }
        _ => vec![None; n],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    fn err(v: Value) -> String {
        format!("{:#}", ModelConfig::from_value(v).unwrap_err())
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = ModelConfig::from_value(base()).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.sliding_windows, vec![None, None]);
    }

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
    fn rope_parameters_of_transformers_5_are_read() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        let c = ModelConfig::from_value(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let mut v = base();
        v["model_type"] = "gemma".into();
        assert!(err(v).contains("model_type"));
        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(err(v).contains("hidden_act"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = err(v);
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(err(v).contains("num_key_value_heads"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(v).contains("hidden_size"));
        let mut v = base();
        v["architectures"] = json!(["LlamaForSequenceClassification"]);
        assert!(err(v).contains("architectures"));
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
