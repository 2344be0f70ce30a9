//! Making a student from a teacher, as DistilBERT and Minitron do: the teacher's
//! tokenizer and chat template, a subset of its layers (weights copied, so the student
//! starts close to the teacher) and, optionally, a narrower shape with fresh weights.
//! Written in Hugging Face layout, into an empty or new directory (or, with `overwrite`,
//! over a model directory), through a staging directory renamed into place.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use crate::chat::ChatTemplate;
use crate::dataset::read::{read_records, resolve_inputs};
use crate::dataset::FieldNames;
use crate::files::{dir_entries, StagedDir};
use crate::model::{CausalLm, ModelConfig};
use crate::tokenizer::{copy_tokenizer_files, TextTokenizer};

#[derive(Debug, Clone, Default)]
pub struct StudentSpec {
    /// Teacher layers to keep, in order; `None` picks `num_layers` by `pick`.
    pub layers: Option<Vec<usize>>,
    pub num_layers: Option<usize>,
    pub pick: LayerPick,
    /// A narrower shape (fresh weights for every tensor).
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    /// A mixture-of-experts teacher: keep this many experts per layer, the ones its
    /// router chooses most often on `expert_sample`.
    pub num_experts: Option<usize>,
    /// Dataset files (rows as `precompute` reads them) whose tokens the router counts.
    pub expert_sample: Vec<String>,
    pub seed: u64,
    /// Replace a model already in the output directory.
    pub overwrite: bool,
}

/// How `num_layers` teacher layers are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LayerPick {
    /// The first 40% and the last 60%, dropping one contiguous middle block (as ShortGPT
    /// and Minitron's depth pruning find best). Measured on SmolLM2-135M (30 layers ->
    /// 15), held-out perplexity before any training: 1,452 (0-5 + 21-29) against 813,561
    /// for every other layer and 4,975 for 0-7 + 23-29.
    #[default]
    Edges,
    /// Evenly spread, first and last included (DistilBERT's every other layer).
    Spread,
}

/// A layer's kept experts: (teacher expert, router choices on the sample), in order.
pub type KeptExperts = Vec<(usize, i64)>;

#[derive(Debug, Clone)]
pub struct StudentSummary {
    pub layers: Vec<usize>,
    /// Per student layer with experts: the teacher experts kept, and how often the
    /// router chose each of them on the sample.
    pub experts: Vec<Option<KeptExperts>>,
    /// True when the teacher's weights were copied (same width), false for fresh weights.
    pub copied: bool,
    pub parameters: i64,
    pub teacher_parameters: i64,
}

/// The first 40% of `n` layers and the last 60% of `total`.
pub fn edge_layers(total: usize, n: usize) -> Vec<usize> {
    let first = ((n as f64) * 0.4).round() as usize;
    (0..first).chain(total - (n - first)..total).collect()
}

/// `n` of `total` layers, evenly spread, first and last included.
pub fn spread_layers(total: usize, n: usize) -> Vec<usize> {
    match n {
        0 => vec![],
        1 => vec![total - 1],
        _ => (0..n).map(|i| ((i * (total - 1)) as f64 / (n - 1) as f64).round() as usize).collect(),
    }
}

/// Files a model directory holds; `--overwrite` replaces a directory holding only these.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Refuses an output that is the teacher (or holds it), or that is not empty unless
/// `overwrite` and it holds a model alone; writes nothing.
fn check_output(teacher_dir: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    if let (Some(t), Some(o)) = (canonical(teacher_dir), canonical(out)) {
        if t.starts_with(&o) {
            bail!(
                "--output {} holds the teacher {}; the student would replace it",
                out.display(),
                teacher_dir.display()
            );
        }
    }
    let names = dir_entries(out)?;
    let Some(first) = names.first() else { return Ok(()) };
    if !overwrite {
        bail!(
            "--output {} is not empty (it holds {first}); choose an empty or new directory, or --overwrite to replace the model there",
            out.display()
        );
    }
    let model_file = |n: &str| MODEL_FILES.contains(&n) || (n.starts_with("model-") && n.ends_with(".safetensors"));
    if let Some(other) = names.iter().find(|n| !model_file(n)) {
        bail!(
            "--output {} holds {other}, which is not part of a model; --overwrite replaces only a model directory",
            out.display()
        );
    }
    Ok(())
}

/// Refuses a student whose float32 weights would not fit in the memory available.
fn check_size(cfg: &ModelConfig) -> Result<()> {
    let parameters = cfg.num_parameters() as f64;
    let bytes = 4.0 * parameters;
    let available = crate::files::available_memory().map_or(f64::INFINITY, |b| b as f64);
    if bytes > available {
        bail!(
            "the student would have {:.3e} parameters ({:.1} GiB in float32), more than the {:.1} GiB of memory available; choose a smaller shape",
            parameters,
            bytes / (1u64 << 30) as f64,
            available / (1u64 << 30) as f64
        );
    }
    Ok(())
}

pub fn init_student(teacher_dir: &Path, out: &Path, spec: &StudentSpec) -> Result<StudentSummary> {
    check_output(teacher_dir, out, spec.overwrite)?;
    let teacher_cfg = ModelConfig::from_dir(teacher_dir)?;
    let total = teacher_cfg.num_layers;
    let layers = match (&spec.layers, spec.num_layers) {
        (Some(l), _) => l.clone(),
        (None, Some(n)) if n > total => bail!("--num-layers: the teacher has {total} layers"),
        (None, Some(n)) => match spec.pick {
            LayerPick::Edges => edge_layers(total, n),
            LayerPick::Spread => spread_layers(total, n),
        },
        (None, None) => (0..total).collect(),
    };
    if layers.is_empty() {
        bail!("the student needs at least one layer");
    }
    if let Some(&bad) = layers.iter().find(|&&l| l >= total) {
        bail!("--layers: the teacher has layers 0..{} only, not {bad}", total - 1);
    }
    let raw = student_config(&teacher_cfg, &layers, spec)?;
    let cfg = ModelConfig::from_value(Value::Object(raw)).context("the student's config")?;
    check_size(&cfg)?;
    let copied = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        == (
            teacher_cfg.hidden_size,
            teacher_cfg.intermediate_size,
            teacher_cfg.num_heads,
            teacher_cfg.num_kv_heads,
            teacher_cfg.head_dim,
        );
    tch::manual_seed(spec.seed as i64);
    let student = CausalLm::random(cfg, Device::Cpu, Kind::Float)?;
    let teacher = CausalLm::load(teacher_dir, Device::Cpu, Kind::Float)?;
    let experts = match spec.num_experts {
        Some(n) if copied => most_used_experts(teacher_dir, &teacher, &layers, n, &spec.expert_sample)?,
        _ => vec![None; layers.len()],
    };
    if copied {
        let from = teacher.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in student.vs.variables() {
                let (source, rows) = teacher_source(&name, &layers, &experts);
                let t = from.get(&source).with_context(|| format!("the teacher has no tensor {source}"))?;
                match rows {
                    Some(rows) => var.copy_(&t.index_select(0, &Tensor::from_slice(&rows))),
                    None => var.copy_(t),
                };
            }
            Ok(())
        })?;
    }
    // Written next to --output and renamed into place when complete.
    let staged = StagedDir::new(out)?;
    student.save(staged.path(), crate::model::save::DEFAULT_MAX_SHARD_BYTES)?;
    copy_tokenizer_files(teacher_dir, staged.path())?;
    staged.commit()?;
    let count = |m: &CausalLm| m.vs.variables().values().map(|t| t.numel() as i64).sum();
    Ok(StudentSummary { layers, experts, copied, parameters: count(&student), teacher_parameters: count(&teacher) })
}

/// Per kept layer with experts, the `n` experts the teacher's router chose most often on
/// the sample's tokens (ties to the lower number), in the teacher's order, with their
/// counts. Keeping the most used experts and dropping the rest is the simplest
/// frequency-based expert pruning (as in Lu et al. 2024, "Not All Experts are Equal");
/// the router's softmax then runs over the kept ones.
fn most_used_experts(
    teacher_dir: &Path,
    teacher: &CausalLm,
    layers: &[usize],
    n: usize,
    sample: &[String],
) -> Result<Vec<Option<KeptExperts>>> {
    if sample.is_empty() {
        bail!("--num-experts needs --expert-sample FILE: text whose tokens the teacher's router counts");
    }
    let tokenizer = TextTokenizer::from_dir(teacher_dir)?;
    let template = ChatTemplate::load(teacher_dir)?;
    let (records, _) = read_records(&resolve_inputs(sample)?, &FieldNames::default(), false)?;
    let max_len = teacher.config.max_position_embeddings.unwrap_or(usize::MAX).min(SAMPLE_ROW_TOKENS);
    let rows = records
        .iter()
        .map(|r| {
            let tokens = r.example.tokenize_up_to(&tokenizer, template.as_ref(), Some(max_len));
            let ids = tokens.with_context(|| r.location.clone())?.ids;
            Ok(ids.iter().take(max_len).map(|&t| t as i64).collect())
        })
        .collect::<Result<Vec<Vec<i64>>>>()?;
    let usage = teacher.transformer.expert_usage(&rows)?;
    Ok(layers
        .iter()
        .map(|&l| {
            usage[l].as_ref().map(|counts| {
                let mut order: Vec<usize> = (0..counts.len()).collect();
                order.sort_by_key(|&e| (std::cmp::Reverse(counts[e]), e));
                let mut kept: Vec<usize> = order.into_iter().take(n).collect();
                kept.sort_unstable();
                kept.into_iter().map(|e| (e, counts[e])).collect()
            })
        })
        .collect())
}

/// Tokens of one sample row the router sees at most.
const SAMPLE_ROW_TOKENS: usize = 2048;

/// The teacher tensor a student parameter copies, and the rows it takes (a router's rows
/// of the kept experts); expert `j` of student layer `l` is the `j`-th kept expert.
fn teacher_source(name: &str, layers: &[usize], experts: &[Option<Vec<(usize, i64)>>]) -> (String, Option<Vec<i64>>) {
    let source = teacher_name(name, layers);
    let Some(rest) = name.strip_prefix("model.layers.") else { return (source, None) };
    let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let Some(Some(kept)) = index.parse::<usize>().ok().and_then(|j| experts.get(j)) else { return (source, None) };
    if tail.ends_with(".gate.weight") && !tail.contains(".experts.") {
        return (source, Some(kept.iter().map(|&(e, _)| e as i64).collect()));
    }
    let Some((before, after)) = source.split_once(".experts.") else { return (source, None) };
    let (j, rest) = after.split_once('.').unwrap_or((after, ""));
    match j.parse::<usize>() {
        Ok(j) => (format!("{before}.experts.{}.{rest}", kept[j].0), None),
        Err(_) => (source, None),
    }
}

/// `model.layers.{j}.…` of the student is `model.layers.{layers[j]}.…` of the teacher.
fn teacher_name(name: &str, layers: &[usize]) -> String {
    let Some(rest) = name.strip_prefix("model.layers.") else { return name.to_string() };
    let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
    match index.parse::<usize>() {
        Ok(j) => format!("model.layers.{}.{tail}", layers[j]),
        Err(_) => name.to_string(),
    }
}

/// The teacher's config.json with the student's depth and shape; per-layer lists
/// (`layer_types`) keep the entries of the kept layers.
fn student_config(
    teacher: &ModelConfig,
    layers: &[usize],
    spec: &StudentSpec,
) -> Result<serde_json::Map<String, Value>> {
    let mut raw = teacher.raw.clone();
    raw.insert("num_hidden_layers".into(), layers.len().into());
    if let Some(Value::Array(types)) = raw.get("layer_types").cloned() {
        raw.insert("layer_types".into(), Value::Array(layers.iter().map(|&l| types[l].clone()).collect()));
    }
    // Which kept layers have experts, renumbered (Qwen's rule is by layer number).
    if let (Some(moe), false) = (&teacher.moe, teacher.family == crate::model::Family::Mixtral) {
        let dense: Vec<usize> = (0..layers.len()).filter(|&j| !moe.sparse_layers[layers[j]]).collect();
        raw.insert("decoder_sparse_step".into(), 1.into());
        raw.insert("mlp_only_layers".into(), dense.into());
    }
    match (&teacher.moe, spec.num_experts) {
        (None, Some(_)) => bail!("--num-experts: the teacher has no mixture of experts"),
        (Some(moe), Some(n)) => {
            if n == 0 || n > moe.num_experts {
                bail!("--num-experts {n}: the teacher's layers have {} experts", moe.num_experts);
            }
            let key = if raw.contains_key("num_experts") { "num_experts" } else { "num_local_experts" };
            raw.insert(key.into(), n.into());
            raw.insert("num_experts_per_tok".into(), moe.experts_per_token.min(n).into());
        }
        _ => {}
    }
    let narrower = spec.hidden_size.is_some() || spec.num_heads.is_some();
    for (key, value) in [
        ("hidden_size", spec.hidden_size),
        ("intermediate_size", spec.intermediate_size),
        ("num_attention_heads", spec.num_heads),
        ("num_key_value_heads", spec.num_kv_heads),
    ] {
        if let Some(v) = value {
            raw.insert(key.into(), v.into());
        }
    }
    if narrower {
        let hidden = spec.hidden_size.unwrap_or(teacher.hidden_size);
        let heads = spec.num_heads.unwrap_or(teacher.num_heads);
        if !hidden.is_multiple_of(heads) {
            bail!("--hidden-size {hidden} is not a multiple of the {heads} attention heads");
        }
        raw.insert("head_dim".into(), (hidden / heads).into());
    }
    for key in ["torch_dtype", "dtype"] {
        if raw.contains_key(key) {
            raw.insert(key.into(), "float32".into());
        }
    }
    raw.remove("_name_or_path");
    raw.remove("_model_name_or_path");
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_spread_with_first_and_last() {
        assert_eq!(spread_layers(30, 10), [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]);
        assert_eq!(spread_layers(4, 2), [0, 3]);
        assert_eq!(spread_layers(4, 4), [0, 1, 2, 3]);
        assert_eq!(spread_layers(5, 1), [4]);
        assert_eq!(edge_layers(30, 15), [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 26, 27, 28, 29]);
        assert_eq!(edge_layers(4, 4), [0, 1, 2, 3]);
        assert_eq!(edge_layers(4, 1), [3]);
    }

    #[test]
    fn student_layer_names_map_to_the_kept_teacher_layers() {
        assert_eq!(teacher_name("model.layers.1.mlp.up_proj.weight", &[0, 5]), "model.layers.5.mlp.up_proj.weight");
        assert_eq!(teacher_name("model.embed_tokens.weight", &[0, 5]), "model.embed_tokens.weight");
    }

    #[test]
    fn student_experts_map_to_the_kept_teacher_experts() {
        // Student layer 0 = teacher layer 2 (experts 1 and 6 kept); layer 1 = teacher 3 (dense).
        let (layers, experts) = (vec![2, 3], vec![Some(vec![(1, 40), (6, 9)]), None]);
        let source = |name: &str| teacher_source(name, &layers, &experts);
        assert_eq!(
            source("model.layers.0.mlp.experts.1.down_proj.weight"),
            ("model.layers.2.mlp.experts.6.down_proj.weight".into(), None)
        );
        assert_eq!(
            source("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
            ("model.layers.2.block_sparse_moe.experts.1.w1.weight".into(), None)
        );
        assert_eq!(
            source("model.layers.0.mlp.gate.weight"),
            ("model.layers.2.mlp.gate.weight".into(), Some(vec![1, 6]))
        );
        assert_eq!(source("model.layers.0.mlp.shared_expert_gate.weight").1, None);
        assert_eq!(source("model.layers.1.mlp.gate_proj.weight"), ("model.layers.3.mlp.gate_proj.weight".into(), None));
        assert_eq!(source("model.norm.weight"), ("model.norm.weight".into(), None));
    }
}
