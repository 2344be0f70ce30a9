//! `distill precompute` end to end on tiny models: shards read back with pyarrow and
//! checked against transformers (scripts/check_shards.py), resume after a crash,
//! slicing + merge, the schema definition, pipeline files, and bad input.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn distill(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distill"));
    cmd.args(args).arg("--no-progress");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn precompute(model: &str, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let dir = model_dir(model);
    let mut args = vec!["precompute", "--teacher", dir.to_str().unwrap()];
    if !extra.contains(&"--devices") {
        args.extend(["--devices", "cpu"]);
    }
    args.extend(["--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    args.extend(extra);
    distill(&args, &[])
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "distill failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "distill should fail cleanly:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn sample() -> PathBuf {
    repo().join("tests/data/sample.jsonl")
}

/// Runs scripts/check_shards.py (pyarrow + transformers, no project code).
fn check_shards(shards: &Path, model: &str, input: &Path) {
    let out = Command::new(python())
        .arg(repo().join("scripts/check_shards.py"))
        .args([shards, &model_dir(model), input])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("check_shards {model}: {report}");
    assert!(
        out.status.success(),
        "shards differ from transformers:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn shards_match_transformers_for_text_chat_and_prompt_response() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "16", "--hidden-layers", "0,2,3", "--shard-tokens", "500"]));
    let m = manifest(&out);
    assert_eq!(m["complete"], true);
    assert!(m["shards"].as_array().unwrap().len() >= 3);
    check_shards(&out, "llama", &sample());
}

#[test]
fn packed_rows_match_each_document_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("qwen2", &sample(), &out, &["--top-k", "8", "--hidden-layers", "1", "--pack", "--max-len", "300"]));
    check_shards(&out, "qwen2", &sample());
}

#[test]
fn full_vocabulary_top_k_leaves_no_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("qwen3", &sample(), &out, &["--top-k", "384"]));
    check_shards(&out, "qwen3", &sample());
}

/// Every shard file of two sets, byte for byte, and their manifest entries.
fn assert_same_shards(a: &Path, b: &Path) {
    let (ma, mb) = (manifest(a), manifest(b));
    assert_eq!(ma["shards"], mb["shards"], "manifest entries differ");
    assert_eq!(ma["complete"], mb["complete"]);
    for s in ma["shards"].as_array().unwrap() {
        let f = s["file"].as_str().unwrap();
        assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{f} differs");
    }
}

#[test]
fn a_crashed_run_resumes_to_the_same_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, crashed) = (tmp.path().join("straight"), tmp.path().join("crashed"));
    let args = ["--top-k", "8", "--hidden-layers", "2", "--shard-tokens", "400", "--batch-tokens", "256"];
    ok(precompute("mistral", &sample(), &straight, &args));

    let dir = model_dir("mistral");
    let input = sample();
    let mut full = vec!["precompute", "--devices", "cpu", "--teacher", dir.to_str().unwrap()];
    full.extend(["--input", input.to_str().unwrap(), "--output", crashed.to_str().unwrap()]);
    full.extend(args);
    let out = distill(&full, &[("DISTILL_CRASH_AFTER_SHARDS", "2")]);
    assert!(!out.status.success(), "the injected crash did not happen");
    let m = manifest(&crashed);
    assert_eq!(m["shards"].as_array().unwrap().len(), 2, "only complete shards are listed");
    assert_eq!(m["complete"], false);
    assert!(crashed.join("shard-00002.parquet.tmp").exists(), "the crash left a partial shard");
    assert!(!crashed.join("shard-00002.parquet").exists());

    let stdout = ok(distill(&full, &[]));
    assert!(stdout.contains("(2 resumed)"), "{stdout}");
    assert!(!crashed.join("shard-00002.parquet.tmp").exists());
    assert_same_shards(&straight, &crashed);
}

#[test]
fn slices_merge_into_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    ok(precompute("llama", &sample(), &whole, &["--top-k", "4"]));
    let mut slices = vec![];
    for i in 0..3 {
        let out = tmp.path().join(format!("slice{i}"));
        let idx = i.to_string();
        ok(precompute("llama", &sample(), &out, &["--top-k", "4", "--shard-index", &idx, "--num-shards", "3"]));
        slices.push(out);
    }
    let merged = tmp.path().join("merged");
    let mut args = vec!["merge-shards", "--output", merged.to_str().unwrap()];
    // Out of order on purpose: merge sorts by slice.
    for s in slices.iter().rev() {
        args.push(s.to_str().unwrap());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_distill")).args(&args).output().unwrap();
    ok(out);
    let (mw, mm) = (manifest(&whole), manifest(&merged));
    let tokens = |m: &serde_json::Value| {
        m["shards"].as_array().unwrap().iter().map(|s| s["tokens"].as_u64().unwrap()).sum::<u64>()
    };
    assert_eq!(tokens(&mw), tokens(&mm));
    assert_eq!(mm["slices"].as_array().unwrap().len(), 3);
    check_shards(&merged, "llama", &sample());
    // A missing slice is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["merge-shards", "--output", tmp.path().join("m2").to_str().unwrap()])
        .args([&slices[0], &slices[2]])
        .output()
        .unwrap();
    assert!(err(out).contains("exactly once"));
}

#[test]
fn written_schema_matches_the_documented_definition() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("qwen3", &sample(), &out, &["--top-k", "5", "--hidden-layers", "0,3"]));
    let def: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/shard.schema.json")).unwrap()).unwrap();
    let file = std::fs::File::open(out.join("shard-00000.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = reader.schema().clone();
    let mut expected = vec![];
    for col in def["columns"].as_array().unwrap() {
        let (name, ty) = (col["name"].as_str().unwrap(), col["type"].as_str().unwrap());
        let layers: Vec<String> = if name.contains("{L}") { vec!["0".into(), "3".into()] } else { vec![String::new()] };
        for l in layers {
            let ty = ty.replace("{K}", "5").replace("{ID}", "uint16").replace("{H}", "64");
            expected.push((name.replace("{L}", &l), ty));
        }
    }
    expected.sort();
    let mut actual: Vec<(String, String)> =
        schema.fields().iter().map(|f| (f.name().clone(), arrow_type_name(f.data_type()))).collect();
    actual.sort();
    assert_eq!(actual, expected);
    let kv = reader.metadata().file_metadata().key_value_metadata().unwrap();
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    assert_eq!(get("distill.format").as_deref(), Some("distill-shards"));
    assert_eq!(get("distill.format_version").as_deref(), Some("1"));
}

/// The type spelling used in schemas/shard.schema.json.
fn arrow_type_name(t: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType::*;
    match t {
        UInt64 => "uint64".into(),
        UInt16 => "uint16".into(),
        Int32 => "int32".into(),
        Boolean => "bool".into(),
        Utf8 => "utf8".into(),
        Float16 => "float16".into(),
        Float32 => "float32".into(),
        List(f) => format!("list<{}>", arrow_type_name(f.data_type())),
        FixedSizeList(f, n) => format!("fixed_size_list<{}>[{n}]", arrow_type_name(f.data_type())),
        other => format!("{other:?}"),
    }
}

#[test]
fn pipeline_file_options_and_flag_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    let cfg = tmp.path().join("p.toml");
    let teacher = model_dir("qwen3");
    std::fs::write(
        &cfg,
        format!(
            "teacher = {:?}\ninput = [{:?}]\noutput = {:?}\ntop_k = 12\nhidden_layers = [1]\ndevices = [\"cpu\"]\n",
            teacher.to_str().unwrap(),
            sample().to_str().unwrap(),
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    ok(distill(&["precompute", "--config", cfg.to_str().unwrap(), "--top-k", "6"], &[]));
    let m = manifest(&out);
    assert_eq!(m["settings"]["capture"]["top_k"], 6, "the flag overrides the file");
    assert_eq!(m["settings"]["capture"]["hidden_layers"], serde_json::json!([1]));
    std::fs::write(&cfg, "teacher = \"x\"\ntopk = 3\n").unwrap();
    let e = err(distill(&["precompute", "--config", cfg.to_str().unwrap()], &[]));
    assert!(e.contains("p.toml") && e.contains("topk"), "{e}");
}

fn write_input(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_input_names_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("malformed.jsonl", "{\"text\": \"fine\"}\n{\"text\": \"cut\n", vec!["malformed.jsonl:2", "JSON"]),
        ("missing.jsonl", "{\"text\": \"fine\"}\n{\"prompt\": \"q\"}\n", vec!["missing.jsonl:2", "`response`"]),
        ("empty.jsonl", "", vec!["empty.jsonl", "empty"]),
        (
            "role.jsonl",
            "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
            vec!["role.jsonl:1", "Unknown role: tool"],
        ),
        (
            "masked.jsonl",
            "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n",
            vec!["masked.jsonl:2", "no target"],
        ),
    ];
    for (name, text, parts) in cases {
        let input = write_input(tmp.path(), name, text);
        let out = tmp.path().join(format!("out-{name}"));
        let e = err(precompute("llama", &input, &out, &[]));
        for p in parts {
            assert!(e.contains(p), "{name}: error does not name {p:?}:\n{e}");
        }
        let listed = out.join("manifest.json").exists() && !manifest(&out)["shards"].as_array().unwrap().is_empty();
        assert!(!listed, "{name}: a shard was listed after an error");
    }
}

#[test]
fn skip_invalid_counts_bad_rows_in_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(
        tmp.path(),
        "mixed.jsonl",
        "{\"text\": \"Call me Ishmael.\"}\nnot json\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n{\"text\": \"It was the best of times.\"}\n",
    );
    let out = tmp.path().join("shards");
    ok(precompute("llama", &input, &out, &["--skip-invalid"]));
    let m = manifest(&out);
    assert_eq!(m["skipped"]["invalid_rows"], 2);
    assert_eq!(m["shards"][0]["rows"], 2);
}

#[test]
fn an_output_made_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "8"]));
    let e = err(precompute("llama", &sample(), &out, &["--top-k", "16"]));
    assert!(e.contains("capture.top_k") && e.contains("manifest.json"), "{e}");
    let e = err(precompute("qwen2", &sample(), &out, &["--top-k", "8"]));
    assert!(e.contains("teacher.config_hash") && e.contains("teacher.path"), "{e}");
    // Rerunning with the same settings finds nothing left to do and changes nothing.
    let before = std::fs::read(out.join("shard-00000.parquet")).unwrap();
    let stdout = ok(precompute("llama", &sample(), &out, &["--top-k", "8"]));
    assert!(stdout.contains("resumed"), "{stdout}");
    assert_eq!(before, std::fs::read(out.join("shard-00000.parquet")).unwrap());
    // --overwrite replaces the set.
    ok(precompute("llama", &sample(), &out, &["--top-k", "16", "--overwrite"]));
    assert_eq!(manifest(&out)["settings"]["capture"]["top_k"], 16);
    // A directory that is not a shard set is not written into.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    assert!(err(precompute("llama", &sample(), &other, &[])).contains("not a shard set"));
}

#[test]
fn two_teacher_replicas_write_the_same_shards_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let args = ["--top-k", "8", "--hidden-layers", "1", "--shard-tokens", "600", "--batch-tokens", "200"];
    ok(precompute("qwen2", &sample(), &one, &args));
    let mut two_args = args.to_vec();
    two_args.extend(["--devices", "cpu,cpu"]);
    ok(precompute("qwen2", &sample(), &two, &two_args));
    assert_same_shards(&one, &two);
}

/// Runs a short Python snippet in the venv; panics with its output on failure.
fn python_ok(code: &str, args: &[&Path]) {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn parquet_input_gives_the_same_shards_as_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("sample.parquet");
    python_ok(
        "import sys, json, pyarrow as pa, pyarrow.parquet as pq\n\
         rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]\n\
         pq.write_table(pa.Table.from_struct_array(pa.array(rows)), sys.argv[2])",
        &[&sample(), &parquet],
    );
    let (a, b) = (tmp.path().join("from-jsonl"), tmp.path().join("from-parquet"));
    ok(precompute("llama", &sample(), &a, &["--top-k", "8"]));
    ok(precompute("llama", &parquet, &b, &["--top-k", "8"]));
    python_ok(
        "import sys, pyarrow.parquet as pq\n\
         a, b = pq.read_table(sys.argv[1]), pq.read_table(sys.argv[2])\n\
         assert a.num_rows == 13 and a.equals(b), 'parquet input differs from jsonl input'",
        &[&a.join("shard-00000.parquet"), &b.join("shard-00000.parquet")],
    );
}

#[test]
fn train_on_all_tokens_marks_prompts_too() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "4", "--train-on-all-tokens"]));
    python_ok(
        "import sys, pyarrow.parquet as pq\n\
         t = pq.read_table(sys.argv[1]).to_pylist()\n\
         assert all(r['loss_mask'] == [False] + [True] * (r['num_tokens'] - 1) for r in t)\n\
         assert all(r['num_targets'] == r['num_tokens'] - 1 for r in t)",
        &[&out.join("shard-00000.parquet")],
    );
}

#[test]
fn shard_reader_decodes_what_pyarrow_reads_and_refuses_bad_sets() {
    use distill::shards::reader::ShardSet;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "8", "--hidden-layers", "2", "--row-group-rows", "4"]));
    let set = ShardSet::open(&out, false).unwrap();
    assert!(set.row_groups().len() >= 3, "13 rows in row groups of 4");
    let rows: Vec<_> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
    assert_eq!(rows.len(), 13);
    for r in &rows {
        let targets = r.loss_mask.iter().filter(|&&m| m).count();
        assert_eq!(r.tail_logmass.len(), targets);
        assert_eq!(r.topk_ids.len(), 8 * targets);
        assert_eq!(r.hidden[0].1.len(), 64 * targets);
    }
    // The same values as pyarrow reads, for one row.
    let dump = tmp.path().join("row.json");
    python_ok(
        "import sys, json, pyarrow.parquet as pq\n\
         r = pq.read_table(sys.argv[1]).to_pylist()[2]\n\
         json.dump({k: r[k] for k in ['row_index', 'topk_ids', 'topk_logprobs', 'tail_logmass', 'hidden_2']}, open(sys.argv[2], 'w'))",
        &[&out.join("shard-00000.parquet"), &dump],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let row = rows.iter().find(|r| r.row_index == want["row_index"].as_u64().unwrap()).unwrap();
    let flat_f = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| x.as_array().unwrap().iter().map(|y| y.as_f64().unwrap() as f32))
            .collect()
    };
    let ids: Vec<u32> = want["topk_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| x.as_array().unwrap().iter().map(|y| y.as_u64().unwrap() as u32))
        .collect();
    assert_eq!(row.topk_ids, ids);
    assert_eq!(row.topk_logprobs.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), flat_f(&want["topk_logprobs"]));
    assert_eq!(row.hidden[0].1.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), flat_f(&want["hidden_2"]));
    let tail: Vec<f32> = want["tail_logmass"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(row.tail_logmass, tail);

    // The student's tokenizer must be the teacher's.
    let hash = set.manifest.settings.tokenizer.hash.clone();
    set.check_student(&hash, 384, false).unwrap();
    let e = set.check_student("xxh3:0000000000000000", 384, false).unwrap_err().to_string();
    assert!(e.contains(&hash) && e.contains("xxh3:0000000000000000") && e.contains("manifest.json"), "{e}");
    let e = set.check_student(&hash, 300, false).unwrap_err().to_string();
    assert!(e.contains("384") && e.contains("300"), "{e}");
    set.check_student("xxh3:0000000000000000", 300, true).unwrap();

    // A corrupt shard is refused by name.
    let shard = out.join("shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let e = format!("{:#}", ShardSet::open(&out, false).err().unwrap());
    assert!(e.contains("shard-00000.parquet") && e.contains("checksum"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    let e = format!("{:#}", ShardSet::open(&out, false).err().unwrap());
    assert!(e.contains("shard-00000.parquet") && e.contains("missing"), "{e}");
    let e = format!("{:#}", ShardSet::open(tmp.path(), false).err().unwrap());
    assert!(e.contains("not a distill shard set"), "{e}");
}

#[test]
fn row_stream_covers_each_epoch_once_and_restarts_exactly() {
    use distill::shards::reader::ShardSet;
    use distill::train::data::{RowStream, StreamOptions, StreamPosition};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "4", "--row-group-rows", "2", "--shard-tokens", "700"]));
    let set = std::sync::Arc::new(ShardSet::open(&out, false).unwrap());
    let opts = StreamOptions { seed: 11, window: 3, prefetch: 2, epochs: Some(2) };
    let all: Vec<(u64, StreamPosition)> = {
        let mut s = RowStream::new(set.clone(), opts, StreamPosition::default());
        let mut v = vec![];
        while let Some(row) = s.next() {
            v.push((row.unwrap().row_index, s.position()));
        }
        v
    };
    assert_eq!(all.len(), 26);
    for epoch in all.chunks(13) {
        let mut ids: Vec<u64> = epoch.iter().map(|x| x.0).collect();
        ids.sort();
        assert_eq!(ids, (0..13).collect::<Vec<u64>>());
    }
    assert_ne!(all[..13].iter().map(|x| x.0).collect::<Vec<_>>(), all[13..].iter().map(|x| x.0).collect::<Vec<_>>());
    // Resume after any row: the rest is the same sequence.
    for cut in [1, 5, 12, 13, 20] {
        let resumed: Vec<u64> =
            RowStream::new(set.clone(), opts, all[cut - 1].1).map(|r| r.unwrap().row_index).collect();
        let want: Vec<u64> = all[cut..].iter().map(|x| x.0).collect();
        assert_eq!(resumed, want, "resume after row {cut}");
    }
}
