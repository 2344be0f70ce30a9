//! A teacher with another tokenizer: the tiny byte-level teacher (BOS in front, `Ġ` for
//! spaces) and `llama-spm`, a student whose SentencePiece-style tokenizer writes spaces
//! as `▁`, puts one before the text, falls back to bytes and adds no BOS.
//! Alignment over real text and emoji / CJK / accents; the student-side set read by
//! pyarrow; and training: cross-tokenizer KD against SFT at the same budget.
mod common;
use common::*;
use distill::align::token_bytes::TokenBytes;
use distill::align::Aligner;
use distill::tokenizer::TextTokenizer;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_document_aligns_byte_for_byte() {
    let teacher = TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let student = TextTokenizer::from_dir(&model_dir("llama-spm")).unwrap();
    let (tb, sb) = (TokenBytes::new(&teacher).unwrap(), TokenBytes::new(&student).unwrap());
    let aligner = Aligner::new(&tb, &sb, &student);
    let corpus = std::fs::read_to_string(repo().join("tests/data/corpus.txt")).unwrap();
    let mut texts: Vec<String> = corpus.lines().map(String::from).collect();
    texts.extend(
        ["naïve café — Ünïcödé", "東京タワー 😀👩‍👩‍👧 ok", "two  spaces\tand\nlines\n", " leading space"].map(String::from),
    );
    let (mut groups, mut one_to_one) = (0, 0);
    for text in &texts {
        let ids = teacher.encode(text, true).unwrap();
        let a = aligner.align(&ids).unwrap();
        assert_eq!(a.student_ids, student.encode(text, true).unwrap(), "the student's own tokenisation of the text");
        // Tiled in order: every teacher token after the BOS, every student token after a
        // lone prefix space, each group the same bytes.
        let mut t = 1;
        let mut st = usize::from(!text.starts_with(' ') && sb.of(a.student_ids[0]) == Some(b" "));
        for g in &a.groups {
            assert_eq!((g.teacher.start, g.student.start), (t, st), "{text:?}");
            let bytes =
                |b: &TokenBytes, ids: &[u32]| ids.iter().flat_map(|&i| b.of(i).unwrap().to_vec()).collect::<Vec<u8>>();
            let (tbytes, mut sbytes) =
                (bytes(&tb, &ids[g.teacher.clone()]), bytes(&sb, &a.student_ids[g.student.clone()]));
            if g.student.start == 0 && !text.starts_with(' ') {
                sbytes.remove(0);
            }
            assert_eq!(tbytes, sbytes, "{text:?}: {g:?}");
            (t, st) = (g.teacher.end, g.student.end);
            groups += 1;
            one_to_one += usize::from(g.teacher.len() == 1 && g.student.len() == 1);
        }
        assert_eq!((t, st), (ids.len(), a.student_ids.len()), "{text:?}");
    }
    assert!(one_to_one * 2 > groups, "{one_to_one} of {groups} groups are 1:1");
}

#[test]
fn cross_tokenizer_kd_beats_sft_at_the_same_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A teacher that knows the domain: the tiny Llama trained on the whole corpus (the
    // held-out lines included); the student sees lines 0-4 and the teacher's targets on
    // them only.
    let corpus = std::fs::read_to_string(repo().join("tests/data/corpus.txt")).unwrap();
    let lines: Vec<&str> = corpus.lines().collect();
    let jsonl = |name: &str, part: &[&str]| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            part.iter().map(|l| serde_json::json!({ "text": l }).to_string() + "\n").collect::<String>(),
        )
        .unwrap();
        path
    };
    let (all, train, held) =
        (jsonl("all.jsonl", &lines), jsonl("train.jsonl", &lines[..5]), jsonl("held.jsonl", &lines[5..]));
    let teacher0 = copy_model("llama", &dir.join("teacher0"));
    ok(precompute("llama", &all, &dir.join("sft-shards"), &["--top-k", "1", "--sample", "0"]));
    let teacher_run = dir.join("teacher-run");
    ok(distill(&[
        "train",
        "--student",
        s(&teacher0),
        "--shards",
        s(&dir.join("sft-shards")),
        "--output",
        s(&teacher_run),
        "--device",
        "cpu",
        "--batch-tokens",
        "1024",
        "--steps",
        "20",
        "--lr",
        "3e-3",
        "--alpha",
        "1",
        "--save-every",
        "20",
    ]));
    let teacher = teacher_run.join("checkpoint-0000020");
    let targets = |input: &Path, out: &str| {
        let out = dir.join(out);
        let args = ["precompute", "--no-progress", "--teacher", s(&teacher), "--devices", "cpu", "--input", s(input)];
        ok(distill(&[&args[..], &["--output", s(&out), "--top-k", "16", "--sample", "0"]].concat()));
        out
    };
    let (train_set, held_set) = (targets(&train, "train-set"), targets(&held, "held-set"));
    let student = model_dir("llama-spm");

    // Without the flag the other tokenizer is refused, naming the way out.
    let e = err(distill(&[
        "train",
        "--student",
        s(&student),
        "--shards",
        s(&train_set),
        "--output",
        s(&dir.join("x")),
        "--device",
        "cpu",
    ]));
    assert!(e.contains("--cross-tokenizer"), "{e}");
    // A student with the teacher's tokenizer needs no cross-tokenizer targets.
    let e = err(distill(&[
        "cross-tokenize",
        "--shards",
        s(&train_set),
        "--student",
        s(&teacher),
        "--output",
        s(&dir.join("y")),
    ]));
    assert!(e.contains("the teacher's tokenizer"), "{e}");

    let held_student = dir.join("held-student");
    let made = ok(distill(&[
        "cross-tokenize",
        "--shards",
        s(&held_set),
        "--student",
        s(&student),
        "--output",
        s(&held_student),
    ]));
    assert!(made.contains("groups"), "{made}");
    // Plain Arrow reads the student-side set: ULD vectors of k + 1 = 17 entries.
    python_ok(
        "import sys, glob, pyarrow.parquet as pq\n\
         t = pq.read_table(sorted(glob.glob(sys.argv[1] + '/shard-*.parquet')))\n\
         assert t.schema.field('uld_logprobs').type.value_type.list_size == 17, t.schema\n\
         rows = t.to_pylist()\n\
         assert all(len(r['uld_logprobs']) == r['num_targets'] == len(r['group_continues']) for r in rows)",
        &[&held_student],
    );

    // A set already in the student's tokens trains without the flag, ULD included.
    let first_kd = |uld_weight: &str| {
        let out = dir.join(format!("direct-{uld_weight}"));
        ok(distill(&[
            "train",
            "--student",
            s(&student),
            "--shards",
            s(&held_student),
            "--output",
            s(&out),
            "--device",
            "cpu",
            "--batch-tokens",
            "512",
            "--steps",
            "1",
            "--uld-weight",
            uld_weight,
        ]));
        let line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        serde_json::from_str::<serde_json::Value>(line.lines().next().unwrap()).unwrap()["kd"].as_f64().unwrap()
    };
    let (without, with) = (first_kd("0"), first_kd("1"));
    assert!(with > without + 0.05, "kd with ULD {with}, without {without}");

    let run = |name: &str, alpha: &str| {
        let out = dir.join(name);
        ok(distill(&[
            "train",
            "--student",
            s(&student),
            "--shards",
            s(&train_set),
            "--output",
            s(&out),
            "--device",
            "cpu",
            "--batch-tokens",
            "512",
            "--steps",
            "80",
            "--lr",
            "3e-3",
            "--alpha",
            alpha,
            "--cross-tokenizer",
            "--save-every",
            "80",
        ]));
        out.join("checkpoint-0000080")
    };
    let (kd, sft) = (run("kd", "0.5"), run("sft", "1"));
    let report = ok(distill(&[
        "eval",
        "--device",
        "cpu",
        "--json",
        "--model",
        &format!("kd={}", s(&kd)),
        "--model",
        &format!("sft={}", s(&sft)),
        "--shards",
        s(&held_student),
        "--text",
        s(&held),
    ]));
    let rows: serde_json::Value = serde_json::from_str(&report).unwrap();
    let metric = |i: usize, part: &str, key: &str| rows[i][part][key].as_f64().unwrap();
    let (kd_uld, sft_uld) = (metric(0, "shards", "uld"), metric(1, "shards", "uld"));
    let (kd_ppl, sft_ppl) = (metric(0, "text", "perplexity"), metric(1, "text", "perplexity"));
    eprintln!("held-out ULD kd {kd_uld:.4} sft {sft_uld:.4}; perplexity kd {kd_ppl:.2} sft {sft_ppl:.2}");
    assert!(kd_uld < sft_uld, "ULD: kd {kd_uld} vs sft {sft_uld}");
    assert!(kd_ppl < sft_ppl, "perplexity: kd {kd_ppl} vs sft {sft_ppl}");
}
