//! Load -> save -> load in transformers gives the same logits; our own reload is exact.
mod common;
use common::*;
use distill::model::CausalLm;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// transformers' logits for `dir` on the "right" batch of the model's reference file.
fn transformers_logits(dir: &Path, ids: &Tensor, mask: &Tensor, work: &Path) -> Tensor {
    let inputs = work.join("inputs.safetensors");
    let out = work.join("hf_logits.safetensors");
    Tensor::write_safetensors(&[("input_ids", ids), ("attention_mask", mask)], &inputs).unwrap();
    run_script(&["logits", dir.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap()]);
    read_tensors(&out).remove("logits").unwrap()
}

/// The tests of this file run their forwards one at a time: concurrent tests share
/// libtorch's OpenMP threads, and one CI run (2026-12-06) saw two forwards of identical
/// weights differ by 1.9e-4 while the tests ran side by side (not reproduced in 11 runs
/// since; noted in the issue-30 note).
static FORWARDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn roundtrip(name: &str, kind: Kind, max_shard_bytes: usize) {
    let _one_at_a_time = FORWARDS.lock().unwrap_or_else(|e| e.into_inner());
    let tol = 1e-4;
    let src = model_dir(name);
    let reference = read_tensors(&src.join("reference.safetensors"));
    let (ids, mask) = (&reference["right.input_ids"], &reference["right.attention_mask"]);
    let model = CausalLm::load(&src, Device::Cpu, kind).unwrap();
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved");
    model.save(&saved, max_shard_bytes).unwrap();
    distill::tokenizer::copy_tokenizer_files(&src, &saved).unwrap();

    let ours = tch::no_grad(|| model.forward(ids, Some(mask), &[])).unwrap().logits;
    let again = CausalLm::load(&saved, Device::Cpu, kind).unwrap();
    // The reload holds the very tensors (bit for bit), and computes the very logits.
    let (before, after) = (model.vs.variables(), again.vs.variables());
    assert_eq!(before.len(), after.len(), "{name}: the reload has other tensors");
    for (n, t) in &before {
        assert!(t.equal(&after[n]), "{name}: {n} changed in the save");
    }
    let ours_again = tch::no_grad(|| again.forward(ids, Some(mask), &[])).unwrap().logits;
    assert_eq!(rel_err(&ours_again, &ours, Some(mask)), 0.0, "{name}: reloading our own save changed the logits");

    // transformers computes in float32 (see tiny_models.py), so compare our float32 read
    // of the same saved file.
    let ours_f32 = CausalLm::load(&saved, Device::Cpu, Kind::Float).unwrap();
    let ours = tch::no_grad(|| ours_f32.forward(ids, Some(mask), &[])).unwrap().logits;
    let hf = transformers_logits(&saved, ids, mask, work.path());
    let e = rel_err(&ours, &hf, Some(mask));
    eprintln!("{name} saved as {kind:?}: transformers vs ours {e:.2e}");
    assert!(e < tol, "{name}: transformers' logits for our saved model differ by {e:.3e}");
}

#[test]
fn float32_save_loads_in_transformers() {
    roundtrip("qwen3", Kind::Float, usize::MAX);
}

#[test]
fn sharded_save_with_tied_head_loads_in_transformers() {
    // 40 kB shards force an index file; the tied head must not be written twice.
    roundtrip("qwen2", Kind::Float, 40_000);
    let model = CausalLm::load(&model_dir("qwen2"), Device::Cpu, Kind::Float).unwrap();
    assert!(!model.vs.variables().contains_key("lm_head.weight"));
}

#[test]
fn bfloat16_save_loads_in_transformers() {
    // Written from a bfloat16 model: the file holds bf16 weights that both sides read.
    roundtrip("llama-tied-bf16", Kind::BFloat16, usize::MAX);
}

#[test]
fn mixture_of_experts_saves_load_in_transformers() {
    // Per-expert tensors under the hub's names (Mixtral's block_sparse_moe.experts.e.w1..),
    // a dense layer among sparse ones, the shared expert; bf16 and sharded too.
    roundtrip("qwen3-moe", Kind::Float, usize::MAX);
    roundtrip("mixtral", Kind::Float, 60_000);
    roundtrip("qwen2-moe", Kind::BFloat16, usize::MAX);
}

#[test]
fn gemma_saves_load_in_transformers() {
    // (1 + w) norms and the sandwich norms under Gemma's names, soft-capping in config;
    // the multimodal checkpoint's text part is saved as a gemma3_text model.
    roundtrip("gemma2", Kind::Float, usize::MAX);
    roundtrip("gemma3", Kind::Float, 60_000);
    roundtrip("gemma3-mm", Kind::BFloat16, usize::MAX);
    let text = CausalLm::load(&model_dir("gemma3-mm"), Device::Cpu, Kind::Float).unwrap();
    let config = text.config.to_json("float32");
    assert_eq!(
        (config["model_type"].as_str(), config["architectures"][0].as_str()),
        (Some("gemma3_text"), Some("Gemma3ForCausalLM"))
    );
}
