//! The wave-2 commands (generate, eval, score, merge-teachers, train --cross-tokenizer /
//! --nproc, precompute --token-ids / --top-p, student init) under hostile input: every
//! case ends with a clean refusal naming the file, row, field or option (or, where the
//! input is legal, the right result), and nothing the command did not write changes.
//! One test per defect of issue 30; kill -9 resumption is scripts/kill_resume.sh.
mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::Tensor;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Tiny model `name`'s directory as an argument.
fn model(name: &str) -> &'static str {
    Box::leak(model_dir(name).display().to_string().into_boxed_str())
}

fn write_rows(path: &Path, rows: &[Value]) -> PathBuf {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn read_rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Short prompts of the three shapes generate reads.
fn prompts(dir: &Path) -> PathBuf {
    write_rows(
        &dir.join("prompts.jsonl"),
        &[
            json!({"prompt": "Name a colour."}),
            json!({"text": "The river ran"}),
            json!({"messages": [{"role": "user", "content": "Say hello."}]}),
            json!({"prompt": "Count to three."}),
        ],
    )
}

/// `generate` on the CPU, 4 new tokens, with `extra`.
fn generate(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = ["generate", "--no-progress", "--device", "cpu", "--model", s(model), "--input", s(input)];
    distill(&[&args[..], &["--output", s(out), "--max-new-tokens", "4"], extra].concat())
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// A copy of tiny model `name` whose final norm is NaN: every logit is NaN.
fn nan_model(name: &str, into: &Path) -> PathBuf {
    let dir = copy_model(name, into);
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    let norm = tensors.iter_mut().find(|(n, _)| n == "model.norm.weight").expect("a final norm");
    norm.1 = norm.1.full_like(f64::NAN);
    Tensor::write_safetensors(&tensors, &path).unwrap();
    dir
}

#[test]
fn token_ids_of_another_tokenizer_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // No chat row: the other model has no chat template.
    let input = write_rows(&tmp.path().join("plain.jsonl"), &read_rows(&prompts(tmp.path()))[..2]);
    // Sampled by a model with another tokenizer, scored by the llama teacher.
    let foreign = tmp.path().join("foreign.jsonl");
    ok(generate(&model_dir("llama-spm"), &input, &foreign, &["--with-ids"]));
    let set = tmp.path().join("set");
    let e = err(precompute("llama", &foreign, &set, &["--token-ids"]));
    assert_names(&e, &["foreign.jsonl:1", "ids_tokenizer", "another tokenizer"]);
    assert!(!set.exists(), "nothing written");
    // Ids that say nothing of their tokenizer are refused too, naming the way out.
    let rows: Vec<Value> = read_rows(&foreign)
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("ids_tokenizer");
            r
        })
        .collect();
    let bare = write_rows(&tmp.path().join("bare.jsonl"), &rows);
    assert_names(&err(precompute("llama", &bare, &set, &["--token-ids"])), &["bare.jsonl:1", "is missing"]);
    // The teacher's own ids are read.
    let own = tmp.path().join("own.jsonl");
    ok(generate(&model_dir("llama"), &input, &own, &["--with-ids"]));
    ok(precompute("llama", &own, &set, &["--token-ids"]));
}

#[test]
fn a_resume_with_other_settings_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.jsonl");
    ok(generate(&model_dir("llama"), &prompts(tmp.path()), &ids, &["--with-ids"]));
    let cases: [(&Path, &[&str], &str); 2] =
        [(&ids, &["--token-ids"], "--token-ids"), (&sample(), &["--top-p", "0.9"], "--top-p")];
    for (i, (input, setting, option)) in cases.into_iter().enumerate() {
        let set = tmp.path().join(format!("set-{i}"));
        let small = ["--shard-tokens", "40", "--sample", "0"];
        let crashed = precompute("llama", input, &set, &[setting, &small[..], &["--crash-after-shards", "1"]].concat());
        assert!(!crashed.status.success(), "the run was to stop part-way");
        assert_eq!(manifest(&set)["complete"], json!(false));
        let before = tree_digest(&set);
        let e = err(precompute("llama", input, &set, &small));
        assert_names(&e, &["other settings", option]);
        assert_eq!(tree_digest(&set), before, "{option}: the interrupted set is untouched");
        // With the setting, it resumes and completes.
        ok(precompute("llama", input, &set, &[setting, &small[..]].concat()));
        assert_eq!(manifest(&set)["complete"], json!(true));
    }
}

#[test]
fn teacher_weights_too_large_to_sum_still_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, merged) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("merged"));
    ok(precompute("llama", &sample(), &a, &["--sample", "0"]));
    ok(precompute("qwen3", &sample(), &b, &["--sample", "0"]));
    ok(distill(&["merge-teachers", "--output", s(&merged), &format!("{}:1e308", s(&a)), &format!("{}:1e308", s(&b))]));
    let weights: Vec<f64> = manifest(&merged)["settings"]["mixture"]["teachers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["weight"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, [0.5, 0.5]);
    // The mixed targets are a distribution: the reader (which checks it) takes them.
    ok(distill(&["inspect", s(&merged)]));
}

#[test]
fn a_teacher_with_nan_logits_is_refused_by_generate_eval_and_score() {
    let tmp = tempfile::tempdir().unwrap();
    let model = nan_model("llama", tmp.path());
    let (input, out) = (prompts(tmp.path()), tmp.path().join("out.jsonl"));
    assert_names(&err(generate(&model, &input, &out, &[])), &["prompt", "not finite"]);
    assert!(!out.exists() && !out.with_extension("tmp-distill.jsonl").exists(), "nothing written");
    let data = sample();
    let text = ["--device", "cpu", "--model", s(&model), "--input", s(&data)];
    assert_names(&err(distill(&[&["score"], &text[..]].concat())), &["NLL is NaN"]);
    let e = err(distill(&["eval", "--device", "cpu", "--model", s(&model), "--text", s(&sample())]));
    assert_names(&e, &["cross-entropy is NaN", "not finite"]);
}

#[test]
fn sampling_options_that_make_no_sense_are_refused_before_generating() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (prompts(tmp.path()), tmp.path().join("out.jsonl"));
    let llama = model_dir("llama");
    assert_names(&err(generate(&llama, &input, &out, &["--temperature", "NaN"])), &["--temperature NaN"]);
    let e = err(generate(&llama, &input, &out, &["--stop", ".", "--stop", ""]));
    assert_names(&e, &["--stop number 2", "empty string"]);
    let model = copy_model("llama", tmp.path());
    std::fs::write(model.join("generation_config.json"), r#"{"eos_token_id": "</s>"}"#).unwrap();
    assert_names(&err(generate(&model, &input, &out, &[])), &["generation_config.json", "eos_token_id"]);
    std::fs::write(model.join("generation_config.json"), r#"{"eos_token_id": [2, -1]}"#).unwrap();
    assert_names(&err(generate(&model, &input, &out, &[])), &["eos_token_id", "-1"]);
    assert!(!out.exists(), "nothing written");
}

#[test]
fn every_command_keeps_rows_within_the_model_context() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model("llama", tmp.path());
    edit_json(&model.join("config.json"), |c| c["max_position_embeddings"] = json!(16));
    let (set, data) = (tmp.path().join("set"), sample());
    let args = ["precompute", "--no-progress", "--devices", "cpu", "--teacher", s(&model), "--input", s(&data)];
    let e = err(distill(&[&args[..], &["--output", s(&set), "--max-len", "64"]].concat()));
    assert_names(&e, &["sample.jsonl:", "max_position_embeddings", "--max-len 16"]);
    assert!(!set.exists(), "nothing written");
    ok(distill(&[&args[..], &["--output", s(&set), "--max-len", "16", "--skip-invalid"]].concat()));
    let score = ["score", "--device", "cpu", "--model", s(&model), "--input", s(&data)];
    assert_names(&err(distill(&score)), &["sample.jsonl:", "--max-len"]);
    ok(distill(&[&score[..], &["--max-len", "16"]].concat()));
    let long = write_rows(&tmp.path().join("long.jsonl"), &[json!({"text": "word ".repeat(40)})]);
    let e = err(generate(&model, &long, &tmp.path().join("out.jsonl"), &[]));
    assert_names(&e, &["long.jsonl:1", "max_position_embeddings"]);
}

#[test]
fn scores_of_nothing_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = write_rows(&tmp.path().join("empty.jsonl"), &[json!({"text": ""}), json!({"text": ""})]);
    let e = err(distill(&["score", "--device", "cpu", "--model", model("llama"), "--input", s(&empty)]));
    assert_names(&e, &["no token to score", "2 examples"]);
}

#[test]
fn a_failed_capture_keeps_the_old_replies_and_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out, cap) = (prompts(tmp.path()), tmp.path().join("out.jsonl"), tmp.path().join("cap"));
    let llama = model_dir("llama");
    ok(generate(&llama, &input, &out, &["--capture", s(&cap)]));
    let (old_out, old_cap) = (std::fs::read(&out).unwrap(), std::fs::read(cap.join("manifest.json")).unwrap());
    let old_shards = tree_digest(&cap);
    // Sampled replies this time, and the process dies while writing their targets.
    let again = ["--capture", s(&cap), "--overwrite", "--temperature", "1", "--seed", "7"];
    let crashed = generate(&llama, &input, &out, &[&again[..], &["--crash-after-shards", "0"]].concat());
    assert!(!crashed.status.success(), "the run was to stop part-way");
    assert_eq!(std::fs::read(&out).unwrap(), old_out, "the old replies are kept");
    assert_eq!(std::fs::read(cap.join("manifest.json")).unwrap(), old_cap, "the old targets are kept");
    for (file, digest) in &old_shards {
        assert_eq!(tree_digest(&cap).get(file), Some(digest), "{}", file.display());
    }
    // Rerun, it completes: the new replies and their targets, as a pair.
    ok(generate(&llama, &input, &out, &again));
    assert_ne!(std::fs::read(&out).unwrap(), old_out);
    let m = manifest(&cap);
    assert_eq!(m["complete"], json!(true));
    assert_eq!(m["settings"]["data"]["sources"][0]["path"], json!(s(&out)));
    assert_eq!(m["settings"]["data"]["sources"][0]["bytes"], json!(std::fs::metadata(&out).unwrap().len()));
}

#[test]
fn generate_never_replaces_its_own_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = prompts(tmp.path());
    let before = std::fs::read(&input).unwrap();
    let e = err(generate(&model_dir("llama"), &input, &input, &["--overwrite"]));
    assert_names(&e, &["also an --input"]);
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn a_capture_output_that_is_not_jsonl_is_refused_before_generating() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cap) = (tmp.path().join("replies.txt"), tmp.path().join("cap"));
    let started = std::time::Instant::now();
    let e = err(generate(&model_dir("llama"), &prompts(tmp.path()), &out, &["--capture", s(&cap)]));
    assert_names(&e, &["replies.txt", ".jsonl"]);
    assert!(!out.exists() && !cap.exists(), "nothing written");
    eprintln!("refused after {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_second_trainer_on_a_run_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    ok(precompute("llama", &sample(), &set, &[]));
    let out = tmp.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let base = ["train", "--device", "cpu", "--student", model("qwen3"), "--shards", s(&set)];
        let more = ["--output", s(&out), "--steps", "100000", "--save-every", "1", "--batch-tokens", "256"];
        [&base[..], &more[..], extra].concat().iter().map(|x| x.to_string()).collect()
    };
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let mut first = std::process::Command::new(&bin)
        .args(args(&[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !out.join("checkpoint-0000001").exists() {
        assert!(std::time::Instant::now() < deadline, "the first run did not save a checkpoint");
        assert!(first.try_wait().unwrap().is_none(), "the first run stopped");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let second: Vec<String> = args(&["--resume"]);
    let e = err(distill(&second.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_names(&e, &["another distill train", &format!("process {}", first.id())]);
    // kill -9 drops the lock with the process: the run resumes.
    first.kill().unwrap();
    first.wait().unwrap();
    let saved = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("checkpoint-")?.parse::<u64>().ok())
        .max()
        .unwrap();
    let stop = (saved + 1).to_string();
    let resume: Vec<String> = args(&["--resume", "--stop-at", &stop]);
    ok(distill(&resume.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(out.join(format!("checkpoint-{:07}", saved + 1)).exists());
}

#[test]
fn numbers_beyond_their_type_are_refused_without_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    ok(precompute("llama", &sample(), &set, &[]));
    let train = ["train", "--device", "cpu", "--student", model("qwen3"), "--shards", s(&set)];
    let e = err(distill(&[&train[..], &["--output", s(&tmp.path().join("run")), "--dist-timeout", "1e300"]].concat()));
    assert_names(&e, &["--dist-timeout"]);
    let student = tmp.path().join("student");
    let init = ["student", "init", "--teacher", model("llama"), "--output", s(&student)];
    let e = err(distill(&[&init[..], &["--intermediate-size", "18446744073709551615"]].concat()));
    assert_names(&e, &["intermediate_size", "18446744073709551615"]);
    assert!(!student.exists(), "nothing written");
}

#[test]
fn two_processes_make_the_cross_tokenizer_targets_once_and_train() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    ok(precompute("llama", &sample(), &set, &["--top-k", "16", "--sample", "0"]));
    let out = tmp.path().join("run");
    let args = ["train", "--device", "cpu", "--student", model("llama-spm"), "--shards", s(&set)];
    let more = ["--output", s(&out), "--cross-tokenizer", "--nproc", "2", "--steps", "2", "--batch-tokens", "256"];
    ok(distill(&[&args[..], &more[..]].concat()));
    assert_eq!(manifest(&out.join("student-targets"))["complete"], json!(true));
    assert!(out.join("checkpoint-0000002").exists());
}

/// scripts/kill_resume.py, one trial per job (the script runs 20): it still runs every
/// job, and each resumes to the bytes of its uninterrupted run.
#[test]
fn kill_resume_script_runs_every_job() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let out = std::process::Command::new(python())
        .arg(repo().join("scripts/kill_resume.py"))
        .args(["--distill", &bin, "--models", s(fixtures()), "--trials", "1", "--copies", "4"])
        .args(["--work", s(&tmp.path().join("w"))])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for job in
        ["precompute top-k", "precompute draws only", "precompute token ids", "generate --capture", "train --nproc 2"]
    {
        assert!(stdout.contains(&format!("| {job}")), "{job} missing:\n{stdout}");
    }
}
