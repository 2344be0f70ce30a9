//! Single-field corruptions of a real shard set, each made consistent the way a hostile
//! or buggy writer would (the manifest's sizes and checksums updated to match), then read
//! by `distill eval`, `train` and `inspect`: every run ends within a timeout, never
//! panics, and either refuses naming the file (and row and column where there is one)
//! or, for fields that do not change the targets, gives the unchanged result.
mod common;
use common::*;
use distill::shards::manifest::Manifest;
use distill::shards::reader::ShardSet;
use distill::shards::row::ShardRow;
use distill::shards::writer::{ParquetOptions, ShardWriter};
use half::f16;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A small, seeded generator: which row and position each corruption hits.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n.max(1) as u64) as usize
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Rewrites shard 0 with its rows changed by `f`, through the library's own writer, and
/// lists it in the manifest with its new size, counts and checksum.
fn rewrite_rows(set: &Path, f: impl FnOnce(&mut Vec<ShardRow>)) {
    let reader = ShardSet::open(set, false).unwrap();
    let mut rows: Vec<ShardRow> = reader.row_groups().iter().flat_map(|&g| reader.decode(g).unwrap()).collect();
    f(&mut rows);
    let mut m = Manifest::load(set).unwrap();
    let sh = &m.settings.sharding;
    let opts = ParquetOptions {
        zstd_level: sh.zstd_level,
        row_group_rows: sh.row_group_rows,
        byte_stream_split: sh.byte_stream_split,
    };
    let work = tempfile::tempdir().unwrap();
    let settings = serde_json::to_string(&m.settings).unwrap();
    let mut writer = ShardWriter::create(work.path(), 0, m.settings.layout(), &opts, &settings).unwrap();
    writer.write_unchecked(&rows).unwrap();
    let entry = writer.finish().unwrap();
    std::fs::copy(work.path().join(&entry.file), set.join(&entry.file)).unwrap();
    m.shards[0] = entry;
    m.save(set).unwrap();
}

/// Changes the manifest as JSON.
fn rewrite_manifest(set: &Path, f: impl FnOnce(&mut Value)) {
    let path = set.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// Lists shard 0 again with its current size and checksum (after a change below the
/// library's writer).
fn relist(set: &Path) {
    let file = set.join("shard-00000.parquet");
    let (bytes, checksum) = (std::fs::metadata(&file).unwrap().len(), distill::files::checksum_file(&file).unwrap());
    rewrite_manifest(set, |m| {
        m["shards"][0]["bytes"] = bytes.into();
        m["shards"][0]["checksum"] = checksum.into();
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn eval(set: &Path) -> std::process::Output {
    let student = model_dir("qwen3");
    distill_within(&["eval", "--device", "cpu", "--json", "--model", s(&student), "--shards", s(set)], 120)
}

type Corruption = Box<dyn Fn(&Path, &mut Rng)>;

fn rows(f: impl Fn(&mut Vec<ShardRow>, &mut Rng) + 'static) -> Corruption {
    Box::new(move |set: &Path, rng: &mut Rng| rewrite_rows(set, |r| f(r, rng)))
}

fn manifest_field(f: impl Fn(&mut Value) + 'static) -> Corruption {
    Box::new(move |set: &Path, _: &mut Rng| rewrite_manifest(set, &f))
}

/// A row and, in it, a trained position (target index) and the token it predicts.
fn pick(rows: &[ShardRow], rng: &mut Rng) -> (usize, usize, usize) {
    let r = rng.below(rows.len());
    let trained: Vec<usize> = (1..rows[r].sequence.len()).filter(|&t| rows[r].sequence.loss_mask[t]).collect();
    let i = rng.below(trained.len());
    (r, i, trained[i])
}

#[test]
fn corrupted_fields_are_refused_by_name_or_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(precompute(
        "llama",
        &sample(),
        &base,
        &["--top-k", "8", "--sample", "0", "--hidden-layers", "2", "--row-group-rows", "4"],
    ));
    let baseline = ok(eval(&base));
    let other_k = tmp.path().join("other-k");
    ok(precompute(
        "llama",
        &sample(),
        &other_k,
        &["--top-k", "4", "--sample", "0", "--hidden-layers", "2", "--row-group-rows", "4"],
    ));

    const K: usize = 8;
    let cases: Vec<(&str, Corruption, &[&str])> = vec![
        (
            "token id outside the vocabulary",
            rows(|r, g| {
                let (i, _, t) = pick(r, g);
                r[i].sequence.ids[t] = 100_000;
            }),
            &["input_ids", "outside the vocabulary"],
        ),
        (
            "loss mask shorter than the row",
            Box::new(|set: &Path, _: &mut Rng| {
                python_ok(
                    "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
                     t = pq.read_table(sys.argv[1])\n\
                     m = t['loss_mask'].to_pylist()\n\
                     m[2] = m[2][:-1]\n\
                     i = t.schema.get_field_index('loss_mask')\n\
                     t = t.set_column(i, t.schema.field(i), pa.array(m, t.schema.field(i).type))\n\
                     pq.write_table(t, sys.argv[1], compression='zstd')",
                    &[&set.join("shard-00000.parquet")],
                );
                relist(set);
            }),
            &["loss_mask"],
        ),
        (
            "a document start marked as a target",
            rows(|r, g| {
                let i = g.below(r.len());
                r[i].sequence.loss_mask[0] = true;
            }),
            &["loss_mask", "starts a document"],
        ),
        (
            "document lengths that do not add up",
            rows(|r, g| {
                let i = g.below(r.len());
                r[i].sequence.doc_lengths[0] += 1;
            }),
            &["doc_lengths"],
        ),
        (
            "a sample id too many",
            rows(|r, g| {
                let i = g.below(r.len());
                r[i].sequence.sample_ids.push("x".into());
            }),
            &["sample_ids"],
        ),
        (
            "a target without its teacher values",
            rows(|r, g| {
                // An untrained token that does not start a document, marked as trained.
                let starts = |q: &ShardRow| {
                    q.sequence
                        .doc_lengths
                        .iter()
                        .scan(0, |a, &d| {
                            *a += d as usize;
                            Some(*a)
                        })
                        .collect::<Vec<_>>()
                };
                let from = g.below(r.len());
                let (i, t) = (0..r.len())
                    .map(|j| (from + j) % r.len())
                    .find_map(|i| {
                        (1..r[i].sequence.len())
                            .find(|&t| !r[i].sequence.loss_mask[t] && !starts(&r[i]).contains(&t))
                            .map(|t| (i, t))
                    })
                    .expect("the sample has chat rows with untrained tokens");
                r[i].sequence.loss_mask[t] = true;
            }),
            &["trained positions"],
        ),
        (
            "top-k id outside the vocabulary",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.ids[p * K + g.below(K)] = 60_000;
            }),
            &["topk_ids", "outside the vocabulary"],
        ),
        (
            "a position's targets missing",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                let t = &mut r[i].topk;
                t.ids.drain(p * K..(p + 1) * K);
                t.logprobs.drain(p * K..(p + 1) * K);
                t.tail_logmass.remove(p);
                t.target_logprob.remove(p);
                for h in &mut r[i].hidden {
                    h.values.drain(p * h.width..(p + 1) * h.width);
                    h.rms.remove(p);
                }
            }),
            &["trained positions"],
        ),
        (
            "NaN log-probability",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.logprobs[p * K + g.below(K)] = f16::NAN;
            }),
            &["topk_logprobs", "NaN"],
        ),
        (
            "positive log-probability",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.logprobs[p * K] = f16::from_f32(0.5);
            }),
            &["topk_logprobs"],
        ),
        (
            "probabilities that sum to 8 (each listed id at probability 1)",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.logprobs[p * K..(p + 1) * K].fill(f16::ZERO);
            }),
            &["topk_logprobs", "sum to 8"],
        ),
        (
            "NaN tail mass",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.tail_logmass[p] = f32::NAN;
            }),
            &["tail_logmass"],
        ),
        (
            "label probability above one",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].topk.target_logprob[p] = 1.0;
            }),
            &["target_logprob"],
        ),
        (
            "NaN hidden state",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                let h = &mut r[i].hidden[0];
                h.values[p * h.width + g.below(h.width)] = f16::NAN;
            }),
            &["hidden_2"],
        ),
        (
            "zero hidden-state RMS",
            rows(|r, g| {
                let (i, p, _) = pick(r, g);
                r[i].hidden[0].rms[p] = 0.0;
            }),
            &["hidden_2_rms"],
        ),
        (
            "an empty row",
            rows(|r, g| {
                let i = g.below(r.len());
                let row = &mut r[i];
                row.sequence.ids.clear();
                row.sequence.loss_mask.clear();
                row.sequence.doc_lengths = vec![];
                row.sequence.sample_ids = vec![];
                row.topk = distill::shards::row::TopKTargets::empty(K);
                for h in &mut row.hidden {
                    h.values.clear();
                    h.rms.clear();
                }
            }),
            &["no token"],
        ),
        ("no shard listed", manifest_field(|m| m["shards"] = json!([])), &["no rows"]),
        (
            "a shard listed twice",
            manifest_field(|m| {
                let e = m["shards"][0].clone();
                m["shards"].as_array_mut().unwrap().push(e);
            }),
            &["listed twice"],
        ),
        (
            "more rows listed than held",
            manifest_field(|m| m["shards"][0]["rows"] = json!(m["shards"][0]["rows"].as_u64().unwrap() + 1)),
            &["rows, the manifest says"],
        ),
        (
            "a shard name leaving the directory",
            manifest_field(|m| m["shards"][0]["file"] = json!("../base/shard-00000.parquet")),
            &["not of the form"],
        ),
        (
            "an absolute shard path",
            manifest_field(|m| m["shards"][0]["file"] = json!("/etc/passwd")),
            &["not of the form"],
        ),
        (
            "a size that differs",
            manifest_field(|m| m["shards"][0]["bytes"] = json!(m["shards"][0]["bytes"].as_u64().unwrap() + 1)),
            &["the manifest says"],
        ),
        (
            "a checksum that differs",
            manifest_field(|m| m["shards"][0]["checksum"] = json!("xxh3:0000000000000000")),
            &["checksum"],
        ),
        ("another k", manifest_field(|m| m["settings"]["capture"]["top_k"] = json!(9)), &["columns"]),
        ("another id type", manifest_field(|m| m["settings"]["capture"]["id_type"] = json!("int32")), &["columns"]),
        ("no hidden layers", manifest_field(|m| m["settings"]["capture"]["hidden_layers"] = json!([])), &["columns"]),
        (
            "a smaller vocabulary",
            manifest_field(|m| m["settings"]["tokenizer"]["vocab_size"] = json!(100)),
            &["outside the vocabulary"],
        ),
        (
            "another tokenizer",
            manifest_field(|m| m["settings"]["tokenizer"]["hash"] = json!("xxh3:0000000000000001")),
            &["tokenizer.json hash"],
        ),
        ("a future format", manifest_field(|m| m["format_version"] = json!(9)), &["format_version"]),
        ("marked incomplete", manifest_field(|m| m["complete"] = json!(false)), &["incomplete"]),
        (
            "rows outside the shard's range",
            manifest_field(|m| m["shards"][0]["row_range"] = json!([100, 200])),
            &["row_index"],
        ),
        (
            "a Parquet count column that lies",
            Box::new(|set: &Path, _: &mut Rng| {
                python_ok(
                    "import sys, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc\n\
                 t = pq.read_table(sys.argv[1])\n\
                 i = t.schema.get_field_index('num_tokens')\n\
                 t = t.set_column(i, t.schema.field(i), pc.add(t['num_tokens'], 1).cast(pa.int32()))\n\
                 pq.write_table(t, sys.argv[1], compression='zstd')",
                    &[&set.join("shard-00000.parquet")],
                );
                relist(set);
            }),
            &["num_tokens"],
        ),
        (
            "a cut file",
            Box::new(|set: &Path, _: &mut Rng| {
                let f = set.join("shard-00000.parquet");
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() / 2]).unwrap();
                relist(set);
            }),
            &["not a readable Parquet file"],
        ),
    ];
    let other = other_k.clone();
    let mut all = cases;
    all.push((
        "another set's shard",
        Box::new(move |set: &Path, _: &mut Rng| {
            std::fs::copy(other.join("shard-00000.parquet"), set.join("shard-00000.parquet")).unwrap();
            relist(set);
        }),
        &["columns"],
    ));
    let harmless: Vec<(&str, Corruption)> = vec![
        ("another distill version", manifest_field(|m| m["distill_version"] = json!("9.9.9"))),
        ("other skip notes", manifest_field(|m| m["skipped"]["examples"] = json!([["x:1", "y"]]))),
        ("the teacher moved", manifest_field(|m| m["settings"]["teacher"]["path"] = json!("/nowhere/teacher"))),
    ];

    let seed = 0x5eed;
    let mut rng = Rng(seed);
    for (n, (what, corrupt, parts)) in all.iter().enumerate() {
        let set = tmp.path().join(format!("case-{n}"));
        copy_dir(&base, &set);
        corrupt(&set, &mut rng);
        let before = tree_digest(&set);
        let out = eval(&set);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{what} (seed {seed:#x}): not refused:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        for p in parts.iter().chain(&["case-"]) {
            assert!(stderr.contains(p), "{what} (seed {seed:#x}): the error does not name {p:?}:\n{stderr}");
        }
        assert_eq!(before, tree_digest(&set), "{what}: eval changed the set");
    }
    for (n, (what, corrupt)) in harmless.iter().enumerate() {
        let set = tmp.path().join(format!("harmless-{n}"));
        copy_dir(&base, &set);
        corrupt(&set, &mut rng);
        assert_eq!(ok(eval(&set)), baseline, "{what} changed the result");
    }
}

/// The trainer and `inspect` read through the same checks: a bad value stops them with
/// the shard, row and column named, never a panic inside libtorch.
#[test]
fn train_and_inspect_refuse_a_corrupted_row_too() {
    let tmp = tempfile::tempdir().unwrap();
    let set: PathBuf = tmp.path().join("set");
    ok(precompute("llama", &sample(), &set, &["--top-k", "8", "--sample", "0"]));
    rewrite_rows(&set, |rows| rows[3].topk.ids[5] = 50_000);
    let (student, out) = (model_dir("qwen3"), tmp.path().join("run"));
    let train = || {
        let args = ["train", "--student", s(&student), "--shards", s(&set), "--output", s(&out), "--device", "cpu"];
        distill_within(&[&args[..], &["--steps", "3", "--batch-tokens", "512"]].concat(), 120)
    };
    let e = err(train());
    assert!(e.contains("shard-00000.parquet") && e.contains("row_index") && e.contains("topk_ids"), "{e}");
    let e = err(distill_within(&["inspect", s(&set), "--rows", "20"], 60));
    assert!(e.contains("shard-00000.parquet") && e.contains("topk_ids"), "{e}");
    // A set that lists no shard once made the trainer spin forever on empty epochs.
    rewrite_manifest(&set, |m| m["shards"] = json!([]));
    assert!(err(train()).contains("no rows"));
}

/// Tail draws that break their rules (counts not summing to the draws per position, an
/// id drawn from the tail that is in the top-k, ids out of order) are refused by name.
#[test]
fn corrupted_tail_draws_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(precompute("llama", &sample(), &base, &["--top-k", "8", "--sample", "6"]));
    type Corrupt = fn(&mut Vec<ShardRow>);
    let cases: [(&str, Corrupt, &str); 3] = [
        ("a count too many", |r| r[2].topk.draws.as_mut().unwrap().counts[4] += 1, "draw_counts"),
        (
            "a top-k id among the draws",
            |r| {
                let top = r[1].topk.ids[0];
                let d = r[1].topk.draws.as_mut().unwrap();
                d.ids[0] = top;
            },
            "draw_ids",
        ),
        (
            "ids out of order",
            |r| {
                let d = r[0].topk.draws.as_mut().unwrap();
                let at = d.lengths.iter().position(|&n| n >= 2).unwrap();
                let start: usize = d.lengths[..at].iter().map(|&n| n as usize).sum();
                d.ids.swap(start, start + 1);
            },
            "draw_ids",
        ),
    ];
    for (what, corrupt, column) in cases {
        let set = tmp.path().join(what.replace(' ', "-"));
        copy_dir(&base, &set);
        rewrite_rows(&set, corrupt);
        let e = err(eval(&set));
        assert!(e.contains("shard-00000.parquet") && e.contains(column), "{what}: {e}");
    }
}

/// A merge links the shards its inputs list: a name leading outside an input is refused
/// before anything is linked.
#[test]
fn merge_follows_no_shard_name_outside_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let slices: Vec<PathBuf> = (0..2)
        .map(|i| {
            let out = tmp.path().join(format!("slice-{i}"));
            let idx = i.to_string();
            ok(precompute("llama", &sample(), &out, &["--top-k", "4", "--shard-index", &idx, "--num-shards", "2"]));
            out
        })
        .collect();
    std::fs::write(tmp.path().join("secret.parquet"), "not yours").unwrap();
    rewrite_manifest(&slices[1], |m| m["shards"][0]["file"] = json!("../secret.parquet"));
    let out = tmp.path().join("merged");
    let e = err(distill(&["merge-shards", "--output", s(&out), s(&slices[0]), s(&slices[1])]));
    assert!(e.contains("../secret.parquet") && e.contains("not of the form"), "{e}");
    assert!(tree_digest(&out).is_empty(), "the merge wrote before refusing");
}
