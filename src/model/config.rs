//! `config.json` of a Hugging Face decoder-only model (Llama, Mistral, Qwen2, Qwen3, the
//! mixture-of-experts Qwen2-MoE, Qwen3-MoE and Mixtral, and Gemma 2 / Gemma 3, whose
//! config quirks live in `gemma.rs`).
//!
//! We parse the fields our math depends on and refuse configs whose other settings
//! would change the math in ways we do not implement: a silently ignored field is a
//! wrong model, so it must be an error that names the field.
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use super::gemma;
use super::rope::RopeScaling;

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

const MODEL_TYPES: &[(&str, Family)] = &[
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
    fn from_model_type(model_type: &str) -> Option<Self> {
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
    fn parse(name: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => bail!("field `{field}`: {other:?} is not supported (silu, gelu_pytorch_tanh, gelu)"),
        })
    }
}

/// The mixture-of-experts feed-forward of a family that has one: a router picks
/// `experts_per_token` of `num_experts` gated MLPs per token (softmax over all experts in
/// float32, then top-k), their outputs summed with the router's probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub experts_per_token: usize,
    /// Width of each expert's MLP (`moe_intermediate_size`; Mixtral: `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Renormalise the chosen experts' probabilities to sum to one (Mixtral always).
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: an always-on expert of this width, scaled by sigmoid(its own gate).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer: experts (true) or a dense MLP of `intermediate_size` (Qwen's
    /// `mlp_only_layers` and `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
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
    /// Gemma's name for the activation (its hidden_act is ignored by transformers).
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
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
    /// Qwen2 in transformers >= 5 (default true); Qwen2-MoE.
    #[serde(default)]
    qkv_bias: Option<bool>,
    // Mixture of experts. Qwen names the count num_experts; Mixtral (and transformers 5
    // when it saves Qwen3-MoE) num_local_experts.
    #[serde(default)]
    num_experts: Option<usize>,
    #[serde(default)]
    num_local_experts: Option<usize>,
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default)]
    moe_intermediate_size: Option<usize>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<usize>,
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
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0) {
            bail!("field `rms_norm_eps`: {} must be zero or a small positive number", cfg.rms_norm_eps);
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
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let (q, kv) = ((self.num_heads * self.head_dim) as u64, (self.num_kv_heads * self.head_dim) as u64);
        let attention = 2 * h * q + 2 * h * kv;
        let mlp = |width: usize| 3 * h * width as u64;
        let feed_forward: u64 = (0..self.num_layers)
            .map(|i| match &self.moe {
                Some(m) if m.sparse_layers[i] => {
                    let shared = m.shared_expert_intermediate_size.map_or(0, |w| mlp(w) + h);
                    m.num_experts as u64 * (mlp(m.expert_intermediate_size) + h) + shared
                }
                _ => mlp(self.intermediate_size),
            })
            .sum();
        let embeddings = v * h * if self.tie_word_embeddings { 1 } else { 2 };
        let norms =
            h * if self.sandwich_norms { 4 } else { 2 } + if self.qk_norm { 2 * self.head_dim as u64 } else { 0 };
        embeddings + self.num_layers as u64 * (attention + norms) + feed_forward + h
    }
}

/// The mixture-of-experts settings of `family` (None for a dense family), as
/// transformers reads them.
fn moe_config(cfg: &RawConfig, family: Family) -> Result<Option<MoeConfig>> {
    if !family.is_moe() {
        return Ok(None);
    }
    let n = cfg.num_hidden_layers;
    let num_experts = cfg.num_experts.or(cfg.num_local_experts).context("field `num_experts` is missing")?;
    let experts_per_token = cfg.num_experts_per_tok.context("field `num_experts_per_tok` is missing")?;
    if num_experts == 0 || experts_per_token == 0 || experts_per_token > num_experts {
        bail!("field `num_experts_per_tok`: {experts_per_token} must be between 1 and num_experts ({num_experts})");
    }
    let (expert_intermediate_size, norm_topk_prob, shared, sparse_layers) = match family {
        Family::Mixtral => (cfg.intermediate_size, true, None, vec![true; n]),
        _ => {
            let width = cfg.moe_intermediate_size.context("field `moe_intermediate_size` is missing")?;
            let step = cfg.decoder_sparse_step.unwrap_or(1);
            if step == 0 {
                bail!("field `decoder_sparse_step` must be positive");
            }
            let dense = cfg.mlp_only_layers.clone().unwrap_or_default();
            if let Some(&bad) = dense.iter().find(|&&l| l >= n) {
                bail!("field `mlp_only_layers`: layer {bad} does not exist ({n} layers)");
            }
            let sparse = (0..n).map(|i| !dense.contains(&i) && (i + 1) % step == 0).collect();
            let shared = match family {
                Family::Qwen2Moe => Some(
                    cfg.shared_expert_intermediate_size
                        .context("field `shared_expert_intermediate_size` is missing (Qwen2-MoE)")?,
                ),
                _ => None,
            };
            (width, cfg.norm_topk_prob.unwrap_or(false), shared, sparse)
        }
    };
    if expert_intermediate_size == 0 || shared == Some(0) {
        bail!("field `moe_intermediate_size` / `shared_expert_intermediate_size` must be positive");
    }
    Ok(Some(MoeConfig {
        num_experts,
        experts_per_token,
        expert_intermediate_size,
        norm_topk_prob,
        shared_expert_intermediate_size: shared,
        sparse_layers,
    }))
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

    #[test]
    fn mixture_of_experts_fields_follow_transformers() {
        let mut v = base();
        v["model_type"] = "qwen3_moe".into();
        v["num_experts"] = 8.into();
        v["num_experts_per_tok"] = 2.into();
        v["moe_intermediate_size"] = 16.into();
        v["num_hidden_layers"] = 4.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = json!([3]);
        let c = ModelConfig::from_value(v.clone()).unwrap();
        let moe = c.moe.clone().unwrap();
        assert_eq!(moe.sparse_layers, vec![false, true, false, false]);
        assert!(!moe.norm_topk_prob && c.qk_norm && moe.shared_expert_intermediate_size.is_none());
        // Written back as one explicit list, which transformers reads the same way.
        let again = ModelConfig::from_value(c.to_json("float32")).unwrap();
        assert_eq!(again.moe.unwrap().sparse_layers, moe.sparse_layers);
        // transformers 5 saves the count as num_local_experts.
        let o = v.as_object_mut().unwrap();
        o.remove("num_experts");
        o.insert("num_local_experts".into(), 8.into());
        assert_eq!(ModelConfig::from_value(v.clone()).unwrap().moe.unwrap().num_experts, 8);
        v["num_experts_per_tok"] = 9.into();
        assert!(err(v).contains("num_experts_per_tok"));

        let mut m = base();
        m["model_type"] = "mixtral".into();
        m["num_local_experts"] = 4.into();
        m["num_experts_per_tok"] = 2.into();
        m["sliding_window"] = 4.into();
        let c = ModelConfig::from_value(m).unwrap();
        let moe = c.moe.unwrap();
        assert!(moe.norm_topk_prob && moe.expert_intermediate_size == 64 && moe.sparse_layers == vec![true, true]);
        assert_eq!(c.sliding_windows, vec![Some(4), Some(4)]);

        let mut q = base();
        q["model_type"] = "qwen2_moe".into();
        q["num_experts"] = 4.into();
        q["num_experts_per_tok"] = 2.into();
        q["moe_intermediate_size"] = 16.into();
        // transformers 5 writes sliding_window 0 when no layer slides.
        q["sliding_window"] = 0.into();
        assert!(err(q.clone()).contains("shared_expert_intermediate_size"));
        q["shared_expert_intermediate_size"] = 24.into();
        let c = ModelConfig::from_value(q).unwrap();
        assert!(c.qkv_bias && c.sliding_windows == vec![None, None]);
        assert_eq!(c.moe.unwrap().shared_expert_intermediate_size, Some(24));
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
