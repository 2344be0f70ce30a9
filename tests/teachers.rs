//! `distill merge-teachers` on two tiny teachers of one tokenizer (llama, qwen3): the
//! merged shards hold the weighted mixture of the teachers' stored distributions
//! (checked in float64 at k = vocabulary), two identical teachers give back the one,
//! per-source weights pick each file's teacher, and sets that differ are refused by name.
mod common;
use common::*;
use distill::shards::reader::ShardSet;
use distill::shards::row::ShardRow;
use std::path::{Path, PathBuf};

fn rows(dir: &Path) -> Vec<ShardRow> {
    let set = ShardSet::open(dir, false).unwrap();
    set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect()
}

/// The document of each trained position of a row.
fn trained_docs(seq: &distill::dataset::sequence::Sequence) -> Vec<usize> {
    let docs = seq.doc_lengths.iter().enumerate().flat_map(|(d, &n)| std::iter::repeat_n(d, n as usize));
    docs.zip(&seq.loss_mask).filter(|(_, &m)| m).map(|(d, _)| d).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two JSONL files of short plain-text documents (no `id`: sample ids are `a:LINE`,
/// `b:LINE`), so packed rows hold several documents and one crosses from a to b.
fn two_sources(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let corpus = std::fs::read_to_string(repo().join("tests/data/corpus.txt")).unwrap();
    let clauses: Vec<&str> = corpus.lines().flat_map(|l| l.split(", ")).filter(|c| c.len() > 20).collect();
    let half = clauses.len() / 2;
    // Short documents at the end of a and the start of b pack into one row.
    let a = [&clauses[..half], &["It was late.", "The end."]].concat();
    let b = [&["A new day.", "She woke."], &clauses[half..]].concat();
    for (name, part) in [("a.jsonl", a), ("b.jsonl", b)] {
        let lines: Vec<String> = part.iter().map(|c| serde_json::json!({ "text": c }).to_string()).collect();
        std::fs::write(data.join(name), lines.join("\n") + "\n").unwrap();
    }
    data
}

#[test]
fn mixture_at_full_vocabulary_is_exact_and_identical_teachers_give_back_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("tests/data/heldout.jsonl");
    let set = |model: &str, k: &str| {
        let out = tmp.path().join(format!("{model}-k{k}"));
        ok(precompute(model, &data, &out, &["--top-k", k, "--sample", "0"]));
        out
    };
    let (a, b) = (set("llama", "384"), set("qwen3", "384"));
    let merged = tmp.path().join("mixed");
    let printed =
        ok(distill(&["merge-teachers", "--output", s(&merged), &format!("{}:0.7", s(&a)), &format!("{}:3e-1", s(&b))]));
    assert!(printed.contains("mixed 2 teachers") && printed.contains("0.7000"), "{printed}");
    let (ra, rb, rm) = (rows(&a), rows(&b), rows(&merged));
    assert_eq!(rm.len(), ra.len());
    let mut checked = 0;
    for ((ra, rb), rm) in ra.iter().zip(&rb).zip(&rm) {
        assert_eq!(rm.sequence, ra.sequence);
        let positions = ra.topk.per_position().zip(rb.topk.per_position()).zip(rm.topk.per_position());
        for (j, (((ia, la), (ib, lb)), (im, lm))) in positions.enumerate() {
            assert_eq!(im.len(), 384);
            let p = |ids: &[u32], lps: &[half::f16], id: u32| {
                lps[ids.iter().position(|&x| x == id).unwrap()].to_f64().exp()
            };
            for (&id, l) in im.iter().zip(lm) {
                // float64 mixture of the stored float16 values; the merged value is
                // rounded to float16 once: relative error <= 2^-11 of the log-prob.
                let want = (0.7 * p(ia, la, id) + 0.3 * p(ib, lb, id)).ln();
                let got = l.to_f64();
                assert!(
                    (got - want).abs() <= want.abs() * 2f64.powi(-11) + 1e-7,
                    "position {j}, id {id}: {got} vs {want}"
                );
                checked += 1;
            }
            assert!(lm.windows(2).all(|w| w[0] >= w[1]), "most probable first");
            assert_eq!(rm.topk.tail_logmass[j], f32::NEG_INFINITY, "nothing outside the whole vocabulary");
            let label = (0.7 * f64::from(ra.topk.target_logprob[j]).exp()
                + 0.3 * f64::from(rb.topk.target_logprob[j]).exp())
            .ln();
            assert!((f64::from(rm.topk.target_logprob[j]) - label).abs() <= 1e-6 * label.abs().max(1.0));
        }
    }
    assert!(checked > 10_000, "{checked} probabilities compared");

    // The manifest names both teachers; inspect shows them; train reads the set as any.
    let m = manifest(&merged);
    let teachers = m["settings"]["mixture"]["teachers"].as_array().unwrap();
    assert_eq!(teachers.len(), 2);
    assert!((teachers[0]["weight"].as_f64().unwrap() - 0.7).abs() < 1e-12);
    assert!(teachers[1]["teacher"]["path"].as_str().unwrap().ends_with("qwen3"));
    assert!(m["settings"]["mixture"]["rule"].as_str().unwrap().contains("min(tail_t / (V - k_t)"));
    let shown = ok(distill(&["inspect", s(&merged)]));
    assert!(shown.contains("teachers") && shown.contains("0.7000") && shown.contains("qwen3"), "{shown}");
    let eval = ok(distill(&["eval", "--device", "cpu", "--model", s(&model_dir("qwen3")), "--shards", s(&merged)]));
    assert!(eval.contains("against the mixture of 2 teachers: 0.7000"), "{eval}");
    let student = copy_model("qwen3", &tmp.path().join("student"));
    let run = tmp.path().join("run");
    ok(distill(&[
        "train",
        "--student",
        s(&student),
        "--shards",
        s(&merged),
        "--output",
        s(&run),
        "--device",
        "cpu",
        "--batch-tokens",
        "256",
        "--steps",
        "2",
    ]));

    // Two identical teachers, any weights: the merged rows are the teacher's rows, hidden
    // states too when one teacher's are carried.
    let k8 = tmp.path().join("llama-k8");
    ok(precompute("llama", &data, &k8, &["--top-k", "8", "--sample", "0", "--hidden-layers", "1"]));
    let same = tmp.path().join("same");
    ok(distill(&["merge-teachers", "--output", s(&same), "--hidden-from", "1", &format!("{}:0.123", s(&k8)), s(&k8)]));
    assert_eq!(rows(&same), rows(&k8));
    assert_eq!(manifest(&same)["settings"]["capture"]["hidden_layers"], serde_json::json!([1]));
    let plain = tmp.path().join("plain");
    ok(distill(&["merge-teachers", "--output", s(&plain), s(&k8), s(&k8)]));
    assert!(rows(&plain).iter().all(|r| r.hidden.is_empty()), "no hidden states unless asked");
    // The output directory now holds a set: a second merge there is refused.
    let e = err(distill(&["merge-teachers", "--output", s(&same), s(&k8), s(&k8)]));
    assert!(e.contains("already holds a shard set"), "{e}");
}

#[test]
fn per_source_weights_pick_each_files_teacher_and_mismatched_sets_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_sources(tmp.path());
    let set = |name: &str, model: &str, input: &Path, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["--top-k", "8", "--pack", "true", "--max-len", "96"];
        args.extend(extra);
        ok(precompute(model, input, &out, &args));
        out
    };
    let (a, b) = (set("a", "llama", &data, &["--sample", "0"]), set("b", "qwen3", &data, &["--sample", "0"]));
    let examples = manifest(&a)["source_examples"].clone();
    let clauses = |f: &str| std::fs::read_to_string(data.join(f)).unwrap().lines().count() as u64;
    assert_eq!(examples, serde_json::json!([clauses("a.jsonl"), clauses("b.jsonl")]));

    let merged = tmp.path().join("by-source");
    ok(distill(&[
        "merge-teachers",
        "--output",
        s(&merged),
        "--source-weights",
        "a.jsonl=1,0",
        "--source-weights",
        &format!("{}=0,1", data.join("b.jsonl").display()),
        s(&a),
        s(&b),
    ]));
    let (ra, rb, rm) = (rows(&a), rows(&b), rows(&merged));
    let mut crossing = 0;
    for ((ra, rb), rm) in ra.iter().zip(&rb).zip(&rm) {
        let seq = &rm.sequence;
        crossing += usize::from(
            seq.sample_ids.iter().any(|i| i.starts_with("a:")) && seq.sample_ids.iter().any(|i| i.starts_with("b:")),
        );
        // Each trained position's document, hence its file and teacher.
        let docs = trained_docs(seq);
        let lists = ra.topk.per_position().zip(rb.topk.per_position()).zip(rm.topk.per_position());
        for (j, ((pa, pb), pm)) in lists.enumerate() {
            let (want, row) = match seq.sample_ids[docs[j]].starts_with("a:") {
                true => (pa, ra),
                false => (pb, rb),
            };
            assert_eq!(pm, want, "row {}, position {j}", seq.row_index);
            assert!((rm.topk.tail_logmass[j] - row.topk.tail_logmass[j]).abs() <= 1e-6);
            assert!((rm.topk.target_logprob[j] - row.topk.target_logprob[j]).abs() <= 1e-6);
        }
    }
    assert_eq!(crossing, 1, "one packed row holds documents of both files");
    let m = manifest(&merged);
    assert_eq!(m["settings"]["mixture"]["source_weights"].as_array().unwrap().len(), 2);

    // Refused, each by name: a set over other data, a set with tail draws, a source that
    // is not one of the data files, too many ids.
    let other = set("other", "qwen3", &repo().join("tests/data/heldout.jsonl"), &["--sample", "0"]);
    let out = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let e = err(distill(&["merge-teachers", "--output", &out("x1"), s(&a), s(&other)]));
    assert!(e.contains("do not cover the same rows") && e.contains("data.hash"), "{e}");
    let draws = set("draws", "qwen3", &data, &[]);
    let e = err(distill(&["merge-teachers", "--output", &out("x2"), s(&a), s(&draws)]));
    assert!(e.contains("tail draws") && e.contains("--sample 0"), "{e}");
    let e = err(distill(&["merge-teachers", "--output", &out("x3"), "--source-weights", "c.jsonl=1,0", s(&a), s(&b)]));
    assert!(e.contains("c.jsonl") && e.contains("a.jsonl"), "{e}");
    let e = err(distill(&["merge-teachers", "--output", &out("x4"), "--top-k", "9", s(&a), s(&b)]));
    assert!(e.contains("1..=8"), "{e}");
    for x in ["x1", "x2", "x3", "x4"] {
        assert!(!tmp.path().join(x).join("manifest.json").exists(), "nothing written for a refused merge");
    }
}

/// `--route FIELD=NAME_A,NAME_B`: every document takes the targets of the teacher its
/// data row names (inside packed rows too), rows without the field the global weights;
/// a name no teacher has and changed data are refused by name.
#[test]
fn routing_by_a_data_field_gives_each_document_its_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_sources(tmp.path());
    // Documents alternate between the two teachers; every fifth names none.
    for name in ["a.jsonl", "b.jsonl"] {
        let path = data.join(name);
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                if i % 5 != 4 {
                    v["teacher"] = serde_json::json!(if i % 2 == 0 { "general" } else { "math" });
                }
                v.to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }
    let set = |name: &str, model: &str| {
        let out = tmp.path().join(name);
        ok(precompute(model, &data, &out, &["--top-k", "8", "--pack", "true", "--max-len", "96", "--sample", "0"]));
        out
    };
    let (a, b) = (set("a", "llama"), set("b", "qwen3"));
    let merged = tmp.path().join("routed");
    let printed =
        ok(distill(&["merge-teachers", "--output", s(&merged), "--route", "teacher=general,math", s(&a), s(&b)]));
    assert!(printed.contains("routed by `teacher`"), "{printed}");
    // The route of each sample id (`FILE_STEM:LINE`).
    let mut route = std::collections::HashMap::new();
    for name in ["a", "b"] {
        let text = std::fs::read_to_string(data.join(format!("{name}.jsonl"))).unwrap();
        for (i, l) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            route.insert(format!("{name}:{}", i + 1), v["teacher"].as_str().map(String::from));
        }
    }
    let (ra, rb, rm) = (rows(&a), rows(&b), rows(&merged));
    let (mut seen, mut packed_mixed) = ([0usize; 3], 0);
    for ((ra, rb), rm) in ra.iter().zip(&rb).zip(&rm) {
        let seq = &rm.sequence;
        let routes: Vec<&Option<String>> = seq.sample_ids.iter().map(|i| &route[i]).collect();
        packed_mixed += usize::from(routes.windows(2).any(|w| w[0] != w[1]));
        let docs = trained_docs(seq);
        let lists = ra.topk.per_position().zip(rb.topk.per_position()).zip(rm.topk.per_position());
        for (j, ((pa, pb), pm)) in lists.enumerate() {
            let (want, row, k) = match routes[docs[j]].as_deref() {
                Some("general") => (pa, ra, 0),
                Some("math") => (pb, rb, 1),
                _ => {
                    seen[2] += 1; // a 0.5 / 0.5 mixture: neither list alone
                    continue;
                }
            };
            seen[k] += 1;
            assert_eq!(pm, want, "row {}, position {j}", seq.row_index);
            assert!((rm.topk.tail_logmass[j] - row.topk.tail_logmass[j]).abs() <= 1e-6);
            assert!((rm.topk.target_logprob[j] - row.topk.target_logprob[j]).abs() <= 1e-6);
        }
    }
    assert!(seen.iter().all(|&n| n > 20) && packed_mixed > 0, "{seen:?}, {packed_mixed} packed rows mix routes");
    let m = manifest(&merged);
    let r = &m["settings"]["mixture"]["route"];
    assert_eq!(r["names"], serde_json::json!(["general", "math"]));
    let inspect = ok(distill(&["inspect", s(&merged)]));
    assert!(inspect.contains("routed by `teacher`"), "{inspect}");
    // eval per routed teacher: the llama teacher itself is at KL 0 on the rows routed to
    // it, not on qwen3's; the counts are the positions routed to each.
    let llama = model_dir("llama");
    let json = ok(distill(&["eval", "--model", s(&llama), "--shards", s(&merged), "--json"]));
    let evals: serde_json::Value = serde_json::from_str(&json).unwrap();
    let per: Vec<&serde_json::Value> = evals[0]["shards"]["per_teacher"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = per.iter().map(|p| p["teacher"].as_str().unwrap()).collect();
    assert_eq!(names, ["general", "math", "unrouted"]);
    let counts: Vec<usize> = per.iter().map(|p| p["targets"].as_u64().unwrap() as usize).collect();
    assert_eq!(counts, seen.to_vec(), "positions per teacher");
    let kl = |i: usize| per[i]["kl_to_teacher"].as_f64().unwrap();
    assert!(kl(0) < 1e-3 && kl(1) > 0.1, "llama against its own targets {} and qwen3's {}", kl(0), kl(1));
    let total = evals[0]["shards"]["kl_to_teacher"].as_f64().unwrap() * seen.iter().sum::<usize>() as f64;
    assert!((total - (0..3).map(|i| kl(i) * counts[i] as f64).sum::<f64>()).abs() < 1e-6 * total.max(1.0));

    let out = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let e = err(distill(&["merge-teachers", "--output", &out("x1"), "--route", "teacher=general,code", s(&a), s(&b)]));
    assert!(e.contains("\"math\", which names no teacher"), "{e}");
    let e = err(distill(&["merge-teachers", "--output", &out("x2"), "--route", "teacher=general", s(&a), s(&b)]));
    assert!(e.contains("1 names for 2 teachers"), "{e}");
    let a_file = data.join("a.jsonl");
    let text = std::fs::read_to_string(&a_file).unwrap();
    std::fs::write(&a_file, text.replace("\"general\"", "\"math\"")).unwrap();
    let e = err(distill(&["merge-teachers", "--output", &out("x3"), "--route", "teacher=general,math", s(&a), s(&b)]));
    assert!(e.contains("changed since they were precomputed"), "{e}");
    assert!(!tmp.path().join("x1").exists() && !tmp.path().join("x3").exists());
}
