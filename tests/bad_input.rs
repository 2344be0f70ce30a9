//! Broken model directories give errors that name the file and the tensor or field,
//! through the library and through the `distill` binary (exit code 1, no panic).
mod common;
use common::*;
use distill::model::CausalLm;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

fn load_error(dir: &Path) -> String {
    match CausalLm::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Runs `distill score` on the model and returns stderr; it must fail cleanly.
fn cli_error(dir: &Path) -> String {
    let input = dir.join("input.jsonl");
    std::fs::write(&input, "{\"text\": \"Alice was beginning to get very tired.\"}\n").unwrap();
    err(distill(&["score", "--device", "cpu", "--model", dir.to_str().unwrap(), "--input", input.to_str().unwrap()]))
}

#[test]
fn missing_weight_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("qwen3", tmp.path());
    edit_weights(&dir, |t| t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let e = load_error(&dir);
    assert_names(&e, &["missing weight", "model.layers.1.mlp.up_proj.weight", "qwen3"]);
    assert_names(&cli_error(&dir), &["model.layers.1.mlp.up_proj.weight"]);
}

#[test]
fn shape_that_disagrees_with_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("qwen3", tmp.path());
    edit_config(&dir, |c| c["intermediate_size"] = 100.into());
    let e = load_error(&dir);
    assert_names(&e, &["model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[100, 64]"]);
    assert_names(&cli_error(&dir), &["model.layers.0.mlp.gate_proj.weight"]);
}

#[test]
fn extra_tensor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    edit_config(&dir, |c| c["num_hidden_layers"] = 2.into());
    let e = load_error(&dir);
    assert_names(&e, &["model.safetensors", "model.layers.2.", "no place"]);
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    edit_config(&dir, |c| c["model_type"] = "gpt2".into());
    assert_names(&load_error(&dir), &["config.json", "model_type", "gpt2"]);
    assert_names(&cli_error(&dir), &["config.json", "model_type"]);
}

#[test]
fn unknown_rope_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    edit_config(&dir, |c| c["rope_parameters"]["rope_type"] = "yarn".into());
    assert_names(&load_error(&dir), &["config.json", "rope_parameters", "yarn"]);
    // The transformers 4 spelling is refused the same way.
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0});
    });
    assert_names(&cli_error(&dir), &["config.json", "rope_scaling", "dynamic"]);
}

#[test]
fn tokenizer_that_does_not_fit_the_vocabulary_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    edit_config(&dir, |c| c["vocab_size"] = 300.into());
    assert_names(&cli_error(&dir), &["tokenizer.json", "config.json", "vocab_size", "300"]);
}

#[test]
fn truncated_weights_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&load_error(&dir), &["model.safetensors"]);
    assert_names(&cli_error(&dir), &["model.safetensors"]);
}

#[test]
fn impossible_config_values_are_refused_before_they_make_nan() {
    let tmp = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &[&str]); 4] = [
        ("eps", |c| c["rms_norm_eps"] = (-1e-5).into(), &["rms_norm_eps", "-0.00001"]),
        ("window", |c| c["sliding_window"] = 0.into(), &["sliding_window", "positive"]),
        ("theta", |c| c["rope_parameters"]["rope_theta"] = 0.into(), &["rope_theta", "positive"]),
        // llama3 RoPE divides by high_freq_factor - low_freq_factor.
        (
            "llama3",
            |c| c["rope_parameters"]["high_freq_factor"] = c["rope_parameters"]["low_freq_factor"].clone(),
            &["high_freq_factor", "low_freq_factor"],
        ),
    ];
    for (name, edit, parts) in cases {
        // A window only matters where a layer slides (Qwen2-MoE writes 0 when none does).
        let model = if name == "window" { "mistral" } else { "llama" };
        let dir = copy_model(model, &tmp.path().join(name));
        edit_config(&dir, edit);
        assert_names(&load_error(&dir), parts);
        assert_names(&cli_error(&dir), &["config.json"]);
    }
}

#[test]
fn a_weight_index_cannot_point_outside_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model("llama", tmp.path());
    // A file outside the model directory that holds valid weights: still refused.
    let outside = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::rename(dir.join("model.safetensors"), outside.join("model.safetensors")).unwrap();
    let names: Vec<String> =
        Tensor::read_safetensors(outside.join("model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
    for target in ["../elsewhere/model.safetensors", outside.join("model.safetensors").to_str().unwrap()] {
        let map: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.clone(), serde_json::Value::from(target))).collect();
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        assert_names(&load_error(&dir), &["model.safetensors.index.json", "weight_map", "not a plain file name"]);
    }
}

/// The case: a teacher whose config.json makes no sense (a RoPE base of 0 beside
/// transformers 5's `rope_parameters` once precomputed a "complete" set of near-uniform
/// targets) is refused by name before `precompute` or `student init` writes anything.
#[test]
fn a_config_that_makes_no_sense_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &[&str]); 7] = [
        ("theta-beside-parameters", |c| c["rope_theta"] = 0.into(), &["rope_theta", "positive"]),
        ("theta-negative", |c| c["rope_parameters"]["rope_theta"] = (-10000.0).into(), &["rope_theta", "-10000"]),
        ("eps-zero", |c| c["rms_norm_eps"] = 0.into(), &["rms_norm_eps", "positive"]),
        ("hidden-zero", |c| c["hidden_size"] = 0.into(), &["hidden_size", "positive"]),
        ("layers-negative", |c| c["num_hidden_layers"] = (-2).into(), &["num_hidden_layers", "-2"]),
        ("positions-zero", |c| c["max_position_embeddings"] = 0.into(), &["max_position_embeddings"]),
        // head_dim x heads no longer the width of the weights' q/k/v projections.
        ("head-dim", |c| c["head_dim"] = 16.into(), &["model.safetensors", "q_proj.weight"]),
    ];
    for (name, edit, parts) in cases {
        let dir = copy_model("qwen3", &tmp.path().join(name));
        edit_config(&dir, edit);
        let out = tmp.path().join(format!("{name}-shards"));
        let e = err(precompute(dir.to_str().unwrap(), &sample(), &out, &[]));
        assert_names(&e, parts);
        assert!(!out.exists(), "{name}: precompute created {} before refusing", out.display());
        let student = tmp.path().join(format!("{name}-student"));
        let e = err(distill(&[
            "student",
            "init",
            "--teacher",
            dir.to_str().unwrap(),
            "--output",
            student.to_str().unwrap(),
            "--num-layers",
            "1",
        ]));
        assert_names(&e, &[parts[0]]);
        assert!(!student.exists(), "{name}: student init created {}", student.display());
    }
}
