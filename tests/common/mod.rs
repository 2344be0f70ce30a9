//! Shared by the end-to-end tests: the tiny models made by scripts/tiny_models.py (once
//! per fixture version, cached under target/), the `distill` binary and its outcome,
//! the Python that runs transformers, and comparison helpers.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

pub const MODELS: &[&str] = &[
    "llama",
    "llama-tied-bf16",
    "qwen2",
    "qwen3",
    "mistral",
    "qwen3-moe",
    "qwen2-moe",
    "mixtral",
    "gemma2",
    "gemma3",
    "gemma3-mm",
];

/// The source tree: where cargo built the tests, or $DISTILL_REPO when they run
/// elsewhere (scripts/gpu_check.sh on a GPU machine).
pub fn repo() -> PathBuf {
    std::env::var_os("DISTILL_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The venv's Python (scripts/setup.sh makes it), or $DISTILL_PYTHON.
pub fn python() -> PathBuf {
    std::env::var_os("DISTILL_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// Runs the binary under test: `DISTILL_BIN` where the tests run away from their build
/// tree (scripts/gpu_check.sh sets it), else the one cargo built.
pub fn distill(args: &[&str]) -> Output {
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    Command::new(bin).args(args).output().unwrap()
}

/// The stdout of a run that must succeed (else panics with its stderr).
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "distill failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of a run that must fail cleanly: exit code 1, no panic.
pub fn err(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "distill should fail cleanly:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The shipped sample input: text, chat and prompt/response rows.
pub fn sample() -> PathBuf {
    repo().join("tests/data/sample.jsonl")
}

/// Panics unless `msg` (a refusal) names every one of `parts`.
pub fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "the message should name {p:?}:\n{msg}");
    }
}

/// `distill precompute` of tiny teacher `model` over `input` into `out` (on the CPU
/// unless `extra` names `--devices`).
pub fn precompute(model: &str, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let dir = model_dir(model);
    let mut args = vec!["precompute", "--no-progress", "--teacher", dir.to_str().unwrap()];
    if !extra.contains(&"--devices") {
        args.extend(["--devices", "cpu"]);
    }
    args.extend(["--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    args.extend(extra);
    distill(&args)
}

/// A shard set's manifest.json as JSON.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Runs a short Python snippet in the venv; panics with its output on failure.
pub fn python_ok(code: &str, args: &[&Path]) {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Runs scripts/tiny_models.py with `args`; panics with its output on failure.
pub fn run_script(args: &[&str]) {
    let out = Command::new(python())
        .arg(repo().join("scripts/tiny_models.py"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh first): {e}", python().display()));
    assert!(
        out.status.success(),
        "tiny_models.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Directory holding one folder per tiny model; generated on first use. The name
/// carries a hash of the generator so a changed script makes a new set.
/// $DISTILL_FIXTURES points at a ready set instead (a GPU machine without Python deps).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DISTILL_FIXTURES") {
            return PathBuf::from(dir);
        }
        let script = std::fs::read(repo().join("scripts/tiny_models.py")).unwrap();
        let corpus = std::fs::read(repo().join("tests/data/corpus.txt")).unwrap();
        let hash = fnv1a(&[script, corpus].concat());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tiny-models-{hash:016x}"));
        if !dir.exists() {
            run_script(&["make", dir.to_str().unwrap()]);
        }
        dir
    })
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// max |a - b| / max |b| over the positions where `mask` `[batch, seq]` is 1 (all when None).
pub fn rel_err(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let (diff, scale) = match mask {
        Some(m) => {
            let keep = m.ne(0);
            let pick = |t: &Tensor| t.index(&[Some(keep.shallow_clone())]);
            ((pick(&a) - pick(&b)).abs().max(), pick(&b).abs().max())
        }
        None => ((&a - &b).abs().max(), b.abs().max()),
    };
    diff.double_value(&[]) / scale.double_value(&[])
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// ‖a - b‖ / ‖b‖ over the positions where `mask` is 1: the figure for reduced-precision
/// runs, where a max-based ratio is dominated by one unlucky element.
pub fn norm_rel_err(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f64 {
    let a = a.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let keep = |t: &Tensor| match mask {
        Some(m) => t.index(&[Some(m.ne(0))]),
        None => t.shallow_clone(),
    };
    let (a, b) = (keep(&a), keep(&b));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// One reduced-precision comparison: our error against the float32 reference, and
/// transformers' own bfloat16 error against the same reference (its yardstick).
pub struct PrecisionCheck {
    pub what: String,
    pub ours: f64,
    pub transformers_bf16: f64,
}

/// Logits of `model` run on `device` in `kind`, against the float32 reference, for the
/// left-padded batch (the explicit-mask path) and the unpadded one (the causal path).
pub fn reduced_precision_errors(name: &str, device: tch::Device, kind: Kind) -> Vec<PrecisionCheck> {
    let dir = model_dir(name);
    let model = distill::model::CausalLm::load(&dir, device, kind).unwrap();
    let reference = read_tensors(&dir.join("reference.safetensors"));
    ["left", "full"]
        .iter()
        .map(|side| {
            let ids = reference[&format!("{side}.input_ids")].to_device(device);
            let mask = reference.get(&format!("{side}.attention_mask"));
            let mask_dev = mask.map(|m| m.to_device(device));
            let out = tch::no_grad(|| model.forward(&ids, mask_dev.as_ref(), &[])).unwrap();
            let f32_ref = &reference[&format!("{side}.logits")];
            PrecisionCheck {
                what: format!("{name} {side}"),
                ours: norm_rel_err(&out.logits, f32_ref, mask),
                transformers_bf16: norm_rel_err(&reference[&format!("{side}.logits_bf16")], f32_ref, mask),
            }
        })
        .collect()
}

/// Runs the binary, killing it after `secs` seconds: a run that hangs fails the test
/// instead of stalling it.
pub fn distill_within(args: &[&str], secs: u64) -> Output {
    let bin = std::env::var("DISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_distill").to_string());
    let mut child = Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("distill {args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Every file below `dir` (relative path) with a hash of its bytes: equal before and
/// after a refused command means it changed nothing.
pub fn tree_digest(dir: &Path) -> std::collections::BTreeMap<PathBuf, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, u64>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), fnv1a(&std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// A copy of tiny model `name` that a test may change.
pub fn copy_model(name: &str, into: &Path) -> PathBuf {
    let dst = into.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}
