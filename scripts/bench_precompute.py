#!/usr/bin/env python3
"""Benchmark of `distill precompute` (not a test): throughput, teacher busy share, bytes
per token for k = 16, 64, 256 and one hidden layer, and the Parquet settings (zstd level,
BYTE_STREAM_SPLIT, row-group size) against decode speed with pyarrow.

    bench_precompute.py DISTILL_BINARY WORK_DIR [--devices cpu] [--tokens 12000] [--shape small|qwen2-7b]

The teacher is a random Qwen2-shaped model with Qwen2's vocabulary size (151,936 ids;
scripts/tiny_models.py bench-model): `small` (hidden 128, 2 layers; the head and top-k
dominate, as in a real capture's host-side work) or Qwen2-7B's shape for a GPU. The
teacher's FLOP rate is reported against the same device's measured matmul rate (float32
on CPU, bfloat16 on CUDA), through the same torch. Caveat: a random teacher's
distributions are flatter and its inputs (a 384-token BPE) less varied than a real one's,
so bytes per token here are indicative only; see docs/benchmarks.md. Prints markdown tables.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path, tokens: int):
    lines = (ROOT / "tests/data/corpus.txt").read_text().splitlines()
    rows, approx, i = [], 0, 0
    while approx < tokens:
        line = lines[i % len(lines)]
        rows.append(json.dumps({"id": f"bench-{i}", "text": line}))
        approx += len(line) // 2.2  # ~ tokens per character of the tiny BPE
        i += 1
    path.write_text("\n".join(rows) + "\n")


def precompute(binary, teacher, data, out, devices, **opts):
    shutil.rmtree(out, ignore_errors=True)
    args = [binary, "precompute", "--teacher", str(teacher), "--input", str(data), "--output", str(out),
            "--devices", devices, "--no-progress"]
    # The top-k targets alone (no tail draws), as the transformers baseline computes them.
    opts = {"sample": 0, **opts}
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"precompute failed: {res.stderr}")
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["shards"])
    size = sum(s["bytes"] for s in m["shards"])
    busy = float(re.search(r"teacher busy\s+(\d+)%", res.stdout).group(1))
    run_s = float(re.search(r"time\s+([\d.]+)s", res.stdout).group(1))
    batch = int(re.search(r"batch tokens\s+(\d+)", res.stdout).group(1))
    return {"batch_tokens": batch, "tokens": tokens, "bytes": size, "bpt": size / tokens, "tok_s": tokens / run_s, "busy": busy,
            "wall": wall, "out": out}


def decode_rate(out: Path, repeat=3):
    """Tokens per second pyarrow decodes (all columns, best of `repeat`)."""
    files = sorted(out.glob("shard-*.parquet"))
    tokens = sum(sum(pq.read_table(f, columns=["num_tokens"]).column(0).to_pylist()) for f in files)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in files:
            pq.read_table(f)
        best = min(best, time.perf_counter() - t0)
    return tokens / best


def teacher_flops_per_token(c):
    """2 x multiply-adds of the projections, MLP and head per token (attention scores,
    which grow with length, are left out: these sequences are short)."""
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    d = c.get("head_dim") or h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * c["intermediate_size"]
    return 2 * (layers * per_layer + h * c["vocab_size"])


def matmul_rate(devices):
    """FLOP/s of a large matmul on the first device, through the same torch."""
    import torch

    dev = devices.split(",")[0].split("+")[0]
    dev = "cuda:0" if dev in ("auto", "cuda") and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    n = 8192 if dev.startswith("cuda") else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    best = float("inf")
    for _ in range(5):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n ** 3 / best


def compare_with_transformers(a):
    """distill precompute against transformers computing the same targets on the same token
    rows (scripts/capture_eager.py), at several batch sizes, on the main job's teacher and
    text when `scripts/run.sh` has left them in .cache/ (else the random bench teacher)."""
    real = ROOT / ".cache/real/teacher"
    texts = sorted((ROOT / ".cache/real").glob("data-*/train.jsonl"))
    if (real / "config.json").exists() and texts:
        teacher, data = real, a.work / "real-rows.jsonl"
        rows, chars = [], 0
        for line in texts[0].read_text().splitlines():
            if chars > a.tokens * 4:  # ~4 characters per token of SmolLM2's BPE
                break
            rows.append(line)
            chars += len(line)
        data.write_text("\n".join(rows) + "\n")
    else:
        teacher, data = a.work / "bench-teacher", a.work / "bench.jsonl"
    device = a.devices.split(",")[0]
    device = "cpu" if device == "auto" else device
    out = a.work / "shards-compare"
    print(f"\n## distill precompute vs transformers (teacher {teacher.name}, top-64, tail, label log-prob; "
          f"--max-len 256; device {device})")
    print("| batch tokens | tokens | distill tokens/s | transformers tokens/s | distill / transformers |")
    print("|---|---|---|---|---|")
    for batch in [None, 2048, 4096, 8192, 16384]:
        opts = {"top_k": 64, "max_len": 256}
        if batch:
            opts["batch_tokens"] = batch
        r = precompute(a.binary, teacher, data, out, a.devices, **opts)
        used = r["batch_tokens"]
        res = subprocess.run([sys.executable, str(ROOT / "scripts/capture_eager.py"), str(teacher), str(out),
                              str(used), "64", device], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"capture_eager.py failed: {res.stderr[-3000:]}")
        eager = float(re.search(r"tokens_per_s=([\d.]+)", res.stdout).group(1))
        label = f"{used} (default)" if batch is None else str(batch)
        print(f"| {label} | {r['tokens']} | {r['tok_s']:.0f} | {eager:.0f} | {r['tok_s'] / eager:.2f} |")


FAMILIES = {
    # shape of `tiny_models.py bench-model`: (title, transformers implementations compared)
    "qwen3-moe": ("mixture-of-experts teacher (random Qwen3-MoE, hidden 256, 4 layers, 16 experts, top 4)",
                  ["grouped_mm", "eager"]),
    "gemma2": ("Gemma 2 teacher (random, hidden 256, 4 layers, attention soft-capped at 50, logits at 30, "
               "window 64 on every other layer)", ["eager"]),
}


def compare_family(a, shape):
    """A teacher of another family against transformers on the same rows: the random
    Qwen3-MoE (the tiny BPE's 384 ids, so the experts, not the head, take the time) against
    transformers' default experts implementation (grouped_mm) and its loop over experts
    (eager); the random Gemma 2 against transformers' eager attention (its only path with
    soft-capping)."""
    title, impls = FAMILIES[shape]
    teacher = a.work / f"bench-teacher-{shape}"
    subprocess.run([sys.executable, str(ROOT / "scripts/tiny_models.py"), "bench-model", str(teacher), shape],
                   check=True)
    data = a.work / f"bench-{shape}.jsonl"
    make_input(data, a.tokens)  # ~3x the tokens of the dense comparison's: short runs are all warm-up
    device = a.devices.split(",")[0]
    device = "cpu" if device == "auto" else device
    out = a.work / f"shards-{shape}"
    print(f"\n## {title}: distill precompute vs transformers (top-64 targets; --max-len 256; device {device})")
    print("| batch tokens | tokens | distill tokens/s | " + " | ".join(f"transformers {i} tokens/s" for i in impls)
          + " | " + " | ".join(f"distill / {i}" for i in impls) + " |")
    print("|---|---|---|" + "---|" * (2 * len(impls)))
    for batch in [None, 512, 4096]:
        opts = {"top_k": 64, "max_len": 256}
        if batch:
            opts["batch_tokens"] = batch
        r = precompute(a.binary, teacher, data, out, a.devices, **opts)
        used = r["batch_tokens"]
        theirs = []
        for impl in impls:
            extra = [impl] if shape == "qwen3-moe" else []
            res = subprocess.run([sys.executable, str(ROOT / "scripts/capture_eager.py"), str(teacher), str(out),
                                  str(used), "64", device, *extra], capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"capture_eager.py failed: {res.stderr[-3000:]}")
            theirs.append(float(re.search(r"tokens_per_s=([\d.]+)", res.stdout).group(1)))
        label = f"{used} (default)" if batch is None else str(batch)
        print(f"| {label} | {r['tokens']} | {r['tok_s']:.0f} | " + " | ".join(f"{t:.0f}" for t in theirs) + " | "
              + " | ".join(f"{r['tok_s'] / t:.2f}" for t in theirs) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("work", type=Path)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--tokens", type=int, default=12000)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--only-compare", action="store_true", help="only distill vs transformers")
    ap.add_argument("--moe", action="store_true", help="only the mixture-of-experts teacher vs transformers")
    ap.add_argument("--family", choices=sorted(FAMILIES), help="only this family's random teacher vs transformers")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.moe or a.family:
        compare_family(a, a.family or "qwen3-moe")
        return
    teacher = a.work / "bench-teacher"
    subprocess.run([sys.executable, str(ROOT / "scripts/tiny_models.py"), "bench-model", str(teacher), a.shape],
                   check=True)
    flops_per_token = teacher_flops_per_token(json.loads((teacher / "config.json").read_text()))
    peak = matmul_rate(a.devices)
    data = a.work / "bench.jsonl"
    make_input(data, a.tokens)
    out = a.work / "shards"
    if a.only_compare:
        compare_with_transformers(a)
        return

    print(f"\n## capture (teacher: random Qwen2 shape `{a.shape}`, vocab 151936; devices {a.devices}; "
          f"measured matmul rate {peak / 1e9:.0f} GFLOP/s)")
    print("| k | hidden layers | tokens | tokens/s | teacher GFLOP/s | share of matmul rate | teacher busy | bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    for k, hidden in [(16, ""), (64, ""), (256, ""), (64, "2")]:
        opts = {"top_k": k}
        if hidden:
            opts["hidden_layers"] = hidden
        r = precompute(a.binary, teacher, data, out, a.devices, **opts)
        rate = r["tok_s"] * flops_per_token
        print(f"| {k} | {hidden or '-'} | {r['tokens']} | {r['tok_s']:.0f} | {rate / 1e9:.1f} | {rate / peak:.0%} "
              f"| {r['busy']:.0f}% | {r['bpt']:.1f} |")

    compare_with_transformers(a)

    print("\n## Parquet settings at k = 64 (bytes/token vs pyarrow decode rate)")
    print("| zstd level | byte_stream_split | row-group rows | bytes/token | decode tokens/s |")
    print("|---|---|---|---|---|")
    for level, bss, rg in [(1, "false", 64), (3, "false", 64), (1, "true", 64), (3, "true", 64), (9, "true", 64),
                           (3, "true", 16), (3, "true", 256)]:
        r = precompute(a.binary, teacher, data, out, a.devices, top_k=64, zstd_level=level,
                       byte_stream_split=bss, row_group_rows=rg)
        print(f"| {level} | {bss} | {rg} | {r['bpt']:.1f} | {decode_rate(out):.0f} |")


if __name__ == "__main__":
    main()
