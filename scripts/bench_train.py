#!/usr/bin/env python3
"""Benchmark of `distill train` against the PyTorch eager step it replaces (not a test).

    bench_train.py DISTILL_BINARY WORK_DIR [--device cpu] [--steps 10] [--batch-tokens 2048]
                   [--reps 1] [--student DIR --shards DIR]

Student and shards: the main job's (`scripts/run.sh` leaves them in .cache/) when they
exist, else the tiny models of scripts/tiny_models.py with shards made here. Lines, each
a fresh process, `--reps` times in turn (the machine's noise shows in the spread):
  - distill KD (bucket forward KL, alpha 0) and SFT (alpha 1), rows in shard order,
    padded (`--shuffle false --pack false`);
  - distill with its defaults (only --steps given: shuffled, `--pack auto`, its own
    --batch-tokens);
  - PyTorch eager KD on identical batches (scripts/kd_step_eager.py; the per-step token
    counts are checked against distill's), with the default process settings and with the
    ones distill applies to itself on CPU (spinning OpenMP workers, freed memory kept);
  - eager the way users write it: full padded logits, log-softmax over all of them.
Each: median tokens/s over the steps after the first two, the ratio to distill KD, and
peak memory (resident set of the process on CPU, GPU memory in use on CUDA). Prints a
markdown table.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What `distill train` sets for itself on CPU (src/runtime.rs), as glibc/libgomp variables.
DISTILL_PROCESS_SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def distill_line(a, name, extra):
    out = a.work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    args = [a.binary, "train", "--student", a.student, "--shards", a.shards, "--output", out, "--device", a.device,
            "--save-every", "1000000", "--keep-last", "1", *extra]
    _, rss = measure([*args])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gpu = [l["gpu_memory_bytes"] for l in logs if "gpu_memory_bytes" in l]
    rate = statistics.median(l["tokens_per_s"] for l in logs[2:] or logs)
    return rate, max(gpu) if gpu else rss, [l["tokens"] for l in logs]


def eager_line(a, mode, env=None):
    out, rss = measure([sys.executable, ROOT / "scripts/kd_step_eager.py", a.student, a.shards, a.steps,
                        a.batch_tokens, a.device, "--mode", mode], env)
    rate = float(re.search(r"tokens_per_s=([\d.]+)", out).group(1))
    gpu = re.search(r"peak_memory_bytes=(\d+)", out)
    tokens = [int(t) for t in re.findall(r"tokens=(\d+)", out)]
    return rate, int(gpu.group(1)) if gpu else rss, tokens


def measure(args, env=None):
    """Runs one line in a child Python process that reports the line's own peak RSS."""
    probe = ("import os,resource,subprocess,sys;"
             "p=subprocess.run(sys.argv[1:]);"
             "sys.stderr.write(f'\\nPEAK_RSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n');"
             "sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:3]))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, int(re.search(r"PEAK_RSS_KB=(\d+)", proc.stderr).group(1)) * 1024


def tiny_setup(a):
    models = a.work / "tiny-models"
    subprocess.run([sys.executable, ROOT / "scripts/tiny_models.py", "make", models], check=True)
    data = a.work / "bench-train.jsonl"
    lines = (ROOT / "tests/data/corpus.txt").read_text().splitlines()
    data.write_text("".join(json.dumps({"id": f"b{i}", "text": lines[i % len(lines)]}) + "\n" for i in range(200)))
    a.shards = a.work / "train-shards"
    shutil.rmtree(a.shards, ignore_errors=True)
    measure([a.binary, "precompute", "--teacher", models / "llama", "--input", data, "--output", a.shards,
             "--top-k", "16", "--sample", "0", "--devices", "cpu", "--no-progress"])
    a.student = models / "qwen3"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--student", type=Path)
    ap.add_argument("--shards", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.shards is None:
        main_job = sorted((ROOT / ".cache/real").glob("shards-*/train"))
        student = ROOT / ".cache/runs/main/student-init"
        if main_job and (student / "config.json").exists():
            a.shards, a.student = main_job[0], student
        else:
            tiny_setup(a)
    # Padded batches of rows in shard order: what the eager lines run.
    fixed = ["--steps", a.steps, "--batch-tokens", a.batch_tokens, "--shuffle", "false", "--pack", "false"]
    lines = {
        "distill KD (alpha 0)": lambda: distill_line(a, "kd", [*fixed, "--alpha", "0"]),
        "distill SFT (alpha 1)": lambda: distill_line(a, "sft", [*fixed, "--alpha", "1"]),
        "distill, defaults": lambda: distill_line(a, "defaults", ["--steps", max(4, a.steps // 2)]),
        "eager KD, identical batches": lambda: eager_line(a, "identical"),
        "eager KD, identical batches, distill's process settings": lambda: eager_line(a, "identical",
                                                                                       DISTILL_PROCESS_SETTINGS),
        "eager KD as users write it (full padded logits)": lambda: eager_line(a, "users"),
    }
    results = {name: [] for name in lines}
    for rep in range(a.reps):
        for name, line in lines.items():
            results[name].append(line())
            print(f"rep {rep + 1}: {name}: {results[name][-1][0]:.1f} tokens/s", file=sys.stderr)
    kd_tokens = results["distill KD (alpha 0)"][0][2]
    for name in lines:
        if name.startswith("eager") and results[name][0][2] != kd_tokens[:len(results[name][0][2])]:
            sys.exit(f"{name}: batches differ from distill's (tokens per step {results[name][0][2]} vs {kd_tokens})")
    rate = {name: statistics.median(r[0] for r in rs) for name, rs in results.items()}
    memory = {name: max(r[1] for r in rs) for name, rs in results.items()}
    kd = rate["distill KD (alpha 0)"]
    memory_kind = "peak GPU memory" if a.device.startswith("cuda") else "peak resident memory"
    print(f"\n## train: {a.device}, student {a.student.name}, shards {a.shards.parent.name}/{a.shards.name}, "
          f"{a.batch_tokens} padded tokens per step (defaults: their own), median of {a.steps - 2} steps x {a.reps}")
    print(f"| line | tokens/s | distill KD / this | {memory_kind} |")
    print("|---|---|---|---|")
    for name in lines:
        ratio = "1.00" if name == "distill KD (alpha 0)" else f"{kd / rate[name]:.2f}"
        print(f"| {name} | {rate[name]:.0f} | {ratio} | {memory[name] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
