//! `distill import-logprobs` against responses in the documented formats of vLLM and
//! SGLang, computed with transformers by scripts/fake_server.py (no server is
//! reachable here): the shards equal `precompute`'s within float16 rounding, and bad
//! responses are refused by name with nothing written.
mod common;

use common::*;
use distill::shards::row::ShardRow;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fake(args: &[&str]) {
    let out = Command::new(python()).arg(repo().join("scripts/fake_server.py")).args(args).output().unwrap();
    assert!(out.status.success(), "fake_server.py {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn import(model: &str, input: &Path, extra: &[&str]) -> std::process::Output {
    let dir = model_dir(model);
    let mut args = vec!["import-logprobs", "--no-progress", "--teacher", dir.to_str().unwrap()];
    args.extend(["--input", input.to_str().unwrap()]);
    args.extend(extra);
    distill(&args)
}

/// `import-logprobs --top-k 4` of `responses` into `out`, which must succeed.
fn import_k4(model: &str, input: &Path, responses: &Path, out: &Path) {
    let (responses, out) = (responses.to_str().unwrap(), out.to_str().unwrap());
    ok(import(model, input, &["--top-k", "4", "--responses", responses, "--output", out]));
}

/// The planned requests of `model` over `input`.
fn requests(model: &str, input: &Path, dir: &Path) -> PathBuf {
    let path = dir.join(format!("requests-{model}.jsonl"));
    ok(import(model, input, &["--write-requests", path.to_str().unwrap()]));
    path
}

fn responses(model: &str, requests: &Path, format: &str, k: usize, out: &Path, extra: &[&str]) -> PathBuf {
    let (m, k) = (model_dir(model), k.to_string());
    let mut args = vec!["respond", "--model", m.to_str().unwrap(), "--requests", requests.to_str().unwrap()];
    args.extend(["--format", format, "--top-k", &k, "--output", out.to_str().unwrap()]);
    args.extend(extra);
    fake(&args);
    out.to_path_buf()
}

fn read(dir: &Path) -> Vec<ShardRow> {
    let set = distill::shards::reader::ShardSet::open(dir, false).unwrap();
    let mut rows: Vec<ShardRow> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
    rows.sort_by_key(|r| r.sequence.row_index);
    rows
}

/// The spacing of float16 numbers at magnitude `x`.
fn f16_step(x: f32) -> f32 {
    2f32.powf(x.max(6.1e-5).log2().floor() - 10.0)
}

/// Per position, the offset `import - precompute` of each listed log-prob; asserts the
/// same ids and one offset per position (the same distribution up to normalisation).
fn compare(got: &[ShardRow], want: &[ShardRow], what: &str) -> (usize, usize, f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let (mut positions, mut outside, mut largest_offset) = (0, 0, 0f32);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.sequence, w.sequence, "{what}: same tokens, mask and keys");
        let (gt, wt) = (&g.topk, &w.topk);
        let mut label_ids = g.sequence.ids.iter().zip(&g.sequence.loss_mask).filter(|p| *p.1).map(|p| *p.0);
        for (i, ((gi, gl), (wi, wl))) in gt.per_position().zip(wt.per_position()).enumerate() {
            positions += 1;
            let near_tie = wl.windows(2).any(|p| (p[0].to_f32() - p[1].to_f32()).abs() <= 2e-3);
            assert!(gi == wi || near_tie, "{what}: ids {gi:?} vs {wi:?}");
            let offset = gt.target_logprob[i] - wt.target_logprob[i];
            largest_offset = largest_offset.max(offset.abs());
            for (a, b) in gl.iter().zip(wl) {
                let (a, b) = (a.to_f32(), b.to_f32() + offset);
                assert!((a - b).abs() <= f16_step(a.abs().max(b.abs())) + 1e-4, "{what}: log-prob {a} vs {b}");
            }
            let label = label_ids.next().unwrap();
            outside += !gi.contains(&label) as usize;
            let (ta, tb) = (gt.tail_logmass[i].exp(), wt.tail_logmass[i].exp());
            if offset.abs() <= 1e-4 {
                assert!((ta - tb).abs() <= 2e-3 * tb.max(1e-2), "{what}: tail mass {ta} vs {tb}");
            }
        }
    }
    (positions, outside, largest_offset)
}

#[test]
fn every_format_imports_to_precompute_targets() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let input = sample(); // text, chat (template applied) and prompt/response rows
    let pre = w.join("pre");
    ok(precompute("llama", &input, &pre, &["--top-k", "4", "--sample", "0"]));
    let want = read(&pre);
    let req = requests("llama", &input, w);
    for format in ["vllm", "vllm-chat", "echo", "sglang"] {
        let file = responses("llama", &req, format, 4, &w.join(format!("{format}.jsonl")), &[]);
        let out = w.join(format!("imp-{format}"));
        import_k4("llama", &input, &file, &out);
        let m = manifest(&out);
        assert_eq!(m["complete"], true);
        assert_eq!(m["settings"]["capture"]["served"]["formats"].as_array().unwrap().len(), 1, "{m}");
        assert_eq!(m["settings"]["data"], manifest(&pre)["settings"]["data"], "{format}: the same rows");
        let (positions, outside, offset) = compare(&read(&out), &want, format);
        assert!(offset <= 1e-4, "{format}: an unpadded vocabulary normalises alike ({offset})");
        eprintln!("{format}: {positions} positions, the label outside the top-4 at {outside}");
        assert!(positions > 500 && outside > positions / 4, "the label-outside case is exercised");
    }
    // Mass-adaptive with a floor: the same ids as precompute's --top-p --min-k.
    let adaptive = ["--top-k", "4", "--top-p", "0.05", "--min-k", "2"];
    let pre_p = w.join("pre-p");
    ok(precompute("llama", &input, &pre_p, &[&adaptive[..], &["--sample", "0"]].concat()));
    let out = w.join("imp-p");
    let file = w.join("vllm.jsonl");
    ok(import(
        "llama",
        &input,
        &[&adaptive[..], &["--responses", file.to_str().unwrap(), "--output", out.to_str().unwrap()]].concat(),
    ));
    let (got, want_p) = (read(&out), read(&pre_p));
    compare(&got, &want_p, "top-p");
    assert!(got.iter().all(|r| r.topk.lengths.as_ref().unwrap().iter().all(|&n| n >= 2)), "the floor holds");
}

/// Qwen2's layout: more embedding rows than tokens. A server's softmax covers the padded
/// rows, precompute's does not: the import keeps the server's normalisation, drops padded
/// ids from the lists, and differs from precompute by one offset per position.
#[test]
fn padded_vocabulary_keeps_the_servers_normalisation() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let input = sample();
    let pre = w.join("pre");
    ok(precompute("qwen2", &input, &pre, &["--top-k", "4", "--sample", "0"]));
    let req = requests("qwen2", &input, w);
    // k + 32: whatever padded ids rank high, 4 of the tokenizer's remain.
    let file = responses("qwen2", &req, "vllm", 36, &w.join("r.jsonl"), &[]);
    let out = w.join("imp");
    import_k4("qwen2", &input, &file, &out);
    let m = manifest(&out);
    let vocab = m["settings"]["tokenizer"]["vocab_size"].as_u64().unwrap() as u32;
    assert!(m["settings"]["capture"]["served"]["normalised_over"].as_str().unwrap().contains("dropped into the tail"));
    let got = read(&out);
    assert!(got.iter().all(|r| r.topk.ids.iter().all(|&i| i < vocab)), "no padded id is listed");
    let (_, _, offset) = compare(&got, &read(&pre), "padded");
    assert!(offset > 1e-3, "the padded rows' mass shows as an offset ({offset})");
}

#[test]
fn bad_responses_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let input = sample();
    let req = requests("llama", &input, w);
    let good = responses("llama", &req, "vllm", 4, &w.join("good.jsonl"), &[]);
    let lines: Vec<String> = std::fs::read_to_string(&good).unwrap().lines().map(String::from).collect();
    let write = |name: &str, lines: &[String]| {
        let p = w.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    let refused = |file: &Path, top_k: &str| {
        let out = w.join("out");
        let e = err(import(
            "llama",
            &input,
            &["--top-k", top_k, "--responses", file.to_str().unwrap(), "--output", out.to_str().unwrap()],
        ));
        assert!(!out.exists(), "nothing written: {e}");
        e
    };
    // Another tokenizer: the spm model's requests over the same text, scored by it.
    let text: Vec<&str> =
        std::fs::read_to_string(&input).unwrap().leak().lines().filter(|l| l.contains("\"text\"")).collect();
    let text_input = w.join("text.jsonl");
    std::fs::write(&text_input, text.join("\n") + "\n").unwrap();
    let other_req = requests("llama-spm", &text_input, w);
    let other = responses("llama-spm", &other_req, "vllm", 4, &w.join("other.jsonl"), &[]);
    let out = w.join("out");
    let e = err(import(
        "llama",
        &text_input,
        &["--top-k", "4", "--responses", other.to_str().unwrap(), "--output", out.to_str().unwrap()],
    ));
    assert!(e.contains("a response for another tokenizer") && e.contains("other.jsonl:1"), "{e}");
    assert!(!out.exists());
    // A torn last line, and a response that scored fewer tokens than planned.
    let mut torn = lines.clone();
    let last = torn.pop().unwrap();
    torn.push(last[..last.len() / 2].to_string());
    let e = refused(&write("torn.jsonl", &torn), "4");
    assert!(e.contains(&format!("torn.jsonl:{}: not JSON", lines.len())), "{e}");
    let mut short: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    let choice = &mut short["response"]["choices"][0];
    let n = choice["prompt_token_ids"].as_array().unwrap().len() - 3;
    choice["prompt_token_ids"].as_array_mut().unwrap().truncate(n);
    choice["prompt_logprobs"].as_array_mut().unwrap().truncate(n);
    let mut cut = lines.clone();
    cut[2] = short.to_string();
    let e = refused(&write("cut.jsonl", &cut), "4");
    assert!(e.contains("cut.jsonl:3") && e.contains("a truncated response"), "{e}");
    // Logits, not log-probs (vLLM --logprobs-mode raw_logits).
    let logits = responses("llama", &req, "vllm", 4, &w.join("logits.jsonl"), &["--logits"]);
    let e = refused(&logits, "4");
    assert!(e.contains("logits.jsonl:1") && e.contains("position 1") && e.contains("logits"), "{e}");
    // A sample answered twice; a sample not answered; a server capped below --top-k.
    let mut twice = lines.clone();
    twice.push(lines[1].clone());
    let e = refused(&write("twice.jsonl", &twice), "4");
    assert!(
        e.contains("is answered twice (first at") && e.contains(&format!("twice.jsonl:{}", lines.len() + 1)),
        "{e}"
    );
    let e = refused(&write("missing.jsonl", &lines[1..]), "4");
    assert!(e.contains("no response names this sample"), "{e}");
    let e = refused(&good, "6");
    assert!(e.contains("fewer than --top-k 6") && e.contains("--max-logprobs"), "{e}");
    // Two input rows with one id: their responses could not be told apart.
    let twin = w.join("twin.jsonl");
    std::fs::write(
        &twin,
        "{\"id\": \"x\", \"text\": \"One cat sat.\"}\n{\"id\": \"x\", \"text\": \"Two dogs ran.\"}\n",
    )
    .unwrap();
    let e = err(import("llama", &twin, &["--write-requests", w.join("twin-req.jsonl").to_str().unwrap()]));
    assert!(e.contains("sample id \"x\" names two documents"), "{e}");
}

/// scripts/capture_served.py against the fake server over HTTP: bounded concurrency,
/// an interrupted run resumed (a torn line dropped), the same shards as responses
/// written at once.
#[test]
fn capture_client_resumes_and_feeds_the_import() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let input = sample();
    let req = requests("llama", &input, w);
    let m = model_dir("llama");
    let mut server = Server(
        Command::new(python())
            .arg(repo().join("scripts/fake_server.py"))
            .args(["serve", "--model", m.to_str().unwrap(), "--port", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.as_mut().unwrap()), &mut first).unwrap();
    let port = first.trim().rsplit(' ').next().unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let client = |api: &str, out: &Path, limit: &str| {
        let o = Command::new(python())
            .arg(repo().join("scripts/capture_served.py"))
            .args(["--requests", req.to_str().unwrap(), "--url", &url, "--api", api, "--top-k", "4"])
            .args(["--output", out.to_str().unwrap(), "--concurrency", "3", "--limit", limit])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    for api in ["vllm", "sglang"] {
        let out = w.join(format!("{api}.jsonl"));
        client(api, &out, "5");
        let mut text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), 5);
        text.push_str("{\"id\": \"torn"); // killed mid-write
        std::fs::write(&out, text).unwrap();
        client(api, &out, "0");
        let ids: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
        let planned = std::fs::read_to_string(&req).unwrap().lines().count();
        assert_eq!((ids.len(), ids.iter().collect::<std::collections::BTreeSet<_>>().len()), (planned, planned));
        let shards = w.join(format!("shards-{api}"));
        import_k4("llama", &input, &out, &shards);
        let direct = responses("llama", &req, api, 4, &w.join(format!("direct-{api}.jsonl")), &[]);
        let shards_direct = w.join(format!("direct-{api}"));
        import_k4("llama", &input, &direct, &shards_direct);
        assert_eq!(read(&shards), read(&shards_direct), "{api}: the client's responses are the server's");
    }
    // An --output the client did not write is refused and left as it was.
    let foreign = w.join("notes.jsonl");
    std::fs::write(&foreign, "{\"text\": \"mine\"}\n{\"id\": \"torn").unwrap();
    let o = Command::new(python())
        .arg(repo().join("scripts/capture_served.py"))
        .args([
            "--requests",
            req.to_str().unwrap(),
            "--url",
            &url,
            "--top-k",
            "4",
            "--output",
            foreign.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("notes.jsonl:1: not a response"));
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "{\"text\": \"mine\"}\n{\"id\": \"torn");
}

/// The fake server, killed however the test ends (a panic included), so no process
/// outlives the test holding its output open.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
