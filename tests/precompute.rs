//! `distill precompute` end to end on tiny models: shards read back with pyarrow and
//! checked against transformers (scripts/check_shards.py), resume after a crash,
//! slicing + merge, the schema definition, pipeline files, and bad input. The reader
//! and the row stream over these shards are tested in tests/shards.rs.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    ok(precompute("qwen3", &sample(), &out, &["--top-k", "384", "--sample", "0"]));
    check_shards(&out, "qwen3", &sample());
}

#[test]
fn tail_draws_match_transformers_and_duckdb_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    // Draws alone (format version 2, no top-k columns), and top-k plus draws from the tail.
    let alone = tmp.path().join("alone");
    ok(precompute("llama", &sample(), &alone, &["--top-k", "0", "--sample", "12", "--sample-seed", "5"]));
    check_shards(&alone, "llama", &sample());
    let hybrid = tmp.path().join("hybrid");
    ok(precompute("llama", &sample(), &hybrid, &["--top-k", "8", "--sample", "6", "--pack", "--max-len", "300"]));
    check_shards(&hybrid, "llama", &sample());
    assert_eq!(manifest(&hybrid)["format_version"], 2);
    assert_eq!(manifest(&hybrid)["settings"]["capture"]["draws"]["per_position"], 6);
    // Any Arrow tool reads them: every position's counts sum to the draws per position.
    python_ok(
        r#"
import sys, duckdb
d = sys.argv[1]
lo, hi, positions, distinct = duckdb.connect().execute(f"""
    SELECT min(list_sum(c)), max(list_sum(c)), count(*), avg(len(c))
    FROM (SELECT unnest(draw_counts) AS c FROM read_parquet('{d}/shard-*.parquet'))""").fetchone()
assert lo == hi == 6 and positions > 0 and 1 <= distinct <= 6, (lo, hi, positions, distinct)
"#,
        &[&hybrid],
    );
    // Mass-adaptive top-k with tail draws: variable lists any Arrow tool reads.
    let adaptive = tmp.path().join("adaptive");
    ok(precompute("llama", &sample(), &adaptive, &["--top-k", "16", "--top-p", "0.5", "--sample", "4"]));
    check_shards(&adaptive, "llama", &sample());
    python_ok(
        r#"
import sys, duckdb
d = sys.argv[1]
lo, hi, mean = duckdb.connect().execute(f"""
    SELECT min(len(t)), max(len(t)), avg(len(t))
    FROM (SELECT unnest(topk_ids) AS t FROM read_parquet('{d}/shard-*.parquet'))""").fetchone()
assert 1 <= lo < hi <= 16, (lo, hi, mean)
print(f"mass-adaptive: {lo}..{hi} ids, {mean:.2f} on average")
"#,
        &[&adaptive],
    );
    // Another batch size draws the same ids: the draws depend on row and position alone.
    let again = tmp.path().join("again");
    ok(precompute(
        "llama",
        &sample(),
        &again,
        &["--top-k", "8", "--sample", "6", "--pack", "--max-len", "300", "--batch-tokens", "300"],
    ));
    let counts = |dir: &Path| {
        let set = distill::shards::reader::ShardSet::open(dir, false).unwrap();
        set.row_groups()
            .iter()
            .flat_map(|&rg| set.decode(rg).unwrap())
            .map(|r| r.topk.draws.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(counts(&hybrid), counts(&again));
    // Draws alone train forward KL only.
    let e = err(distill(&[
        "train",
        "--student",
        model_dir("llama").to_str().unwrap(),
        "--shards",
        alone.to_str().unwrap(),
        "--output",
        tmp.path().join("run").to_str().unwrap(),
        "--steps",
        "1",
        "--loss",
        "reverse-kl",
    ]));
    assert!(e.contains("unbiased estimate of the forward KL"), "{e}");
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

    let mut crashing = args.to_vec();
    crashing.extend(["--crash-after-shards", "2"]);
    let out = precompute("mistral", &sample(), &crashed, &crashing);
    assert!(!out.status.success(), "the injected crash did not happen");
    let m = manifest(&crashed);
    assert_eq!(m["shards"].as_array().unwrap().len(), 2, "only complete shards are listed");
    assert_eq!(m["complete"], false);
    assert!(crashed.join("shard-00002.parquet.tmp").exists(), "the crash left a partial shard");
    assert!(!crashed.join("shard-00002.parquet").exists());

    let stdout = ok(precompute("mistral", &sample(), &crashed, &args));
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
    ok(distill(&args));
    let (mw, mm) = (manifest(&whole), manifest(&merged));
    let tokens = |m: &serde_json::Value| {
        m["shards"].as_array().unwrap().iter().map(|s| s["tokens"].as_u64().unwrap()).sum::<u64>()
    };
    assert_eq!(tokens(&mw), tokens(&mm));
    assert_eq!(mm["slices"].as_array().unwrap().len(), 3);
    check_shards(&merged, "llama", &sample());
    // A missing slice is refused.
    let m2 = tmp.path().join("m2");
    let args =
        ["merge-shards", "--output", m2.to_str().unwrap(), slices[0].to_str().unwrap(), slices[2].to_str().unwrap()];
    assert!(err(distill(&args)).contains("exactly once"));
}

#[test]
fn written_schema_matches_the_documented_definition() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("qwen3", &sample(), &out, &["--top-k", "5", "--sample", "0", "--hidden-layers", "0,3"]));
    let def: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/shard.schema.json")).unwrap()).unwrap();
    let file = std::fs::File::open(out.join("shard-00000.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = reader.schema().clone();
    let mut expected = vec![];
    for col in def["columns"].as_array().unwrap() {
        let (name, ty) = (col["name"].as_str().unwrap(), col["type"].as_str().unwrap());
        if col.get("present").is_some_and(|p| p != "when capture.top_k > 0") {
            continue; // the draw columns: tested below
        }
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
    // Draws alone: no top-k columns, the two draw columns.
    let drawn = tmp.path().join("drawn");
    ok(precompute("qwen3", &sample(), &drawn, &["--top-k", "0", "--sample", "4"]));
    let file = std::fs::File::open(drawn.join("shard-00000.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let mut expected = vec![];
    for col in def["columns"].as_array().unwrap() {
        let (name, ty) = (col["name"].as_str().unwrap(), col["type"].as_str().unwrap());
        if !name.contains("{L}") && col.get("present").is_none_or(|p| p == "with capture.draws") {
            expected.push((name.to_string(), ty.replace("{ID}", "uint16")));
        }
    }
    expected.sort();
    let mut actual: Vec<(String, String)> =
        reader.schema().fields().iter().map(|f| (f.name().clone(), arrow_type_name(f.data_type()))).collect();
    actual.sort();
    assert_eq!(actual, expected);
    assert_eq!(manifest(&drawn)["format_version"], 2);
}

/// The type spelling used in schemas/shard.schema.json.
fn arrow_type_name(t: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType::*;
    match t {
        UInt64 => "uint64".into(),
        UInt16 => "uint16".into(),
        UInt8 => "uint8".into(),
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
    ok(distill(&["precompute", "--no-progress", "--config", cfg.to_str().unwrap(), "--top-k", "6"]));
    let m = manifest(&out);
    assert_eq!(m["settings"]["capture"]["top_k"], 6, "the flag overrides the file");
    assert_eq!(m["settings"]["capture"]["hidden_layers"], serde_json::json!([1]));
    std::fs::write(&cfg, "teacher = \"x\"\ntopk = 3\n").unwrap();
    let e = err(distill(&["precompute", "--no-progress", "--config", cfg.to_str().unwrap()]));
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
