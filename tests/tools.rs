//! `student init`, `inspect` and `eval` end to end on tiny models, and the shards read by
//! Arrow tools that know nothing of distill (pyarrow, duckdb).
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};

fn shards(out: &Path) -> PathBuf {
    ok(precompute("llama", &sample(), out, &["--top-k", "8"]));
    out.to_path_buf()
}

/// `distill student init --teacher TEACHER --output OUT EXTRA..`.
fn student_init(teacher: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["student", "init", "--teacher", teacher.to_str().unwrap(), "--output", out.to_str().unwrap()];
    args.extend(extra);
    distill(&args)
}

/// transformers loads `student_dir` and computes the logits `student` computes, on the
/// right-padded batch of the teacher's reference file.
fn assert_transformers_agrees(student: &distill::model::CausalLm, student_dir: &Path, teacher: &Path, work: &Path) {
    let reference = read_tensors(&teacher.join("reference.safetensors"));
    let (ids, mask) = (&reference["right.input_ids"], &reference["right.attention_mask"]);
    let ours = tch::no_grad(|| student.forward(ids, Some(mask), &[])).unwrap().logits;
    let (inputs, hf) = (work.join("inputs.safetensors"), work.join("hf.safetensors"));
    tch::Tensor::write_safetensors(&[("input_ids", ids), ("attention_mask", mask)], &inputs).unwrap();
    run_script(&["logits", student_dir.to_str().unwrap(), inputs.to_str().unwrap(), hf.to_str().unwrap()]);
    let e = rel_err(&ours, &read_tensors(&hf)["logits"], Some(mask));
    assert!(e < 1e-4, "transformers' logits of {} differ by {e:.3e}", student_dir.display());
}

#[test]
fn student_init_keeps_the_chosen_teacher_layers_and_loads_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = model_dir("qwen2");
    let student = tmp.path().join("student");
    let out = ok(student_init(&teacher, &student, &["--layers", "0,2"]));
    assert!(out.contains("[0, 2]") && out.contains("copied"), "{out}");
    let t = distill::model::CausalLm::load(&teacher, Device::Cpu, Kind::Float).unwrap();
    let s = distill::model::CausalLm::load(&student, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(s.config.num_layers, 2);
    let (tv, sv) = (t.vs.variables(), s.vs.variables());
    for (name, source) in [
        ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"),
        ("model.layers.1.self_attn.q_proj.bias", "model.layers.2.self_attn.q_proj.bias"),
        ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ] {
        assert!(sv[name].equal(&tv[source]), "{name} is not the teacher's {source}");
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(student.join(file)).unwrap(), std::fs::read(teacher.join(file)).unwrap());
    }
    assert_transformers_agrees(&s, &student, &teacher, tmp.path());
    // A narrower student has fresh weights of the new shape.
    let narrow = tmp.path().join("narrow");
    let args = ["--hidden-size", "32", "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "48"];
    assert!(ok(student_init(&teacher, &narrow, &args)).contains("fresh"));
    let n = distill::model::CausalLm::load(&narrow, Device::Cpu, Kind::Float).unwrap();
    assert_eq!((n.config.hidden_size, n.config.head_dim, n.config.num_layers), (32, 16, 3));
    // A layer the teacher does not have is refused by name.
    let bad = student_init(&teacher, Path::new("/tmp/x"), &["--layers", "9"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not 9"));
}

/// A student from a multimodal Gemma 3 checkpoint: its text part, fewer layers (the
/// kept layers keep their types and RoPE), written as a gemma3_text model.
#[test]
fn student_init_from_a_multimodal_gemma3_is_a_text_model() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = model_dir("gemma3-mm");
    let student = tmp.path().join("student");
    ok(student_init(&teacher, &student, &["--layers", "1,2"]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gemma3_text");
    assert_eq!(config["layer_types"], serde_json::json!(["full_attention", "sliding_attention"]));
    let s = distill::model::CausalLm::load(&student, Device::Cpu, Kind::Float).unwrap();
    let t = distill::model::CausalLm::load(&teacher, Device::Cpu, Kind::Float).unwrap();
    let (tv, sv) = (t.vs.variables(), s.vs.variables());
    let name = "model.layers.0.self_attn.q_norm.weight";
    assert!(sv[name].equal(&tv["model.layers.1.self_attn.q_norm.weight"]));
    assert_transformers_agrees(&s, &student, &teacher, tmp.path());
}

#[test]
fn inspect_reports_the_set_and_refuses_what_is_not_one() {
    let tmp = tempfile::tempdir().unwrap();
    let set = shards(&tmp.path().join("shards"));
    let text = ok(distill(&["inspect", set.to_str().unwrap(), "--rows", "1", "--targets", "3"]));
    assert!(
        text.contains("top-k 8") && text.contains("shard-00000.parquet") && text.contains("topk_logprobs"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(distill(&["inspect", set.to_str().unwrap(), "--json"]))).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(json["manifest"], manifest);
    let tokens = json["tokens"].as_f64().unwrap();
    let column_bytes: f64 = json["columns"].as_array().unwrap().iter().map(|c| c["bytes"].as_f64().unwrap()).sum();
    assert!(column_bytes > 0.0 && column_bytes < json["bytes"].as_f64().unwrap(), "column bytes {column_bytes}");
    assert!(tokens > 0.0);
    let sample = &json["samples"][0];
    assert!(sample["text"].as_str().unwrap().len() > 20);
    let first = &sample["targets"][0];
    let top_p: f64 = first["top"].as_array().unwrap().iter().map(|t| t[2].as_f64().unwrap()).sum();
    assert!(top_p + first["tail"].as_f64().unwrap() <= 1.0 + 1e-2, "probabilities add up to more than 1");
    for not_a_set in [tmp.path().to_path_buf(), repo().join("tests/data/sample.jsonl")] {
        let out = distill(&["inspect", not_a_set.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.contains("is not a distill shard set") && !stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn eval_gives_the_teacher_zero_kl_and_full_agreement() {
    let tmp = tempfile::tempdir().unwrap();
    let set = shards(&tmp.path().join("shards"));
    let teacher = model_dir("llama");
    let spec = format!("teacher={}", teacher.display());
    let student = format!("student={}", model_dir("qwen3").display());
    let text = repo().join("tests/data/heldout.jsonl");
    let mut args = vec!["eval", "--model", &spec, "--model", &student, "--text", text.to_str().unwrap()];
    args.extend(["--shards", set.to_str().unwrap(), "--device", "cpu", "--json"]);
    args.extend(["--teacher", teacher.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(&ok(distill(&args))).unwrap();
    let (t, s) = (&json[0], &json[1]);
    assert_eq!(t["name"], "teacher");
    // On text, against the teacher's whole distribution (float32 softmaxes: ~1e-7).
    assert!(t["text"]["kl_to_teacher"].as_f64().unwrap().abs() < 1e-6, "{t}");
    assert_eq!(t["text"]["top1_agreement"].as_f64().unwrap(), 1.0, "{t}");
    assert!(s["text"]["kl_to_teacher"].as_f64().unwrap() > 0.05, "{s}");
    // A model with another vocabulary size has no full-vocabulary KL to the teacher.
    let padded = model_dir("qwen2");
    let e = err(distill(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        padded.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--teacher",
        teacher.to_str().unwrap(),
    ]));
    assert!(e.contains("same vocabulary"), "{e}");
    // The stored targets are the teacher's own, rounded to float16.
    assert!(t["shards"]["kl_to_teacher"].as_f64().unwrap() < 1e-3, "{t}");
    assert!(t["shards"]["top1_agreement"].as_f64().unwrap() > 0.99, "{t}");
    assert!(s["shards"]["kl_to_teacher"].as_f64().unwrap() > 0.05, "{s}");
    // Text perplexity is the exponential of the cross-entropy, matching `distill score`.
    let ce = t["text"]["cross_entropy"].as_f64().unwrap();
    assert!((t["text"]["perplexity"].as_f64().unwrap() - ce.exp()).abs() < 1e-9);
    let score = ok(distill(&[
        "score",
        "--model",
        teacher.to_str().unwrap(),
        "--input",
        text.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let all = score.lines().find(|l| l.starts_with("ALL")).unwrap();
    let nll: f64 = all.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((nll - ce).abs() < 1e-3, "score {nll} vs eval {ce}");
}

#[test]
fn pyarrow_and_duckdb_read_the_shards_without_distill() {
    let tmp = tempfile::tempdir().unwrap();
    let set = shards(&tmp.path().join("shards"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(set.join("manifest.json")).unwrap()).unwrap();
    let query = r#"
import sys, duckdb, pyarrow.parquet as pq
d = sys.argv[1]
t = pq.read_table(d + "/shard-00000.parquet")
con = duckdb.connect()
rows, tokens, targets, k_ok, p_ok = con.execute(f"""
    SELECT count(*), sum(num_tokens), sum(num_targets),
           bool_and(len(topk_ids) = num_targets and len(topk_ids[1]) = 8),
           max(list_max(flatten(topk_logprobs))) <= 0
    FROM read_parquet('{d}/shard-*.parquet')""").fetchone()
assert t.num_rows == rows, (t.num_rows, rows)
print(rows, tokens, targets, k_ok, p_ok)
"#;
    let out = Command::new(python()).args(["-c", query, set.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let shard = &manifest["shards"][0];
    let expected = format!("{} {} {} True True", shard["rows"], shard["tokens"], shard["targets"]);
    assert_eq!(printed.trim(), expected);
}

/// A mixture-of-experts student: two of the teacher's layers (one dense, one with
/// experts) and the 3 of 8 experts its router chooses most on held-out text, counted as
/// transformers' router counts them; the student loads in transformers with our logits.
#[test]
fn student_init_keeps_the_most_used_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = model_dir("qwen3-moe");
    let (student, sample) = (tmp.path().join("student"), repo().join("tests/data/heldout.jsonl"));
    let args = ["--layers", "1,2", "--num-experts", "3", "--expert-sample", sample.to_str().unwrap()];
    let out = ok(student_init(&teacher, &student, &args));
    // "layer 2 experts kept (router choices on the sample): 4 (12), 6 (15), 7 (20)"
    let line = out.lines().find(|l| l.contains("layer 2 experts kept")).unwrap_or_else(|| panic!("{out}"));
    let kept: Vec<(usize, i64)> = line
        .split(": ")
        .nth(1)
        .unwrap()
        .split(", ")
        .map(|p| {
            let (e, n) = p.split_once(" (").unwrap();
            (e.parse().unwrap(), n.trim_end_matches(')').parse().unwrap())
        })
        .collect();
    assert_eq!(kept.len(), 3, "{out}");
    assert!(!out.contains("layer 1 experts"), "teacher layer 1 is dense: {out}");
    // transformers' router on the same rows, each alone.
    let counts_file = tmp.path().join("counts.json");
    python_ok(
        r#"
import json, sys, torch, transformers
from tokenizers import Tokenizer
model_dir, sample, out = sys.argv[1:4]
tok = Tokenizer.from_file(model_dir + "/tokenizer.json")
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
counts = torch.zeros(model.config.num_experts, dtype=torch.long)
for line in open(sample):
    ids = torch.tensor([tok.encode(json.loads(line)["text"]).ids])
    with torch.no_grad():
        # One entry per layer with experts (0 and 2): layer 2's is the second.
        logits = model(input_ids=ids, output_router_logits=True).router_logits[1]
    chosen = logits.softmax(-1).topk(model.config.num_experts_per_tok, -1).indices.flatten()
    counts += torch.bincount(chosen, minlength=model.config.num_experts)
json.dump(counts.tolist(), open(out, "w"))
"#,
        &[&teacher, &sample, &counts_file],
    );
    let counts: Vec<i64> = serde_json::from_str(&std::fs::read_to_string(&counts_file).unwrap()).unwrap();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&e| (std::cmp::Reverse(counts[e]), e));
    let mut want: Vec<(usize, i64)> = order[..3].iter().map(|&e| (e, counts[e])).collect();
    want.sort_unstable();
    assert_eq!(kept, want, "transformers' router counts {counts:?}");

    let t = distill::model::CausalLm::load(&teacher, Device::Cpu, Kind::Float).unwrap();
    let s = distill::model::CausalLm::load(&student, Device::Cpu, Kind::Float).unwrap();
    let moe = s.config.moe.clone().unwrap();
    assert_eq!((moe.num_experts, moe.experts_per_token, moe.sparse_layers), (3, 2, vec![false, true]));
    let (tv, sv) = (t.vs.variables(), s.vs.variables());
    let rows = tch::Tensor::from_slice(&kept.iter().map(|&(e, _)| e as i64).collect::<Vec<_>>());
    assert!(sv["model.layers.1.mlp.gate.weight"].equal(&tv["model.layers.2.mlp.gate.weight"].index_select(0, &rows)));
    for (j, &(e, _)) in kept.iter().enumerate() {
        let (name, source) = (
            format!("model.layers.1.mlp.experts.{j}.down_proj.weight"),
            format!("model.layers.2.mlp.experts.{e}.down_proj.weight"),
        );
        assert!(sv[&name].equal(&tv[&source]), "{name} is not the teacher's {source}");
    }
    assert!(sv["model.layers.0.mlp.up_proj.weight"].equal(&tv["model.layers.1.mlp.up_proj.weight"]));
    assert_transformers_agrees(&s, &student, &teacher, tmp.path());
    // Experts of a dense teacher, or more experts than it has, are refused by name.
    let qwen3 = model_dir("qwen3");
    for (t, n) in [(&qwen3, "2"), (&teacher, "9")] {
        let out = tmp.path().join(format!("bad-{n}"));
        let bad = student_init(t, &out, &["--num-experts", n, "--expert-sample", sample.to_str().unwrap()]);
        assert_eq!(bad.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("--num-experts"), "{bad:?}");
    }
}
