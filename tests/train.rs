//! `distill train` end to end on tiny models: a student learns the teacher on held-out
//! shards, resume is exact, checkpoints load in transformers, bad input stops cleanly.
mod common;
use common::*;
use distill::batch::feed::FeedOptions;
use distill::eval::shards::evaluate;
use distill::model::CausalLm;
use distill::shards::reader::ShardSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use tch::{Device, Kind};

/// Teacher shards (tiny llama, k = 16) of a data file.
fn shards(data: &str, out: &Path) -> PathBuf {
    shards_with(data, out, &[])
}

fn shards_with(data: &str, out: &Path, extra: &[&str]) -> PathBuf {
    let mut args = if extra.contains(&"--top-k") { vec![] } else { vec!["--top-k", "16"] };
    args.extend(extra);
    ok(precompute("llama", &repo().join("tests/data").join(data), out, &args));
    out.to_path_buf()
}

fn train(shards: &Path, out: &Path, extra: &[&str]) -> Output {
    train_student("qwen3", shards, out, extra)
}

fn train_student(student: &str, shards: &Path, out: &Path, extra: &[&str]) -> Output {
    let student = model_dir(student);
    let mut args = vec!["train", "--student", student.to_str().unwrap(), "--shards", shards.to_str().unwrap()];
    args.extend(["--output", out.to_str().unwrap(), "--device", "cpu", "--batch-tokens", "512"]);
    if !extra.contains(&"--lr") {
        args.extend(["--lr", "3e-3"]);
    }
    args.extend(extra);
    distill(&args)
}

/// Train and held-out shards of tiny teacher `teacher` (k = 16), under `dir`.
fn teacher_sets(teacher: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let data = repo().join("tests/data");
    let (train_set, held_out) = (dir.join(format!("{teacher}-train")), dir.join(format!("{teacher}-heldout")));
    ok(precompute(teacher, &data.join("sample.jsonl"), &train_set, &["--top-k", "16"]));
    ok(precompute(teacher, &data.join("heldout.jsonl"), &held_out, &["--top-k", "16"]));
    (train_set, held_out)
}

/// 30 steps of pure KD of tiny `student` on `train_set` into `out`: the held-out KL to
/// the teacher before and after (the checkpoint of step 30).
fn kd_kl_before_after(student: &str, train_set: &Path, held_out: &Path, out: &Path, extra: &[&str]) -> (f64, f64) {
    let before = eval_kl(&model_dir(student), held_out);
    let mut args = vec!["--steps", "30", "--save-every", "30", "--alpha", "0"];
    args.extend(extra);
    ok(train_student(student, train_set, out, &args));
    (before, eval_kl(&out.join("checkpoint-0000030"), held_out))
}

fn eval_kl(model: &Path, shards: &Path) -> f64 {
    let m = CausalLm::load(model, Device::Cpu, Kind::Float).unwrap();
    let set = Arc::new(ShardSet::open(shards, false).unwrap());
    evaluate(&m, set, Device::Cpu, FeedOptions { batch_tokens: 2048, pack_to: None }).unwrap().kl
}

#[test]
fn kd_lowers_kl_to_the_teacher_on_held_out_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let held_out = shards("heldout.jsonl", &tmp.path().join("heldout"));
    let out = tmp.path().join("run");
    // Pure KD (the default mixes in the hard labels): the teacher alone must teach.
    let (before, after) = kd_kl_before_after("qwen3", &train_set, &held_out, &out, &[]);
    eprintln!("held-out KL to the teacher: {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "held-out KL did not fall: {before} -> {after}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 30);
    assert!(out.join("loss.png").exists(), "the loss plot is written next to the checkpoints");
}

/// Experts on both sides: a mixture-of-experts teacher (Qwen3-MoE) teaches the dense
/// student, and the dense teacher teaches a mixture-of-experts student (Mixtral), which
/// saves per-expert tensors that its own loader reads back.
#[test]
fn experts_teach_and_learn() {
    let tmp = tempfile::tempdir().unwrap();
    let (train_set, held_out) = teacher_sets("qwen3-moe", tmp.path());
    assert_eq!(manifest(&train_set)["settings"]["teacher"]["architecture"], "Qwen3MoeForCausalLM");
    let out = tmp.path().join("dense-student");
    let (before, after) = kd_kl_before_after("qwen3", &train_set, &held_out, &out, &[]);
    eprintln!("Qwen3-MoE teacher -> dense student, held-out KL {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "held-out KL to the MoE teacher did not fall: {before} -> {after}");

    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let held_out = shards("heldout.jsonl", &tmp.path().join("heldout"));
    let out = tmp.path().join("moe-student");
    let (before, after) = kd_kl_before_after("mixtral", &train_set, &held_out, &out, &[]);
    eprintln!("dense teacher -> Mixtral student, held-out KL {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "held-out KL of the MoE student did not fall: {before} -> {after}");
    let saved = CausalLm::load(&out.join("checkpoint-0000030"), Device::Cpu, Kind::Float).unwrap();
    let names = saved.vs.variables();
    assert!(names.contains_key("model.layers.2.block_sparse_moe.experts.3.w2.weight"));
    assert!(names.contains_key("model.layers.0.block_sparse_moe.gate.weight"));
}

/// Gemma on both sides: a Gemma 2 teacher (soft-capped attention and logits) teaches a
/// Gemma 3 student, and a Gemma 3 teacher a Gemma 2 student, whose loss sees its capped
/// logits (the fused head's gradient through the cap) and whose soft-capped attention
/// is recomputed layer by layer (`--recompute`). A logit cap of 2 keeps the Gemma 2
/// student near uniform and slow to move (at lr 3e-3: 0.67 -> 0.53 in 30 steps, 0.48 in
/// 100), so it trains at lr 1e-2.
#[test]
fn gemma_teaches_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    for (teacher, architecture, student, extra) in [
        ("gemma2", "Gemma2ForCausalLM", "gemma3", &[][..]),
        ("gemma3", "Gemma3ForCausalLM", "gemma2", &["--recompute", "--lr", "1e-2"][..]),
    ] {
        let (train_set, held_out) = teacher_sets(teacher, tmp.path());
        assert_eq!(manifest(&train_set)["settings"]["teacher"]["architecture"], architecture);
        let out = tmp.path().join(format!("{student}-student"));
        let (before, after) = kd_kl_before_after(student, &train_set, &held_out, &out, extra);
        eprintln!("{teacher} teacher -> {student} student {extra:?}, held-out KL {before:.4} -> {after:.4}");
        assert!(after < 0.8 * before, "held-out KL of the {student} student did not fall: {before} -> {after}");
    }
}

/// The routers' load-balancing loss of a model on held-out shards' rows (one batch,
/// right-padded; padding excluded).
fn router_balance(model: &Path, shards: &Path) -> f64 {
    let m = CausalLm::load(model, Device::Cpu, Kind::Float).unwrap();
    let set = ShardSet::open(shards, false).unwrap();
    let rows: Vec<Vec<i64>> = set
        .row_groups()
        .iter()
        .flat_map(|&g| set.decode(g).unwrap())
        .map(|r| r.sequence.ids.iter().map(|&t| t as i64).collect())
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> =
        rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(2, width - r.len()))).collect();
    let mask: Vec<i64> = rows.iter().flat_map(|r| (0..width).map(|t| (t < r.len()) as i64)).collect();
    let shape = [rows.len() as i64, width as i64];
    let (ids, mask) = (tch::Tensor::from_slice(&ids).view(shape), tch::Tensor::from_slice(&mask).view(shape));
    m.transformer.record_routing(true);
    tch::no_grad(|| m.forward(&ids, Some(&mask), &[])).unwrap();
    let records = m.transformer.take_routing();
    let real = mask.reshape([-1]).to_kind(Kind::Float);
    let balance = distill::model::moe::RouterBalance::new(&records, &real).unwrap();
    records.iter().map(|r| balance.term(r, &real).double_value(&[])).sum()
}

/// `--router-aux-weight` evens out a mixture-of-experts student's routing on held-out
/// rows (the loss is k = 2 when every expert gets an equal share), with `--recompute`
/// too; a dense student refuses it by name.
#[test]
fn router_balance_loss_evens_out_the_students_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let held_out = shards("heldout.jsonl", &tmp.path().join("heldout"));
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["--steps", "30", "--save-every", "30", "--alpha", "0"];
        args.extend(extra.iter().copied());
        ok(train_student("mixtral", &train_set, &out, &args));
        out
    };
    let plain = run("plain", &[]);
    let balanced = run("balanced", &["--router-aux-weight", "1.0", "--recompute"]);
    let before = router_balance(&model_dir("mixtral"), &held_out);
    let (without, with) = (
        router_balance(&plain.join("checkpoint-0000030"), &held_out),
        router_balance(&balanced.join("checkpoint-0000030"), &held_out),
    );
    eprintln!("held-out balance loss: start {before:.4}, 30 steps without {without:.4}, with {with:.4}");
    assert!(with < without && with < before, "{before} -> without {without}, with {with}");
    let logs = std::fs::read_to_string(balanced.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(logs.lines().next().unwrap()).unwrap();
    assert!(first["router_balance"].as_f64().unwrap() >= 2.0 - 1e-6, "{first}");
    let plain_log = std::fs::read_to_string(plain.join("metrics.jsonl")).unwrap();
    assert!(!plain_log.contains("router_balance"));
    let e = err(train(&train_set, &tmp.path().join("dense"), &["--steps", "1", "--router-aux-weight", "0.1"]));
    assert!(e.contains("--router-aux-weight") && e.contains("no mixture of experts"), "{e}");
}

#[test]
fn label_bucket_and_tail_draws_teach_the_teacher_on_held_out_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let held_out = shards("heldout.jsonl", &tmp.path().join("heldout"));
    let before = eval_kl(&model_dir("qwen3"), &held_out);
    let label_set = shards("sample.jsonl", &tmp.path().join("train"));
    let drawn_set = shards_with("sample.jsonl", &tmp.path().join("drawn"), &["--top-k", "0", "--sample", "12"]);
    let adaptive_set = shards_with("sample.jsonl", &tmp.path().join("adaptive"), &["--top-p", "0.8", "--sample", "4"]);
    for (name, set, extra) in [
        ("label bucket", &label_set, &["--label-bucket"][..]),
        ("draws alone", &drawn_set, &[][..]),
        ("mass-adaptive top-16 + label bucket + draws", &adaptive_set, &["--label-bucket"][..]),
    ] {
        let out = tmp.path().join(name.replace(' ', "-"));
        let mut args = vec!["--steps", "30", "--save-every", "30", "--alpha", "0"];
        args.extend(extra.iter().copied());
        ok(train(set, &out, &args));
        let after = eval_kl(&out.join("checkpoint-0000030"), &held_out);
        eprintln!("{name}: held-out KL to the teacher {before:.4} -> {after:.4}");
        assert!(after < 0.8 * before, "{name}: held-out KL did not fall: {before} -> {after}");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(record["settings"]["label_bucket"], extra.contains(&"--label-bucket"));
    }
    // Draws estimate the forward KL only; no top-k to renormalise over.
    let out = tmp.path().join("refused");
    let e = err(train(&drawn_set, &out, &["--steps", "1", "--renormalized-topk"]));
    assert!(e.contains("forward KL on buckets only"), "{e}");
    // Top-k shards with draws serve every loss: reverse KL trains on their top-k buckets.
    ok(train(&adaptive_set, &out, &["--steps", "2", "--loss", "reverse-kl"]));
}

#[test]
fn packing_rows_gives_the_losses_of_padding_them() {
    let tmp = tempfile::tempdir().unwrap();
    let set = Arc::new(ShardSet::open(&shards("sample.jsonl", &tmp.path().join("s")), false).unwrap());
    let model = CausalLm::load(&model_dir("qwen3"), Device::Cpu, Kind::Float).unwrap();
    let seq = set.manifest.settings.data.max_len;
    let run = |pack_to| evaluate(&model, set.clone(), Device::Cpu, FeedOptions { batch_tokens: 4 * seq, pack_to });
    let (padded, packed) = (run(None).unwrap(), run(Some(seq)).unwrap());
    eprintln!("padded {padded:?}\npacked {packed:?}");
    assert_eq!(padded.targets, packed.targets);
    assert!((padded.kl - packed.kl).abs() < 1e-5 * padded.kl, "KL {} vs {}", padded.kl, packed.kl);
    assert!((padded.ce - packed.ce).abs() < 1e-5 * padded.ce, "CE {} vs {}", padded.ce, packed.ce);
    assert_eq!(padded.top1_agreement, packed.top1_agreement);
    assert!(packed.slots < padded.slots, "packing must save padding: {} vs {}", packed.slots, padded.slots);
}

#[test]
fn bf16_autocast_training_learns_like_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let steps = ["--steps", "8", "--save-every", "8", "--pack"];
    let losses = |precision: &str| -> Vec<f64> {
        let out = tmp.path().join(precision);
        let mut args = steps.to_vec();
        args.extend(["--precision", precision]);
        ok(train(&train_set, &out, &args));
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let (f32_losses, bf16_losses) = (losses("f32"), losses("bf16"));
    eprintln!("f32  {f32_losses:?}\nbf16 {bf16_losses:?}");
    // bf16 keeps 8 mantissa bits: per-step losses agree to a few percent, and both fall.
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        assert!((a - b).abs() < 0.05 * a, "f32 {a} vs bf16 {b}");
    }
    assert!(f32_losses != bf16_losses, "identical losses: autocast did not take effect");
    assert!(bf16_losses[7] < 0.9 * bf16_losses[0]);
    // Weights stay float32 (master copy) in the checkpoint.
    let ckpt = read_tensors(&tmp.path().join("bf16/checkpoint-0000008/model.safetensors"));
    assert!(ckpt.values().all(|t| t.kind() == Kind::Float));
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    // Packed batches and recomputed activations, so their positions and gradients are covered.
    let common = [
        "--save-every",
        "3",
        "--grad-accum",
        "2",
        "--loss",
        "jsd",
        "--alpha",
        "0.2",
        "--warmup-steps",
        "2",
        "--pack",
        "--recompute",
    ];
    let mut all = common.to_vec();
    all.extend(["--steps", "6"]);
    ok(train(&train_set, &straight, &all));
    // 3 steps of the 6-step schedule, stop, then resume for the other 3.
    let mut half = all.clone();
    half.extend(["--stop-at", "3"]);
    ok(train(&train_set, &split, &half));
    assert!(split.join("checkpoint-0000003").exists() && !split.join("checkpoint-0000006").exists());
    let mut resume = all.clone();
    resume.push("--resume");
    ok(train(&train_set, &split, &resume));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("checkpoint-0000006").join(file)).unwrap();
        let b = std::fs::read(split.join("checkpoint-0000006").join(file)).unwrap();
        assert!(a == b, "{file} differs between a straight and a resumed run");
    }
}

#[test]
fn checkpoints_load_in_transformers_with_equal_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let out = tmp.path().join("run");
    ok(train(&train_set, &out, &["--steps", "2", "--save-every", "2"]));
    let ckpt = out.join("checkpoint-0000002");
    let reference = read_tensors(&model_dir("qwen3").join("reference.safetensors"));
    let (ids, mask) = (&reference["right.input_ids"], &reference["right.attention_mask"]);
    let model = CausalLm::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
    let ours = tch::no_grad(|| model.forward(ids, Some(mask), &[])).unwrap().logits;
    let inputs = tmp.path().join("inputs.safetensors");
    let hf = tmp.path().join("hf.safetensors");
    tch::Tensor::write_safetensors(&[("input_ids", ids), ("attention_mask", mask)], &inputs).unwrap();
    run_script(&["logits", ckpt.to_str().unwrap(), inputs.to_str().unwrap(), hf.to_str().unwrap()]);
    let e = rel_err(&ours, &read_tensors(&hf)["logits"], Some(mask));
    assert!(e < 1e-4, "transformers' logits of the checkpoint differ by {e:.3e}");
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let out = tmp.path().join("run");
    let res = train(
        &train_set,
        &out,
        &["--steps", "6", "--save-every", "1", "--lr", "1e30", "--clip-norm", "1e30", "--weight-decay", "0"],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("step ") && stderr.contains("loss is") && !stderr.contains("panicked"), "{stderr}");
    assert!(out.join("checkpoint-0000001").join("model.safetensors").exists(), "the last good checkpoint is kept");
}

#[test]
fn shards_of_another_tokenizer_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    // A student whose tokenizer.json differs (same vocabulary, another file).
    let student = tmp.path().join("student");
    std::fs::create_dir_all(&student).unwrap();
    for e in std::fs::read_dir(model_dir("qwen3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), student.join(e.file_name())).unwrap();
    }
    let tok = std::fs::read_to_string(student.join("tokenizer.json")).unwrap();
    std::fs::write(student.join("tokenizer.json"), format!("{tok}\n")).unwrap();
    let args = |force: bool| {
        let mut a = vec!["train".to_string(), "--student".into(), student.display().to_string()];
        a.extend([
            "--shards".into(),
            train_set.display().to_string(),
            "--output".into(),
            tmp.path().join("o").display().to_string(),
        ]);
        a.extend([
            "--device".into(),
            "cpu".into(),
            "--steps".into(),
            "1".into(),
            "--batch-tokens".into(),
            "512".into(),
        ]);
        if force {
            a.push("--force-tokenizer".into());
        }
        a
    };
    let run = |force: bool| {
        let a = args(force);
        distill(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("manifest.json") && stderr.contains("tokenizer.json hash"), "{stderr}");
    ok(run(true));
}

#[test]
fn hidden_state_distillation_learns_through_the_projection() {
    let tmp = tempfile::tempdir().unwrap();
    let set = shards_with("sample.jsonl", &tmp.path().join("hidden-shards"), &["--hidden-layers", "2"]);
    let out = tmp.path().join("run");
    ok(train(&set, &out, &["--steps", "20", "--save-every", "10", "--hidden-map", "2:2", "--hidden-weight", "0.1"]));
    let logs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (first, last) = (logs[0]["hidden"].as_f64().unwrap(), logs[19]["hidden"].as_f64().unwrap());
    eprintln!("hidden-state MSE per token: {first:.3} -> {last:.3}");
    assert!(last < 0.7 * first, "hidden loss did not fall: {first} -> {last}");
    assert!(out.join("checkpoint-0000020/projections.safetensors").exists());
    // A teacher layer the shards do not hold is refused by name.
    let res = train(&set, &tmp.path().join("bad"), &["--steps", "1", "--hidden-map", "1:2"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(stderr.contains("--hidden-map 1:2") && stderr.contains("[2]"), "{stderr}");
}

#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let out = tmp.path().join("run");
    ok(train(&train_set, &out, &["--steps", "2", "--save-every", "1"]));
    let before = std::fs::read(out.join("checkpoint-0000002/model.safetensors")).unwrap();
    // A file where the next checkpoint's temporary directory must go makes its write fail,
    // as a full disk would, after the step has run.
    std::fs::write(out.join(".checkpoint-0000003.tmp"), "in the way").unwrap();
    let res = train(&train_set, &out, &["--steps", "3", "--save-every", "1", "--resume"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checkpoint-0000003") && stderr.contains("intact"), "{stderr}");
    assert_eq!(std::fs::read(out.join("checkpoint-0000002/model.safetensors")).unwrap(), before);
    assert!(!out.join("checkpoint-0000003").exists());
}

/// TensorBoard's own reader loads a run's event files with the values of metrics.jsonl,
/// tag for tag and step for step, also after a resume from a checkpoint older than the
/// last logged step (the resumed part's session start drops the earlier file's later
/// steps, as metrics.jsonl drops its lines).
#[test]
fn tensorboard_reads_what_metrics_jsonl_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards_with("sample.jsonl", &tmp.path().join("train"), &["--hidden-layers", "1"]);
    let run = tmp.path().join("run");
    let args = ["--steps", "4", "--save-every", "2", "--keep-last", "3", "--hidden-map", "1:1"];
    ok(train(&train_set, &run, &args));
    // As if killed after logging steps 3 and 4 but before their checkpoint was written.
    std::fs::remove_dir_all(run.join("checkpoint-0000004")).unwrap();
    let mut resume = args.to_vec();
    resume.push("--resume");
    ok(train(&train_set, &run, &resume));
    let events = std::fs::read_dir(run.join("tensorboard")).unwrap().count();
    assert_eq!(events, 2, "one event file per invocation");
    python_ok(
        r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sys.argv[1]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
assert [r["step"] for r in rows] == [1, 2, 3, 4], [r["step"] for r in rows]
def flat(prefix, v, out):
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        out[prefix] = float(v)
    elif isinstance(v, dict):
        for k, x in v.items():
            flat(f"{prefix}/{k}" if prefix else k, x, out)
expected = {}
for r in rows:
    f = {}
    flat("", r, f)
    f.pop("step")
    for tag, v in f.items():
        expected.setdefault(tag, []).append((r["step"], v))
acc = EventAccumulator(f"{run}/tensorboard", size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
assert sorted(tags) == sorted(expected), (sorted(tags), sorted(expected))
for tag in ["loss", "kd", "ce", "hidden", "lr", "grad_norm", "tokens_per_s", "resident_bytes",
            "peak_resident_bytes", "state_bytes/optimizer", "time/body"]:
    assert tag in tags, tag
for tag in tags:
    got = [(e.step, e.value) for e in acc.Scalars(tag)]
    want = expected[tag]
    assert [s for s, _ in got] == [s for s, _ in want], (tag, got, want)
    for (s, g), (_, w) in zip(got, want):
        # Scalars are float32 in TensorBoard.
        assert abs(g - w) <= 1e-6 * max(1.0, abs(w)), (tag, s, g, w)
print(len(tags), "tags,", len(rows), "steps")
"#,
        &[&run],
    );
}

/// `--tensorboard DIR` elsewhere than the run folder: a folder holding files distill did
/// not write, or another run's events for a run that starts afresh, is refused before
/// anything is written; the run's own resume adds its next event file there.
#[test]
fn a_tensorboard_folder_that_is_not_the_runs_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let train_set = shards("sample.jsonl", &tmp.path().join("train"));
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("notes.txt"), "mine").unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let args = ["--steps", "2", "--save-every", "1", "--tensorboard", logs.to_str().unwrap()];
    let e = err(train(&train_set, &first, &[&args[..], &["--stop-at", "1"]].concat()));
    assert!(e.contains("--tensorboard") && e.contains("notes.txt"), "{e}");
    assert!(!first.exists(), "the run folder was created before the refusal");
    assert_eq!(std::fs::read_to_string(logs.join("notes.txt")).unwrap(), "mine");

    std::fs::remove_file(logs.join("notes.txt")).unwrap();
    ok(train(&train_set, &first, &[&args[..], &["--stop-at", "1"]].concat()));
    let e = err(train(&train_set, &second, &args));
    assert!(e.contains("another run"), "{e}");
    assert!(!second.exists());
    ok(train(&train_set, &first, &[&args[..], &["--resume"]].concat()));
    assert_eq!(std::fs::read_dir(&logs).unwrap().count(), 2, "one event file per part of the run");
}
