#!/usr/bin/env python3
"""Benchmark of `distill train` against the PyTorch eager step it replaces (not a test).

    bench_train.py DISTILL_BINARY WORK_DIR [--device cpu] [--steps 10] [--batch-tokens 2048]
                   [--reps 1] [--student DIR --shards DIR] [--nproc N]

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

With `--nproc N` it measures data-parallel training instead, on the same global batch:
one process with N micro-batches per step against N processes of one micro-batch each
(`--nproc N`; with ZeRO-1; with bf16 gradients): tokens/s, the time per step spent
summing gradients over the ranks and its share of the step, the gradient bytes per step,
peak resident memory of the largest process, and an estimate for 8 GPUs from those
bytes and NCCL's published bus bandwidth (stated in the output).
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
    # The run's final checkpoint is ~1 GB on the main job's student: not kept.
    shutil.rmtree(out, ignore_errors=True)
    gpu = [l["gpu_memory_bytes"] for l in logs if "gpu_memory_bytes" in l]
    rate = statistics.median(l["tokens_per_s"] for l in logs[2:] or logs)
    return rate, max(gpu) if gpu else rss, [l["tokens"] for l in logs]


def parallel_line(a, name, extra):
    """A data-parallel line: tokens/s, median seconds per step and in communication."""
    out = a.work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    args = [a.binary, "train", "--student", a.student, "--shards", a.shards, "--output", out, "--device", a.device,
            "--save-every", "1000000", "--keep-last", "1", "--steps", a.steps, "--batch-tokens", a.batch_tokens,
            "--shuffle", "false", "--pack", "false", "--alpha", "0", *extra]
    _, rss = measure(args)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    shutil.rmtree(out, ignore_errors=True)
    step = statistics.median(l["tokens"] / l["tokens_per_s"] for l in logs)
    comm = statistics.median(l["time"].get("communication", 0.0) for l in logs)
    return statistics.median(l["tokens_per_s"] for l in logs), step, comm, rss


def parameter_count(student):
    """Elements of the student's tensors, from the safetensors headers."""
    total = 0
    for f in Path(student).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total


# Assumptions of the 8-GPU estimate (not measured here): all-reduce bus bandwidth of 8
# H100 SXM on NVLink 4 as NVIDIA's nccl-tests report it for large messages, and the step's
# compute at 40% of an H100's dense bf16 peak (989 TFLOP/s), 6 FLOPs per parameter and token.
NCCL_BUS_BW = 450e9
H100_BF16 = 989e12 * 0.4


def parallel_table(a):
    n = a.nproc
    lines = {
        f"1 process, {n} micro-batches per step": ["--grad-accum", n],
        f"{n} processes (--nproc {n})": ["--nproc", n],
        f"{n} processes, ZeRO-1": ["--nproc", n, "--zero1"],
        f"{n} processes, bf16 gradients": ["--nproc", n, "--allreduce-dtype", "bf16"],
    }
    results = {name: [] for name in lines}
    for rep in range(a.reps):
        for name, extra in lines.items():
            results[name].append(parallel_line(a, name.split(",")[0].replace(" ", "-") + str(len(extra)), extra))
            print(f"rep {rep + 1}: {name}: {results[name][-1][0]:.1f} tokens/s", file=sys.stderr)
    params = parameter_count(a.student)
    base = statistics.median(r[0] for r in results[next(iter(lines))])
    print(f"\n## train, data-parallel: {a.device}, student {a.student.name} ({params / 1e6:.1f}M parameters), "
          f"{a.batch_tokens} padded tokens per micro-batch, {n} per step, median of {a.steps - 2} steps x {a.reps}")
    print("| line | tokens/s | vs 1 process | s/step | gradient sum s/step | share of step | peak RSS, largest process |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        rate, step, comm, rss = (statistics.median(r[i] for r in rs) for i in range(4))
        share = f"{comm / step:.1%}" if "processes" in name else "-"
        comm_s = f"{comm:.3f}" if "processes" in name else "-"
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {step:.2f} | {comm_s} | {share} | {max(r[3] for r in rs) / 2**30:.2f} GiB |")
    fp32, bf16 = 4 * params, 2 * params
    tokens = a.batch_tokens  # per rank per step, one micro-batch each
    compute = 6 * params * tokens / H100_BF16
    ring = lambda size, ranks: size * 2 * (ranks - 1) / ranks / NCCL_BUS_BW
    print(f"\nGradients per step: {fp32 / 2**20:.0f} MiB in float32, {bf16 / 2**20:.0f} MiB in bf16. Estimate for 8 GPUs "
          f"(ring all-reduce time = bytes x 2 x 7/8 / bus bandwidth, {NCCL_BUS_BW / 1e9:.0f} GB/s assumed for 8 H100 "
          f"on NVLink; compute at {H100_BF16 / 1e12:.0f} TFLOP/s, 6 x {params / 1e6:.1f}M x {tokens} tokens per rank "
          f"and step): all-reduce {ring(fp32, 8) * 1e3:.2f} ms (fp32) / {ring(bf16, 8) * 1e3:.2f} ms (bf16) against "
          f"{compute * 1e3:.2f} ms of compute per step -> {compute / (compute + ring(fp32, 8)):.0%} / "
          f"{compute / (compute + ring(bf16, 8)):.0%} scaling efficiency (no overlap: gradients are summed after the "
          f"last micro-batch; more micro-batches per step raise it).")


def eager_line(a, mode, env=None):
    out, rss = measure([sys.executable, ROOT / "scripts/kd_step_eager.py", a.student, a.shards, a.steps,
                        a.batch_tokens, a.device, "--mode", mode], env)
    rate = float(re.search(r"tokens_per_s=([\d.]+)", out).group(1))
    gpu = re.search(r"peak_memory_bytes=(\d+)", out)
    tokens = [int(t) for t in re.findall(r"tokens=(\d+)", out)]
    return rate, int(gpu.group(1)) if gpu else rss, tokens


def measure(args, env=None, may_fail=False):
    """Runs one line in a child Python process that reports the line's own peak RSS:
    (stdout, peak bytes). A line that `may_fail` (a baseline that may run out of memory)
    gives stdout None and the peak where it stopped."""
    probe = ("import os,resource,subprocess,sys;"
             "p=subprocess.run(sys.argv[1:]);"
             "sys.stderr.write(f'\\nPEAK_RSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n');"
             "sys.exit(p.returncode and 1)")
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    rss = int(re.search(r"PEAK_RSS_KB=(\d+)", proc.stderr).group(1)) * 1024
    if proc.returncode != 0:
        if may_fail:
            print(f"{' '.join(map(str, args[:4]))} failed at {rss / 2**30:.2f} GiB", file=sys.stderr)
            return None, rss
        sys.exit(f"{' '.join(map(str, args[:4]))} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout, rss


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
    ap.add_argument("--nproc", type=int, help="measure data-parallel training with N processes instead")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.shards is None:
        main_job = sorted((ROOT / ".cache/real").glob("shards-*/train"))
        student = ROOT / ".cache/runs/main/student-init"
        if main_job and (student / "config.json").exists():
            a.shards, a.student = main_job[0], student
        else:
            tiny_setup(a)
    if a.nproc:
        return parallel_table(a)
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
