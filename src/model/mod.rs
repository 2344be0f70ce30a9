//! Decoder-only language models in Hugging Face layout, on libtorch.
//!
//! `CausalLm::load(dir, ..)` reads `config.json` and safetensors weights;
//! `forward` returns logits and the requested hidden states; `save` writes the
//! same layout back (see `save.rs`); `logits` applies the head in chunks of positions.
pub mod attention;
pub mod backward;
pub mod config;
pub mod decode;
pub mod flash_varlen;
pub mod fused;
pub mod layers;
pub mod logits;
pub mod moe;
pub mod packed;
pub mod rope;
pub mod sampling;
pub mod save;
pub mod transformer;
pub mod weights;

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub use config::{config_path_of, Family, ModelConfig};
pub use transformer::{ForwardInput, Hidden, Transformer};
use weights::{ParamSource, SafetensorsFiles, VarBuilder};

/// A causal language model: its configuration, the VarStore that owns every parameter
/// under its Hugging Face name, and the blocks that use them.
pub struct CausalLm {
    pub config: ModelConfig,
    pub vs: nn::VarStore,
    pub transformer: Transformer,
    kind: Kind,
}

/// Logits `[batch, seq, vocab]` in the model's dtype and the requested hidden states.
pub struct ForwardOutput {
    pub logits: Tensor,
    pub hidden_states: Vec<Tensor>,
}

impl CausalLm {
    /// Loads a Hugging Face model directory (config.json + safetensors), converting the
    /// weights to `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_split(dir, &[device], kind)
    }

    /// Like `load`, with the layers split in equal runs over `devices` (a model too
    /// large for one GPU); inputs go to the first device, outputs come from the last.
    pub fn load_split(dir: &Path, devices: &[Device], kind: Kind) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let files = SafetensorsFiles::open_dir(dir)?;
        let renames = if config.nested_text_model { nested_text_names(&files, dir)? } else { vec![] };
        let source = ParamSource::checkpoint(&files, renames);
        let model =
            Self::build(config, &source, devices, kind).with_context(|| format!("loading model {}", dir.display()))?;
        check_unused(&source, &files, &model.config)?;
        Ok(model)
    }

    /// A model with fresh weights (normal(0, initializer_range), norms at one), as
    /// transformers initialises one. Seed tch first for reproducible weights.
    pub fn random(config: ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        let source = ParamSource::Random { std: config.initializer_range };
        Self::build(config, &source, &[device], kind)
    }

    fn build(config: ModelConfig, source: &ParamSource, devices: &[Device], kind: Kind) -> Result<Self> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
            bail!("model dtype must be float32, bfloat16 or float16, not {kind:?}");
        }
        if devices.is_empty() {
            bail!("no device given for the model");
        }
        let vs = nn::VarStore::new(devices[0]);
        let transformer = Transformer::new(&VarBuilder::new(&vs, source, kind), &config, devices)?;
        Ok(CausalLm { config, vs, transformer, kind })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Where inputs go (the first device of a split model).
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Where logits and the final hidden states come out.
    pub fn output_device(&self) -> Device {
        self.transformer.output_device()
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
    }

    /// Logits and hidden states `capture` (transformers' numbering) for a batch.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        capture: &[usize],
    ) -> Result<ForwardOutput> {
        let hidden = self.transformer.forward_hidden(&ForwardInput::new(input_ids, attention_mask), capture)?;
        Ok(ForwardOutput { logits: self.transformer.logits(&hidden.last), hidden_states: hidden.captured })
    }
}

/// Where the text model of a multimodal (Gemma 3) checkpoint keeps its weights: the
/// hub's original names (`language_model.model.*`, `language_model.lm_head.*`) or
/// transformers 5's (`model.language_model.*`, `lm_head.*`).
fn nested_text_names(files: &SafetensorsFiles, dir: &Path) -> Result<Vec<(String, String)>> {
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    if files.contains("language_model.model.embed_tokens.weight") {
        Ok(vec![pair("model.", "language_model.model."), pair("lm_head.", "language_model.lm_head.")])
    } else if files.contains("model.language_model.embed_tokens.weight") {
        Ok(vec![pair("model.", "model.language_model.")])
    } else {
        bail!(
            "{}: a gemma3 (image + text) config, but no language_model.model.embed_tokens.weight or model.language_model.embed_tokens.weight in its weights",
            dir.display()
        )
    }
}

/// The image side of a multimodal checkpoint, which a text model leaves unused.
const IMAGE_PARTS: &[&str] =
    &["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."];

/// Tensors in the checkpoint that the config leaves no place for mean the config and
/// weights disagree (more layers, a bias the config lacks): refuse them, except for
/// buffers transformers itself ignores and a multimodal checkpoint's image side.
fn check_unused(source: &ParamSource, files: &SafetensorsFiles, config: &ModelConfig) -> Result<()> {
    let mut unexpected = vec![];
    let mut image_side = 0;
    let head = source.stored_name("lm_head.weight");
    for name in source.unused() {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if name == head && config.tie_word_embeddings {
            eprintln!("note: tie_word_embeddings is true; ignoring {head} as transformers does");
            continue;
        }
        if config.nested_text_model && IMAGE_PARTS.iter().any(|p| name.starts_with(p)) {
            image_side += 1;
            continue;
        }
        unexpected.push(name);
    }
    if image_side > 0 {
        eprintln!("note: reading the text model only; {image_side} tensors of the image encoder are left unused");
    }
    if let Some(first) = unexpected.first() {
        let file = files.file_of(first).map(|p| p.display().to_string()).unwrap_or_default();
        let more = if unexpected.len() > 1 { format!(" (and {} more)", unexpected.len() - 1) } else { String::new() };
        bail!("{file}: tensor {first}{more} has no place in the model described by config.json");
    }
    Ok(())
}

/// Parses "float32" | "bfloat16" | "float16" (and common short forms).
pub fn parse_kind(s: &str) -> Result<Kind> {
    Ok(match s {
        "float32" | "f32" | "fp32" | "float" => Kind::Float,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float16" | "f16" | "fp16" | "half" => Kind::Half,
        other => bail!("unknown dtype {other:?} (use float32, bfloat16 or float16)"),
    })
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "unknown",
    }
}
