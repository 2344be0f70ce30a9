//! Data-parallel `distill train` on CPU (Gloo over loopback): N ranks train exactly as
//! one process with N-fold accumulation (with and without ZeRO-1), a checkpoint of N
//! ranks resumes in one process, torchrun and `--nproc` launch it, ranks that disagree
//! are refused, and a dead or hung rank stops the others with an error naming it.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Teacher shards (tiny llama, k = 16) of the sample.
fn teacher_shards(dir: &Path) -> PathBuf {
    let out = dir.join("shards");
    ok(precompute("llama", &repo().join("tests/data/sample.jsonl"), &out, &["--top-k", "16"]));
    out
}

fn train_args(student: &str, shards: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into(), "--student".into(), model_dir(student).display().to_string()];
    // Defaults that `extra` does not set itself.
    for (k, v) in [
        ("--shards", shards.display().to_string()),
        ("--output", out.display().to_string()),
        ("--device", "cpu".into()),
        ("--batch-tokens", "512".into()),
        ("--lr", "3e-3".into()),
        ("--alpha", "0.3".into()),
        ("--steps", "6".into()),
        ("--save-every", "3".into()),
    ] {
        if !extra.contains(&k) {
            args.extend([k.to_string(), v]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `distill` with one OpenMP thread per process, as torchrun starts its ranks: the
/// single process and each rank then sum inside their kernels alike (SDPA's CPU flash
/// backward, used for packed documents, sums its per-thread gradients of keys and values,
/// so another thread count moves a 3-step run's weights by up to ~4e-5).
fn run(args: &[String]) -> String {
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    ok(Command::new(bin).args(args).env("OMP_NUM_THREADS", "1").output().unwrap())
}

/// Weights and optimiser moments of a checkpoint, by name.
fn checkpoint_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut all = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let prefix = path.file_stem().unwrap().to_string_lossy().into_owned();
            all.extend(Tensor::read_safetensors(&path).unwrap().into_iter().map(|(n, t)| (format!("{prefix}/{n}"), t)));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The largest relative difference between two checkpoints' tensors (max |a - b| / max |a|).
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (checkpoint_tensors(a), checkpoint_tensors(b));
    let names = |t: &[(String, Tensor)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "{} and {} hold different tensors", a.display(), b.display());
    ta.iter()
        .zip(&tb)
        .map(|((_, x), (_, y))| {
            let scale = x.abs().max().double_value(&[]).max(1e-30);
            (x - y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The tolerance: the same weights within 1e-5 relative. Measured: equal (0) with
/// one thread in every process (`run`).
const SAME: f64 = 1e-5;

#[test]
fn two_ranks_train_like_one_process_with_two_micro_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = teacher_shards(tmp.path());
    let dir = |name: &str| tmp.path().join(name);
    // Packed rows, so the ranks' micro-batches differ in shape and count of trained tokens.
    let one = train_args("qwen3", &shards, &dir("one"), &["--grad-accum", "2", "--pack"]);
    run(&one);
    let two = train_args("qwen3", &shards, &dir("two"), &["--nproc", "2", "--pack"]);
    run(&two);
    let zero = train_args("qwen3", &shards, &dir("zero"), &["--nproc", "2", "--pack", "--zero1"]);
    run(&zero);
    for step in ["checkpoint-0000003", "checkpoint-0000006"] {
        let base = dir("one").join(step);
        for other in ["two", "zero"] {
            let d = max_rel_diff(&base, &dir(other).join(step));
            eprintln!("{other} vs one process, {step}: max relative difference {d:e}");
            assert!(d <= SAME, "{other}: {step} differs from one process by {d:e}");
        }
    }
    assert_eq!(entries(&dir("two")), entries(&dir("one")), "rank 0 alone writes, what one process writes");
    let metrics = |d: &str| {
        let text = std::fs::read_to_string(dir(d).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap(), v["time"]["communication"].is_number())
            })
            .collect::<Vec<_>>()
    };
    let (m1, m2) = (metrics("one"), metrics("two"));
    assert_eq!(m1.len(), 6);
    for (a, b) in m1.iter().zip(&m2) {
        assert!((a.0 - b.0).abs() <= 1e-6 * a.0.abs() && a.1 == b.1, "step logs differ: {a:?} vs {b:?}");
        assert!(!a.2 && b.2, "communication time is logged for ranks only");
    }

    // 2 ranks (ZeRO-1) stop at step 3; one process with 2 micro-batches resumes there.
    let mut half = train_args("qwen3", &shards, &dir("mixed"), &["--nproc", "2", "--pack", "--zero1"]);
    half.extend(["--stop-at".into(), "3".into()]);
    run(&half);
    let mut rest = train_args("qwen3", &shards, &dir("mixed"), &["--grad-accum", "2", "--pack"]);
    rest.push("--resume".into());
    run(&rest);
    let d = max_rel_diff(&dir("one").join("checkpoint-0000006"), &dir("mixed").join("checkpoint-0000006"));
    assert!(d <= SAME, "resumed with 1 process: differs by {d:e}");

    // The global batch is what is recorded: 2 ranks x 1 must not resume 1 x 1.
    let mut other = train_args("qwen3", &shards, &dir("mixed"), &["--pack", "--steps", "8"]);
    other.push("--resume".into());
    let e = err(distill(&other.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(e.contains("grad_accum"), "{e}");
}

/// A mixture-of-experts student: an expert that no token of one rank reaches has no
/// gradient there but one on the other rank; the sum must still equal one process's.
#[test]
fn experts_unused_on_one_rank_still_sum_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = teacher_shards(tmp.path());
    let extra = ["--router-aux-weight", "0.01", "--steps", "3"];
    let mut one = train_args("mixtral", &shards, &tmp.path().join("one"), &extra);
    one.extend(["--grad-accum".into(), "2".into()]);
    run(&one);
    let mut two = train_args("mixtral", &shards, &tmp.path().join("two"), &extra);
    two.extend(["--nproc".into(), "2".into(), "--zero1".into()]);
    run(&two);
    let d = max_rel_diff(&tmp.path().join("one/checkpoint-0000003"), &tmp.path().join("two/checkpoint-0000003"));
    assert!(d <= SAME, "differs by {d:e}");
}

#[test]
fn torchrun_launches_the_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = teacher_shards(tmp.path());
    let mut one = train_args("qwen3", &shards, &tmp.path().join("one"), &["--grad-accum", "2"]);
    one.extend(["--stop-at".into(), "3".into()]);
    run(&one);
    let torchrun = python().with_file_name("torchrun");
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let mut args = train_args("qwen3", &shards, &tmp.path().join("two"), &["--stop-at", "3"]);
    args.splice(0..0, ["--nproc-per-node".into(), "2".into(), "--no-python".into(), bin]);
    let out = Command::new(&torchrun).args(&args).output().unwrap();
    assert!(out.status.success(), "torchrun failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let d = max_rel_diff(&tmp.path().join("one/checkpoint-0000003"), &tmp.path().join("two/checkpoint-0000003"));
    assert!(d <= SAME, "differs by {d:e}");
}

/// Starts rank `rank` of 2 as torchrun would (one OpenMP thread), with its own
/// arguments. Two ranks of two spinning threads each beside the other tests' processes
/// oversubscribe a 2-core machine enough to stall a step for minutes.
fn start_rank(rank: usize, port: u16, args: &[String]) -> Child {
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    Command::new(bin)
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    distill::distributed::launch::free_loopback_port().unwrap()
}

/// Waits for `child` at most `limit`; its stderr and how long it took.
fn finish_within(mut child: Child, limit: Duration) -> (bool, String, Duration) {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
}

#[test]
fn ranks_with_different_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = teacher_shards(tmp.path());
    let out = tmp.path().join("run");
    let port = free_port();
    let first = start_rank(0, port, &train_args("qwen3", &shards, &out, &[]));
    let second = start_rank(1, port, &train_args("qwen3", &shards, &out, &["--lr", "1e-3"]));
    let (ok1, e1, _) = finish_within(second, Duration::from_secs(60));
    let (ok0, e0, _) = finish_within(first, Duration::from_secs(60));
    assert!(!ok0 && !ok1);
    assert!(e1.contains("rank 1 and rank 0 differ") && e1.contains("peak_lr"), "{e1}");
    assert!(e0.contains("rank 1 stopped") && e0.contains("peak_lr"), "{e0}");
    assert!(!out.join("metrics.jsonl").exists(), "nothing is written before the ranks agree");
}

/// Training long enough to be interrupted: rank 0's metrics show it is under way.
fn two_ranks_under_way(tmp: &Path, timeout_s: &str) -> (Child, Child) {
    let shards = teacher_shards(tmp);
    let out = tmp.join("run");
    let args = train_args(
        "qwen3",
        &shards,
        &out,
        &["--steps", "100000", "--save-every", "100000", "--dist-timeout", timeout_s],
    );
    let port = free_port();
    let (first, second) = (start_rank(0, port, &args), start_rank(1, port, &args));
    let started = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "the ranks did not start training");
        std::thread::sleep(Duration::from_millis(50));
    }
    (first, second)
}

#[test]
fn a_killed_rank_stops_the_other_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, mut second) = two_ranks_under_way(tmp.path(), "30");
    second.kill().unwrap(); // SIGKILL
    second.wait().unwrap();
    let (ok, stderr, took) = finish_within(first, Duration::from_secs(60));
    eprintln!("rank 0 stopped {took:?} after rank 1 was killed:\n{stderr}");
    assert!(!ok && stderr.contains("rank 1 did not arrive at step"), "{stderr}");
    assert!(took < Duration::from_secs(30), "a dead peer is noticed before the timeout: {took:?}");
}

/// Rank 0 serves the store too: when it dies, rank 1 says so.
#[test]
fn a_killed_first_rank_is_named_by_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut first, second) = two_ranks_under_way(tmp.path(), "30");
    first.kill().unwrap();
    first.wait().unwrap();
    let (ok, stderr, took) = finish_within(second, Duration::from_secs(60));
    assert!(!ok && stderr.contains("rank 0, which serves the rendezvous store, is gone"), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn a_hung_rank_stops_the_other_after_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, mut second) = two_ranks_under_way(tmp.path(), "3");
    let stop = |signal: &str| Command::new("kill").args([signal, &second.id().to_string()]).status().unwrap();
    assert!(stop("-STOP").success());
    let (ok, stderr, took) = finish_within(first, Duration::from_secs(60));
    stop("-KILL");
    second.wait().unwrap();
    eprintln!("rank 0 stopped {took:?} after rank 1 hung:\n{stderr}");
    // Rank 1 is caught in its step's work, or (rarely) inside the all-reduce itself.
    let named = stderr.contains("rank 1 did not arrive at step") || stderr.contains("inside the collective");
    assert!(!ok && named && stderr.contains("timeout 3 s"), "{stderr}");
    // The timeout, then up to 2 s reading the store for the cause.
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(15), "{took:?}");
}

/// `kill -9` of `--nproc`'s launcher ends its ranks too, and the job resumes from rank
/// 0's last checkpoint to the very weights of a run that never stopped.
#[test]
fn a_killed_job_resumes_like_one_that_never_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = teacher_shards(tmp.path());
    let extra = ["--nproc", "2", "--steps", "120", "--save-every", "20"];
    run(&train_args("qwen3", &shards, &tmp.path().join("straight"), &extra));
    let out = tmp.path().join("killed");
    let args = train_args("qwen3", &shards, &out, &extra);
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let mut launcher = Command::new(bin).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while !out.join("checkpoint-0000040").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint 40");
        std::thread::sleep(Duration::from_millis(20));
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let lines = || std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
    std::thread::sleep(Duration::from_millis(500));
    let after_kill = lines();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(), after_kill, "the ranks outlived their launcher");
    assert!(after_kill < 120, "the run finished before the kill ({after_kill} steps)");
    let mut resume = args.clone();
    resume.push("--resume".into());
    run(&resume);
    let d = max_rel_diff(&tmp.path().join("straight/checkpoint-0000120"), &out.join("checkpoint-0000120"));
    assert_eq!(d, 0.0, "resumed after kill -9: differs by {d:e}");
}
