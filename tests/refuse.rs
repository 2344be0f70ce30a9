//! What distill refuses, end to end: every command writes only into an empty or absent
//! directory or into one it recognises as its own kind (a model, a shard set, a run)
//! with the same settings; refusals name what they refuse and leave every file as it
//! was (directory digests before and after); options outside their range, options that
//! would be ignored, ambiguous or malformed input rows and broken teachers stop the
//! command before it writes.
mod common;
use common::*;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Owned arguments (for lists built from several parts) and their borrowed form.
fn own(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs `args`, which must fail naming every part, and checks that `dir` is unchanged.
fn refused_unchanged(dir: &Path, args: &[&str], parts: &[&str]) -> String {
    let before = tree_digest(dir);
    let e = err(distill_within(args, 120));
    for p in parts {
        assert!(e.contains(p), "{args:?}: the error does not name {p:?}:\n{e}");
    }
    assert_eq!(before, tree_digest(dir), "{args:?} changed {}", dir.display());
    e
}

#[test]
fn student_init_never_replaces_the_teacher_or_a_users_files() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = copy_model("llama", tmp.path());
    let init = |out: &Path, extra: &[&str]| {
        let mut a = own(&["student", "init", "--teacher", s(&teacher), "--output", s(out), "--num-layers", "2"]);
        a.extend(own(extra));
        a
    };
    // The teacher itself, or a directory holding it.
    for out in [teacher.clone(), tmp.path().to_path_buf()] {
        for extra in [&[][..], &["--overwrite"][..]] {
            refused_unchanged(tmp.path(), &strs(&init(&out, extra)), &["teacher"]);
        }
    }
    // A directory with a user's file: refused, with or without --overwrite.
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    std::fs::write(mine.join("config.json"), "{}").unwrap();
    let a = init(&mine, &[]);
    refused_unchanged(&mine, &strs(&a), &["not empty", "--overwrite"]);
    let a = init(&mine, &["--overwrite"]);
    refused_unchanged(&mine, &strs(&a), &["notes.txt", "not part of a model"]);
    // A student directory is replaced with --overwrite only, and only once the new one is written.
    let student = tmp.path().join("student");
    let a = init(&student, &[]);
    ok(distill(&strs(&a)));
    let a = init(&student, &[]);
    refused_unchanged(&student, &strs(&a), &["not empty"]);
    let mut a = init(&student, &["--overwrite"]);
    a[7] = "1".into(); // --num-layers 1
    ok(distill(&strs(&a)));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("distill"))
        .collect();
    assert!(leftovers.is_empty(), "staging directories left behind: {leftovers:?}");
    // A shape that cannot fit in memory is refused before anything is allocated or written.
    let huge = tmp.path().join("huge");
    let a = own(&["student", "init", "--teacher", s(&teacher), "--output", s(&huge), "--hidden-size", "600000000"]);
    let e = err(distill_within(&strs(&a), 120));
    assert!(e.contains("parameters") && e.contains("memory"), "{e}");
    assert!(!huge.exists());
}

/// A complete shard set of the tiny llama over the sample.
fn shard_set(out: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--top-k", "8"];
    args.extend(extra);
    ok(precompute("llama", &sample(), out, &args));
    out.to_path_buf()
}

#[test]
fn precompute_replaces_only_its_own_set_and_only_once_the_new_one_is_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = model_dir("llama");
    let args = |out: &Path, extra: &[&str]| {
        let mut a = own(&["precompute", "--no-progress", "--devices", "cpu", "--teacher", s(&teacher)]);
        a.extend(own(&["--input", s(&sample()), "--output", s(out)]));
        a.extend(own(extra));
        a
    };
    // A user's directory that merely looks like a set.
    let users = tmp.path().join("users");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("manifest.json"), "{\"mine\": true}").unwrap();
    std::fs::write(users.join("shard-00000.parquet"), "my own file").unwrap();
    std::fs::write(users.join("notes.txt"), "mine").unwrap();
    refused_unchanged(&users, &strs(&args(&users, &["--overwrite"])), &["manifest.json", "not a distill shard"]);
    std::fs::remove_file(users.join("notes.txt")).unwrap();
    refused_unchanged(&users, &strs(&args(&users, &["--overwrite"])), &["manifest.json"]);
    // A set with a user's file next to it is not replaced either.
    let set = shard_set(&tmp.path().join("set"), &[]);
    std::fs::write(set.join("notes.txt"), "mine").unwrap();
    refused_unchanged(&set, &strs(&args(&set, &["--top-k", "4", "--overwrite"])), &["notes.txt"]);
    std::fs::remove_file(set.join("notes.txt")).unwrap();
    // A teacher that cannot be loaded leaves the old set as it was.
    let broken = copy_model("llama", tmp.path());
    let weights = broken.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let mut a = args(&set, &["--top-k", "4", "--overwrite"]);
    a[5] = s(&broken).to_string();
    refused_unchanged(&set, &strs(&a), &["model.safetensors"]);
    // An overwrite interrupted after one shard keeps the old set listed and intact ...
    let old = tree_digest(&set);
    let e = distill_within(
        &strs(&args(&set, &["--top-k", "4", "--overwrite", "--shard-tokens", "400", "--crash-after-shards", "1"])),
        120,
    );
    assert!(!e.status.success(), "the injected crash did not happen");
    assert_eq!(manifest(&set)["settings"]["capture"]["top_k"], 8, "the old set is still the one listed");
    let now = tree_digest(&set);
    for (file, hash) in &old {
        assert_eq!(now.get(file), Some(hash), "{} changed before the new set was complete", file.display());
    }
    // ... and the same command finishes it, replacing the old set completely.
    ok(distill(&strs(&args(&set, &["--top-k", "4", "--overwrite", "--shard-tokens", "400"]))));
    let m = manifest(&set);
    assert_eq!((m["settings"]["capture"]["top_k"].as_u64(), m["complete"].as_bool()), (Some(4), Some(true)));
    let listed: Vec<String> =
        m["shards"].as_array().unwrap().iter().map(|e| e["file"].as_str().unwrap().into()).collect();
    let mut present: Vec<String> =
        std::fs::read_dir(&set).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    present.sort();
    let mut want = listed.clone();
    want.push("manifest.json".into());
    want.sort();
    assert_eq!(present, want, "old shards or the staging directory were left behind");
    ok(distill(&["inspect", s(&set)]));
}

#[test]
fn merge_shards_writes_only_into_an_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut slices = vec![];
    for (i, n) in [(0, "2"), (1, "2"), (0, "3")] {
        let out = tmp.path().join(format!("slice-{i}-of-{n}"));
        shard_set(&out, &["--shard-index", &i.to_string(), "--num-shards", n]);
        slices.push(out);
    }
    let out = tmp.path().join("merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("shard-00000.parquet"), "my own file").unwrap();
    let args = ["merge-shards", "--output", s(&out), s(&slices[0]), s(&slices[1])];
    refused_unchanged(&out, &args, &["shard-00000.parquet", "not a shard set"]);
    std::fs::remove_file(out.join("shard-00000.parquet")).unwrap();
    // Slices of runs with other --num-shards are named as such.
    let e = err(distill(&["merge-shards", "--output", s(&out), s(&slices[0]), s(&slices[2])]));
    assert!(e.contains("--num-shards 3") && e.contains("--num-shards 2"), "{e}");
    assert!(tree_digest(&out).is_empty());
    ok(distill(&args));
    assert_eq!(manifest(&out)["complete"], true);
    refused_unchanged(&out, &args, &["already holds a shard set"]);
}

fn train_args(student: &Path, shards: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = own(&["train", "--student", s(student), "--shards", s(shards), "--output", s(out)]);
    a.extend(own(&["--device", "cpu", "--batch-tokens", "512", "--save-every", "1"]));
    if !extra.contains(&"--steps") {
        a.extend(own(&["--steps", "2"]));
    }
    a.extend(own(extra));
    a
}

#[test]
fn train_writes_only_into_an_empty_directory_or_its_own_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shard_set(&tmp.path().join("shards"), &[]);
    let other_shards = shard_set(&tmp.path().join("other-shards"), &["--max-len", "64"]);
    let student = model_dir("qwen3");
    let run = tmp.path().join("run");
    ok(distill(&strs(&train_args(&student, &shards, &run, &[]))));
    // Another run (another rate) into the same directory without --resume.
    let e = refused_unchanged(&run, &strs(&train_args(&student, &shards, &run, &["--lr", "1e-3"])), &["--resume"]);
    assert!(e.contains(s(&run)), "{e}");
    // --resume with other shards, another student or other settings: named, refused.
    let e = refused_unchanged(&run, &strs(&train_args(&student, &other_shards, &run, &["--resume"])), &["run.json"]);
    assert!(e.contains("shards."), "{e}");
    let e = refused_unchanged(&run, &strs(&train_args(&model_dir("qwen2"), &shards, &run, &["--resume"])), &[]);
    assert!(e.contains("tokenizer") || e.contains("student"), "{e}");
    let e = refused_unchanged(
        &run,
        &strs(&train_args(&student, &shards, &run, &["--resume", "--lr", "1e-3"])),
        &["run.json"],
    );
    assert!(e.contains("peak_lr"), "{e}");
    // A user's file in the run directory: --resume will not write there.
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    refused_unchanged(&run, &strs(&train_args(&student, &shards, &run, &["--resume"])), &["notes.txt"]);
    std::fs::remove_file(run.join("notes.txt")).unwrap();
    // A resumed run to a later step keeps one metrics line per step.
    ok(distill(&strs(&train_args(&student, &shards, &run, &["--resume", "--steps", "3"]))));
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
    // A user's directory is never a run.
    let users = tmp.path().join("users");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("notes.txt"), "mine").unwrap();
    refused_unchanged(&users, &strs(&train_args(&student, &shards, &users, &[])), &["notes.txt"]);
}

#[test]
fn options_outside_their_range_or_without_effect_are_refused_before_any_write() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shard_set(&tmp.path().join("shards"), &[]);
    let student = model_dir("qwen3");
    let out = tmp.path().join("never");
    let train_cases: &[(&[&str], &str)] = &[
        (&["--weight-decay", "nan"], "--weight-decay"),
        (&["--lr=-1"], "--lr"),
        (&["--grad-accum", "0"], "--grad-accum"),
        (&["--clip-norm", "0"], "--clip-norm"),
        (&["--min-lr-ratio", "5"], "--min-lr-ratio"),
        (&["--steps", "0"], "--steps"),
        (&["--alpha", "1.5"], "--alpha"),
        (&["--temperature", "0"], "temperature"),
        (&["--pack", "false", "--seq-len", "64"], "--pack"),
        (&["--beta", "0.3"], "--loss jsd"),
        (&["--hidden-weight", "0.5"], "--hidden-map"),
        (&["--keep-last", "0"], "--keep-last"),
        (&["--stop-at", "9"], "--stop-at"),
    ];
    for (extra, flag) in train_cases {
        let e = err(distill(&strs(&train_args(&student, &shards, &out, extra))));
        assert!(e.contains(flag), "{extra:?}: the error does not name {flag}:\n{e}");
        assert!(!out.exists(), "{extra:?} created the output");
    }
    let precompute_cases: &[(&[&str], &str)] = &[
        (&["--row-group-rows", "0"], "--row-group-rows"),
        (&["--zstd-level", "99"], "--zstd-level"),
        (&["--batch-tokens", "0"], "--batch-tokens"),
        (&["--max-len", "1"], "--max-len"),
        (&["--top-k", "0", "--sample", "0"], "--top-k"),
        (&["--sample", "300"], "--sample"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-k", "384"], "--sample 0"),
        (&["--hidden-layers", "1,1"], "--hidden-layers"),
        (&["--shard-index", "2", "--num-shards", "2"], "--shard-index"),
    ];
    for (extra, flag) in precompute_cases {
        let e = err(precompute("llama", &sample(), &out, extra));
        assert!(e.contains(flag), "{extra:?}: the error does not name {flag}:\n{e}");
        assert!(!out.exists(), "{extra:?} created the output");
    }
}

#[test]
fn a_teacher_that_outputs_nan_lists_no_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = copy_model("llama", tmp.path());
    let path = teacher.join("model.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| if n.contains("layers.1.mlp.down_proj") { (n, t.fill(f64::NAN)) } else { (n, t) })
        .collect();
    tch::Tensor::write_safetensors(&tensors, &path).unwrap();
    let out = tmp.path().join("shards");
    let input = sample();
    let args = ["precompute", "--no-progress", "--devices", "cpu", "--teacher", s(&teacher), "--input", s(&input)];
    let e = err(distill(&[&args[..], &["--output", s(&out)]].concat()));
    assert!(e.contains("not finite") && e.contains("row "), "{e}");
    assert!(manifest(&out)["shards"].as_array().unwrap().is_empty(), "a shard of NaN was listed");
}

#[test]
fn eval_refuses_what_train_refuses_and_what_it_cannot_score() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shard_set(&tmp.path().join("shards"), &[]);
    // A student whose tokenizer file differs from the teacher's: named, unless forced.
    let student = copy_model("qwen3", tmp.path());
    let tok = std::fs::read_to_string(student.join("tokenizer.json")).unwrap();
    std::fs::write(student.join("tokenizer.json"), format!("{tok}\n")).unwrap();
    let args = ["eval", "--device", "cpu", "--model", s(&student), "--shards", s(&shards)];
    let e = err(distill(&args));
    assert!(e.contains("tokenizer.json hash") && e.contains("manifest.json"), "{e}");
    let mut forced = args.to_vec();
    forced.push("--force-tokenizer");
    ok(distill(&forced));
    // inspect shows text only with the shards' own tokenizer; a wrong one asked for is an error.
    let e = err(distill(&["inspect", s(&shards), "--tokenizer", s(&student)]));
    assert!(e.contains("tokenizer.json") && e.contains("not the shards' tokenizer"), "{e}");
    let e = err(distill(&["inspect", s(&shards), "--tokenizer", s(&tmp.path().join("nowhere"))]));
    assert!(e.contains("nowhere"), "{e}");
    // Text with no token to score is an error, not a perplexity of 1.
    let empty = tmp.path().join("one-token.jsonl");
    std::fs::write(&empty, "{\"text\": \"\"}\n").unwrap();
    let e = err(distill(&["eval", "--device", "cpu", "--model", s(&model_dir("llama")), "--text", s(&empty)]));
    assert!(e.contains("no token"), "{e}");
}

#[test]
fn input_rows_are_read_as_written_or_refused_by_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            write("both.jsonl", "{\"text\": \"a b c\", \"prompt\": \"q\", \"response\": \"r\"}\n"),
            vec!["both.jsonl:1", "`text`", "`prompt`", "ambiguous"],
        ),
        (
            write(
                "nocontent.jsonl",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\"}]}\n",
            ),
            vec!["nocontent.jsonl:1", "messages[1].content", "missing"],
        ),
        (
            write("surrogate.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"\\ud800\"}\n"),
            vec!["surrogate.jsonl:2", "surrogate"],
        ),
    ];
    for (input, parts) in cases {
        let out = tmp.path().join(format!("out-{}", input.file_stem().unwrap().to_string_lossy()));
        let e = err(precompute("qwen3", &input, &out, &[]));
        for p in parts {
            assert!(e.contains(p), "{}: the error does not name {p:?}:\n{e}", input.display());
        }
        assert!(!out.exists(), "{} created the output", input.display());
    }
    // Not regular files: a FIFO and a device.
    let fifo = tmp.path().join("pipe.jsonl");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for input in [fifo.as_path(), Path::new("/dev/null")] {
        let e = err(precompute("llama", input, &tmp.path().join("never"), &[]));
        assert!(e.contains(s(input)) && e.contains("not a regular file"), "{e}");
    }
    // A UTF-8 byte-order mark, and Parquet text stored as binary (as Spark writes it), read
    // as the same text: the same shards as the plain JSONL.
    let plain = write("plain.jsonl", "{\"id\": \"a\", \"text\": \"It was the best of times.\"}\n");
    let bom = write("bom.jsonl", "\u{feff}{\"id\": \"a\", \"text\": \"It was the best of times.\"}\n");
    let binary = tmp.path().join("binary.parquet");
    python_ok(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({'id': pa.array([b'a'], pa.binary()), 'text': pa.array([b'It was the best of times.'], pa.binary())}), sys.argv[1])",
        &[&binary],
    );
    let read = |input: &Path| {
        let out = tmp.path().join(format!("s-{}", input.file_name().unwrap().to_string_lossy()));
        ok(precompute("llama", input, &out, &["--top-k", "4"]));
        ok(distill(&["inspect", s(&out), "--json"]))
    };
    let sample_of = |json: String| serde_json::from_str::<serde_json::Value>(&json).unwrap()["samples"].clone();
    let want = sample_of(read(&plain));
    assert_eq!(sample_of(read(&bom)), want);
    assert_eq!(sample_of(read(&binary)), want);
}

#[test]
fn a_long_line_or_a_long_chat_costs_only_what_max_len_keeps() {
    let tmp = tempfile::tempdir().unwrap();
    // 4 MB of text on one line, and a chat of 20,000 turns, cut to 64 tokens.
    let corpus = std::fs::read_to_string(repo().join("tests/data/corpus.txt")).unwrap();
    let mut long = String::new();
    while long.len() < 4 << 20 {
        long.push_str(&corpus);
    }
    let long = long.replace('\n', " ");
    let turns: Vec<serde_json::Value> = (0..20_000)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("turn {i}")}))
        .collect();
    let input = tmp.path().join("long.jsonl");
    let rows = [serde_json::json!({"id": "line", "text": long}), serde_json::json!({"id": "chat", "messages": turns})];
    std::fs::write(&input, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let out = tmp.path().join("shards");
    // A hang guard, not a timing: tokenising the whole of both took minutes.
    let run = distill_within(
        &[
            "precompute",
            "--no-progress",
            "--devices",
            "cpu",
            "--teacher",
            s(&model_dir("qwen3")),
            "--input",
            s(&input),
            "--output",
            s(&out),
            "--max-len",
            "64",
            "--top-k",
            "4",
        ],
        120,
    );
    ok(run);
    // The rows hold exactly the first 64 tokens of the whole text and of the whole chat,
    // with the chat's assistant turns marked, as transformers computes them.
    let check = tmp.path().join("check.py");
    std::fs::write(
        &check,
        "import sys, json, pyarrow.parquet as pq\n\
         from transformers import AutoTokenizer\n\
         tok = AutoTokenizer.from_pretrained(sys.argv[2])\n\
         rows = {r['sample_ids'][0]: r for r in pq.read_table(sys.argv[1] + '/shard-00000.parquet').to_pylist()}\n\
         src = [json.loads(l) for l in open(sys.argv[3])]\n\
         ids = tok(src[0]['text'])['input_ids'][:64]\n\
         assert rows['line']['input_ids'] == ids, 'text prefix differs'\n\
         enc = tok.apply_chat_template(src[1]['messages'], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)\n\
         assert rows['chat']['input_ids'] == enc['input_ids'][:64], 'chat prefix differs'\n\
         mask = [bool(m) for m in enc['assistant_masks'][:64]]\n\
         mask[0] = False\n\
         assert rows['chat']['loss_mask'] == mask, (rows['chat']['loss_mask'], mask)\n",
    )
    .unwrap();
    let out_py = std::process::Command::new(python())
        .args([s(&check), s(&out), s(&model_dir("qwen3")), s(&input)])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out_py.status.success(), "{}", String::from_utf8_lossy(&out_py.stderr));
    let m = manifest(&out);
    assert_eq!(m["skipped"]["truncated_examples"], 2);
}
