//! Decoding with the key/value cache: greedy continuations against transformers'
//! `generate(do_sample=False)` on every tiny model, and sampling's reproducibility.
mod common;
use common::*;
use distill::generate::{generate, FinishReason, GenerateOptions, Hooks, SamplingOptions};
use distill::model::decode::KvCache;
use distill::model::{CausalLm, ForwardInput};
use tch::{Device, Kind, Tensor};

/// Prompts of different lengths (left padding inside a batch); 19 + 24 tokens run past
/// the Mistral model's 8-token window.
fn prompts() -> Vec<Vec<u32>> {
    let lengths = [5usize, 19, 3, 11];
    let mut state = 7u64;
    lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((state >> 33) % 380) as u32
                })
                .collect()
        })
        .collect()
}

const NEW_TOKENS: usize = 24;

/// transformers' greedy continuations (left-padded batch, stopping at eos id 1), cut
/// after the first eos.
fn transformers_greedy(model: &std::path::Path, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let work = tempfile::tempdir().unwrap();
    let (input, output) = (work.path().join("prompts.json"), work.path().join("out.json"));
    std::fs::write(&input, serde_json::to_string(prompts).unwrap()).unwrap();
    python_ok(
        r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
prompts = json.load(open(sys.argv[2]))
width = max(map(len, prompts))
ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=int(sys.argv[4]),
                     eos_token_id=1, pad_token_id=2)
rows = []
for row in out[:, width:].tolist():
    rows.append(row[: row.index(1) + 1] if 1 in row else row)
json.dump(rows, open(sys.argv[3], "w"))
"#,
        &[model, &input, &output, std::path::Path::new(&NEW_TOKENS.to_string())],
    );
    serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap()
}

/// Every cached step's final hidden state against the full forward pass over the same
/// left-padded batch (prompts + 12 more tokens), for plain, sliding-window (past the
/// window) and q/k-normed attention: float32 rounding only.
#[test]
fn cached_steps_equal_the_full_forward() {
    let prompts = prompts();
    let width = prompts.iter().map(Vec::len).max().unwrap();
    let more: Vec<i64> = (0..12).map(|i| 10 + 7 * i).collect();
    let total = width + more.len();
    let (mut ids, mut mask) = (vec![], vec![]);
    for p in &prompts {
        let pad = width - p.len();
        ids.extend((0..pad).map(|_| 2i64).chain(p.iter().map(|&x| x as i64)).chain(more.iter().copied()));
        mask.extend((0..total).map(|t| (t >= pad) as i64));
    }
    let shape = [prompts.len() as i64, total as i64];
    let (ids, mask) = (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape));
    for name in ["llama", "mistral", "qwen3", "qwen3-moe", "mixtral", "gemma2", "gemma3"] {
        let model = CausalLm::load(&model_dir(name), Device::Cpu, Kind::Float).unwrap();
        let full = model.transformer.forward_hidden(&ForwardInput::new(&ids, Some(&mask)), &[]).unwrap().last;
        let mut cache = KvCache::new(model.config.num_layers);
        let w = width as i64;
        let mut got = vec![model.transformer.decode(&ids.narrow(1, 0, w), &mask.narrow(1, 0, w), &mut cache).unwrap()];
        for t in w..total as i64 {
            got.push(model.transformer.decode(&ids.narrow(1, t, 1), &mask.narrow(1, t, 1), &mut cache).unwrap());
        }
        for (step, h) in got.iter().enumerate() {
            let want = full.select(1, w - 1 + step as i64);
            let err = rel_err(h, &want, None);
            assert!(err < 1e-5, "{name}, step {step}: relative error {err:.2e}");
        }
    }
}

fn options(max_batch_tokens: usize, sampling: SamplingOptions) -> GenerateOptions {
    GenerateOptions { max_new_tokens: NEW_TOKENS, stop_ids: vec![1], sampling, max_batch_tokens, max_batch_rows: 64 }
}

#[test]
fn greedy_matches_transformers_generate_on_every_family() {
    let prompts = prompts();
    let keys: Vec<u64> = (0..prompts.len() as u64).collect();
    for name in MODELS {
        let dir = model_dir(name);
        let want = transformers_greedy(&dir, &prompts);
        let model = CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap();
        // One batch of all four, and batches of one or two rows: the same tokens.
        for budget in [10_000, 60] {
            let got =
                generate(&model, &prompts, &keys, &options(budget, SamplingOptions::default()), &Hooks::default())
                    .unwrap();
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(&g.ids, w, "{name}, row {r}, batch budget {budget}");
                let stopped = w.last() == Some(&1);
                assert_eq!(g.finish, if stopped { FinishReason::Stop } else { FinishReason::Length });
            }
        }
        // Rows of two, each stopped (by the hook) after its own number of tokens: waiting
        // prompts join a batch in flight, with fewer or more slots than it, and the slots
        // of the rows that left are dropped. Greedy replies are prefixes of the full ones.
        let stop_after = |i: usize| 6 + 5 * i;
        let stop = |i: usize, ids: &[u32]| ids.len() >= stop_after(i);
        let hooks = Hooks { stop: Some(&stop), progress: None, observer: None };
        let opts = GenerateOptions { max_batch_rows: 2, ..options(10_000, SamplingOptions::default()) };
        let got = generate(&model, &prompts, &keys, &opts, &hooks).unwrap();
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let n = stop_after(r).min(w.len());
            assert_eq!(g.ids, w[..n], "{name}, row {r}, continuous batching");
        }
    }
}

#[test]
fn sampling_is_reproducible_in_any_batch_and_follows_its_filters() {
    let prompts = prompts();
    let keys: Vec<u64> = (0..prompts.len() as u64).collect();
    let model = CausalLm::load(&model_dir("qwen3"), Device::Cpu, Kind::Float).unwrap();
    let sampling = SamplingOptions { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 5 };
    let together = generate(&model, &prompts, &keys, &options(10_000, sampling), &Hooks::default()).unwrap();
    let apart = generate(&model, &prompts, &keys, &options(60, sampling), &Hooks::default()).unwrap();
    assert_eq!(together, apart, "a row samples the same tokens whatever its batch");
    let other_seed =
        generate(&model, &prompts, &keys, &options(10_000, SamplingOptions { seed: 6, ..sampling }), &Hooks::default())
            .unwrap();
    assert_ne!(together, other_seed);
    // top-k 1 and a tiny top-p both leave only the most likely token: greedy.
    let greedy =
        generate(&model, &prompts, &keys, &options(10_000, SamplingOptions::default()), &Hooks::default()).unwrap();
    for filtered in [SamplingOptions { top_k: 1, ..sampling }, SamplingOptions { top_p: 1e-9, ..sampling }] {
        assert_eq!(
            generate(&model, &prompts, &keys, &options(10_000, filtered), &Hooks::default()).unwrap(),
            greedy,
            "{filtered:?}"
        );
    }
}

fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn cli_writes_rows_that_precompute_reads_back() {
    let work = tempfile::tempdir().unwrap();
    let (model, out) = (model_dir("qwen3"), work.path().join("replies.jsonl"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = ["generate", "--device", "cpu", "--no-progress", "--max-new-tokens", "6"];
    ok(distill(&[&args[..], &["--model", &s(&model), "--input", &s(&sample()), "--output", &s(&out)]].concat()));
    let input = read_jsonl(&sample());
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), input.len());
    for (row, given) in rows.iter().zip(&input) {
        assert_eq!(row["id"], given["id"]);
        let new = row["new_tokens"].as_u64().unwrap();
        assert!((1..=6).contains(&new), "{row}");
        if let Some(messages) = given["messages"].as_array() {
            // The trailing assistant turn became the reference; a new one holds the reply.
            let turns = row["messages"].as_array().unwrap();
            assert_eq!(turns.len(), messages.len());
            assert_eq!(turns.last().unwrap()["role"], "assistant");
            assert_eq!(row["reference"], messages.last().unwrap()["content"]);
        } else if given.get("prompt").is_some() {
            assert_eq!(row["reference"], given["response"]);
            assert!(row["response"].is_string());
        } else {
            let (text, more) = (row["text"].as_str().unwrap(), row["continuation"].as_str().unwrap());
            assert_eq!(text, format!("{}{more}", given["text"].as_str().unwrap()));
        }
    }
    // Refuses to overwrite what exists; the replies read back as training rows.
    let again =
        err(distill(&[&args[..], &["--model", &s(&model), "--input", &s(&sample()), "--output", &s(&out)]].concat()));
    assert!(again.contains("--overwrite"), "{again}");
    let shards = work.path().join("shards");
    ok(precompute("qwen3", &out, &shards, &["--top-k", "4", "--sample", "0"]));
    let m = manifest(&shards);
    assert_eq!((m["complete"].as_bool(), m["skipped"]["invalid_rows"].as_u64()), (Some(true), Some(0)), "{m}");
    let rows_in_shards: u64 = m["shards"].as_array().unwrap().iter().map(|s| s["rows"].as_u64().unwrap()).sum();
    assert_eq!(rows_in_shards, input.len() as u64, "{m}");

    // Stop strings cut the reply before them; several samples per row at temperature 1.
    let first = rows.iter().find(|r| r["continuation"].as_str().is_some_and(|c| c.chars().count() >= 4)).unwrap();
    let stop: String = first["continuation"].as_str().unwrap().chars().skip(2).take(2).collect();
    let one = work.path().join("one.jsonl");
    std::fs::write(&one, format!("{}\n", serde_json::json!({"text": first["text"].as_str().unwrap().strip_suffix(first["continuation"].as_str().unwrap()).unwrap()}))).unwrap();
    let cut = work.path().join("cut.jsonl");
    ok(distill(
        &[&args[..], &["--model", &s(&model), "--input", &s(&one), "--output", &s(&cut), "--stop", &stop]].concat(),
    ));
    let cut = &read_jsonl(&cut)[0];
    assert_eq!(cut["finish_reason"], "stop", "{cut}");
    let want: String = first["continuation"].as_str().unwrap().chars().take(2).collect();
    assert!(
        cut["continuation"].as_str().unwrap().starts_with(&want)
            && !cut["continuation"].as_str().unwrap().contains(&stop),
        "{cut}"
    );
    let sampled = work.path().join("sampled.jsonl");
    let sampling = ["--temperature", "1", "--num-samples", "2", "--seed", "3"];
    ok(distill(
        &[&args[..], &sampling, &["--model", &s(&model), "--input", &s(&one), "--output", &s(&sampled)]].concat(),
    ));
    let sampled = read_jsonl(&sampled);
    assert_eq!(sampled.iter().map(|r| r["sample"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn cli_refuses_bad_prompts_naming_the_row() {
    let work = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = |model: &std::path::Path, lines: &str, extra: &[&str]| {
        let input = work.path().join("in.jsonl");
        std::fs::write(&input, lines).unwrap();
        let out = work.path().join("out.jsonl");
        let base = ["generate", "--device", "cpu", "--no-progress", "--overwrite"];
        let extra = if extra.is_empty() { &["--max-new-tokens", "4"][..] } else { extra };
        err(distill(&[&base[..], &["--model", &s(model), "--input", &s(&input), "--output", &s(&out)], extra].concat()))
    };
    let qwen3 = model_dir("qwen3");
    let ok_row = "{\"text\": \"Call me\"}\n";
    let e = run(&qwen3, &format!("{ok_row}{{\"prompt\": \"\"}}\n"), &[]);
    assert!(e.contains("in.jsonl:2") && e.contains("empty"), "{e}");
    let e = run(&qwen3, &format!("{ok_row}{{\"text\": \"{}\"}}\n", "word ".repeat(400)), &[]);
    assert!(e.contains("in.jsonl:2") && e.contains("(256, its max_position_embeddings)"), "{e}");
    let e = run(&qwen3, ok_row, &["--max-new-tokens", "0"]);
    assert!(e.contains("--max-new-tokens 0"), "{e}");
    let e = run(&qwen3, "{\"messages\": [{\"role\": \"assistant\", \"content\": \"Hi\"}]}\n", &[]);
    assert!(e.contains("in.jsonl:1") && e.contains("no turn before"), "{e}");
    // A model without a chat template, given chat rows.
    let plain = copy_model("llama", work.path());
    let config = plain.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let e = run(&plain, &format!("{ok_row}{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}\n"), &[]);
    assert!(e.contains("in.jsonl:2") && e.contains("chat template"), "{e}");
    assert!(!work.path().join("out.jsonl").exists(), "nothing written on error");
    // A missing output folder is refused before any work.
    let input = work.path().join("in.jsonl");
    std::fs::write(&input, ok_row).unwrap();
    let missing = work.path().join("no/such/out.jsonl");
    let e = err(distill(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        &s(&qwen3),
        "--input",
        &s(&input),
        "--output",
        &s(&missing),
    ]));
    assert!(e.contains("does not exist"), "{e}");
    // --capture into a folder of something else: refused before any decoding, untouched.
    let notes = work.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("mine.txt"), "mine").unwrap();
    let out = work.path().join("out.jsonl");
    let args = ["generate", "--device", "cpu", "--model", &s(&qwen3), "--input", &s(&input), "--output", &s(&out)];
    let e = err(distill(&[&args[..], &["--capture", &s(&notes)]].concat()));
    assert!(e.contains("not a shard set"), "{e}");
    assert!(!out.exists() && std::fs::read_to_string(notes.join("mine.txt")).unwrap() == "mine");
}

/// `eval --generate`: references equal to the teacher's own greedy replies score as exact
/// matches (a wrong one does not), the teacher finds its own replies more likely than a
/// random student's, and the side-by-side file shows every prompt and reply.
#[test]
fn eval_generate_scores_replies_against_references_and_the_teacher() {
    let work = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (teacher, student) = (model_dir("llama"), model_dir("qwen3"));
    let questions = ["Sort 1, -107, -3.", "What is 2 + 2?", "Name a colour."];
    let prompts = work.path().join("prompts.jsonl");
    let rows: String = questions
        .iter()
        .map(|q| serde_json::json!({"messages": [{"role": "user", "content": q}]}).to_string() + "\n")
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let replies = work.path().join("replies.jsonl");
    let gen = ["generate", "--device", "cpu", "--no-progress", "--max-new-tokens", "6"];
    ok(distill(&[&gen[..], &["--model", &s(&teacher), "--input", &s(&prompts), "--output", &s(&replies)]].concat()));
    // References: the teacher's replies for two rows, a wrong answer for the third.
    let mut rows = read_jsonl(&replies);
    rows[2]["messages"][1]["content"] = serde_json::json!("not what it says");
    let held_out = work.path().join("held_out.jsonl");
    let keep = |r: &serde_json::Value| serde_json::json!({"id": r["id"], "messages": r["messages"]}).to_string() + "\n";
    std::fs::write(&held_out, rows.iter().map(keep).collect::<String>()).unwrap();
    let side = work.path().join("side.md");
    let out = ok(distill(&[
        "eval",
        "--device",
        "cpu",
        "--json",
        "--max-new-tokens",
        "6",
        "--model",
        &format!("teacher={}", s(&teacher)),
        "--model",
        &format!("student={}", s(&student)),
        "--teacher",
        &s(&teacher),
        "--generate",
        &s(&held_out),
        "--side-by-side",
        &s(&side),
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (t, st) = (&json[0]["generation"], &json[1]["generation"]);
    assert_eq!((t["prompts"].as_u64(), t["with_reference"].as_u64()), (Some(3), Some(3)), "{t}");
    assert!((t["exact_match"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12, "{t}");
    assert!(t["mean_new_tokens"].as_f64().unwrap() <= 6.0);
    let (own, other) = (t["teacher_nll"].as_f64().unwrap(), st["teacher_nll"].as_f64().unwrap());
    assert!(own > 0.0 && own < other, "teacher NLL of its own replies {own}, of the student's {other}");
    // The KL at the model's own reply positions (score_sequences_against, tested in
    // float64 in tests/score.rs): none for the teacher itself.
    let (own, other) = (t["kl_on_replies"].as_f64().unwrap(), st["kl_on_replies"].as_f64().unwrap());
    assert!(own.abs() < 1e-6 && other > 1e-3, "KL on replies: teacher {own}, student {other}");
    let text = std::fs::read_to_string(&side).unwrap();
    for q in questions {
        assert!(text.contains(q), "{text}");
    }
    assert_eq!(text.matches("\nteacher:\n").count(), 3);
    assert_eq!(text.matches("\nstudent:\n").count(), 3);
    assert_eq!(text.matches("\nreference:\n").count(), 3);
    // Its own file is replaced on a rerun; a file eval did not write is refused, untouched.
    let rerun =
        ["eval", "--device", "cpu", "--model", &s(&student), "--generate", &s(&held_out), "--max-new-tokens", "2"];
    ok(distill(&[&rerun[..], &["--side-by-side", &s(&side)]].concat()));
    let foreign = work.path().join("notes.md");
    std::fs::write(&foreign, "my notes\n").unwrap();
    let e = err(distill(&[&rerun[..], &["--side-by-side", &s(&foreign)]].concat()));
    assert!(e.contains("not written by distill eval"), "{e}");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "my notes\n");
}

/// Sequence-level KD in one pass: the targets `generate --capture` takes from the
/// decoding steps equal those of a separate `precompute --token-ids` over the rows it
/// wrote. Tolerances: float16 values within one float16 step at their magnitude plus
/// 1e-4 (a cached step and a full forward differ by float32 rounding, ~1e-6, which can
/// move a float16 rounding by one step); float32 log-masses within 1e-4; the same top-k
/// ids and draws wherever no two probabilities are within that tolerance.
#[test]
fn captured_replies_equal_a_separate_precompute() {
    let work = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    for name in ["qwen3", "mistral"] {
        let (model, out) = (model_dir(name), work.path().join(format!("{name}.jsonl")));
        let captured = work.path().join(format!("{name}-captured"));
        let targets = ["--target-top-k", "8", "--target-sample", "6", "--hidden-layers", "1,2"];
        ok(distill(
            &[
                &["generate", "--device", "cpu", "--no-progress", "--max-new-tokens", "12", "--max-batch", "3"][..],
                &["--temperature", "1", "--seed", "5", "--model", &s(&model), "--input", &s(&sample())],
                &["--output", &s(&out), "--capture", &s(&captured)],
                &targets,
            ]
            .concat(),
        ));
        let rows = read_jsonl(&out);
        for row in &rows {
            let (ids, lps) = (row["response_ids"].as_array().unwrap(), row["response_logprobs"].as_array().unwrap());
            assert_eq!(ids.len(), lps.len(), "{row}");
            assert!(lps.iter().all(|x| x.as_f64().unwrap() <= 0.0), "{row}");
        }
        let separate = work.path().join(format!("{name}-separate"));
        let max_len = manifest(&captured)["settings"]["data"]["max_len"].to_string();
        ok(precompute(
            name,
            &out,
            &separate,
            &["--token-ids", "--top-k", "8", "--sample", "6", "--hidden-layers", "1,2", "--max-len", &max_len],
        ));
        let (mc, ms) = (manifest(&captured), manifest(&separate));
        assert_eq!(mc["settings"], ms["settings"], "the captured set describes itself as the separate run");
        assert_eq!(mc["complete"], true);
        let read = |dir: &std::path::Path| {
            let set = distill::shards::reader::ShardSet::open(dir, false).unwrap();
            let mut rows = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect::<Vec<_>>();
            rows.sort_by_key(|r| r.sequence.row_index); // written in batch order
            rows
        };
        let (got, want) = (read(&captured), read(&separate));
        assert_eq!(got.len(), rows.len());
        assert_eq!(got.len(), want.len());
        let close16 = |a: f32, b: f32| (a - b).abs() <= f16_step(a.abs().max(b.abs())) + 1e-4;
        let (mut positions, mut tied) = (0, 0);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.sequence, w.sequence, "{name}: same tokens, mask, keys and sampler log-probs");
            // The teacher sampled its own replies: its log-prob of each token is the
            // label's target log-prob (the softmax over the padded rows aside).
            if mc["settings"]["teacher"]["model_vocab_size"] == mc["settings"]["tokenizer"]["vocab_size"] {
                for (a, b) in g.sequence.sampler_logprobs.as_ref().unwrap().iter().zip(&g.topk.target_logprob) {
                    assert!((a - b).abs() <= 1e-4, "{name}: sampler {a} vs target {b}");
                }
            }
            let (gt, wt) = (&g.topk, &w.topk);
            for (a, b) in
                gt.tail_logmass.iter().zip(&wt.tail_logmass).chain(gt.target_logprob.iter().zip(&wt.target_logprob))
            {
                assert!((a - b).abs() <= 1e-4, "{name}: {a} vs {b}");
            }
            for (((gi, gl), (wi, wl)), (gd, wd)) in gt
                .per_position()
                .zip(wt.per_position())
                .zip(gt.draws.as_ref().unwrap().per_position().zip(wt.draws.as_ref().unwrap().per_position()))
            {
                positions += 1;
                for (a, b) in gl.iter().zip(wl) {
                    assert!(close16(a.to_f32(), b.to_f32()), "{name}: top-k log-prob {a} vs {b}");
                }
                let near_tie = wl.windows(2).any(|p| (p[0].to_f32() - p[1].to_f32()).abs() <= 2e-3);
                if gi != wi || gd != wd {
                    assert!(near_tie, "{name}: ids {gi:?} vs {wi:?}, draws {gd:?} vs {wd:?} without a near tie");
                    tied += 1;
                }
            }
            for (gh, wh) in g.hidden.iter().zip(&w.hidden) {
                assert_eq!((gh.layer, gh.values.len()), (wh.layer, wh.values.len()));
                for (a, b) in gh.values.iter().zip(&wh.values) {
                    assert!(close16(a.to_f32(), b.to_f32()), "{name}: hidden {} {a} vs {b}", gh.layer);
                }
                for (a, b) in gh.rms.iter().zip(&wh.rms) {
                    assert!((a - b).abs() <= 1e-4 * b.abs(), "{name}: rms {a} vs {b}");
                }
            }
        }
        eprintln!("{name}: {tied} of {positions} positions differ in top-k ids or draws");
        assert!(positions > 50 && tied * 20 <= positions, "{name}: {tied} of {positions} positions differ");
    }
    // --token-ids over rows that hold no ids at all: a clear error, nothing written.
    let none = work.path().join("none");
    let e = err(precompute("qwen3", &sample(), &none, &["--token-ids"]));
    assert!(e.contains("no input row has the fields `prompt_ids` and `response_ids`"), "{e}");
    assert!(!none.exists());
}

/// The spacing of float16 numbers at magnitude `x`.
fn f16_step(x: f32) -> f32 {
    let exponent = x.max(6.1e-5).log2().floor();
    2f32.powf(exponent - 10.0)
}

/// scripts/onpolicy.sh on tiny models: two rounds (the student samples, the teacher
/// scores exactly those tokens, training continues from the last checkpoint) with 4 rows
/// of fixed data mixed into each, the student's log-probs stored with the shards (null
/// for the fixed rows), and a rerun after a crash redoing only what was lost.
#[test]
fn onpolicy_rounds_run_resume_and_keep_the_sampler_logprobs() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("onpolicy");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = || {
        let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
        let script = repo().join("scripts/onpolicy.sh");
        let args = [
            "--teacher",
            &s(&model_dir("qwen3")),
            "--student",
            &s(&model_dir("qwen3")),
            "--prompts",
            &s(&sample()),
            "--output",
            &s(&out),
            "--rounds",
            "2",
            "--steps",
            "2",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--top-k",
            "4",
            "--sample",
            "4",
            "--mix",
            &s(&sample()),
            "--mix-rows",
            "4",
            "--",
            "--batch-tokens",
            "512",
        ];
        let o = std::process::Command::new("bash").arg(script).args(args).env("DISTILL_BIN", bin).output().unwrap();
        assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    };
    run();
    let round = |r: usize| out.join(format!("round-{r}"));
    let final_ckpt = |r: usize| round(r).join("run/checkpoint-0000002");
    for r in [1, 2] {
        assert!(final_ckpt(r).join("model.safetensors").exists(), "round {r} trained");
        let m = manifest(&round(r).join("shards"));
        assert_eq!(
            (m["complete"].as_bool(), m["settings"]["capture"]["sampler_logprobs"].as_bool()),
            (Some(true), Some(true))
        );
    }
    // Round 2 samples from round 1's student and trains from it.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(round(2).join("run/run.json")).unwrap()).unwrap();
    assert!(record.to_string().contains(&s(&final_ckpt(1))), "{record}");
    // The stored sampler log-probs are the student's, token for token.
    let samples = read_jsonl(&round(1).join("samples.jsonl"));
    let set = distill::shards::reader::ShardSet::open(&round(1).join("shards"), false).unwrap();
    let rows: Vec<_> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
    assert_eq!(rows.len(), samples.len() + 4, "the samples and 4 fixed rows");
    let ids =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let mut sampled = 0;
    for row in rows {
        let found =
            samples.iter().find(|s| [ids(&s["prompt_ids"]), ids(&s["response_ids"])].concat() == row.sequence.ids);
        match found {
            Some(sample) => {
                let want: Vec<f32> = sample["response_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(row.sequence.sampler_logprobs.as_deref(), Some(&want[..]));
                sampled += 1;
            }
            None => assert_eq!(row.sequence.sampler_logprobs, None, "a fixed row has no sampler"),
        }
    }
    assert_eq!(sampled, samples.len());
    // A crash in round 2 after sampling: its shards and run are lost; the rerun keeps
    // round 1 and round 2's samples as they were and redoes the rest.
    let stamp = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let kept =
        [round(1).join("samples.jsonl"), final_ckpt(1).join("model.safetensors"), round(2).join("samples.jsonl")];
    let before: Vec<_> = kept.iter().map(|p| stamp(p)).collect();
    std::fs::remove_dir_all(round(2).join("shards")).unwrap();
    std::fs::remove_dir_all(final_ckpt(2)).unwrap();
    run();
    assert_eq!(kept.iter().map(|p| stamp(p)).collect::<Vec<_>>(), before);
    assert!(final_ckpt(2).join("model.safetensors").exists());
}

/// scripts/onpolicy.sh with two teachers routed by the prompts' `domain` field: each
/// sample's targets are its domain's teacher's (generate keeps the prompt row's fields,
/// merge-teachers --route picks the teacher), trained with reverse KL.
#[test]
fn onpolicy_routes_each_sample_to_its_domains_teacher() {
    let work = tempfile::tempdir().unwrap();
    let (out, prompts) = (work.path().join("routed"), work.path().join("prompts.jsonl"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let rows: Vec<String> = std::fs::read_to_string(sample())
        .unwrap()
        .lines()
        .filter(|l| !l.contains("\"text\""))
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["domain"] = serde_json::json!(if i % 2 == 0 { "general" } else { "math" });
            v.to_string()
        })
        .collect();
    std::fs::write(&prompts, rows.join("\n") + "\n").unwrap();
    let route = format!("domain=general:{},math:{}", s(&model_dir("llama")), s(&model_dir("qwen3")));
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let args = ["--route", &route, "--student", &s(&model_dir("qwen3")), "--prompts", &s(&prompts)];
    let more = ["--output", &s(&out), "--steps", "1", "--max-new-tokens", "6", "--top-k", "4"];
    let o = std::process::Command::new("bash")
        .arg(repo().join("scripts/onpolicy.sh"))
        .args(args)
        .args(more)
        .args(["--", "--loss", "reverse-kl", "--batch-tokens", "512"])
        .env("DISTILL_BIN", bin)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let round = out.join("round-1");
    assert!(round.join("run/checkpoint-0000001/model.safetensors").exists());
    let m = manifest(&round.join("shards"));
    let r = &m["settings"]["mixture"]["route"];
    assert_eq!((r["field"].as_str(), r["unrouted"].as_u64()), (Some("domain"), Some(0)), "{r}");
    let read = |name: &str| {
        let set = distill::shards::reader::ShardSet::open(&round.join(name), false).unwrap();
        let mut rows: Vec<_> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
        rows.sort_by_key(|r| r.sequence.row_index);
        rows
    };
    let samples = read_jsonl(&round.join("samples.jsonl"));
    let (routed, general, math) = (read("shards"), read("shards-general"), read("shards-math"));
    let mut domains = std::collections::BTreeSet::new();
    for ((row, g), m) in routed.iter().zip(&general).zip(&math) {
        let domain = samples[row.sequence.row_index as usize]["domain"].as_str().unwrap().to_string();
        let own = if domain == "general" { g } else { m };
        assert_eq!(row.topk.ids, own.topk.ids, "row {} ({domain})", row.sequence.row_index);
        domains.insert(domain);
    }
    assert_eq!(domains.len(), 2, "both teachers scored samples");
}
