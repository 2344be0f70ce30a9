//! `config.json` of a Hugging Face decoder-only model (Llama, Mistral, Qwen2, Qwen3, the
//! mixture-of-experts Qwen2-MoE, Qwen3-MoE and Mixtral, and Gemma 2 / Gemma 3, whose
//! config quirks live in `gemma.rs`; `families.rs` and `moe.rs` hold what
//! differs between families, `raw.rs` the fields as serde reads them and their ranges).
//!
//! We parse the fields our math depends on and refuse configs whose other settings
//! would change the math in ways we do not implement: a silently ignored field is a
//! wrong model, so it must be an error that names the field.
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

mod families;
mod gemma;
mod moe;
mod raw;

pub use families::{Activation, Family};
pub use moe::MoeConfig;

use super::rope::RopeScaling;
use families::{rope_settings, sliding_windows, MODEL_TYPES};
use moe::moe_config;
use raw::RawConfig;

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
    /// Set for the mixture-of-experts families.
    pub moe: Option<MoeConfig>,
    pub activation: Activation,
    /// Gemma: RMSNorm scales by (1 + weight), in float32 before the cast back, and its
    /// weights start at zero.
    pub norm_plus_one: bool,
    /// Gemma: norms on the attention's output and around the MLP
    /// (`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Gemma: embeddings multiplied by sqrt(hidden_size), rounded to the weights' dtype.
    pub embed_scale: Option<f64>,
    /// Attention scores' scale; `None`: 1 / sqrt(head_dim). Gemma: query_pre_attn_scalar^-1/2.
    pub attention_scale: Option<f64>,
    /// Gemma 2: `cap * tanh(x / cap)` on the attention scores (before the mask) and on the logits.
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// RoPE (base, scaling) of the sliding-window layers where it differs from
    /// `rope_theta` / `rope_scaling` (Gemma 3: local base 10,000, no scaling).
    pub sliding_rope: Option<(f64, RopeScaling)>,
    /// The text model of a multimodal checkpoint (`gemma3`): weights under its names.
    pub nested_text_model: bool,
    pub raw: Map<String, Value>,
}

/// Fields that change the forward pass of these families and that we do not implement.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "quantization_config",
    // DeepSeek-V2/V3's multi-head latent attention and expert groups.
    "kv_lora_rank",
    "q_lora_rank",
    "n_group",
    "topk_group",
    "n_routed_experts",
    // gpt-oss attention sinks.
    "sinks",
];

/// Gemma's fields: set for another family they mean math that family does not have.
const GEMMA_FIELDS: &[&str] = &["attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"];

/// Fields of a mixture-of-experts feed-forward: set in a dense family's config, they
/// mean a model we would read wrong.
const MOE_FIELDS: &[&str] = &["num_experts", "num_local_experts", "moe_intermediate_size", "num_experts_per_tok"];

impl ModelConfig {
    /// The one rule on length, for every command that runs a model: it reads at most
    /// `max_position_embeddings` positions at once (past them its rotary positions were
    /// never trained). Packed rows restart positions per document: each document counts.
    pub fn check_length(&self, tokens: usize) -> Result<()> {
        match self.max_position_embeddings {
            Some(context) if tokens > context => {
                bail!("{tokens} tokens are more than the model reads at once ({context}, its max_position_embeddings)")
            }
            _ => Ok(()),
        }
    }

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
        let Value::Object(mut raw) = value else { bail!("config is not a JSON object") };
        let nested_text_model = raw.get("model_type").and_then(Value::as_str) == Some("gemma3");
        if nested_text_model {
            raw = gemma::text_part(raw)?;
        }
        if let Some(t @ ("gemma2" | "gemma3_text")) = raw.get("model_type").and_then(Value::as_str) {
            let t = t.to_string();
            gemma::complete(&mut raw, &t)?;
        }
        raw::check_values(&raw)?;
        let cfg: RawConfig = serde_json::from_value(Value::Object(raw.clone()))
            .context("config.json is missing a required field or has a wrong type")?;
        let family = Family::from_model_type(&cfg.model_type).with_context(|| {
            let names: Vec<&str> = MODEL_TYPES.iter().map(|(n, _)| *n).collect();
            format!(
                "field `model_type`: unsupported architecture {:?} (supported: {})",
                cfg.model_type,
                names.join(", ")
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
        if !family.is_gemma() {
            for field in GEMMA_FIELDS {
                if raw.get(*field).is_some_and(|v| !v.is_null()) {
                    bail!("field `{field}` is set; distill implements it for Gemma only, not {:?}", cfg.model_type);
                }
            }
        }
        if family == Family::Gemma3 && cfg.attn_logit_softcapping.is_some() {
            // transformers' Gemma 3 attention does not apply it; refuse rather than guess.
            bail!("field `attn_logit_softcapping` is set; transformers' Gemma 3 ignores it and so would distill");
        }
        if !family.is_moe() {
            for field in MOE_FIELDS {
                if raw.get(*field).is_some_and(|v| !v.is_null() && v != &Value::from(0)) {
                    bail!("field `{field}` is set; {:?} has no mixture of experts in distill", cfg.model_type);
                }
            }
        }
        let activation = match (family.is_gemma(), &cfg.hidden_activation) {
            (true, Some(name)) => Activation::parse(name, "hidden_activation")?,
            _ => Activation::parse(&cfg.hidden_act, "hidden_act")?,
        };
        if family.is_moe() && activation != Activation::Silu {
            bail!("field `hidden_act`: {:?} experts are not supported (only silu)", cfg.hidden_act);
        }
        if let Some(f) = cfg.partial_rotary_factor {
            if f != 1.0 {
                bail!("field `partial_rotary_factor`: {f} is not supported (only 1.0)");
            }
        }
        if cfg.pretraining_tp.unwrap_or(1) != 1 {
            log_note("pretraining_tp > 1 only splits matmuls in transformers; the math is the same");
        }
        // Sizes are whole numbers of at least 1 here (`raw::check_values`).
        let hidden_size = cfg.hidden_size;
        let num_heads = cfg.num_attention_heads;
        let num_kv_heads = cfg.num_key_value_heads.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            bail!("field `num_key_value_heads`: {num_kv_heads} does not divide num_attention_heads {num_heads}");
        }
        let head_dim = match cfg.head_dim {
            Some(d) => d,
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
        let ((rope_theta, rope_scaling), sliding_rope) = if family == Family::Gemma3 {
            let (full, sliding) = gemma::gemma3_rope(&raw)?;
            (full, Some(sliding))
        } else {
            (rope_settings(&cfg)?, None)
        };
        // Values that would make every output NaN or infinite.
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            bail!("field `rope_theta`: {rope_theta} must be a positive number");
        }
        let attention_bias = cfg.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 | Family::Qwen2Moe => (cfg.qkv_bias.unwrap_or(true), false),
            Family::Mistral | Family::Mixtral => (false, false),
            Family::Llama | Family::Qwen3 | Family::Qwen3Moe | Family::Gemma2 | Family::Gemma3 => {
                (attention_bias, attention_bias)
            }
        };
        if matches!(family, Family::Mistral | Family::Mixtral) && attention_bias {
            bail!("field `attention_bias`: {:?} has no attention biases in transformers", cfg.model_type);
        }
        let sliding_windows = sliding_windows(&cfg, family)?;
        // Qwen2-MoE writes 0 when no layer slides.
        if sliding_windows.contains(&Some(0)) {
            bail!("field `sliding_window` must be positive");
        }
        let moe = moe_config(&cfg, family)?;
        let softcap = |v: Option<f64>, field: &str| -> Result<Option<f64>> {
            match v {
                Some(c) if !(c.is_finite() && c > 0.0) => bail!("field `{field}`: {c} must be a positive number"),
                _ => Ok(v),
            }
        };
        let attention_scale = match cfg.query_pre_attn_scalar {
            Some(s) if !(s.is_finite() && s > 0.0) => bail!("field `query_pre_attn_scalar`: {s} must be positive"),
            Some(s) => Some(s.powf(-0.5)),
            None => None,
        };
        // Sliding layers' RoPE only where it differs and some layer slides.
        let sliding_rope = sliding_rope
            .filter(|r| *r != (rope_theta, rope_scaling.clone()) && sliding_windows.iter().any(Option::is_some));
        let gemma = family.is_gemma();
        Ok(ModelConfig {
            family,
            vocab_size: cfg.vocab_size,
            hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
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
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            sliding_windows,
            max_position_embeddings: cfg.max_position_embeddings,
            initializer_range: cfg.initializer_range,
            moe,
            activation,
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attention_scale,
            attn_softcap: softcap(cfg.attn_logit_softcapping, "attn_logit_softcapping")?,
            final_softcap: softcap(cfg.final_logit_softcapping, "final_logit_softcapping")?,
            sliding_rope,
            nested_text_model,
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
        if let Some(moe) = &self.moe {
            // Experts per layer as we hold them (student init may drop layers or experts).
            let count_key = if raw.contains_key("num_experts") { "num_experts" } else { "num_local_experts" };
            set(&mut raw, count_key, moe.num_experts.into());
            set(&mut raw, "num_experts_per_tok", moe.experts_per_token.into());
            if self.family != Family::Mixtral {
                set(&mut raw, "moe_intermediate_size", moe.expert_intermediate_size.into());
                let dense: Vec<usize> = (0..self.num_layers).filter(|&i| !moe.sparse_layers[i]).collect();
                set(&mut raw, "decoder_sparse_step", 1.into());
                set(&mut raw, "mlp_only_layers", dense.into());
            }
        }
        Value::Object(raw)
    }

    /// Parameters of the model this config describes (every expert counted).
    pub fn num_parameters(&self) -> u64 {
        // In 128 bits: sizes up to 2^31 multiply without wrapping; saturated to u64.
        let (h, v) = (self.hidden_size as u128, self.vocab_size as u128);
        let (q, kv) = ((self.num_heads * self.head_dim) as u128, (self.num_kv_heads * self.head_dim) as u128);
        let attention = 2 * h * q + 2 * h * kv;
        let mlp = |width: usize| 3 * h * width as u128;
        let feed_forward: u128 = (0..self.num_layers)
            .map(|i| match &self.moe {
                Some(m) if m.sparse_layers[i] => {
                    let shared = m.shared_expert_intermediate_size.map_or(0, |w| mlp(w) + h);
                    m.num_experts as u128 * (mlp(m.expert_intermediate_size) + h) + shared
                }
                _ => mlp(self.intermediate_size),
            })
            .sum();
        let embeddings = v * h * if self.tie_word_embeddings { 1 } else { 2 };
        let norms =
            h * if self.sandwich_norms { 4 } else { 2 } + if self.qk_norm { 2 * self.head_dim as u128 } else { 0 };
        let total = embeddings + self.num_layers as u128 * (attention + norms) + feed_forward + h;
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

pub fn config_path_of(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

fn log_note(msg: &str) {
    eprintln!("note: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small valid Llama config, edited by each family's tests.
    pub(super) fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    pub(super) fn err(v: Value) -> String {
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
        v["hidden_act"] = "relu".into();
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
    fn experts_in_a_dense_family_and_unsupported_variants_name_the_field() {
        let mut v = base();
        v["num_local_experts"] = 8.into();
        assert!(err(v).contains("num_local_experts"));
        // DeepSeek's latent attention, gpt-oss sinks.
        let mut v = base();
        v["kv_lora_rank"] = 512.into();
        assert!(err(v).contains("kv_lora_rank"));
        let mut v = base();
        v["model_type"] = "deepseek_v3".into();
        assert!(err(v).contains("model_type"));
        let mut v = base();
        v["model_type"] = "gpt_oss".into();
        assert!(err(v).contains("gpt_oss"));
    }
}
